"""Images in, the way a detector wants them: arrays, tensors, PIL images, files and folders.

One preprocessing path: a file is opened (regular files only, under a size cap), decoded with
Pillow and squashed to size x size with the bilinear filter; a PIL image given in memory takes
the same steps after opening; an array is taken as it is (the detector resizes it inside).

Arrays and tensors are read by their channel dimension (1 or 3): (H, W), (H, W, C), (C, H, W)
are one image, (N, H, W) grey images, (N, C, H, W) / (N, H, W, C) a batch. A shape that reads
both ways is refused with the fix, never guessed; ``layout=`` ("NCHW", "NHWC", "NHW", "CHW",
"HWC") says how to read it.

Files: every path given, or found under a folder, is either read or reported as skipped with
its reason (hidden, not an image name, not a regular file, a broken or looping link, undecodable,
NaN pixels), each once. `score_inputs` answers one score per file given (NaN where none).
"""

from __future__ import annotations

import csv
import io
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from firmad.data.sources import pil_array
from firmad.errors import DataError, InputError
from firmad.metrics import conformal_p_values

# What a folder is searched for: the dataset readers' extensions, and GIF (its first frame).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
MAX_IMAGE_BYTES = 256 * 2**20  # a larger file is not read at all
CHANNELS = (1, 3)

Skipped = list[tuple[Path, str]]


# --- arrays and tensors -------------------------------------------------------------------------


def _channel_axes(shape: Sequence[int]) -> tuple[bool, bool]:
    """Whether the first / last axis of a (.., a, H, W, b) shape can be a channel axis."""
    return shape[0] in CHANNELS, shape[-1] in CHANNELS


def _single_image_layout(shape: tuple[int, ...]) -> str:
    """A 3-d array: "CHW" or "HWC" (one image) or "NHW" (grey images); refuse the ambiguous."""
    first, last = _channel_axes(shape)
    if shape[-1] == 4 and not first:  # (4, H, W) are four grey images, as any (N, H, W)
        raise InputError(
            f"an image of shape {shape} has 4 channels; drop the alpha channel first "
            "(e.g. x[..., :3] or PIL's .convert('RGB'))"
        )
    if last and not first:
        return "HWC"
    if first and last:
        raise InputError(
            f"shape {shape} is ambiguous: channels first or last? Pass layout='CHW' or "
            "layout='HWC' (or a batch, x[None])"
        )
    if shape[0] == 3:
        raise InputError(
            f"shape {shape} is ambiguous: one RGB image (C, H, W) or 3 grey images (N, H, W)? "
            "Pass layout='CHW' for one image or layout='NHW' for grey images"
        )
    return "CHW" if shape[0] == 1 else "NHW"


LAYOUTS = {4: ("NCHW", "NHWC"), 3: ("NHW", "CHW", "HWC")}


def batch_layout(shape: tuple[int, ...], layout: str | None = None) -> str:
    """ "NCHW" or "NHWC" of a 4-d batch, from its channel dimension (``layout`` forces one)."""
    if layout is not None:
        return layout
    second, last = shape[1] in CHANNELS, shape[-1] in CHANNELS
    if second and not last:
        return "NCHW"
    if last and not second:
        return "NHWC"
    if second and last:
        raise InputError(
            f"shape {shape} is ambiguous: channels at axis 1 or at the last axis? Pass "
            "layout='NCHW' or layout='NHWC'"
        )
    alpha = 4 in (shape[1], shape[-1])
    raise InputError(
        f"images must have 1 (grey) or 3 (RGB) channels, at axis 1 (N, C, H, W) or last "
        f"(N, H, W, C); got shape {shape}"
        + ("; drop the alpha channel first (x[..., :3])" if alpha else "")
    )


def _check_layout(layout: str | None, dim: int) -> None:
    if layout is None:
        return
    allowed = LAYOUTS.get(dim, ())
    if layout not in allowed:
        fits = ", ".join(repr(a) for a in allowed) or "none (a 2-d array is one grey image)"
        raise InputError(f"layout={layout!r} does not fit images of {dim} dimensions; use {fits}")


