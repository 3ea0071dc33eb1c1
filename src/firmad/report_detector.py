"""The reports of a detector: `firmad fit` (held-out normals against the threshold) and
`firmad score` (scored images against the held-out normals), for people.

Each report is ``report.md`` (a one-line summary first, then the score scale in words, a
histogram with the threshold, a gallery naming its files), ``report.json`` (the same numbers
for programs: calibration, summaries, the gallery's files with their scores and p-values, the
per-label table) and ``plots/``. A report is written only into a new or empty folder or over a
report of the same kind: a folder of the user's is never written into. File names are escaped
in the Markdown, so a file named like a Markdown link or image stays text.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from firmad.data.sources import load_image
from firmad.errors import DataError, InputError
from firmad.io import atomic_write_json, atomic_write_text
from firmad.metrics import conformal_p_values
from firmad.outputs import check_folder
from firmad.report import PLOTS_DIR, new_figure, save_png
from firmad.scoring.scales import score_scale

GALLERY_N = 8  # images per gallery row
FIT_REPORT_TITLE = "# firmad detector report"
SCORE_REPORT_TITLE = "# firmad score report"
REPORT_JSON = "report.json"
MAX_LABELS_BYTES = 64 * 1024 * 1024  # a labels.csv larger than this is surely not one


# --------------------------------------------------------------------------- words and numbers


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def calibration_line(det) -> str | None:
    """The calibration in one sentence (the numbers themselves go to report.json)."""
    cal = getattr(det, "calibration_", None)
    if not cal:
        return None
    rate = cal.get("target_fpr")
    target = (
        f"target FPR {rate:g}"
        if rate is not None
        else f"contamination {cal.get('contamination'):g}"
        if cal.get("contamination") is not None
        else "no target"
    )
    ci = cal.get("interval")
    interval = f", 95 % interval {_pct(ci[0])} to {_pct(ci[1])}" if ci else ""
    return (
        f"set on {cal['n']} {cal.get('source', 'held-out')} normal images at {target}: "
        f"{cal['n_above']} above the threshold (FPR {_pct(cal['achieved_fpr'])}{interval})"
    )


def calibration_json(det) -> dict[str, Any] | None:
    """The calibration's numbers for report.json (the held-out scores are in detector.json)."""
    cal = getattr(det, "calibration_", None)
    if not cal:
        return None
    return {k: v for k, v in cal.items() if k != "scores"}


def _summary(scores: np.ndarray) -> dict[str, float]:
    q = np.quantile(scores, [0.0, 0.05, 0.5, 0.95, 1.0])
    keys = ("min", "q05", "median", "q95", "max")
    return {"n": int(len(scores)), **{k: float(v) for k, v in zip(keys, q, strict=True)}}


def _summary_rows(scores: np.ndarray) -> list[str]:
    s = _summary(scores)
    cells = " | ".join(f"{s[k]:.4g}" for k in ("min", "q05", "median", "q95", "max"))
    return ["| n | min | 5 % | median | 95 % | max |", "|---:|---:|---:|---:|---:|---:|",
            f"| {s['n']} | {cells} |"]  # fmt: skip


def _threshold_words(scores: np.ndarray | None, threshold: float | None) -> str:
    if threshold is None:
        return (
            "There is no threshold, so there are no decisions: set one with "
            "`firmad score --threshold T` or `det.calibrate(...)`."
        )
    text = f"An image is flagged as an anomaly when its score is above {threshold:.4g}."
    if scores is not None and len(scores):
        n_flag = int((scores > threshold).sum())
        text += (
            f" Of the {len(scores)} held-out normal images, {n_flag} "
            f"({100 * n_flag / len(scores):.1f} %) score above it."
        )
    return text


P_VALUE_WORDS = (
    "The p-value of an image is the share of the {n} held-out normal images that score at "
    "least as high (counting the image itself): small means unusual. On normal images like "
    "the held-out ones, p <= 0.05 happens at most 5 % of the time."
)


