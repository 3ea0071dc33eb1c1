"""Detector folders written before methods owned their settings hold the full flat method
section (tau 0.2, loss_mode pairwise, symmetric false, whatever the method) under the settings
checksum: they still load and score the same; another value of a key the method never took is
refused with a message."""

from __future__ import annotations

import json

import numpy as np
import pytest

from firmad.data import one_vs_rest
from firmad.detector import OneClassDetector
from firmad.errors import CheckpointError
from firmad.persistence import meta_bytes
from tests.conftest import DSVDD_TINY, FIXTURE_FMNIST, TINY

TRAIN = [o for o in TINY if not o.startswith(("data.root", "data.max_test", "eval."))]
FLAT = {"tau": 0.2, "loss_mode": "pairwise", "symmetric": False}


def _rewrite_method(folder, section: dict) -> None:
    """detector.json with another method section, resealed as `save` seals it."""
    path = folder / "detector.json"
    meta = json.loads(path.read_text())
    meta["config"]["method"] = section
    path.write_bytes(meta_bytes(meta))


def test_a_detector_saved_with_the_flat_method_section_loads(tmp_path):
    split = one_vs_rest("fashion-mnist", 0, root=str(FIXTURE_FMNIST), max_test=40)
    det = OneClassDetector(overrides=[*TRAIN, *DSVDD_TINY, "train.epochs=1"], scorer="own")
    det.fit(split.train_images[:48]).save(tmp_path / "det")
    scores = det.decision_function(split.test_images[:8])
    _rewrite_method(tmp_path / "det", {"name": "dsvdd", **FLAT})
    again = OneClassDetector.load(tmp_path / "det")
    assert again.config_.to_dict()["method"] == {"name": "dsvdd"}
    np.testing.assert_array_equal(again.decision_function(split.test_images[:8]), scores)
    _rewrite_method(tmp_path / "det", {"name": "dsvdd", **FLAT, "tau": 0.5})
    with pytest.raises(CheckpointError, match="method dsvdd does not take tau"):
        OneClassDetector.load(tmp_path / "det")
