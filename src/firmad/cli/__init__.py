"""The `firmad` command: a thin layer over the library (train, evaluate, bench, data, demo,
fit, score, export, serve, features, attack). Each module parses and prints; the library works.

Exit status: 0 success, 2 user error (message, no traceback), 1 internal error, 130 interrupted.
"""

from __future__ import annotations

import importlib
import re
import sys
import traceback

import typer

from firmad.cli.common import app, console, global_flags_first
from firmad.errors import FirmadError

# registered in `--help`'s order
for _module in ("runs", "data", "detectors", "robustness", "doctor"):
    importlib.import_module(f"firmad.cli.{_module}")

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
    "doctor": "What decides numerics here: versions, CPU, bf16, threads.",
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
    args = global_flags_first(list(sys.argv[1:] if argv is None else argv))
    try:
        command.main(args=args, prog_name="firmad", standalone_mode=True)
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
