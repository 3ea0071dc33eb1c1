"""The reports `firmad fit` and `firmad score` write: score scale in words, held-out histogram with
the threshold, gallery of the most anomalous and most normal images."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch

from firmad.cli import main
from firmad.data import one_vs_rest
from firmad.detector import OneClassDetector
from firmad.errors import InputError
from firmad.report_detector import Scored, gallery_order, write_fit_report, write_score_report
from firmad.scoring import ANGLES
from firmad.scoring.scales import scale_sentence, score_scale
from firmad.scoring.scorers import SCORERS, build_scorer
from tests.conftest import FIXTURE_FMNIST
from tests.test_detector import TRAIN

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def split():
    return one_vs_rest("fashion-mnist", 0, root=str(FIXTURE_FMNIST), max_test=40)


@pytest.fixture(scope="module")
def fitted(split):
    det = OneClassDetector(overrides=TRAIN, scorer="knn_cos", k=5)
    det.fit(split.train_images[:64])
    return det.calibrate(split.train_images[64:84], target_fpr=0.1)


def _table_row(text: str) -> list[float]:
    """The numbers of the summary table (n, min, 5 %, median, 95 %, max)."""
    line = next(ln for ln in text.splitlines() if re.match(r"^\| \d+ \|", ln))
    return [float(c) for c in line.strip("| ").split(" | ")]


def test_every_scorer_has_its_scale_in_words():
    """Each registered scorer explains its own scale (none falls back to the generic words)."""
    bank = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for name in SCORERS:
        scorer = build_scorer(name, **({"max_bank": 40} if name.startswith("ocsvm") else {}))
        if scorer.fits_on_angles:  # fitted on the features of the 4 rotations
            scorer.fit({a: bank + a / 90 for a in ANGLES})
        else:
            scorer.fit(bank if name != "logit" else None)
        text = scale_sentence(scorer, 40)
        assert text.startswith(f"The {name} score is ") and "higher = more" not in text, name
    # the numbers in the words are the scorer's own
    assert "its 3 most similar" in scale_sentence(build_scorer("knn_cos", k=3).fit(bank), 40)
    maha = scale_sentence(build_scorer("mahalanobis").fit(bank), 40)
    assert "d = 6" in maha


def test_kde_words_give_the_range_its_scores_keep():
    gen = torch.Generator().manual_seed(1)
    bank = torch.randn(50, 8, dtype=torch.float64, generator=gen)
    kde = build_scorer("kde").fit(bank)
    low = float(re.search(r"between (-?[\d.]+) \(very", scale_sentence(kde, 50)).group(1))
    scores = kde.score(torch.cat([bank, torch.randn(200, 8, dtype=torch.float64, generator=gen)]))
    assert scores.min() >= low - 1e-3 and scores.max() <= 1.0
    assert scores[:50].min() < low + 0.5  # the bank's own features come near the lower end


def test_gallery_order_shows_each_image_once():
    top, low = gallery_order([0.3, -1.0, 2.0, 0.5, -0.2], n=2)
    assert top.tolist() == [2, 3] and low.tolist() == [1, 4]
    top, low = gallery_order([0.1, 0.2, 0.3], n=8)
    assert top.tolist() == [2, 1] and low.tolist() == [0]
    assert not set(top) & set(low)


def test_fit_report_shows_held_out_scores_against_the_threshold(fitted, split, tmp_path):
    held = split.train_images[64:84]
    path = write_fit_report(fitted, tmp_path, heldout_images=held)
    text = path.read_text()
    scores = fitted.decision_function(held)
    flagged = int((scores > fitted.threshold_).sum())
    assert f"Of the 20 held-out normal images, {flagged} (" in text
    assert "minus the mean cosine similarity" in text and "its 5 most similar" in text
    n, lo, _, _, _, hi = _table_row(text)
    assert n == 20 and lo == pytest.approx(scores.min(), abs=1e-3)
    assert hi == pytest.approx(scores.max(), abs=1e-3)
    for name in ("heldout_hist.png", "heldout_gallery.png"):
        assert f"(plots/{name})" in text
        assert (tmp_path / "plots" / name).read_bytes().startswith(PNG)


def test_fit_report_reads_the_detectors_held_out_scores(fitted, split, tmp_path):
    held = split.train_images[64:84]
    fitted.heldout_scores_ = np.linspace(-0.5, 0.5, 20)
    try:
        text = write_fit_report(fitted, tmp_path, heldout_images=held).read_text()
        only_scores = write_fit_report(fitted, tmp_path / "s").read_text()
    finally:
        del fitted.heldout_scores_
    assert _table_row(text)[1] == -0.5 and _table_row(text)[-1] == 0.5
    assert _table_row(only_scores)[1] == -0.5  # a histogram without images: no gallery
    assert not (tmp_path / "s" / "plots" / "heldout_gallery.png").exists()
    # scores of another held-out set (e.g. cross-fitted): the histogram is theirs, the gallery
    # scores these images
    fitted.heldout_scores_ = np.linspace(-0.5, 0.5, 30)
    try:
        text = write_fit_report(fitted, tmp_path / "x", heldout_images=held[:6]).read_text()
    finally:
        del fitted.heldout_scores_
    assert _table_row(text)[0] == 30 and (tmp_path / "x/plots/heldout_gallery.png").exists()


def test_fit_report_without_held_out_images_or_threshold(fitted, tmp_path):
    saved = fitted.threshold_
    fitted.threshold_ = None
    try:
        text = write_fit_report(fitted, tmp_path).read_text()
    finally:
        fitted.threshold_ = saved
    assert "No images were held out" in text and "There is no threshold" in text
    assert not (tmp_path / "plots").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="does not hold a firmad report"):
        write_fit_report(fitted, mine)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_score_report_from_files(fitted, split, tmp_path):
    from PIL import Image

    files = []
    for i, img in enumerate(split.test_images[:9]):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(img[0].numpy()).save(files[-1])
    scores = fitted.decision_function(split.test_images[:9])
    decisions = [int(s > 0.0) for s in scores]
    out = tmp_path / "rep"
    scored = Scored([str(f) for f in files], scores, decisions, files,
                    skipped=[("bad|name.png", "cannot decode")])  # fmt: skip
    text = write_score_report(fitted, scored, out, threshold=0.0).read_text()
    assert "9 images scored" in text and "1 skipped" in text and "bad\\|name.png" in text
    assert "above 0." in text  # the threshold given, not the detector's
    table = text.split("Most anomalous:")[1].split("Most normal:")[0]
    listed = [ln.split(" | ")[0].strip("| ") for ln in table.splitlines() if "img" in ln]
    assert listed == [str(files[i]) for i in np.argsort(-scores, kind="stable")[:5]]
    for name in ("score_hist.png", "gallery.png"):
        assert (out / "plots" / name).read_bytes().startswith(PNG)


def test_score_report_from_arrays(fitted, split, tmp_path):
    images = split.test_images[:4]
    scores = fitted.decision_function(images)
    names = [f"#{i}" for i in range(4)]
    path = write_score_report(fitted, Scored(names, scores, [""] * 4, images), tmp_path)
    assert "(plots/gallery.png)" in path.read_text()
    assert score_scale(fitted).endswith("Higher = more anomalous.")


def test_fit_and_score_commands_write_reports(split, tmp_path, capsys):
    from PIL import Image

    normal, new = tmp_path / "normal", tmp_path / "new"
    normal.mkdir()
    new.mkdir()
    for i, img in enumerate(split.train_images[:80]):
        Image.fromarray(img[0].numpy()).save(normal / f"{i}.png")
    for i, img in enumerate(split.test_images[:6]):
        Image.fromarray(img[0].numpy()).save(new / f"t{i}.png")
    det_dir = tmp_path / "det"
    args = ["-q", "fit", str(normal), "--out", str(det_dir)]
    assert main(args + [a for item in TRAIN for a in ("--set", item)]) == 0
    fit_text = (det_dir / "report.md").read_text()
    assert re.search(r"Of the \d+ held-out normal images, \d+ \(", fit_text)
    # for people: a one-line summary first, the numbers in report.json, files named
    det = OneClassDetector.load(det_dir)
    cal = det.calibration_
    first = fit_text.splitlines()[2]
    assert first.startswith(f"Threshold {det.threshold_:.4g}, set on {cal['n']} held-out")
    assert "Calibration: {" not in fit_text and "scores=" not in fit_text and len(first) < 200
    info = json.loads((det_dir / "report.json").read_text())
    assert info["calibration"]["n_above"] == cal["n_above"] and "scores" not in info["calibration"]
    held = {f"{i}.png" for i in range(80)}
    named = [g["path"] for g in info["gallery"]["most_anomalous"] + info["gallery"]["most_normal"]]
    assert named and set(named) <= held and "held-out 1" not in fit_text
    assert f"| {named[0]} |" in fit_text
    assert (det_dir / "plots" / "heldout_hist.png").exists()
    OneClassDetector.load(det_dir)  # the report does not disturb the detector directory

    csv_path = tmp_path / "scores.csv"
    assert main(["-q", "score", str(det_dir), str(new), "--out", str(csv_path)]) == 0
    rows = list(csv.DictReader(csv_path.open()))
    text = (tmp_path / "scores-report" / "report.md").read_text()
    top = max(rows, key=lambda r: float(r["score"]))
    assert text.splitlines()[2].startswith("6 images scored: ")  # the summary comes first
    assert f"| {top['path']} | {top['score']} |" in text
    from firmad.metrics import conformal_p_values

    p = conformal_p_values(det.heldout_scores_, [float(top["score"])])[0]
    assert f"| {top['path']} | {top['score']} | {p:.3g} |" in text  # the p-value beside it
    assert main(["-q", "score", str(det_dir), str(new), "--report", str(tmp_path / "r2")]) == 0
    assert (tmp_path / "r2" / "plots" / "gallery.png").exists()
    # again: a score report is replaced; a folder of the user's is never written into
    assert main(["-q", "score", str(det_dir), str(new), "--report", str(tmp_path / "r2")]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("# my notes\n")
    # per label: from the folders, or from a labels.csv (-q after the sub-command works too)
    (new / "kind").mkdir()
    for f in sorted(new.glob("t[0-2].png")):
        f.rename(new / "kind" / f.name)
    assert main(["score", str(det_dir), str(new), "--report", str(tmp_path / "r3"),
                 "--labels-from-folders", "-q"]) == 0  # fmt: skip
    table = json.loads((tmp_path / "r3" / "report.json").read_text())["per_label"]
    assert [(r["label"], r["n"]) for r in table] == [("kind", 3), ("new", 3)]
    assert "## Per label" in (tmp_path / "r3" / "report.md").read_text()
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"new/t{i}.png,shirt\n" for i in (3, 4)))
    assert main(["-q", "score", str(det_dir), str(new), "--report", str(tmp_path / "r4"),
                 "--labels", str(labels)]) == 0  # fmt: skip
    table = json.loads((tmp_path / "r4" / "report.json").read_text())["per_label"]
    assert [(r["label"], r["n"]) for r in table] == [("(none)", 4), ("shirt", 2)]
    flagged = sum(r["flagged"] for r in table)
    assert flagged == json.loads((tmp_path / "r4" / "report.json").read_text())["n_flagged"]
    labels.write_text("file,class\na.png,x\n")
    capsys.readouterr()
    assert main(["-q", "score", str(det_dir), str(new), "--out", str(tmp_path / "s5.csv"),
                 "--labels", str(labels)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "the columns path and label" in err and not (tmp_path / "s5.csv").exists()
    capsys.readouterr()
    # checked before scoring: a clear error, nothing written
    assert main(["-q", "score", str(det_dir), str(new), "--report", str(mine)]) == 2
    assert (mine / "report.md").read_text() == "# my notes\n" and not (mine / "plots").exists()
    assert "does not hold a firmad report" in capsys.readouterr().err
