"""benchmarks/ablation_table.py and benchmarks/convergence_table.py on made-up grids: the
difference to the reference recipe, the wall-time budget, and the steps to reach a share of the
final AUROC."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
FIELDS = ["recipe", "normal_class", "class_name", "seed", "scorer", "k", "variant", "auroc"]


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # ablation_table imports seed_table as its neighbour
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.fixture(scope="module")
def ablation_table():
    return _load("ablation_table")


@pytest.fixture(scope="module")
def convergence_table():
    return _load("convergence_table")


def _bench_csv(path: Path, cells: dict) -> Path:
    """cells: (recipe, class) -> (knn AUROC, mahalanobis AUROC, wall time s)."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, [*FIELDS, "wall_time_s", "status"])
        w.writeheader()
        for (recipe, c), (knn, maha, wall) in cells.items():
            base = {"recipe": recipe, "normal_class": c, "class_name": f"class{c}", "seed": 0}
            w.writerow({**base, "scorer": "knn_cos", "k": 5, "variant": "plain", "auroc": knn,
                        "wall_time_s": wall, "status": "done"})  # fmt: skip
            w.writerow({**base, "scorer": "mahalanobis", "k": "", "variant": "plain",
                        "auroc": maha, "wall_time_s": wall, "status": "done"})  # fmt: skip
    return path


def test_ablation_rows_differences_and_budget(ablation_table, tmp_path):
    cells = {
        ("base", 7): (0.99, 0.98, 500.0),
        ("base", 6): (0.80, 0.82, 520.0),
        ("tau", 7): (0.98, 0.97, 510.0),
        ("tau", 6): (0.84, 0.83, 530.0),
        ("wide", 7): (0.995, 0.99, 1300.0),  # only one class finished, over budget
    }
    rows = ablation_table.read_all([_bench_csv(tmp_path / "bench.csv", cells)])
    table = ablation_table.ablation_table(rows, "base", "knn_cos:k=5", "plain", 600.0,
                                          ["mahalanobis"])  # fmt: skip
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert "| 80.0 | 99.0 | 89.5 | – | 510 (max 520) | 260 | yes | 90.0 |" in lines["base"]
    # tau: +1.5 on average over the two classes both finished (-1.0 and +4.0)
    assert "| 84.0 | 98.0 | 91.0 | +1.5 | 520 (max 530) | 265 | yes | 90.0 |" in lines["tau"]
    # wide: compared on class 7 only, and out of budget however good
    assert "| – | 99.5 | 99.5 (partial) | +0.5 | 1300 (max 1300) | 650 | **no** |" in lines["wide"]
    with pytest.raises(SystemExit, match="reference recipe 'nope'"):
        ablation_table.ablation_table(rows, "nope", "knn_cos:k=5", "plain", 600.0, [])
    # the raw-pixel floor as the last row, its distance to the reference on the same classes
    floor = {"scorer": "raw", "auroc": {"class6": 0.78, "class7": 0.96, "class0": 0.5}}
    table = ablation_table.ablation_table(rows, "base", "knn_cos:k=5", "plain", 600.0,
                                          ["mahalanobis"], floor=floor)  # fmt: skip
    assert table.splitlines()[-1] == "| pixels (raw) | 78.0 | 96.0 | 87.0 | -2.5 | – | – | – | – |"


def _run(root: Path, recipe: str, cell: str, aurocs: list[float], every: int = 100) -> None:
    run = root / recipe / cell
    run.mkdir(parents=True)
    curve = [{"epoch": i / 8, "step": every * (i + 1), "auroc": a} for i, a in enumerate(aurocs)]
    (run / "results.json").write_text(json.dumps({"learning_curve": curve}))


def test_convergence_steps_to_share_of_final(convergence_table, tmp_path):
    # fast: 95 % of the gain (0.5 + 0.95 * 0.4 = 0.88) and of final (0.855) at its second point
    _run(tmp_path, "firm", "c7-s1", [0.80, 0.89, 0.895, 0.90])
    # slow: 0.88 only at its last point; 95 % of final at the second
    _run(tmp_path, "ntxent", "c7-s1", [0.70, 0.86, 0.87, 0.90])
    # already above both targets at its first point
    _run(tmp_path, "rot", "c7-s1", [0.90, 0.90, 0.91, 0.90])
    (tmp_path / "rot" / "no-curve").mkdir()
    (tmp_path / "rot" / "no-curve" / "results.json").write_text(json.dumps({"results": []}))
    curves = convergence_table.read_curves(tmp_path)
    assert sorted(curves) == ["firm", "ntxent", "rot"] and list(curves["rot"]) == ["c7-s1"]
    table = convergence_table.convergence_table(curves, 0.95)
    assert "| firm | c7-s1 | 80.0 (100) | 90.0 | 200 | 200 | 400 |" in table
    assert "| ntxent | c7-s1 | 70.0 (100) | 90.0 | 200 | 400 | 400 |" in table
    assert "| rot | c7-s1 | 90.0 (100) | 90.0 | <= 100 | <= 100 | 400 |" in table
    assert "| ntxent | 1 | 70.0 | 90.0 | 200 | 400 |" in table  # the per-recipe summary


def test_convergence_without_curves_is_a_clear_error(convergence_table, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["convergence_table.py", str(tmp_path)])
    with pytest.raises(SystemExit, match="no learning curves"):
        convergence_table.main()
