"""Ordinary input never gives a silently wrong answer: one image is one score, layouts are read
by the channel axis, one preprocessing path for files, PIL images and arrays; every path is
scored or listed with its reason; options are checked before any training."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from firmad.cli import main
from firmad.detector import OneClassDetector
from firmad.errors import ConfigError, InputError
from firmad.inputs import find_images
from tests.test_detector import TRAIN, split  # noqa: F401  (module fixture)


@pytest.fixture(scope="module")
def det(split):  # noqa: F811
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return OneClassDetector(overrides=TRAIN).fit(split.train_images)


@pytest.fixture(scope="module")
def grey(split):  # noqa: F811
    return split.test_images[0, 0].numpy()  # one 28 x 28 uint8 image


def test_one_image_is_one_score(det, grey):
    rgb = np.stack([grey] * 3)
    expected = det.decision_function(rgb[None])  # (1, 3, 28, 28)
    assert det.decision_function(rgb.transpose(1, 2, 0)).shape == (1,)  # H x W x C
    np.testing.assert_allclose(det.decision_function(rgb.transpose(1, 2, 0)), expected)
    assert det.decision_function(grey).shape == (1,)  # H x W
    assert det.decision_function(grey[None]).shape == (1,)  # 1 x H x W
    with pytest.raises(InputError, match="ambiguous"):
        det.decision_function(rgb)  # one RGB image or three grey ones? (layout= says)
    assert det.decision_function(np.stack([grey] * 4)).shape == (4,)  # four grey images
    with pytest.raises(InputError, match="alpha"):
        det.decision_function(np.zeros((28, 28, 4), dtype=np.uint8))


def test_layout_by_the_channel_axis(det, split):  # noqa: F811
    x = split.test_images[:4].repeat(1, 3, 1, 1)  # fitted on NCHW
    np.testing.assert_allclose(
        det.decision_function(x.permute(0, 2, 3, 1).numpy()), det.decision_function(x)
    )
    with pytest.raises(InputError, match="layout="):
        det.decision_function(np.zeros((2, 3, 5, 3), dtype=np.uint8))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        det.score_tensor(x.float())  # 0..255 floats: refused as decision_function does
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        det.decision_function(x.float())


def test_one_preprocessing_path(det, grey, tmp_path):
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(sixteen)
    with Image.open(sixteen) as img:
        assert img.mode.startswith("I")
        in_memory = det.decision_function(img)
    np.testing.assert_allclose(in_memory, det.decision_function(sixteen), atol=1e-9)
    big = Image.fromarray(grey).resize((64, 20))
    both = det.decision_function([Image.fromarray(grey), big])
    # Its own size, in a batch of two or alone: the same float32 score up to rounding (a batch
    # of one takes other kernel blocking; 1 ulp apart at ATEN_CPU_CAPABILITY=default).
    np.testing.assert_allclose(both[1], det.decision_function(big)[0], rtol=1e-6, atol=1e-7)


def test_paths_are_scored_or_listed(det, grey, tmp_path):
    folder = tmp_path / "odd"
    (folder / ".git").mkdir(parents=True)
    Image.fromarray(grey).save(folder / "ok.png")
    Image.fromarray(grey).save(folder / "a.gif")  # first frame
    Image.fromarray(grey).save(folder / ".hidden.png")
    os.mkfifo(folder / "x.png")
    (folder / "z.png").symlink_to("/dev/zero")
    (folder / "loop.png").symlink_to("loop.png")
    (folder / "bad.png").write_bytes(b"\x89PNG junk")
    (folder / "notes.txt").write_text("no image")
    (folder / "empty.png").write_bytes(b"")
    names, scores, skipped = det.score_paths([folder, tmp_path / "missing.png"])
    assert [os.path.basename(n) for n in names] == ["a.gif", "ok.png"]
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-9)  # the GIF is the same image
    why = {p.name: reason for p, reason in skipped}
    assert why == {
        ".git": "hidden folder, not searched",
        ".hidden.png": "hidden file",
        "x.png": "not a regular file (a device, pipe or socket)",
        "z.png": "not a regular file (a device, pipe or socket)",
        "loop.png": why["loop.png"],
        "bad.png": why["bad.png"],
        "notes.txt": why["notes.txt"],
        "empty.png": "an empty file",
        "missing.png": "no such file or folder",
    }
    assert "link" in why["loop.png"] and "cannot decode" in why["bad.png"]
    assert "bad.png" not in why["bad.png"]  # the path is said once, on the skip line
    assert "BytesIO" not in why["bad.png"]
    # the API: one score per image-named file of the folder, sorted, NaN where none
    with pytest.warns(UserWarning, match="not scored"):
        got = det.decision_function(folder)
    names = ["a.gif", "bad.png", "empty.png", "loop.png", "ok.png", "x.png", "z.png"]
    expected = [scores[0] if n in ("a.gif", "ok.png") else np.nan for n in names]
    np.testing.assert_array_equal(got, expected)
    assert det.decision_function([folder / "ok.png", str(folder / "a.gif")]).shape == (2,)
    assert det.decision_function(Image.fromarray(grey)).shape == (1,)


def test_answers_stay_aligned_with_the_paths_given(det, grey, tmp_path):
    """One answer per path given, in order: repeats answered, unreadable and missing files NaN
    (or an error, unreadable="raise"), never a shorter array."""
    a, b, bad = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "bad.png"
    Image.fromarray(grey).save(a)
    Image.fromarray(255 - grey).save(b)
    bad.write_bytes(b"\x89PNG junk")
    paths = [a, a, bad, tmp_path / "missing.png", b]
    with pytest.warns(UserWarning, match="2 path\\(s\\) not scored"):
        scores = det.decision_function(paths)
        flags = det.predict(paths)
        p = det.p_values(paths)
    alone = det.decision_function([a, b])  # (scored in one batch, as the rest)
    np.testing.assert_array_equal(scores, [alone[0], alone[0], np.nan, np.nan, alone[1]])
    assert flags.shape == p.shape == (5,) and np.isnan(flags[2:4]).all() and np.isnan(p[2:4]).all()
    np.testing.assert_array_equal(flags[[0, 1, 4]], (scores[[0, 1, 4]] > det.threshold_))
    strict = OneClassDetector.load(_saved(det, tmp_path)).set_params(unreadable="raise")
    with pytest.raises(InputError, match="bad.png"):
        strict.decision_function(paths)
    np.testing.assert_array_equal(strict.decision_function([a, b]), alone)


def _saved(det, tmp_path):
    det.save(tmp_path / "det")
    return tmp_path / "det"


def test_a_file_reached_twice_is_listed_once(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"junk")
    (tmp_path / "notes.txt").write_text("x")
    files, skipped = find_images([tmp_path, tmp_path / "bad.png", tmp_path / "notes.txt"])
    assert files == [tmp_path / "bad.png"]  # read (and reported) once when it fails
    assert [p.name for p, _ in skipped] == ["notes.txt"]


def test_float_images_with_nan_pixels_are_refused(det, tmp_path):
    nan = tmp_path / "nan.tif"
    Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32)).save(nan)
    names, _, skipped = det.score_paths([nan])
    assert names == [] and "NaN" in skipped[0][1]
    with pytest.raises(ValueError, match="NaN"):  # a DataError, also a ValueError
        det.decision_function(Image.open(nan))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        det.decision_function(np.full((2, 1, 8, 8), np.nan, dtype=np.float32))


def test_arrays_of_any_byte_order_and_odd_dtypes(det, split):  # noqa: F811
    x = (split.test_images[:3].numpy() / 255).astype(np.float32)
    np.testing.assert_array_equal(det.decision_function(x.astype(">f4")), det.decision_function(x))
    with pytest.raises(InputError, match="uint8, or float"):
        det.decision_function(np.zeros((2, 1, 8, 8), dtype=np.complex64))
    with pytest.raises(InputError, match="uint8, or float"):
        det.decision_function(np.array([["a"]]))


def test_layout_reads_the_ambiguous_shapes(det, grey):
    three = np.stack([grey, 255 - grey, grey // 2])  # 3 x 28 x 28
    with pytest.raises(InputError, match="layout='NHW'"):
        det.decision_function(three)
    as_grey = det.decision_function(three, layout="NHW")
    assert as_grey.shape == (3,)
    np.testing.assert_allclose(as_grey[1], det.decision_function(255 - grey)[0])
    assert det.decision_function(three, layout="CHW").shape == (1,)
    with pytest.raises(InputError, match="does not fit"):
        det.decision_function(three, layout="NCHW")
    with pytest.raises(InputError, match="channels"):
        det.decision_function(np.zeros((28, 28, 5), dtype=np.uint8), layout="HWC")


def test_files_found_are_sorted_and_given_files_keep_their_order(tmp_path):
    for name in ("b.png", "a.png"):
        Image.new("L", (4, 4)).save(tmp_path / name)
    files, _ = find_images([tmp_path / "b.png", tmp_path, tmp_path / "a.png"])
    assert [f.name for f in files] == ["b.png", "a.png"]  # each once, first mention


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"scorer": "knn_coss"}, "unknown scorer"),
        ({"scorer": "knn_cos:k=1000"}, "k=1000"),
        ({"variant": "zzz"}, "variant"),
        ({"target_fpr": 1.5}, "target_fpr"),
        ({"target_fpr": float("nan")}, "target_fpr"),
        ({"contamination": 0.0}, "contamination"),
        ({"holdout": 1.0}, "holdout"),
        ({"overrides": [*TRAIN, "method.tau=.inf"]}, "method.tau"),
        ({"overrides": [*TRAIN, "train.batch_size=4096"]}, "do not fill one batch"),
    ],
)
def test_fit_checks_everything_before_training(split, monkeypatch, params, message):  # noqa: F811
    from firmad.training import Trainer

    def no_training(self):
        raise AssertionError("training started")

    monkeypatch.setattr(Trainer, "fit", no_training)
    kwargs = {"overrides": TRAIN, **params}
    with pytest.raises((ConfigError, InputError), match=message):
        OneClassDetector(**kwargs).fit(split.train_images)


def test_cli_fit_refuses_before_training(tmp_path, capsys, grey, monkeypatch):
    from firmad.training import Trainer

    monkeypatch.setattr(Trainer, "fit", lambda self: (_ for _ in ()).throw(AssertionError))
    one = tmp_path / "one"
    one.mkdir()
    Image.fromarray(grey).save(one / "a.png")
    out = tmp_path / "out"
    assert main(["-q", "fit", str(one), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 image(s) for training" in err and "do not fill one batch" in err
    assert not out.exists()  # nothing left behind
    (tmp_path / "empty").write_bytes(b"")
    assert main(["-q", "fit", str(one), "--out", str(tmp_path / "empty")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    for bad in (["--scorer", "knn_coss"], ["--variant", "zzz"], ["--target-fpr", "nan"]):
        assert main(["-q", "fit", str(one), "--out", str(out), *bad]) == 2
    assert not out.exists()


def test_cli_help_names_the_real_flags_and_columns(capsys):
    assert main(["fit", "--help"]) == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--epochs", "--device", "--seed"))
    from firmad import fitting  # the help's defaults are the ones `fit` uses

    text = " ".join(text.split())
    assert f"default {fitting.DEFAULT_STEPS};" in text
    assert f"(default: {fitting.DEFAULT_SCORER})" in text
    assert f"(default: {fitting.DEFAULT_VARIANT})" in text
    assert main(["score", "--help"]) == 0
    assert "anomaly" in capsys.readouterr().out


def test_single_image_tensor_layout_in_fit_params(det):
    assert det.input_layout_ == "NCHW" and isinstance(repr(det), str)
    x = torch.rand(2, 20, 20, 3)
    np.testing.assert_allclose(
        det.score_tensor(x).detach().numpy(),
        det.score_tensor(x.permute(0, 3, 1, 2)).detach().numpy(),
        atol=1e-6,
    )


def test_fit_says_the_size_and_warns_about_far_from_square_images(tmp_path, capsys):
    from firmad.fitting import far_from_square, fit_images

    for i, size in enumerate([(28, 28), (60, 20), (20, 29), (10, 40)]):
        Image.new("L", size, 30 * i).save(tmp_path / f"{i}.png")
    files = sorted(tmp_path.glob("*.png"))
    assert far_from_square(files) == 2  # 3:1 and 1:4; 20 x 29 is within 3:2
    images = fit_images(tmp_path, OneClassDetector(size=16))
    assert tuple(images.shape) == (4, 3, 16, 16)
    captured = capsys.readouterr()
    assert "squashed to 16 x 16 pixels" in captured.out
    assert "2 image(s) have an aspect ratio beyond 3:2" in captured.err
