"""Run reports: results.json, report.md, PNG plots and a plain-text table for the CLI.

Plots use matplotlib's object API with the Agg canvas (no pyplot state, no display needed).
Every file is written atomically: a temporary file in the same folder, then ``os.replace``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from firmad.errors import ConfigError
from firmad.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from firmad.metrics import aulc
from firmad.metrics import roc_curve as _roc_curve
from firmad.perturb import attack_name
from firmad.run import RESULTS
from firmad.scoring import row_name, spec_label
from firmad.versions import versions

__all__ = [
    "DIAGNOSTIC_NOTE",
    "format_table",
    "plot_learning_curve",
    "plot_projection",
    "plot_roc",
    "plot_score_hist",
    "versions",
    "write_plots",
    "write_report_md",
    "write_results",
]

DIAGNOSTIC_NOTE = "diagnostic, chosen on test data — not a headline result"
PLOTS_DIR = "plots"
_HEADER_KEYS = (
    "dataset",
    "normal_classes",
    "method",
    "backbone",
    "epochs",
    "seed",
    "subsample",
    "wall_time_s",
)
_METRICS = (
    ("auroc", "AUROC"),
    ("aupr_anomaly", "AUPR-anomaly"),
    ("aupr_normal", "AUPR-normal"),
    ("fpr95", "FPR95"),
)
# plot file name -> caption, in the order report.md shows them
_PLOTS = {
    "roc.png": "ROC curves",
    "score_hist.png": "Score distributions (best scorer)",
    "learning_curve.png": "Learning curve",
    "projection.png": "PCA of test features",
}


# --------------------------------------------------------------------------- results.json


def _curve_points(curve) -> list[dict[str, float]]:
    """Learning curve as a list of {"epoch", "auroc"} (accepts that or a pair of sequences)."""
    if isinstance(curve, Mapping):
        curve = list(zip(curve["epochs"], curve["aurocs"], strict=True))
    points = []
    for p in curve:
        if isinstance(p, Mapping):
            points.append({**p, "epoch": p["epoch"], "auroc": float(p["auroc"])})
        else:
            points.append({"epoch": p[0], "auroc": float(p[1])})
    return points


def write_results(run_dir: str | Path, meta: dict[str, Any], results: list[dict]) -> Path:
    """Write ``run_dir/results.json`` atomically and return its path.

    ``meta`` supplies the top-level keys (dataset, normal_classes, method, backbone, epochs,
    seed, subsample, wall_time_s, and any extras); missing header keys are written as null.
    ``versions`` is added here. Optional ``learning_curve`` (list of {"epoch", "auroc"}) and
    ``diagnostics`` (a dict, labelled with :data:`DIAGNOSTIC_NOTE`) are kept.
    """
    run_dir = Path(run_dir)
    extras = {"results", "versions", "learning_curve", "diagnostics"}
    data: dict[str, Any] = {k: meta.get(k) for k in _HEADER_KEYS}
    data.update({k: v for k, v in meta.items() if k not in data and k not in extras})
    data["versions"] = versions()
    data["results"] = [dict(r) for r in results]
    if meta.get("learning_curve"):
        points = _curve_points(meta["learning_curve"])
        data["learning_curve"] = points
        data["aulc"] = aulc([p["epoch"] for p in points], [p["auroc"] for p in points])
    if meta.get("diagnostics"):
        diag = dict(meta["diagnostics"])
        diag.setdefault("note", DIAGNOSTIC_NOTE)
        data["diagnostics"] = diag
    path = run_dir / RESULTS
    atomic_write_json(path, data)
    return path


# --------------------------------------------------------------------------- tables


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100.0 * float(v):.1f}"


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    """Aligned plain-text table (scorer, variant, metrics in percent) for the terminal."""
    header = ["scorer", "variant", *(label for _, label in _METRICS)]
    rows = [
        [row_name(r), str(r.get("variant", "")), *(_pct(r.get(k)) for k, _ in _METRICS)]
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        text = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in pairs]
        return "  ".join(text).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _markdown_table(results: Sequence[Mapping[str, Any]]) -> str:
    aurocs = [r["auroc"] for r in results if r.get("auroc") is not None]
    best = max(aurocs) if aurocs else None
    lines = [
        "| Scorer | Variant | AUROC % | AUPR-anomaly % | AUPR-normal % | FPR95 % |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        cells = [_pct(r.get(k)) for k, _ in _METRICS]
        if (
            best is not None
            and r.get("auroc") is not None
            and round(r["auroc"], 12) == round(best, 12)
        ):
            cells[0] = f"**{cells[0]}**"
        lines.append(f"| {row_name(r)} | {r.get('variant', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "—"
    s = float(seconds)
    if s < 120:
        return f"{s:.1f} s"
    h, rem = divmod(int(round(s)), 3600)
    m, sec = divmod(rem, 60)
    return f"{h} h {m:02d} min {sec:02d} s" if h else f"{m} min {sec:02d} s"


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items()) or "—"
    if isinstance(v, list | tuple):
        return ", ".join(_fmt(x) for x in v) or "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report_md(run_dir: str | Path, results_json: dict[str, Any]) -> Path:
    """Write ``run_dir/report.md`` from a results.json dict; embeds plots found in plots/."""
    run_dir = Path(run_dir)
    d = results_json
    classes = _fmt(d.get("normal_classes"))
    if d.get("normal_class_names"):
        classes += f" ({_fmt(d['normal_class_names'])})"
    out = [
        f"# firmad run: {d.get('method', '?')} on {d.get('dataset', '?')}",
        "",
        f"- Dataset: {_fmt(d.get('dataset'))}",
        f"- Normal classes: {classes}",
        f"- Method: {_fmt(d.get('method'))}",
        f"- Backbone: {_fmt(d.get('backbone'))}",
        f"- Epochs: {_fmt(d.get('epochs'))}",
        f"- Seed: {_fmt(d.get('seed'))}",
        f"- Subsample: {_fmt(d.get('subsample'))}",
        f"- Wall time: {_duration(d.get('wall_time_s'))}",
    ]
    if d.get("checkpoint"):
        out.append(f"- Checkpoint scored: {d['checkpoint']}")
    if d.get("versions"):
        out.append(f"- Versions: {_fmt(d['versions'])}")
    out += [
        "",
        "## Results",
        "",
        "Anomaly = positive class; metrics in percent; the best AUROC is bold. FPR95 is the",
        "share of normal test images flagged at the threshold that detects 95 % of anomalies.",
        "",
        _markdown_table(d.get("results", [])),
    ]
    if d.get("robustness"):
        out += ["", "## Robustness", "", _robustness_md(d["robustness"])]
    if d.get("learning_curve"):
        pts = d["learning_curve"]
        area = d.get("aulc")
        if area is None:
            area = aulc([p["epoch"] for p in pts], [p["auroc"] for p in pts])
        out += [
            "",
            "## Learning curve",
            "",
            f"{len(pts)} evaluations from epoch {pts[0]['epoch']} to {pts[-1]['epoch']}; "
            f"area under the AUROC curve over normalised training progress (AULC): "
            f"{100 * area:.1f} %. Last: {100 * pts[-1]['auroc']:.1f} %.",
        ]
    plots = [(name, cap) for name, cap in _PLOTS.items() if (run_dir / PLOTS_DIR / name).exists()]
    if plots:
        out += ["", "## Plots"]
        for name, caption in plots:
            out += ["", f"![{caption}]({PLOTS_DIR}/{name})"]
    if d.get("diagnostics"):
        diag = dict(d["diagnostics"])
        note = diag.pop("note", DIAGNOSTIC_NOTE)
        out += ["", f"## Diagnostics ({note})", ""]
        out += [f"- {k}: {_fmt(v)}" for k, v in diag.items()]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(out).rstrip() + "\n")
    return path


def _robustness_md(rob: Mapping[str, Any]) -> str:
    """The results.json ``robustness`` entry as a table: ε rows, attacked-group columns."""
    det = rob.get("detector", {})
    name, params = det.get("scorer", "?"), det.get("scorer_params", {})
    label = spec_label(name, params)
    modes = list(dict.fromkeys(r["target"] for r in rob["rows"]))
    checks = "passed" if rob.get("passed") else "NOT all passed"
    lines = [
        f"AUROC % [95 % CI] of {label} ({det.get('variant')}) "
        f"under {rob['norm']} {attack_name(rob)}-{rob['steps']} x {rob['restarts']} on "
        f"n = {rob['n']} test "
        f"images; strength checks {checks}. Details: {rob.get('file', 'attack.json')}, "
        "attack.md.",
        "",
        "| eps | " + " | ".join(modes) + " |",
        "|---|" + "---:|" * len(modes),
    ]
    for eps in sorted({r["eps"] for r in rob["rows"]}):
        cells = []
        for mode in modes:
            r = next((r for r in rob["rows"] if r["eps"] == eps and r["target"] == mode), None)
            cells.append(
                "—"
                if r is None
                else f"{100 * r['auroc']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
            )
        label = f"{eps * 255:.3g}/255" if rob["norm"] == "linf" else f"{eps:.3g}"
        label = "0 (clean)" if eps == 0 else label
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def new_figure(figsize=(5.5, 4.0)):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=100)


def save_png(fig, path: str | Path, tight: bool = True) -> Path:
    """Save a figure as PNG atomically, with the usual file permissions (firmad.io)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    if tight:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


