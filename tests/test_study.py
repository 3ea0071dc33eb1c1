"""The robust / non-robust feature study at toy scale on the fixture: every stage runs and is
recorded, each floor stops its stage, the rule gives its verdicts, fresh models start from
their own weights, cells through the executors give the numbers of one process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from firmad.cli import main
from firmad.data import load_dataset
from firmad.robustness.study import (
    RULE,
    ConstructionError,
    read_study,
    rule,
    run_study,
    step_plan,
    t_interval,
)
from firmad.robustness.study.stats import NO_VERDICT, NOT_USEFUL, SIGNAL, USEFUL, weakest
from tests.conftest import FIXTURE_FMNIST, TINY

TRAIN = [
    o
    for o in TINY
    if not o.startswith(
        ("eval.", "train.epochs", "train.steps_per_epoch", "model.backbone", "model.width")
    )
]
ADV = [
    "adversarial.enabled=true",
    "adversarial.norm=l2",
    "adversarial.eps=0.5",
    "adversarial.steps=2",
]


def toy(**changes) -> dict:
    study = {
        "name": "toy",
        "recipe": "fmnist-cpu",
        "binary_recipe": "fmnist-cpu-binary",
        "backbone": "resnet_small@0.25",
        "classes": [0],
        "seeds": [0],
        "set": [*TRAIN, "train.threads=1"],
        "binary_set": ["eval.resize_ratio=1.0"],
        "robust_set": list(ADV),
        "binary_robust_set": list(ADV),
        "train_steps": 4,
        "holdout_n": 16,
        "construct_n": 8,
        "reach_eps": [4.0, 8.0],
        "construct_steps": 5,
        "reach_floor": 0.5,
        "reference_floor": 0.0,
        "reference_min_accuracy": 0.0,  # a 4-step reference cannot classify
        "invert_n": 6,
        "inversion_steps": 3,
        "reachability_n": 4,
        "reachability_steps": 2,
        # 3 inversion steps cannot converge, nor can a 4-step robust encoder be robust: the
        # floors are opened here and closed in the tests of the floors
        "convergence_ratio": 1.0,
        "convergence_share": 0.0,
        "robust_floor_margin": -1.0,
        "transfer_backbone": None,
        "attack_eps": [0.0, 0.5],
        "attack_steps": 2,
        "attack_subset": 40,
        "robust_checks": False,
        "probe_radii": [],
        "n_bootstrap": 100,
        "batch_size": 64,
        "reductions": ["toy scale for a test"],
    }
    study.update(changes)
    return study


def write(tmp_path, study, name: str = "study.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(study))
    return str(path)


def test_study_runs_every_stage_records_and_resumes(tmp_path, capsys, one_thread):
    path = write(
        tmp_path,
        toy(
            transfer_backbone="resnet_small@0.125",
            transfer_sets=["D_det", "flip", "D_NR-grey", "starts-grey"],
        ),
    )
    out = tmp_path / "out"
    assert main(["-q", "features", "--config", path, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Verdicts" in printed and "toy scale" in printed and "flip_noise" in printed
    result = json.loads((out / "study.json").read_text())
    cell = result["cells"]["c0-s0"]
    binary, one = cell["binary"], cell["one_class"]
    assert set(binary["sets"]) == {
        "D_clean",
        "D_det",
        "flip",
        "flip_noise",
        "D_rand",
        "shuffle",
        "shuffle_noise",
    }
    assert set(one["sets"]) == {
        "D",
        "D_R-other",
        "D_NR-other",
        "starts-other",
        "D_R-grey",
        "D_NR-grey",
        "starts-grey",
        "normals",
    }
    assert set(binary["transfer"]) == {"D_det", "flip"}
    assert set(one["transfer"]) == {"D_NR-grey", "starts-grey"}
    assert binary["transfer"]["flip"]["attacked"] == {}  # the transfer variant: clean only
    # every model trained the same steps; fresh ones from their own seeds and weights
    models = {**binary["models"], **one["models"]}
    assert len(models) == 2 + 7 + 2 + 2 + 7 + 2
    assert {m["sgd_steps"] for m in models.values()} == {4}
    sources = {models[k]["init_digest"] for k in ("binary-standard", "standard")}
    fresh = {
        k: m
        for k, m in models.items()
        if k not in ("binary-standard", "binary-robust", "standard", "robust")
    }
    assert all(m["init_seed"] != 0 and m["init_digest"] not in sources for m in fresh.values())
    assert len({m["init_digest"] for m in fresh.values()}) == len(fresh)
    assert models["binary-on_D_det-transfer"]["backbone"] == "resnet_small@0.125"
    assert result["summary"]["fresh_inits"] == {
        "fresh_models": len(fresh),
        "differ_from_sources": len(fresh),
        "all_differ": True,
    }
    # the constructions' records: reach on the relabelled images only, the reference read on
    # held-out images, survival not measured on plain views, the noise control's size
    det, rand = binary["constructions"]["D_det"], binary["constructions"]["D_rand"]
    assert det["n_relabelled"] == 16 and rand["n_relabelled"] < 16
    assert det["reference"]["n_held_out"] == 32
    assert det["survival"] == {"measured": False, "reason": det["survival"]["reason"]}
    assert det["noise_control"]["achieved_over_target_median"] == pytest.approx(1.0, abs=0.05)
    flip, noise = (
        load_dataset(f"npz:{out / 'c0-s0' / 'sets' / f'{n}.npz'}", "train").images
        for n in ("flip", "flip_noise")
    )
    assert flip.shape == noise.shape and not torch.equal(flip, noise)
    # the one-class branch: the robust floor, reachability and convergence per set, a picture
    assert one["robust_floor"]["passed"] and one["reachability"]["D_R"]["n"] == 4
    assert {"median_ratio", "share_below_nearest", "converged"} <= set(
        one["constructions"]["D_NR-other"]["convergence"]
    )
    assert (out / "c0-s0" / "sets" / "inversions.png").read_bytes()[:4] == b"\x89PNG"
    # one seed: the rule has no interval, so no verdict
    answers = result["summary"]["groups"]["0"]["sets clean"]["answers"]
    assert answers == {"one_class": NO_VERDICT, "robust_features": NO_VERDICT, "binary": NO_VERDICT}
    md = (out / "study.md").read_text()
    assert RULE in md and "The robust encoder's floor" in md and "reachability" in md
    # a second run reuses every stage
    stamps = {
        p: p.stat().st_mtime_ns
        for p in out.rglob("*")
        if p.suffix in (".npz", ".safetensors", ".npy")
    }
    assert main(["-q", "features", "--config", path, "--out", str(out)]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    again = json.loads((out / "study.json").read_text())
    assert again["wall_time_s"] >= result["wall_time_s"]
    assert str(FIXTURE_FMNIST) in " ".join(result["settings"]["set"])
    # other settings cannot reuse these artefacts
    changed = write(tmp_path, toy(train_steps=8), "changed.yaml")
    assert main(["-q", "features", "--config", changed, "--out", str(out)]) == 2
    assert "train_steps" in capsys.readouterr().err


def test_each_floor_stops_its_stage(tmp_path, capsys, one_thread):
    """Reach (both binary sets), the robust encoder (both D_R sets) and convergence (both D_NR
    sets) stop their stages; what does not depend on them still runs, and the stops are
    listed, kept and reported again on the next run (exit status 2)."""
    study = toy(
        reach_eps=[1e-4],
        reach_floor=0.95,
        robust_floor_margin=1.0,
        convergence_ratio=1e-6,
        convergence_share=1.0,
    )
    path, out = write(tmp_path, study), tmp_path / "out"
    assert main(["-q", "features", "--config", path, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "stage(s) stopped" in err
    cell = json.loads((out / "study.json").read_text())["cells"]["c0-s0"]
    stopped = {**cell["binary"]["stopped"], **cell["one_class"]["stopped"]}
    assert set(stopped) == {"D_det", "D_rand", "robust_floor", "D_NR-other", "D_NR-grey"}
    assert "floor is 95 %" in stopped["D_det"] and "reach_eps" in stopped["D_det"]
    assert "not robust enough" in stopped["robust_floor"]
    assert "did not converge" in stopped["D_NR-other"] and "reachability" in stopped["D_NR-other"]
    assert set(cell["binary"]["sets"]) == {"D_clean"}
    assert set(cell["one_class"]["sets"]) == {"D", "starts-other", "starts-grey", "normals"}
    sets = out / "c0-s0" / "sets"
    assert not (sets / "D_det.npz").exists() and not (sets / "D_R-other.npz").exists()
    failed = json.loads((sets / "D_det-failed.json").read_text())
    assert failed["attempts"][0]["eps"] == 1e-4 and "floor is 95 %" in failed["error"]
    assert (
        json.loads((sets / "D_NR-grey-failed.json").read_text())["convergence"]["converged"]
        is False
    )
    md = (out / "study.md").read_text()
    assert "Stopped stages" in md and "no verdict" in md
    with pytest.raises(ConstructionError, match=r"5 stage\(s\) stopped"):
        run_study(path, out)


def test_a_reference_that_cannot_classify_held_out_images_stops_the_stage(tmp_path, one_thread):
    path = write(tmp_path, toy(reference_min_accuracy=0.99, branches=["binary"]))
    with pytest.raises(ConstructionError, match=r"classifies only .* held-out .*reference_steps"):
        run_study(path, tmp_path / "out")


def test_survival_is_measured_on_augmented_fresh_views_and_can_stop_the_stage(one_thread):
    """A planted target that lives in one pixel does not survive random crops: the floor
    stops the stage; with plain views survival is not measured at all."""
    from types import SimpleNamespace

    from firmad.robustness.study.binary import _survival_check
    from firmad.robustness.study.config import StudyConfig

    cfg = StudyConfig(set=TRAIN, binary_set=["data.size=16"], fresh_binary_set=[])
    cell = SimpleNamespace(cfg=cfg, seed=0, tag=lambda: "toy")
    images = torch.zeros(40, 1, 16, 16)
    images[:, :, 0, 0] = 1.0  # read as "outlier" by the pixel detector below

    def pixel(x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, 0] * 2 - 1

    targets = (torch.ones(40, dtype=torch.long), torch.ones(40, dtype=torch.bool))
    with pytest.raises(ConstructionError, match="survive the fresh models' training views"):
        _survival_check(cell, "D_det", pixel, images, targets)
    plain = SimpleNamespace(
        cfg=cfg.model_copy(update={"fresh_binary_set": ["augment.enabled=false"]}),
        seed=0,
        tag=lambda: "toy",
    )
    assert _survival_check(plain, "D_det", pixel, images, targets)["measured"] is False


def test_the_rule_gives_its_verdicts():
    def iv(lo, hi):
        return {"mean": (lo + hi) / 2, "lo": lo, "hi": hi, "n": 5, "sd": 0.1}

    above, below, straddles = iv(0.02, 0.1), iv(-0.1, -0.02), iv(-0.05, 0.05)
    assert rule(iv(0.55, 0.7), {"flip": above, "flip_noise": above}, 0.5) == USEFUL
    assert rule(iv(0.3, 0.45), {"flip": above, "flip_noise": above}, 0.5) == SIGNAL
    assert rule(iv(0.45, 0.6), {"flip": above, "flip_noise": above}, 0.5) == SIGNAL
    assert rule(iv(0.55, 0.7), {"flip": above, "flip_noise": straddles}, 0.5) == NOT_USEFUL
    assert rule(iv(0.3, 0.45), {"flip": below}, 0.5) == NOT_USEFUL
    one_seed = {"mean": 0.6, "lo": None, "hi": None, "n": 1, "sd": None}
    assert rule(one_seed, {"flip": above}, 0.5) == NO_VERDICT
    assert weakest([USEFUL, SIGNAL]) == SIGNAL and weakest([USEFUL, USEFUL]) == USEFUL
    assert (
        weakest([NOT_USEFUL, USEFUL]) == NOT_USEFUL and weakest([USEFUL, NO_VERDICT]) == NO_VERDICT
    )


def test_t_interval_matches_scipys():
    from scipy import stats

    values = [0.61, 0.55, 0.7, 0.48, 0.66]
    got = t_interval(values, 0.95)
    lo, hi = stats.t.interval(0.95, 4, loc=np.mean(values), scale=stats.sem(values))
    assert got["lo"] == pytest.approx(lo) and got["hi"] == pytest.approx(hi)
    assert got["n"] == 5 and got["sd"] == pytest.approx(np.std(values, ddof=1))
    assert t_interval([0.6], 0.95)["lo"] is None


def test_fresh_models_start_from_other_weights_than_their_source(one_thread):
    """The recorded digest is the trainer's initial model's, and a fresh model's seed and
    initial weights differ from the source model's of its cell."""
    from firmad.factory import build_trainer
    from firmad.robustness.study.config import StudyConfig
    from firmad.robustness.study.models import ModelSpec, fresh_seed, init_digest, run_config

    cfg = StudyConfig(set=TRAIN, backbone="resnet_small@0.25")
    source = run_config(cfg, ModelSpec("standard", False, 3, 4), 64)
    label = "on_D_NR-other"
    fresh = run_config(cfg, ModelSpec(label, False, fresh_seed(3, label), 4), 64)
    assert fresh.train.seed != source.train.seed == 3
    assert init_digest(fresh, 1) != init_digest(source, 1)
    assert fresh_seed(3, label) != fresh_seed(3, "on_D_R-other") != fresh_seed(4, label)
    trainer = build_trainer(fresh)  # the fixture's split, the model as training starts
    assert init_digest(fresh, 1) == _digest(trainer.model)


