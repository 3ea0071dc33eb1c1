"""The `firmad` command: a thin layer over the library (train, evaluate, bench, data, demo).

Exit status: 0 success, 2 user error (message, no traceback), 1 internal error, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

import firmad
from firmad.errors import FirmadError
from firmad.safeyaml import shorten

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="One-class anomaly detection with contrastive learning (FIRM), benchmarks and reports.",
)
data_app = typer.Typer(no_args_is_help=True, help="Find, inspect and prepare datasets.")
app.add_typer(data_app, name="data")

console = Console(stderr=True, soft_wrap=True)  # errors are never wrapped mid-message
out = Console()
state = {"quiet": False}


def _version(value: bool) -> None:
    if value:
        print(f"firmad {firmad.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only print results and errors."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Print debug messages."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    state["quiet"] = quiet
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s")
    if not verbose:  # faiss announces which CPU build it loaded
        logging.getLogger("faiss").setLevel(logging.WARNING)
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)


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
        _train_classes(classes, config, set_, out_dir, resume, seed, epochs, device, no_eval)
        return
    overrides = list(set_)
    if normal_class is not None:
        value = normal_class if not normal_class.lstrip("-").isdigit() else int(normal_class)
        overrides.append(
            f"data.normal_class={value!r}"
            if isinstance(value, str)
            else f"data.normal_class={value}"
        )
    for key, value in (("train.seed", seed), ("train.epochs", epochs), ("train.device", device)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if config is None and not resume:
        raise FirmadError(
            "give a recipe with --config (e.g. --config fmnist-cpu), or --resume --out DIR"
        )
    with _interruptible() as where:  # from here on: importing torch takes seconds
        from firmad.pipeline import default_run_dir, train_run
        from firmad.training.distributed import process_group

        cfg = _resume_config(out_dir, config, overrides) if resume else _config(config, overrides)
        run = out_dir or default_run_dir(cfg)
        where.update(run=run, again=f"firmad train --resume --out {run}")
        # Started by torchrun: one process of a DistributedDataParallel run (a no-op otherwise).
        with process_group(cfg.train.device):
            summary = train_run(
                cfg, out_dir=out_dir, resume=resume, evaluate=not no_eval, quiet=state["quiet"]
            )
    if summary["results"] is not None:
        _print_summary(summary)


def _train_classes(classes, config, set_, out_dir, resume, seed, epochs, device, no_eval):
    """`firmad train --classes 0,1,...`: one run per class, trained together in one process."""
    from firmad.pipeline import default_run_dir, train_runs

    names = _comma_list(classes, "--classes", "class ids or names")
    common = list(set_)
    for key, value in (("train.seed", seed), ("train.epochs", epochs), ("train.device", device)):
        if value is not None:
            common.append(f"{key}={value}")
    cfgs, dirs = [], []
    for name in names:
        value = int(name) if name.lstrip("-").isdigit() else repr(name)
        own = [*common, f"data.normal_class={value}"]
        run_dir = out_dir / f"c{name}" if out_dir is not None else None
        if resume:
            if run_dir is None:
                raise FirmadError("--resume with --classes needs --out (the folder of the runs)")
            cfgs.append(_resume_config(run_dir, config, own))
        else:
            if config is None:
                raise FirmadError("give a recipe with --config (e.g. --config fmnist-cpu)")
            cfgs.append(_config(config, own))
        dirs.append(run_dir or default_run_dir(cfgs[-1]))
    with _interruptible():
        summaries = train_runs(
            cfgs, dirs, resume=resume, evaluate=not no_eval, quiet=state["quiet"]
        )
    for summary in summaries:
        if summary["results"] is not None:
            _print_summary(summary)
        else:
            out.print(f"Trained: {summary['run_dir']}", highlight=False)


def _config(recipe: str | None, overrides: list[str]):
    from firmad.config import load_config

    return load_config(recipe, overrides)


def _resume_config(out_dir: Path | None, recipe: str | None, overrides: list[str]):
    from firmad.pipeline import resume_config

    return resume_config(out_dir, recipe, overrides)


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
    with _interruptible("files are written whole or not at all; run the command again"):
        from firmad.pipeline import evaluate_run

        summary = evaluate_run(
            run_dir,
            scorers=_split_scorers(scorers) if scorers else None,
            variants=variants.split(",") if variants else None,
            device=device,
        )
    _print_summary(summary)


@contextlib.contextmanager
def _interruptible(what: str | None = None):
    """Ctrl-C (and SIGTERM inside the training loop): say what was kept and how to continue,
    and exit with 130. Yields a dict where the command puts, once known, its run directory
    ("run") and the command that continues it ("again")."""
    from firmad.run import RunDir

    where: dict = {}
    try:
        yield where
    except KeyboardInterrupt as err:
        run, again = where.get("run"), where.get("again")
        step = getattr(err, "step", None)  # firmad.training.TrainingInterrupted
        if what is None and again and step is not None:
            what = f"a checkpoint was saved after step {step}; continue with `{again}`"
        elif what is None:
            what = "files are written whole or not at all; run the command again"
            with contextlib.suppress(Exception):
                if again and RunDir(run).checkpoint_meta() is not None:
                    what = f"the last checkpoint was kept; continue with `{again}`"
        console.print(f"interrupted: {what}", highlight=False)
        raise typer.Exit(130) from None


def _comma_list(
    text: str | None, option: str, what: str = "comma-separated values"
) -> list[str] | None:
    """'0, bag' -> ['0', 'bag']; None stays None; empty or repeated items are an error."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or len(set(items)) != len(items):
        raise FirmadError(f"{option}: expected distinct {what}, got {shorten(text)}")
    return items


