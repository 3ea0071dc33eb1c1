"""`firmad data list | show | prepare`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from firmad.cli.common import (
    data_app,
    out,
)

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
    show_dataset(name, root)


def show_dataset(name: str, root: Path | None) -> None:
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
