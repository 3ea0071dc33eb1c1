"""Dataset files that would take all memory or hang, and the `firmad data` commands' speed."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from firmad.data.sources import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, MAX_IDX_BYTES, read_idx
from firmad.errors import DataError
from tests.conftest import FIXTURE_FMNIST

ROOT = Path(__file__).resolve().parents[1]


def _header(magic: int, dims: list[int]) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)


def _gz(path: Path, head: bytes, zeros: int) -> Path:
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(head)
        chunk = bytes(1 << 20)
        for _ in range(zeros >> 20):
            f.write(chunk)
        f.write(bytes(zeros % (1 << 20)))
    return path


@pytest.mark.parametrize(
    ("dims", "zeros", "fragment"),
    [
        ([100, 28, 28], 64 << 20, "more bytes"),  # a bomb: 64 MiB behind a 78 kB header
        ([2**31, 28, 28], 10, "MiB"),  # a header declaring terabytes
        ([100, 28, 28], 100 * 28 * 28 - 1, "truncated"),
    ],
)
def test_idx_gz_is_checked_against_its_header_while_streaming(tmp_path, dims, zeros, fragment):
    path = _gz(tmp_path / "x-images-idx3-ubyte.gz", _header(IDX_IMAGES_MAGIC, dims), zeros)
    tic = time.perf_counter()
    with pytest.raises(DataError, match=fragment):
        read_idx(path, IDX_IMAGES_MAGIC)
    assert time.perf_counter() - tic < 2.0  # the 64 MiB were never decompressed


def test_idx_size_cap_is_sane():
    assert 60000 * 32 * 32 * 3 < MAX_IDX_BYTES <= 1 << 32


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder"])
def test_idx_special_files_are_refused_without_reading(tmp_path, kind):
    path = tmp_path / "train-labels-idx1-ubyte"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    with pytest.raises(DataError, match="not a regular file"):
        read_idx(path, IDX_LABELS_MAGIC)


def test_good_idx_files_still_read(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        from firmad.data import write_idx

        write_idx(tmp_path / name, array)
        assert np.array_equal(read_idx(tmp_path / name, IDX_IMAGES_MAGIC), array)


@pytest.mark.parametrize("command", [["data", "list"], ["data", "show", "fashion-mnist"]])
def test_data_list_and_show_do_not_import_torch(command):
    code = (
        "import sys; from firmad.cli import main; "
        f"code = main({command + ['--root', str(FIXTURE_FMNIST)]!r}); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(code)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "100"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fashion-mnist" in proc.stdout


def test_describe_counts_match_the_full_read():
    from firmad.data import describe, load_dataset

    rows = describe("fashion-mnist", FIXTURE_FMNIST)
    train = load_dataset("fashion-mnist", "train", FIXTURE_FMNIST)
    test = load_dataset("fashion-mnist", "test", FIXTURE_FMNIST)
    for r in rows:
        assert r["n_train_normal"] == int((train.labels == r["class_id"]).sum())
        assert r["n_test_anomalies"] == int((test.labels != r["class_id"]).sum())


def test_describe_notices_images_that_do_not_match_the_labels(tmp_path):
    from firmad.data import describe, write_idx

    for split in ("train", "t10k"):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", np.zeros((5, 4, 4), np.uint8))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", np.zeros(4 if split == "t10k" else 5))
    with pytest.raises(DataError, match="do not belong together"):
        describe("fashion-mnist", tmp_path)
