"""Tests of the one-class protocols, on the committed Fashion-MNIST fixture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from firmad.data import (
    dataset_vs_dataset,
    describe,
    match_images,
    multi_class_normal,
    one_vs_rest,
)
from firmad.data.protocol import stratified_indices
from firmad.errors import DataError
from tests.conftest import FIXTURE_FMNIST

FIXTURE = FIXTURE_FMNIST
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


pytestmark = pytest.mark.usefixtures("isolated_data")


def test_one_vs_rest_sizes_and_labels():
    split = one_vs_rest("fashion-mnist", 8, root=FIXTURE)
    assert split.train_images.shape == (100, 1, 28, 28)
    assert split.test_images.shape == (500, 1, 28, 28)
    assert split.test_labels.dtype == torch.int64 and int(split.test_labels.sum()) == 450
    assert torch.equal(split.test_labels, (split.test_classes != 8).long())
    assert split.normal_classes == [8] and split.classes[8] == "Bag"
    assert split.subsample == {
        "max_train": None,
        "max_test": None,
        "seed": 0,
        "n_train": 100,
        "n_test": 500,
    }


def test_class_names_are_case_insensitive():
    by_name = one_vs_rest("fashion-mnist", "ankle BOOT", root=FIXTURE)
    by_id = one_vs_rest("fashion-mnist", 9, root=FIXTURE)
    assert by_name.normal_classes == [9]
    assert torch.equal(by_name.train_images, by_id.train_images)


@pytest.mark.parametrize("bad", ["sock", 10, -1])
def test_unknown_class_lists_the_classes(bad):
    with pytest.raises(DataError, match=r"classes: 0=T-shirt/top, 1=Trouser"):
        one_vs_rest("fashion-mnist", bad, root=FIXTURE)


def test_multi_class_normal():
    split = multi_class_normal("fashion-mnist", [0, "trouser"], root=FIXTURE)
    assert split.normal_classes == [0, 1]
    assert len(split.train_images) == 200 and int(split.test_labels.sum()) == 400


def test_subsampling_sizes_and_stratification():
    split = one_vs_rest("fashion-mnist", 3, root=FIXTURE, max_train=30, max_test=100, seed=7)
    assert split.train_images.shape[0] == 30 and split.test_images.shape[0] == 100
    assert torch.bincount(split.test_classes).tolist() == [10] * 10
    assert split.subsample["n_train"] == 30 and split.subsample["max_test"] == 100


def test_subsampling_is_deterministic():
    a = one_vs_rest("fashion-mnist", 0, root=FIXTURE, max_train=20, max_test=55, seed=1)
    b = one_vs_rest("fashion-mnist", 0, root=FIXTURE, max_train=20, max_test=55, seed=1)
    c = one_vs_rest("fashion-mnist", 0, root=FIXTURE, max_train=20, max_test=55, seed=2)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_images, b.test_images)
    assert not torch.equal(a.train_images, c.train_images)
    assert not torch.equal(a.test_images, c.test_images)


def test_stratified_largest_remainder():
    groups = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    idx = stratified_indices(groups, 11, torch.Generator().manual_seed(0))
    assert len(idx) == 11 and torch.all(idx[1:] > idx[:-1])
    assert torch.bincount(groups[idx]).tolist() == [6, 3, 2]  # 5.5, 3.3, 2.2 -> 6, 3, 2


def test_dataset_vs_dataset_converts_outliers(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "o.npz", images=rgb, labels=np.arange(7) % 2)
    split = dataset_vs_dataset("fashion-mnist", f"npz:{tmp_path / 'o.npz'}", root=FIXTURE)
    assert split.train_images.shape == (1000, 1, 28, 28)
    assert split.test_images.shape == (507, 1, 28, 28)
    assert int(split.test_labels.sum()) == 7 and split.test_labels[-7:].tolist() == [1] * 7
    assert split.test_classes[-7:].tolist() == [10, 11, 10, 11, 10, 11, 10]
    assert split.classes[10].endswith(":0") and split.normal_classes == list(range(10))


def test_match_images():
    grey = torch.full((2, 1, 10, 10), 77, dtype=torch.uint8)
    out = match_images(grey, (4, 6), 3)
    assert out.shape == (2, 3, 4, 6) and out.dtype == torch.uint8 and torch.all(out == 77)
    rgb = torch.stack([torch.full((5, 5), v, dtype=torch.uint8) for v in (10, 20, 60)])[None]
    assert torch.all(match_images(rgb, (5, 5), 1) == 30)


def test_describe_fixture():
    rows = describe("fashion-mnist", root=FIXTURE)
    assert len(rows) == 10
    assert rows[8] == {
        "class_id": 8,
        "name": "Bag",
        "n_train_normal": 100,
        "n_test": 500,
        "n_test_normal": 50,
        "n_test_anomalies": 450,
    }


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_full_debian_one_vs_rest():
    split = one_vs_rest("fashion-mnist", "sneaker")
    assert split.train_images.shape == (6000, 1, 28, 28)
    assert len(split.test_images) == 10000 and int(split.test_labels.sum()) == 9000


def test_which_images_a_subsample_keeps_is_stored_exactly():
    """Integer draws from a seeded generator are the same on every CPU, so they are stored:
    which 20 of the class's 100 fixture images `max_train` keeps, not only how many."""
    from firmad.data import load_dataset
    from firmad.data.protocol import subsample_indices

    assert subsample_indices(1000, 7, torch.Generator().manual_seed(3)).tolist() == [
        114, 140, 232, 871, 885, 894, 986,
    ]  # fmt: skip
    kept = [3, 11, 15, 16, 17, 22, 23, 32, 35, 36, 45, 48, 58, 62, 63, 72, 79, 80, 90, 96]
    split = one_vs_rest("fashion-mnist", 0, root=FIXTURE, max_train=20, max_test=55, seed=1)
    train = load_dataset("fashion-mnist", "train", root=FIXTURE)
    class_images = train.images[train.labels == 0]
    assert torch.equal(split.train_images, class_images[kept])
