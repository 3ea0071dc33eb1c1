"""`firmad attack` on a tiny trained run and a detector directory, its errors, the `attack` recipe
key (robustness in results.json), the sweep's progress calls and `firmad.models.complexity`."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from firmad.cli import main
from firmad.config import load_config
from firmad.data import one_vs_rest
from firmad.detector import OneClassDetector
from firmad.models import complexity
from firmad.pipeline import evaluate_run, train_run
from firmad.robustness import robust_auroc_sweep
from tests.conftest import FIXTURE_FMNIST, TINY
from tests.test_detector import TRAIN

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: 1 thread is faster

PNG = b"\x89PNG\r\n\x1a\n"
QUICK = ["--steps", "3", "--subset", "60"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("attack") / "run"
    train_run(load_config("fmnist-cpu", [*TINY, "train.epochs=1"]), out_dir=run, quiet=True)
    return run


def test_attack_on_a_run_writes_its_four_files(run_dir, capsys):
    assert main(["-q", "attack", str(run_dir), "--eps", "0,4,8", *QUICK]) == 0
    beside = run_dir.parent / "run.attack"  # the default --out: beside the run, not inside
    assert not (run_dir / "attack.json").exists()
    data = json.loads((beside / "attack.json").read_text())
    st = data["settings"]
    assert st["norm"] == "linf" and st["steps"] == 3 and st["eps_255"] == [0, 4, 8]
    assert st["eps_list"] == pytest.approx([0, 4 / 255, 8 / 255])
    sub = data["subset"]
    assert sub["n"] == 60 and sub["n_normal"] + sub["n_anomaly"] == 60 and sub["n_normal"] > 0
    assert len(data["rows"]) == 9  # 3 eps x (normal, anomaly, both)
    for r in data["rows"]:
        assert r["ci_low"] <= r["auroc"] <= r["ci_high"]
    both = {r["eps"]: r["auroc"] for r in data["rows"] if r["target"] == "both"}
    assert both[0] == pytest.approx(data["clean"]["auroc"])
    assert both[max(both)] < both[0]  # the attack works
    assert {v["name"] for v in data["verdicts"]} == {
        "monotone", "large_eps", "more_steps", "more_restarts"
    }  # fmt: skip
    d = data["detector"]
    assert (d["method"], d["backbone"], d["scorer"]) == ("firm", "resnet_small", "knn_cos")
    assert d["scorer_params"]["k"] == 5 and d["input"] == [3, 16, 16]
    model = OneClassDetector.from_run(run_dir).model_
    assert d["params"] == sum(p.numel() for p in model.encoder.parameters())
    assert d["flops"] > 1e5
    md = (beside / "attack.md").read_text()
    assert "| eps | normal | anomaly | both |" in md and "| 8/255 |" in md and "FLOPs" in md
    for name in ("attack_auroc.png", "attack_examples.png"):
        content = (beside / name).read_bytes()
        assert content.startswith(PNG) and len(content) > 5000
    shown = capsys.readouterr().out
    assert "| 4/255 |" in shown and "attack.json" in shown
    # the run is still a run: evaluation and resume do not see foreign files
    from firmad.run import RunDir

    assert not RunDir(run_dir).foreign_files() and RunDir(run_dir).state == "evaluated"


def test_attack_with_the_apgd_schedule(run_dir, tmp_path):
    out = tmp_path / "apgd"
    args = ["-q", "attack", str(run_dir), "--eps", "0,8", "--schedule", "apgd", "--no-checks"]
    assert main([*args, *QUICK, "--out", str(out)]) == 0
    data = json.loads((out / "attack.json").read_text())
    assert data["settings"]["schedule"] == "apgd"
    assert data["settings"]["step_size"] == "2*eps, halved"
    both = {r["eps"]: r["auroc"] for r in data["rows"] if r["target"] == "both"}
    assert both[max(both)] < both[0]
    assert "APGD-3" in (out / "attack.md").read_text()


@pytest.fixture(scope="module")
def det_dir(tmp_path_factory):
    """A fitted detector folder (its threshold set by fit)."""
    split = one_vs_rest("fashion-mnist", 0, root=str(FIXTURE_FMNIST))
    det = OneClassDetector(overrides=TRAIN, scorer="knn_cos", k=5).fit(split.train_images)
    folder = tmp_path_factory.mktemp("detector") / "det"
    det.save(folder)
    return folder


def test_attack_on_a_detector_needs_a_test_set(det_dir, tmp_path, capsys):
    capsys.readouterr()
    assert main(["-q", "attack", str(det_dir)]) == 2
    assert "--data" in capsys.readouterr().err
    out = tmp_path / "audit"
    args = ["-q", "attack", str(det_dir), "--data", "fashion-mnist", "--normal-class"]
    args += ["T-shirt/top", "--root", str(FIXTURE_FMNIST), "--norm", "l2", "--eps", "0,0.5"]
    args += ["--steps", "2", "--subset", "40", "--no-checks", "--out", str(out)]
    assert main(args) == 0
    data = json.loads((out / "attack.json").read_text())
    assert data["settings"]["eps_list"] == [0.0, 0.5] and "eps_255" not in data["settings"]
    assert data["checks_skipped"] and data["verdicts"] == []
    assert data["detector"]["source"] == str(det_dir)
    assert {p.name for p in out.iterdir()} == {
        "attack.json", "attack.md", "attack_auroc.png", "attack_examples.png"
    }  # fmt: skip
    assert not (det_dir / "attack.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "neither a run directory"),
        (["{run}", "--eps", "0,a"], "not a number"),
        (["{run}", "--eps", "0,300"], "1/255 units"),
        (["{run}", "--eps", "0,-1"], ">= 0"),
        (["{run}", "--norm", "l3"], "linf or l2"),
        (["{run}", "--targets", "both,all"], "targets must be some of normal, anomaly, both"),
        (["{run}", "--schedule", "cosine"], "fixed or apgd"),
        (["{run}", "--data", "fashion-mnist"], "run directory"),
        (["{run}", "--scorer", "nope"], "unknown scorer"),
    ],
)
def test_attack_errors_exit_2_with_a_message(run_dir, tmp_path, capsys, args, message):
    args = [a.format(missing=tmp_path / "none", run=run_dir) for a in args]
    assert main(["-q", "attack", *args, *QUICK]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_attack_recipe_key_adds_robustness_to_results(tmp_path):
    run = tmp_path / "run"
    attack = [
        "attack.enabled=true",
        "attack.eps=[0, 0.0314]",
        "attack.steps=2",
        "attack.subset=40",
        "attack.checks=false",
        "attack.schedule=apgd",
    ]
    cfg = load_config("fmnist-cpu", [*TINY, "method.name=binary", "train.epochs=1", *attack])
    results = train_run(cfg, out_dir=run, quiet=True)["results"]
    rob = results["robustness"]
    assert rob["detector"]["scorer"] == "logit"  # the binary classifier's own score
    assert rob["norm"] == "linf" and rob["n"] == 40 and rob["file"] == "attack.json"
    assert rob["schedule"] == "apgd" and "APGD-2" in (run / "report.md").read_text()
    assert {(r["eps_255"], r["target"]) for r in rob["rows"]} == {
        (e, t) for e in (0, 8.007) for t in ("normal", "anomaly", "both")
    }
    for r in rob["rows"]:
        assert r["ci_low"] <= r["auroc"] <= r["ci_high"]
    assert json.loads((run / "results.json").read_text())["robustness"] == rob
    assert (run / "attack.json").exists() and (run / "attack_examples.png").exists()
    assert "## Robustness" in (run / "report.md").read_text()
    # Re-scoring the same checkpoint keeps the entry without attacking again.
    before = (run / "attack.json").stat().st_mtime_ns
    again = evaluate_run(run, scorers=["centre"])["results"]
    assert again["robustness"] == rob and (run / "attack.json").stat().st_mtime_ns == before


def test_sweep_reports_progress():
    calls = []
    x = torch.rand(12, 1, 8, 8)
    y = torch.tensor([0, 1] * 6)
    robust_auroc_sweep(
        lambda v: v.mean((1, 2, 3)), x, y, eps_list=[0, 0.01, 0.02], steps=2,
        n_bootstrap=10, progress=lambda *a: calls.append(a),
    )  # fmt: skip
    total = calls[0][1]
    # 2 eps + large_eps + more_steps + more_restarts (the check eps reuses its sweep attack)
    assert total == 5 and [c[0] for c in calls] == list(range(total + 1))
    assert calls[-1] == (total, total, "done")


def test_complexity_counts_parameters_and_flops():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten())
    conv.train()
    cost = complexity(conv, (3, 8, 8))
    assert cost == {"params": 8 * 27 + 8, "flops": 2 * (8 * 8 * 8) * 27}
    assert conv.training  # the mode is restored


# --- quick defaults, resume, atomic set, checks before the work -----------------------------------

NO_CHECKS = ["--eps", "0,4,8", "--steps", "2", "--subset", "40", "--no-checks"]


class _Counting:
    """Wraps the gradient attack of the sweep: counts the attacks, raises Ctrl-C at call
    ``stop``."""

    def __init__(self, monkeypatch, stop: int | None = None):
        import firmad.robustness.evaluate as ev

        self.calls, self.stop, self.inner = 0, stop, ev.run_attack
        monkeypatch.setattr(ev, "run_attack", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        return self.inner(*args, **kwargs)


def test_attack_continues_after_ctrl_c_with_the_same_settings(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "a"
    counting = _Counting(monkeypatch, stop=2)
    assert main(["-q", "attack", str(run_dir), *NO_CHECKS, "--out", str(out)]) == 130
    assert not (out / "attack.json").exists()
    kept = out / ".attack-partial"
    assert (kept / "settings.json").is_file()
    assert len(list(kept.glob("*.safetensors"))) == 1  # eps 4/255
    # Other settings: refused, nothing attacked, the finished attack kept.
    counting.calls, counting.stop = 0, None
    assert main(["-q", "attack", str(run_dir), *NO_CHECKS, "--steps", "3", "--out", str(out)]) == 2
    assert counting.calls == 0 and (out / ".attack-partial").is_dir()
    # The same command continues: only eps 8/255 is attacked now.
    assert main(["-q", "attack", str(run_dir), *NO_CHECKS, "--out", str(out)]) == 0
    assert counting.calls == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "attack.json", "attack.md", "attack_auroc.png", "attack_examples.png"
    ]  # fmt: skip
    # Same numbers as a run that was never interrupted.
    fresh = tmp_path / "b"
    assert main(["-q", "attack", str(run_dir), *NO_CHECKS, "--out", str(fresh)]) == 0
    rows = [json.loads((d / "attack.json").read_text())["rows"] for d in (out, fresh)]
    assert rows[0] == rows[1]


def test_attack_mixed_settings_message(run_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "a"
    _Counting(monkeypatch, stop=1)
    assert main(["-q", "attack", str(run_dir), *NO_CHECKS, "--out", str(out)]) == 130
    capsys.readouterr()
    assert main(["-q", "attack", str(run_dir), *NO_CHECKS, "--seed", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unfinished attack made with other settings" in err and "seed" in err


def test_attack_files_are_a_set(run_dir, tmp_path, monkeypatch):
    import firmad.robustness.audit as audit

    out = tmp_path / "a"

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(audit, "plot_attack_examples", broken)
    assert main(["-q", "attack", str(run_dir), *NO_CHECKS, "--out", str(out)]) == 130
    assert (out / "attack.incomplete").exists() and not audit.attack_files_complete(out)
    assert not (out / "attack.json").exists()
    monkeypatch.undo()
    counting = _Counting(monkeypatch)
    assert main(["-q", "attack", str(run_dir), *NO_CHECKS, "--out", str(out)]) == 0
    assert counting.calls == 0  # every attack was kept
    assert audit.attack_files_complete(out) and not (out / "attack.incomplete").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "{file}/sub"], "cannot write into"),
        (["--out", "{file}"], "is a file"),
        (["--subset", "1"], "use >= 2"),
        (["--seed", "-5"], "--seed': Input should be greater than or equal to 0"),
        (["--norm", "l2", "--eps", "0,1e9"], "sqrt(C*H*W) = 16"),
        (["--attack", "square", "--norm", "l2", "--eps", "0,1"], "norm='linf' only"),
        (["--attack", "evil"], "attack must be one of ('pgd', 'ensemble', 'square')"),
        (["--input", "raw"], "model or native"),
        (["--transfer-from", "{missing}"], "neither a run directory"),
    ],
)
def test_attack_refuses_before_any_attack(run_dir, tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "file").write_text("mine")
    args = [a.format(file=tmp_path / "file", missing=tmp_path / "none") for a in args]
    counting = _Counting(monkeypatch)
    assert main(["-q", "attack", str(run_dir), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert counting.calls == 0 and (tmp_path / "file").read_text() == "mine"


def test_attack_threat_model_native_input_and_transfer(run_dir, tmp_path):
    out = tmp_path / "native"
    args = ["-q", "attack", str(run_dir), "--eps", "0,8", "--steps", "2", "--subset", "40"]
    args += ["--input", "native", "--transfer-from", str(run_dir), "--out", str(out)]
    assert main(args) == 0
    data = json.loads((out / "attack.json").read_text())
    st = data["settings"]
    assert st["input_space"] == "native" and st["input_shape"] == [1, 28, 28]
    assert "native size (1 x 28 x 28" in st["threat_model"]
    assert st["transfer_from"] == str(run_dir)
    verdicts = {v["name"]: v for v in data["verdicts"]}
    assert verdicts["transfer"]["passed"]  # the same detector: the transfer equals white-box
    assert "Threat model" in (out / "attack.md").read_text()
    wins = next(r["wins"] for r in data["rows"] if r["target"] == "anomaly" and r["eps"] > 0)
    assert "surrogate:image" in wins  # the quick default adds the pixel-space target


def test_attack_prints_plain_progress_lines_when_not_a_terminal(run_dir, tmp_path, capsys):
    args = ["attack", str(run_dir), *NO_CHECKS, "--out", str(tmp_path / "a")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "attack 1/2 eps=4/255" in err and "attack 2/2 eps=8/255" in err
    assert "attack done" in err


# --- resume caches that prove themselves, Ctrl-C inside an attack, --out, decisions ---------------

THREE = ["--eps", "0,2,4,8", "--subset", "40", "--no-checks"]


def test_lost_settings_file_no_stale_attack_is_reused(run_dir, tmp_path, monkeypatch, capsys):
    """The issue's case: --steps 6 stopped after two finished attacks, settings.json deleted,
    then --steps 1: the APGD-6 partials are discarded with a message, never reused."""
    out = tmp_path / "a"
    _Counting(monkeypatch, stop=3)
    assert main(["-q", "attack", str(run_dir), *THREE, "--steps", "6", "--out", str(out)]) == 130
    assert len(list((out / ".attack-partial").glob("*.safetensors"))) == 2
    (out / ".attack-partial" / "settings.json").unlink()
    monkeypatch.undo()
    counting = _Counting(monkeypatch)
    capsys.readouterr()
    assert main(["-q", "attack", str(run_dir), *THREE, "--steps", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "its settings file is missing" in err
    assert err.count("made with other settings (steps: 6 then, 1 now)") == 2
    assert counting.calls == 3  # every attack made again, with APGD-1
    fresh = tmp_path / "b"
    assert main(["-q", "attack", str(run_dir), *THREE, "--steps", "1", "--out", str(fresh)]) == 0
    rows = [json.loads((d / "attack.json").read_text())["rows"] for d in (out, fresh)]
    assert rows[0] == rows[1]


class _StopInside:
    """Wraps the sweep's gradient attack: Ctrl-C at step ``step`` of attack number ``attack``."""

    def __init__(self, monkeypatch, attack: int, step: int):
        import firmad.robustness.evaluate as ev

        self.calls, self.attack, self.step, self.inner = 0, attack, step, ev.run_attack
        monkeypatch.setattr(ev, "run_attack", self)

    def __call__(self, *args, on_step=None, **kwargs):
        self.calls += 1
        current = self.calls

        def hook(done, total):
            if on_step is not None:
                on_step(done, total)
            if current == self.attack and done == self.step:
                raise KeyboardInterrupt

        return self.inner(*args, on_step=hook, **kwargs)


