"""Attack results against the record (tests/fixtures/golden_attacks.json, made by
tests.golden_attacks, which says what each entry is and why it holds on any x86-64 CPU):
digests and sweeps exactly, scores and continuous images within RTOL. And on one machine, in
one process, a seeded attack repeats bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from tests.golden_attacks import ATOL, GOLDEN, RTOL, _data, results

GOLD = json.loads(GOLDEN.read_text())
CLOSE = ("scores", "pixels")  # float32 numbers; everything else is exact
pytestmark = pytest.mark.numeric


@pytest.fixture(scope="module")
def now():
    return results()


@pytest.mark.parametrize("name", sorted(GOLD))
def test_attack_results_match_the_record(now, name):
    got, gold = now[name], GOLD[name]
    assert got.keys() == gold.keys()
    for key, value in gold.items():
        if key in CLOSE:
            assert got[key] == pytest.approx(value, rel=RTOL, abs=ATOL), key
        else:
            assert got[key] == value, key


def test_a_seeded_attack_repeats_exactly():
    """Same machine, same process: the same images, to the bit (resuming a sweep relies on it)."""
    from firmad.robustness import pgd
    from firmad.robustness.attacks import square_attack

    det, x, y = _data()
    runs = [
        (
            pgd(det, x, y, eps=0.5, norm="l2", steps=3, seed=1),
            square_attack(det, x, y, eps=0.05, queries=10, seed=2).images,
        )
        for _ in range(2)
    ]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
