"""Dataset readers and the search for dataset files.

Readers, one per official format, all returning an `ImageDataset` of uint8 (N, C, H, W) images:

- IDX (MNIST, Fashion-MNIST), gzipped or raw, with magic numbers, dims and counts checked.
- CIFAR-10 / CIFAR-100 "python version", from the ``.tar.gz`` archive (members read in place) or
  its extracted folder. The batches are pickles: they go through `RestrictedUnpickler`, which
  admits only what numpy needs to rebuild an array, so a hostile file cannot run code.
- Image folders (``folder:PATH``) decoded with Pillow and converted to one size and channel count.
- ``.npz`` archives (``npz:PATH``) with ``images`` (NHWC or NCHW) and ``labels``.

Builtin datasets are looked for in: an explicit root; ``$FIRMAD_DATA`` and its sub-folder named
after the dataset; /usr/share/datasets/fashion-mnist (Fashion-MNIST only), ~/.cache/firmad/NAME,
./data/NAME; and finally, with ``download=True``, torchvision downloads into ~/.cache/firmad/NAME.
Nothing is written to disk except downloads.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import gzip
import io
import math
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from firmad.errors import DataError, DataNotFoundError, InputError

if TYPE_CHECKING:  # torch is imported where images are made: `firmad data list` needs none
    import torch

DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar10", "cifar100", "cifar100-coarse")
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MNIST_CLASSES = [str(d) for d in range(10)]

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

CACHE_DIR = Path("~/.cache/firmad")
SYSTEM_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
HOW_TO_GET = (
    "Get it with `firmad data prepare {name} --download` (needs internet), "
    "or pass the folder holding the files with --root (root=...) or $FIRMAD_DATA"
)
HOW_TO_GET_FMNIST = "; on Debian/Ubuntu `apt-get install dataset-fashion-mnist` installs it"


@dataclass
class ImageDataset:
    """Images in memory: uint8 (N, C, H, W), int64 labels (N,), class names, origin."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str
    source: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])


# ---------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)


def _unreadable(path: Path, e: OSError) -> DataError | None:
    """A DataError for a file the system refuses to read (permissions, I/O), else None.

    Errors from the operating system carry an errno; format errors from gzip, tarfile or zlib
    (also OSError subclasses) do not, and mean a damaged file instead.
    """
    if isinstance(e, PermissionError):
        return DataError(
            f"cannot read {path}: permission denied. Make it readable for this user "
            "(e.g. chmod a+r), or copy the data somewhere you can read it."
        )
    if e.errno is not None and not isinstance(e, FileNotFoundError):
        return DataError(f"cannot read {path}: {e.strerror or e}. Check the disk and the path.")
    return None


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when the name ends in .gz; damaged files raise DataError."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found. Check the path or re-download the data.") from e
    except OSError as e:
        # Permission denied is not damage: do not advise deleting a good file.
        error = _unreadable(path, e)
        if error is not None:
            raise error from e
        raise DataError(
            f"{path}: cannot read the file ({e}); it is probably truncated or corrupt. "
            "Delete it and download it again."
        ) from e
    except (EOFError, zlib.error) as e:
        raise DataError(
            f"{path}: cannot read the file ({e}); it is probably truncated or corrupt. "
            "Delete it and download it again."
        ) from e


# The largest IDX file read: a header declaring more (or a .gz expanding to more) is refused
# before its data is decompressed. MNIST's largest file holds 47 MB.
MAX_IDX_BYTES = 1 << 30


def _damaged(path: Path, e: Exception) -> DataError:
    return DataError(
        f"{path}: cannot read the file ({e}); it is probably truncated or corrupt. "
        "Delete it and download it again."
    )


@contextlib.contextmanager
def _opened(path: Path):
    """The file (gunzipped as it is read when the name ends in .gz); errors as DataError."""
    try:
        if not path.is_file():
            kind = "not a regular file" if path.exists() else "file not found"
            raise DataError(f"{path}: {kind}. Check the path or re-download the data.")
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            yield f
    except OSError as e:
        # Permission denied is not damage: do not advise deleting a good file.
        raise (_unreadable(path, e) or _damaged(path, e)) from e
    except (EOFError, zlib.error) as e:
        raise _damaged(path, e) from e