# Deprecated names, kept while robustness/audit.py imports them.


def plot_roc(
    path: str | Path, labels, scores_by_name: Mapping[str, np.ndarray], max_curves: int = 8
) -> Path:
    """ROC curves of several scorers in one plot (the ``max_curves`` best by AUROC)."""
    from sklearn.metrics import roc_auc_score

    ranked = sorted(
        ((float(roc_auc_score(np.asarray(labels), np.asarray(s))), n, s))
        for n, s in scores_by_name.items()
    )[::-1][:max_curves]
    fig = new_figure()
    ax = fig.add_subplot()
    for auc, name, scores in ranked:
        fpr, tpr, _ = _roc_curve(labels, scores)
        ax.plot(fpr, tpr, lw=1.2, label=f"{name} ({100 * auc:.1f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", xlim=(0, 1), ylim=(0, 1))
    ax.set_title("ROC (anomaly = positive; AUROC %)")
    ax.legend(fontsize=7, loc="lower right")
    return save_png(fig, path)


def plot_score_hist(path: str | Path, labels, scores, title: str = "anomaly scores") -> Path:
    """Overlaid histograms of the scores of normal and anomalous test images."""
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    bins = np.histogram_bin_edges(s, bins=50)
    fig = new_figure()
    ax = fig.add_subplot()
    ax.hist(
        s[y == 0], bins=bins, alpha=0.6, density=True, label=f"normal (n={int((y == 0).sum())})"
    )
    ax.hist(s[y == 1], bins=bins, alpha=0.6, density=True, label=f"anomaly (n={int(y.sum())})")
    ax.set(xlabel="anomaly score (higher = more anomalous)", ylabel="density", title=title)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_learning_curve(
    path: str | Path,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    marks: Mapping[str, float] | None = None,
) -> Path:
    """AUROC vs epoch for one or several methods; ``marks`` = {label: epoch} vertical lines."""
    fig = new_figure()
    ax = fig.add_subplot()
    for name, (epochs, aurocs) in curves.items():
        e = np.asarray(epochs, dtype=np.float64)
        a = 100.0 * np.asarray(aurocs, dtype=np.float64)
        label = name
        if len(e):
            label = f"{name} (AULC {100 * aulc(e, a / 100.0):.1f})"
        ax.plot(e, a, marker="o" if len(e) < 30 else None, ms=3, lw=1.2, label=label)
    for i, (label, x) in enumerate((marks or {}).items()):
        ax.axvline(x, color=f"C{(i + len(curves)) % 10}", ls="--", lw=0.8, label=label)
    ax.set(xlabel="epoch", ylabel="AUROC %", title="Learning curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return save_png(fig, path)


def plot_projection(
    path: str | Path, features, labels, method: str = "pca", max_points: int = 3000, seed: int = 0
) -> Path:
    """2-D PCA of test features, normal vs anomalous (random subsample of ``max_points``)."""
    from sklearn.decomposition import PCA

    if method != "pca":
        raise ConfigError(f"unknown projection {method!r}; only 'pca' is supported.")
    x = np.asarray(features.detach().cpu() if hasattr(features, "detach") else features)
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    y = np.asarray(labels).reshape(-1)
    if x.shape[0] > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(x.shape[0], max_points, replace=False))
        x, y = x[idx], y[idx]
    n_comp = min(2, x.shape[0], x.shape[1])
    z = PCA(n_components=n_comp, random_state=seed).fit_transform(x)
    if z.shape[1] < 2:
        z = np.c_[z, np.zeros(len(z))]
    fig = new_figure((5.0, 4.5))
    ax = fig.add_subplot()
    ax.scatter(z[y == 0, 0], z[y == 0, 1], s=4, alpha=0.5, label="normal")
    ax.scatter(z[y == 1, 0], z[y == 1, 1], s=4, alpha=0.5, label="anomaly")
    ax.set(xlabel="PC 1", ylabel="PC 2", title=f"PCA of test features (n={len(y)})")
    ax.legend(fontsize=8, markerscale=3)
    return save_png(fig, path)


