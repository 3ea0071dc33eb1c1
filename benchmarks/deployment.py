"""Lightweight deployment figures: one detector per backbone, trained by the same CPU recipe.

For each backbone: train FIRM with the `fmnist-cpu` recipe on one Fashion-MNIST class (the
backbone swapped in; networks without a width setting use width 1.0), then report parameters,
FLOPs per image (encoder forward at the detector's input size), the ONNX file size, onnxruntime
latency per image at batch 1 and batch 64 (medians over repeats, every model timed in turn in one
loop so they share the machine's state), and the AUROC (kNN cosine k=5, plain) on the whole test
split, from firmad and from the exported graph.

    python benchmarks/deployment.py --out benchmarks/results/deployment
    python benchmarks/deployment.py --backbones resnet_small,lenet --class 0 --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from firmad.data import one_vs_rest
from firmad.detector import OneClassDetector
from firmad.export import export_onnx
from firmad.io import atomic_write_json, atomic_write_text
from firmad.metrics import evaluate_scores
from firmad.models import complexity

BACKBONES = ("resnet_small", "mobilenetv3_small", "shufflenetv2_x0_5", "lenet", "resnet18_cifar")
WIDTHLESS = ("mobilenetv3_small", "shufflenetv2_x0_5", "lenet")


def train(backbone: str, normal_class: int, extra: list[str]) -> tuple[OneClassDetector, float]:
    overrides = [f"model.backbone={backbone}", "train.device=cpu", *extra]
    if backbone in WIDTHLESS:
        overrides.append("model.width=1.0")
    det = OneClassDetector(recipe="fmnist-cpu", overrides=overrides, scorer="knn_cos", k=5)
    split = one_vs_rest("fashion-mnist", normal_class)
    tic = time.perf_counter()
    det.fit(split.train_images)
    return det, time.perf_counter() - tic


def latency(sessions: dict, inputs: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each session on its input, timed in turn (interleaved)."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for name, sess in sessions.items():  # warm-up
        sess.run(None, {"images": inputs[name]})
    for _ in range(repeats):
        for name, sess in sessions.items():
            tic = time.perf_counter()
            sess.run(None, {"images": inputs[name]})
            times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--backbones", default=",".join(BACKBONES))
    ap.add_argument("--class", dest="normal_class", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/deployment"))
    ap.add_argument(
        "--resnet18-steps",
        type=int,
        default=200,
        help="steps per epoch cap for resnet18_cifar (14 images/s on 2 cores: the full recipe "
        "would take two hours)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training")
    ap.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="cap the recipe's steps per epoch for every backbone (a CPU budget)",
    )
    ap.add_argument("--quick", action="store_true", help="a few steps per model (smoke test)")
    ap.add_argument(
        "--latency-only",
        action="store_true",
        help="re-time the ONNX files of an earlier run in --out (e.g. on a quieter machine)",
    )
    args = ap.parse_args()
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    if args.latency_only:
        retime(args, ort)
        return
    split = one_vs_rest("fashion-mnist", args.normal_class)
    labels = split.test_labels.numpy()
    args.out.mkdir(parents=True, exist_ok=True)
    rows, sessions, one, many = [], {}, {}, {}
    for backbone in args.backbones.split(","):
        extra = ["train.steps_per_epoch=5", "train.epochs=1"] if args.quick else []
        if args.steps_per_epoch and not args.quick:
            extra += [f"train.steps_per_epoch={args.steps_per_epoch}"]
        if backbone == "resnet18_cifar" and not args.quick:
            cap = min(args.resnet18_steps, args.steps_per_epoch or args.resnet18_steps)
            extra += [f"train.steps_per_epoch={cap}"]
        det, train_s = train(backbone, args.normal_class, extra)
        scores = det.decision_function(split.test_images)
        path = export_onnx(det, args.out / f"{backbone}.onnx")
        sess = session(path, ort)
        test = split.test_images.numpy()
        onnx_scores = np.concatenate(
            [sess.run(None, {"images": test[i : i + 500]})[0] for i in range(0, len(test), 500)]
        )
        cfg = det.config_
        size = cfg.data.size
        c = complexity(det.model_.encoder, (cfg.data.channels, size, size))
        rows.append(
            {
                "backbone": backbone,
                "width": cfg.model.width,
                "epochs": cfg.train.epochs,
                "steps_per_epoch": cfg.train.steps_per_epoch,
                "train_s": round(train_s, 1),
                "params": c["params"],
                "flops_per_image": c["flops"],
                "onnx_bytes": path.stat().st_size,
                "auroc": evaluate_scores(labels, scores)["auroc"],
                "auroc_onnx": evaluate_scores(labels, onnx_scores)["auroc"],
                "max_abs_diff_onnx": float(np.abs(onnx_scores - scores).max()),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        sessions[backbone] = sess
        one[backbone] = test[:1]
        many[backbone] = test[:64]
    time_rows(rows, sessions, one, many, args.quick)
    record = {
        "command": "python benchmarks/deployment.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (False, None)
        ),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "threads": torch.get_num_threads(),
        "normal_class": args.normal_class,
        "rows": rows,
    }
    atomic_write_json(args.out / "deployment.json", record)
    write_table(args.out, rows)


def session(path: Path, ort):
    options = ort.SessionOptions()
    # Idle sessions must not spin on the cores while another one is timed.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def time_rows(rows: list[dict], sessions: dict, one: dict, many: dict, quick: bool) -> None:
    lat1 = latency(sessions, one, repeats=50 if quick else 300)
    lat64 = latency(sessions, many, repeats=5 if quick else 40)
    for row in rows:
        row["latency_ms_batch1"] = 1000 * lat1[row["backbone"]]
        row["latency_ms_per_image_batch64"] = 1000 * lat64[row["backbone"]] / 64


def retime(args, ort) -> None:
    record = json.loads((args.out / "deployment.json").read_text())
    test = one_vs_rest("fashion-mnist", record["normal_class"]).test_images.numpy()
    rows = record["rows"]
    sessions = {r["backbone"]: session(args.out / f"{r['backbone']}.onnx", ort) for r in rows}
    time_rows(rows, sessions, {b: test[:1] for b in sessions}, {b: test[:64] for b in sessions},
              args.quick)  # fmt: skip
    record["latency_retimed"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    atomic_write_json(args.out / "deployment.json", record)
    write_table(args.out, rows)


def write_table(out: Path, rows: list[dict]) -> None:
    lines = [
        "| backbone | params | MFLOPs/image | ONNX MB | ms/image b1 | ms/image b64 | AUROC % "
        "(firmad / ONNX) | train s |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} w{r['width']:g} | {r['params']:,} | "
            f"{r['flops_per_image'] / 1e6:.1f} | {r['onnx_bytes'] / 1e6:.2f} | "
            f"{r['latency_ms_batch1']:.2f} | "
            f"{r['latency_ms_per_image_batch64']:.3f} | {100 * r['auroc']:.1f} / "
            f"{100 * r['auroc_onnx']:.1f} | {r['train_s']:.0f} |"
        )
    atomic_write_text(out / "deployment.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
