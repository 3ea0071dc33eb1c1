"""Grid executors and stopping: a Ray grid writes the tables a local grid writes; Ctrl-C stops a
grid at once and kill -9 leaves no cell process behind."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from firmad.bench import GridExecutor, run_grid
from tests.conftest import FIXTURE_FMNIST, TINY

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"train_time_s", "wall_time_s"}
# A cell as small as a cell gets: one step, 60 test images, one scorer; threads: the default.
QUICK = [s for s in TINY if not s.startswith(("data.root", "data.max_test", "eval.scorers"))] + [
    "train.epochs=1",
    "train.steps_per_epoch=1",
    "data.max_train=64",
    "data.max_test=60",
    "eval.scorers=[knn_cos:k=5]",
]


def _grid_file(tmp_path, name="g", recipes=("fmnist-cpu",), classes=(0, 1), extra=()):
    grid = {
        "name": name,
        "recipes": list(recipes),
        "classes": list(classes),
        "seeds": [0],
        "root": str(FIXTURE_FMNIST),
        "set": QUICK + list(extra),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _table(path: Path) -> list[dict]:
    return [
        {k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(path.open())
    ]


def test_ray_grid_writes_the_tables_of_a_local_grid(tmp_path):
    """Default settings (no threads anywhere; one local worker, which may use every core; Ray
    with --cell-cpus 1): the same AUROCs, as every cell gets its own threads."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'firmad[ray]')")
    grid = _grid_file(tmp_path, classes=(1, 7))
    local = run_grid(grid, out_dir=tmp_path / "local", quiet=True)
    assert [s["status"] for s in local["statuses"]] == ["ran", "ran"]
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",  # this machine only
        )
    except Exception as err:  # noqa: BLE001 - any reason Ray cannot start here
        pytest.skip(f"a local Ray runtime cannot start here: {err}")
    try:
        result = run_grid(grid, out_dir=tmp_path / "ray", executor=GridExecutor("ray"), quiet=True)
    finally:
        ray.shutdown()
    assert [s["status"] for s in result["statuses"]] == ["ran", "ran"]
    assert _table(tmp_path / "ray" / "bench.csv") == _table(tmp_path / "local" / "bench.csv")
    assert {r["status"] for r in _table(tmp_path / "ray" / "bench.csv")} == {"done"}
    for run in ("local", "ray"):  # each cell's config records its threads
        cfg = yaml.safe_load(
            (tmp_path / run / "fmnist-cpu" / "fashion-mnist-c7-s0" / "config.yaml").read_text()
        )
        assert cfg["train"]["threads"] == 1


@pytest.mark.parametrize(
    ("grid_threads", "extra", "expected"),
    [(None, [], 1), (None, ["train.threads=3"], 3), (2, ["train.threads=3"], 2)],
)
def test_a_cell_has_one_thread_count_whatever_runs_it(tmp_path, grid_threads, extra, expected):
    """The grid's threads:, else the recipe's train.threads (with the grid's set), else 1: in
    the cell's config (train.threads) and its process's OMP_NUM_THREADS, for every executor
    (both build a cell's environment with cell_env)."""
    from firmad.bench import plan_cells, read_grid
    from firmad.bench.executors import cell_env
    from firmad.bench.grid import cell_overrides

    path = _grid_file(tmp_path, extra=extra)
    grid = read_grid(path)
    grid.threads = grid_threads
    for cell in plan_cells(grid, tmp_path / "out"):
        assert cell.threads == expected
        last = [o for o in cell_overrides(cell, grid) if o.startswith("train.threads=")][-1]
        assert last == f"train.threads={expected}"
        assert cell_env(cell)["OMP_NUM_THREADS"] == str(expected)


def _bench(grid: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "firmad", "-q", "bench", "--config", str(grid), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the bench exited early: {proc.stdout.read().decode()}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not yet reaped by its new parent) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and prctl")
def test_kill_9_leaves_no_cell_and_ctrl_c_stops_the_grid_at_once(tmp_path):
    # Cells in order: c0 already done, c1 long (interrupted), c2 pending.
    grid = _grid_file(tmp_path, classes=(0, 1, 2), extra=["train.epochs=500"])
    out = tmp_path / "out"
    done = out / "fmnist-cpu" / "fashion-mnist-c0-s0"
    done.mkdir(parents=True)
    result = {"method": "firm", "normal_class_names": ["t"], "results": [{"auroc": 0.5}]}
    (done / "results.json").write_text(json.dumps(result))
    cell = out / "fmnist-cpu" / "fashion-mnist-c1-s0"

    def training() -> bool:
        metrics = cell / "metrics.jsonl"
        return metrics.exists() and len(metrics.read_text().splitlines()) >= 2

    benches: list[subprocess.Popen] = []
    try:
        statuses = _stop_and_resume(grid, out, cell, training, benches)
        assert statuses == ["done", "interrupted", "pending"]  # from bench.csv after Ctrl-C
    finally:
        for bench in benches:  # a failed assertion leaves no bench behind
            if bench.poll() is None:
                bench.kill()
                bench.wait()


def _stop_and_resume(grid, out, cell, training, benches):
    # 1. kill -9 of the bench: its cell gets SIGTERM from the kernel, saves and exits.
    bench = _bench(grid, out)
    benches.append(bench)
    _wait_for(training, 240, "the cell to train", bench)
    pid = int((cell / ".lock").read_text().split()[-1])
    bench.kill()
    bench.wait()
    _wait_for(lambda: not _alive(pid), 60, f"the orphaned cell {pid} to end")
    meta = json.loads((cell / "checkpoint.json").read_text())
    assert meta["reason"] == "interrupted" and not meta["finished"]

    # 2. Ctrl-C: the running cell (resumed from there) saves a checkpoint, c2 never starts.
    step = meta["global_step"]
    bench = _bench(grid, out)
    benches.append(bench)

    def trained_on() -> bool:
        metrics = cell / "metrics.jsonl"
        return metrics.exists() and json.loads(metrics.read_text().splitlines()[-1])["step"] > step

    _wait_for(trained_on, 240, "the resumed cell to train", bench)
    bench.send_signal(signal.SIGINT)
    output = bench.communicate(timeout=120)[0].decode()
    assert bench.returncode == 130, output
    assert "grid stopped" in output
    meta = json.loads((cell / "checkpoint.json").read_text())
    assert meta["reason"] == "interrupted" and meta["global_step"] > step
    assert not (out / "fmnist-cpu" / "fashion-mnist-c2-s0" / "config.yaml").exists()
    assert not (cell / "error.json").exists()
    return [r["status"] for r in csv.DictReader((out / "bench.csv").open())]
