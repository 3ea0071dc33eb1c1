"""The robustness reshape keeps the numbers: attack images, scores and sweep results equal the
values recorded before it (tests/fixtures/attacks_before_spec.json, made by
tests.golden_attacks)."""

from __future__ import annotations

import json

import pytest

from tests.golden_attacks import GOLDEN, results


@pytest.fixture(scope="module")
def now():
    return results()


GOLD = json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("name", sorted(GOLD))
def test_attack_results_unchanged(now, name):
    assert now[name] == GOLD[name]