def md_text(value: Any) -> str:
    """Text that Markdown shows as it is: no link, image, emphasis, HTML or table cell break
    (file names come from the user: `![a](https:evil.example).png` must stay a name)."""
    text = str(value).replace("\n", " ").replace("\r", " ")
    # "_" stays: inside a name (img_1.png) it is no emphasis, and names stay readable
    return re.sub(r"([\\`*\[\]<>!|&])", r"\\\1", text) or "—"


def _header(det, threshold: float | None) -> list[str]:
    cfg = det.config_
    vs = det.scorer_
    c, h, w = getattr(det, "input_shape_", (cfg.data.channels, cfg.data.size, cfg.data.size))
    lines = [
        f"- Method: {cfg.method.name}, backbone {cfg.model.backbone}, epochs {cfg.train.epochs}",
        f"- Input: images squashed to {cfg.data.size} x {cfg.data.size} "
        f"({'RGB' if c == 3 else 'grey'}; fitted on {h} x {w})",
        f"- Scorer: {vs.label}, {getattr(det, 'n_bank_', '?')} normal training images in its bank",
        f"- Threshold: {'none' if threshold is None else f'{threshold:.6g}'}",
    ]
    line = calibration_line(det)
    if line:
        lines.append(f"- Calibration: {line}; the numbers are in {REPORT_JSON}")
    return lines


# --------------------------------------------------------------------------- plots


def plot_threshold_hist(
    path: str | Path,
    reference=None,
    threshold: float | None = None,
    new_scores=None,
    reference_label: str = "held-out normals",
    new_label: str = "scored images",
) -> Path:
    """Histogram of held-out normal scores (and of newly scored ones) with the threshold line."""
    ref = None if reference is None else np.asarray(reference, dtype=np.float64).reshape(-1)
    new = None if new_scores is None else np.asarray(new_scores, dtype=np.float64).reshape(-1)
    parts = [x for x in (ref, new) if x is not None and len(x)]
    values = np.concatenate(parts) if parts else np.zeros(0)
    if threshold is not None:
        values = np.append(values, threshold)
    bins = np.histogram_bin_edges(values, bins=40) if len(values) else 10
    both = ref is not None and len(ref) and new is not None and len(new)  # sizes differ: density
    fig = new_figure()
    ax = fig.add_subplot()
    for x, colour, label in ((ref, "C0", reference_label), (new, "C1", new_label)):
        if x is not None and len(x):
            ax.hist(
                x, bins=bins, alpha=0.6, color=colour, density=both, label=f"{label} (n={len(x)})"
            )
    if threshold is not None:
        ax.axvline(threshold, color="C3", ls="--", lw=1.5, label=f"threshold {threshold:.4g}")
    ax.set(xlabel="anomaly score (higher = more anomalous)", ylabel="density" if both else "images")
    ax.set_title("Scores and threshold")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return save_png(fig, path)


