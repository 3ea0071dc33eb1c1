"""OneClassDetector on the fixture: fit / score / calibrate / predict / save / load / from_run,
score_tensor = decision_function with gradients, refusal of damaged or foreign directories."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from firmad.calibration import max_above
from firmad.config import load_config
from firmad.data import one_vs_rest
from firmad.data.pool import prepare_images
from firmad.detector import NotFittedError, OneClassDetector
from firmad.engine import Engine
from firmad.errors import CheckpointError, ConfigError
from firmad.metrics import evaluate_scores
from firmad.persistence import meta_bytes
from firmad.pipeline import train_run
from tests.conftest import DSVDD_TINY, FIXTURE_FMNIST, TINY

# The fixture recipe without its data keys (a detector is fitted on whatever images it gets).
TRAIN = [o for o in TINY if not o.startswith(("data.root", "data.max_test", "eval."))]
TRAIN += ["train.epochs=1"]


@pytest.fixture(scope="module")
def split():
    return one_vs_rest("fashion-mnist", 0, root=str(FIXTURE_FMNIST), max_test=120)


@pytest.fixture(scope="module")
def fitted(split):
    return OneClassDetector(overrides=TRAIN, scorer="knn_cos", k=5).fit(split.train_images)


def test_sklearn_conventions():
    det = OneClassDetector(method="ntxent", epochs=3)
    assert det.get_params()["method"] == "ntxent" and det.get_params()["epochs"] == 3
    assert det.set_params(k=1) is det and det.k == 1
    assert not hasattr(det, "scorer_")  # __init__ only stores parameters
    with pytest.raises(NotFittedError, match="fit"):
        det.decision_function(np.zeros((2, 28, 28), dtype=np.uint8))
    with pytest.raises(ConfigError, match="unknown parameter"):
        det.set_params(nope=1)
    assert "ntxent" in repr(det)


def test_fit_scores_and_conventions(fitted, split):
    scores = fitted.decision_function(split.test_images)
    assert scores.shape == (len(split.test_images),) and scores.dtype == np.float64
    auroc = evaluate_scores(split.test_labels.numpy(), scores)["auroc"]
    assert auroc > 0.6  # a trained detector separates the classes better than chance
    np.testing.assert_array_equal(fitted.score_samples(split.test_images), -scores)
    # NHWC numpy input and float input in [0, 1] give the same scores as NCHW uint8
    nhwc = split.test_images[:10].permute(0, 2, 3, 1).numpy()
    assert fitted.config_.data.channels == 3
    np.testing.assert_allclose(fitted.decision_function(split.test_images[:10, 0]), scores[:10])
    np.testing.assert_allclose(
        fitted.decision_function(split.test_images[:10].float() / 255), scores[:10], atol=1e-9
    )
    assert nhwc.shape[-1] == 1


def test_calibrate_and_predict(fitted, split):
    with pytest.raises(NotFittedError, match="calibrate"):
        OneClassDetector.__new__(OneClassDetector).predict(split.test_images)
    normals = split.test_images[split.test_labels == 0]
    fitted.calibrate(normals, target_fpr=0.1)
    flagged = fitted.predict(normals)
    assert set(np.unique(flagged)) <= {0, 1}
    # the conformal rule: floor(0.1 x (n + 1)) - 1 of the n calibration images above it
    assert flagged.sum() == max_above(len(normals), 0.1) == fitted.calibration_["n_above"]
    preds = fitted.predict(split.test_images)
    assert preds[split.test_labels.numpy() == 1].mean() > flagged.mean()


@pytest.mark.parametrize(
    "scorer",
    ["knn_cos:k=1", "knn_cos:k=5", "kde", "centre", "mahalanobis", "ocsvm_rbf", "knn_cos_norm",
     "rotation", "maha_rotation"],
)  # fmt: skip
def test_score_tensor_equals_decision_function_and_has_gradients(fitted, split, scorer):
    det = OneClassDetector.from_model(fitted.model_, fitted.config_, scorer=scorer, k=None)
    det.fit_bank(split.train_images)
    images = split.test_images[:12]
    x = (images.float() / 255).requires_grad_()
    t = det.score_tensor(x)
    np.testing.assert_allclose(t.detach().numpy(), det.decision_function(images), atol=1e-5)
    t.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in det.model_.parameters())


def test_angled_variant_and_surrogates(fitted, split):
    det = OneClassDetector.from_model(fitted.model_, fitted.config_, variant="angled")
    det.fit_bank(split.train_images)
    x = (split.test_images[:6].float() / 255).requires_grad_()
    t = det.score_tensor(x)
    np.testing.assert_allclose(t.detach().numpy(), det.decision_function(x.detach()), atol=1e-5)
    for name, fn in det.surrogate_scores().items():
        s = fn(x)
        assert s.shape == (6,) and torch.isfinite(s).all(), name
        (g,) = torch.autograd.grad(s.sum(), x)
        assert g.abs().sum() > 0, name


@pytest.mark.parametrize("bank", ["centre", "crops"])
def test_ensemble_detector_scores_as_the_benchmark(fitted, split, bank):
    """The ensemble detector draws the benchmark's crops and fits the bank it says (with
    ``eval.ensemble_bank=crops``, n_crops crops of every image): same scores both ways."""
    cfg = fitted.config_.model_copy(deep=True)
    cfg.eval.n_crops, cfg.eval.ensemble_bank = 2, bank
    det = OneClassDetector.from_model(fitted.model_, cfg, variant="ensemble")
    det.fit_bank(split.train_images)
    n_bank = det.scorer_.per_angle[0].bank_.shape[0]
    assert n_bank == (2 if bank == "crops" else 1) * len(split.train_images)
    test = prepare_images(split.test_images, cfg.data.size)  # as the benchmark resizes them
    _, details = Engine(cfg).evaluate(
        fitted.model_, split.train_images, test, split.test_labels, ["knn_cos:k=5"], ["ensemble"]
    )
    np.testing.assert_allclose(
        det.decision_function(test), details["scores"]["knn_cos:k=5 (ensemble)"], rtol=1e-5
    )


@pytest.mark.parametrize(("method", "own"), [("dsvdd", "svdd"), ("binary", "logit")])
def test_own_scores_are_differentiable(split, method, own):
    extra = DSVDD_TINY if method == "dsvdd" else [f"method.name={method}"]
    det = OneClassDetector(overrides=TRAIN + extra, scorer="own").fit(split.train_images[:64])
    assert det.scorer_.name == own
    x = (split.test_images[:8].float() / 255).requires_grad_()
    t = det.score_tensor(x)
    np.testing.assert_allclose(
        t.detach().numpy(), det.decision_function(split.test_images[:8]), atol=1e-5
    )
    (g,) = torch.autograd.grad(t.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("scorer", ["rotation", "maha_rotation"])
def test_rotation_scorers_save_load_and_export(fitted, split, tmp_path, scorer):
    """The scorers fitted on every rotation (angled: 4 rotations of every image, one fit) as
    detectors: saved and loaded to the same scores, exported to ONNX with the same scores,
    differentiable."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from firmad.export import export_onnx

    det = OneClassDetector.from_model(
        fitted.model_, fitted.config_, scorer=scorer, k=None, variant="angled"
    ).fit_bank(split.train_images)
    assert [int(s.target_) for s in det.scorer_.per_angle] == [0, 1, 2, 3]
    det.calibrate(split.test_images[split.test_labels == 0], target_fpr=0.1)
    images = split.test_images[:9]
    scores = det.decision_function(images)
    assert np.isfinite(scores).all() and (scorer != "rotation" or (scores >= 0).all())
    det.save(tmp_path / "det")
    loaded = OneClassDetector.load(tmp_path / "det")
    np.testing.assert_allclose(loaded.decision_function(images), scores, rtol=1e-12)
    export_onnx(det, tmp_path / "det.onnx")
    session = ort.InferenceSession(str(tmp_path / "det.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": prepare_images(images, det.size).numpy()})
    np.testing.assert_allclose(got, scores, rtol=1e-5, atol=1e-5)
    x = (images.float() / 255).requires_grad_()
    (g,) = torch.autograd.grad(det.score_tensor(x).sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_save_load_round_trip(fitted, split, tmp_path):
    fitted.calibrate(split.test_images[split.test_labels == 0], target_fpr=0.1)
    fitted.save(tmp_path / "det")
    meta = json.loads((tmp_path / "det" / "detector.json").read_text())
    assert meta["format"] == "firmad-detector-2" and "versions" in meta
    loaded = OneClassDetector.load(tmp_path / "det")
    np.testing.assert_array_equal(
        loaded.decision_function(split.test_images), fitted.decision_function(split.test_images)
    )
    assert loaded.threshold_ == fitted.threshold_
    np.testing.assert_array_equal(
        loaded.predict(split.test_images), fitted.predict(split.test_images)
    )
    # saving over a folder with someone's files is refused
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(Exception, match="not a firmad detector"):
        fitted.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def _saved(fitted, tmp_path):
    path = tmp_path / "det"
    fitted.save(path)
    return path


def test_load_refuses_truncated_weights(fitted, tmp_path):
    path = _saved(fitted, tmp_path)
    weights = path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="weights.safetensors"):
        OneClassDetector.load(path)


