"""Tests for firmad.report: results.json, report.md, plots, CLI table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from firmad.report import (
    DIAGNOSTIC_NOTE,
    format_table,
    plot_learning_curve,
    plot_projection,
    write_plots,
    write_report_md,
    write_results,
)

RESULTS = [
    {"scorer": "knn_cos", "k": 1, "variant": "plain", "auroc": 0.9131, "aupr_anomaly": 0.99,
     "aupr_normal": 0.52, "fpr95": 0.4012},
    {"scorer": "knn_cos", "k": 5, "variant": "plain", "auroc": 0.9534, "aupr_anomaly": 0.995,
     "aupr_normal": 0.61, "fpr95": 0.25},
    {"scorer": "kde", "k": None, "variant": "angled", "auroc": 0.9012, "aupr_anomaly": 0.98,
     "aupr_normal": 0.5, "fpr95": 0.5},
]  # fmt: skip

META = {
    "dataset": "fashion-mnist",
    "normal_classes": [0],
    "normal_class_names": ["T-shirt/top"],
    "method": "firm",
    "backbone": "resnet_small",
    "epochs": 20,
    "seed": 0,
    "subsample": {"max_train": 500, "max_test": 1000, "seed": 0, "n_train": 500, "n_test": 1000},
    "wall_time_s": 321.5,
    "learning_curve": [
        {"epoch": 5, "auroc": 0.8},
        {"epoch": 10, "auroc": 0.9},
        {"epoch": 20, "auroc": 0.95},
    ],  # fmt: skip
    "diagnostics": {"best_curve_auroc": 0.95, "best_curve_epoch": 20},
}


def test_write_results_json(tmp_path: Path) -> None:
    path = write_results(tmp_path, META, RESULTS)
    assert path == tmp_path / "results.json"
    data = json.loads(path.read_text())
    for key in ("dataset", "normal_classes", "method", "backbone", "epochs", "seed", "subsample",
                "wall_time_s", "versions", "results", "learning_curve", "diagnostics"):  # fmt: skip
        assert key in data, key
    assert data["results"] == RESULTS
    assert set(data["versions"]) == {
        "firmad", "torch", "torchvision", "numpy", "sklearn", "faiss", "python"
    }  # fmt: skip
    assert data["diagnostics"]["note"] == DIAGNOSTIC_NOTE
    # epochs 5, 10, 20 -> progress 0, 1/3, 1
    assert data["aulc"] == pytest.approx((0.8 + 0.9) / 2 / 3 + (0.9 + 0.95) / 2 * 2 / 3)
    assert data["normal_class_names"] == ["T-shirt/top"]
    # atomic write: no temporary files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    # numpy values serialise
    write_results(tmp_path, {"dataset": "x", "seed": np.int64(3)}, [{"auroc": np.float32(0.5)}])
    assert json.loads(path.read_text())["seed"] == 3


def test_report_md_and_plots(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(60), np.ones(40)].astype(int)
    scores = {
        "knn_cos k=5 (plain)": rng.normal(size=100) + 2.0 * labels,
        "kde (plain)": rng.normal(size=100) + 0.5 * labels,
    }
    feats = rng.normal(size=(100, 8)) + labels[:, None]
    paths = write_plots(
        tmp_path, labels, scores, feats, learning_curve=([5, 10, 20], [0.8, 0.9, 0.95])
    )
    names = {p.name for p in paths}
    assert names == {"roc.png", "score_hist.png", "learning_curve.png", "projection.png"}
    for p in paths:
        assert p.exists() and p.stat().st_size > 1000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads(write_results(tmp_path, META, RESULTS).read_text())
    md = write_report_md(tmp_path, data).read_text()
    assert "fashion-mnist" in md and "resnet_small" in md and "T-shirt/top" in md
    assert "5 min 22 s" in md  # wall time 321.5 s
    assert "| Scorer | Variant | AUROC % | AUPR-anomaly % | AUPR-normal % | FPR95 % |" in md
    assert "| knn_cos:k=5 | plain | **95.3** | 99.5 | 61.0 | 25.0 |" in md
    assert "| kde | angled | 90.1 | 98.0 | 50.0 | 50.0 |" in md
    assert md.count("**") == 2  # only the best AUROC is bold
    for name in names:
        assert f"(plots/{name})" in md
    diag = md.index("## Diagnostics")
    assert DIAGNOSTIC_NOTE in md[diag:]
    assert md.index("## Results") < diag
    assert "AULC" in md


def test_report_md_without_optional_sections(tmp_path: Path) -> None:
    meta = {k: v for k, v in META.items() if k not in ("learning_curve", "diagnostics")}
    data = json.loads(write_results(tmp_path, meta, RESULTS[:1]).read_text())
    assert "diagnostics" not in data and "learning_curve" not in data
    md = write_report_md(tmp_path, data).read_text()
    assert "Diagnostics" not in md and "## Plots" not in md
    assert "**91.3**" in md


def test_learning_curve_several_methods_and_projection_subsample(tmp_path: Path) -> None:
    p = plot_learning_curve(
        tmp_path / "lc.png",
        {"FIRM": ([1, 2, 3], [0.7, 0.8, 0.9]), "NT-Xent": ([1, 2, 3], [0.6, 0.65, 0.7])},
        marks={"last checkpoint": 3},
    )
    assert p.stat().st_size > 1000
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(5000, 4))
    labels = rng.integers(0, 2, 5000)
    assert plot_projection(tmp_path / "pca.png", feats, labels).stat().st_size > 1000


def test_format_table() -> None:
    table = format_table(RESULTS)
    lines = table.splitlines()
    assert lines[0].split() == [
        "scorer",
        "variant",
        "AUROC",
        "AUPR-anomaly",
        "AUPR-normal",
        "FPR95",
    ]
    assert set(lines[1]) <= {"-", " "}
    assert lines[3].split() == ["knn_cos:k=5", "plain", "95.3", "99.5", "61.0", "25.0"]
    assert lines[4].split()[:3] == ["kde", "angled", "90.1"]
    assert len({len(line) for line in lines[:2]}) == 1
