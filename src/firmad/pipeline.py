"""A run from recipe to report: train (or resume) -> score the last checkpoint -> write the report.

The CLI and the benchmark grid both call these two functions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from firmad.config import RunConfig, config_from_dict, load_config, parse_scorer
from firmad.data import OneClassSplit
from firmad.errors import CheckpointError, ConfigError
from firmad.io import load_checkpoint, prefixed
from firmad.metrics import evaluate_scores
from firmad.report import write_plots, write_report_md, write_results
from firmad.scoring import build_scorer, extract_features, score_run
from firmad.train import (
    CHECKPOINT,
    Trainer,
    build_model,
    load_split,
    prepare_images,
    resolve_device,
    save_run_config,
)


def default_run_dir(cfg: RunConfig) -> Path:
    classes = cfg.data.normal_class
    tag = "-".join(map(str, classes)) if isinstance(classes, list) else str(classes)
    return (
        Path("runs") / cfg.name / f"{cfg.data.dataset}-c{tag}-{cfg.method.name}-s{cfg.train.seed}"
    )


def read_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise CheckpointError(f"{run_dir} is not a firmad run directory (no config.yaml)")
    return config_from_dict(yaml.safe_load(path.read_text()))


def _progress(quiet: bool) -> Progress | None:
    if quiet:
        return None
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )


def train_run(
    recipe: str | None,
    overrides: list[str] | None = None,
    out_dir: Path | None = None,
    resume: bool = False,
    evaluate: bool = True,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train a run (new or resumed) and, by default, evaluate it. Returns {run_dir, results}."""
    if resume:
        if out_dir is None:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        cfg = read_run_config(out_dir)
        if overrides:
            # Only where to run may change on resume; anything else would change the result.
            data = cfg.to_dict()
            for item in overrides:
                if not item.startswith("train.device="):
                    raise ConfigError(f"--resume continues a run as it was; {item!r} can't change")
                data["train"]["device"] = yaml.safe_load(item.partition("=")[2])
            cfg = config_from_dict(data)
        run_dir = Path(out_dir)
    else:
        cfg = load_config(recipe, overrides)
        run_dir = Path(out_dir) if out_dir else default_run_dir(cfg)
        if (run_dir / "config.yaml").exists() or (run_dir / f"{CHECKPOINT}.json").exists():
            raise ConfigError(
                f"{run_dir} already holds a run; continue it with --resume --out {run_dir}, "
                "or choose another --out"
            )
    start = time.perf_counter()
    split = load_split(cfg)
    trainer = Trainer(cfg, run_dir, split=split)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and (run_dir / f"{CHECKPOINT}.json").exists():
        trainer.restore()
    else:
        save_run_config(cfg, run_dir)
    curve = _curve_fn(cfg, split, trainer.device) if cfg.train.eval_every else None
    progress = _progress(quiet)
    if progress:
        with progress:
            trainer.fit(progress=progress, curve_fn=curve)
    else:
        trainer.fit(curve_fn=curve)
    train_wall = time.perf_counter() - start
    if not evaluate:
        return {"run_dir": run_dir, "results": None}
    return evaluate_run(
        run_dir,
        split=split,
        model=trainer.model,
        device=str(trainer.device),
        train_wall_s=train_wall,
    )


def _curve_fn(cfg: RunConfig, split: OneClassSplit, device: torch.device):
    """kNN-cosine (k=5) AUROC on a fixed test subsample: learning curves, never model selection."""
    gen = torch.Generator().manual_seed(cfg.train.seed + 99)
    n_test = len(split.test_images)
    test_idx = torch.randperm(n_test, generator=gen)[: cfg.eval.curve_max_test]
    bank_idx = torch.randperm(len(split.train_images), generator=gen)[:2000]
    bank_images = prepare_images(split.train_images[bank_idx], cfg.data.size)
    test_images = prepare_images(split.test_images[test_idx], cfg.data.size)
    labels = split.test_labels[test_idx].numpy()
    if labels.min() == labels.max():
        return None

    def curve(model) -> float:
        kw = dict(
            device=device,
            size=cfg.data.size,
            resize_ratio=cfg.eval.resize_ratio,
            channels=cfg.data.channels,
            batch_size=cfg.eval.batch_size,
        )
        bank = extract_features(model.encoder, bank_images, **kw)
        feats = extract_features(model.encoder, test_images, **kw)
        scores = build_scorer("knn_cos", k=5).fit(bank).score(feats)
        return evaluate_scores(labels, scores)["auroc"]

    return curve


