"""Score one image file with an exported firmad detector, as `firmad score` does.

    python examples/onnx_score.py det.onnx photo.jpg     # prints: path,score,anomaly

Needs only onnxruntime, Pillow and numpy. The contract (det.onnx.json, written beside the model
by `firmad export`) says how to feed the graph: RGB (or grey), bilinear resize to H x W, NCHW.
"""

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

model, path = sys.argv[1], sys.argv[2]
with open(model + ".json") as f:
    contract = json.load(f)
c, h, w = contract["input"]["shape"][1:]
image = ImageOps.exif_transpose(Image.open(path))  # as the camera meant it
image = image.convert("RGB" if c == 3 else "L").resize((w, h), Image.Resampling.BILINEAR)
x = np.asarray(image, dtype=np.uint8).reshape(h, w, c).transpose(2, 0, 1)[None]  # 1 x C x H x W
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
score = float(session.run(None, {contract["input"]["name"]: x})[0][0])
threshold = contract["threshold"]  # anomaly when score > threshold (null: no decision)
print(f"{path},{score:.6g},{'' if threshold is None else int(score > threshold)}")