def read_idx(path: str | Path, expect_magic: int) -> np.ndarray:
    """Read one IDX file (raw or .gz) of unsigned bytes; check magic number, dims and size.

    The header is checked first and the data read as a stream, no more than the header
    declares (at most MAX_IDX_BYTES): a small .gz that expands to gigabytes is refused
    after reading one byte past the declared size."""
    path = Path(path)
    kind = "images" if expect_magic == IDX_IMAGES_MAGIC else "labels"
    ndim = expect_magic - 2048
    header = 4 + 4 * ndim
    with _opened(path) as f:
        head = f.read(header)
        if len(head) < header:
            raise DataError(
                f"{path}: only {len(head)} bytes, too short for an IDX {kind} file header."
            )
        magic = int.from_bytes(head[:4], "big")
        if magic != expect_magic:
            raise DataError(
                f"{path}: wrong IDX magic number {magic}, expected {expect_magic} for {kind}. "
                "Is it the right file (images vs labels), and not damaged? Re-download it."
            )
        dims = [int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
        size = math.prod(dims)
        if size > MAX_IDX_BYTES:
            raise DataError(
                f"{path}: its header declares {dims} = {size} bytes, more than the "
                f"{MAX_IDX_BYTES >> 20} MiB an IDX file may hold here; the file is damaged or "
                "not a dataset file. Re-download it."
            )
        data = f.read(size)
        extra = len(f.read(1))  # one byte past the declared end: more data is damage too
    if len(data) != size or extra:
        held = f"{header + len(data)} bytes" if not extra else "more bytes"
        raise DataError(
            f"{path}: holds {held} but its header {dims} needs {header + size}; "
            "the file is truncated or corrupt. Delete it and download it again."
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array (N,) labels or (N, H, W) images as IDX; gzipped if path ends in .gz.

    The gzip header carries no time stamp, so the same array always gives the same bytes.
    """
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if array.ndim not in (1, 3):
        raise InputError(f"write_idx: expected (N,) or (N, H, W), got shape {array.shape}")
    magic = 2048 + array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    if path.suffix == ".gz":
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _idx_file(folder: Path, prefix: str, kind: str) -> Path | None:
    """The IDX file for prefix 'train'/'t10k' and kind 'images'/'labels', raw preferred."""
    ndim = 3 if kind == "images" else 1
    for stem in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
        for suffix in ("", ".gz"):
            candidate = folder / (stem + suffix)
            if candidate.is_file():
                return candidate
    return None


def read_idx_split(
    folder: Path, split: str, n_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Images (N, 1, H, W) and labels (N,) of one split of an MNIST-style folder.

    With ``n_classes``, labels must lie in 0..n_classes-1 (a label out of range would otherwise
    be a class of its own or break the class names later).
    """
    prefix = "train" if split == "train" else "t10k"
    images_path = _idx_file(folder, prefix, "images")
    labels_path = _idx_file(folder, prefix, "labels")
    for path, kind in ((images_path, "images"), (labels_path, "labels")):
        if path is None:
            raise DataError(
                f"{folder}: no {prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte(.gz) file "
                f"for the {split} split. Put all four IDX files in this folder."
            )
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
            "labels; the files do not belong together. Re-download both."
        )
    if n_classes is not None and len(labels) and int(labels.max()) >= n_classes:
        raise DataError(
            f"{labels_path}: label {int(labels.max())} is out of range: this dataset has "
            f"{n_classes} classes (labels 0..{n_classes - 1}). The file is damaged or belongs "
            "to another dataset; re-download it."
        )
    return images[:, None], labels, str(images_path)


# ---------------------------------------------------------------------------------------------
# CIFAR (restricted unpickling)


def _reconstruct_function() -> Callable:
    """numpy's array rebuilding function (moved to numpy._core in numpy 2)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Stand-in for `_codecs.encode`: Python 3 protocol-2 pickles store bytes as latin-1 text."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds plain containers and numpy arrays.

    CIFAR batches are dicts of bytes, str, ints, lists and one uint8 ndarray. Building the array
    needs numpy's `_reconstruct`, `ndarray` and `dtype`; pickles written by Python 3 at protocol 2
    also store bytes through `_codecs.encode(text, "latin1")`, admitted for latin-1 only. Any other
    global (os.system, builtins.eval, ...) is refused before it can be called.
    """

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _reconstruct_function()
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def load_pickle(data: bytes, where: str) -> dict:
    """Unpickle one CIFAR batch (bytes keys, like the official loader's encoding="bytes")."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any failure of an untrusted pickle is a data problem
        raise DataError(
            f"{where}: not a valid CIFAR batch pickle ({e}). Only the official CIFAR "
            "'python version' files are accepted; re-download them."
        ) from e
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a dict in the pickle, found {type(obj).__name__}.")
    return obj


CIFAR_LAYOUT = {
    # storage name: (archive, folder, train members, test member, meta member)
    "cifar10": (
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "batches.meta",
    ),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ["train"], "test", "meta"),
}


def _read_cifar_members(source: Path, folder_name: str, members: list[str]) -> dict[str, bytes]:
    """Bytes of the named batch files, from an extracted folder or straight from the tarball."""
    if source.is_dir():
        return {m: _read_bytes(source / m) for m in members}
    wanted = {f"{folder_name}/{m}": m for m in members}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(source, "r:*") as tar:
            for info in tar:  # one pass, no extraction
                if info.name in wanted and info.isfile():
                    found[wanted[info.name]] = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        error = _unreadable(source, e) if isinstance(e, OSError) else None
        if error is not None:
            raise error from e
        raise DataError(
            f"{source}: cannot read the archive ({e}); it is probably truncated or corrupt. "
            "Delete it and download it again."
        ) from e
    missing = [f"{folder_name}/{m}" for m in members if m not in found]
    if missing:
        raise DataError(
            f"{source}: archive lacks {', '.join(missing)}. Is it the official CIFAR "
            "'python version' archive? Re-download it."
        )
    return found


def _batch_field(batch: dict, key: bytes, where: str):
    if key not in batch:
        raise DataError(f"{where}: batch has no {key!r} entry; not an official CIFAR batch file.")
    return batch[key]


def _names(meta: dict, key: bytes, where: str) -> list[str]:
    names = _batch_field(meta, key, where)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def read_cifar_split(source: Path, storage: str, split: str, coarse: bool = False):
    """Images (N, 3, 32, 32), labels (N,) and class names of one CIFAR split."""
    _, folder_name, train_members, test_member, meta_member = CIFAR_LAYOUT[storage]
    members = (train_members if split == "train" else [test_member]) + [meta_member]
    files = _read_cifar_members(source, folder_name, members)
    where_meta = f"{source}/{meta_member}" if source.is_dir() else f"{source}:{meta_member}"
    meta = load_pickle(files[meta_member], where_meta)
    if storage == "cifar10":
        label_key, names_key = b"labels", b"label_names"
    elif coarse:
        label_key, names_key = b"coarse_labels", b"coarse_label_names"
    else:
        label_key, names_key = b"fine_labels", b"fine_label_names"
    classes = _names(meta, names_key, where_meta)
    images, labels = [], []
    for member in members[:-1]:
        where = f"{source}/{member}" if source.is_dir() else f"{source}:{member}"
        batch = load_pickle(files[member], where)
        data = _batch_field(batch, b"data", where)
        lab = np.asarray(_batch_field(batch, label_key, where))
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
            raise DataError(f"{where}: 'data' must be a uint8 array (N, 3072).")
        if data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{where}: 'data' rows have {data.shape[1]} values, expected 3072.")
        if len(lab) != len(data):
            raise DataError(
                f"{where}: {len(data)} images but {len(lab)} labels; the file is damaged. "
                "Re-download it."
            )
        if len(lab) and (lab.min() < 0 or lab.max() >= len(classes)):
            raise DataError(f"{where}: labels outside 0..{len(classes) - 1}; file is damaged.")
        images.append(data.reshape(-1, 3, 32, 32))  # rows are R plane, G plane, B plane
        labels.append(lab.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels), classes


# ---------------------------------------------------------------------------------------------
# Image folders


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
        error = _unreadable(path, e) if isinstance(e, OSError) else None
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


# ---------------------------------------------------------------------------------------------
# Locating, downloading, loading builtin datasets


def _storage_name(name: str) -> str:
    """Folder name for a builtin dataset's files (cifar100-coarse shares cifar100's files)."""
    return "cifar100" if name == "cifar100-coarse" else name


def _check_builtin(name: str) -> None:
    if name not in DATASETS:
        raise DataError(
            f"unknown dataset {name!r}. Use one of {', '.join(DATASETS)}, "
            "folder:PATH (an image folder) or npz:PATH (a .npz file)."
        )


def _find_files(name: str, base: Path) -> Path | None:
    """The folder (or CIFAR archive) with the dataset's files at or just below base."""
    storage = _storage_name(name)
    if storage in ("fashion-mnist", "mnist"):
        torchvision_dir = "FashionMNIST" if storage == "fashion-mnist" else "MNIST"
        for folder in (base, base / torchvision_dir / "raw"):
            if _idx_file(folder, "train", "images") or _idx_file(folder, "t10k", "images"):
                return folder
        return None
    archive, folder_name, train_members, _, meta = CIFAR_LAYOUT[storage]
    if base.is_file() and base.name.endswith((".tar.gz", ".tgz", ".tar")):
        return base
    for folder in (base, base / folder_name):
        if (folder / meta).is_file() and (folder / train_members[0]).is_file():
            return folder
    return base / archive if (base / archive).is_file() else None


