"""Benchmark grids: cells run once, failures are recorded, the grid goes on, tables are written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from firmad.bench import GridExecutor, read_grid, run_grid
from firmad.errors import ConfigError
from tests.conftest import FIXTURE_FMNIST, TINY


def _grid(tmp_path, **extra):
    grid = {
        "name": "tiny",
        "recipes": ["fmnist-cpu", "fmnist-cpu-ntxent"],
        "classes": [0, "Trouser"],
        "seeds": [0],
        "root": str(FIXTURE_FMNIST),
        "set": [s for s in TINY if not s.startswith("data.root")]
        + ["train.epochs=1", "train.eval_every=1"],
        **extra,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_grid_runs_resumes_and_records_failures(tmp_path):
    out = tmp_path / "out"
    result = run_grid(_grid(tmp_path), out_dir=out, quiet=True)
    assert [s["status"] for s in result["statuses"]] == ["ran"] * 4
    rows = list(csv.DictReader((out / "bench.csv").open()))
    assert {r["recipe"] for r in rows} == {"fmnist-cpu", "fmnist-cpu-ntxent"}
    assert {r["normal_class"] for r in rows} == {"0", "1"}
    assert all(r["status"] == "done" and 0 <= float(r["auroc"]) <= 1 for r in rows)
    md = (out / "bench.md").read_text()
    assert "fmnist-cpu-ntxent" in md and "**mean**" in md and "**" in md
    assert (out / "bench.png").stat().st_size > 0
    assert (out / "bench_curves.png").exists()
    assert "first epoch at target" in md

    # A second run redoes nothing.
    stamp = (out / "fmnist-cpu" / "fashion-mnist-c0-s0" / "results.json").stat().st_mtime_ns
    again = run_grid(_grid(tmp_path), out_dir=out, quiet=True)
    assert [s["status"] for s in again["statuses"]] == ["done"] * 4
    assert (out / "fmnist-cpu" / "fashion-mnist-c0-s0" / "results.json").stat().st_mtime_ns == stamp

    # An interrupted cell (checkpoint, no results) is finished, not restarted.
    cell = out / "fmnist-cpu" / "fashion-mnist-c1-s0"
    (cell / "results.json").unlink()
    third = run_grid(_grid(tmp_path), out_dir=out, quiet=True)
    assert sorted(s["status"] for s in third["statuses"]) == ["done", "done", "done", "ran"]
    assert json.loads((cell / "results.json").read_text())["normal_classes"] == [1]


def test_failed_cell_is_recorded_and_a_grid_of_failures_exits_non_zero(tmp_path, capsys):
    # data.max_train=2 (8 samples with outliers) with batch 16 fails at start, with a clear message.
    from firmad.cli import main

    out = tmp_path / "out"
    path = _grid(tmp_path, recipes=["fmnist-cpu"], classes=[0])
    grid = yaml.safe_load(path.read_text())
    grid["set"] += ["data.max_train=2"]
    path.write_text(yaml.safe_dump(grid))
    assert main(["-q", "bench", "--config", str(path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "every cell of the grid failed" in err and "failed: fmnist-cpu" in err
    assert "batch_size" in err
    error = json.loads((out / "fmnist-cpu" / "fashion-mnist-c0-s0" / "error.json").read_text())
    assert "batch_size" in error["error"]
    assert "Failed cells" in (out / "bench.md").read_text()
    rows = list(csv.DictReader((out / "bench.csv").open()))
    assert [r["status"] for r in rows] == ["failed"]


def test_classes_and_seeds_run_a_part_and_the_tables_list_the_whole_grid(tmp_path, capsys):
    from firmad.cli import main

    out = tmp_path / "out"
    path = _grid(tmp_path, recipes=["fmnist-cpu"], seeds=[0, 1])
    args = ["-q", "bench", "--config", str(path), "--out", str(out)]
    assert main(args + ["--classes", "trouser", "--seeds", "1"]) == 0
    rows = csv.DictReader((out / "bench.csv").open())
    status = {(r["normal_class"], r["seed"]): r["status"] for r in rows}
    assert status == {("0", "0"): "pending", ("0", "1"): "pending", ("1", "0"): "pending",
                      ("1", "1"): "done"}  # fmt: skip
    assert not (out / "fmnist-cpu" / "fashion-mnist-c0-s1").exists()
    # Values the grid does not have are refused before any work, with what it does have.
    for option, value, said in (("--classes", "5", "its classes: [0, 1]"),
                                ("--classes", "nope", "not a class"),
                                ("--seeds", "2", "not in the grid's seeds [0, 1]"),
                                ("--seeds", "one", "integers")):  # fmt: skip
        assert main(args + [option, value]) == 2
        assert said in capsys.readouterr().err
    assert not (out / "fmnist-cpu" / "fashion-mnist-c0-s0").exists()


def test_bad_grid_is_rejected_before_work(tmp_path):
    with pytest.raises(ConfigError, match="not a class"):
        run_grid(_grid(tmp_path, classes=[42]), out_dir=tmp_path / "o", quiet=True)
    path = tmp_path / "g.yaml"
    path.write_text("recipes: [fmnist-cpu]\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        read_grid(path)


def test_backbones_axis_crosses_every_recipe(tmp_path):
    from firmad.bench import cell_command, plan_cells

    grid = read_grid(_grid(tmp_path, backbones=["lenet", "resnet_small@0.25"], classes=[1, 0]))
    cells = plan_cells(grid, tmp_path / "o")
    # class-major: every recipe x backbone of class 1 (listed first), then class 0
    assert [c.key for c in cells] == [
        f"{label}/fashion-mnist-c{c}-s0"
        for c in (1, 0)
        for label in (
            "fmnist-cpu+lenet",
            "fmnist-cpu+resnet_small-0.25",
            "fmnist-cpu-ntxent+lenet",
            "fmnist-cpu-ntxent+resnet_small-0.25",
        )
    ]
    assert len({c.run_dir for c in cells}) == 8
    cmd = " ".join(cell_command(cells[1], grid, "new"))
    assert "model.backbone=resnet_small" in cmd and "model.width=0.25" in cmd
    assert "data.normal_class=1" in cmd
    assert "model.width=1.0" in " ".join(cell_command(cells[0], grid, "new"))  # lenet
    with pytest.raises(ConfigError, match="backbone"):
        plan_cells(read_grid(_grid(tmp_path, backbones=["no_such_net"])), tmp_path / "p")
    with pytest.raises(ConfigError, match="fixed width"):  # refused before any cell runs
        plan_cells(read_grid(_grid(tmp_path, backbones=["lenet@0.5"])), tmp_path / "q")


def _cells(tmp_path, n=5):
    from firmad.bench import Cell

    return [Cell("fmnist-cpu", "fashion-mnist", c, 0, tmp_path / f"c{c}") for c in range(n)]


def test_every_state_of_a_cell_has_its_own_status(tmp_path):
    from firmad.bench import collect_rows

    cells = _cells(tmp_path)
    for cell in cells:
        cell.run_dir.mkdir()
    result = {"method": "firm", "normal_class_names": ["t"], "results": [{"auroc": 0.9}]}
    (cells[0].run_dir / "results.json").write_text(json.dumps(result))
    (cells[1].run_dir / "error.json").write_text(json.dumps({"error": "boom"}))
    meta = {"format": "firmad-checkpoint-1", "epoch": 1, "global_step": 3, "finished": False}
    (cells[2].run_dir / "checkpoint.json").write_text(json.dumps(meta))
    (cells[3].run_dir / "config.yaml").write_text("name: x\n")  # started, never checkpointed
    rows = collect_rows(cells, running={cells[4].key})
    assert [r["status"] for r in rows] == ["done", "failed", "interrupted", "pending", "running"]
    assert rows[1]["error"] == "boom" and rows[0]["auroc"] == 0.9
    assert [r["status"] for r in collect_rows(cells)][4] == "pending"
    # A damaged checkpoint cannot be resumed: the cell is failed, with the reason.
    (cells[2].run_dir / "checkpoint.json").write_text(json.dumps({"finished": False}))
    row = collect_rows(cells)[2]
    assert row["status"] == "failed" and "damaged" in row["error"]


def test_bad_executor_options_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="executor"):
        run_grid(_grid(tmp_path), out_dir=tmp_path / "o", executor=GridExecutor("dask"), quiet=True)
    with pytest.raises(ConfigError, match="devices"):
        run_grid(
            _grid(tmp_path),
            out_dir=tmp_path / "o",
            executor=GridExecutor(devices="0,x"),
            quiet=True,
        )
    with pytest.raises(ConfigError, match="executor local"):
        ray_on_0 = GridExecutor("ray", devices="0")
        run_grid(_grid(tmp_path), out_dir=tmp_path / "o", executor=ray_on_0, quiet=True)


BAD_RESOURCES = [
    ({"cell_cpus": float("nan")}, "--cell-cpus: must be a number > 0"),
    ({"cell_cpus": float("inf")}, "--cell-cpus: must be a number > 0"),
    ({"cell_cpus": 0.0}, "--cell-cpus: must be a number > 0"),
    ({"cell_cpus": -2.0}, "--cell-cpus: must be a number > 0"),
    ({"cell_cpus": 1.5}, "--cell-cpus: 1.5: above 1 it must be a whole number"),
    ({"cell_gpus": -1.0}, "--cell-gpus: must be a number >= 0"),
    ({"cell_gpus": float("nan")}, "--cell-gpus: must be a number >= 0"),
    ({"cell_gpus": 2.5}, "--cell-gpus: 2.5: above 1 it must be a whole number"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_RESOURCES, ids=[m for _, m in BAD_RESOURCES])
def test_bad_cell_resources_are_refused_before_any_work(tmp_path, monkeypatch, kwargs, message):
    """Ray would fail on these inside its scheduler, with a traceback, after planning."""
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # never reached: refused before Ray starts
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        run_grid(_grid(tmp_path), out_dir=out, executor=GridExecutor("ray", **kwargs), quiet=True)
    assert not out.exists()


@pytest.mark.parametrize(("count", "devices", "said"), [
    (0, "0", "GPU 0 not found; this machine has no CUDA GPU"),
    (2, "1,2,3", "GPU 2, 3 not found; this machine has GPUs 0..1"),
])  # fmt: skip
def test_devices_the_machine_lacks_are_an_error(
    tmp_path, monkeypatch, capsys, count, devices, said
):
    """Not a grid that quietly trains on the CPU."""
    import torch

    from firmad.cli import main

    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match=said):
        run_grid(_grid(tmp_path), out_dir=out, executor=GridExecutor(devices=devices), quiet=True)
    args = ["-q", "bench", "--config", str(_grid(tmp_path)), "--out", str(out)]
    assert main([*args, "--devices", devices]) == 2
    assert main([*args, "--executor", "ray", "--cell-cpus", "nan"]) == 2
    err = capsys.readouterr().err
    assert said in err and "--cell-cpus" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*-grid.yaml"))
)
def test_every_benchmark_grid_plans_valid_cells(path, tmp_path):
    """The grids in benchmarks/ stay runnable: each parses, and each cell's config validates."""
    from firmad.bench import plan_cells
    from firmad.config import backbone_overrides, load_config

    grid = read_grid(path)
    cells = plan_cells(grid, tmp_path)
    assert cells
    for cell in {(c.recipe, c.backbone): c for c in cells}.values():
        load_config(cell.recipe, [*grid.set, *backbone_overrides(cell.backbone)])