def write_plots(
    run_dir: str | Path,
    labels,
    scores_by_name: Mapping[str, np.ndarray],
    features=None,
    learning_curve=None,
    curve_label: str = "knn_cos:k=5",
) -> list[Path]:
    """Write the run's plots under ``run_dir/plots``: ROC, score histogram of the best scorer,
    learning curve (``(epochs, aurocs)`` or list of {"epoch", "auroc"}) and PCA projection."""
    from sklearn.metrics import roc_auc_score

    out_dir = Path(run_dir) / PLOTS_DIR
    y = np.asarray(labels).reshape(-1)
    written = []
    if scores_by_name:
        written.append(plot_roc(out_dir / "roc.png", y, scores_by_name))
        best = max(scores_by_name, key=lambda n: roc_auc_score(y, np.asarray(scores_by_name[n])))
        written.append(plot_score_hist(out_dir / "score_hist.png", y, scores_by_name[best], best))
    if learning_curve is not None and len(learning_curve):
        if isinstance(learning_curve, tuple) and len(learning_curve) == 2:
            epochs, aurocs = learning_curve
        else:
            pts = _curve_points(learning_curve)
            epochs, aurocs = [p["epoch"] for p in pts], [p["auroc"] for p in pts]
        if len(epochs):
            written.append(
                plot_learning_curve(out_dir / "learning_curve.png", {curve_label: (epochs, aurocs)})
            )
    if features is not None:
        written.append(plot_projection(out_dir / "projection.png", features, y))
    return written


def plot_drift(path: str | Path, drift: Mapping[str, list[dict]], unit: float = 255.0) -> Path:
    """Adversarial drift curves: mean score shift (in clean-normal score std units) against ε,
    one panel per detector (``drift``: label -> rows {eps, normal, class ...}), a line per
    group; held-out classes dashed."""
    fig = new_figure((5.0 * len(drift), 4.0))
    axes = [fig.add_subplot(1, len(drift), i + 1) for i in range(len(drift))]
    for ax, (label, rows) in zip(axes, drift.items(), strict=True):
        eps = [r["eps"] * unit for r in rows]
        for key in list(rows[0])[1:]:
            style = "--" if "held out" in key else "-"
            width = 2.5 if key == "normal" else 1.2
            ax.plot(eps, [r[key] for r in rows], style, lw=width, marker="o", ms=3, label=key)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("ε (1/255)" if unit == 255.0 else "ε")
        ax.set_ylabel("score shift (clean-normal std)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=6, ncol=2)
    return save_png(fig, path)