def searched_places(name: str, root: str | Path | None = None) -> list[Path]:
    """Every place `locate` looks in, in order. With an explicit root, only that root."""
    _check_builtin(name)
    storage = _storage_name(name)
    if root is not None:
        root = Path(root).expanduser()
        return [root, root / storage]
    places = []
    env = os.environ.get("FIRMAD_DATA")
    if env:
        places += [Path(env).expanduser(), Path(env).expanduser() / storage]
    if storage in SYSTEM_DIRS:
        places.append(SYSTEM_DIRS[storage])
    places += [(CACHE_DIR / storage).expanduser(), Path("data") / storage]
    return places


def locate(name: str, root: str | Path | None = None) -> Path | None:
    """Where a builtin dataset's files are (a folder, or a CIFAR archive), or None."""
    for place in searched_places(name, root):
        found = _find_files(name, place)
        if found is not None:
            return found
    return None


def _not_found_message(name: str, root: str | Path | None) -> str:
    places = "\n".join(f"  {p}" for p in searched_places(name, root))
    how = HOW_TO_GET.format(name=name)
    if _storage_name(name) == "fashion-mnist":
        how += HOW_TO_GET_FMNIST
    return f"dataset {name!r} not found. Searched:\n{places}\n{how}."


def _download(name: str, dest: Path) -> None:
    """Download the official files with torchvision (md5-checked) into dest."""
    from torchvision import datasets
    from torchvision.datasets.utils import download_and_extract_archive

    storage = _storage_name(name)
    dest.mkdir(parents=True, exist_ok=True)
    if storage in ("fashion-mnist", "mnist"):
        cls = datasets.FashionMNIST if storage == "fashion-mnist" else datasets.MNIST
        for train in (True, False):  # files land in dest/<Class>/raw
            cls(root=str(dest), train=train, download=True)
    else:
        cls = datasets.CIFAR10 if storage == "cifar10" else datasets.CIFAR100
        download_and_extract_archive(cls.url, str(dest), filename=cls.filename, md5=cls.tgz_md5)


