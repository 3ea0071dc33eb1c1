"""Benchmark grids: recipes (methods) x datasets x normal classes x seeds, one run directory a cell.

A finished cell (results.json present) is never redone; an interrupted cell resumes from its
checkpoint; a failed cell is recorded with its error and the grid goes on. Each cell runs in its own
process (`firmad train`), so a crash cannot take the grid down and `--workers N` runs N at once.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from firmad.config import _build, load_config, parse_scorer, parse_yaml
from firmad.data import describe
from firmad.errors import ConfigError
from firmad.io import atomic_write_json, atomic_write_text
from firmad.run import CELL_ERROR, CELL_LOG, RunDir, safe_component
from firmad.scoring.scorers import result_name


@dataclass
class GridConfig:
    name: str = "grid"
    recipes: list[str] = field(default_factory=lambda: ["fmnist-cpu"])
    datasets: list[str] | None = None  # None: each recipe's own dataset
    classes: list[int | str] | str = "all"
    seeds: list[int] = field(default_factory=lambda: [0])
    set: list[str] = field(default_factory=list)  # overrides applied to every cell
    headline: str = "knn_cos:k=5"  # the scorer of the main table
    curve_reference: str | None = None  # learning-curve target; default: the NT-Xent recipe
    variant: str = "plain"
    root: str | None = None


@dataclass
class Cell:
    recipe: str
    dataset: str
    normal_class: int
    seed: int
    run_dir: Path

    @property
    def key(self) -> str:
        return f"{self.recipe}/{self.dataset}-c{self.normal_class}-s{self.seed}"


def read_grid(path: Path) -> GridConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"grid file {path} not found")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    grid = _build(GridConfig, data, "")
    if not grid.recipes or not grid.seeds:
        raise ConfigError(f"{path}: recipes and seeds must not be empty")
    return grid


def plan_cells(grid: GridConfig, out_dir: Path) -> list[Cell]:
    """All cells, validated up front: a bad recipe or class fails before any training starts."""
    cells = []
    for recipe in grid.recipes:
        extra = [f"data.root={grid.root}"] if grid.root else []
        cfg = load_config(recipe, grid.set + extra)
        for dataset in grid.datasets or [cfg.data.dataset]:
            info = describe(dataset, grid.root)
            names = [r["name"].lower() for r in info]
            if grid.classes == "all":
                classes = list(range(len(info)))
            elif isinstance(grid.classes, list):
                classes = [_class_id(c, names, dataset) for c in grid.classes]
            else:
                raise ConfigError("classes: a list of class ids/names, or 'all'")
            for c in classes:
                for seed in grid.seeds:
                    cell_name = safe_component(f"{dataset}-c{c}-s{seed}")
                    run_dir = out_dir / _slug(recipe) / cell_name
                    cells.append(Cell(recipe, dataset, c, seed, run_dir))
    return cells


def _class_id(value: int | str, names: list[str], dataset: str) -> int:
    if isinstance(value, int):
        if not 0 <= value < len(names):
            raise ConfigError(f"classes: {value} is not a class of {dataset} (0..{len(names) - 1})")
        return value
    if value.lower() not in names:
        raise ConfigError(f"classes: {value!r} is not a class of {dataset}; choose from {names}")
    return names.index(value.lower())


def _slug(recipe: str) -> str:
    return safe_component(Path(recipe).stem)


def run_cell(cell: Cell, grid: GridConfig, threads: int | None) -> dict[str, Any]:
    """Run one cell in a subprocess; returns its status record."""
    run = RunDir(cell.run_dir)
    state = run.state
    if state == "evaluated":
        return {"cell": cell.key, "status": "done"}
    firmad = [sys.executable, "-m", "firmad.cli", "-q"]
    if state == "finished":
        cmd = firmad + ["evaluate", str(cell.run_dir)]  # only the evaluation is left
    elif state == "partial":
        cmd = firmad + ["train", "--out", str(cell.run_dir), "--resume"]
    else:
        # New, or started but never checkpointed: `firmad train` starts it (again).
        overrides = grid.set + [
            f"data.dataset={cell.dataset}",
            f"data.normal_class={cell.normal_class}",
            f"train.seed={cell.seed}",
        ]
        if grid.root:
            overrides.append(f"data.root={grid.root}")
        cmd = firmad + ["train", "--out", str(cell.run_dir), "--config", cell.recipe]
        cmd += [a for o in overrides for a in ("--set", o)]
    env = dict(os.environ)
    if threads:  # N cells at once share the cores
        env["OMP_NUM_THREADS"] = str(threads)
    cell.run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    atomic_write_text(cell.run_dir / CELL_LOG, proc.stdout + proc.stderr)
    if proc.returncode != 0:
        error = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        atomic_write_json(
            cell.run_dir / CELL_ERROR, {"returncode": proc.returncode, "error": error}
        )
        return {"cell": cell.key, "status": "failed", "error": error, "seconds": seconds}
    (cell.run_dir / CELL_ERROR).unlink(missing_ok=True)
    return {"cell": cell.key, "status": "ran", "seconds": seconds}


def run_grid(
    config: Path,
    out_dir: Path | None = None,
    workers: int = 1,
    quiet: bool = False,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    grid = read_grid(config)
    grid.set = grid.set + list(overrides or [])
    out_dir = Path(out_dir or Path("runs") / "bench" / grid.name)
    cells = plan_cells(grid, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    statuses: list[dict[str, Any]] = []
    progress = (
        None
        if quiet
        else Progress(
            TextColumn("[bold]grid"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} cells"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
        )
    )
    if progress:
        progress.start()
        task = progress.add_task("grid", total=len(cells), info="")
    try:
        with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
            futures = [
                pool.submit(run_cell, c, grid, threads if workers > 1 else None) for c in cells
            ]
            for fut in futures:
                status = fut.result()
                statuses.append(status)
                if progress:
                    progress.update(task, advance=1, info=f"{status['cell']}: {status['status']}")
                # Tables are rewritten after every cell, so an interrupted grid still has them.
                summarise(grid, cells, out_dir, statuses)
    finally:
        if progress:
            progress.stop()
    return summarise(grid, cells, out_dir, statuses)


# --- tables and plots ----------------------------------------------------------------------------

RESULT_FIELDS = ("scorer", "k", "variant", "auroc", "aupr_anomaly", "aupr_normal", "fpr95")
CSV_FIELDS = [
    "recipe",
    "method",
    "dataset",
    "normal_class",
    "class_name",
    "seed",
    *RESULT_FIELDS,
    "train_time_s",
    "wall_time_s",
    "status",
    "error",
]


def collect_rows(cells: list[Cell]) -> list[dict[str, Any]]:
    rows = []
    for cell in cells:
        base = {
            "recipe": _slug(cell.recipe),
            "dataset": cell.dataset,
            "normal_class": cell.normal_class,
            "seed": cell.seed,
        }
        results = RunDir(cell.run_dir).results
        error = cell.run_dir / CELL_ERROR
        if results.exists():
            data = json.loads(results.read_text())
            names = data.get("normal_class_names") or [""]
            for r in data["results"]:
                rows.append(
                    {
                        **base,
                        "method": data["method"],
                        "class_name": names[0],
                        "train_time_s": data.get("train_time_s"),
                        "wall_time_s": data.get("wall_time_s"),
                        "status": "done",
                        "error": "",
                        **{k: r.get(k) for k in RESULT_FIELDS},
                    }
                )
        elif error.exists():
            rows.append(
                {
                    **base,
                    "status": "failed",
                    "error": json.loads(error.read_text()).get("error", ""),
                }
            )
        else:
            rows.append({**base, "status": "pending"})
    return rows


def _scorer_label(row: dict[str, Any]) -> str:
    return result_name(row["scorer"], row.get("k"))


def _headline_label(spec: str) -> str:
    """A grid's headline scorer spec ("knn_cos:k=5") as a row label ("knn_cos k=5")."""
    name, params = parse_scorer(spec)
    return result_name(name, params.get("k"))


