"""Untrusted detector folders, concurrent writers and writes that must not happen: every case
is refused with a clear error, quickly, and nothing the user had is changed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from firmad.cli import main
from firmad.detector import OneClassDetector
from firmad.errors import CheckpointError
from firmad.persistence import meta_bytes
from tests.test_detector import TRAIN, split  # noqa: F401  (module fixture)


@pytest.fixture(scope="module")
def saved(split, tmp_path_factory):  # noqa: F811
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = OneClassDetector(overrides=TRAIN, holdout=0.3).fit(split.train_images)
    return det.save(tmp_path_factory.mktemp("det") / "det")


def _meta(path):
    return json.loads((path / "detector.json").read_text())


def _signed(path, meta):
    """Write the JSON with a recomputed checksum (a forger, or a careful hand edit)."""
    (path / "detector.json").write_bytes(meta_bytes(meta))


def _edit(fn):
    def apply(path):
        meta = _meta(path)
        fn(meta)
        _signed(path, meta)

    return apply


def _replace(name, make):
    def apply(path):
        (path / name).unlink()
        make(path / name)

    return apply


def _threshold_text(text):
    def apply(path):
        _signed(path, {**_meta(path), "threshold": 0.0})
        raw = (
            (path / "detector.json").read_text().replace('"threshold": 0.0', f'"threshold": {text}')
        )
        (path / "detector.json").write_text(raw)

    return apply


def _tensors(fill):
    def apply(path):
        weights = path / "weights.safetensors"
        t = load_file(weights)
        for k in t:
            if k.startswith("scorer."):
                t[k] = torch.full_like(t[k], fill)
        save_file(t, weights)
        meta = _meta(path)
        meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
        _signed(path, meta)

    return apply


def _set(section, key, value):
    def fn(meta):
        if value is _DELETE:
            del meta[section][key]
        elif key is None:
            meta[section] = value
        else:
            meta[section][key] = value

    return _edit(fn)


_DELETE = object()

CASES = {
    "weights -> /dev/zero": (
        _replace("weights.safetensors", lambda p: p.symlink_to("/dev/zero")),
        "regular",
    ),
    "weights a FIFO": (_replace("weights.safetensors", os.mkfifo), "regular"),
    "detector.json a FIFO": (_replace("detector.json", os.mkfifo), "regular"),
    "detector.json -> /dev/zero": (
        _replace("detector.json", lambda p: p.symlink_to("/dev/zero")),
        "regular",
    ),
    "weights a directory": (_replace("weights.safetensors", os.mkdir), "regular"),
    "threshold NaN": (_threshold_text("NaN"), "non-finite"),
    "threshold Infinity": (_threshold_text("Infinity"), "non-finite"),
    "threshold true": (_set("threshold", None, True), "threshold must be a number"),
    "threshold string": (_set("threshold", None, "high"), "threshold must be a number"),
    "threshold list": (_set("threshold", None, [1, 2]), "threshold must be a number"),
    "threshold 5000 digits": (_threshold_text("9" * 5000), "not valid JSON"),
    "threshold 400 digits": (_set("threshold", None, 10**400), "too large"),
    "bank all zero": (_tensors(0.0), "degenerate"),
    "bank NaN": (_tensors(float("nan")), "NaN or infinite"),
    "size 32 -> 8 by hand": (
        lambda p: p.joinpath("detector.json").write_text(
            json.dumps(
                {
                    **_meta(p),
                    "config": {
                        **_meta(p)["config"],
                        "data": {**_meta(p)["config"]["data"], "size": 8},
                    },
                }
            )
        ),
        "checksum",
    ),
    "size 32 -> 8 re-signed": (
        _edit(lambda m: m["config"]["data"].update(size=8)),
        "differs from config data.size",
    ),
    "input.layout XYZ": (_set("input", "layout", "XYZ"), "layout"),
    "input.shape huge": (_set("input", "shape", [3, 100000, 100000]), "input.shape"),
    "input.shape abc": (_set("input", "shape", "abc"), "input.shape"),
    "input without layout": (_set("input", "layout", _DELETE), "lacks"),
    "nesting 100000": (
        lambda p: p.joinpath("detector.json").write_text("[" * 100000 + "]" * 100000),
        "nested too deeply",
    ),
    "manifest entry a string": (
        _edit(lambda m: m["tensors"].update({next(iter(m["tensors"])): "x"})),
        "manifest",
    ),
    "normalisation without mean": (_set("normalisation", "mean", _DELETE), "lacks"),
    "normalisation a string": (_set("normalisation", None, "x"), "normalisation"),
    "params a list": (_set("params", None, [1]), "'params' must be an object"),
    "params bad variant": (_set("params", "variant", "zzz"), "variant"),
    "scorer unknown": (_set("scorer", "name", "nope"), "scorer"),
    "channels 3 vs config 1": (
        _edit(lambda m: m["config"]["data"].update(channels=1)),
        "channels|normalisation",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_untrusted_detector_folders_are_refused(saved, tmp_path, case):
    path = tmp_path / "det"
    shutil.copytree(saved, path)
    change, message = CASES[case]
    change(path)
    tic = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        OneClassDetector.load(path)
    assert time.perf_counter() - tic < 10  # no hang, no reading /dev/zero to the end


@pytest.fixture(scope="module")
def saved_kde(split, tmp_path_factory):  # noqa: F811
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = OneClassDetector(overrides=TRAIN, scorer="kde").fit(split.train_images)
    return det.save(tmp_path_factory.mktemp("kde") / "det")


def _resealed(edit):
    """Change the scorer's tensors, then reseal both checksums (a forger's folder)."""

    def apply(path):
        weights = path / "weights.safetensors"
        t = load_file(weights)
        edit(t)
        save_file(t, weights)
        meta = _meta(path)
        meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
        _signed(path, meta)

    return apply


def _nearly_one_point(t):
    bank = t["scorer.0.bank_"]
    noise = 1e-9 * torch.randn(bank.shape, generator=torch.Generator().manual_seed(0))
    t["scorer.0.bank_"] = (bank[:1] + noise.to(bank.dtype)).contiguous()


def _gamma(value):
    return _resealed(
        lambda t: t.update({"scorer.0.gamma_": torch.full_like(t["scorer.0.gamma_"], value)})
    )


FITTED_CASES = {
    "gamma 0": (_gamma(0.0), "gamma_ must be a finite positive"),
    "gamma -50": (_gamma(-50.0), "gamma_ must be a finite positive"),
    "n_bank 999999": (_edit(lambda m: m["scorer"].update(n_bank=999999)), "n_bank 999999"),
    "bank nearly one point": (_resealed(_nearly_one_point), "degenerate"),
    "weights -> /proc/self/mem": (
        _replace("weights.safetensors", lambda p: p.symlink_to("/proc/self/mem")),
        "weights.safetensors",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(FITTED_CASES))
def test_fitted_values_are_range_checked_on_load(saved_kde, tmp_path, case):
    path = tmp_path / "det"
    shutil.copytree(saved_kde, path)
    OneClassDetector.load(path)  # as saved: fine
    change, message = FITTED_CASES[case]
    change(path)
    with pytest.raises(CheckpointError, match=message):
        OneClassDetector.load(path)


def test_threshold_on_the_command_line(saved, tmp_path, capsys):
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("L", (28, 28), 40).save(image)
    for bad in ("nan", "inf", "-inf", "1e400"):
        assert main(["-q", "score", str(saved), str(image), "--threshold", bad]) == 2
        assert "--threshold must be a finite number" in capsys.readouterr().err


def test_fit_holds_the_folder_lock(split, tmp_path, capsys):  # noqa: F811
    from firmad.run import RunDir

    images = tmp_path / "imgs"
    images.mkdir()
    out = tmp_path / "out"
    run = RunDir(out).lock()  # another `fit` writing there
    try:
        assert main(["-q", "fit", str(images), "--out", str(out)]) == 2
        assert "in use by" in capsys.readouterr().err
    finally:
        run.unlock()
    assert [p.name for p in out.iterdir()] == [".lock"]


def test_score_changes_nothing_when_nothing_was_scored(saved, tmp_path):
    (tmp_path / "EMPTY").mkdir()
    csv = tmp_path / "s.csv"
    csv.write_text("keep\n")
    assert main(["-q", "score", str(saved), str(tmp_path / "EMPTY"), "--out", str(csv)]) == 2
    assert csv.read_text() == "keep\n"
    assert main(["-q", "score", str(saved), str(tmp_path / "EMPTY"), "--out", str(tmp_path)]) == 2
    # nor a detector's own file, even when something can be scored
    meta = (saved / "detector.json").read_bytes()
    out = str(saved / "detector.json")
    assert main(["-q", "score", str(saved), str(saved / "weights.safetensors"), "--out", out]) == 2
    assert (saved / "detector.json").read_bytes() == meta


@pytest.mark.parametrize("target", ["weights.safetensors", "detector.json", "."])
def test_export_never_overwrites_the_detector(saved, tmp_path, target, capsys):
    path = tmp_path / "det"
    shutil.copytree(saved, path)
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    tic = time.perf_counter()
    assert main(["-q", "export", str(path), "--out", str(path / target)]) == 2
    assert time.perf_counter() - tic < 5  # refused before loading or exporting
    assert "folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()} == before
    OneClassDetector.load(path)


def test_fit_refuses_a_read_only_out_before_training(tmp_path, monkeypatch, capsys):
    """(Simulated: file modes do not stop root, so the lock file's creation fails as on a
    read-only file system.)"""
    import errno

    from firmad.training import Trainer

    monkeypatch.setattr(Trainer, "fit", lambda self: pytest.fail("training started"))
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    out = tmp_path / "out"  # beside the folder of images: not inside it
    assert main(["-q", "fit", str(tmp_path / "images"), "--out", str(out)]) == 2
    assert "read-only" in capsys.readouterr().err
    assert not out.exists()