def prepare(name: str, root: str | Path | None = None, download: bool = True) -> Path:
    """Find a builtin dataset, downloading it into root (or ~/.cache/firmad/NAME) if allowed.

    Returns the folder (or CIFAR archive) holding the files; raises DataNotFoundError otherwise.
    """
    found = locate(name, root)
    if found is not None:
        return found
    if download:
        base = Path(root).expanduser() if root is not None else CACHE_DIR.expanduser()
        dest = base if root is not None else base / _storage_name(name)
        try:
            _download(name, dest)
        except Exception as e:  # network, disk, checksum: all end the same way for the user
            raise DataNotFoundError(
                f"downloading {name!r} into {dest} failed ({type(e).__name__}: {e}). "
                "Check the internet connection, or get the files another way and pass --root."
            ) from e
        found = _find_files(name, dest)
        if found is not None:
            return found
    raise DataNotFoundError(_not_found_message(name, root))


@functools.lru_cache(maxsize=4)  # e.g. train + test of two datasets
def _read_builtin(name: str, split: str, path: str, mtime_ns: int):
    """Numpy images, labels, classes and source file of a builtin split (cached per process)."""
    storage = _storage_name(name)
    source = Path(path)
    if storage in ("fashion-mnist", "mnist"):
        classes = FASHION_MNIST_CLASSES if storage == "fashion-mnist" else MNIST_CLASSES
        images, labels, where = read_idx_split(source, split, len(classes))
        return images, labels.astype(np.int64), list(classes), where
    images, labels, classes = read_cifar_split(source, storage, split, name == "cifar100-coarse")
    return images, labels, classes, str(source)


