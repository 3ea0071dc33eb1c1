"""Atomic, durable writes; checkpoint checksums and damage reports; full or read-only disks."""

from __future__ import annotations

import errno
import json
import os
import stat
import sys

import pytest
import torch
from safetensors.torch import load_file

from firmad.errors import CheckpointError, FirmadError
from firmad.io import atomic_write_text, load_checkpoint, save_checkpoint
from tests.conftest import run_in_read_only_folder

META = {"format": "firmad-checkpoint-1", "epoch": 3, "global_step": 30, "finished": True}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"model.w": torch.randn(64, 32, generator=g), "model.b": torch.arange(10)}


def test_write_syncs_file_then_folder_and_tolerates_folder_refusal(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        mode = os.fstat(fd).st_mode
        synced.append("dir" if stat.S_ISDIR(mode) else "file")
        if stat.S_ISDIR(mode):  # as some network file systems do
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_text(tmp_path / "a.txt", "hello")
    assert synced == ["file", "dir"]
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_checkpoint_round_trip_and_checksum_catches_flipped_bytes(tmp_path):
    tensors = _tensors()
    save_checkpoint(tmp_path, "ck", tensors, META)
    recorded = json.loads((tmp_path / "ck.json").read_text())
    assert len(recorded["weights_sha256"]) == 64
    loaded, meta = load_checkpoint(tmp_path, "ck")
    assert meta == META  # the checksum entry is checked, not handed back
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())

    # Flip bytes in the data region (after the 8-byte length and the JSON header).
    weights = tmp_path / "ck.safetensors"
    raw = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    for i in range(start + 100, start + 110):
        raw[i] ^= 0xFF
    weights.write_bytes(bytes(raw))
    load_file(str(weights))  # safetensors alone does not notice
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path, "ck")
    msg = str(err.value)
    assert str(weights) in msg and "damaged" in msg and "restore" in msg


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "got list"),
        ('{"finished": true}', "lacks the entries ['format', 'epoch', 'global_step']"),
    ],
)
def test_damaged_checkpoint_json_names_the_json_file(tmp_path, content, fragment):
    save_checkpoint(tmp_path, "ck", _tensors(), META)
    (tmp_path / "ck.json").write_text(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path, "ck")
    msg = str(err.value)
    assert str(tmp_path / "ck.json") in msg and fragment in msg
    # The weights are fine: no advice to delete them.
    assert "ck.safetensors" not in msg and "delete" not in msg.lower()


def test_damaged_safetensors_names_the_weights_file(tmp_path):
    save_checkpoint(tmp_path, "ck", _tensors(), META)
    # A checkpoint from before checksums (no entry): the safetensors reader finds the damage.
    meta = json.loads((tmp_path / "ck.json").read_text())
    del meta["weights_sha256"]
    (tmp_path / "ck.json").write_text(json.dumps(meta))
    weights = tmp_path / "ck.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path, "ck")
    assert str(weights) in str(err.value) and "ck.json" not in str(err.value)
    # A wrong checksum entry is reported as damage of the JSON file.
    meta["weights_sha256"] = 12
    (tmp_path / "ck.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="ck.json is damaged"):
        load_checkpoint(tmp_path, "ck")


def _disk_full_on_call(monkeypatch, n: int) -> None:
    """os.write fails with ENOSPC from its n-th call on (1-based)."""
    real_write = os.write
    calls = []

    def write(fd, data):
        calls.append(fd)
        if len(calls) >= n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_full_disk_is_a_storage_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("old")
    _disk_full_on_call(monkeypatch, 1)
    with pytest.raises(FirmadError) as err:  # a FirmadError: the CLI exits with status 2
        atomic_write_text(path, "new")
    assert type(err.value).__name__ == "StorageError"
    assert str(path) in str(err.value) and "disk is full" in str(err.value)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left


def test_full_disk_during_checkpoint_keeps_the_previous_pair(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, "ck", _tensors(), META)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # The weights are written, then the JSON fails: neither file may be replaced.
    _disk_full_on_call(monkeypatch, 2)
    newer = {k: v + 1 for k, v in _tensors().items()}
    with pytest.raises(FirmadError, match="ck.json: the disk is full"):
        save_checkpoint(tmp_path, "ck", newer, {**META, "epoch": 4})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    _, meta = load_checkpoint(tmp_path, "ck")
    assert meta["epoch"] == 3


_WRITE_CONFIG = """
from firmad.io import atomic_write_text
try:
    atomic_write_text(folder / "config.yaml", "new")
except Exception as err:
    print(json.dumps({"type": type(err).__name__, "msg": str(err)}))
else:
    print(json.dumps({"type": None}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="uses Linux capabilities and file modes")
def test_read_only_folder_is_a_storage_error(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text("old")
    _, out = run_in_read_only_folder(folder, _WRITE_CONFIG)
    assert out["type"] == "StorageError", out
    assert str(folder / "config.yaml") in out["msg"] and "read-only" in out["msg"]
    assert (folder / "config.yaml").read_text() == "old"
    assert sorted(os.listdir(folder)) == ["config.yaml"]
