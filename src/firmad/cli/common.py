"""What every `firmad` command shares: the app, the consoles, Ctrl-C handling, list parsing."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import typer
from rich.console import Console

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


# Options of `firmad` itself that also work after the sub-command (`firmad score ... -q`).
GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose")


def global_flags_first(args: list[str]) -> list[str]:
    """Move -q / -v given after the sub-command to the front, where `firmad` reads them
    (nothing after a `--` moves)."""
    cut = args.index("--") if "--" in args else len(args)
    head, tail = args[:cut], args[cut:]
    flags = [a for a in head if a in GLOBAL_FLAGS]
    return flags + [a for a in head if a not in GLOBAL_FLAGS] + tail


def recipe_config(recipe: str | None, overrides: list[str]):
    from firmad.config import load_config

    return load_config(recipe, overrides)


def resumed_config(out_dir: Path | None, recipe: str | None, overrides: list[str]):
    from firmad.pipeline import resume_config

    return resume_config(out_dir, recipe, overrides)


@contextlib.contextmanager
def interruptible(what: str | None = None):
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


def comma_list(
    text: str | None, option: str, what: str = "comma-separated values"
) -> list[str] | None:
    """'0, bag' -> ['0', 'bag']; None stays None; empty or repeated items are an error."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or len(set(items)) != len(items):
        raise FirmadError(f"{option}: expected distinct {what}, got {shorten(text)}")
    return items


def int_list(text: str | None, option: str) -> list[int] | None:
    items = comma_list(text, option)
    if items is None:
        return None
    try:
        return [int(t) for t in items]
    except ValueError:
        raise FirmadError(f"{option}: expected integers such as 1,2, got {shorten(text)}") from None


def split_scorers(text: str) -> list[str]:
    """'knn_cos:k=5,kde' -> ['knn_cos:k=5', 'kde']; a part with '=' and no ':' continues one."""
    parts: list[str] = []
    for item in text.split(","):
        if "=" in item and ":" not in item and parts:
            parts[-1] += "," + item
        else:
            parts.append(item)
    return parts


def print_summary(summary: dict) -> None:
    from firmad.report import format_table

    out.print(format_table(summary["results"]["results"]), highlight=False)
    out.print(f"Report: {summary['run_dir']}/report.md", highlight=False)


def say(message: str) -> None:
    """A result line (stdout)."""
    out.print(message, highlight=False)


def warn(message: str) -> None:
    """A warning or a skipped file (stderr)."""
    console.print(message, highlight=False)


def clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"