def summarise(
    grid: GridConfig, cells: list[Cell], out_dir: Path, statuses: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    rows = collect_rows(cells)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "bench.csv", buf.getvalue())
    markdown = bench_markdown(grid, cells, rows)
    atomic_write_text(out_dir / "bench.md", markdown)
    plot_bench(out_dir, grid, cells, rows)
    return {
        "csv": out_dir / "bench.csv",
        "md": out_dir / "bench.md",
        "markdown": markdown,
        "statuses": statuses or [],
    }


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    arr = 100 * np.asarray(values)
    return f"{arr.mean():.1f}" + (f" ± {arr.std(ddof=1):.1f}" if len(arr) > 1 else "")


def bench_markdown(grid: GridConfig, cells: list[Cell], rows: list[dict[str, Any]]) -> str:
    done = [r for r in rows if r["status"] == "done"]
    recipes = list(dict.fromkeys(_slug(c.recipe) for c in cells))
    lines = [f"# Benchmark grid: {grid.name}", ""]
    n_done = len({(r["recipe"], r["dataset"], r["normal_class"], r["seed"]) for r in done})
    failed = [r for r in rows if r["status"] == "failed"]
    lines.append(
        f"Cells: {len(cells)} planned, {n_done} done, {len(failed)} failed, "
        f"{len(cells) - n_done - len(failed)} pending. Results from the last checkpoint."
    )
    lines.append("")
    for dataset in dict.fromkeys(c.dataset for c in cells):
        head = [
            r
            for r in done
            if r["dataset"] == dataset
            and _scorer_label(r) == _headline_label(grid.headline)
            and r["variant"] == grid.variant
        ]
        lines += [
            f"## {dataset}: AUROC (%) with {grid.headline} ({grid.variant}), mean ± std over seeds",
            "",
        ]
        lines.append("| class | " + " | ".join(recipes) + " |")
        lines.append("|---|" + "---|" * len(recipes))
        classes = list(dict.fromkeys(c.normal_class for c in cells if c.dataset == dataset))
        per_recipe_means: dict[str, list[float]] = {r: [] for r in recipes}
        for c in classes:
            name = next((r["class_name"] for r in head if r["normal_class"] == c), "")
            vals = {}
            for rec in recipes:
                v = [r["auroc"] for r in head if r["recipe"] == rec and r["normal_class"] == c]
                vals[rec] = v
                if v:
                    per_recipe_means[rec].append(float(np.mean(v)))
            lines.append(
                f"| {c} {name} | " + " | ".join(_bold_best(vals, rec) for rec in recipes) + " |"
            )
        lines.append("| **mean** | " + _means_row(per_recipe_means, recipes, len(classes)) + " |")
        lines.append("")
        # Every scorer: mean AUROC over classes.
        scorers = list(
            dict.fromkeys((_scorer_label(r), r["variant"]) for r in done if r["dataset"] == dataset)
        )
        if scorers:
            lines += [f"### {dataset}: mean AUROC (%) over classes, every scorer", ""]
            lines.append("| scorer | variant | " + " | ".join(recipes) + " |")
            lines.append("|---|---|" + "---|" * len(recipes))
            for label, variant in scorers:
                vals = {}
                for rec in recipes:
                    per_class = {}
                    for r in done:
                        if (
                            r["recipe"] == rec
                            and r["dataset"] == dataset
                            and r["variant"] == variant
                            and _scorer_label(r) == label
                        ):
                            per_class.setdefault(r["normal_class"], []).append(r["auroc"])
                    vals[rec] = [float(np.mean(v)) for v in per_class.values()]
                row = _means_row(vals, recipes, len(classes))
                lines.append(f"| {label} | {variant} | {row} |")
            lines.append("")
    times = [
        r
        for r in done
        if _scorer_label(r) == _headline_label(grid.headline) and r["variant"] == grid.variant
    ]
    if times:
        lines += ["## Wall time per cell (s)", "", "| recipe | mean | max |", "|---|---|---|"]
        for rec in recipes:
            t = [r["wall_time_s"] for r in times if r["recipe"] == rec and r["wall_time_s"]]
            if t:
                lines.append(f"| {rec} | {np.mean(t):.0f} | {np.max(t):.0f} |")
        lines.append("")
    lines += curves_markdown(grid, cells)
    if failed:
        lines += ["## Failed cells", ""]
        lines += [
            f"- {r['recipe']} {r['dataset']} class {r['normal_class']} seed {r['seed']}: "
            f"{r['error']}"
            for r in failed
        ]
        lines.append("")
    return "\n".join(lines)


