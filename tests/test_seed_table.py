"""benchmarks/seed_table.py on a made-up bench.csv: means and standard deviations over seeds, the
paired tests over (class, seed) and the pixel floor's margin."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
from scipy import stats

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "seed_table.py"
FIELDS = ["recipe", "normal_class", "class_name", "seed", "scorer", "k", "variant", "auroc"]


@pytest.fixture(scope="module")
def seed_table():
    spec = importlib.util.spec_from_file_location("seed_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _csv(path: Path, firm: dict, base: dict) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, [*FIELDS, "status"])
        w.writeheader()
        for recipe, values in (("firm", firm), ("base", base)):
            for (c, s), auroc in values.items():
                values_ = [recipe, c, f"class{c}", s, "knn_cos", 5, "plain", auroc]
                row = dict(zip(FIELDS, values_, strict=True))
                w.writerow({**row, "status": "done"})
            # a failed cell and another variant must not enter the headline numbers
            w.writerow({**row, "variant": "angled", "auroc": 0.1, "status": "done"})
            w.writerow({**row, "seed": 9, "auroc": "", "status": "failed"})
    return path


def _firm_csv(path: Path, cells: list[tuple[int, str, float]]) -> Path:
    """A bench.csv of FIRM's kNN k=5 rows on seed 0: (class, variant, AUROC) each."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, [*FIELDS, "status"])
        w.writeheader()
        for c, variant, auroc in cells:
            values = ["firm", c, f"class{c}", 0, "knn_cos", 5, variant, auroc]
            w.writerow({**dict(zip(FIELDS, values, strict=True)), "status": "done"})
    return path


def test_seed_table_and_paired_tests(seed_table, tmp_path):
    firm = {(c, s): 0.90 + 0.01 * c + 0.002 * s for c in range(3) for s in range(3)}
    base = {(c, s): v - 0.01 - 0.001 * ((c + s) % 3) for (c, s), v in firm.items()}
    rows = seed_table.read(_csv(tmp_path / "bench.csv", firm, base))
    floor = {"auroc": {"class0": 0.85}, "mean": 0.8}
    table = seed_table.seed_table(rows, "knn_cos:k=5", "plain", floor)
    assert "| 0 class0 | 90.2 ± 0.2 (n=3) |" in table  # 0.900, 0.902, 0.904
    assert "| +5.2 |" in table  # class 0 over the pixels
    # overall: the class means per seed are 0.910, 0.912, 0.914
    assert "**91.2 ± 0.2** (seeds: 3)" in table
    # the floor has one of the three classes: no floor mean rather than the whole dataset's
    assert table.splitlines()[-1].endswith("(seeds: 3) | – | | |")
    floor = {"auroc": {"class0": 0.85, "class1": 0.8, "class2": 0.6}, "mean": 0.5}
    table = seed_table.seed_table(rows, "knn_cos:k=5", "plain", floor)
    assert "(seeds: 3) | 75.0 |" in table.splitlines()[-1]  # the 3 classes' mean, not 0.5
    tests = seed_table.paired_tests(rows, "knn_cos:k=5", "plain", "firm")
    diff = [firm[k] - base[k] for k in sorted(firm)]
    expected_p = stats.wilcoxon(diff).pvalue
    assert "| base | 9 | +1.10 | 9/9 |" in tests  # 1 + 0.1 on average
    assert f"{expected_p:.3g}" in tests and expected_p < 0.05
    variants = seed_table.variant_table(rows)
    assert "| knn_cos:k=5 | angled | 10.0 (n=1) | 10.0 (n=1) |" in variants
    # plain on the same single cell (class 2, seed 2) that has both variants, not on all nine
    assert "| knn_cos:k=5 | plain | 92.4 (n=1) | 91.3 (n=1) |" in variants


def test_missing_reference_is_a_clear_error(seed_table, tmp_path):
    rows = seed_table.read(_csv(tmp_path / "bench.csv", {(0, 0): 0.9}, {(0, 0): 0.8}))
    with pytest.raises(SystemExit, match="no rows of the reference recipe 'nope'"):
        seed_table.paired_tests(rows, "knn_cos:k=5", "plain", "nope")
    assert json.dumps(seed_table.variant_table(rows))  # plain text, no NaN objects


def test_several_csvs_read_as_one_grid_first_duplicate_kept(seed_table, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _csv(tmp_path / "a" / "bench.csv", {(0, 0): 0.9}, {(0, 0): 0.8})
    # the same (recipe, class, seed) cell again with another value, and a new seed
    second = _csv(tmp_path / "b" / "bench.csv", {(0, 0): 0.5, (0, 1): 0.7}, {(0, 1): 0.6})
    rows = seed_table.read_all([first, second])
    firm = {
        r["seed"]: r["auroc"] for r in rows if r["recipe"] == "firm" and r["variant"] == "plain"
    }
    assert firm == {0: 0.9, 1: 0.7}
    only = seed_table.read_all([first, second], recipes=["base"])
    assert {r["recipe"] for r in only} == {"base"}
    assert {r["normal_class"] for r in seed_table.read_all([first], classes=[1])} == set()


def test_a_suffix_names_the_recipes_of_a_grid_that_changed_them(seed_table, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    four = _csv(tmp_path / "a" / "bench.csv", {(0, 0): 0.9}, {(0, 0): 0.8})
    eight = _csv(tmp_path / "b" / "bench.csv", {(0, 0): 0.95}, {(0, 0): 0.85})
    rows = seed_table.read_all([four, Path(f"{eight}#-8ep")])
    firm = {r["recipe"]: r["auroc"] for r in rows if r["variant"] == "plain" and r["seed"] == 0}
    assert firm == {"firm": 0.9, "base": 0.8, "firm-8ep": 0.95, "base-8ep": 0.85}


def test_variant_tests_pair_each_variant_with_plain_on_the_same_cells(seed_table, tmp_path):
    cells = [(c, "plain", 0.90 + 0.01 * c) for c in range(4)]
    cells += [(c, "ensemble", 0.90 + 0.01 * c - 0.02 - 0.001 * c) for c in range(4)]
    cells.append((5, "ensemble", 0.1))  # an ensemble cell without its plain cell is not paired
    table = seed_table.variant_tests(seed_table.read(_firm_csv(tmp_path / "bench.csv", cells)))
    diff = [-0.02 - 0.001 * c for c in range(4)]
    p = stats.wilcoxon(diff).pvalue
    assert f"| firm, knn_cos:k=5, ensemble | 4 | -2.15 | 0/4 | {p:.3g} |" in table
    assert "plain |" not in table.splitlines()[-1]  # plain is not tested against itself
    assert len(table.splitlines()) == 3


def test_a_cell_is_read_whole_from_the_first_file_that_has_it(seed_table, tmp_path):
    """A cell trained again elsewhere is another draw: its later ensemble row must not be paired
    with the first file's plain row."""
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = _csv(tmp_path / "old" / "bench.csv", {(0, 0): 0.9}, {(0, 0): 0.8})  # plain + angled
    new = _firm_csv(tmp_path / "new" / "bench.csv", [(0, "plain", 0.7), (0, "ensemble", 0.6)])
    old_first = seed_table.read_all([old, new], recipes=["firm"])
    assert {r["variant"]: r["auroc"] for r in old_first} == {"plain": 0.9, "angled": 0.1}
    new_first = seed_table.read_all([new, old], recipes=["firm"])
    assert {r["variant"]: r["auroc"] for r in new_first} == {"plain": 0.7, "ensemble": 0.6}
