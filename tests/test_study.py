"""The robust / non-robust feature study at toy scale on the fixture: every stage runs, writes
its artefacts, and a second run reuses them instead of rebuilding."""

from __future__ import annotations

import json

import yaml

from firmad.cli import main
from firmad.data import load_dataset
from tests.conftest import FIXTURE_FMNIST, TINY

TRAIN = [o for o in TINY if not o.startswith(("eval.", "data.max_test"))] + ["train.epochs=1"]


def test_study_runs_every_stage_and_resumes(tmp_path, capsys):
    study = {
        "name": "toy",
        "recipe": "fmnist-cpu",
        "set": TRAIN,
        "robust_set": ["train.seed=1"],  # stands in for adversarial training at toy scale
        "backbones": ["resnet_small@0.25"],
        "construct_n": 8,
        "inversion_steps": 3,
        "nonrobust_steps": 2,
        "binary_recipe": "fmnist-cpu-binary",
        "binary_steps": 2,
        "attack_eps": [0.0, 0.03],
        "attack_steps": 2,
        "attack_subset": 40,
        "attack_checks": False,
        "probe_radii": [4],
        "probe_grids": [2],
        "drift_eps": [0.0, 0.03],
        "drift_held_out": [9],
        "batch_size": 64,
        "reductions": ["toy scale for a test"],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    out = tmp_path / "out"
    assert main(["-q", "features", "--config", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "D_R" in printed and "Texture probe" in printed and "toy scale" in printed
    assert "ε=7.6/255" in printed  # 0.03 written in 1/255 units
    result = json.loads((out / "study.json").read_text())
    entry = result["backbones"]["resnet_small@0.25"]
    assert set(entry["sets"]) == {"D", "D_R", "D_NR", "D_NRonly"}
    for row in entry["sets"].values():
        assert 0.0 <= row["clean_auroc"] <= 1.0
    assert any("held out" in k for k in entry["drift"]["standard"][0])
    assert (out / "drift.png").stat().st_size > 0
    assert set(entry["binary"]) == {"D", "D_det", "D_rand"} and "D_det" in printed
    # D_det: every normal and every outlier relabelled with the other label; the outlier part
    # is the npz that trained the fresh classifier's outlier side
    sets = out / "resnet_small@0.25" / "sets"
    d_det = load_dataset(f"npz:{sets / 'D_det.npz'}", split="train")
    assert len(d_det) == 16 and int(d_det.labels.sum()) == 8
    assert json.loads((sets / "D_det.json").read_text())["share_relabelled"] == 1.0
    assert len(load_dataset(f"npz:{sets / 'D_det-outliers.npz'}", split="train")) == 8
    rand = json.loads((sets / "D_rand.json").read_text())
    assert 0.0 < rand["share_relabelled"] < 1.0
    det_cfg = json.loads(
        (out / "resnet_small@0.25" / "detectors" / "binary-on_D_det" / "detector.json").read_text()
    )
    assert "D_det-outliers.npz" in json.dumps(det_cfg)
    # constructed sets are npz datasets with their settings beside them
    d_r = load_dataset(f"npz:{sets / 'D_R.npz'}", split="train")
    assert len(d_r) == 8 and d_r.images.dtype.is_floating_point is False
    meta = json.loads((sets / "D_R.json").read_text())
    assert meta["feature_distance_final_mean"] < meta["feature_distance_initial_mean"]
    assert (sets / "D_R.png").stat().st_size > 0
    # a second run reuses every stage
    stamps = {
        p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".npz", ".safetensors")
    }
    assert main(["-q", "features", "--config", str(path), "--out", str(out)]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    again = json.loads((out / "study.json").read_text())
    assert again["wall_time_s"] >= result["wall_time_s"]  # the total over both invocations
    assert str(FIXTURE_FMNIST) in " ".join(result["settings"]["set"])