def test_ctrl_c_keeps_the_finished_batches_of_the_attack_in_progress(
    run_dir, tmp_path, monkeypatch, capsys
):
    out, fresh = tmp_path / "a", tmp_path / "b"
    args = ["-q", "attack", str(run_dir), *NO_CHECKS, "--batch-size", "10"]
    # 5 gradient sources (exact, kde, centre, image, start) x 4 batches of 10, 2 steps each
    _StopInside(monkeypatch, attack=2, step=2 * 6 + 1)
    assert main([*args, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "finished batches of the attack in progress, are kept" in err
    assert len(list((out / ".attack-partial").glob("*.progress.safetensors"))) == 1
    monkeypatch.undo()
    assert main([*args, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "eps=8/255: continued after 6 of 20 finished batches" in captured.err
    said = "Resumed: reused 1 finished attack(s) (eps=4/255); continued eps=8/255 after 6 of 20"
    assert said in captured.out and said in (out / "attack.md").read_text()
    assert main([*args, "--out", str(fresh)]) == 0
    rows = [json.loads((d / "attack.json").read_text())["rows"] for d in (out, fresh)]
    assert rows[0] == rows[1]  # the same numbers as an attack never interrupted


def test_attack_out_refuses_a_folder_of_other_files_or_inside_an_input(run_dir, tmp_path, capsys):
    images = tmp_path / "mine"
    images.mkdir()
    (images / "a.png").write_bytes(PNG)
    before = sorted(p.name for p in run_dir.iterdir())
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    for out, message in [
        (images, "holds images of yours (e.g. a.png)"),
        (other, "not an attack's (todo.txt)"),
        (run_dir, "is inside the input"),
        (run_dir / "audit", "is inside the input"),
    ]:
        assert main(["-q", "attack", str(run_dir), *NO_CHECKS, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert [p.name for p in images.iterdir()] == ["a.png"]
    assert [p.name for p in other.iterdir()] == ["todo.txt"]
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_decisions_at_the_threshold_of_a_detector_none_for_a_run(run_dir, det_dir, tmp_path):
    out = tmp_path / "run-audit"
    assert main(["-q", "attack", str(run_dir), *NO_CHECKS, "--out", str(out)]) == 0
    data = json.loads((out / "attack.json").read_text())
    assert data["threshold"] is None and "no decision threshold" in data["threshold_note"]
    assert "Decisions: the detector has no decision threshold" in (out / "attack.md").read_text()
    out = tmp_path / "det-audit"
    args = ["-q", "attack", str(det_dir), "--data", "fashion-mnist", "--normal-class"]
    args += ["0", "--root", str(FIXTURE_FMNIST), *NO_CHECKS, "--out", str(out)]
    assert main(args) == 0
    data = json.loads((out / "attack.json").read_text())
    assert data["threshold"] == pytest.approx(OneClassDetector.load(det_dir).threshold_)
    both = next(r for r in data["rows"] if r["target"] == "both" and r["eps"] > 0)
    d = both["decisions"]
    assert d["normals_flagged"] <= data["subset"]["n_normal"]
    assert d["normals_pushed_over"] >= 0 and d["anomalies_pulled_under"] >= 0
    assert "Decisions at the detector's threshold" in (out / "attack.md").read_text()