def _int_list(text: str | None, option: str) -> list[int] | None:
    items = _comma_list(text, option)
    if items is None:
        return None
    try:
        return [int(t) for t in items]
    except ValueError:
        raise FirmadError(f"{option}: expected integers such as 1,2, got {shorten(text)}") from None


def _split_scorers(text: str) -> list[str]:
    """'knn_cos:k=5,kde' -> ['knn_cos:k=5', 'kde']; a part with '=' and no ':' continues one."""
    parts: list[str] = []
    for item in text.split(","):
        if "=" in item and ":" not in item and parts:
            parts[-1] += "," + item
        else:
            parts.append(item)
    return parts


def _print_summary(summary: dict) -> None:
    from firmad.report import format_table

    out.print(format_table(summary["results"]["results"]), highlight=False)
    out.print(f"Report: {summary['run_dir']}/report.md", highlight=False)


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
        "default: the cores shared by --workers, or --cell-cpus with Ray.",
    ),
) -> None:
    """Run a grid of datasets x classes x methods x seeds; resumable, one run directory a cell.

    --classes / --seeds run a part of the grid; its tables still list every cell.

    Ctrl-C stops it at once (running cells keep a checkpoint); the same command continues it.
    Exits with status 1 when every cell failed."""
    from firmad.bench import run_grid

    with _interruptible(
        "grid stopped; finished cells are kept and interrupted ones keep a checkpoint: run the "
        "same command again to continue"
    ):
        result = run_grid(
            config, out_dir=out_dir, workers=workers, quiet=state["quiet"],
            overrides=list(set_), executor=executor, devices=devices, address=address,
            cell_cpus=cell_cpus, cell_gpus=cell_gpus,
            classes=_comma_list(classes, "--classes"), seeds=_int_list(seeds, "--seeds"),
            threads=threads,
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


# --- data ----------------------------------------------------------------------------------------


@data_app.command("list", epilog="Example:\n\n  firmad data list --root ~/datasets")
def data_list(
    root: Path | None = typer.Option(
        None, "--root", help="Look only in this folder (and ROOT/NAME), not the usual places."
    ),
) -> None:
    """Which built-in datasets are found, and where."""
    from firmad.data import DATASETS, locate

    table = Table("dataset", "found at")
    for name in DATASETS:
        where = locate(name, root)
        table.add_row(name, str(where) if where else "not found (firmad data prepare NAME)")
    out.print(table)


@data_app.command("show", epilog="Example:\n\n  firmad data show fashion-mnist")
def data_show(
    name: str = typer.Argument(
        ..., help="fashion-mnist, mnist, cifar10, cifar100(-coarse), folder:PATH, npz:PATH"
    ),
    root: Path | None = typer.Option(None, "--root", help="Folder holding the dataset files."),
) -> None:
    """Print a dataset and its one-vs-rest split sizes per class."""
    _show_dataset(name, root)


def _show_dataset(name: str, root: Path | None) -> None:
    from firmad.data import describe, locate

    rows = describe(name, root)
    where = locate(name, root) if ":" not in name else name.partition(":")[2]
    table = Table(title=f"{name} one-vs-rest ({where})")
    for col in ("class", "name", "normal train", "test", "test anomalies"):
        table.add_column(col, justify="right" if col != "name" else "left")
    for r in rows:
        table.add_row(
            str(r["class_id"]),
            r["name"],
            str(r["n_train_normal"]),
            str(r["n_test"]),
            str(r["n_test_anomalies"]),
        )
    out.print(table)


@data_app.command("prepare", epilog="Example:\n\n  firmad data prepare fashion-mnist --download")
def data_prepare(
    name: str = typer.Argument(..., help="A built-in dataset name."),
    root: Path | None = typer.Option(None, "--root", help="Where to put or look for it."),
    download: bool = typer.Option(False, "--download", help="Download the official files."),
) -> None:
    """Make a dataset available: find it, or download the official files (needs internet)."""
    from firmad.data import prepare

    path = prepare(name, root=root, download=download)
    out.print(f"{name}: {path}", highlight=False)


# --- demo ----------------------------------------------------------------------------------------


@app.command(epilog="Example:\n\n  firmad demo --out runs/demo")
def demo(
    out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory of the demo."),
) -> None:
    """What `make demo` runs: FIRM on Fashion-MNIST T-shirt/top with the CPU recipe, all scorers.

    Run it again: a finished demo shows its results, an interrupted one continues."""
    from firmad.run import RunDir

    with _interruptible() as where:
        from firmad.config import load_config
        from firmad.pipeline import train_run

        if not state["quiet"]:
            _show_dataset("fashion-mnist", None)
        resume = RunDir(out_dir).state in ("partial", "finished", "evaluated")
        cfg = load_config("fmnist-cpu", ["data.normal_class=0"])
        where.update(run=out_dir, again=f"firmad demo --out {out_dir}")
        summary = train_run(cfg, out_dir=out_dir, resume=resume, quiet=state["quiet"])
    _print_summary(summary)


# --- detectors: fit / score / export --------------------------------------------------------------


@app.command(
    epilog="Examples:\n\n"
    "  firmad fit photos/good_parts --out det/\n\n"
    "  firmad fit photos/drones --out det/ --config fmnist-cpu --epochs 8 --scorer knn_cos:k=1"
    "\n\n  firmad fit photos/good_parts --out det/ --target-fpr 0.01 --seed 1 --device cuda"
)
def fit(
    folder: Path = typer.Argument(..., help="A folder of normal images (searched recursively)."),
    out_dir: Path = typer.Option(..., "--out", help="Detector directory to write (new or empty)."),
    config: str | None = typer.Option(
        None, "--config", "-c", help="Recipe (default fmnist-cpu: FIRM, narrow ResNet-10)."
    ),
    set_: list[str] = typer.Option([], "--set", help="Override a key: section.key=value."),
    scorer: str = typer.Option("knn_cos:k=5", "--scorer", help="Scorer spec, e.g. kde."),
    variant: str = typer.Option("plain", "--variant", help="plain, angled or ensemble."),
    holdout: str = typer.Option(
        "auto",
        "--holdout",
        help="Share of the images kept out of training to set the threshold on; auto = "
        "max(10 %, 10 / target-fpr images), at most half.",
    ),
    target_fpr: float = typer.Option(
        0.05,
        "--target-fpr",
        help="At most this share of the held-out normals scores above the threshold.",
    ),
    epochs: int | None = typer.Option(None, "--epochs", help="Training epochs (train.epochs)."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N."),
    seed: int | None = typer.Option(
        None, "--seed", help="Seeds training and the held-out draw (train.seed)."
    ),
) -> None:
    """Train a detector on a folder of normal images; set its threshold on held-out ones."""
    with _interruptible("nothing was saved; run the command again"):
        from firmad.fitting import FitOptions, check_fit_out, detector_for_fit, fit_folder

        opts = FitOptions(
            config, list(set_), scorer, variant, holdout, target_fpr, epochs, device, seed,
            verbose=not state["quiet"],
        )  # fmt: skip
        det = detector_for_fit(opts)
        check_fit_out(out_dir)
        report = fit_folder(det, folder, out_dir, say=_say, warn=_warn)
        _say(f"Report: {report}")
    cal = det.calibration_
    ci = cal.get("interval")
    interval = f", 95 % interval {ci[0]:.3f}-{ci[1]:.3f}" if ci else ""
    _say(
        f"Detector: {out_dir} (threshold {det.threshold_:.4g}: {cal['n_above']} of {cal['n']} "
        f"{cal['source']} images above it, FPR {cal['achieved_fpr']:.3f}{interval})"
    )


def _say(message: str) -> None:
    """A result line (stdout)."""
    out.print(message, highlight=False)


def _warn(message: str) -> None:
    """A warning or a skipped file (stderr)."""
    console.print(message, highlight=False)


@app.command(
    epilog="Examples:\n\n  firmad score det/ new_images/ --out scores.csv\n\n"
    "  firmad score det/ a.png b.jpg --threshold 0.2"
)
def score(
    detector: Path = typer.Argument(..., help="A detector directory (firmad fit)."),
    paths: list[Path] = typer.Argument(..., help="Image files or folders (recursive)."),
    out_csv: Path | None = typer.Option(None, "--out", help="CSV to write (default: stdout)."),
    threshold: float | None = typer.Option(None, "--threshold", help="Override the threshold."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    report_dir: Path | None = typer.Option(
        None, "--report", help="Folder for report.md and plots (default: beside --out CSV)."
    ),
) -> None:
    """Score images: a CSV with columns path, score (higher = more anomalous) and anomaly (1
    above the threshold, 0 not, empty without a threshold). Every file not scored is listed
    with its reason; nothing is written when no image could be scored."""
    from firmad.detector import OneClassDetector
    from firmad.inputs import decisions, scores_csv
    from firmad.io import atomic_write_text
    from firmad.persistence import check_output_file, check_threshold

    if threshold is not None:
        threshold = check_threshold(threshold, "--threshold")
    if out_csv is not None:
        check_output_file(out_csv, "scores.csv")
    det = OneClassDetector.load(detector)
    thr = threshold if threshold is not None else getattr(det, "threshold_", None)
    names, scores, skipped = _score_with_progress(det, paths, batch_size)
    for f, why in skipped:
        _warn(f"skipped {f}: {why}")
    if not names:
        raise FirmadError(
            "no image could be scored; check the paths and files above"
            + (f" ({out_csv} was left as it was)" if out_csv is not None else "")
        )
    text = scores_csv(names, scores, thr)
    if out_csv is not None:
        atomic_write_text(out_csv, text)  # only now: a failed run changes nothing
    else:
        print(text, end="")
    # --- report: scores vs held-out normals and threshold, a gallery, the scale in words
    report_dir = report_dir or (out_csv.with_name(f"{out_csv.stem}-report") if out_csv else None)
    if report_dir is not None:
        from firmad.report import write_score_report

        scored = [float(s) for s in scores]
        try:
            report = write_score_report(
                det, names, scored, decisions(scores, thr), names, report_dir, thr, skipped
            )
            _warn(f"Report: {report}")
        except FirmadError as err:  # the scores are written; only the report is not
            _warn(f"report not written: {err}")
    _warn(
        f"{len(names)} scored, {len(skipped)} skipped"
        + ("" if thr is not None else "; no threshold, so no decisions (use --threshold)")
        + (f"; written to {out_csv}" if out_csv else "")
    )


def _score_with_progress(det, paths: list[Path], batch_size: int):
    """`score_paths` with a progress bar on stderr (none with --quiet)."""
    from rich.progress import Progress

    with Progress(console=console, disable=state["quiet"]) as progress:
        task = progress.add_task("score", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return det.score_paths(paths, batch_size, advance)


@app.command(epilog="Example:\n\n  firmad export det/ --format onnx --out det.onnx")
def export(
    detector: Path = typer.Argument(..., help="A detector directory (firmad fit)."),
    out_file: Path = typer.Option(..., "--out", help="File to write."),
    fmt: str = typer.Option("onnx", "--format", help="onnx"),
) -> None:
    """Export a detector as one graph: uint8 images in, anomaly scores out."""
    from firmad.detector import OneClassDetector
    from firmad.export import export_onnx, sidecar_path
    from firmad.persistence import check_output_file

    if fmt != "onnx":
        raise FirmadError(f"--format {fmt!r} is not supported; use onnx")
    check_output_file(out_file, "det.onnx")
    det = OneClassDetector.load(detector)
    export_onnx(det, out_file)
    c, h, w = det.input_shape_
    out.print(f"{out_file}: input images uint8 (N, {c}, {h}, {w}), output scores (N,)")
    out.print(f"{sidecar_path(out_file)}: how to feed it (examples/onnx_score.py)", highlight=False)


@app.command(
    epilog="Examples:\n\n  firmad serve det/\n\n"
    "  firmad serve det/ --port 8000 --report runs/fmnist-cpu/fashion-mnist-c0-firm-s0 "
    "--report scores-report"
)
def serve(
    detector: Path = typer.Argument(..., help="A detector directory (firmad fit)."),
    port: int = typer.Option(8765, "--port", help="Port to listen on (0 picks a free one)."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to listen on; the default keeps it on this computer."
    ),
    reports: list[Path] = typer.Option(
        [], "--report", help="A run, attack or score-report folder to browse too (repeatable)."
    ),
    open_browser: bool = typer.Option(False, "--open", help="Open the page in a web browser."),
) -> None:
    """A local web page: drop images to score them; browse the detector's and other reports."""
    from firmad.serve import serve as serve_page

    def say(message: str) -> None:
        console.print(message, highlight=False)

    serve_page(detector, host=host, port=port, reports=reports, open_browser=open_browser, say=say)


# --- the robust / non-robust feature study -------------------------------------------------------


@app.command(
    epilog="Examples:\n\n  firmad features --config benchmarks/features-fmnist-cpu.yaml\n\n"
    "  firmad features --config STUDY.yaml --out runs/features/mine"
)
def features(
    config: Path = typer.Option(..., "--config", "-c", help="Study YAML (see robustness.study)."),
    out_dir: Path | None = typer.Option(None, "--out", help="Study directory."),
    workers: int | None = typer.Option(
        None,
        "--workers",
        min=1,
        max=64,
        help="Cells (class x seed) run in this many processes at once, each with the study's "
        "train.threads (default: the study's `workers`, 1).",
    ),
) -> None:
    """Are non-robust features useful for one class? Constructed sets, probes and drift."""
    from firmad.robustness.study import run_study

    config = config.absolute()  # a file, even one named like a shipped recipe
    log = (lambda *a: None) if state["quiet"] else (lambda msg: console.print(msg, highlight=False))
    with _interruptible("finished stages are kept; run the same command again to continue"):
        result = run_study(config, out_dir, log=log, workers=workers)
    from firmad.robustness.study import study_markdown

    out.print(study_markdown(result), highlight=False)


# --- robustness ----------------------------------------------------------------------------------


# Defaults of `firmad attack`: minutes on a 2-core CPU; --full is the thorough evaluation.
QUICK_ATTACK = dict(steps=10, restarts=1, subset=200, schedule="apgd", targeted=True)
FULL_ATTACK = dict(steps=100, restarts=2, subset=1000, schedule="apgd", targeted=True)


# The options of `firmad attack` (Annotated, so that the command reads as its parameters).
_OPT_TARGET = Annotated[
    Path,
    typer.Argument(
        help="A run directory (firmad train) or a detector directory (firmad fit).",
    ),
]

_OPT_NORM = Annotated[
    str,
    typer.Option(
        "--norm",
        help="linf or l2.",
    ),
]

_OPT_EPS = Annotated[
    str,
    typer.Option(
        "--eps",
        help="Comma-separated radii. linf: in 1/255 units (8 means 8/255); l2: plain numbers "
        "in [0, 1] pixel space (e.g. 0,0.25,0.5), at most sqrt(C*H*W). 0 is the clean AUROC.",
    ),
]

_OPT_FULL = Annotated[
    bool,
    typer.Option(
        "--full",
        help="The thorough evaluation: APGD-100, 2 restarts, 1000 images, "
        "all strength checks with the Square check (hours on a CPU). Options given win.",
    ),
]

_OPT_STEPS = Annotated[
    int | None,
    typer.Option(
        "--steps",
        min=1,
        help="Steps per attack (default 10, --full 100; e.g. 1000 for "
        "PGD-1000). With --schedule apgd (the default) the step starts at 2 eps and is halved at "
        "APGD's checkpoints (22 %, 41 %, 57 %, 70 %... of the steps) where progress stalls; "
        "fixed: 2.5 eps / steps throughout. With --attack square: the number of queries.",
    ),
]

_OPT_RESTARTS = Annotated[
    int | None,
    typer.Option(
        "--restarts",
        min=1,
        help="Random restarts per attack (default 1, --full 2).",
    ),
]

_OPT_SCHEDULE = Annotated[
    str,
    typer.Option(
        "--schedule",
        help="Step sizes: apgd (APGD: 2 eps, halved where the attack stalls, momentum) or "
        "fixed (2.5 eps / steps, classic PGD).",
    ),
]

_OPT_ATTACK_KIND = Annotated[
    str,
    typer.Option(
        "--attack",
        help="pgd (white-box, gradients) or square (score-based black-box "
        "Square attack, L-inf; --steps queries).",
    ),
]

_OPT_TARGETED = Annotated[
    bool,
    typer.Option(
        "--targeted/--no-targeted",
        help="Add the surrogate that pulls each image towards "
        "(anomalies) or away from (normals) its nearest normal feature (kNN scorers).",
    ),
]

_OPT_TARGETS = Annotated[
    str,
    typer.Option(
        "--targets",
        help="Attacked groups: normal, anomaly, both.",
    ),
]

_OPT_SUBSET = Annotated[
    int | None,
    typer.Option(
        "--subset",
        min=0,
        help="Stratified seeded test subset size (default 200, --full 1000); 0 = every test image.",
    ),
]

_OPT_SCORER = Annotated[
    str | None,
    typer.Option(
        "--scorer",
        help="Runs only: scorer spec (knn_cos:k=5, kde, own, ...); default the method's own "
        "score (dsvdd, binary) or knn_cos:k=5.",
    ),
]

_OPT_VARIANT = Annotated[
    str,
    typer.Option(
        "--variant",
        help="Runs only: plain, angled, ensemble.",
    ),
]

_OPT_INPUT_SPACE = Annotated[
    str,
    typer.Option(
        "--input",
        help="model: attack the test images resized to the detector's "
        "input size (as its evaluation scores them); native: at their own size (e.g. 28 x 28), "
        "resized inside the detector.",
    ),
]

_OPT_TRANSFER_FROM = Annotated[
    Path | None,
    typer.Option(
        "--transfer-from",
        help="Another run or detector directory: its white-box attack "
        "is transferred to this detector (the transfer check).",
    ),
]

_OPT_SQUARE_CHECK = Annotated[
    bool | None,
    typer.Option(
        "--square-check/--no-square-check",
        help="Check that the black-box Square attack "
        "(1000+ queries) is not stronger (default: on with --full).",
    ),
]

_OPT_OUT_DIR = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Folder for the attack files (default: TARGET.attack beside the "
        "run or detector). Finished attacks are kept there until the set is written, so the "
        "same command continues after Ctrl-C.",
    ),
]

_OPT_SEED = Annotated[
    int,
    typer.Option(
        "--seed",
        min=0,
        help="Seeds the subset, the attacks, the bootstrap.",
    ),
]

_OPT_DATA = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Detectors: the test dataset.",
    ),
]

_OPT_NORMAL_CLASS = Annotated[
    str | None,
    typer.Option(
        "--normal-class",
        help="Detectors: the normal class of --data (id or name).",
    ),
]

_OPT_ROOT = Annotated[
    Path | None,
    typer.Option(
        "--root",
        help="Folder holding --data.",
    ),
]

_OPT_DEVICE = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="auto, cpu, cuda, cuda:N.",
    ),
]

