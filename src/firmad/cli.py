"""The `firmad` command: a thin layer over the library (train, evaluate, bench, data, demo).

Exit status: 0 success, 2 user error (message, no traceback), 1 internal error, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

import firmad
from firmad.errors import FirmadError

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
    "  firmad train --out runs/my-run --resume"
)
def train(
    config: str | None = typer.Option(
        None, "--config", "-c", help="Recipe: a YAML path or a shipped recipe name (fmnist-cpu)."
    ),
    set_: list[str] = typer.Option([], "--set", help="Override a key: section.key=value."),
    out_dir: Path | None = typer.Option(None, "--out", help="Run directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    normal_class: str | None = typer.Option(None, "--normal-class", help="Id or name."),
    seed: int | None = typer.Option(None, "--seed"),
    epochs: int | None = typer.Option(None, "--epochs"),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the evaluation at the end."),
) -> None:
    """Train a detector on normal images (and synthetic outliers), then evaluate it."""
    from firmad.pipeline import train_run

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
    with _interruptible():
        summary = train_run(
            config,
            overrides,
            out_dir=out_dir,
            resume=resume,
            evaluate=not no_eval,
            quiet=state["quiet"],
        )
    if summary["results"] is not None:
        _print_summary(summary)


@app.command(
    epilog="Examples:\n\n  firmad evaluate runs/fmnist-cpu/fashion-mnist-c0-firm-s0\n\n"
    "  firmad evaluate RUN --scorers knn_cos:k=5,kde --variants plain,angled"
)
def evaluate(
    run_dir: Path = typer.Argument(..., help="A run directory written by `firmad train`."),
    scorers: str | None = typer.Option(None, help="Comma-separated, e.g. knn_cos:k=5,kde."),
    variants: str | None = typer.Option(None, help="Comma-separated: plain,angled,ensemble."),
    device: str | None = typer.Option(None, "--device"),
) -> None:
    """(Re)score a trained run from its checkpoint and rewrite its report."""
    from firmad.pipeline import evaluate_run

    summary = evaluate_run(
        run_dir,
        scorers=_split_scorers(scorers) if scorers else None,
        variants=variants.split(",") if variants else None,
        device=device,
    )
    _print_summary(summary)


@contextlib.contextmanager
def _interruptible():
    """Ctrl-C: the trainer has saved a checkpoint; say how to continue and exit with 130."""
    try:
        yield
    except KeyboardInterrupt:
        console.print("interrupted: a checkpoint was saved; continue with --resume --out RUN_DIR")
        raise typer.Exit(130) from None


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
    "  firmad bench --config GRID.yaml --workers 2"
)
def bench(
    config: Path = typer.Option(..., "--config", "-c", help="Grid YAML."),
    out_dir: Path | None = typer.Option(None, "--out", help="Output folder of the grid."),
    workers: int = typer.Option(1, "--workers", help="Cells run at the same time."),
    set_: list[str] = typer.Option([], "--set", help="Override for every cell: section.key=value."),
) -> None:
    """Run a grid of datasets x classes x methods x seeds; resumable, one run directory a cell."""
    from firmad.bench import run_grid

    result = run_grid(
        config, out_dir=out_dir, workers=workers, quiet=state["quiet"], overrides=list(set_)
    )
    out.print(result["markdown"], highlight=False)
    out.print(f"Tables: {result['csv']} and {result['md']}", highlight=False)


# --- data ----------------------------------------------------------------------------------------


@data_app.command("list", epilog="Example:\n\n  firmad data list --root ~/datasets")
def data_list(root: Path | None = typer.Option(None, "--root")) -> None:
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
    """What `make demo` runs: FIRM on Fashion-MNIST T-shirt/top with the CPU recipe, all scorers."""
    from firmad.pipeline import train_run

    if not state["quiet"]:
        _show_dataset("fashion-mnist", None)
    resume = (out_dir / "checkpoint.json").exists()
    if not resume:  # a demo stopped before its first checkpoint left nothing worth keeping
        (out_dir / "config.yaml").unlink(missing_ok=True)
    with _interruptible():
        summary = train_run(
            "fmnist-cpu",
            ["data.normal_class=0"],
            out_dir=out_dir,
            resume=resume,
            quiet=state["quiet"],
        )
    _print_summary(summary)


# --- entry point ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    # Click (inside typer) handles usage errors itself (status 2); our own errors are caught here.
    command = typer.main.get_command(app)
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
