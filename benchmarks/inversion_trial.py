"""Inversion settings on one cell of the feature study: how many inversions converge for each
start kind and learning rate (the trial behind `inversion_lr` and the grey start).

Trains the cell's standard and robust FIRM encoders with the study's settings (or loads them
from --models), then inverts --n training normals of the class through each encoder from each
start kind (other-class training images, uniform noise, mid-grey) for --steps Adam steps at
each learning rate, and prints the study's convergence record on the stored uint8 images.

    PYTHONPATH=src python benchmarks/inversion_trial.py --class 0 --seed 0 --n 50 \
        --steps 3000 --lr 0.03,0.1,0.3,1.0 --models runs/inversion-trial
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from firmad.config import save_config
from firmad.detector import OneClassDetector
from firmad.robustness.construct import (
    feature_distance,
    inversion_convergence,
    invert_features,
    nearest_other_distance,
    to_uint8,
)
from firmad.robustness.study import read_study
from firmad.robustness.study.cell import load_cell_data, other_class_images
from firmad.robustness.study.models import ModelSpec, run_config


def encoder(cfg, data, spec: ModelSpec, folder: Path) -> OneClassDetector:
    path = folder / spec.label
    if (path / "detector.json").exists():
        return OneClassDetector.load(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_config(run_config(cfg, spec, len(data.train_u8)), folder / f"{spec.label}.yaml")
    det = OneClassDetector(recipe=str(folder / f"{spec.label}.yaml"), scorer=cfg.scorer, k=None)
    det.fit(data.train_u8)
    det.save(path)
    return det


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="benchmarks/features-fmnist-cpu.yaml")
    p.add_argument("--class", dest="cls", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", default="0.1,0.3")
    p.add_argument("--starts", default="other,noise,grey")
    p.add_argument("--models", type=Path, default=Path("runs/inversion-trial"))
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = read_study(a.config)
    data = load_cell_data(cfg, a.cls, a.seed)
    gen = torch.Generator().manual_seed(7)
    pick = torch.randperm(len(data.train_u8), generator=gen)[: a.n].sort().values
    shape = data.train_u8[pick].shape
    starts = {
        "other": other_class_images(cfg, a.cls, a.n, gen).float() / 255,
        "noise": to_uint8(torch.rand(shape, generator=gen)).float() / 255,
        "grey": to_uint8(0.45 + 0.1 * torch.rand(shape, generator=gen)).float() / 255,
    }
    folder = a.models / f"c{a.cls}-s{a.seed}"
    for name, extra in (("standard", ()), ("robust", tuple(cfg.robust_set))):
        det = encoder(cfg, data, ModelSpec(name, False, a.seed, cfg.train_steps, extra), folder)
        fn = det.extractor_
        nearest = nearest_other_distance(fn, data.train_u8, pick, cfg.batch_size)
        for lr in (float(v) for v in a.lr.split(",")):
            for kind in a.starts.split(","):
                cpu = time.process_time()
                images, _, _ = invert_features(fn, data.train_u8[pick], starts[kind], a.steps, lr)
                stored = to_uint8(images)
                conv = inversion_convergence(
                    feature_distance(fn, stored, data.train_u8[pick]),
                    feature_distance(fn, starts[kind], data.train_u8[pick]),
                    nearest,
                    cfg.convergence_ratio,
                    cfg.convergence_share,
                )
                print(
                    f"{name:8s} start {kind:5s} lr {lr:<5g} median ratio "
                    f"{conv['median_ratio']:.2e}, closer than the nearest normal "
                    f"{100 * conv['share_below_nearest']:5.1f} %, converged "
                    f"{conv['converged']}, {time.process_time() - cpu:.0f} CPU s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