def test_load_refuses_flipped_bytes(fitted, tmp_path):
    path = _saved(fitted, tmp_path)
    weights = path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # inside the tensor data: safetensors alone would load it silently
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        OneClassDetector.load(path)


def test_load_refuses_tampered_manifest(fitted, tmp_path):
    path = _saved(fitted, tmp_path)
    meta_path = path / "detector.json"
    meta = json.loads(meta_path.read_text())
    key = next(iter(meta["tensors"]))
    meta["tensors"][key][1] = [1, 2, 3]  # a shape the file does not have
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="checksum"):  # an edit by hand
        OneClassDetector.load(path)
    meta_path.write_bytes(meta_bytes(meta))  # a forger who recomputes the checksum
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        OneClassDetector.load(path)
    meta["tensors"].pop(key)  # a tensor the description does not know
    meta_path.write_bytes(meta_bytes(meta))
    with pytest.raises(CheckpointError, match="unexpected"):
        OneClassDetector.load(path)


def test_load_refuses_pickles_and_other_formats(fitted, tmp_path):
    import pickle

    path = _saved(fitted, tmp_path)
    (path / "extra.bin").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="pickle"):
        OneClassDetector.load(path)
    (path / "extra.bin").unlink()
    # a torch.save file in place of the weights
    torch.save({"x": torch.zeros(1)}, path / "weights.safetensors")
    with pytest.raises(CheckpointError, match="pickle"):
        OneClassDetector.load(path)
    path = _saved(fitted, tmp_path / "b")
    meta = json.loads((path / "detector.json").read_text())
    meta["format"] = "firmad-detector-99"
    (path / "detector.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format"):
        OneClassDetector.load(path)
    with pytest.raises(CheckpointError, match="not a firmad detector"):
        OneClassDetector.load(tmp_path / "nothing")


