"""Atomic, durable file writes and checkpoints (safetensors for tensors, JSON for the rest).

Nothing the project writes is a pickle. A write goes to a temporary file in the same folder, is
synced to disk and renamed into place, and the folder is synced: an interrupted write or a power
cut leaves either the old file or the new one, never a half-written one. A checkpoint's JSON
records the SHA-256 of its weights, so a damaged weights file is detected when loaded.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from firmad.errors import CheckpointError, StorageError
from firmad.outputs import refuse_special

_UMASK = os.umask(0)
os.umask(_UMASK)

# Write failures the user can fix, and how.
_NO_SPACE = "the disk is full; free some space or write to another folder, then run again"
_READ_ONLY = (
    "the folder is read-only or not writable by you; choose a writable folder (e.g. --out) "
    "or fix its permissions"
)
_STORAGE_ADVICE = {
    errno.ENOSPC: _NO_SPACE,
    errno.EROFS: _READ_ONLY,
    errno.EACCES: _READ_ONLY,
    errno.EPERM: _READ_ONLY,
}
if hasattr(errno, "EDQUOT"):  # not on every platform
    _STORAGE_ADVICE[errno.EDQUOT] = "the disk quota is used up; " + _NO_SPACE.split("; ", 1)[1]


def storage_advice(err: OSError) -> str | None:
    """What to do about a write failure the user can fix (full disk, read-only folder)."""
    return _STORAGE_ADVICE.get(err.errno)


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT / SIGTERM wait until the block is done (main thread; elsewhere a no-op).

    Used around the renames of several files written together: Ctrl-C between two renames
    would leave a new weights file next to the old JSON that describes other weights."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)  # now handled as it would have been


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable. Some systems cannot open or sync a folder (Windows,
    some network file systems): the rename is done anyway, so that is not an error."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: Path, data: bytes) -> str:
    """Write `data` to a new temporary file next to `path`, synced to disk; returns its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view) :]
            os.fsync(fd)  # the data is on disk before a name points to it
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write_files(files: Sequence[tuple[Path, bytes]]) -> None:
    """Write several files, all or none (as far as a full disk goes).

    Every file is first written and synced to a temporary file; only then are they renamed into
    place, in order (renames need no space). A full disk or a read-only folder raises
    StorageError naming the file; the previous files are then untouched and no temporary file
    is left behind. Anything at a path that is not a regular file (a folder, a device node, a
    FIFO) is refused before anything is written: a rename would replace it.
    """
    for path, _ in files:
        refuse_special(path)
    temps: list[str] = []
    current = None
    try:
        for path, data in files:
            current = Path(path)
            temps.append(_write_temp(current, data))
        with _signals_deferred():
            for tmp, (path, _) in zip(temps, files, strict=True):
                current = Path(path)
                os.replace(tmp, current)
            for folder in dict.fromkeys(Path(path).parent for path, _ in files):
                _fsync_dir(folder)
    except BaseException as err:
        for tmp in temps:  # those already renamed are gone: nothing to remove
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in _STORAGE_ADVICE:
            raise StorageError(f"cannot write {current}: {_STORAGE_ADVICE[err.errno]}") from err
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically and durably (see `atomic_write_files`)."""
    atomic_write_files([(Path(path), data)])


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, default=json_default) + "\n").encode("utf-8")


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, _json_bytes(data))


def json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


# --- flattening nested state (optimizer, scheduler, RNG) into tensors + JSON ---------------------


def split_state(state: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested structure by a {"__tensor__": key} reference."""
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state
        return {"__tensor__": prefix}
    if isinstance(state, dict):
        return {str(k): split_state(v, f"{prefix}.{k}", tensors) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return [split_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(state)]
    return state


def join_state(meta: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(meta, dict):
        if set(meta) == {"__tensor__"}:
            return tensors[meta["__tensor__"]]
        return {k: join_state(v, tensors) for k, v in meta.items()}
    if isinstance(meta, list):
        return [join_state(v, tensors) for v in meta]
    return meta


# The JSON entry holding the weights file's checksum (added on save, checked and removed on load).
WEIGHTS_SHA256 = "weights_sha256"
# Entries every firmad checkpoint has; a JSON file without them is damaged or not ours.
REQUIRED_META = ("format", "epoch", "global_step", "finished")
_FIX = "restore it from a copy, or train the run again"


def save_checkpoint(
    directory: Path, name: str, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    """Write NAME.safetensors, then NAME.json: the JSON marks a complete checkpoint and records
    the weights' SHA-256."""
    directory = Path(directory)
    data = tensor_bytes(tensors)
    meta = {**meta, WEIGHTS_SHA256: hashlib.sha256(data).hexdigest()}
    # Both written before either is renamed: a full disk leaves the previous pair intact.
    atomic_write_files(
        [(directory / f"{name}.safetensors", data), (directory / f"{name}.json", _json_bytes(meta))]
    )


def check_checkpoint_meta(meta: Any, path: Path, required: Sequence[str] = REQUIRED_META) -> dict:
    """`meta` read from the JSON file `path` must be an object holding the `required` entries."""
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{path} is damaged: expected a JSON object of checkpoint entries, got "
            f"{type(meta).__name__}; {_FIX}"
        )
    missing = [key for key in required if key not in meta]
    if missing:
        raise CheckpointError(
            f"{path} is damaged or not a firmad checkpoint: it lacks the entries {missing}; {_FIX}"
        )
    return meta


def load_checkpoint(
    directory: Path, name: str, required: Sequence[str] = REQUIRED_META
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read NAME.json and NAME.safetensors; the weights are checked against the recorded
    SHA-256. Each kind of damage raises CheckpointError naming the damaged file."""
    directory = Path(directory)
    meta_path = directory / f"{name}.json"
    weights_path = directory / f"{name}.safetensors"
    if not meta_path.exists() or not weights_path.exists():
        raise CheckpointError(
            f"no complete checkpoint {name!r} in {directory}: expected {weights_path.name} and "
            f"{meta_path.name}; train first with `firmad train`"
        )
    try:
        meta = json.loads(meta_path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{meta_path} is damaged: not valid JSON ({err}); {_FIX}") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {meta_path}: {err.strerror or err}") from None
    check_checkpoint_meta(meta, meta_path, required)
    expected = meta.pop(WEIGHTS_SHA256, None)
    if expected is not None and not isinstance(expected, str):
        raise CheckpointError(f"{meta_path} is damaged: {WEIGHTS_SHA256} is not a string; {_FIX}")
    try:
        data = weights_path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read {weights_path}: {err.strerror or err}") from None
    # Checkpoints written before checksums were recorded have none: nothing to compare.
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(
            f"{weights_path} is damaged: its SHA-256 differs from the one recorded in "
            f"{meta_path.name} when it was saved; {_FIX}"
        )
    try:
        tensors = load_safetensors(data)
    except Exception as err:  # safetensors raises several types for damaged files
        raise CheckpointError(
            f"{weights_path} is damaged ({err}); restore it from a copy, or delete it and "
            "train again"
        ) from None
    return tensors, meta


def _temp_files(directory: Path, name: str) -> list[Path]:
    """Temporary files `_write_temp` made for `directory/name` (left by a killed process)."""
    return sorted(Path(directory).glob(f".{name}.*.tmp"))


def recover_checkpoint(directory: Path, name: str) -> bool:
    """Finish a checkpoint save that was cut between its two renames (SIGKILL, power cut).

    Both files are written and synced before either is renamed, so such a cut leaves the new
    weights next to the old JSON, and the new JSON complete in its temporary file. The
    temporary JSON that records the present weights' checksum is renamed into place. Returns
    whether it did; any other state is left alone."""
    directory = Path(directory)
    weights, meta_path = directory / f"{name}.safetensors", directory / f"{name}.json"
    pending = _temp_files(directory, meta_path.name)
    if not pending or not weights.exists():
        return False
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    try:
        current = json.loads(meta_path.read_bytes()).get(WEIGHTS_SHA256)
    except (OSError, ValueError, AttributeError):
        current = None
    if current == digest:
        return False
    for tmp in reversed(pending):
        try:
            meta = json.loads(tmp.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get(WEIGHTS_SHA256) == digest:
            os.replace(tmp, meta_path)
            _fsync_dir(directory)
            return True
    return False


def remove_temp_files(directory: Path, names: Sequence[str]) -> None:
    """Remove the temporary files a killed writer left for `names` in `directory`; only call
    this while no other process may be writing them (e.g. under the run directory's lock)."""
    for name in names:
        for tmp in _temp_files(directory, name):
            with contextlib.suppress(OSError):
                tmp.unlink()


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.` with the prefix removed."""
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
