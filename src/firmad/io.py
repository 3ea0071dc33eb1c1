"""Atomic file writes and checkpoints (safetensors for tensors, JSON for everything else).

Nothing the project writes is a pickle. A write goes to a temporary file in the same folder and is
renamed into place, so an interrupted write never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from firmad.errors import CheckpointError

_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_replace(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_replace(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_replace(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_replace(path, lambda tmp: save_file(tensors, tmp))


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


def save_checkpoint(
    directory: Path, name: str, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    """Write NAME.safetensors, then NAME.json: the JSON marks a complete checkpoint."""
    directory = Path(directory)
    atomic_save_tensors(directory / f"{name}.safetensors", tensors)
    atomic_write_json(directory / f"{name}.json", meta)


def load_checkpoint(directory: Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    directory = Path(directory)
    meta_path = directory / f"{name}.json"
    weights_path = directory / f"{name}.safetensors"
    if not meta_path.exists() or not weights_path.exists():
        raise CheckpointError(
            f"no complete checkpoint {name!r} in {directory}: expected {weights_path.name} and "
            f"{meta_path.name}; train first with `firmad train`"
        )
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises several types for damaged files
        raise CheckpointError(
            f"checkpoint {weights_path} is damaged ({err}); delete it and train again"
        ) from None
    return tensors, meta


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.` with the prefix removed."""
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
