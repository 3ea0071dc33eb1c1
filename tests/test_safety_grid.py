"""Benchmark grids from careless or hostile files: refused at planning, before any cell runs,
with nothing written; and a cell gets the same threads whichever executor runs it."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import yaml

from firmad import bench
from firmad.bench import GridExecutor, read_grid, run_grid
from firmad.cli import main
from firmad.errors import ConfigError
from tests.conftest import FIXTURE_FMNIST, TINY


def _grid(tmp_path: Path, **keys) -> Path:
    grid = {"name": "g", "recipes": ["fmnist-cpu"], "classes": [1], "seeds": [0]}
    grid.update(root=str(FIXTURE_FMNIST), set=list(TINY))
    grid.update(keys)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


BAD_GRIDS = [
    ({"name": "/tmp/firmad-abs-grid"}, "name"),
    ({"name": "../../escape"}, "name"),
    ({"name": ".."}, "name"),
    ({"name": "a/b"}, "name"),
    ({"name": ""}, "name"),
    ({"seeds": [-1]}, "train.seed"),
    ({"seeds": [0, 2**40]}, "train.seed"),
    ({"recipes": ["fmnist-cpu", "fmnist-cpu"]}, "recipes: 'fmnist-cpu' is listed twice"),
    ({"classes": [0, 0, "T-shirt/top"]}, "classes: 0 is listed twice"),
    ({"classes": [0, "T-shirt/top"]}, "same class (0)"),
    ({"classes": ["bag", "Bag"]}, "same class (8)"),
    ({"seeds": [0, 0]}, "seeds: 0 is listed twice"),
    ({"backbones": ["lenet", "lenet"]}, "backbones"),
    ({"classes": [12]}, "not a class"),
    ({"set": ["eval.n_crops=1e8"]}, "eval.n_crops"),
    ({"threads": 0}, "threads"),
]


@pytest.mark.parametrize(("keys", "fragment"), BAD_GRIDS, ids=[str(k) for k, _ in BAD_GRIDS])
def test_bad_grids_fail_at_planning_and_write_nothing(tmp_path, monkeypatch, keys, fragment):
    monkeypatch.chdir(tmp_path)
    path = _grid(tmp_path, **keys)
    started = []
    monkeypatch.setattr(bench.executors, "run_cell", lambda *a, **k: started.append(a))
    with pytest.raises(ConfigError) as err:
        run_grid(path, quiet=True)
    assert fragment in str(err.value)
    assert not started
    assert [p.name for p in tmp_path.iterdir()] == ["grid.yaml"]
    assert not Path("/tmp/firmad-abs-grid").exists()


@pytest.mark.parametrize(
    "text",
    [
        "recipes: &r [fmnist-cpu]\ndatasets: *r\n",  # an alias
        "name: a\nname: b\n",  # a key given twice
        "seeds: " + "[" * 4000 + "]" * 4000 + "\n",  # nesting
    ],
)
def test_grid_yaml_is_plain_yaml(tmp_path, text):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="grid.yaml"):
        read_grid(path)


def test_the_cli_exits_2_on_a_grid_that_writes_outside(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = _grid(tmp_path, name=str(tmp_path / "elsewhere"))
    assert main(["-q", "bench", "--config", str(path)]) == 2
    assert "name:" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "runs").exists()


class _FakeRay(types.ModuleType):
    """Enough of Ray's API for `_run_ray`: a task runs at once, in this process."""

    def __init__(self) -> None:
        super().__init__("ray")
        self.exceptions = types.SimpleNamespace(TaskCancelledError=KeyError, RayError=OSError)

    def is_initialized(self):
        return True

    def remote(self, fn):
        ray = self

        class Task:
            def options(self, **_):
                return self

            def remote(self, **kwargs):
                ray.results.append(fn(**kwargs))
                return len(ray.results) - 1

        self.results = []
        return Task()

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return self.results[ref]


@pytest.mark.parametrize(("threads", "workers", "cpus"), [(1, 1, 1.0), (2, 2, 1.0), (3, 1, 4.0)])
def test_a_cell_gets_the_same_threads_under_both_executors(
    tmp_path, monkeypatch, threads, workers, cpus
):
    """CPU float sums depend on the thread count, so the same cell with other threads gives
    slightly other AUROCs: with the grid's threads, both executors give a cell the same."""
    envs = {"local": [], "ray": []}
    executor = {"now": "local"}

    def fake_process(cmd, log_path, env=None, **_):
        envs[executor["now"]].append((env or {}).get("OMP_NUM_THREADS"))
        return {"started": True, "returncode": 0, "stopped": False, "error": "", "seconds": 0}

    monkeypatch.setattr(bench.executors, "run_process", fake_process)
    monkeypatch.setitem(sys.modules, "ray", _FakeRay())
    path = _grid(tmp_path, classes=[1, 7], threads=threads)
    run_grid(path, out_dir=tmp_path / "local", executor=GridExecutor(workers=workers), quiet=True)
    executor["now"] = "ray"
    on_ray = GridExecutor("ray", cell_cpus=cpus)
    run_grid(path, out_dir=tmp_path / "ray", executor=on_ray, quiet=True)
    assert envs["local"] == envs["ray"] == [str(threads)] * 2
