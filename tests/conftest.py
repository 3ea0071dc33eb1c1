"""Shared test helpers: the committed Fashion-MNIST fixture and a tiny, fast recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURE_FMNIST = Path(__file__).parent / "fixtures" / "fashion-mnist"

# A recipe small enough for a 2-core CPU in seconds: the fixture, a narrow ResNet-10, 16 px.
TINY = [
    f"data.root={FIXTURE_FMNIST}",
    "data.size=16",
    "data.max_test=200",
    "model.backbone=resnet_small",
    "model.width=0.25",
    "model.head_depth=2",
    "model.head_hidden=64",
    "model.head_out=32",
    "augment.blur_p=0.0",
    "train.epochs=2",
    "train.batch_size=16",
    "train.steps_per_epoch=4",
    "train.device=cpu",
    "eval.scorers=[knn_cos:k=5, centre]",
    "eval.batch_size=256",
]


# Deep SVDD on top of TINY: the bias-free LeNet (32 px), normals only, no augmentation.
DSVDD_TINY = [
    "method.name=dsvdd",
    "model.backbone=lenet",
    "model.width=1.0",
    "data.size=32",
    "outliers.kinds=[]",
    "augment.enabled=false",
]


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


@pytest.fixture
def isolated_data(tmp_path, monkeypatch):
    """No test sees the developer's $FIRMAD_DATA, cache, ./data or the reader cache."""
    from firmad.data import sources

    monkeypatch.delenv("FIRMAD_DATA", raising=False)
    monkeypatch.setattr(sources, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    sources._read_builtin.cache_clear()


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is as fast, and far faster on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