_OPT_BATCH_SIZE = Annotated[
    int,
    typer.Option(
        "--batch-size",
        min=1,
        help="Images per pass.",
    ),
]

_OPT_NO_CHECKS = Annotated[
    bool,
    typer.Option(
        "--no-checks",
        help="Skip the strength checks (about four more attacks).",
    ),
]


@app.command(
    epilog="Examples:\n\n"
    "  firmad attack runs/fmnist-cpu/fashion-mnist-c0-firm-s0   (quick: minutes on a CPU)\n\n"
    "  firmad attack RUN --full   (APGD-100, 2 restarts, 1000 images, all checks)\n\n"
    "  firmad attack det/ --data fashion-mnist --normal-class 0 --norm l2 --eps 0,0.25,0.5\n\n"
    "  firmad attack RUN --steps 1000 --subset 500 --out audits/pgd1000\n\n"
    "  firmad attack RUN --attack square --steps 5000   (black-box, 5000 queries)\n\n"
    "  firmad attack RUN --transfer-from OTHER_RUN_OR_DETECTOR"
)
def attack(
    target: _OPT_TARGET,
    norm: _OPT_NORM = "linf",
    eps: _OPT_EPS = "0,2,4,8",
    full: _OPT_FULL = False,
    steps: _OPT_STEPS = None,
    restarts: _OPT_RESTARTS = None,
    schedule: _OPT_SCHEDULE = "apgd",
    attack_kind: _OPT_ATTACK_KIND = "pgd",
    targeted: _OPT_TARGETED = True,
    targets: _OPT_TARGETS = "normal,anomaly,both",
    subset: _OPT_SUBSET = None,
    scorer: _OPT_SCORER = None,
    variant: _OPT_VARIANT = "plain",
    input_space: _OPT_INPUT_SPACE = "model",
    transfer_from: _OPT_TRANSFER_FROM = None,
    square_check: _OPT_SQUARE_CHECK = None,
    out_dir: _OPT_OUT_DIR = None,
    seed: _OPT_SEED = 0,
    data: _OPT_DATA = None,
    normal_class: _OPT_NORMAL_CLASS = None,
    root: _OPT_ROOT = None,
    device: _OPT_DEVICE = None,
    batch_size: _OPT_BATCH_SIZE = 256,
    no_checks: _OPT_NO_CHECKS = False,
) -> None:
    """Robust AUROC under attack on the anomaly score: attack.json, attack.md and two plots."""
    from firmad.robustness.audit import audit_path

    sweep = _attack_settings(
        norm, eps, targets, schedule, attack_kind, input_space, subset, full,
        steps=steps, restarts=restarts, square_check=square_check, checks=not no_checks,
    )  # fmt: skip
    klass = None
    if normal_class is not None:
        klass = int(normal_class) if normal_class.lstrip("-").isdigit() else normal_class
    folder = out_dir if out_dir is not None else _beside(target, ".attack")
    show = _AttackProgress(console, quiet=state["quiet"])
    with (
        show,
        _interruptible(
            f"finished attacks are kept in {folder}; run the same command again to continue"
        ),
    ):
        result, folder = audit_path(
            target, data=data, normal_class=klass, root=root, scorer=scorer, variant=variant,
            device=device, out_dir=folder, seed=seed, batch_size=batch_size,
            progress=show.attack, on_step=show.step, resume=True, targeted=targeted,
            input_space=input_space, transfer_from=transfer_from, **sweep,
        )  # fmt: skip
    from firmad.robustness.audit import attack_markdown

    print(attack_markdown(result), end="")  # plain: a Markdown table must not be wrapped
    print(f"Attack files: {folder}/attack.json, attack.md, attack_auroc.png, attack_examples.png")


