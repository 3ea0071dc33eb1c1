"""A benchmark grid: reading its file, planning its cells (each validated before any runs) and
selecting a part of them (``--classes``, ``--seeds``)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from firmad.config import (
    apply_overrides,
    backbone_overrides,
    config_from_dict,
    read_recipe,
    read_yaml_file,
    shorten,
    validate_as,
)
from firmad.data import describe
from firmad.errors import ConfigError
from firmad.run import safe_component
from firmad.scoring import ScorerSpec


@dataclass
class GridConfig:
    name: str = "grid"
    recipes: list[str] = field(default_factory=lambda: ["fmnist-cpu"])
    datasets: list[str] | None = None  # None: each recipe's own dataset
    classes: list[int | str] | str = "all"
    seeds: list[int] = field(default_factory=lambda: [0])
    # Backbones to cross with every recipe ("name" or "name@width"; without a width a ResNet
    # keeps the recipe's, the fixed-width nets take 1.0); None: each recipe's own.
    backbones: list[str] | None = None
    set: list[str] = field(default_factory=list)  # overrides applied to every cell
    headline: str = "knn_cos:k=5"  # the scorer of the main table
    curve_reference: str | None = None  # learning-curve target; default: the NT-Xent recipe
    variant: str = "plain"
    root: str | None = None
    # CPU threads of each cell, whichever executor runs it (float sums depend on the thread
    # count, so the same cell with other threads gives other numbers). None: the recipe's
    # train.threads (with the grid's set), else CELL_THREADS.
    threads: int | None = None


# A cell's threads unless the grid or its recipe says: one default for every executor and
# machine, so a cell's numbers do not depend on where it runs. Cells run side by side
# (--workers, Ray) for speed.
CELL_THREADS = 1


@dataclass
class Cell:
    recipe: str
    dataset: str
    normal_class: int
    seed: int
    run_dir: Path
    backbone: str | None = None  # from the grid's `backbones` axis
    threads: int = CELL_THREADS  # CPU threads (train.threads and OMP_NUM_THREADS)

    @property
    def label(self) -> str:
        return _label(self.recipe, self.backbone)

    @property
    def key(self) -> str:
        return f"{self.label}/{self.dataset}-c{self.normal_class}-s{self.seed}"


def read_grid(path: Path) -> GridConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"grid file {path} not found")
    grid = validate_as(GridConfig, read_yaml_file(path, "grid") or {}, "")
    if not grid.recipes or not grid.seeds:
        raise ConfigError(f"{path}: recipes and seeds must not be empty")
    check_grid(grid, path)
    return grid


def check_grid(grid: GridConfig, path: Path | str = "grid") -> None:
    """What needs no dataset: a name that is one folder, no value listed twice, a headline
    scorer that exists with its parameters, threads >= 1."""
    name = grid.name
    if not name or name != safe_component(name) or name in (".", ".."):
        raise ConfigError(
            f"{path}: name: {shorten(name)} must be one plain folder name (letters, digits, "
            f"- _ . + =; no / or ..), e.g. {shorten(safe_component(Path(name).name))}; the grid's "
            "folder is runs/bench/NAME unless --out says otherwise"
        )
    axes = {"recipes": grid.recipes, "datasets": grid.datasets, "seeds": grid.seeds}
    axes["backbones"] = grid.backbones
    if isinstance(grid.classes, list):
        axes["classes"] = grid.classes
    for axis, values in axes.items():
        twice = [v for i, v in enumerate(values or []) if v in values[:i]]
        if twice:
            raise ConfigError(
                f"{path}: {axis}: {shorten(twice[0])} is listed twice; list each value once "
                "(a repeated value would run the same cell again)"
            )
    labels = [_label(r, b) for r in grid.recipes for b in grid.backbones or [None]]
    if len(set(labels)) != len(labels):
        raise ConfigError(
            f"{path}: recipes: two recipes have the same file name ({shorten(labels)}); their "
            "cells would share folders. Rename one of them"
        )
    try:
        ScorerSpec.parse(grid.headline)  # the headline names rows by its canonical label
    except ConfigError as err:
        raise ConfigError(f"{path}: headline: {err}") from None
    if grid.threads is not None and not 1 <= grid.threads <= 1024:
        raise ConfigError(f"{path}: threads: must be in 1..1024, got {grid.threads}")


def plan_cells(grid: GridConfig, out_dir: Path) -> list[Cell]:
    """All cells, validated up front: a bad recipe or class fails before any training starts.

    Run order is seed-, then class-major (every recipe of a class before the next class), so a
    grid stopped half-way has whole rows to compare rather than whole recipes."""
    cells = []
    for recipe, backbone in [(r, b) for r in grid.recipes for b in grid.backbones or [None]]:
        base = read_recipe(recipe)
        extra = [f"data.root={grid.root}"] if grid.root else []
        cfg = config_from_dict(
            apply_overrides(copy.deepcopy(base), grid.set + extra + backbone_overrides(backbone)),
            strict=True,
        )
        threads = grid.threads or cfg.train.threads or CELL_THREADS
        for dataset in grid.datasets or [cfg.data.dataset]:
            info = describe(dataset, grid.root)
            names = [r["name"].lower() for r in info]
            if grid.classes == "all":
                classes = list(range(len(info)))
            elif isinstance(grid.classes, list):
                classes = [_class_id(c, names, dataset) for c in grid.classes]
                _check_distinct_classes(grid.classes, classes, dataset)
            else:
                raise ConfigError("classes: a list of class ids/names, or 'all'")
            for c in classes:
                for seed in grid.seeds:
                    cell_name = safe_component(f"{dataset}-c{c}-s{seed}")
                    run_dir = out_dir / _label(recipe, backbone) / cell_name
                    cell = Cell(recipe, dataset, c, seed, run_dir, backbone, threads)
                    _check_cell(cell, grid, base)
                    cells.append(cell)
    first = {}  # position of each (dataset, class) as first planned; the sort below is stable
    for cell in cells:
        first.setdefault((cell.dataset, cell.normal_class), len(first))
    return sorted(cells, key=lambda c: (grid.seeds.index(c.seed), first[c.dataset, c.normal_class]))


def select_cells(
    cells: list[Cell], grid: GridConfig, classes: list[str] | None, seeds: list[int] | None
) -> list[Cell]:
    """The cells of a planned grid that ``classes`` (ids or names) and ``seeds`` pick, in run
    order; None picks all. A value the grid does not have is an error, not an empty selection."""
    if seeds is not None:
        missing = sorted(set(seeds) - set(grid.seeds))
        if missing:
            raise ConfigError(f"--seeds: {missing} not in the grid's seeds {grid.seeds}")
        cells = [c for c in cells if c.seed in seeds]
    if classes is not None:
        wanted = set()
        for dataset in dict.fromkeys(c.dataset for c in cells):
            names = [r["name"].lower() for r in describe(dataset, grid.root)]
            planned = {c.normal_class for c in cells if c.dataset == dataset}
            for value in classes:
                cid = _class_id(int(value) if str(value).isdigit() else value, names, dataset)
                if cid not in planned:
                    raise ConfigError(
                        f"--classes: class {value} of {dataset} is not in the grid "
                        f"(its classes: {sorted(planned)})"
                    )
                wanted.add((dataset, cid))
        cells = [c for c in cells if (c.dataset, c.normal_class) in wanted]
    return cells


def _check_distinct_classes(given: list, ids: list[int], dataset: str) -> None:
    for i, cid in enumerate(ids):
        if cid in ids[:i]:
            first = given[ids.index(cid)]
            raise ConfigError(
                f"classes: {shorten(first)} and {shorten(given[i])} are the same class ({cid}) "
                f"of {dataset}; list each class once"
            )


def _check_cell(cell: Cell, grid: GridConfig, base: dict) -> None:
    """A cell's whole config, as its process will build it: a bad seed or class fails at
    planning, before any cell runs."""
    try:
        config_from_dict(
            apply_overrides(copy.deepcopy(base), cell_overrides(cell, grid)), strict=True
        )
    except ConfigError as err:
        raise ConfigError(
            f"grid cell {cell.key} (recipe {cell.recipe}, seed {cell.seed}): {err}"
        ) from None


def _class_id(value: int | str, names: list[str], dataset: str) -> int:
    if isinstance(value, int):
        if not 0 <= value < len(names):
            raise ConfigError(f"classes: {value} is not a class of {dataset} (0..{len(names) - 1})")
        return value
    if value.lower() not in names:
        raise ConfigError(
            f"classes: {shorten(value)} is not a class of {dataset}; choose from {names}"
        )
    return names.index(value.lower())


def _slug(recipe: str) -> str:
    return safe_component(Path(recipe).stem)


def _label(recipe: str, backbone: str | None) -> str:
    """A cell's row name in tables: the recipe, plus the backbone where the grid crosses them."""
    return _slug(recipe) + (f"+{safe_component(backbone)}" if backbone else "")


def cell_overrides(cell: Cell, grid: GridConfig) -> list[str]:
    """The --set options of a new cell's `firmad train`.

    Strings on purpose: a cell runs as a `firmad train` process of its own, so these are its
    command line (the edge where overrides are parsed) and its record in the cell's log."""
    overrides = (
        grid.set
        + backbone_overrides(cell.backbone)
        + [
            f"data.dataset={cell.dataset}",
            f"data.normal_class={cell.normal_class}",
            f"train.seed={cell.seed}",
            f"train.threads={cell.threads}",  # in the cell's config.yaml: its record
        ]
    )
    if grid.root:
        overrides.append(f"data.root={grid.root}")
    return overrides