def to_batch(X: torch.Tensor, layout: str | None = None) -> tuple[torch.Tensor, str]:
    """An image or a batch as (N, C, H, W) (a view) and the layout it was read in ("NCHW" or
    "NHWC"). ``layout`` says how to read a shape that reads both ways (see the module)."""
    shape = tuple(X.shape)
    _check_layout(layout, X.dim())
    if X.dim() == 2:
        return X[None, None], "NCHW"
    if X.dim() == 3:
        kind = layout or _single_image_layout(shape)
        if kind == "HWC":
            return _channels_checked(X.permute(2, 0, 1)[None], layout), "NHWC"
        return _channels_checked(X[None] if kind == "CHW" else X[:, None], layout), "NCHW"
    if X.dim() != 4 or 0 in shape:
        raise InputError(
            f"images must have shape (N, C, H, W), (N, H, W, C), (N, H, W), or one image "
            f"(H, W), (H, W, C), (C, H, W); got {shape}"
        )
    kind = batch_layout(shape, layout)
    return _channels_checked(X.permute(0, 3, 1, 2) if kind == "NHWC" else X, layout), kind


def _channels_checked(x: torch.Tensor, layout: str | None) -> torch.Tensor:
    """A batch read with a given layout must have 1 or 3 channels where it says."""
    if layout is not None and x.shape[1] not in CHANNELS:
        raise InputError(
            f"layout={layout!r} puts {x.shape[1]} channels where 1 (grey) or 3 (RGB) are "
            "expected; check the layout"
        )
    return x


def check_unit_range(x: torch.Tensor) -> None:
    """Float images must be finite and in [0, 1] (uint8 images are divided by 255 first)."""
    with torch.no_grad():
        if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise InputError(
                "float images must be finite and lie in [0, 1]; divide uint8 images (0..255) "
                "by 255 first"
            )


def as_uint8_images(
    X, layout: str | None = None, size: int = 32, channels: int = 3
) -> tuple[torch.Tensor, str]:
    """Images as uint8 (N, C, H, W) and the layout they came in ("NCHW" or "NHWC").

    Accepts numpy arrays or tensors (uint8, or float in [0, 1]): one image or a batch (see the
    module); a PIL image or a list of them; a file, a folder, or a list of paths (every file
    must be readable: use `score_paths` to skip broken ones). PIL images and files are squashed
    to ``size`` x ``size`` with ``channels`` channels, each on its own.
    """
    if is_path_input(X):
        files, skipped = find_images([X] if isinstance(X, str | Path) else X)
        warn_skipped(skipped, files)
        return load_files(files, size, channels), "NCHW"
    if hasattr(X, "convert") and hasattr(X, "size"):
        X = [X]
    if isinstance(X, list | tuple) and X and all(hasattr(x, "convert") for x in X):
        return torch.from_numpy(np.stack([pil_image(x, size, channels) for x in X])), "NCHW"
    if isinstance(X, np.ndarray):
        X = _array_tensor(X)
    if not isinstance(X, torch.Tensor):
        raise InputError(
            "images must be a numpy array, a torch tensor, a PIL image or a list of them, a file "
            f"or folder path or a list of paths; got {type(X).__name__}"
        )
    X, layout = to_batch(X, layout)
    if X.dtype != torch.uint8:
        if not X.is_floating_point():
            raise InputError(f"images must be uint8, or float in [0, 1]; got {X.dtype}")
        check_unit_range(X)
        X = (X.detach().cpu() * 255).round().to(torch.uint8)
    return X.contiguous(), layout


def _array_tensor(X: np.ndarray) -> torch.Tensor:
    """A numpy array as a tensor: any byte order (big-endian '>f4' is read as its values);
    a dtype that cannot hold pixels is refused."""
    if X.dtype.kind not in "uif":
        raise InputError(f"images must be uint8, or float in [0, 1]; got an array of {X.dtype}")
    if not X.dtype.isnative:
        X = X.astype(X.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(X))


def _is_path_list(X) -> bool:
    return isinstance(X, list | tuple) and bool(X) and all(isinstance(x, str | Path) for x in X)


def is_path_input(X) -> bool:
    """A file or folder path, or a list of them."""
    return isinstance(X, str | Path) or _is_path_list(X)


def warn_skipped(skipped: Skipped, files: Sequence[Path]) -> None:
    """Paths that are not images are listed in a warning; a missing path, or no image at all,
    is an error."""
    import warnings

    missing = [str(p) for p, why in skipped if why == "no such file or folder"]
    if missing:
        raise InputError(f"no such file or folder: {', '.join(missing[:5])}; check the path")
    if skipped:
        lines = "\n".join(f"  skipped {p}: {why}" for p, why in skipped[:20])
        more = f"\n  (and {len(skipped) - 20} more)" if len(skipped) > 20 else ""
        warnings.warn(f"{len(skipped)} path(s) skipped:\n{lines}{more}", stacklevel=3)
    if not files:
        _no_images()


def _no_images() -> None:
    raise InputError(
        f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found, recursively; point "
        "to the folder that holds your images"
    )


# --- PIL images and files -----------------------------------------------------------------------