def load_dataset(
    name: str,
    split: str = "train",
    root: str | Path | None = None,
    download: bool = False,
    *,
    size: int = 32,
    channels: int = 3,
) -> ImageDataset:
    """Load one split ("train" or "test") of a dataset as uint8 (N, C, H, W) images.

    name: fashion-mnist, mnist, cifar10, cifar100, cifar100-coarse (the 20 superclasses),
    folder:PATH or npz:PATH. root: where the files are (builtin datasets only; see `locate`).
    download: fetch a builtin dataset that is not found. size, channels: output size and
    channel count (1 or 3) for image folders only; other sources keep their own images.
    """
    import torch

    if split not in SPLITS:
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    if name.startswith("folder:"):
        return read_image_folder(Path(name[7:]).expanduser(), split, size, channels)
    if name.startswith("npz:"):
        return read_npz(Path(name[4:]).expanduser(), split)
    _check_builtin(name)
    found = prepare(name, root, download=download)
    images, labels, classes, source = _read_builtin(name, split, *_cache_key(found))
    # Copies, so callers may modify their tensors without touching the cache.
    return ImageDataset(
        images=torch.from_numpy(images.copy()),
        labels=torch.from_numpy(labels.copy()),
        classes=list(classes),
        name=name,
        source=source,
    )


def _cache_key(found: Path) -> tuple[str, int]:
    """The resolved path and newest modification time: any change to the files (or the
    folder) gives a new key of the reader's cache."""
    stamp = max(p.stat().st_mtime_ns for p in [found, *(found.iterdir() if found.is_dir() else [])])
    return str(found.resolve()), stamp


def _idx_labels(folder: Path, split: str, n_classes: int) -> np.ndarray:
    """The labels of an IDX split without decoding its images: only the images file's header
    is read, to check that it holds as many images as there are labels."""
    prefix = "train" if split == "train" else "t10k"
    paths = {kind: _idx_file(folder, prefix, kind) for kind in ("images", "labels")}
    for kind, path in paths.items():
        if path is None:
            raise DataError(
                f"{folder}: no {prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte(.gz) file "
                f"for the {split} split. Put all four IDX files in this folder."
            )
    labels = read_idx(paths["labels"], IDX_LABELS_MAGIC)
    with _opened(paths["images"]) as f:
        head = f.read(16)
    n_images = int.from_bytes(head[4:8], "big") if len(head) == 16 else -1
    if int.from_bytes(head[:4], "big") != IDX_IMAGES_MAGIC or n_images != len(labels):
        raise DataError(
            f"{paths['images']} does not hold {len(labels)} images as {paths['labels']} has "
            "labels; the files do not belong together or are damaged. Re-download both."
        )
    if len(labels) and int(labels.max()) >= n_classes:
        raise DataError(
            f"{paths['labels']}: label {int(labels.max())} is out of range: this dataset has "
            f"{n_classes} classes (labels 0..{n_classes - 1}). The file is damaged or belongs "
            "to another dataset; re-download it."
        )
    return labels.astype(np.int64)


def split_labels(
    name: str, split: str, root: str | Path | None = None, download: bool = False
) -> tuple[np.ndarray, list[str]]:
    """The labels (N,) and class names of one split; for IDX datasets only the labels file is
    decoded (what `firmad data show` needs, in a fraction of a second)."""
    if split not in SPLITS:
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    storage = _storage_name(name) if name in DATASETS else None
    if storage in ("fashion-mnist", "mnist"):
        classes = FASHION_MNIST_CLASSES if storage == "fashion-mnist" else MNIST_CLASSES
        found = prepare(name, root, download=download)
        return _idx_labels(found, split, len(classes)), list(classes)
    data = load_dataset(name, split, root, download)
    return data.labels.numpy(), list(data.classes)


def describe(name: str, root: str | Path | None = None, download: bool = False) -> list[dict]:
    """Per class: class_id, name, n_train_normal, n_test, n_test_normal, n_test_anomalies.

    The counts are those of `one_vs_rest` with that class as the normal one.
    """
    train, classes = split_labels(name, "train", root, download)
    test, test_classes = split_labels(name, "test", root, download)
    n_classes = len(classes)
    train_counts = np.bincount(train, minlength=n_classes)
    test_counts = np.bincount(test, minlength=n_classes)
    return [
        {
            "class_id": i,
            "name": c,
            "n_train_normal": int(train_counts[i]),
            "n_test": len(test),
            "n_test_normal": int(test_counts[i]),
            "n_test_anomalies": len(test) - int(test_counts[i]),
        }
        for i, c in enumerate(classes)
    ]
