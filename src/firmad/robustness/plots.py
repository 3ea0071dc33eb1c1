"""The two figures of an audit: AUROC vs ε (attack_auroc.png) and clean / adversarial /
amplified perturbation examples (attack_examples.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from firmad.perturb import attack_name

__all__ = ["plot_attack_auroc", "plot_attack_examples"]

_MODE_LABELS = {"normal": "normals attacked", "anomaly": "anomalies attacked", "both": "both"}


def _eps_axis(eps: float, norm: str) -> float:
    return eps * 255 if norm == "linf" else eps


def plot_attack_auroc(path: str | Path, result: dict[str, Any]) -> Path:
    """AUROC % vs ε, one curve (with its 95 % band) per target mode, chance at 50."""
    from firmad.report import new_figure, save_png

    st = result["settings"]
    norm = st["norm"]
    fig = new_figure()
    ax = fig.add_subplot()
    for i, mode in enumerate(st["targets_list"]):
        rows = sorted((r for r in result["rows"] if r["target"] == mode), key=lambda r: r["eps"])
        e = [_eps_axis(r["eps"], norm) for r in rows]
        ax.plot(
            e, [100 * r["auroc"] for r in rows], marker="o", ms=4, color=f"C{i}",
            label=_MODE_LABELS.get(mode, mode),
        )  # fmt: skip
        lo, hi = [100 * r["ci_low"] for r in rows], [100 * r["ci_high"] for r in rows]
        ax.fill_between(e, lo, hi, color=f"C{i}", alpha=0.15, lw=0)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    unit = "ε (x 1/255, L∞)" if norm == "linf" else "ε (L2, pixel space [0, 1])"
    sub = result["subset"]
    ax.set(xlabel=unit, ylabel="AUROC %", ylim=(0, 100))
    ax.set_title(
        f"{attack_name(st)}-{st['steps']} on the anomaly score (n = {sub['n']})", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_attack_examples(
    path: str | Path, clean, adv, labels, clean_scores, adv_scores, result: dict[str, Any]
) -> Path:
    """A grid: columns are normals then anomalies (score clean -> attacked), rows are the clean
    image, the adversarial one and the perturbation amplified to the full grey range."""
    from firmad.report import new_figure, save_png
    from firmad.robustness.construct import centre_perturbation

    st = result["settings"]
    eps = max(st["eps_list"])
    n = max(len(clean), 1)
    fig = new_figure((1.0 + 1.3 * n, 4.6))
    axes = fig.subplots(3, n, squeeze=False)
    pert = centre_perturbation(adv - clean) if len(clean) else adv
    rows = (("clean", clean), ("adversarial", adv), ("perturbation\n(amplified)", pert))
    for r, (name, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(images):
                ax.set_axis_off()
                continue
            img = images[c].clamp(0, 1).permute(1, 2, 0).numpy()
            if img.shape[2] == 1:
                ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(img, interpolation="nearest")
            if r == 0:
                kind = "anomaly" if int(labels[c]) == 1 else "normal"
                ax.set_title(
                    f"{kind}\n{float(clean_scores[c]):.3g} -> {float(adv_scores[c]):.3g}",
                    fontsize=7,
                )
        axes[r][0].set_ylabel(name, fontsize=8)
    eps_text = f"{eps * 255:.3g}/255" if st["norm"] == "linf" else f"{eps:.3g}"
    fig.suptitle(f"{st['norm']} eps = {eps_text}; anomaly score clean -> attacked", fontsize=9)
    return save_png(fig, path)
