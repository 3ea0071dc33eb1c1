"""Where firmad may write: only regular files, only where the user named, never inside an input.

Every command that writes checks its outputs here before it starts working, so a mistake is
refused at once with what to do, not after minutes of work or halfway through a set of files:

- ``check_file(path, option, inputs=..., example=...)``: an output file (``score --out``,
  ``export --out``) is new or an existing regular file; never a folder, a device, a pipe or a
  socket (an atomic rename would replace ``/dev/null`` or a FIFO with a plain file); its folder
  exists or can be made, and can be written; it is not inside an input folder.
- ``check_folder(path, option, inputs=..., markers=...)``: an output folder (``fit``,
  ``attack``, ``train``, ``bench``, ``features``, a report) is new or a folder; it can be
  written; it is not inside an input folder; unless it holds one of the command's own
  ``markers`` it holds no images (a folder of the user's images is never written into).
- ``refuse_special(path)``: the last guard, used by every atomic write (`firmad.io`).
- ``write_together(files)``: several files, all written or none (``export``'s model and its
  contract), with a rollback when a rename fails halfway.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from firmad.errors import InputError, StorageError

# Image file names firmad reads (firmad.inputs.IMAGE_SUFFIXES, kept equal by a test).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
_SCAN_LIMIT = 20_000  # entries looked at when searching an output folder for images
# Files that mark a folder as firmad's own output (a run, a detector, a report, an attack, a
# grid, a study): the images inside are its plots, not the user's.
OWN_MARKERS = (
    "config.yaml", "checkpoint.json", "results.json", "detector.json", "report.md",
    "attack.json", "attack.incomplete", ".attack-partial", "bench.csv", "study.json",
    "study-settings.json",
)  # fmt: skip


def kind_of(mode: int) -> str:
    """What a file of this mode is, in words."""
    for test, word in (
        (stat.S_ISREG, "a file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return word
    return "a special file"


def _mode(path: Path) -> int | None:
    """The mode of what ``path`` names (links followed); None if nothing (or a dangling link)."""
    try:
        return os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        raise InputError(f"{path}: cannot be checked ({err.strerror or err})") from None


def refuse_special(path: str | Path) -> None:
    """Refuse to replace anything at ``path`` that is not a regular file (a folder, a device
    node, a FIFO, a socket): a rename over it would destroy it or the user's intent."""
    mode = _mode(Path(path))
    if mode is not None and not stat.S_ISREG(mode):
        raise StorageError(
            f"{path} exists and is {kind_of(mode)}; firmad writes only regular files and never "
            "replaces anything else: choose another name"
        )


def _existing_ancestor(path: Path, option: str) -> Path:
    """The nearest folder above ``path`` that exists; an ancestor that is a file is an error."""
    for parent in Path(os.path.abspath(path)).parents:
        mode = _mode(parent)
        if mode is None:
            continue
        if not stat.S_ISDIR(mode):
            raise InputError(
                f"{option} {path}: cannot write into {parent}: it is {kind_of(mode)}, not a "
                "folder; give a path in a folder"
            )
        return parent
    return Path(Path(path).absolute().anchor)  # the root always exists


def _check_writable(folder: Path, option: str, path: Path) -> None:
    """Prove a file can be created in ``folder`` (and remove it at once)."""
    from firmad.io import storage_advice

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".firmad-write-test-"):
            pass
    except OSError as err:
        advice = storage_advice(err) or "choose a folder you can write to"
        raise StorageError(
            f"{option} {path}: cannot write in {folder} ({err.strerror or err}); {advice}"
        ) from None


def _inside(path: Path, inputs: Iterable[str | Path], option: str) -> None:
    """Refuse an output inside (or equal to) one of the input files or folders."""
    target = Path(os.path.realpath(path))
    for item in inputs:
        source = Path(os.path.realpath(item))
        if target == source or source in target.parents:
            raise InputError(
                f"{option} {path} is inside the input {item}: what is written there would be "
                "read as input next time; write it outside the inputs"
            )


def check_file(
    path: str | Path, option: str = "--out", inputs: Iterable[str | Path] = (), example: str = ""
) -> Path:
    """An output file, checked before any work: new or a regular file (replaced), in a folder
    that exists or can be made and can be written, not inside ``inputs``."""
    path = Path(path)
    mode = _mode(path)
    such = f" such as {example}" if example else ""
    if mode is not None and stat.S_ISDIR(mode):
        raise InputError(f"{option} {path} is a folder; give a file name{such}")
    if mode is not None and not stat.S_ISREG(mode):
        raise InputError(
            f"{option} {path} is {kind_of(mode)}; firmad writes only regular files and never "
            f"replaces anything else: give a file name{such}"
        )
    _check_writable(_existing_ancestor(path, option), option, path)
    _inside(path, inputs, option)
    return path


def check_folder(
    path: str | Path,
    option: str = "--out",
    inputs: Iterable[str | Path] = (),
    markers: Iterable[str] = (),
) -> Path:
    """An output folder, checked before any work: new or a folder that can be written, not
    inside ``inputs``, and holding no image files unless it is the command's own folder (it
    holds one of the ``markers``, e.g. ``attack.json``): a folder of the user's images is never
    written into."""
    path = Path(path)
    mode = _mode(path)
    if mode is not None and not stat.S_ISDIR(mode):
        raise InputError(
            f"{option} {path} is {kind_of(mode)}, not a folder; give a new folder or one of "
            "firmad's"
        )
    _check_writable(path if mode is not None else _existing_ancestor(path, option), option, path)
    _inside(path, inputs, option)
    if mode is not None:
        image = find_image(path, (*OWN_MARKERS, *markers))
        if image is not None:
            raise InputError(
                f"{option} {path} holds images of yours (e.g. {image}); firmad never writes "
                "into a folder of images: give a new or empty folder"
            )
    return path


def find_image(folder: Path, markers: Sequence[str] = OWN_MARKERS) -> str | None:
    """The first image file under ``folder`` (its relative path), or None. Folders holding one
    of the ``markers`` are firmad's own and skipped, as are hidden files and folders (readers
    skip them too); the search is bounded."""
    seen = 0
    for root, dirs, names in os.walk(folder):
        if any(m in names or m in dirs for m in markers):
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            seen += 1
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                return rel
        if seen > _SCAN_LIMIT:
            break
    return None


def write_together(files: Sequence[tuple[str | Path, bytes]]) -> None:
    """Write several files, all or none: each is written to a temporary file first; if a rename
    fails halfway, the files already renamed get their previous content back (or are removed
    when they are new). Nothing that is not a regular file is ever replaced."""
    from firmad.io import atomic_write_files

    paths = [Path(p) for p, _ in files]
    for path in paths:
        refuse_special(path)
    backups: list[tuple[Path, bytes | None]] = []
    for path in paths:
        try:
            backups.append((path, path.read_bytes()))
        except FileNotFoundError:
            backups.append((path, None))
    try:
        atomic_write_files([(p, data) for p, (_, data) in zip(paths, files, strict=True)])
    except BaseException:
        for path, old in backups:
            with contextlib.suppress(OSError, StorageError):
                if old is None and path.is_file():
                    path.unlink()
                elif old is not None and path.is_file() and path.read_bytes() != old:
                    atomic_write_files([(path, old)])
        raise
