"""How the cost of scoring grows with the bank: images/s of `firmad score`'s path.

A detector of the ``fmnist-cpu`` recipe (FIRM's encoder, knn_cos k = 5, plain) with a bank of
``--banks`` normal features (the first N Fashion-MNIST training images, all classes: 60 000 is
the whole training set), scoring test images two ways, as a user does:

- ``decision_function``: uint8 test images already in memory (``det.decision_function(X)``);
- ``score_paths``: PNG files on disk, decoded and resized as `firmad score` reads them.

for each kNN path: ``torch`` (exact chunked matmul + top-k, float64, differentiable: what
attacks and the ONNX graph use) and ``faiss`` (exact IndexFlatIP, float32: what `firmad score`
uses when faiss is installed), and for each training precision: ``none`` (fp32) and ``auto``
(bf16 autocast where the CPU has it). Scoring is fp32 in both (features never run under
autocast), so the two must cost the same; ``features_s`` times the encoder alone (the part of
the cost that does not grow with the bank).

The encoder keeps its initial weights (nothing is trained): what a score costs does not depend
on the values of the weights. Configurations are interleaved, ``--repeats`` times; medians.
On a crowded machine, ``--threads 1 --clock cpu`` counts the process's CPU seconds instead of
wall seconds (torch and faiss on one thread each): images per CPU-second.

    python benchmarks/scoring_cost.py                       # banks 6 000 and 60 000
    python benchmarks/scoring_cost.py --banks 600 --n-test 256 --files 64 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from firmad.config import load_config
from firmad.data import load_dataset
from firmad.detector import OneClassDetector
from firmad.factory import build_model
from firmad.hardware import resolve_amp
from firmad.scoring.scorers import faiss_or_none

RECIPE = "fmnist-cpu"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def detectors(amps: list[str], bank: torch.Tensor) -> dict[str, tuple[OneClassDetector, str]]:
    """A detector of the recipe per train.amp value, with its bank fitted on ``bank`` images,
    and what that value resolves to here. They share the weights and the bank (extracted once,
    in fp32 as always): only the config's train.amp differs, which scoring does not read."""
    cfg = load_config(RECIPE, ["train.device=cpu"])
    torch.manual_seed(0)
    model = build_model(cfg, cfg.data.dataset).eval()
    det = OneClassDetector.from_model(model, cfg, scorer="knn_cos", k=5).fit_bank(bank)
    out = {}
    for amp in amps:
        twin = copy.deepcopy(det)
        twin.config_ = load_config(RECIPE, [f"train.amp={amp}", "train.device=cpu"])
        out[amp] = (twin, resolve_amp(amp, "cpu")[0])  # as training would resolve it here
    return out


def set_backend(det: OneClassDetector, backend: str) -> None:
    for scorer in det.scorer_.per_angle:
        scorer.knn_backend = backend


def write_pngs(images: torch.Tensor, folder: Path) -> None:
    from PIL import Image

    for i, img in enumerate(images):
        Image.fromarray(img[0].numpy()).save(folder / f"{i:05d}.png")


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCK["wall"]


def timed(fn) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def measure(args, train: torch.Tensor, test: torch.Tensor, folder: Path) -> list[dict[str, Any]]:
    """One row per (bank, amp, backend): medians of the interleaved repeats."""
    rows = []
    for n in args.banks:
        log(f"bank {n}: extracting the bank's features ...")
        dets = detectors(args.amps, train[:n])
        times: dict[tuple, dict[str, list[float]]] = {}
        for r in range(args.repeats):
            for amp, (det, _) in dets.items():
                extract = det.extractor_.extract
                for backend in args.backends:
                    set_backend(det, backend)
                    t = times.setdefault((amp, backend), {"df": [], "paths": [], "feat": []})
                    t["df"].append(timed(lambda d=det: d.decision_function(test)))
                    t["paths"].append(timed(lambda d=det: d.score_paths([folder])))
                    t["feat"].append(timed(lambda e=extract: e(test)))
            log(f"bank {n}: repeat {r + 1}/{args.repeats} done")
        for (amp, backend), t in times.items():
            df, paths, feat = (statistics.median(t[k]) for k in ("df", "paths", "feat"))
            rows.append(
                {
                    "bank": n,
                    "train_amp": amp,
                    "amp_resolved": dets[amp][1],
                    "knn": backend,
                    "decision_function_img_s": round(len(test) / df, 1),
                    "score_paths_img_s": round(args.files / paths, 1),
                    "features_img_s": round(len(test) / feat, 1),
                    "knn_share": round(max(0.0, 1 - feat / df), 3),
                }
            )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| bank | train.amp (here) | kNN | decision_function img/s | score_paths img/s "
        "| features alone img/s | kNN share of decision_function |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['bank']:,} | {r['train_amp']} ({r['amp_resolved']}) | {r['knn']} "
            f"| {r['decision_function_img_s']:.0f} | {r['score_paths_img_s']:.0f} "
            f"| {r['features_img_s']:.0f} | {100 * r['knn_share']:.0f} % |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--banks", type=int, nargs="+", default=[6000, 60000])
    p.add_argument("--n-test", type=int, default=2048, help="in-memory test images")
    p.add_argument("--files", type=int, default=512, help="PNG files for score_paths")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch (and faiss) threads")
    p.add_argument("--clock", default="wall", choices=sorted(CLOCK), help="cpu: needs --threads 1")
    p.add_argument("--backends", nargs="+", default=["torch", "faiss"])
    p.add_argument("--amps", nargs="+", default=["none", "auto"])
    args = p.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        raise SystemExit("error: --clock cpu needs --threads 1")
    global clock
    clock = CLOCK[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss = faiss_or_none()
        if faiss is not None:
            faiss.omp_set_num_threads(args.threads)
    train = load_dataset("fashion-mnist", "train").images
    test = load_dataset("fashion-mnist", "test").images[: args.n_test]
    with tempfile.TemporaryDirectory() as tmp:
        write_pngs(test[: args.files], Path(tmp))
        rows = measure(args, train, test, Path(tmp))
    out = {
        "rows": rows,
        "settings": {
            "recipe": RECIPE,
            "n_test": len(test),
            "files": args.files,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "clock": args.clock,
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
    }
    print(json.dumps(out, indent=1))
    print(table(rows), file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
