"""Adding a method or a scorer is one module plus one registry line: a dummy method with a
setting of its own (and its own defaults), registered here only, and a dummy scorer with two
parameters in a module of its own (tests/knn_rbf_scorer.py, registered by its decorator), train
and evaluate through the whole run path; results are named by the scorer's every parameter."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import Field
from torch import nn

from firmad.cli import main
from firmad.config import load_config
from firmad.errors import ConfigError
from firmad.factory import build_method
from firmad.methods import METHODS, Method, MethodSettings
from firmad.pipeline import train_run
from firmad.scoring import SCORERS, ScoreOptions, ScorerSpec, score_run

ROOT = Path(__file__).resolve().parents[1]


class NormPull(Method):
    """A dummy objective: pull the normals' feature norms towards ``radius``."""

    name = "normpull"
    uses_outliers = False

    class Settings(MethodSettings):
        radius: float = Field(3.0, gt=0)  # a setting no other method has, its own default
        tau: float = Field(0.5, gt=0)  # a key others have, with another default

    def embedding_loss(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (z.norm(dim=1) - self.settings.radius).pow(2).mean() * self.settings.tau


@pytest.fixture
def registered(monkeypatch):
    """The dummy method (its one registry line) and the dummy scorer module (imported, as
    `firmad.scoring` would import it); the registries are restored afterwards."""
    monkeypatch.setitem(METHODS, NormPull.name, NormPull)
    before = dict(SCORERS)
    sys.modules.pop("tests.knn_rbf_scorer", None)
    module = importlib.import_module("tests.knn_rbf_scorer")
    yield module.KnnRbfScorer
    SCORERS.clear()
    SCORERS.update(before)


def test_a_new_methods_own_defaults_are_used_and_its_setting_is_its_own(tiny, registered):
    cfg = load_config("fmnist-cpu", [*tiny, "method.name=normpull"])
    assert cfg.method.model_dump() == {"name": "normpull", "radius": 3.0, "tau": 0.5}
    method = build_method(cfg)
    assert (method.settings.radius, method.settings.tau) == (3.0, 0.5)  # not firm's tau 0.2
    z = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(8, dtype=torch.int64)
    direct = NormPull(radius=3.0, tau=0.5)
    assert torch.equal(method.embedding_loss(z, labels), direct.embedding_loss(z, labels))
    set_ = load_config("fmnist-cpu", [*tiny, "method.radius=2", "method.name=normpull"])
    assert set_.method.radius == 2.0
    for other in ("firm", "ntxent", "dsvdd"):
        with pytest.raises(ConfigError, match=f"method: {other} does not take .'radius'.") as err:
            load_config("fmnist-cpu", [*tiny, f"method.name={other}", "method.radius=2"])
        assert "the keys of method" in str(err.value)  # its own keys listed
    with pytest.raises(ConfigError, match="normpull does not take .'loss_mode'.*radius, tau"):
        load_config("fmnist-cpu", [*tiny, "method.name=normpull", "method.loss_mode=concat"])


def test_a_key_a_method_does_not_take_is_refused_before_any_work(tmp_path, tiny, registered):
    out = tmp_path / "run"
    sets = [a for s in [*tiny, "method.radius=2"] for a in ("--set", s)]
    assert main(["-q", "train", "--config", "fmnist-cpu", *sets, "--out", str(out)]) == 2
    assert not out.exists()


def test_a_new_method_and_scorer_train_and_evaluate(tmp_path, tiny, registered):
    """kde:scale=5 and kde:scale=50 are two rows with their own AUROCs, in results.json, the
    report, bench.csv and a grid headline; knn_rbf's bw=5 is the same row written 5 or 5.0."""
    from firmad.bench.grid import Cell, GridConfig
    from firmad.bench.tables import summarise

    scorers = "[kde:scale=5, kde:scale=50.0, knn_rbf:k=3, knn_rbf:bw=5.0, centre]"
    cfg = load_config(
        "fmnist-cpu",
        [*tiny, "method.name=normpull", "outliers.kinds=[]", f"eval.scorers={scorers}",
         "eval.variants=[plain, angled]"],
    )  # fmt: skip
    summary = train_run(cfg, out_dir=tmp_path / "run", quiet=True)
    rows = summary["results"]["results"]
    got = [(r["label"], r["variant"]) for r in rows]
    labels = ["kde:scale=5", "kde:scale=50", "knn_rbf:k=3", "knn_rbf:k=3,bw=5", "centre"]
    assert got == [(label, v) for label in labels for v in ("plain", "angled")]
    assert rows[6]["params"] == {"k": 3, "bw": 5.0} and rows[0]["params"] == {"scale": 5.0}
    auroc = {(r["label"], r["variant"]): r["auroc"] for r in rows}
    assert auroc["kde:scale=5", "angled"] != auroc["kde:scale=50", "angled"]
    report = (tmp_path / "run" / "report.md").read_text()
    for label in labels:
        assert f"| {label} | plain |" in report
    pct = {key: f"{100 * a:.1f}" for key, a in auroc.items()}
    for scale in ("5", "50"):
        assert f"| kde:scale={scale} | plain | {pct[f'kde:scale={scale}', 'plain']}" in (
            report.replace("**", "")
        )
    log = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all(torch.isfinite(torch.tensor(json.loads(line)["loss"])) for line in log)

    cell = Cell("fmnist-cpu", "fashion-mnist", 0, 0, tmp_path / "run")
    for headline in ("kde:scale=5.0", "kde:scale=50", "knn_rbf:k=3,bw=5"):
        out = tmp_path / headline.replace(":", "_")
        out.mkdir()
        result = summarise(GridConfig(headline=headline), [cell], out)
        table = result["markdown"].split("### ")[0]  # the headline table only
        label = ScorerSpec.parse(headline).label
        assert f"with {label} (plain)" in table
        assert f"| 0 T-shirt/top | {pct[label, 'plain']} |" in table
    csv = (tmp_path / "kde_scale=5.0" / "bench.csv").read_text().splitlines()
    header = csv[0].split(",")
    assert header[6:10] == ["scorer", "label", "params", "k"]
    kde = [line for line in csv if ",kde:scale=" in line and ",plain," in line]
    assert [line.split(",")[7] for line in kde] == ["kde:scale=5", "kde:scale=50"]
    assert '"{""scale"": 5.0}"' in kde[0] and '"{""scale"": 50.0}"' in kde[1]


def test_a_new_scorers_parameters_name_each_row(registered):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 1, 8, 8), generator=gen, dtype=torch.uint8)
    labels = torch.arange(24) % 2
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6))
    results, details = score_run(
        encoder, images, images, labels, ["knn_rbf:k=1", "knn_rbf:k=3,bw=0.5"],
        variants=("plain", "angled"), options=ScoreOptions(size=8), return_details=True,
    )  # fmt: skip
    assert [r["params"] for r in results] == [{"k": 1, "bw": 1.0}] * 2 + [{"k": 3, "bw": 0.5}] * 2
    assert sorted(details["scores"]) == [
        "knn_rbf:k=1 (angled)", "knn_rbf:k=1 (plain)",
        "knn_rbf:k=3,bw=0.5 (angled)", "knn_rbf:k=3,bw=0.5 (plain)",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="knn_rbf:k=3 is listed twice"):
        opts = ScoreOptions(size=8)
        score_run(encoder, images, images, labels, ["knn_rbf:k=3", "knn_rbf:bw=1.0"], options=opts)
    with pytest.raises(ConfigError, match="unknown parameter 'c'; allowed: k, bw"):
        ScorerSpec.parse("knn_rbf:c=1")
    with pytest.raises(ConfigError, match="bw must be a finite number > 0"):
        ScorerSpec.parse("knn_rbf:bw=-1")
    scorer = registered(k=2, bw=0.5).fit(torch.randn(5, 3))
    assert "bandwidth 0.5" in scorer.explain_scale(5) and scorer.spec.label == "knn_rbf:k=2,bw=0.5"


