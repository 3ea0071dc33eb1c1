"""`firmad train`, `evaluate`, `bench` and `demo`: runs of a recipe."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer

from firmad.cli.common import (
    app,
    comma_list,
    console,
    int_list,
    interruptible,
    out,
    print_summary,
    recipe_config,
    resumed_config,
    split_scorers,
    state,
)
from firmad.cli.data import show_dataset
from firmad.errors import FirmadError


def _check_out(out_dir: Path | None) -> None:
    """--out of a run or grid: a folder (new, or firmad's), writable, no folder of images."""
    if out_dir is not None:
        from firmad.outputs import check_folder

        check_folder(out_dir, "--out")


# --- train / evaluate ----------------------------------------------------------------------------


@app.command(
    epilog="Examples:\n\n"
    "  firmad train --config fmnist-cpu --normal-class 3\n\n"
    "  firmad train --config configs/cifar10-firm.yaml --set train.epochs=100 --device cuda\n\n"
    "  firmad train --out runs/my-run --resume\n\n"
    "  torchrun --nproc_per_node=2 -m firmad train --config fmnist-cpu  (one model, 2 processes)"
    "\n\n  firmad train --config fmnist-cpu --classes 0,1,2,3 --out runs/four  (4 models)"
)
def train(
    config: str | None = typer.Option(
        None, "--config", "-c", help="Recipe: a YAML path or a shipped recipe name (fmnist-cpu)."
    ),
    set_: list[str] = typer.Option([], "--set", help="Override a key: section.key=value."),
    out_dir: Path | None = typer.Option(None, "--out", help="Run directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    normal_class: str | None = typer.Option(None, "--normal-class", help="Id or name."),
    seed: int | None = typer.Option(
        None, "--seed", help="Seed of the weights, data order and augmentations (train.seed)."
    ),
    epochs: int | None = typer.Option(None, "--epochs", help="Training epochs (train.epochs)."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the evaluation at the end."),
    classes: str | None = typer.Option(
        None,
        "--classes",
        help="Several one-class runs in one process (e.g. 0,1,2): one model per normal class, "
        "trained in turn on one device, each in --out/c<CLASS>.",
    ),
) -> None:
    """Train a detector on normal images (and synthetic outliers), then evaluate it."""
    if classes is not None:
        if normal_class is not None:
            raise FirmadError("give either --normal-class or --classes, not both")
        overrides = _train_overrides(set_, seed, epochs, device)
        _train_classes(classes, _TrainRequest(config, overrides, out_dir, resume, no_eval))
        return
    overrides = list(set_)
    if normal_class is not None:
        value = normal_class if not normal_class.lstrip("-").isdigit() else int(normal_class)
        overrides.append(f"data.normal_class={value!r}")  # a name quoted, an id as it is
    overrides += _train_overrides([], seed, epochs, device)
    if config is None and not resume:
        raise FirmadError(
            "give a recipe with --config (e.g. --config fmnist-cpu), or --resume --out DIR"
        )
    _check_out(out_dir)
    with interruptible() as where:  # from here on: importing torch takes seconds
        from firmad.pipeline import default_run_dir, train_run
        from firmad.training.distributed import process_group

        cfg = (
            resumed_config(out_dir, config, overrides)
            if resume
            else recipe_config(config, overrides)
        )
        run = out_dir or default_run_dir(cfg)
        where.update(run=run, again=f"firmad train --resume --out {run}")
        # Started by torchrun: one process of a DistributedDataParallel run (a no-op otherwise).
        with process_group(cfg.train.device):
            summary = train_run(
                cfg, out_dir=out_dir, resume=resume, evaluate=not no_eval, quiet=state["quiet"]
            )
    if summary["results"] is not None:
        print_summary(summary)


def _train_overrides(set_: list[str], seed, epochs, device) -> list[str]:
    """--set overrides, then those of --seed, --epochs and --device when given."""
    overrides = list(set_)
    for key, value in (("train.seed", seed), ("train.epochs", epochs), ("train.device", device)):
        if value is not None:
            overrides.append(f"{key}={value}")
    return overrides


@dataclass(frozen=True)
class _TrainRequest:
    """What `firmad train` was asked, less the classes: the recipe, its overrides (--set,
    --seed, --epochs, --device), --out, --resume and --no-eval."""

    config: str | None
    overrides: list[str]
    out_dir: Path | None
    resume: bool
    no_eval: bool


def _train_classes(classes: str, request: _TrainRequest) -> None:
    """`firmad train --classes 0,1,...`: one run per class, trained together in one process."""
    from firmad.pipeline import default_run_dir, train_runs

    names = comma_list(classes, "--classes", "class ids or names")
    config, out_dir, resume = request.config, request.out_dir, request.resume
    _check_out(out_dir)
    common = request.overrides
    cfgs, dirs = [], []
    for name in names:
        value = int(name) if name.lstrip("-").isdigit() else repr(name)
        own = [*common, f"data.normal_class={value}"]
        run_dir = out_dir / f"c{name}" if out_dir is not None else None
        if resume:
            if run_dir is None:
                raise FirmadError("--resume with --classes needs --out (the folder of the runs)")
            cfgs.append(resumed_config(run_dir, config, own))
        else:
            if config is None:
                raise FirmadError("give a recipe with --config (e.g. --config fmnist-cpu)")
            cfgs.append(recipe_config(config, own))
        dirs.append(run_dir or default_run_dir(cfgs[-1]))
    with interruptible():
        summaries = train_runs(
            cfgs, dirs, resume=resume, evaluate=not request.no_eval, quiet=state["quiet"]
        )
    for summary in summaries:
        if summary["results"] is not None:
            print_summary(summary)
        else:
            out.print(f"Trained: {summary['run_dir']}", highlight=False)


@app.command(
    epilog="Examples:\n\n  firmad evaluate runs/fmnist-cpu/fashion-mnist-c0-firm-s0\n\n"
    "  firmad evaluate RUN --scorers knn_cos:k=5,kde --variants plain,angled"
)
def evaluate(
    run_dir: Path = typer.Argument(..., help="A run directory written by `firmad train`."),
    scorers: str | None = typer.Option(None, help="Comma-separated, e.g. knn_cos:k=5,kde."),
    variants: str | None = typer.Option(None, help="Comma-separated: plain,angled,ensemble."),
    device: str | None = typer.Option(
        None, "--device", help="auto, cpu, cuda, cuda:N (default: the run's train.device)."
    ),
) -> None:
    """(Re)score a trained run from its checkpoint and rewrite its report."""
    with interruptible("files are written whole or not at all; run the command again"):
        from firmad.pipeline import evaluate_run

        summary = evaluate_run(
            run_dir,
            scorers=split_scorers(scorers) if scorers else None,
            variants=variants.split(",") if variants else None,
            device=device,
        )
    print_summary(summary)


# --- bench ---------------------------------------------------------------------------------------


@app.command(
    epilog="Examples:\n\n"
    "  firmad bench --config benchmarks/fmnist-cpu-grid.yaml --out runs/bench\n\n"
    "  firmad bench --config GRID.yaml --workers 2\n\n"
    "  firmad bench --config GRID.yaml --classes 0,sandal --seeds 1  (part of the grid now)\n\n"
    "  firmad bench --config GRID.yaml --devices 0,1,2,3  (one cell per GPU)\n\n"
    "  firmad bench --config GRID.yaml --executor ray --address auto --cell-gpus 1 "
    "--out /shared/runs/grid"
)
def bench(
    config: Path = typer.Option(..., "--config", "-c", help="Grid YAML."),
    out_dir: Path | None = typer.Option(None, "--out", help="Output folder of the grid."),
    workers: int = typer.Option(1, "--workers", help="Cells run at the same time (local)."),
    set_: list[str] = typer.Option([], "--set", help="Override for every cell: section.key=value."),
    executor: str = typer.Option("local", "--executor", help="local (subprocesses) or ray."),
    devices: str | None = typer.Option(
        None, "--devices", help="GPU ids, e.g. 0,1: one cell per GPU at a time (local)."
    ),
    address: str | None = typer.Option(
        None, "--address", help="Ray cluster address (auto, HOST:PORT); default: a local Ray."
    ),
    cell_cpus: float = typer.Option(1.0, "--cell-cpus", help="CPUs a Ray task asks for."),
    cell_gpus: float = typer.Option(0.0, "--cell-gpus", help="GPUs a Ray task asks for."),
    classes: str | None = typer.Option(
        None, "--classes", help="Run only these of the grid's classes (ids or names, e.g. 0,bag)."
    ),
    seeds: str | None = typer.Option(
        None, "--seeds", help="Run only these of the grid's seeds (e.g. 1,2)."
    ),
    threads: int | None = typer.Option(
        None,
        "--threads",
        help="CPU threads of each cell, whichever executor runs it (the grid's threads:); "
        "default: the recipe's train.threads, else 1 (the same numbers anywhere).",
    ),
) -> None:
    """Run a grid of datasets x classes x methods x seeds; resumable, one run directory a cell.

    --classes / --seeds run a part of the grid; its tables still list every cell.

    Ctrl-C stops it at once (running cells keep a checkpoint); the same command continues it.
    Exits with status 1 when every cell failed."""
    from firmad.bench import GridExecutor, run_grid

    _check_out(out_dir)
    with interruptible(
        "grid stopped; finished cells are kept and interrupted ones keep a checkpoint: run the "
        "same command again to continue"
    ):
        where = GridExecutor(executor, workers, devices, address, cell_cpus, cell_gpus)
        result = run_grid(
            config, out_dir=out_dir, quiet=state["quiet"], overrides=list(set_),
            executor=where, classes=comma_list(classes, "--classes"),
            seeds=int_list(seeds, "--seeds"), threads=threads,
        )  # fmt: skip
    out.print(result["markdown"], highlight=False)
    out.print(f"Tables: {result['csv']} and {result['md']}", highlight=False)
    failed = [r for r in result["rows"] if r["status"] == "failed"]
    for r in failed:
        console.print(
            f"failed: {r['recipe']} {r['dataset']} class {r['normal_class']} seed {r['seed']}: "
            f"{r['error']}",
            highlight=False,
        )
    ran = result["statuses"]
    if ran and all(s["status"] == "failed" for s in ran):
        console.print("[bold red]error:[/] every cell of the grid failed (see above)")
        raise typer.Exit(1)


# --- demo ----------------------------------------------------------------------------------------


@app.command(epilog="Example:\n\n  firmad demo --out runs/demo")
def demo(
    out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory of the demo."),
) -> None:
    """What `make demo` runs: FIRM on Fashion-MNIST T-shirt/top with the CPU recipe, all scorers.

    Run it again: a finished demo shows its results, an interrupted one continues."""
    from firmad.run import RunDir

    _check_out(out_dir)
    with interruptible() as where:
        from firmad.config import load_config
        from firmad.pipeline import train_run

        if not state["quiet"]:
            show_dataset("fashion-mnist", None)
        resume = RunDir(out_dir).state in ("partial", "finished", "evaluated")
        cfg = load_config("fmnist-cpu", ["data.normal_class=0"])
        where.update(run=out_dir, again=f"firmad demo --out {out_dir}")
        summary = train_run(cfg, out_dir=out_dir, resume=resume, quiet=state["quiet"])
    print_summary(summary)
