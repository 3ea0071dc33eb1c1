"""Score image files and folders with an exported firmad detector, as `firmad score` does.

    python examples/onnx_score.py det.onnx photo.jpg incoming/   # prints: path,score,anomaly

One process, one onnxruntime session, batches of 64: a folder of 200 images takes about a
second, not one start-up per file. Folders are read recursively, their files in sorted order;
a file that cannot be decoded is skipped with a line on stderr. Needs only onnxruntime, Pillow
and numpy. The contract (det.onnx.json, written beside the model by `firmad export`) says how to
feed the graph: RGB (or grey), bilinear resize to H x W, NCHW.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
model, paths = sys.argv[1], [Path(p) for p in sys.argv[2:]]
with open(model + ".json") as f:
    contract = json.load(f)
c, h, w = contract["input"]["shape"][1:]
threshold = contract["threshold"]  # anomaly when score > threshold (null: no decision)
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def files(path: Path) -> list[Path]:
    if path.is_dir():  # recursive, sorted, hidden files and folders skipped
        found = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        return [p for p in found if not any(s.startswith(".") for s in p.relative_to(path).parts)]
    return [path]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)  # as the camera meant it
        image = image.convert("RGB" if c == 3 else "L").resize((w, h), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8).reshape(h, w, c).transpose(2, 0, 1)  # C x H x W


def score(batch: list[tuple[Path, np.ndarray]]) -> None:
    x = np.stack([a for _, a in batch])  # N x C x H x W, uint8
    scores = session.run(None, {contract["input"]["name"]: x})[0]
    for (path, _), s in zip(batch, scores, strict=True):
        print(f"{path},{float(s):.6g},{'' if threshold is None else int(s > threshold)}")


print("path,score,anomaly")
batch = []
for path in (f for p in paths for f in files(p)):
    try:
        batch.append((path, pixels(path)))
    except Exception as err:  # Pillow raises many kinds of errors on bad files
        print(f"skipped {path}: {type(err).__name__}: {err}", file=sys.stderr)
    if len(batch) == 64:
        score(batch)
        batch = []
if batch:
    score(batch)