def regular_file_problem(path: Path, max_bytes: int) -> str | None:
    """Why a path is not a readable regular file under the size cap (None: it is)."""
    try:
        st = os.stat(path)
    except OSError as err:
        if os.path.islink(path):
            return f"a broken or looping symbolic link ({err.strerror})"
        return f"cannot be read ({err.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return "a folder"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a device, pipe or socket)"
    if st.st_size > max_bytes:
        return f"larger than {max_bytes // 2**20} MiB"
    if st.st_size == 0:
        return "an empty file"
    return None


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file; a pipe or device is refused without blocking on it, and the
    size is checked on the open file (it cannot be swapped after the check)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{path}: not a regular file (a device, pipe, socket or folder)")
        if st.st_size > max_bytes:
            raise DataError(f"{path}: larger than {max_bytes // 2**20} MiB")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise DataError(f"{path}: larger than {max_bytes // 2**20} MiB (it grew while read)")
    return data


def pil_image(img, size: int, channels: int) -> np.ndarray:
    """A PIL image as uint8 (channels, size, size), as `firmad.data.sources.pil_array` reads
    it; a float image with NaN or infinite pixels is refused (it would read as black)."""
    if img.mode == "F":
        img.load()
        if not np.isfinite(np.asarray(img)).all():
            raise DataError("holds NaN or infinite pixel values; fix or remove the image")
    return pil_array(img, size, channels)


def load_file(path: Path, size: int, channels: int) -> np.ndarray:
    """Decode one image file (GIF: its first frame) to uint8 (channels, size, size)."""
    from PIL import Image

    try:
        data = read_regular_file(path, MAX_IMAGE_BYTES)
    except OSError as err:
        raise DataError(f"cannot be read ({err.strerror or err})") from err
    buffer = io.BytesIO(data)
    try:
        with Image.open(buffer) as img:
            return pil_image(img, size, channels)
    except DataError:
        raise
    except Exception as err:  # not an image at all: Pillow's UnidentifiedImageError and others
        text = str(err).replace(f" {buffer!r}", "").replace(repr(buffer), "the file")
        raise DataError(f"cannot decode this image ({type(err).__name__}: {text})") from err


def load_files(files: Sequence[Path], size: int, channels: int) -> torch.Tensor:
    """Every file decoded; the first that cannot be is an error naming it."""
    if not files:
        raise InputError("no image files to read")
    arrays = []
    for f in files:
        try:
            arrays.append(load_file(f, size, channels))
        except DataError as err:
            raise DataError(
                f"{f}: {_strip(err, f)}. Remove or replace the file, or rename it if it is not "
                "an image"
            ) from None
    return torch.from_numpy(np.stack(arrays))


def _strip(err: Exception, path: Path) -> str:
    """An error's message without a leading "PATH: " (skip lines name the path once)."""
    text = str(err)
    return text[len(f"{path}: ") :] if text.startswith(f"{path}: ") else text


# --- finding files ------------------------------------------------------------------------------


def find_images(paths: Iterable[str | Path]) -> tuple[list[Path], Skipped]:
    """Image files among the paths (files, and folders searched recursively) and the paths that
    are skipped with their reason, each once. Folder contents come sorted; given files keep
    their order; a file found twice is read once."""
    entries, skipped = image_entries(paths)
    bad = {p for p, _ in skipped}
    return [p for p in dict.fromkeys(entries) if p not in bad], skipped


def image_entries(paths: Iterable[str | Path]) -> tuple[list[Path], Skipped]:
    """One entry per file given (in order, repeats kept, even when it cannot be read) and per
    image-named file under a folder given (sorted by path, hidden ones aside); and the paths
    skipped with their reason, each once (a file reached twice is listed once)."""
    entries: list[Path] = []
    skipped: Skipped = []
    for given in paths:
        path = Path(given)
        if os.path.isdir(path):
            _walk(path, entries, skipped)
            continue
        entries.append(path)
        problem = regular_file_problem(path, MAX_IMAGE_BYTES)
        if problem is None and path.suffix.lower() not in IMAGE_SUFFIXES:
            problem = _not_image_name(path)
        if problem is not None:
            if not os.path.lexists(path):
                problem = "no such file or folder"
            skipped.append((path, problem))
    return entries, _once(skipped)


def _once(skipped: Skipped) -> Skipped:
    """Each path once, with its first reason, in the order first met."""
    first: dict[Path, str] = {}
    for path, why in skipped:
        first.setdefault(path, why)
    return list(first.items())


def _not_image_name(path: Path) -> str:
    return (
        f"not an image file name ({', '.join(sorted(IMAGE_SUFFIXES))}); rename it if it is an image"
    )


