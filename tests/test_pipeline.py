"""A whole run on the fixture: train -> results.json -> report.md -> plots; evaluate again; CLI."""

from __future__ import annotations

import json

import pytest

from firmad.cli import main
from firmad.config import load_config
from firmad.errors import CheckpointError, ConfigError
from firmad.hardware import resolve_amp
from firmad.pipeline import evaluate_run, train_run
from tests.conftest import DSVDD_TINY

RESULT_KEYS = {"scorer", "k", "variant", "auroc", "aupr_anomaly", "aupr_normal", "fpr95"}


def test_train_run_writes_a_complete_run(tmp_path, tiny):
    run = tmp_path / "run"
    summary = train_run(
        load_config("fmnist-cpu", tiny + ["train.eval_every=1"]), out_dir=run, quiet=True
    )
    data = json.loads((run / "results.json").read_text())
    assert summary["results"] == data
    for key in (
        "dataset",
        "normal_classes",
        "method",
        "backbone",
        "epochs",
        "seed",
        "subsample",
        "wall_time_s",
        "versions",
        "results",
    ):
        assert key in data
    assert data["dataset"] == "fashion-mnist" and data["normal_classes"] == [0]
    assert data["method"] == "firm" and data["epochs"] == 2
    # The precision it trained in: train.amp auto as resolved on this machine, and why.
    assert data["numerics"]["amp"] == resolve_amp("auto", "cpu")[0]
    assert data["numerics"]["amp_reason"].startswith("auto: ")
    assert {(r["scorer"], r["k"]) for r in data["results"]} == {("knn_cos", 5), ("centre", None)}
    for r in data["results"]:
        assert set(r) >= RESULT_KEYS and 0 <= r["auroc"] <= 1
    assert len(data["learning_curve"]) == 2
    assert "not a headline" in data["diagnostics"]["note"]
    report = (run / "report.md").read_text()
    assert "knn_cos" in report and "AUROC" in report
    assert {p.name for p in (run / "plots").glob("*.png") if p.stat().st_size > 0} >= {
        "roc.png",
        "score_hist.png",
        "learning_curve.png",
        "projection.png",
    }
    assert (run / "config.yaml").exists()

    # Re-scoring from the checkpoint gives the same numbers.
    again = evaluate_run(run, scorers=["knn_cos:k=5"], variants=["plain", "angled"])
    plain = [
        r
        for r in again["results"]["results"]
        if r["variant"] == "plain" and r["scorer"] == "knn_cos"
    ]
    first = [r for r in data["results"] if r["scorer"] == "knn_cos"]
    assert plain[0]["auroc"] == pytest.approx(first[0]["auroc"], abs=1e-9)
    assert {r["variant"] for r in again["results"]["results"]} == {"plain", "angled"}
    # Entries not re-scored (centre) are kept, not lost.
    kept = {(r["scorer"], r["variant"]) for r in again["results"]["results"]}
    assert ("centre", "plain") in kept and ("knn_cos", "angled") in kept


def test_existing_run_is_not_overwritten(tmp_path, tiny):
    run = tmp_path / "run"
    train_run(load_config("fmnist-cpu", tiny + ["train.epochs=1"]), out_dir=run, quiet=True)
    before = (run / "checkpoint.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="--resume"):
        train_run(load_config("fmnist-cpu", tiny), out_dir=run, quiet=True)
    assert (run / "checkpoint.safetensors").read_bytes() == before


def test_evaluate_refuses_an_unfinished_or_missing_run(tmp_path):
    with pytest.raises(CheckpointError):
        evaluate_run(tmp_path)


def test_cli_exit_codes(tmp_path, tiny, capsys):
    assert main(["--version"]) == 0
    assert "firmad" in capsys.readouterr().out
    # User errors: status 2 and a message, no traceback.
    assert main(["train", "--config", "no-such-recipe"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "Traceback" not in err
    assert main(["train", "--config", "fmnist-cpu", "--set", "train.epochs=-3"]) == 2
    assert "train.epochs" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
    assert main(["data", "show", "fashion-mnist", "--root", str(tmp_path / "missing")]) == 2
    assert main(["no-such-command"]) == 2


def test_cli_train_and_data_show(tmp_path, tiny, capsys):
    from tests.conftest import FIXTURE_FMNIST

    args = [
        "-q",
        "train",
        "--config",
        "fmnist-cpu",
        "--out",
        str(tmp_path / "r"),
        "--normal-class",
        "Trouser",
        "--epochs",
        "1",
    ]
    for item in tiny:
        args += ["--set", item]
    assert main(args) == 0
    assert "knn_cos" in capsys.readouterr().out
    assert json.loads((tmp_path / "r" / "results.json").read_text())["normal_classes"] == [1]
    assert main(["data", "show", "fashion-mnist", "--root", str(FIXTURE_FMNIST)]) == 0
    shown = capsys.readouterr().out
    assert "Trouser" in shown and "100" in shown


@pytest.mark.parametrize(("method", "own"), [("dsvdd", "svdd"), ("binary", "logit")])
def test_methods_own_scores_are_reported(tmp_path, tiny, method, own):
    extra = (DSVDD_TINY if method == "dsvdd" else [f"method.name={method}"]) + ["train.epochs=1"]
    summary = train_run(load_config("fmnist-cpu", tiny + extra), out_dir=tmp_path / "r", quiet=True)
    scorers = [r["scorer"] for r in summary["results"]["results"]]
    assert scorers[0] == own and "knn_cos" in scorers


def test_wall_time_of_a_resumed_run_counts_the_earlier_training(tmp_path, tiny):
    run = tmp_path / "run"
    cfg = load_config("fmnist-cpu", tiny + ["train.epochs=1"])
    train_run(cfg, out_dir=run, quiet=True, evaluate=False)
    # as if the first invocation had trained for 1000 s before it stopped
    meta_path = run / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "elapsed_s": 1000.0}))
    data = train_run(cfg, out_dir=run, quiet=True, resume=True)["results"]
    assert data["train_time_s"] == 1000.0
    assert data["wall_time_s"] >= 1000.0 + data["eval_time_s"] - 0.01
