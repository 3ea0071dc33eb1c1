"""Every method's numbers on the fixture against the record (tests/fixtures/golden_losses.json,
made by tests.golden_losses, which says what each number is and why it holds on any x86-64
CPU): the training pool exactly, the first steps' losses and gradients and the fixture AUROCs
within tolerances measured across CPU capability levels and thread counts."""

from __future__ import annotations

import json

import pytest

from tests.golden_losses import (
    AUROC_CASES,
    AUROC_TOLERANCE,
    CASES,
    GOLDEN,
    TOLERANCE,
    case_numbers,
    method_aurocs,
)

GOLD = json.loads(GOLDEN.read_text())
pytestmark = pytest.mark.numeric


@pytest.mark.parametrize("name", sorted(CASES))
def test_first_steps_match_the_record(name):
    got, gold = case_numbers(name), GOLD["cases"][name]
    assert got["pool"] == gold["pool"]  # uint8 images and ids: exact
    flat = [v for step in gold["schedule"] for v in step]  # Python's float maths: exact
    assert [v for step in got["schedule"] for v in step] == pytest.approx(flat, rel=1e-12)
    tol = TOLERANCE.get(name, TOLERANCE["*"])
    assert got["losses"][0] == pytest.approx(gold["losses"][0], rel=tol["loss1"])
    assert got["losses"][1:] == pytest.approx(gold["losses"][1:], rel=tol["losses"])
    assert got["grad_norms"].keys() == gold["grad_norms"].keys()
    for param, norm in gold["grad_norms"].items():
        assert got["grad_norms"][param] == pytest.approx(norm, rel=tol["grad_norms"]), param


@pytest.mark.parametrize("case", sorted(AUROC_CASES))
def test_fixture_aurocs_match_the_record(tmp_path, case):
    got, gold = method_aurocs(case, tmp_path / "run"), GOLD["aurocs"][case]
    assert got.keys() == gold.keys()
    for row, auroc in gold.items():
        assert got[row] == pytest.approx(auroc, abs=AUROC_TOLERANCE), row
