"""Adding a method or a scorer is one module plus one registry line: a dummy method and a
dummy scorer, registered here only, train and evaluate through the whole run path."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from firmad.config import load_config
from firmad.errors import ConfigError
from firmad.methods import METHODS, Method
from firmad.pipeline import train_run
from firmad.scoring import SCORERS, Scorer, score_run
from firmad.scoring.scorers import as_features


class NormPull(Method):
    """A dummy objective: pull the normals' feature norms towards ``radius``."""

    name = "normpull"
    uses_outliers = False

    def __init__(self, tau: float = 0.2) -> None:
        self.radius = 1.0 / tau

    def embedding_loss(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (z.norm(dim=1) - self.radius).pow(2).mean()


class KnnL2Scorer(Scorer):
    """A dummy scorer: mean Euclidean distance to the ``k`` nearest bank features."""

    name = "knn_l2"
    fitted = ("bank_",)
    result_keys = ("k",)

    def __init__(self, k: int = 5) -> None:
        super().__init__()
        self.k = int(k)

    def fit(self, bank) -> KnnL2Scorer:
        self.bank_ = as_features(bank, "bank features").detach().double()
        return self

    def forward(self, features) -> torch.Tensor:
        d = torch.cdist(self.prepare(features), self.bank_)
        return d.topk(self.k, dim=1, largest=False).values.mean(1)


def _register(monkeypatch):
    monkeypatch.setitem(METHODS, NormPull.name, NormPull)  # the one registry line of each
    monkeypatch.setitem(SCORERS, KnnL2Scorer.name, KnnL2Scorer)


def test_a_new_method_and_scorer_train_and_evaluate(tmp_path, tiny, monkeypatch):
    _register(monkeypatch)
    cfg = load_config(
        "fmnist-cpu",
        [*tiny, "method.name=normpull", "method.tau=0.5", "outliers.kinds=[]",
         "eval.scorers=[knn_l2:k=1, knn_l2:k=5, centre]", "eval.variants=[plain, angled]"],
    )  # fmt: skip
    summary = train_run(cfg, out_dir=tmp_path / "run", quiet=True)
    rows = summary["results"]["results"]
    got = [(r["scorer"], r["k"], r["variant"]) for r in rows]
    assert got == [
        ("knn_l2", 1, "plain"), ("knn_l2", 1, "angled"),
        ("knn_l2", 5, "plain"), ("knn_l2", 5, "angled"),
        ("centre", None, "plain"), ("centre", None, "angled"),
    ]  # fmt: skip
    assert all(0.0 <= r["auroc"] <= 1.0 for r in rows)
    assert rows[0]["auroc"] != rows[2]["auroc"]  # k=1 and k=5 are two results
    report = (tmp_path / "run" / "report.md").read_text()
    assert "knn_l2 k=1" in report and "knn_l2 k=5" in report
    log = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all(torch.isfinite(torch.tensor(json.loads(line)["loss"])) for line in log)


def test_a_new_scorers_result_keys_name_each_row(monkeypatch):
    _register(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 1, 8, 8), generator=gen, dtype=torch.uint8)
    labels = torch.arange(24) % 2
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6))
    results, details = score_run(
        encoder, images, images, labels, ["knn_l2:k=1", "knn_l2:k=3"],
        variants=("plain", "angled"), size=8, return_details=True,
    )  # fmt: skip
    assert [r["k"] for r in results] == [1, 1, 3, 3]
    assert sorted(details["scores"]) == [
        "knn_l2 k=1 (angled)", "knn_l2 k=1 (plain)", "knn_l2 k=3 (angled)", "knn_l2 k=3 (plain)"
    ]  # fmt: skip


def test_the_registry_decides_names_and_outliers(tiny, monkeypatch):
    with pytest.raises(ConfigError, match="method.name: unknown method 'nope'.*firm"):
        load_config("fmnist-cpu", [*tiny, "method.name=nope"])

    class NeedsOutliers(NormPull):
        name = "needs-outliers"
        uses_outliers = requires_outliers = True

    monkeypatch.setitem(METHODS, NeedsOutliers.name, NeedsOutliers)
    with pytest.raises(ConfigError, match="needs-outliers' needs outliers"):
        load_config("fmnist-cpu", [*tiny, "method.name=needs-outliers", "outliers.kinds=[]"])


def test_the_detectors_k_reaches_a_new_scorer_with_a_k(tiny, monkeypatch):
    """`OneClassDetector(scorer=..., k=...)` passes k to any scorer whose result keys have
    one (read from the registry), and to no other."""
    from firmad.detector import OneClassDetector

    _register(monkeypatch)
    det = OneClassDetector(scorer="knn_l2", k=3, overrides=tiny)
    det.config_ = det.make_config()
    assert det._scorer_spec() == ("knn_l2", {"k": 3})
    det.set_params(scorer="knn_l2:k=2")
    assert det._scorer_spec() == ("knn_l2", {"k": 2})  # the spec's own k wins
    det.set_params(scorer="centre")
    assert det._scorer_spec() == ("centre", {})
