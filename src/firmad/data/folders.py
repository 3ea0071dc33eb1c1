"""Image folders (``folder:PATH``) decoded with Pillow and converted to one size and channel
count, and ``.npz`` archives (``npz:PATH``) with ``images`` (NHWC or NCHW) and ``labels``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from firmad.data.files import ImageDataset, unreadable
from firmad.errors import DataError, DataNotFoundError, InputError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


def to_8bit(img):
    """Pillow image in any mode -> an image in 'L', 'RGB' or 'RGBA' (8 bits per channel)."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # 16/32-bit grey: Pillow's own conversion clips at 255, so scale the range instead.
        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max(initial=0)
        if img.mode == "F" and peak <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
        elif img.mode.startswith("I;16") or peak > 255:
            arr = arr / 257.0  # 16-bit range 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))
    if img.mode == "P":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("1", "LA", "La"):
        return img.convert("L")
    if img.mode not in ("L", "RGB", "RGBA"):
        return img.convert("RGB")  # CMYK, YCbCr, HSV, LAB, RGBa, ...
    return img


def pil_array(img, size: int, channels: int) -> np.ndarray:
    """A PIL image as uint8 (channels, size, size); failures raise DataError.

    The image is squashed to size x size (no crop, so no border is lost) with Pillow's bilinear
    filter, which antialiases when shrinking; 16-bit is scaled to 8 bits; alpha is dropped;
    EXIF rotation is applied. Every image file and PIL image firmad reads goes through here.
    """
    from PIL import Image, ImageOps

    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        img = to_8bit(img).convert("L" if channels == 1 else "RGB")
        img = img.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    except Exception as err:  # Pillow raises many kinds of errors on bad data
        raise DataError(f"cannot decode this image ({type(err).__name__}: {err})") from err
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def load_image(path: Path, size: int, channels: int) -> np.ndarray:
    """Decode one image file to uint8 (channels, size, size) as `pil_array` does; failures
    raise DataError naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return pil_array(img, size, channels)
    except DataError as e:
        raise DataError(
            f"{path}: {e}. Remove or replace the file, or rename it if it is not an image."
        ) from e.__cause__
    except Exception as e:  # Pillow raises many kinds of errors on bad files
        raise DataError(
            f"{path}: cannot decode this image ({type(e).__name__}: {e}). "
            "Remove or replace the file, or rename it if it is not an image."
        ) from e


def _folder_error(folder: Path, e: OSError) -> DataError:
    return DataError(
        f"cannot read the folder {folder}: {e.strerror or e}. Make it readable for this user "
        "(e.g. chmod a+rx), or move it out of the dataset."
    )


def _list_dir(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as e:
        raise _folder_error(folder, e) from e


def _image_files(folder: Path) -> list[Path]:
    """Image files under folder, recursively, sorted; hidden files and folders are skipped.

    A folder that cannot be listed is an error: skipping it would silently drop its images.
    """

    def refuse(e: OSError) -> None:
        raise _folder_error(Path(e.filename), e) from e

    files = []
    for root, dirs, names in os.walk(folder, onerror=refuse):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = Path(root) / name
            visible = not name.startswith(".")
            if visible and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                files.append(path)
    return sorted(files)


def _subfolders(folder: Path) -> list[Path]:
    return [p for p in _list_dir(folder) if p.is_dir() and not p.name.startswith(".")]


def _folder_classes(path: Path, subs: list[Path]) -> tuple[list[str], list[tuple[int, Path]]]:
    """(class names, (label, folder) pairs) of an image folder's layout (`read_image_folder`)."""
    names = [p.name for p in subs]
    if "normal" in names:
        extra = [n for n in names if n not in ("normal", "anomalous")]
        if extra:
            raise DataError(
                f"{path}: has normal/ but also {extra}; with normal/ only normal/ and "
                "anomalous/ are allowed. Move those images into anomalous/ or elsewhere."
            )
        return ["normal", "anomalous"], [(0, path / "normal"), (1, path / "anomalous")]
    if subs:
        return names, list(enumerate(subs))
    return [path.name], [(0, path)]