def _means_row(per_class: dict[str, list[float]], recipes: list[str], n_classes: int) -> str:
    """Mean over classes per recipe; the best complete one bold, incomplete ones marked (n/N)
    and never compared."""
    complete = {r: float(np.mean(v)) for r, v in per_class.items() if len(v) == n_classes}
    best = max(complete.values()) if len(complete) > 1 else None
    texts = []
    for rec in recipes:
        v = per_class.get(rec, [])
        if not v:
            texts.append("–")
        elif rec in complete:
            text = f"{100 * complete[rec]:.1f}"
            texts.append(f"**{text}**" if complete[rec] == best else text)
        else:
            texts.append(f"{100 * np.mean(v):.1f} ({len(v)}/{n_classes} classes)")
    return " | ".join(texts)


def _bold_best(vals: dict[str, list[float]], key: str) -> str:
    text = _mean_std(vals[key])
    means = {k: np.mean(v) for k, v in vals.items() if v}
    if len(means) > 1 and vals[key] and np.mean(vals[key]) == max(means.values()):
        return f"**{text}**"
    return text


def plot_bench(out_dir: Path, grid: GridConfig, cells: list[Cell], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = [
        r
        for r in rows
        if r["status"] == "done"
        and _scorer_label(r) == _headline_label(grid.headline)
        and r["variant"] == grid.variant
    ]
    if not head:
        return
    recipes = list(dict.fromkeys(_slug(c.recipe) for c in cells))
    classes = list(dict.fromkeys((c.dataset, c.normal_class) for c in cells))
    fig, ax = plt.subplots(figsize=(max(6, len(classes) * 0.9), 4))
    width = 0.8 / len(recipes)
    for i, rec in enumerate(recipes):
        ys = []
        for dataset, c in classes:
            v = [
                r["auroc"]
                for r in head
                if r["recipe"] == rec and r["dataset"] == dataset and r["normal_class"] == c
            ]
            ys.append(100 * np.mean(v) if v else np.nan)
        ax.bar(np.arange(len(classes)) + i * width, ys, width, label=rec)
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2)
    ax.set_xticklabels([str(c) for _, c in classes])
    ax.set_xlabel("normal class")
    ax.set_ylabel(f"AUROC (%), {grid.headline}")
    lo = np.nanmin([100 * r["auroc"] for r in head])
    ax.set_ylim(max(0, lo - 5), 100)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "bench.png", dpi=120)
    plt.close(fig)
    plot_curves(out_dir, grid, cells)


