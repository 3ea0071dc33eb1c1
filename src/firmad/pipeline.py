"""A run from config to report: train (or resume) -> score the last checkpoint -> write reports.

The Python API takes typed objects (`RunConfig`); the CLI and the benchmark grid turn strings
into configs and call these functions. Each run directory has one owner (`firmad.run.RunDir`),
locked for the whole run.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from firmad.config import (
    RunConfig,
    apply_overrides,
    check_scorer,
    config_from_dict,
    parse_scorer,
    read_recipe,
)
from firmad.data import OneClassSplit
from firmad.data.pool import prepare_images
from firmad.engine import Engine, with_device
from firmad.errors import CheckpointError, ConfigError, FirmadError
from firmad.factory import build_extractor, build_split, build_trainer
from firmad.metrics import evaluate_scores
from firmad.report import write_plots, write_report_md, write_results
from firmad.robustness.folders import robustness_for_run
from firmad.run import RunDir, safe_component
from firmad.scoring import build_scorer, result_identity
from firmad.training import (
    CheckpointSaver,
    LearningCurve,
    MetricsLog,
    ProgressBar,
    Trainer,
    distributed,
    fit_together,
)
from firmad.training.callbacks import progress_bar

# Keys that may differ between a stored run and the options given to resume it.
RESUMABLE_CHANGES = ("train.device", "train.threads")
# What evaluating a finished run may change besides (its scorers, variants, batch size...).
EVAL_SECTION = "eval."


def default_run_dir(cfg: RunConfig) -> Path:
    classes = cfg.data.normal_class
    tag = "-".join(map(str, classes)) if isinstance(classes, list) else str(classes)
    name = f"{cfg.data.dataset}-c{tag}-{cfg.method.name}-s{cfg.train.seed}"
    return Path("runs") / safe_component(cfg.name) / safe_component(name)


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def resume_config(out_dir: Path | None, recipe: str | None, overrides: list[str]) -> RunConfig:
    """The stored config of the run in ``out_dir`` (or ``recipe``, keeping the run's name)
    with the overrides applied; `train_run` then refuses real changes."""
    if out_dir is None:
        raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
    stored = RunDir(out_dir).read_config()
    base = read_recipe(recipe) if recipe else stored.to_dict()
    if recipe and "name" not in base:
        base["name"] = stored.name
    return config_from_dict(apply_overrides(base, overrides))


def config_changes(stored: RunConfig, given: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ, as {key: (stored, given)}; where to run is not a change."""
    a, b = _flatten(stored.to_dict()), _flatten(given.to_dict())
    return {
        k: (a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES
    }


def refuse_changes(
    changes: dict[str, tuple[Any, Any]],
    where: str,
    fix: str = "a resumed run must keep its settings — drop those options, or start a new run "
    "with another --out",
) -> None:
    if changes:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        raise ConfigError(f"{where} was made with other settings ({listed}); {fix}")


def train_run(
    cfg: RunConfig,
    out_dir: Path | None = None,
    resume: bool = False,
    evaluate: bool = True,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train a run (new, or resumed with ``resume=True``) and, by default, evaluate it.

    Resuming compares ``cfg`` with the run's stored config and refuses any change but where to
    run (device, threads). Returns ``{"run_dir", "results"}``.

    Inside a process group (torchrun), rank 0 owns the run directory (lock, config, log,
    checkpoints, evaluation) and tells the other ranks whether to train; they train with it and
    return ``results`` None.
    """
    return train_runs([cfg], [out_dir], resume=resume, evaluate=evaluate, quiet=quiet)[0]


def _check_target(run: RunDir, resume: bool) -> None:
    state = run.state
    if resume and state == "new":
        raise ConfigError(f"{run.path} holds no run to resume; start it without --resume")
    if state in ("new", "started"):
        run.check_writable_new()  # "started" (no checkpoint yet) may simply start again


def train_runs(
    cfgs: list[RunConfig],
    out_dirs: list[Path | None] | None = None,
    resume: bool = False,
    evaluate: bool = True,
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """Train several runs in one process, one step of each in turn (`fit_together`), then
    evaluate each: several one-class models (e.g. every class of a dataset) share one device.

    Each run is exactly the run `train_run` would train alone, in its own run directory (all
    are locked and checked before any trains). Returns one ``{"run_dir", "results"}`` a run.
    Under torchrun only one run: rank 0 owns its directory, the other ranks follow it.
    """
    runs = _run_dirs(cfgs, out_dirs)
    world = distributed.world()
    if not world.is_main:
        return [_follow_rank0(cfgs[0], runs[0], resume)]
    start = time.perf_counter()
    # Checked again under the lock; first here, as taking the lock creates the folder and its
    # lock file, which must not happen in a folder of the user's or for a run that is not there.
    for run in runs:
        _check_target(run, resume)
    with contextlib.ExitStack() as stack:
        for run in runs:
            stack.enter_context(run)
        try:
            states = [_check_run(run, cfg, resume) for run, cfg in zip(runs, cfgs, strict=True)]
        except BaseException:
            _tell_followers(world, _FAILED)
            raise
        done = {i for i, state in enumerate(states) if resume and state == "evaluated" and evaluate}
        _tell_followers(world, _SKIP if done else _TRAIN)
        todo = [i for i in range(len(runs)) if i not in done]
        splits = {i: build_split(cfgs[i]) for i in todo}
        trainers = {i: _trainer(cfgs[i], runs[i], splits[i], restore=resume) for i in todo}
        earlier_s = {i: t.elapsed for i, t in trainers.items()}  # of a resumed run
        for i in todo:
            if states[i] in ("new", "started"):
                runs[i].write_config(cfgs[i])
        _fit([t for t in trainers.values() if not t.finished], quiet)
        wall = time.perf_counter() - start
        out = []
        for i, run in enumerate(runs):
            if i in done:
                out.append({"run_dir": run.path, "results": json.loads(run.results.read_text())})
            elif not evaluate:
                out.append({"run_dir": run.path, "results": None})
            else:
                model, wall_i = trainers[i].model, earlier_s[i] + wall
                result = _evaluate(run, cfgs[i], split=splits[i], model=model, train_wall_s=wall_i)
                out.append(result)
        return out


def _run_dirs(cfgs: list[RunConfig], out_dirs: list[Path | None] | None) -> list[RunDir]:
    """One run directory a config (the default one where none is given), all distinct."""
    if not all(isinstance(cfg, RunConfig) for cfg in cfgs):
        raise ConfigError("train_run takes a RunConfig; build one with firmad.config.load_config")
    if distributed.world().distributed and len(cfgs) > 1:
        raise ConfigError("several runs in one process cannot also use torchrun; train one run")
    out_dirs = list(out_dirs or [None] * len(cfgs))
    if len(out_dirs) != len(cfgs):
        raise ConfigError("train_runs: one output directory per config")
    runs = [RunDir(d or default_run_dir(c)) for c, d in zip(cfgs, out_dirs, strict=True)]
    if len({r.path.resolve() for r in runs}) != len(runs):
        raise ConfigError("train_runs: two runs would share a run directory; give each its own")
    return runs


# What rank 0 tells the other ranks once it has checked the run directory.
_FAILED, _TRAIN, _SKIP = 0, 1, 2


def _tell_followers(world, code: int) -> None:
    if world.distributed:
        distributed.broadcast_int(code)


def _follow_rank0(cfg: RunConfig, run: RunDir, resume: bool) -> dict[str, Any]:
    """A rank other than 0: train with rank 0 (reading, never writing, the run directory)."""
    code = distributed.broadcast_int(_FAILED)
    if code == _FAILED:
        raise FirmadError("rank 0 stopped before training (its message says why)")
    if code == _SKIP:
        return {"run_dir": run.path, "results": None}
    saver = CheckpointSaver(run.path, every=cfg.train.checkpoint_every)  # writes on rank 0 only
    trainer = build_trainer(cfg, split=build_split(cfg), callbacks=[saver])
    if resume:
        saver.restore(trainer)
    _fit([trainer] if not trainer.finished else [], quiet=True)
    return {"run_dir": run.path, "results": None}


def _check_run(run: RunDir, cfg: RunConfig, resume: bool) -> str:
    """The run directory's state, after refusing what cannot be done there."""
    _check_target(run, resume)
    state = run.state
    if resume:
        stored = run.read_config()
        refuse_changes(config_changes(stored, cfg), str(run.config))
        meta = run.checkpoint_meta()
        if meta and isinstance(meta.get("config"), dict):
            # config.yaml edited after the checkpoint was written: the weights do not match
            saved = _config_or_error(meta["config"], run.checkpoint_json)
            refuse_changes(config_changes(saved, stored), f"the checkpoint in {run.path}")
    elif state in ("partial", "finished", "evaluated"):
        raise ConfigError(
            f"{run.path} already holds a run; continue it with --resume --out {run.path}, "
            "or choose another --out"
        )
    return state


def _config_or_error(data: dict, where: Path) -> RunConfig:
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise CheckpointError(f"{where}: the stored config is invalid ({err})") from None


def _trainer(cfg: RunConfig, run: RunDir, split: OneClassSplit, restore: bool) -> Trainer:
    log = MetricsLog(run.metrics)
    saver = CheckpointSaver(run.path, every=cfg.train.checkpoint_every)
    callbacks: list = [log]
    curve = _curve_fn(cfg, split) if cfg.train.eval_every else None
    if curve is not None:
        callbacks.append(LearningCurve(curve, cfg.train.eval_every, log))
    callbacks.append(saver)  # last: a checkpoint never describes more than the log
    trainer = build_trainer(cfg, split=split, callbacks=callbacks)
    if restore:
        saver.restore(trainer)
    return trainer


def _fit(trainers: list[Trainer], quiet: bool) -> None:
    """Train to the end: one trainer alone (torchrun-aware), several taking turns."""
    if not trainers:
        return
    progress = None if quiet else progress_bar()
    if progress is not None:
        for t in trainers:
            t.callbacks.insert(0, ProgressBar(progress))
    with progress or contextlib.nullcontext():
        if len(trainers) == 1:
            trainers[0].fit()
        else:
            fit_together(trainers)


def _curve_fn(cfg: RunConfig, split: OneClassSplit):
    """kNN-cosine (k=5) AUROC on a fixed test subsample: learning curves, never model selection."""
    gen = torch.Generator().manual_seed(cfg.train.seed + 99)
    n_test = len(split.test_images)
    test_idx = torch.randperm(n_test, generator=gen)[: cfg.eval.curve_max_test]
    bank_idx = torch.randperm(len(split.train_images), generator=gen)[:2000]
    bank_images = prepare_images(split.train_images[bank_idx], cfg.data.size)
    test_images = prepare_images(split.test_images[test_idx], cfg.data.size)
    labels = split.test_labels[test_idx].numpy()
    if len(labels) == 0 or labels.min() == labels.max():
        return None

    def curve(model) -> float:
        extractor = build_extractor(cfg, model.encoder)
        bank = extractor.extract(bank_images, cfg.eval.batch_size)
        feats = extractor.extract(test_images, cfg.eval.batch_size)
        scores = build_scorer("knn_cos", k=5).fit(bank).score(feats)
        return evaluate_scores(labels, scores)["auroc"]

    return curve


def evaluate_run(
    run_dir: Path,
    scorers: list[str] | None = None,
    variants: list[str] | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Score a finished run's last checkpoint with every scorer x variant; write results,
    report and plots. Scorers/variants default to the run's ``eval`` settings."""
    run = RunDir(run_dir)
    run.read_config()  # not a run (or a broken one): say so before the lock creates anything
    for spec in scorers or []:
        check_scorer(spec)  # a wrong scorer fails before any work
    with run:
        cfg = run.read_config()
        meta = run.checkpoint_meta()
        if meta and isinstance(meta.get("config"), dict):
            # config.yaml edited after training: the report would describe another model.
            saved = _config_or_error(meta["config"], run.checkpoint_json)
            changes = config_changes(saved, cfg)
            refuse_changes(
                {k: v for k, v in changes.items() if not k.startswith(EVAL_SECTION)},
                f"the checkpoint in {run.path}",
                f"{run.config} was edited after training; restore those settings (only the "
                "eval section may change), or train a new run with another --out",
            )
        return _evaluate(run, with_device(cfg, device), scorers=scorers, variants=variants)


def _evaluate(
    run: RunDir,
    cfg: RunConfig,
    scorers: list[str] | None = None,
    variants: list[str] | None = None,
    split: OneClassSplit | None = None,
    model=None,
    train_wall_s: float | None = None,
) -> dict[str, Any]:
    """Score the run's model with every scorer x variant; write results, plots and report."""
    start = time.perf_counter()
    meta = run.checkpoint_meta()
    if meta is None:
        raise CheckpointError(
            f"no checkpoint in {run.path}; train first with `firmad train --out {run.path}`"
        )
    if model is None:
        model = run.load_model(cfg, device=cfg.train.device)
    elif not meta.get("finished"):
        raise CheckpointError(f"{run.path}: training is not finished")
    if split is None:
        split = build_split(cfg)
    specs = [parse_scorer(s) for s in (scorers or cfg.eval.scorers)]
    results, details = Engine(cfg).evaluate(
        model.eval(),
        split.train_images,
        split.test_images,
        split.test_labels,
        specs,
        list(variants or cfg.eval.variants),
    )
    eval_wall = time.perf_counter() - start
    prev_train = train_wall_s if train_wall_s is not None else meta.get("elapsed_s")
    record = _record(cfg, split, meta, eval_wall, (prev_train or 0.0) + eval_wall)
    record["results"] = _merge_results(run.results, results, meta.get("global_step"))
    # The `attack` recipe key: robust AUROC of the headline detector (None when off).
    robustness = robustness_for_run(run, cfg, model, split, meta.get("global_step"))
    if robustness is not None:
        record["robustness"] = robustness
    written = json.loads(write_results(run.path, record, record["results"]).read_text())
    history = meta.get("history", [])
    curve = ([h["epoch"] for h in history], [h["auroc"] for h in history]) if history else None
    test_feats = details["test_features"].cpu().numpy()
    write_plots(run.path, details["labels"], details["scores"], test_feats, learning_curve=curve)
    write_report_md(run.path, written)
    return {"run_dir": run.path, "results": written}


def _record(
    cfg: RunConfig, split: OneClassSplit, meta: dict, eval_s: float, wall_s: float
) -> dict[str, Any]:
    """What results.json says of a run besides its result rows."""
    classes = split.classes
    record = {
        "dataset": split.dataset,
        "normal_classes": list(split.normal_classes),
        "normal_class_names": [classes[i] for i in split.normal_classes] if classes else [],
        "method": cfg.method.name,
        "backbone": cfg.model.backbone,
        "epochs": meta["epoch"],
        "seed": cfg.train.seed,
        "subsample": split.subsample,
        "checkpoint": "last",
        "checkpoint_step": meta.get("global_step"),
        "train_time_s": meta.get("elapsed_s"),
        "eval_time_s": round(eval_s, 3),
        "wall_time_s": round(wall_s, 3),
        "recipe": cfg.name,
        "numerics": meta.get("numerics"),  # precision trained in (train.amp resolved) and why
        "results": [],
    }
    history = meta.get("history", [])
    if history:
        record["learning_curve"] = history
        best = max(history, key=lambda h: h["auroc"])
        record["diagnostics"] = {
            "note": "diagnostic, chosen on test data — not a headline result",
            "best_curve_auroc": best["auroc"],
            "best_curve_epoch": best["epoch"],
            "curve_scorer": "knn_cos k=5 on a test subsample",
        }
    return record


def _merge_results(path: Path, new: list[dict], step: int | None) -> list[dict]:
    """Re-scoring with some scorers/variants keeps the other entries of the same checkpoint."""
    if not path.exists():
        return new
    old = json.loads(path.read_text())
    if old.get("checkpoint_step") not in (None, step):
        return new  # another checkpoint: old numbers no longer describe this model
    fresh = {result_identity(r) for r in new}
    return [r for r in old.get("results", []) if result_identity(r) not in fresh] + new


__all__ = [
    "config_changes",
    "default_run_dir",
    "evaluate_run",
    "train_run",
    "train_runs",
]