def _attack_settings(
    norm, eps, targets, schedule, attack_kind, input_space, subset, full, **given
) -> dict:
    """The sweep settings of `firmad attack`, checked (with the CLI's messages) and completed
    from the quick or the full plan; ``given``: steps, restarts, square_check (None = the
    plan's) and checks."""
    norm = norm.lower()
    if norm not in ("linf", "l2"):
        raise FirmadError(f"--norm {norm!r}: use linf or l2")
    eps_list = _parse_eps(eps, norm)
    target_list = [t.strip() for t in targets.split(",") if t.strip()]
    bad = [t for t in target_list if t not in ("normal", "anomaly", "both")]
    if bad or not target_list:
        raise FirmadError(f"--targets {targets!r}: use some of normal, anomaly, both")
    if schedule not in ("fixed", "apgd"):
        raise FirmadError(f"--schedule {schedule!r}: use fixed or apgd")
    if attack_kind not in ("pgd", "square"):
        raise FirmadError(f"--attack {attack_kind!r}: use pgd or square")
    if attack_kind == "square" and norm != "linf":
        raise FirmadError("--attack square is implemented for --norm linf only")
    if input_space not in ("model", "native"):
        raise FirmadError(f"--input {input_space!r}: use model or native")
    if subset == 1:
        raise FirmadError("--subset 1: AUROC needs a normal and an anomalous image; use >= 2")
    plan, checks = FULL_ATTACK if full else QUICK_ATTACK, given["checks"]
    square_check = full if given["square_check"] is None else given["square_check"]
    subset = plan["subset"] if subset is None else subset
    return dict(
        eps_list=eps_list, norm=norm, steps=given["steps"] or plan["steps"],
        restarts=given["restarts"] or plan["restarts"], schedule=schedule,
        targets=target_list, subset=subset or None, checks=checks, attack=attack_kind,
        square_check=square_check and checks,
    )  # fmt: skip