def test_from_run_matches_the_runs_results(tmp_path):
    run = tmp_path / "run"
    cfg = load_config("fmnist-cpu", [*TINY, "train.epochs=1", "eval.scorers=[knn_cos:k=5]"])
    summary = train_run(cfg, out_dir=run, quiet=True)
    det = OneClassDetector.from_run(run, scorer="knn_cos", k=5)
    split = one_vs_rest("fashion-mnist", 0, root=str(FIXTURE_FMNIST), max_test=200)
    # The benchmark stores test images resized once to the training size as uint8 (as the
    # training pool); given those, the detector's scores are the benchmark's exactly.
    test = prepare_images(split.test_images, cfg.data.size)
    auroc = evaluate_scores(split.test_labels.numpy(), det.decision_function(test))
    assert auroc["auroc"] == pytest.approx(summary["results"]["results"][0]["auroc"], abs=1e-9)


def test_fit_from_a_folder_of_images(tmp_path, split):
    from PIL import Image

    folder = tmp_path / "normals"
    (folder / "sub").mkdir(parents=True)
    for i, img in enumerate(split.train_images[:40]):
        Image.fromarray(img[0].numpy()).save(folder / ("sub" if i % 2 else ".") / f"{i}.png")
    det = OneClassDetector(overrides=TRAIN).fit(folder)
    assert det.input_shape_ == (3, 16, 16)  # read at the recipe's size and channels
    assert det.decision_function(folder).shape == (40,)
    pil = [Image.fromarray(img[0].numpy()) for img in split.test_images[:5]]
    assert det.decision_function(pil).shape == (5,)


def test_rgb_images_train_a_colour_detector():
    gen = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (64, 20, 20, 3), generator=gen, dtype=torch.uint8)
    det = OneClassDetector(overrides=TRAIN).fit(rgb.numpy())  # NHWC
    assert det.input_layout_ == "NHWC"
    x = rgb[:4].float() / 255
    np.testing.assert_allclose(
        det.score_tensor(x).detach().numpy(), det.decision_function(rgb[:4].numpy()), atol=1e-5
    )


def test_pixel_gradients_match_finite_differences(fitted, split):
    """The whole differentiable path (resize, test transform, normalisation, encoder, kNN) in
    float64: autograd's directional derivative equals the numerical one (torch gradcheck)."""
    import copy

    ext = copy.deepcopy(fitted.extractor_).double().eval()
    scorer = copy.deepcopy(fitted.scorer_.per_angle[0]).double()
    # 28 px, resized inside; pixels kept off 0 and 1, where the [0, 1] clamp has a kink that a
    # central difference straddles
    x = (split.test_images[:3].double() / 255 * 0.9 + 0.05).requires_grad_()

    def score(images):
        return scorer(ext(images))

    assert ext(x).dtype == torch.float64
    assert torch.autograd.gradcheck(score, (x,), eps=1e-6, atol=1e-6, fast_mode=True)