def read_image_folder(path: Path, split: str, size: int = 32, channels: int = 3) -> ImageDataset:
    """Read ``folder:PATH``.

    Layouts: PATH/normal (+ optional PATH/anomalous) gives classes ["normal", "anomalous"] with
    labels 0/1; otherwise each sub-folder of PATH is a class (sorted names -> ids); a folder
    with images and no sub-folders is one class named after it. If PATH holds ``train/`` and
    ``test/``, the split picks one of them; otherwise the same images serve both splits.
    Files with other extensions are skipped; images are searched recursively.
    """
    if channels not in (1, 3):
        raise InputError(f"channels must be 1 or 3, got {channels}")
    if size < 1:
        raise InputError(f"size must be a positive number of pixels, got {size}")
    if not path.is_dir():
        raise DataNotFoundError(
            f"{path}: image folder not found. Give an existing folder: folder:PATH with "
            "PATH/normal (and PATH/anomalous) or one sub-folder per class."
        )
    if (path / "train").is_dir() and (path / "test").is_dir():
        path = path / split
    subs = _subfolders(path)
    classes, groups = _folder_classes(path, subs)
    if subs and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in _list_dir(path) if p.is_file()):
        raise DataError(
            f"{path}: has both loose images and class sub-folders; move the loose images "
            "into a class sub-folder."
        )
    import torch

    images, labels = [], []
    for label, folder in groups:
        files = _image_files(folder) if folder.is_dir() else []
        if not files and (label == 0 or classes != ["normal", "anomalous"]):
            raise DataError(
                f"{folder}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this class "
                "folder. Add images or remove the folder."
            )
        images.extend(load_image(f, size, channels) for f in files)
        labels.extend([label] * len(files))
    return ImageDataset(
        images=torch.from_numpy(np.stack(images)),
        labels=torch.tensor(labels, dtype=torch.int64),
        classes=classes,
        name=f"folder:{path}",
        source=str(path),
    )


# ---------------------------------------------------------------------------------------------
# npz


def _to_nchw(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise DataError(
            f"{where}: images are {images.dtype}, expected uint8 in 0..255. "
            "Convert them, e.g. (x * 255).round().astype(np.uint8)."
        )
    if images.ndim == 3:  # (N, H, W) grey
        return images[:, None]
    if images.ndim == 4:
        if images.shape[1] in (1, 3):
            return images
        if images.shape[3] in (1, 3):
            return images.transpose(0, 3, 1, 2)
    raise DataError(
        f"{where}: images of shape {images.shape}; expected (N, H, W), NCHW or NHWC with 1 or 3 "
        "channels."
    )


def read_npz(path: Path, split: str) -> ImageDataset:
    """Read ``npz:PATH``: keys images (+ labels, classes), or train_images/test_images (+ labels).

    Without train_/test_ keys the same arrays serve both splits. Without labels every image gets
    label 0. Images may be NHWC or NCHW, detected by which axis has 1 or 3 channels.
    """
    import torch

    if not path.is_file():
        raise DataNotFoundError(f"{path}: npz file not found. Give an existing file: npz:PATH.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except Exception as e:
        error = unreadable(path, e) if isinstance(e, OSError) else None
        if error is not None:
            raise error from e
        raise DataError(
            f"{path}: cannot read this .npz ({type(e).__name__}: {e}). Save it with "
            "numpy.savez(path, images=..., labels=...), without object arrays."
        ) from e
    prefix = f"{split}_" if f"{split}_images" in arrays else ""
    if f"{prefix}images" not in arrays:
        raise DataError(
            f"{path}: no 'images' array (keys: {sorted(arrays)}). Save images=uint8 array, "
            "or train_images and test_images."
        )
    images = _to_nchw(arrays[f"{prefix}images"], f"{path}[{prefix}images]")
    if f"{prefix}labels" in arrays:
        labels = np.asarray(arrays[f"{prefix}labels"]).reshape(-1)
    else:
        labels = np.zeros(len(images), dtype=np.int64)
    if len(labels) != len(images):
        raise DataError(
            f"{path}: {len(images)} {prefix}images but {len(labels)} {prefix}labels; "
            "give one label per image."
        )
    # Floats would be truncated (0.7 -> class 0) and NaN cast to a huge negative number.
    if labels.dtype.kind not in "iub":
        raise DataError(
            f"{path}[{prefix}labels]: labels are {labels.dtype}; store integer class ids "
            "(0, 1, 2, ...), e.g. numpy.savez(path, images=..., labels=labels.astype(int))."
        )
    labels = labels.astype(np.int64)
    if len(labels) and labels.min() < 0:
        raise DataError(f"{path}: negative labels; class ids must be 0, 1, 2, ...")
    if "classes" in arrays:
        classes = [str(c) for c in arrays["classes"].reshape(-1)]
    else:
        n = int(labels.max()) + 1 if len(labels) else 1
        classes = [str(i) for i in range(n)]
    if len(labels) and labels.max() >= len(classes):
        raise DataError(f"{path}: label {labels.max()} but only {len(classes)} classes given.")
    return ImageDataset(
        images=torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.from_numpy(labels),
        classes=classes,
        name=f"npz:{path}",
        source=str(path),
    )
