"""Resume caches that prove themselves: the finished attacks of an unfinished audit, and the
finished batches of the attack in progress, kept in ``.attack-partial/`` of its folder.

Every file carries what it belongs to: one ``.safetensors`` file per attack (the adversarial
images and the winning source per image; ``*.progress.safetensors`` for the attack in
progress), its metadata holding the audit's settings (with the SHA-256 digests of the
detector's weights and of the attacked images), the attack's key, and SHA-256 checksums of the
settings and of the tensors. ``settings.json`` holds the same settings for the whole folder.

- A folder whose ``settings.json`` names other settings is refused (`PartialAttacks.open`
  raises `ConfigError` with the differences): run the same command to continue it.
- A file that is unreadable, not a regular file, of another format, without its settings,
  with other settings, with a wrong checksum or with a field missing is discarded with a
  message (``note``) and recomputed, never used.
- What a file holds is checked again by the sweep against the images it attacks (every image
  in the ε-ball and in [0, 1]; the attack in progress: its objectives are the true ones), and
  the images are scored again. There is no secret key: a file forged with correct checksums
  and valid images is a real perturbation inside the threat model, scored by the detector
  itself; at worst that attack is weaker than a recomputed one would be.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from firmad.errors import ConfigError
from firmad.io import atomic_write_bytes, atomic_write_json

__all__ = ["FORMAT", "SETTINGS", "PartialAttacks", "digest_tensors", "settings_sha256"]

FORMAT = "firmad-attack-partial/2"
SETTINGS = "settings.json"
PROGRESS = ".progress.safetensors"
FINISHED = ".safetensors"


def _canonical(settings: Any) -> str:
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), allow_nan=False)


def settings_sha256(settings: Any) -> str:
    return hashlib.sha256(_canonical(settings).encode()).hexdigest()


def digest_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class PartialAttacks:
    """The partials of one audit in ``folder``, tied to ``settings`` (see the module
    docstring). ``note(message)`` hears what was discarded; ``max_bytes`` bounds what is read."""

    def __init__(self, folder: Path, settings: dict, note: Callable[[str], None], max_bytes: int):
        self.folder, self.settings, self.note, self.max_bytes = folder, settings, note, max_bytes
        self.sha = settings_sha256(settings)

    @classmethod
    def open(
        cls, folder: Path, settings: dict[str, Any], note: Callable[[str], None] | None = None,
        max_bytes: int = 1 << 30,
    ) -> PartialAttacks:  # fmt: skip
        settings = json.loads(_canonical(settings))  # as it reads back
        store = cls(folder, settings, note or (lambda message: None), max_bytes)
        old, why = store._folder_settings()
        if old is not None and old != settings:
            raise ConfigError(
                f"{folder.parent} holds an unfinished attack made with other settings "
                f"({_differences(old, settings)}); run it again with the same settings to "
                f"continue it, or choose another --out (or delete {folder} to start over)"
            )
        if old is None:
            if why and store._files():
                store.note(f"{folder}: {why}; every kept attack is checked against its own "
                           "settings")  # fmt: skip
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(
                folder / SETTINGS, {"format": FORMAT, "settings": settings, "sha256": store.sha}
            )
        store._drop_old_format()
        return store

    def _folder_settings(self) -> tuple[dict | None, str | None]:
        """The settings in settings.json, or None and why not (None when there is no file)."""
        path = self.folder / SETTINGS
        if not os.path.lexists(path):
            return None, "its settings file is missing" if self.folder.is_dir() else None
        try:
            data = json.loads(_read_regular(path, 1 << 20))
        except (OSError, ValueError) as err:
            return None, f"its settings file is unreadable ({_short(err)})"
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return None, "its settings file is of another format"
        if data.get("sha256") != settings_sha256(data.get("settings")):
            return None, "its settings file does not match its checksum"
        return data["settings"], None

    def _files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return [p for p in self.folder.iterdir() if p.name != SETTINGS]

    def _drop_old_format(self) -> None:
        for p in self._files():
            if not p.name.endswith(FINISHED):
                self._discard(p, "not a kept attack of this firmad version")

    def _path(self, key: str, progress: bool = False) -> Path:
        name = hashlib.sha256(key.encode()).hexdigest()[:20]
        return self.folder / (name + (PROGRESS if progress else FINISHED))

    def _discard(self, path: Path, why: str) -> None:
        self.note(f"discarded {path.name} from {self.folder}: {why}; attacking again")
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

    def _read(self, key: str, progress: bool, fields: tuple[str, ...]) -> tuple | None:
        """(tensors, metadata) of the file of ``key`` when it proves itself, else None (and
        the file discarded with a message)."""
        path = self._path(key, progress)
        if not os.path.lexists(path):
            return None
        try:
            tensors, meta = _load(path, self.max_bytes)
        except Exception as err:  # safetensors raises several types for damaged files
            self._discard(path, f"unreadable ({_short(err)})")
            return None
        why = self._problem(tensors, meta, key, fields)
        if why is not None:
            self._discard(path, why)
            return None
        return tensors, meta

    def _problem(self, tensors: dict, meta: dict, key: str, fields: tuple[str, ...]) -> str | None:
        if meta.get("format") != FORMAT:
            return "of another format"
        if "settings" not in meta:
            return "it carries no settings"
        try:
            settings = json.loads(meta["settings"])
        except ValueError:
            return "its settings are unreadable"
        if meta.get("settings_sha256") != settings_sha256(settings):
            return "its settings do not match their checksum"
        if settings != self.settings:
            return f"made with other settings ({_differences(settings, self.settings)})"
        if meta.get("key") != key:
            return "it belongs to another attack"
        missing = [f for f in fields if f not in tensors and f not in meta]
        if missing:
            return f"field(s) {', '.join(missing)} missing"
        if meta.get("tensors_sha256") != digest_tensors(tensors):
            return "its contents do not match their checksum"
        return None

    def _write(self, key: str, progress: bool, tensors: dict, extra: dict[str, str]) -> None:
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {
            "format": FORMAT, "key": key, "settings": _canonical(self.settings),
            "settings_sha256": self.sha, "tensors_sha256": digest_tensors(tensors), **extra,
        }  # fmt: skip
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self._path(key, progress), save(tensors, metadata=meta))

    # --- the cache protocol of the sweep (`SweepHooks.cache`) -----------------------------

    def get(self, key: str) -> dict | None:
        """A finished attack: ``{"images", "winner", "attacks"}``, or None."""
        got = self._read(key, False, ("images", "winner", "attacks"))
        if got is None:
            return None
        tensors, meta = got
        try:
            attacks = json.loads(meta["attacks"])
        except ValueError:
            attacks = None
        if not isinstance(attacks, list):
            self._discard(self._path(key), "its list of attacks is unreadable")
            return None
        return {"images": tensors["images"], "winner": tensors["winner"], "attacks": attacks}

    def put(self, key: str, value: dict) -> None:
        tensors = {"images": value["images"], "winner": value["winner"].long()}
        self._write(key, False, tensors, {"attacks": json.dumps(list(value["attacks"]))})
        self._path(key, progress=True).unlink(missing_ok=True)

    def drop(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def checkpoint(self, key: str) -> _Checkpoint:
        return _Checkpoint(self, key)

    def __len__(self) -> int:
        return sum(1 for p in self._files() if p.name.endswith(FINISHED))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class _Checkpoint:
    """The state of the attack in progress under ``key`` (see `gradient.Checkpoint`)."""

    def __init__(self, store: PartialAttacks, key: str) -> None:
        self.store, self.key = store, key

    def load(self) -> dict[str, Any] | None:
        got = self.store._read(self.key, True, ("done",))
        if got is None:
            return None
        tensors, meta = got
        try:
            done = int(meta["done"])
        except ValueError:
            self.store._discard(self.store._path(self.key, True), "its count is unreadable")
            return None
        return {**tensors, "done": done}

    def save(self, state: dict[str, Any]) -> None:
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self.store._write(self.key, True, tensors, {"done": str(int(state["done"]))})


def _read_regular(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file (no FIFO, device or link is opened), at most ``max_bytes``."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{path.name} is not a regular file")
    if st.st_size > max_bytes:
        raise OSError(f"{path.name} is larger than an attack's files can be")
    with open(path, "rb") as fh:
        return fh.read(max_bytes + 1)


def _load(path: Path, max_bytes: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load

    data = _read_regular(path, max_bytes)
    tensors = load(data)  # checks the header; the metadata is read from the same bytes
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a mapping")
    return tensors, meta


def _short(err: Exception) -> str:
    text = str(err) or type(err).__name__
    return text if len(text) < 120 else text[:117] + "..."


def _differences(old, new: dict) -> str:
    if not isinstance(old, dict):
        return "unreadable settings"
    keys = sorted(set(old) | set(new))
    diff = [
        f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)
    ]
    return "; ".join(diff[:4]) + ("; ..." if len(diff) > 4 else "")
