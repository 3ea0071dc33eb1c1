"""The ONNX contract: metadata and sidecar JSON, a quiet exporter, and examples/onnx_score.py
reproducing the detector's score on image files."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from firmad.data.sources import load_image
from firmad.export import export_onnx, sidecar_path
from tests.conftest import folder_detector
from tests.test_detector import TRAIN

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "onnx_score.py"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny calibrated detector and its export, with the root logger at INFO as the CLI sets
    it (so the optimiser's INFO lines would show if nothing kept them quiet)."""
    tmp = tmp_path_factory.mktemp("onnx")
    det, split = folder_detector(tmp, TRAIN)  # from folders, as `firmad fit` reads them
    path = tmp / "det.onnx"
    root, handler = logging.getLogger(), _Records()
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        export_onnx(det, path)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return det, path, handler.records, split


def test_the_exporter_is_quiet(exported):
    _, _, records, _ = exported
    noisy = [r.getMessage() for r in records if r.name.startswith(("onnx", "torch.onnx"))]
    assert noisy == []
    assert logging.getLogger("onnx_ir").level == logging.NOTSET  # restored after the export


def test_contract_in_metadata_and_sidecar(exported):
    import onnx

    det, path, _, _ = exported
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar_path(path).name == "det.onnx.json"
    c, h, w = det.input_shape_
    assert sidecar["input"] == {
        "name": "images", "dtype": "uint8", "shape": ["N", c, h, w], "layout": "NCHW",
        "channel_order": "RGB" if c == 3 else "grey", "value_range": [0, 255],
    }  # fmt: skip
    assert sidecar["preprocessing"]["resize"]["filter"] == "bilinear"
    assert sidecar["threshold"] == pytest.approx(det.threshold_)
    assert sidecar["output"]["meaning"] == "anomaly score: higher = more anomalous"
    assert sidecar["scorer"] == {"name": "knn_cos", "params": {"k": 5}, "variant": "plain"}
    assert "minus the mean cosine similarity" in sidecar["output"]["scale"]
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["firmad.contract"]) == sidecar
    assert props["input.resize_filter"] == "bilinear" and props["input.channel_order"] == "RGB"
    assert float(props["threshold"]) == pytest.approx(det.threshold_)
    # the graph's own signature agrees with the contract
    (inp,) = model.graph.input
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]]
    assert dims == [c, h, w]


def test_example_reproduces_the_detector_score_on_files(exported, tmp_path):
    from PIL import Image

    det, path, _, split = exported
    size, channels = det.config_.data.size, det.config_.data.channels
    grey = split.test_images[3][0].numpy()
    files = [tmp_path / "grey.png", tmp_path / "colour.jpg"]
    Image.fromarray(grey).resize((45, 23), Image.Resampling.NEAREST).save(files[0])
    colour = np.stack([grey, 255 - grey, grey // 2], axis=-1)  # odd size: the resize matters
    Image.fromarray(colour).resize((37, 51), Image.Resampling.NEAREST).save(files[1])
    (files[0].parent / "broken.png").write_bytes(b"\x89PNG not really")
    # one process for the files and a folder (recursive, sorted): one row per image
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), str(path), *map(str, files), str(files[0].parent)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    lines = run.stdout.strip().splitlines()
    assert lines[0] == "path,score,anomaly" and "skipped" in run.stderr
    folder = sorted(p for p in files[0].parent.iterdir() if p.name != "broken.png")
    rows = [line.rsplit(",", 2) for line in lines[1:]]
    assert [name for name, _, _ in rows] == [str(f) for f in [*files, *folder]]
    for name, score, decision in rows:
        image = torch.from_numpy(load_image(Path(name), size, channels).copy())
        expected = det.score_images(image[None])[0]  # what `firmad score` gives
        assert float(score) == pytest.approx(expected, abs=1e-4)
        assert decision == str(int(float(score) > det.threshold_))