def evaluate_run(
    run_dir: Path,
    scorers: list[str] | None = None,
    variants: list[str] | None = None,
    device: str | None = None,
    split: OneClassSplit | None = None,
    model=None,
    train_wall_s: float | None = None,
) -> dict[str, Any]:
    """Score the run's last checkpoint with every scorer x variant; write results, report, plots."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    start = time.perf_counter()
    tensors, meta = load_checkpoint(run_dir, CHECKPOINT)
    if not meta.get("finished"):
        raise CheckpointError(
            f"{run_dir}: training stopped at epoch {meta['epoch']} of {cfg.train.epochs}; "
            f"finish it with `firmad train --resume --out {run_dir}`"
        )
    if split is None:
        split = load_split(cfg)
    dev = resolve_device(device or cfg.train.device)
    if model is None:
        model = build_model(cfg, cfg.data.dataset)
        model.load_state_dict(prefixed(tensors, "model"))
    model = model.to(dev).eval()

    scorer_specs = [parse_scorer(s) for s in (scorers or cfg.eval.scorers)]
    for name, _ in scorer_specs:
        build_scorer(name)  # unknown names fail here, before any work
    variants = list(variants or cfg.eval.variants)
    train_images = prepare_images(split.train_images, cfg.data.size)
    test_images = prepare_images(split.test_images, cfg.data.size)
    labels = split.test_labels.numpy()
    results, details = score_run(
        model.encoder,
        train_images,
        test_images,
        labels,
        scorers=scorer_specs,
        variants=variants,
        device=dev,
        batch_size=cfg.eval.batch_size,
        size=cfg.data.size,
        resize_ratio=cfg.eval.resize_ratio,
        n_crops=cfg.eval.n_crops,
        seed=cfg.train.seed,
        bank_size=cfg.eval.bank_size,
        bank_centroids=cfg.eval.bank_centroids,
        channels=cfg.data.channels,
        return_details=True,
    )
    scores_by_name = dict(details["scores"])
    test_feats = details["test_features"]
    # The methods' own scores: Deep SVDD distance, binary classifier logit.
    own = None
    if cfg.method.name == "dsvdd":
        own = ("svdd", (test_feats.to(dev) - model.centre).pow(2).sum(1).cpu().numpy())
    elif cfg.method.name == "binary":
        with torch.no_grad():
            own = ("logit", model.classifier(test_feats.to(dev)).squeeze(1).float().cpu().numpy())
    if own is not None:
        name, scores = own
        results.insert(
            0, {"scorer": name, "k": None, "variant": "plain", **evaluate_scores(labels, scores)}
        )
        scores_by_name[name] = scores

    history = meta.get("history", [])
    eval_wall = time.perf_counter() - start
    prev_train = train_wall_s if train_wall_s is not None else _previous_train_wall(run_dir)
    record = {
        "dataset": split.dataset,
        "normal_classes": list(split.normal_classes),
        "normal_class_names": [split.classes[i] for i in split.normal_classes]
        if split.classes
        else [],
        "method": cfg.method.name,
        "backbone": cfg.model.backbone,
        "epochs": meta["epoch"],
        "seed": cfg.train.seed,
        "subsample": split.subsample,
        "checkpoint": "last",
        "checkpoint_step": meta.get("global_step"),
        "train_time_s": meta.get("elapsed_s"),
        "eval_time_s": round(eval_wall, 3),
        "wall_time_s": round((prev_train or 0.0) + eval_wall, 3),
        "recipe": cfg.name,
        "results": results,
    }
    if history:
        record["learning_curve"] = history
        best = max(history, key=lambda h: h["auroc"])
        record["diagnostics"] = {
            "note": "diagnostic, chosen on test data — not a headline result",
            "best_curve_auroc": best["auroc"],
            "best_curve_epoch": best["epoch"],
            "curve_scorer": "knn_cos k=5 on a test subsample",
        }
    results = _merge_results(run_dir / "results.json", results, meta.get("global_step"))
    record["results"] = results
    path = write_results(run_dir, record, results)
    written = json.loads(path.read_text())
    curve = ([h["epoch"] for h in history], [h["auroc"] for h in history]) if history else None
    write_plots(run_dir, labels, scores_by_name, test_feats.cpu().numpy(), learning_curve=curve)
    write_report_md(run_dir, written)
    return {"run_dir": run_dir, "results": written}


def _merge_results(path: Path, new: list[dict], step: int | None) -> list[dict]:
    """Re-scoring with some scorers/variants keeps the other entries of the same checkpoint."""
    if not path.exists():
        return new
    old = json.loads(path.read_text())
    if old.get("checkpoint_step") not in (None, step):
        return new  # another checkpoint: old numbers no longer describe this model
    key = lambda r: (r["scorer"], r.get("k"), r["variant"])  # noqa: E731
    fresh = {key(r) for r in new}
    return [r for r in old.get("results", []) if key(r) not in fresh] + new


def _previous_train_wall(run_dir: Path) -> float | None:
    try:
        _, meta = load_checkpoint(run_dir, CHECKPOINT)
        return meta.get("elapsed_s")
    except CheckpointError:
        return None