def test_a_scorer_in_its_own_module_imports_first_without_a_cycle():
    """In a fresh interpreter, the scorer's module is the first thing imported."""
    code = (
        "import tests.knn_rbf_scorer as m; from firmad.scoring import SCORERS; "
        "assert SCORERS['knn_rbf'] is m.KnnRbfScorer and 'knn_cos' in SCORERS"
    )
    env = {"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=120)


def test_the_registry_decides_names_and_outliers(tiny, monkeypatch):
    with pytest.raises(ConfigError, match="method.name: unknown method 'nope'.*firm"):
        load_config("fmnist-cpu", [*tiny, "method.name=nope"])

    class NeedsOutliers(NormPull):
        name = "needs-outliers"
        uses_outliers = requires_outliers = True

    monkeypatch.setitem(METHODS, NeedsOutliers.name, NeedsOutliers)
    with pytest.raises(ConfigError, match="needs-outliers' needs outliers"):
        load_config("fmnist-cpu", [*tiny, "method.name=needs-outliers", "outliers.kinds=[]"])


def test_the_detectors_k_reaches_a_new_scorer_with_a_k(tiny, registered):
    """`OneClassDetector(scorer=..., k=...)` passes k to any scorer that takes one, and to no
    other."""
    from firmad.detector import OneClassDetector

    det = OneClassDetector(scorer="knn_rbf", k=3, overrides=tiny)
    det.config_ = det.make_config()
    assert det._scorer_spec() == ("knn_rbf", {"k": 3})
    det.set_params(scorer="knn_rbf:k=2")
    assert det._scorer_spec() == ("knn_rbf", {"k": 2})  # the spec's own k wins
    det.set_params(scorer="centre")
    assert det._scorer_spec() == ("centre", {})
