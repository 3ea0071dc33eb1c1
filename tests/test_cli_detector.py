"""`firmad fit`, `firmad score` and `firmad export` on small folders; ONNX reproduces scores."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

import firmad
from firmad.cli import main
from firmad.data import one_vs_rest
from tests.conftest import FIXTURE_FMNIST
from tests.test_detector import TRAIN


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    split = one_vs_rest("fashion-mnist", 0, root=str(FIXTURE_FMNIST), max_test=40)
    normal, new = root / "normal", root / "new"
    normal.mkdir()
    (new / "deeper").mkdir(parents=True)
    for i, img in enumerate(split.train_images[:80]):
        Image.fromarray(img[0].numpy()).save(normal / f"{i}.png")
    for i, img in enumerate(split.test_images[:12]):
        Image.fromarray(img[0].numpy()).convert("RGB").save(new / "deeper" / f"t{i}.jpg")
    (new / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (new / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def detector_dir(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("det") / "det"
    args = ["-q", "fit", str(folders / "normal"), "--out", str(out)]
    for item in TRAIN:
        args += ["--set", item]
    assert main(args) == 0
    return out


def test_fit_writes_a_calibrated_detector(detector_dir):
    from firmad.detector import OneClassDetector

    det = OneClassDetector.load(detector_dir)
    # auto: max(10 %, 10 / 0.05 images), at most half of the 80
    assert det.threshold_ is not None and det.calibration_["n"] == 40
    assert det.calibration_["n_above"] == 1 and "p <= 0.05" in det.calibration_["rule"]
    # a finished detector folder holds no lock file
    assert sorted(p.name for p in detector_dir.iterdir()) == [
        "detector.json", "plots", "report.json", "report.md", "weights.safetensors",
    ]  # fmt: skip
    # the CLI's detector carries the real parameters of its recipe, not None
    params = det.get_params()
    assert params["recipe"] == "fmnist-cpu" and params["method"] == "firm"
    assert params["epochs"] == 1 and params["size"] == 16
    from firmad import fitting

    assert params["scorer"] == fitting.DEFAULT_SCORER and params["k"] is None  # fit's default
    assert params["variant"] == fitting.DEFAULT_VARIANT
    assert params["target_fpr"] == 0.05 and params["holdout"] == "auto"


def test_score_skips_broken_files(detector_dir, folders, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    assert main(["-q", "score", str(detector_dir), str(folders / "new"), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 12 and all(r["anomaly"] in ("0", "1") for r in rows)
    # the p-value column: as the API gives it, and "anomaly" is p <= the target
    from firmad.detector import OneClassDetector

    det = OneClassDetector.load(detector_dir)
    p = det.p_values([r["path"] for r in rows])
    np.testing.assert_allclose([float(r["p_value"]) for r in rows], p, rtol=1e-5)
    assert [r["anomaly"] for r in rows] == [str(int(v <= 0.05)) for v in p]
    err = capsys.readouterr().err
    # every file found is scored or listed with its reason, the path said once
    assert "broken.png" in err and "notes.txt: not an image file name" in err
    assert "12 scored, 2 skipped" in err
    line = next(x for x in err.splitlines() if "broken.png" in x)
    assert line.count("broken.png") == 1 and "cannot decode" in line
    # nothing readable at all: exit 2 with a message
    assert main(["-q", "score", str(detector_dir), str(folders / "new" / "broken.png")]) == 2


def test_score_a_missing_detector_is_a_clear_error(tmp_path, capsys):
    assert main(["score", str(tmp_path / "none"), str(tmp_path)]) == 2
    assert "not a firmad detector" in capsys.readouterr().err


def test_fit_refuses_a_non_empty_out(folders, tmp_path):
    (tmp_path / "x.txt").write_text("mine")
    assert main(["-q", "fit", str(folders / "normal"), "--out", str(tmp_path)]) == 2
    assert (tmp_path / "x.txt").read_text() == "mine"


def test_onnx_export_reproduces_scores(detector_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from firmad.detector import OneClassDetector

    path = tmp_path / "det.onnx"
    assert main(["-q", "export", str(detector_dir), "--format", "onnx", "--out", str(path)]) == 0
    det = OneClassDetector.load(detector_dir)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, *det.input_shape_), generator=gen, dtype=torch.uint8)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": images.numpy()})
    # the graph computes in float32: relative 1e-5 for large scores (Mahalanobis: hundreds)
    np.testing.assert_allclose(got, det.score_images(images), rtol=1e-5, atol=1e-4)
    # the exporter's stack traces (absolute source paths of this machine) are not shipped
    source_dir = str(Path(firmad.__file__).resolve().parent).encode()
    assert source_dir not in path.read_bytes() and b"stack_trace" not in path.read_bytes()
    assert main(["-q", "export", str(detector_dir), "--format", "tflite", "--out", "x"]) == 2
