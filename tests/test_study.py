"""The robust / non-robust feature study at toy scale on the fixture: every stage runs, the
floors stop a failed construction, the controls and convergence are recorded, a second run
reuses every artefact."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from firmad.cli import main
from firmad.data import load_dataset
from firmad.robustness.study import (
    ConstructionError,
    best_threshold,
    read_study,
    run_study,
    step_overrides,
    verdict,
)
from tests.conftest import FIXTURE_FMNIST, TINY

TRAIN = [o for o in TINY if not o.startswith(("eval.", "train.epochs",
                                              "train.steps_per_epoch", "model.backbone",
                                              "model.width"))]  # fmt: skip


def toy(**changes) -> dict:
    study = {
        "name": "toy",
        "recipe": "fmnist-cpu",
        "binary_recipe": "fmnist-cpu-binary",
        "backbone": "resnet_small@0.25",
        "classes": [0],
        "seeds": [0],
        "set": TRAIN,
        "binary_set": ["eval.resize_ratio=1.0"],
        "robust_set": ["adversarial.enabled=true", "adversarial.norm=l2", "adversarial.eps=0.5",
                       "adversarial.steps=2"],
        "binary_robust_set": ["adversarial.enabled=true", "adversarial.norm=l2",
                              "adversarial.eps=0.5", "adversarial.steps=2"],
        "train_steps": 4,
        "construct_n": 8,
        "reach_eps": [4.0, 8.0],
        "construct_steps": 5,
        "reach_floor": 0.5,
        "reference_floor": 0.0,
        "reference_min_accuracy": 0.0,  # a 4-step reference cannot classify
        "invert_n": 6,
        "inversion_steps": 3,
        "attack_eps": [0.0, 0.5],
        "attack_steps": 2,
        "attack_subset": 40,
        "robust_checks": False,
        "probe_radii": [4],
        "probe_grids": [2],
        "n_bootstrap": 100,
        "batch_size": 64,
        "reductions": ["toy scale for a test"],
    }  # fmt: skip
    study.update(changes)
    return study


def write(tmp_path, study) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return str(path)


def test_study_runs_every_stage_records_controls_and_resumes(tmp_path, capsys):
    path = write(tmp_path, toy())
    out = tmp_path / "out"
    assert main(["-q", "features", "--config", path, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Verdict" in printed and "toy scale" in printed and "D_det - flip" in printed
    result = json.loads((out / "study.json").read_text())
    cell = result["cells"]["c0-s0"]
    assert set(cell["binary"]["sets"]) == {"D_clean", "D_det", "flip", "D_rand", "shuffle"}
    assert set(cell["one_class"]["sets"]) == {"D", "D_R", "D_NR", "starts", "normals"}
    for row in cell["binary"]["sets"].values():
        assert 0.0 <= row["clean_auroc"] <= 1.0 and row["n_test"] > row["n_attacked"] - 1
    # construction records: the radius chosen from the list, reach in each direction, the
    # reference and survival checks
    det = cell["binary"]["constructions"]["D_det"]
    assert det["eps"] in (4.0, 8.0) and det["share_relabelled"] == 1.0
    assert min(det["reach"]["to_normal"], det["reach"]["to_outlier"]) >= 0.5
    assert det["survival"]["fresh_views_augmented"] is False
    assert 0.0 <= det["reference"]["balanced_accuracy"] <= 1.0
    # inversion convergence is in study.json and study.md
    conv = cell["one_class"]["constructions"]["D_R"]["convergence"]
    assert {"median_ratio", "share_below_nearest", "converged"} <= set(conv)
    assert conv["median_ratio"] < 1.0  # 3 steps already lower the residual
    md = (out / "study.md").read_text()
    assert "median final/initial" in md and "D_NRonly" in md and "radii tried" in md
    # the pairs and the computed verdict
    summary = result["summary"]
    pair = summary["classes"]["0"]["pairs"]["D_det - flip"]
    assert pair["ci"][0] <= pair["diff"] <= pair["ci"][1]
    assert summary["classes"]["0"]["verdict"] in ("useful", "not useful", "inconclusive")
    assert summary["floors"]["general_claim_allowed"] is False
    # D_det: normals are the images pushed to "normal" (the outliers), and the reverse; the
    # flip control holds the same images unperturbed with the same labels
    sets = out / "c0-s0" / "sets"
    d_det = load_dataset(f"npz:{sets / 'D_det.npz'}", split="train")
    flip = load_dataset(f"npz:{sets / 'flip.npz'}", split="train")
    assert len(d_det) == len(flip) == 8
    assert len(load_dataset(f"npz:{sets / 'D_det-outliers.npz'}", split="train")) == 8
    assert not torch.equal(d_det.images, flip.images)
    # every model trained the same number of SGD steps
    models = list((out / "c0-s0" / "models").iterdir())
    assert len(models) == 13
    for d in models:
        meta = json.loads((d / "detector.json").read_text())
        assert meta["calibration"]["sgd_steps"] == 4, d.name
    # a second run reuses every stage
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")
              if p.suffix in (".npz", ".safetensors", ".npy")}  # fmt: skip
    assert main(["-q", "features", "--config", path, "--out", str(out)]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    again = json.loads((out / "study.json").read_text())
    assert again["wall_time_s"] >= result["wall_time_s"]
    assert str(FIXTURE_FMNIST) in " ".join(result["settings"]["set"])
    # other settings cannot reuse these artefacts
    changed = write(tmp_path, toy(train_steps=8))
    assert main(["-q", "features", "--config", changed, "--out", str(out)]) == 2
    assert "train_steps" in capsys.readouterr().err


def test_reach_below_the_floor_stops_the_stage(tmp_path):
    path = write(tmp_path, toy(reach_eps=[1e-4], reach_floor=0.95))
    with pytest.raises(ConstructionError, match=r"1 stage\(s\) stopped.*D_det .*floor is 95 %"):
        run_study(path, tmp_path / "out")
    # the study's outputs are written first: the stop is listed and no verdict is given; the
    # one-class branch, which does not depend on D_det, still ran
    md = (tmp_path / "out" / "study.md").read_text()
    assert "stopped: c0-s0 binary: D_det" in md and "**inconclusive**" in md
    summary = json.loads((tmp_path / "out" / "study.json").read_text())["summary"]
    assert "D_R - starts" in summary["classes"]["0"]["pairs"]
    assert "D_det - flip" not in summary["classes"]["0"]["pairs"]
    # the stage stops again on the next run (nothing was cached for it)
    with pytest.raises(
        ConstructionError, match=r"D_det .*class 0, seed 0.*floor is 95 %.*reach_eps"
    ):
        run_study(path, tmp_path / "out")
    # the failed set left no dataset behind, only the record of what was measured
    sets = tmp_path / "out" / "c0-s0" / "sets"
    assert not (sets / "D_det.npz").exists()
    failed = json.loads((sets / "D_det-failed.json").read_text())
    assert failed["attempts"][0]["eps"] == 1e-4 and "floor is 95 %" in failed["error"]


def test_a_reference_that_cannot_classify_stops_the_stage(tmp_path):
    path = write(tmp_path, toy(reference_min_accuracy=0.99, branches=["binary"]))
    with pytest.raises(ConstructionError, match=r"reference classifies only .*reference_steps"):
        run_study(path, tmp_path / "out")


def test_flip_control_of_a_failed_construction_equals_d_det(tmp_path):
    """With a radius too small to change a stored uint8 pixel, D_det is the flip control: the
    fresh classifiers trained on them score the test images the same."""
    path = write(
        tmp_path,
        toy(
            reach_eps=[1e-4], reach_floor=0.0, construct_n=16, branches=["binary"], attack_eps=[0.0]
        ),
    )
    out = tmp_path / "out"
    result = run_study(path, out)
    cell = result["cells"]["c0-s0"]["binary"]
    assert cell["constructions"]["D_det"]["reach"]["all"] < 0.9
    det, flip = cell["sets"]["D_det"]["clean_auroc"], cell["sets"]["flip"]["clean_auroc"]
    assert abs(det - flip) < 0.02, (det, flip)
    pair = result["summary"]["classes"]["0"]["pairs"]["D_det - flip"]
    assert pair["ci"][0] <= 0.0 <= pair["ci"][1]


def test_step_overrides_give_the_same_steps_for_any_set_size():
    for n, kinds, batch, steps in [(8, 3, 16, 4), (500, 3, 32, 600), (6000, 3, 32, 600),
                                   (33, 1, 32, 7)]:  # fmt: skip
        sets = dict(s.split("=") for s in step_overrides(n, kinds, batch, steps))
        epochs, per = int(sets["train.epochs"]), int(sets["train.steps_per_epoch"])
        assert epochs * per == steps
        assert per <= n * (1 + kinds) // batch


def test_verdict_rule():
    assert verdict(["gain", "gain"]) == "useful"
    assert verdict(["no gain", "no gain"]) == "not useful"
    assert verdict(["gain", "no gain"]) == "inconclusive"
    assert verdict(["unresolved", "gain"]) == "inconclusive"
    assert verdict([]) == "inconclusive"


def test_shipped_study_recipes_read():
    for name in ("features-fmnist-cpu.yaml", "features-fmnist-cpu-smoke.yaml"):
        cfg = read_study(f"benchmarks/{name}")
        assert cfg.reach_floor == 0.95 and cfg.inversion_steps == 1000


def test_training_views_stay_in_pixel_range():
    from firmad.config import load_config
    from firmad.robustness.study import _views

    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.ones(32, 1, 32, 32), torch.rand(32, 1, 32, 32, generator=gen)])
    augmented = _views(load_config("fmnist-cpu-binary", []), gen)(x)
    assert float(augmented.min()) >= 0.0 and float(augmented.max()) <= 1.0
    assert not torch.equal(augmented, x)
    plain = _views(load_config("fmnist-cpu-binary", ["augment.enabled=false"]), gen)
    assert torch.equal(plain(x), x)


def test_best_threshold_balances_the_two_labels():
    scores = torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0, 7.0])  # all above 0
    label = torch.tensor([0, 0, 0, 1, 1, 1])
    t = best_threshold(scores, label)
    assert 4.0 <= t < 5.0
    assert best_threshold(torch.tensor([1.0, 1.0]), torch.tensor([0, 1])) < 1.0


def test_paired_draws_over_images_and_seeds():
    import numpy as np

    from firmad.robustness.study import paired_draws

    rng = np.random.default_rng(0)
    y = np.array([0] * 50 + [1] * 150)
    good = [y + rng.normal(0, 0.8, len(y)) for _ in range(3)]  # AUROC ~ 0.8
    noise = [rng.normal(0, 1, len(y)) for _ in range(3)]  # AUROC ~ 0.5
    point, draws = paired_draws(y, list(zip(good, noise, strict=True)), 200, 0)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    assert 0.15 < point < 0.45 and lo > 0.0 and lo <= point <= hi
    same, zero = paired_draws(y, [(g, g) for g in good], 200, 0)
    assert same == 0.0 and np.all(zero == 0.0)
    # one seed: only the test images are resampled
    one, draws1 = paired_draws(y, [(good[0], noise[0])], 200, 0)
    assert draws1.shape == (200,) and np.percentile(draws1, 2.5) > 0.0


def test_cells_in_worker_processes_match_one_process(tmp_path):
    """`workers: 2` runs the cells in two spawned processes; each cell's outputs (its records
    and the models' test scores) are those of the same cells run one after the other."""
    study = toy(
        seeds=[0, 1], branches=["binary"], attack_eps=[0.0], set=[*TRAIN, "train.threads=1"]
    )
    serial = run_study(write(tmp_path, study), tmp_path / "serial")
    (tmp_path / "p").mkdir()
    parallel = run_study(write(tmp_path / "p", {**study, "workers": 2}), tmp_path / "parallel")
    assert set(parallel["cells"]) == set(serial["cells"]) == {"c0-s0", "c0-s1"}
    for key, cell in serial["cells"].items():
        other = parallel["cells"][key]
        assert other["seed"] == cell["seed"]
        for name, row in cell["binary"]["sets"].items():
            assert other["binary"]["sets"][name]["clean_auroc"] == pytest.approx(
                row["clean_auroc"], abs=0.02
            ), (key, name)
    assert parallel["summary"]["classes"]["0"]["seeds"] == [0, 1]
    # the two seeds' constructions differ (seeds reach every worker)
    a, b = (load_dataset(f"npz:{tmp_path / 'parallel' / c / 'sets' / 'D_det.npz'}", "train")
            for c in ("c0-s0", "c0-s1"))  # fmt: skip
    assert not torch.equal(a.images, b.images)


def test_one_class_branch_on_some_seeds(tmp_path):
    """`one_class_seeds` picks the cells that run the one-class branch; the binary branch (the
    verdict's) runs on every seed, and study.md says which seeds each table holds."""
    study = toy(seeds=[0, 1], one_class_seeds=[1], attack_eps=[0.0])
    result = run_study(write(tmp_path, study), tmp_path / "out")
    assert "one_class" not in result["cells"]["c0-s0"]
    assert "sets" in result["cells"]["c0-s1"]["one_class"]
    entry = result["summary"]["classes"]["0"]
    assert entry["branch_seeds"] == {"binary": [0, 1], "one_class": [1]}
    assert entry["sets"]["D_det"]["n"] == 2 and entry["sets"]["D_R"]["n"] == 1
    md = (tmp_path / "out" / "study.md").read_text()
    assert "one-class branch ran on seeds [1] only" in md