def gallery_order(scores, n: int = GALLERY_N) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``n`` most anomalous (highest first) and ``n`` most normal (lowest
    first) scores; ties keep input order."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(s, kind="stable")
    n_top = min(n, (len(s) + 1) // 2)  # few images: each shown once
    n_low = min(n, len(s) - n_top)
    return order[::-1][:n_top], order[:n_low]


def plot_gallery(path: str | Path, rows: Sequence[tuple[str, Any, Sequence[str]]]) -> Path:
    """Rows of thumbnails: ``(row title, uint8 images (n, C, H, W), captions)``; each caption
    sits above its image (two short lines fit)."""
    cell, thumb, title_h, cap_h, gap = 1.25, 1.0, 0.3, 0.4, 0.15  # inches
    ncols = max([len(imgs) for _, imgs, _ in rows] + [1])
    row_h = title_h + cap_h + thumb + gap
    width, height = ncols * cell + 0.2, len(rows) * row_h + 0.1
    fig = new_figure((width, height))
    for r, (title, imgs, captions) in enumerate(rows):
        top = height - 0.1 - r * row_h  # inches from the bottom
        fig.text(0.1 / width, (top - title_h / 2) / height, title, fontsize=10, weight="bold",
                 va="center")  # fmt: skip
        if not len(imgs):
            fig.text(0.1 / width, (top - title_h - cap_h) / height, "(none)", fontsize=8)
        for i, (img, cap) in enumerate(zip(imgs, captions, strict=True)):
            left = 0.1 + i * cell + (cell - thumb) / 2
            bottom = top - title_h - cap_h - thumb
            ax = fig.add_axes((left / width, bottom / height, thumb / width, thumb / height))
            ax.set_axis_off()
            img = np.asarray(img)
            if img.shape[0] == 1:
                ax.imshow(img[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.imshow(img.transpose(1, 2, 0), interpolation="nearest")
            ax.set_title(cap, fontsize=7, pad=3)
    return save_png(fig, path, tight=False)


def _short(name: str, width: int = 18) -> str:
    """The end of a path, as much as a thumbnail's caption holds."""
    name = str(name).replace(os.sep, "/")
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _as_nchw(images, layout: str | None = None) -> np.ndarray:
    """uint8 (N, C, H, W) numpy images for the gallery (from arrays, tensors, float in [0, 1])."""
    x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if x.ndim not in (3, 4):
        raise InputError(
            f"images for a report must be an array or tensor (N, C, H, W), got {type(images)}"
        )
    if x.ndim == 3:
        x = x[:, None]
    if layout == "NHWC" or (layout is None and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3)):
        x = x.transpose(0, 3, 1, 2)
    if x.dtype != np.uint8:
        x = np.clip(np.round(x.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    return x


def _gallery_rows(
    scores: np.ndarray, image: Callable[[int], Any], names: Sequence[str], what: str
) -> list[tuple[str, Any, list[str]]]:
    """Gallery rows (most anomalous, most normal); ``image(i)`` gives image i or None."""
    rows = []
    titles = (f"Most anomalous {what}", f"Most normal {what}")
    for title, idx in zip(titles, gallery_order(scores), strict=True):
        pairs = [(i, image(int(i))) for i in idx]
        pairs = [(i, img) for i, img in pairs if img is not None]
        caps = [f"{scores[i]:.4g}\n{_short(names[i])}" for i, _ in pairs]
        rows.append((title, [img for _, img in pairs], caps))
    return rows


def _gallery_entries(idx, names, scores, p_values=None, decisions=None) -> list[dict]:
    """The gallery's files for report.json."""
    out = []
    for i in idx:
        entry = {"path": str(names[i]), "score": float(scores[i])}
        if p_values is not None:
            entry["p_value"] = float(p_values[i])
        if decisions is not None:
            entry["anomaly"] = decisions[i]
        out.append(entry)
    return out


# --------------------------------------------------------------------------- fit report


def write_fit_report(det, directory: str | Path, heldout_images=None, heldout_names=None) -> Path:
    """``directory/report.md``, ``report.json`` and ``plots/*.png`` for a fitted detector: a
    one-line summary, its score scale in words, the held-out normal scores against the
    threshold, and a gallery of the most anomalous and most normal held-out images, named by
    ``heldout_names`` (their paths; default "held-out N"). The histogram shows
    ``det.heldout_scores_`` when the detector has them, else the scores of
    ``heldout_images`` (uint8 or [0, 1] float, (N, C, H, W) or (N, H, W, C)). Returns the
    report's path."""
    directory = Path(directory)
    check_report_folder(directory, FIT_REPORT_TITLE, option="--out", marker="detector.json")
    threshold = getattr(det, "threshold_", None)
    scores = getattr(det, "heldout_scores_", None)
    scores = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    images = image_scores = None
    if heldout_images is not None and len(heldout_images):
        images = _as_nchw(heldout_images, getattr(det, "input_layout_", None))
        same = scores is not None and len(scores) == len(images)
        image_scores = scores if same else det.decision_function(heldout_images)
        scores = image_scores if scores is None else scores
    info: dict[str, Any] = {"kind": "fit", "threshold": threshold,
                            "calibration": calibration_json(det)}  # fmt: skip
    out = [FIT_REPORT_TITLE, "", _fit_summary(det, scores, threshold), "", *_header(det, threshold)]
    out += ["", "## What the scores mean", "", score_scale(det), ""]
    out += [_threshold_words(scores, threshold), ""]
    out += ["## Held-out normal scores", ""]
    if scores is None or not len(scores):
        out += ["No images were held out, so there is no histogram and no gallery.", ""]
    else:
        info["heldout"] = _summary(scores)
        plot_threshold_hist(directory / PLOTS_DIR / "heldout_hist.png", scores, threshold)
        out += [*_summary_rows(scores), ""]
        out += [f"![Scores and threshold]({PLOTS_DIR}/heldout_hist.png)", ""]
    if images is not None:
        names = _names(heldout_names, len(images), "held-out")
        out += _fit_gallery(directory, images, image_scores, names, info)
    atomic_write_json(directory / REPORT_JSON, info)
    path = directory / "report.md"
    atomic_write_text(path, "\n".join(out).rstrip() + "\n")
    return path


def relative_name(path: str | Path, folder: str | Path) -> str:
    """A file's path inside the folder it was found in (itself when ``folder`` is the file)."""
    rel = os.path.relpath(path, folder)
    return Path(path).name if rel == "." else rel.replace(os.sep, "/")


def _names(names, n: int, prefix: str) -> list[str]:
    if names is None:
        return [f"{prefix} {i}" for i in range(n)]
    if len(names) != n:
        raise InputError(f"{len(names)} names for {n} images; give one name per image")
    return [str(x) for x in names]


def _fit_summary(det, scores, threshold) -> str:
    """The fit report's first line."""
    if threshold is None:
        return "No threshold: the detector scores images but makes no decisions."
    line = calibration_line(det)
    if line:
        return f"Threshold {threshold:.4g}, {line}."
    if scores is not None and len(scores):
        above = int((scores > threshold).sum())
        return f"Threshold {threshold:.4g}: {above} of {len(scores)} held-out images above it."
    return f"Threshold {threshold:.4g}."


def _fit_gallery(directory: Path, images, scores, names, info: dict) -> list[str]:
    rows = _gallery_rows(scores, lambda i: images[i], names, "held-out normals")
    plot_gallery(directory / PLOTS_DIR / "heldout_gallery.png", rows)
    top, low = gallery_order(scores)
    info["gallery"] = {
        "most_anomalous": _gallery_entries(top, names, scores),
        "most_normal": _gallery_entries(low, names, scores),
    }
    out = [
        "## Gallery",
        "",
        "The top row holds the held-out normal images this detector finds least typical "
        "(look there for mislabelled or unusual images); the bottom row the most typical. "
        "Each shows its score, as the detector sees the image; the tables name the files.",
        "",
        f"![Most anomalous and most normal held-out images]({PLOTS_DIR}/heldout_gallery.png)",
    ]
    for title, idx in (("Least typical", top), ("Most typical", low)):
        out += ["", f"{title}:", "", "| image | score |", "|---|---:|"]
        out += [f"| {md_text(names[i])} | {scores[i]:.6g} |" for i in idx]
    return out + [""]


# --------------------------------------------------------------------------- score report


@dataclass
class Scored:
    """What `firmad score` found: one entry per scored image, in order.

    ``images``: the image files (only the gallery's are read; default: ``names`` as paths) or
    uint8 images (N, C, H, W); ``decisions``: 1 / 0 / "" (default: score above the threshold);
    ``labels``: a label per image (a class or folder name, None where unknown) for the
    per-label table; ``skipped``: (path, reason) of every file not scored."""

    names: Sequence[str]
    scores: Any
    decisions: Sequence | None = None
    images: Any = None
    labels: Sequence[str | None] | None = None
    skipped: Sequence[tuple[Any, str]] = ()


def write_score_report(det, scored: Scored, out_path: str | Path, threshold=None) -> Path:
    """``out_path/report.md``, ``report.json`` and ``plots/*.png`` for scored images: a
    one-line summary, their scores and p-values against the held-out normals and the
    threshold, a per-label table (with ``scored.labels``), a gallery and tables naming the
    most anomalous and most normal files, the skipped files, and the score scale in words.
    ``threshold`` defaults to the detector's. Returns the report's path."""
    out_dir = Path(out_path)
    check_report_folder(out_dir, SCORE_REPORT_TITLE)
    s = np.asarray(scored.scores, dtype=np.float64).reshape(-1)
    names = [str(n) for n in scored.names]
    threshold = threshold if threshold is not None else getattr(det, "threshold_", None)
    decisions = scored.decisions
    if decisions is None:
        decisions = ["" if threshold is None else int(x > threshold) for x in s]
    heldout = getattr(det, "heldout_scores_", None)
    p = None if heldout is None or not len(heldout) else conformal_p_values(heldout, s)
    flagged = sum(1 for d in decisions if str(d) == "1")
    info: dict[str, Any] = {
        "kind": "score", "n_scored": len(s), "n_flagged": flagged if threshold is not None
        else None, "n_skipped": len(scored.skipped), "threshold": threshold,
        "calibration": calibration_json(det), "scores": _summary(s) if len(s) else None,
    }  # fmt: skip
    out = [SCORE_REPORT_TITLE, "", _score_summary(len(s), flagged, threshold, scored.skipped)]
    out += ["", *_header(det, threshold), "", "## What the scores mean", "", score_scale(det)]
    out += ["", _threshold_words(None, threshold)]
    if p is not None:
        out += ["", P_VALUE_WORDS.format(n=len(heldout))]
    out += ["", "## Scores", "", *_summary_rows(s), ""]
    plot_threshold_hist(out_dir / PLOTS_DIR / "score_hist.png", heldout, threshold, s)
    ref = "no held-out scores" if heldout is None else "the held-out normal images' scores (blue)"
    out += [f"The scored images (orange) against {ref} and the threshold.", ""]
    out += [f"![Scores and threshold]({PLOTS_DIR}/score_hist.png)", ""]
    if scored.labels is not None:
        table = per_label(scored.labels, s, decisions, p)
        info["per_label"] = table
        out += _per_label_md(table, threshold is not None)
    image = _image_getter(det, scored.images if scored.images is not None else names)
    rows = _gallery_rows(s, image, names, "images")
    plot_gallery(out_dir / PLOTS_DIR / "gallery.png", rows)
    out += ["## Gallery", "", f"![Most anomalous and most normal images]({PLOTS_DIR}/gallery.png)"]
    out += _gallery_tables(names, s, p, decisions, info)
    if scored.skipped:
        out += ["", "## Skipped", ""]
        out += [f"- {md_text(f)}: {md_text(why)}" for f, why in scored.skipped]
        info["skipped"] = [{"path": str(f), "reason": str(why)} for f, why in scored.skipped]
    atomic_write_json(out_dir / REPORT_JSON, info)
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(out).rstrip() + "\n")
    return path


def _score_summary(n: int, flagged: int, threshold, skipped) -> str:
    """The score report's first line."""
    if threshold is None:
        decided = "no threshold, so no decisions"
    else:
        decided = f"{flagged} flagged as anomalies, {n - flagged} normal"
    return f"{n} images scored: {decided}; {len(skipped)} skipped."


def _gallery_tables(names, s, p, decisions, info: dict) -> list[str]:
    out = []
    top, low = gallery_order(s)
    info["gallery"] = {
        "most_anomalous": _gallery_entries(top, names, s, p, decisions),
        "most_normal": _gallery_entries(low, names, s, p, decisions),
    }
    head = (
        "| image | score | p-value | anomaly |" if p is not None else "| image | score | anomaly |"
    )
    rule = "|---|---:|---:|---:|" if p is not None else "|---|---:|---:|"
    for title, idx in (("Most anomalous", top), ("Most normal", low)):
        out += ["", f"{title}:", "", head, rule]
        for i in idx:
            pv = f" {p[i]:.3g} |" if p is not None else ""
            out.append(f"| {md_text(names[i])} | {s[i]:.6g} |{pv} {md_text(decisions[i])} |")
    return out


# --------------------------------------------------------------------------- labels


def per_label(labels: Sequence[str | None], scores, decisions, p_values=None) -> list[dict]:
    """One row per label (sorted; images without a label as "(none)"): how many images, how
    many flagged and their share (the recall of an anomaly class, the false-positive rate of
    the normal one), the median score and p-value."""
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault("(none)" if label is None else str(label), []).append(i)
    rows = []
    for label in sorted(groups):
        idx = groups[label]
        flagged = sum(1 for i in idx if str(decisions[i]) == "1")
        row = {"label": label, "n": len(idx), "flagged": flagged,
               "flagged_share": flagged / len(idx),
               "median_score": float(np.median([scores[i] for i in idx]))}  # fmt: skip
        if p_values is not None:
            row["median_p_value"] = float(np.median([p_values[i] for i in idx]))
        rows.append(row)
    return rows


def _per_label_md(table: list[dict], decided: bool) -> list[str]:
    out = ["## Per label", ""]
    if not decided:
        out += ["No threshold, so nothing is flagged; the scores still rank the images.", ""]
    out += [
        "Flagged share: the recall of an anomaly class, the false-positive rate of a normal one.",
        "",
        "| label | images | flagged | flagged % | median score | median p-value |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        pv = f"{r['median_p_value']:.3g}" if "median_p_value" in r else "—"
        out.append(
            f"| {md_text(r['label'])} | {r['n']} | {r['flagged']} | "
            f"{100 * r['flagged_share']:.1f} | {r['median_score']:.4g} | {pv} |"
        )
    return out + [""]


def read_labels(path: str | Path) -> dict[str, str]:
    """A labels CSV: a header with the columns ``path`` and ``label`` (others ignored), one row
    per image. Returns {real path: label}; a path is read as given (relative to the current
    folder), else relative to the CSV's folder."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_LABELS_BYTES + 1)
        text = data.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(
            f"--labels {path}: cannot read it ({err}); give a UTF-8 CSV file"
        ) from None
    if len(data) > MAX_LABELS_BYTES:
        raise InputError(f"--labels {path}: larger than {MAX_LABELS_BYTES >> 20} MiB")
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
        raise InputError(
            f"--labels {path}: expected a header with the columns path and label "
            "(e.g. `path,label` then `incoming/a.png,trouser`)"
        )
    out: dict[str, str] = {}
    for n, row in enumerate(reader, start=2):
        where, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not where or not label:
            raise InputError(f"--labels {path}, line {n}: a path and a label are needed")
        given = Path(where)
        full = given if given.is_absolute() or given.exists() else path.parent / given
        out[os.path.realpath(full)] = label
    return out


def labels_for(names: Sequence[str], table: dict[str, str] | None = None) -> list[str | None]:
    """Each scored file's label: from a `read_labels` table, else the name of its folder."""
    if table is not None:
        return [table.get(os.path.realpath(n)) for n in names]
    return [Path(n).parent.name or None for n in names]


# --------------------------------------------------------------------------- folders, images


def check_report_folder(
    folder: Path, title: str = SCORE_REPORT_TITLE, option: str = "--report", marker=None,
    inputs: Sequence[str | Path] = (),
) -> None:  # fmt: skip
    """Write a report only into a new or empty folder, a folder holding ``marker`` (a detector
    directory's detector.json), or over a report of the same kind: a folder of the user's is
    never written into, nor one inside the ``inputs`` (its plots would be read as images)."""
    check_folder(folder, option, inputs=inputs, markers=[marker] if marker else ["report.md"])
    if not folder.exists():
        return
    report = folder / "report.md"
    if not any(folder.iterdir()) or (marker and (folder / marker).is_file()):
        return
    try:
        ours = report.is_file() and report.read_text(encoding="utf-8").startswith(title + "\n")
    except (OSError, UnicodeDecodeError):
        ours = False
    if not ours:
        raise InputError(
            f"{folder} exists and does not hold a firmad report; choose a new folder for the "
            f"report ({option} DIR) so nothing of yours is overwritten"
        )


def _image_getter(det, items) -> Callable[[int], Any]:
    """``image(i)``: image i for the gallery, uint8 (C, H, W), or None if it cannot be read.
    Files are read only when asked for (as the detector reads them: squashed to its size)."""
    if items is not None and len(items) and isinstance(items[0], str | Path):
        size, channels = det.config_.data.size, det.config_.data.channels

        def image(i: int):
            try:
                return load_image(Path(items[i]), size, channels)
            except (DataError, OSError):
                return None

        return image
    arr = None if items is None or not len(items) else _as_nchw(items)
    return lambda i: None if arr is None else arr[i]