def _beside(path: Path, suffix: str) -> Path:
    """A folder next to ``path`` named after it: det/ -> det.attack/."""
    path = path if path.name else path.resolve()
    return path.with_name(path.name + suffix)


class _AttackProgress:
    """Progress of `firmad attack`: a rich bar with the ETA on a terminal; otherwise a plain
    line when each attack starts and at most every 30 s during it."""

    def __init__(self, console: Console, quiet: bool) -> None:
        import time

        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )  # fmt: skip

        self.clock, self.quiet, self.console = time.monotonic, quiet, console
        self.plain = not console.is_terminal
        self.bar = Progress(
            TextColumn("[bold]attack {task.fields[n]}"), BarColumn(bar_width=20),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), console=console, disable=quiet or self.plain,
        )  # fmt: skip
        self.task = self.bar.add_task("attack", total=None, info="", n="")
        self.done, self.total, self.what, self.start, self.last = 0, 1, "", self.clock(), 0.0

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def attack(self, done: int, total: int, what: str) -> None:
        self.done, self.total, self.what = done, max(total, 1), what
        n = f"{min(done + 1, total)}/{total}"
        room = max(self.console.width - 58, 8)  # the bar and its times come first
        info = what if len(what) <= room else what[: room - 1] + "…"
        self.bar.update(self.task, completed=done, total=total, info=info, n=n)
        if self.plain and not self.quiet:
            text = "done" if done >= total else f"{n} {what}"
            self._line(f"attack {text}", force=True)

    def step(self, done: int, total: int) -> None:
        share = self.done + done / max(total, 1)
        self.bar.update(self.task, completed=share)
        if self.plain and not self.quiet:
            self._line(f"attack {self.done + 1}/{self.total} {self.what}: step {done}/{total}")

    def _line(self, text: str, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self.last < 30:
            return
        self.last = now
        elapsed = now - self.start
        share = self.bar.tasks[0].completed / self.total
        eta = f", ETA {_clock(elapsed / share - elapsed)}" if 0 < share < 1 else ""
        self.console.print(f"{text} ({_clock(elapsed)} elapsed{eta})", highlight=False)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def _parse_eps(text: str, norm: str) -> list[float]:
    """'0,2,4,8' -> radii in [0, 1] pixel space (L∞ values are in 1/255 units)."""
    values = []
    for item in text.split(","):
        try:
            v = float(item)
        except ValueError:
            raise FirmadError(
                f"--eps {text!r}: {item.strip()!r} is not a number; write e.g. --eps 0,2,4,8 "
                "(L∞ in 1/255 units) or --norm l2 --eps 0,0.25,0.5"
            ) from None
        if not v >= 0 or v == float("inf"):
            raise FirmadError(f"--eps {text!r}: radii must be finite and >= 0")
        if norm == "linf" and v > 255:
            raise FirmadError(f"--eps {text!r}: L∞ radii are in 1/255 units, at most 255")
        values.append(v / 255 if norm == "linf" else v)
    return values


# --- entry point ---------------------------------------------------------------------------------


# One line per command in `firmad --help`: click would cut the docstrings' first lines ("…").
SHORT_HELP = {
    "train": "Train and evaluate a model on one class of a dataset.",
    "evaluate": "Score a trained run again and rewrite its report.",
    "bench": "Run a grid of recipes x datasets x classes x seeds.",
    "demo": "What `make demo` runs: FIRM on Fashion-MNIST T-shirts.",
    "fit": "Train a detector on a folder of normal images.",
    "score": "Score images with a detector (CSV out).",
    "export": "Export a detector as one ONNX graph.",
    "features": "Robust / non-robust feature study for one class.",
    "attack": "Robust AUROC of a run or detector under PGD.",
    "data": "Find, inspect and prepare datasets.",
    "data prepare": "Find a dataset, or download its official files.",
}


def _short_help(command, prefix: str = "") -> None:
    """Set the one-line summaries; a command without one gets the first clause of its help
    when that fits on a line."""
    for name, sub in getattr(command, "commands", {}).items():
        first = re.split(r"(?<=[.;:])\s|\n", (sub.help or "").strip())[0].rstrip(";:")
        if prefix + name in SHORT_HELP:
            sub.short_help = SHORT_HELP[prefix + name]
        elif not sub.short_help and first and len(first) <= 60:
            sub.short_help = first
        _short_help(sub, prefix + name + " ")


def main(argv: list[str] | None = None) -> int:
    # Click (inside typer) handles usage errors itself (status 2); our own errors are caught here.
    command = typer.main.get_command(app)
    _short_help(command)
    try:
        command.main(args=argv, prog_name="firmad", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except FirmadError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        return 2
    except Exception:
        traceback.print_exc()
        console.print("[bold red]internal error[/]: please report it with the traceback above")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