def _results(run_dir: Path, rows: list[dict], name: str) -> None:
    run_dir.mkdir()
    data = {"method": "firm", "normal_class_names": [name], "results": rows}
    (run_dir / "results.json").write_text(json.dumps(data))


def _row(scorer: str, params: dict, auroc: float) -> dict:
    metrics = {"auroc": auroc, "aupr_anomaly": 0.5, "aupr_normal": 0.5, "fpr95": 0.5}
    return {"scorer": scorer, "params": params, "k": params.get("k"), "variant": "plain",
            **metrics}  # fmt: skip


def _headline_cells(markdown: str) -> list[str]:
    """The headline table's AUROC per class, in class order."""
    table = markdown.split("### ")[0]
    return [line.split("|")[2].strip() for line in table.splitlines() if line[:3] in ("| 0", "| 1")]


def test_rows_are_named_by_every_parameter_of_their_scorer(tmp_path):
    """bench.csv holds each result's label and parameters; the headline, written any way,
    picks the rows of its scorer; results.json of earlier versions (scorer and k only) get
    the same labels."""
    from firmad.bench import GridConfig, summarise

    cells = _cells(tmp_path, 2)
    kde5, kde50 = _row("kde", {"scale": 5.0}, 0.61), _row("kde", {"scale": 50.0}, 0.72)
    knn = _row("knn_cos", {"k": 5, "knn_backend": "auto"}, 0.83)
    _results(cells[0].run_dir, [kde5, kde50, knn], "T-shirt/top")
    earlier = [
        {"scorer": "knn_cos", "k": 5, "variant": "plain", "auroc": 0.94},
        {"scorer": "kde", "k": None, "variant": "plain", "auroc": 0.55},
    ]
    _results(cells[1].run_dir, earlier, "Trouser")
    expected = {
        "kde:scale=5": ["61.0", "–"],
        "kde:scale=50.0": ["72.0", "–"],
        "knn_cos": ["83.0", "94.0"],
        "kde:scale=20": ["–", "55.0"],
    }
    for headline, aurocs in expected.items():
        out = tmp_path / headline.replace(":", "-")
        out.mkdir()
        markdown = summarise(GridConfig(headline=headline), cells, out)["markdown"]
        assert _headline_cells(markdown) == aurocs, headline
    rows = list(csv.DictReader((tmp_path / "knn_cos" / "bench.csv").open()))
    assert [(r["label"], json.loads(r["params"]), r["k"]) for r in rows] == [
        ("kde:scale=5", {"scale": 5.0}, ""),
        ("kde:scale=50", {"scale": 50.0}, ""),
        ("knn_cos:k=5", {"k": 5, "knn_backend": "auto"}, "5"),
        ("knn_cos:k=5", {"k": 5, "knn_backend": "auto"}, "5"),
        ("kde", {"scale": 20.0}, ""),
    ]
    assert "| kde:scale=5 | plain | 61.0 (1/2 classes) |" in markdown.split("### ")[1]


def test_a_bad_headline_is_refused_before_work(tmp_path):
    for headline, said in (
        ("kde:scale=-5", "scale must be a finite number > 0"),
        ("knn_cos:q=1", "unknown parameter 'q'"),
        ("nope", "unknown scorer"),
    ):
        with pytest.raises(ConfigError, match=f"headline: .*{said}"):
            read_grid(_grid(tmp_path, headline=headline))