def _digest(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def test_step_plan_gives_the_same_steps_for_any_set_size():
    for n, kinds, batch, steps in [
        (8, 3, 16, 4),
        (500, 3, 32, 600),
        (6000, 3, 32, 600),
        (33, 1, 32, 7),
    ]:
        epochs, per = step_plan(n, kinds, batch, steps)
        assert epochs * per == steps and per <= n * (1 + kinds) // batch


def test_shipped_study_recipes_read():
    for name in ("features-fmnist-cpu.yaml", "features-fmnist-cpu-smoke.yaml"):
        cfg = read_study(f"benchmarks/{name}")
        assert cfg.reach_floor == 0.95 and cfg.inversion_steps >= 3000
        assert cfg.robust_floor_margin == 0.15 and cfg.cells_needed(15) == 12
        assert cfg.reductions


def test_cells_through_the_executor_match_one_process(tmp_path, one_thread):
    """`workers: 2` runs each cell as a `firmad features --cell` process through the bench
    executors; each cell's records are those of the same cells run here one after another."""
    study = toy(
        seeds=[0, 1],
        branches=["binary"],
        attack_eps=[0.0],
        attack_binary_sets=False,
    )
    serial = run_study(write(tmp_path, study), tmp_path / "serial")
    parallel = run_study(write(tmp_path, {**study, "workers": 2}, "p.yaml"), tmp_path / "parallel")
    assert set(parallel["cells"]) == set(serial["cells"]) == {"c0-s0", "c0-s1"}
    for key, cell in serial["cells"].items():
        other = parallel["cells"][key]["binary"]
        for label, m in cell["binary"]["models"].items():
            o = other["models"][label]
            assert (o["init_seed"], o["init_digest"]) == (m["init_seed"], m["init_digest"])
        for name, row in cell["binary"]["sets"].items():
            assert other["sets"][name]["clean_auroc"] == pytest.approx(
                row["clean_auroc"], abs=0.02
            ), (key, name)
    assert (tmp_path / "parallel" / "c0-s1" / "log.txt").exists()
    a, b = (
        load_dataset(f"npz:{tmp_path / 'parallel' / c / 'sets' / 'D_det.npz'}", "train")
        for c in ("c0-s0", "c0-s1")
    )
    assert not torch.equal(a.images, b.images)


def test_one_class_branch_on_some_seeds(tmp_path, one_thread):
    study = toy(
        seeds=[0, 1],
        one_class_seeds=[1],
        attack_eps=[0.0, 0.5],
        inversion_starts=["grey"],
        branches=["one_class"],
        robust_floor_eps=0.5,
    )
    result = run_study(write(tmp_path, study), tmp_path / "out")
    assert "one_class" not in result["cells"]["c0-s0"]
    assert set(result["cells"]["c0-s1"]["one_class"]["sets"]) == {
        "D",
        "D_R-grey",
        "D_NR-grey",
        "starts-grey",
        "normals",
    }
    md = (tmp_path / "out" / "study.md").read_text()
    assert "one-class branch ran on seeds [1] only" in md


def _fake_cell(seed: int, clean: dict[str, float]) -> dict:
    def ev(v):
        return {"clean_auroc": v, "attacked": {}}

    binary = {n: ev(v) for n, v in clean.items() if not n.startswith(("D_R", "D_NR", "starts"))}
    one = {n: ev(v) for n, v in clean.items() if n.startswith(("D_R", "D_NR", "starts"))}
    return {
        "class": 0,
        "seed": seed,
        "binary": {"sets": binary, "models": {}},
        "one_class": {"sets": one, "models": {}},
    }


def test_the_summary_applies_the_rule_to_every_set_with_its_floors():
    """Five seeds of one class: D_det below chance but above its controls, D_rand above both,
    D_NR-other no better than its starts, D_R-other missing in two cells (stopped)."""
    from firmad.robustness.study.config import StudyConfig
    from firmad.robustness.study.stats import summarise

    cfg = StudyConfig(
        classes=[0], inversion_starts=["other"], transfer_backbone=None, attack_eps=[0.0, 0.5]
    )
    rng = np.random.default_rng(0)
    results = {}
    for seed in range(5):
        j = lambda: float(rng.normal(0, 0.01))  # noqa: E731
        clean = {
            "D_clean": 0.9 + j(),
            "D_det": 0.4 + j(),
            "flip": 0.1 + j(),
            "flip_noise": 0.2 + j(),
            "D_rand": 0.7 + j(),
            "shuffle": 0.4 + j(),
            "shuffle_noise": 0.45 + j(),
            "D_NR-other": 0.6 + j(),
            "starts-other": 0.6 + j(),
            "normals": 0.9 + j(),
        }
        if seed < 3:
            clean["D_R-other"] = 0.8 + j()
        results[(0, seed)] = _fake_cell(seed, clean)
    summary = summarise(cfg, results)
    sets = summary["groups"]["0"]["sets clean"]["sets"]
    assert sets["D_det"]["verdict"] == SIGNAL and sets["D_rand"]["verdict"] == USEFUL
    assert sets["D_NR-other"]["verdict"] == NOT_USEFUL
    assert (
        sets["D_R-other"]["verdict"] == NO_VERDICT
        and "3 of 5 cells (needs 4)" in (sets["D_R-other"]["why"])
    )
    assert sets["D_det"]["diffs"]["flip"]["n"] == 5
    assert sets["D_det"]["own"]["lo"] < 0.4 < sets["D_det"]["own"]["hi"] < 0.5
    answers = summary["groups"]["0"]["sets clean"]["answers"]
    assert answers == {"one_class": NOT_USEFUL, "robust_features": NO_VERDICT, "binary": SIGNAL}
    levels = summary["groups"]["0"]["sets clean"]["levels"]
    assert levels["shuffle"]["mean"] == pytest.approx(0.4, abs=0.02)


@pytest.mark.parametrize(
    "field, values", [("seeds", [0, 0]), ("classes", [1, 2, 1]), ("one_class_seeds", [3, 3])]
)
def test_a_repeated_seed_or_class_is_refused(field, values):
    """A seed listed twice would count twice toward the intervals over seeds."""
    from pydantic import ValidationError

    from firmad.robustness.study.config import StudyConfig

    with pytest.raises(ValidationError, match=f"{field}: .* more than once"):
        StudyConfig(**{field: values})