def learning_curves(cells: list[Cell]) -> dict[str, tuple[list[float], list[float]]]:
    """Mean learning curve per recipe over its cells (points at the same epochs are averaged)."""
    points: dict[str, dict[float, list[float]]] = {}
    for cell in cells:
        path = RunDir(cell.run_dir).results
        if not path.exists():
            continue
        for point in json.loads(path.read_text()).get("learning_curve", []):
            per_epoch = points.setdefault(_slug(cell.recipe), {})
            per_epoch.setdefault(point["epoch"], []).append(point["auroc"])
    return {
        rec: (sorted(pts), [float(np.mean(pts[e])) for e in sorted(pts)])
        for rec, pts in points.items()
    }


def epochs_to_reach(
    curves: dict[str, tuple[list[float], list[float]]], reference: str, share: float = 0.95
) -> dict[str, float | None]:
    """First epoch at which each mean curve reaches `share` of the reference's final AUROC."""
    if reference not in curves or not curves[reference][1]:
        return {}
    target = share * curves[reference][1][-1]
    return {
        rec: next((e for e, a in zip(epochs, aurocs, strict=True) if a >= target), None)
        for rec, (epochs, aurocs) in curves.items()
    }


def curve_reference(grid: GridConfig, curves: dict) -> str | None:
    if grid.curve_reference:
        return grid.curve_reference
    return next((rec for rec in curves if "ntxent" in rec), None)


def plot_curves(out_dir: Path, grid: GridConfig, cells: list[Cell]) -> None:
    """Mean learning curves of all recipes in one plot, marked where each reaches the target."""
    from firmad.report import plot_learning_curve

    curves = learning_curves(cells)
    if not curves:
        return
    reference = curve_reference(grid, curves)
    reached = epochs_to_reach(curves, reference) if reference else {}
    marks = {f"{rec} reaches 95% of {reference}": e for rec, e in reached.items() if e is not None}
    plot_learning_curve(out_dir / "bench_curves.png", curves, marks=marks)
    atomic_write_json(
        out_dir / "bench_curves.json",
        {"curves": curves, "reference": reference, "epoch_to_95pct_of_reference": reached},
    )


def curves_markdown(grid: GridConfig, cells: list[Cell]) -> list[str]:
    curves = learning_curves(cells)
    reference = curve_reference(grid, curves)
    if not curves or not reference or reference not in curves:
        return []
    reached = epochs_to_reach(curves, reference)
    final = curves[reference][1][-1]
    lines = [
        "## Learning curves (diagnostic: kNN-cosine k=5 AUROC on a test subsample)",
        "",
        f"Target: 95 % of {reference}'s final mean curve AUROC ({100 * final:.1f} %) = "
        f"{95 * final:.1f} %. Plot: bench_curves.png.",
        "",
        "| recipe | final curve AUROC | first epoch at target |",
        "|---|---|---|",
    ]
    for rec, (_, aurocs) in curves.items():
        e = reached.get(rec)
        first = e if e is not None else "not reached"
        lines.append(f"| {rec} | {100 * aurocs[-1]:.1f} | {first} |")
    return [*lines, ""]
