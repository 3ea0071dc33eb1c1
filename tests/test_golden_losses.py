"""Reshape III keeps the numbers: every method's step losses and fixture AUROCs as recorded
before it (tests/fixtures/fixture_losses_before_reshape3.json, made by tests.golden_losses)."""

from __future__ import annotations

import json

import pytest

from firmad.factory import build_trainer
from tests.golden_losses import AUROC_METHODS, CASES, GOLDEN, case_losses, method_aurocs

GOLD = json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_step_losses_unchanged(name):
    assert case_losses(name, build_trainer) == pytest.approx(GOLD["losses"][name], abs=1e-5)


@pytest.mark.parametrize("method", AUROC_METHODS)
def test_method_aurocs_unchanged(tmp_path, method):
    got = method_aurocs(method, tmp_path / "run")
    assert got == pytest.approx(GOLD["aurocs"][method], abs=1e-9)