def _walk(folder: Path, entries: list[Path], skipped: Skipped) -> None:
    """Every image-named file under the folder (sorted; also those that cannot be read, which
    are skipped too), and the other paths skipped with their reason."""

    def refuse(err: OSError) -> None:
        skipped.append((Path(err.filename or folder), f"folder cannot be read ({err.strerror})"))

    found = []
    for root, dirs, names in os.walk(folder, onerror=refuse):
        for d in sorted(dirs):
            p = Path(root) / d
            if d.startswith("."):
                skipped.append((p, "hidden folder, not searched"))
            elif os.path.islink(p):
                skipped.append((p, "link to a folder, not followed (give it by name)"))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            p = Path(root) / name
            if name.startswith("."):
                skipped.append((p, "hidden file"))
                continue
            image = p.suffix.lower() in IMAGE_SUFFIXES
            problem = regular_file_problem(p, MAX_IMAGE_BYTES)
            if problem is None and not image:
                problem = _not_image_name(p)
            if image:
                found.append(p)
            if problem is not None:
                skipped.append((p, problem))
    entries.extend(sorted(found))


# --- scoring many files -------------------------------------------------------------------------


def score_paths(
    score: Callable[[torch.Tensor], np.ndarray],
    paths: Iterable[str | Path],
    size: int,
    channels: int,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[str], np.ndarray, Skipped]:
    """Score image files and folders: ``(names, scores, skipped)``.

    ``names``: the paths scored, in order (given files in the order given, each folder's files
    sorted); ``scores``: float64 (len(names),); ``skipped``: (path, reason) for every path
    given or found that was not scored. ``score`` maps uint8 (N, C, H, W) to scores;
    ``progress(done, total)`` is called after each batch.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    files, skipped = find_images(paths)
    names: list[str] = []
    out: list[np.ndarray] = []
    for start in range(0, len(files), batch_size):
        batch = []
        for f in files[start : start + batch_size]:
            try:
                batch.append(load_file(f, size, channels))
                names.append(str(f))
            except DataError as err:
                skipped.append((f, _strip(err, f)))
        if batch:
            out.append(np.asarray(score(torch.from_numpy(np.stack(batch))), dtype=np.float64))
        if progress is not None:
            progress(min(start + batch_size, len(files)), len(files))
    scores = np.concatenate(out) if out else np.zeros(0, dtype=np.float64)
    return names, scores, skipped


def score_inputs(
    score: Callable[[torch.Tensor], np.ndarray],
    paths: str | Path | Iterable[str | Path],
    size: int,
    channels: int,
    batch_size: int = 64,
) -> tuple[np.ndarray, Skipped]:
    """One score per input, in order (`image_entries`): per file given (repeats too), and per
    image-named file under a folder given (sorted); NaN where a file could not be scored.
    Returns the scores and (path, reason) of every path not scored, each once."""
    entries, skipped = image_entries([paths] if isinstance(paths, str | Path) else paths)
    if not entries:
        _no_images()
    bad = {p for p, _ in skipped}
    good = [p for p in dict.fromkeys(entries) if p not in bad]
    names, scores, failed = score_paths(score, good, size, channels, batch_size)
    by_name = dict(zip(names, scores.tolist(), strict=True))
    out = np.array([by_name.get(str(p), np.nan) for p in entries], dtype=np.float64)
    return out, _once(skipped + failed)


def decisions(scores: np.ndarray, threshold: float | None) -> list[int | str]:
    """1 above the threshold, 0 not; "" for every score without a threshold."""
    return ["" if threshold is None else int(s > threshold) for s in scores]


def scores_csv(
    names: Sequence[str], scores: np.ndarray, threshold: float | None, heldout=None
) -> str:
    """The `firmad score` CSV: path, score (6 significant digits), anomaly (`decisions`),
    p_value (against the ``heldout`` normal scores; empty without them)."""
    p_values = conformal_p_values(heldout, scores) if heldout is not None else [None] * len(names)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "score", "anomaly", "p_value"])
    rows = zip(names, scores, decisions(scores, threshold), p_values, strict=True)
    for name, s, d, p in rows:
        writer.writerow((name, f"{s:.6g}", d, "" if p is None else f"{p:.6g}"))
    return buf.getvalue()


def load_folder_images(folder: Path, size: int, channels: int) -> torch.Tensor:
    """Every image under a folder (or the file), squashed to size x size; any unreadable file
    is an error that names it (use `score_paths` / `firmad score` to skip broken files)."""
    files, skipped = find_images([folder])
    warn_skipped(skipped, files)
    return load_files(files, size, channels)
