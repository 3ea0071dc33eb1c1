"""Tests of the dataset readers and locating, on small files generated in the real formats."""

from __future__ import annotations

import gzip
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from firmad.data import (
    DATASETS,
    load_dataset,
    locate,
    prepare,
    read_idx,
    searched_places,
    sources,
    write_idx,
)
from firmad.errors import DataError, DataNotFoundError, InputError
from tests.conftest import FIXTURE_FMNIST

FIXTURE = FIXTURE_FMNIST
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


pytestmark = pytest.mark.usefixtures("isolated_data")


# ---------------------------------------------------------------------------------------------
# Writers of the official formats


def make_idx(folder: Path, n_train=12, n_test=6, gz=True, size=28, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return folder


def dump(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def batch(n: int, labels: dict, rng) -> dict:
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return {b"batch_label": b"testing batch", b"data": data, b"filenames": [b"x.png"] * n, **labels}


def make_cifar10(base: Path, n=4, tar=False) -> Path:
    rng = np.random.default_rng(1)
    folder = base / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    dump(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": n})
    for i in range(1, 6):
        dump(
            folder / f"data_batch_{i}", batch(n, {b"labels": [(i + j) % 10 for j in range(n)]}, rng)
        )
    dump(folder / "test_batch", batch(n, {b"labels": list(range(n))}, rng))
    return pack(base, folder, "cifar-10-python.tar.gz") if tar else folder


def make_cifar100(base: Path, n=30, tar=False) -> Path:
    rng = np.random.default_rng(2)
    folder = base / "cifar-100-python"
    folder.mkdir(parents=True)
    coarse_of_fine = rng.permutation(100) % 20  # an arbitrary map, only known from the files
    meta = {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"super{i}".encode() for i in range(20)],
    }
    dump(folder / "meta", meta)
    for split in ("train", "test"):
        fine = rng.integers(0, 100, n)
        labels = {b"fine_labels": fine.tolist(), b"coarse_labels": coarse_of_fine[fine].tolist()}
        dump(folder / split, batch(n, labels, rng))
    return pack(base, folder, "cifar-100-python.tar.gz") if tar else folder


def pack(base: Path, folder: Path, archive: str) -> Path:
    with tarfile.open(base / archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    return base / archive


def save_image(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if mode == "P":
        img = img.convert("P")
    img.save(path)


# ---------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_raw_and_gz(tmp_path, gz):
    folder = make_idx(tmp_path / "mnist", gz=gz)
    train = load_dataset("mnist", "train", root=folder)
    test = load_dataset("mnist", "test", root=folder)
    assert train.images.shape == (12, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (6, 1, 28, 28)
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == [i % 10 for i in range(12)]
    assert train.classes == [str(d) for d in range(10)]
    raw = read_idx(folder / f"train-images-idx3-ubyte{'.gz' if gz else ''}", 2051)
    assert torch.equal(train.images[:, 0], torch.from_numpy(raw.copy()))


def test_idx_write_read_roundtrip_is_deterministic(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    first = (tmp_path / "a.gz").read_bytes()
    write_idx(tmp_path / "a.gz", arr)
    assert (tmp_path / "a.gz").read_bytes() == first
    assert np.array_equal(read_idx(tmp_path / "a.gz", 2051), arr)


def test_idx_wrong_magic(tmp_path):
    folder = make_idx(tmp_path / "m")
    labels = folder / "train-labels-idx1-ubyte.gz"
    (folder / "train-images-idx3-ubyte.gz").write_bytes(labels.read_bytes())
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*magic number 2049"):
        load_dataset("mnist", root=folder)


def test_idx_truncated_gzip(tmp_path):
    folder = make_idx(tmp_path / "m")
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*truncated"):
        load_dataset("mnist", root=folder)


def test_idx_truncated_raw(tmp_path):
    folder = make_idx(tmp_path / "m", gz=False)
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.*truncated"):
        load_dataset("mnist", "test", root=folder)


def test_idx_mismatched_counts(tmp_path):
    folder = make_idx(tmp_path / "m")
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match=r"12 images.*5 labels"):
        load_dataset("mnist", root=folder)


def test_idx_missing_labels_file(tmp_path):
    folder = make_idx(tmp_path / "m")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", "test", root=folder)


def test_idx_labels_out_of_range(tmp_path):
    folder = make_idx(tmp_path / "f")
    labels = np.arange(12, dtype=np.uint8) % 10
    labels[5] = 200  # Fashion-MNIST has 10 classes
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: label 200 is out of range"):
        load_dataset("fashion-mnist", root=folder)


def test_idx_permission_denied_is_not_called_corrupt(tmp_path, monkeypatch):
    folder = make_idx(tmp_path / "m")
    denied = folder / "train-labels-idx1-ubyte.gz"
    real_open = gzip.open

    def gzip_open(path, *args, **kwargs):
        if Path(path) == denied:  # as for a file of mode 0600 owned by someone else
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(gzip, "open", gzip_open)
    with pytest.raises(DataError) as err:
        load_dataset("mnist", root=folder)
    msg = str(err.value)
    assert f"cannot read {denied}: permission denied" in msg
    assert "corrupt" not in msg and "Delete" not in msg


def test_fixture_fashion_mnist():
    train = load_dataset("fashion-mnist", "train", root=FIXTURE)
    test = load_dataset("fashion-mnist", "test", root=FIXTURE)
    assert train.images.shape == (1000, 1, 28, 28)
    assert test.images.shape == (500, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [100] * 10
    assert torch.bincount(test.labels).tolist() == [50] * 10
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert train.images.float().std() > 50  # real pictures, not blank


def test_cache_returns_independent_tensors():
    first = load_dataset("fashion-mnist", root=FIXTURE)
    first.images.zero_()
    again = load_dataset("fashion-mnist", root=FIXTURE)
    assert again.images.sum() > 0


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_full_debian_fashion_mnist():
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28)
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10


# ---------------------------------------------------------------------------------------------
# CIFAR


@pytest.mark.parametrize("tar", [False, True])
def test_cifar10(tmp_path, tar):
    source = make_cifar10(tmp_path, tar=tar)
    train = load_dataset("cifar10", "train", root=tmp_path)
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert Path(train.source) == source
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.classes[0] == "airplane" and len(train.classes) == 10
    assert test.labels.tolist() == [0, 1, 2, 3]
    assert train.labels[:4].tolist() == [1, 2, 3, 4]  # data_batch_1 comes first


def test_cifar10_pixel_layout(tmp_path):
    folder = make_cifar10(tmp_path)
    with open(folder / "test_batch", "rb") as f:
        rows = pickle.load(f, encoding="bytes")[b"data"]
    test = load_dataset("cifar10", "test", root=folder)
    # Row layout is 1024 red, 1024 green, 1024 blue values, each 32 x 32 row-major.
    assert test.images[2, 1, 3, 5] == rows[2, 1024 + 3 * 32 + 5]


@pytest.mark.parametrize("tar", [False, True])
def test_cifar100_fine_and_coarse(tmp_path, tar):
    make_cifar100(tmp_path / "c", tar=tar)
    folder = make_cifar100(tmp_path / "ref")  # same seed: the same files, kept as a folder
    with open(folder / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    fine = load_dataset("cifar100", "train", root=tmp_path / "c")
    coarse = load_dataset("cifar100-coarse", "train", root=tmp_path / "c")
    assert fine.labels.tolist() == raw[b"fine_labels"]
    assert coarse.labels.tolist() == raw[b"coarse_labels"]
    assert len(fine.classes) == 100 and fine.classes[7] == "fine7"
    assert coarse.classes == [f"super{i}" for i in range(20)]
    assert torch.equal(fine.images, coarse.images)
    assert load_dataset("cifar100-coarse", "test", root=tmp_path / "c").images.shape[0] == 30


def test_cifar_truncated_tar(tmp_path):
    archive = make_cifar10(tmp_path, tar=True)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz.*truncated"):
        load_dataset("cifar10", "train", root=tmp_path)


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Path.cwd() / 'pwned'}",))


def test_malicious_pickle_is_refused(tmp_path):
    folder = make_cifar10(tmp_path)
    dump(folder / "data_batch_1", {b"data": Evil(), b"labels": [0]})
    with pytest.raises(DataError, match=r"data_batch_1.*not allowed"):
        load_dataset("cifar10", "train", root=folder)
    assert not (tmp_path / "pwned").exists()


def test_pickle_of_other_objects_is_refused(tmp_path):
    folder = make_cifar10(tmp_path)
    dump(folder / "test_batch", {b"data": {1, 2}, b"labels": [0]})  # a set: builtins.set
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", "test", root=folder)


def test_cifar_mismatched_counts(tmp_path):
    folder = make_cifar10(tmp_path)
    rng = np.random.default_rng(0)
    dump(folder / "test_batch", batch(4, {b"labels": [0, 1, 2]}, rng))
    with pytest.raises(DataError, match=r"test_batch.*4 images but 3 labels"):
        load_dataset("cifar10", "test", root=folder)


# ---------------------------------------------------------------------------------------------
# Image folders


def make_odd_folder(root: Path) -> None:
    rng = np.random.default_rng(3)
    save_image(root / "normal" / "grey.png", rng.integers(0, 256, (40, 50), dtype=np.uint8))
    save_image(root / "normal" / "rgba.png", rng.integers(0, 256, (20, 20, 4), dtype=np.uint8))
    save_image(root / "normal" / "deep" / "x16.png", np.full((30, 30), 257 * 100, np.uint16))
    save_image(root / "normal" / "pal.bmp", rng.integers(0, 256, (16, 24, 3), dtype=np.uint8), "P")
    save_image(root / "anomalous" / "a.jpg", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (root / "normal" / "notes.txt").write_text("not an image")


def test_folder_odd_modes(tmp_path):
    make_odd_folder(tmp_path / "imgs")
    assert Image.open(tmp_path / "imgs/normal/deep/x16.png").mode.startswith("I")
    data = load_dataset(f"folder:{tmp_path / 'imgs'}", "train")
    assert data.images.shape == (5, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.classes == ["normal", "anomalous"]
    assert data.labels.tolist() == [0, 0, 0, 0, 1]  # sorted: deep/x16, grey, pal, rgba
    assert torch.all(data.images[0] == 100)  # 16-bit 25700 scaled to 8-bit 100
    grey = load_dataset(f"folder:{tmp_path / 'imgs'}", "test", size=20, channels=1)
    assert grey.images.shape == (5, 1, 20, 20)


def test_folder_class_subfolders_and_splits(tmp_path):
    rng = np.random.default_rng(4)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("zebra", "cat"):
            for i in range(n):
                img = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
                save_image(tmp_path / "d" / split / cls / f"{i}.png", img)
    train = load_dataset(f"folder:{tmp_path / 'd'}", "train", size=8)
    test = load_dataset(f"folder:{tmp_path / 'd'}", "test", size=8)
    assert train.classes == ["cat", "zebra"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and len(test) == 4


def test_folder_undecodable_image(tmp_path):
    make_odd_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "normal" / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(DataError, match=r"broken\.png.*cannot decode"):
        load_dataset(f"folder:{tmp_path / 'imgs'}")


def test_folder_empty_normal_class(tmp_path):
    (tmp_path / "imgs" / "normal").mkdir(parents=True)
    (tmp_path / "imgs" / "normal" / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match=r"normal: no images"):
        load_dataset(f"folder:{tmp_path / 'imgs'}")


def test_folder_unreadable_subfolder_is_not_skipped(tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    for rel in ("cat/a.png", "cat/more/b.png", "dog/c.png"):
        save_image(tmp_path / "d" / rel, rng.integers(0, 256, (10, 10, 3), dtype=np.uint8))
    locked = tmp_path / "d" / "cat" / "more"
    real_scandir = os.scandir

    def scandir(path="."):  # tests run as root, who may read any folder: simulate mode 0700
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError) as err:
        load_dataset(f"folder:{tmp_path / 'd'}", size=8)
    assert f"cannot read the folder {locked}" in str(err.value)


def test_folder_missing(tmp_path):
    with pytest.raises(DataNotFoundError, match="image folder not found"):
        load_dataset(f"folder:{tmp_path / 'nope'}")


# ---------------------------------------------------------------------------------------------
# npz


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_npz_layouts(tmp_path, layout):
    nchw = np.random.default_rng(5).integers(0, 256, (6, 3, 8, 9), dtype=np.uint8)
    images = nchw.transpose(0, 2, 3, 1) if layout == "nhwc" else nchw
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 1, 2, 0, 1, 2]))
    data = load_dataset(f"npz:{tmp_path / 'd.npz'}", "test")
    assert torch.equal(data.images, torch.from_numpy(nchw))
    assert data.classes == ["0", "1", "2"] and data.labels.dtype == torch.int64


def test_npz_splits_and_classes(tmp_path):
    np.savez(
        tmp_path / "d.npz",
        train_images=np.zeros((4, 8, 8, 1), np.uint8),
        train_labels=np.zeros(4, np.int64),
        test_images=np.ones((3, 8, 8, 1), np.uint8),
        test_labels=np.array([0, 1, 1]),
        classes=np.array(["good", "bad"]),
    )
    train = load_dataset(f"npz:{tmp_path / 'd.npz'}", "train")
    test = load_dataset(f"npz:{tmp_path / 'd.npz'}", "test")
    assert train.images.shape == (4, 1, 8, 8) and test.images.shape == (3, 1, 8, 8)
    assert test.classes == ["good", "bad"] and test.labels.tolist() == [0, 1, 1]


def test_npz_bad_inputs(tmp_path):
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(DataError, match="uint8"):
        load_dataset(f"npz:{tmp_path / 'f.npz'}")
    np.savez(tmp_path / "m.npz", images=np.zeros((2, 3, 4, 4), np.uint8), labels=np.zeros(3))
    with pytest.raises(DataError, match="2 images but 3 labels"):
        load_dataset(f"npz:{tmp_path / 'm.npz'}")
    with pytest.raises(DataNotFoundError, match="npz file not found"):
        load_dataset(f"npz:{tmp_path / 'none.npz'}")


@pytest.mark.parametrize(
    "labels",
    [np.array([0.0, 1.7]), np.array([0.0, np.nan]), np.array([0.0, 1.0])],
    ids=["fraction", "nan", "whole-floats"],
)
def test_npz_float_labels_are_refused(tmp_path, labels):
    images = np.zeros((2, 4, 4), np.uint8)
    np.savez(tmp_path / "f.npz", images=images, labels=labels)
    with pytest.raises(DataError, match=r"labels are float64; store integer class ids"):
        load_dataset(f"npz:{tmp_path / 'f.npz'}")


# ---------------------------------------------------------------------------------------------
# Locating, preparing, bad names


def test_not_found_names_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("FIRMAD_DATA", str(tmp_path / "env"))
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("cifar10")
    message = str(info.value)
    for place in searched_places("cifar10"):
        assert str(place) in message
    assert "firmad data prepare cifar10 --download" in message
    assert str(tmp_path / "env" / "cifar10") in message


def test_not_found_fashion_mentions_apt(monkeypatch):
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {})
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", root="missing")


def test_locate_order(tmp_path, monkeypatch):
    make_idx(tmp_path / "env" / "mnist")
    make_idx(tmp_path / "data" / "mnist")  # ./data/mnist (the test runs in tmp_path)
    assert locate("mnist") == Path("data/mnist")
    monkeypatch.setenv("FIRMAD_DATA", str(tmp_path / "env"))
    assert locate("mnist") == tmp_path / "env" / "mnist"
    assert locate("mnist", root=tmp_path / "elsewhere") is None
    assert searched_places("mnist", root="x") == [Path("x"), Path("x/mnist")]


def test_locate_torchvision_layout(tmp_path):
    make_idx(tmp_path / "cache" / "fashion-mnist" / "FashionMNIST" / "raw", gz=False)
    found = locate("fashion-mnist")
    if found == sources.SYSTEM_DIRS["fashion-mnist"]:  # the system copy comes first
        assert sources.SYSTEM_DIRS["fashion-mnist"].is_dir()
    else:
        assert found == tmp_path / "cache" / "fashion-mnist" / "FashionMNIST" / "raw"


def test_prepare_downloads_into_cache(tmp_path, monkeypatch):
    calls = []

    def fake_download(name, dest):
        calls.append((name, dest))
        make_cifar100(dest, tar=True)

    monkeypatch.setattr(sources, "_download", fake_download)
    with pytest.raises(DataNotFoundError):
        load_dataset("cifar100-coarse")
    path = prepare("cifar100-coarse")
    assert calls == [("cifar100-coarse", tmp_path / "cache" / "cifar100")]
    assert path == tmp_path / "cache" / "cifar100" / "cifar-100-python.tar.gz"
    assert len(load_dataset("cifar100-coarse").classes) == 20
    assert prepare("cifar100") == path and len(calls) == 1  # found, not downloaded again


def test_download_failure_is_a_clear_error(monkeypatch):
    def offline(name, dest):
        raise OSError("network unreachable")

    monkeypatch.setattr(sources, "_download", offline)
    with pytest.raises(DataNotFoundError, match="downloading 'mnist'.*network unreachable"):
        load_dataset("mnist", download=True)


def test_bad_name_and_split():
    with pytest.raises(DataError, match="unknown dataset 'cifar11'.*folder:PATH"):
        load_dataset("cifar11")
    with pytest.raises(InputError, match="split"):
        load_dataset("mnist", split="valid")
    assert "fashion-mnist" in DATASETS and "cifar100-coarse" in DATASETS


def test_numpy1_module_name_is_accepted(tmp_path):
    # The official files were written by numpy 1 (numpy.core.multiarray._reconstruct).
    folder = make_cifar10(tmp_path)
    path = folder / "test_batch"
    path.write_bytes(path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert b"numpy.core.multiarray" in path.read_bytes()
    assert load_dataset("cifar10", "test", root=folder).images.shape == (4, 3, 32, 32)
