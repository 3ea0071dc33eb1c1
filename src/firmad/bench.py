"""Benchmark grids: recipes (methods) x datasets x normal classes x seeds, one run directory a cell.

A finished cell (results.json present) is never redone; an interrupted cell resumes from its
checkpoint; a failed cell is recorded with its error and the grid goes on. Each cell runs in its own
process (`firmad train`), so a crash cannot take the grid down. Executors: ``local`` (`--workers N`
cells at once on this machine, `--devices 0,1` one cell per GPU) and ``ray`` (each cell a Ray task
on a cluster; the same subprocess, the same files). Ctrl-C stops a grid at once, and running cells
keep a checkpoint; running the same command again continues it.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import os
import queue
import signal
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
from rich.table import Column

from firmad.cellproc import STOP_GRACE_S, CellProcesses, run_process
from firmad.config import (
    _build,
    apply_overrides,
    backbone_overrides,
    config_from_dict,
    parse_scorer,
    read_recipe,
    read_yaml_file,
    shorten,
)
from firmad.data import describe
from firmad.errors import ConfigError, FirmadError
from firmad.io import atomic_write_json, atomic_write_text
from firmad.run import CELL_ERROR, CELL_LOG, RunDir, safe_component
from firmad.scoring.scorers import result_name
from firmad.training.callbacks import live_progress


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
    # count, so the same cell with other threads gives slightly other numbers). None: the
    # machine's cores shared by the local workers, or --cell-cpus with Ray.
    threads: int | None = None


@dataclass
class Cell:
    recipe: str
    dataset: str
    normal_class: int
    seed: int
    run_dir: Path
    backbone: str | None = None  # from the grid's `backbones` axis

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
    grid = _build(GridConfig, read_yaml_file(path, "grid") or {}, "")
    if not grid.recipes or not grid.seeds:
        raise ConfigError(f"{path}: recipes and seeds must not be empty")
    check_grid(grid, path)
    return grid


def check_grid(grid: GridConfig, path: Path | str = "grid") -> None:
    """What needs no dataset: a name that is one folder, no value listed twice, threads >= 1."""
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
            apply_overrides(copy.deepcopy(base), grid.set + extra + backbone_overrides(backbone))
        )
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
                    cell = Cell(recipe, dataset, c, seed, run_dir, backbone)
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
        config_from_dict(apply_overrides(copy.deepcopy(base), cell_overrides(cell, grid)))
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


# --- running cells -------------------------------------------------------------------------------

EXECUTORS = ("local", "ray")


def cell_command(cell: Cell, grid: GridConfig, state: str) -> list[str]:
    """The `firmad` command that takes a cell from ``state`` to evaluated."""
    firmad = [sys.executable, "-m", "firmad", "-q"]
    if state == "finished":
        return firmad + ["evaluate", str(cell.run_dir)]  # only the evaluation is left
    if state == "partial":
        return firmad + ["train", "--out", str(cell.run_dir), "--resume"]
    # New, or started but never checkpointed: `firmad train` starts it (again).
    cmd = firmad + ["train", "--out", str(cell.run_dir), "--config", cell.recipe]
    return cmd + [a for o in cell_overrides(cell, grid) for a in ("--set", o)]


def cell_overrides(cell: Cell, grid: GridConfig) -> list[str]:
    """The --set options of a new cell's `firmad train`."""
    overrides = (
        grid.set
        + backbone_overrides(cell.backbone)
        + [
            f"data.dataset={cell.dataset}",
            f"data.normal_class={cell.normal_class}",
            f"train.seed={cell.seed}",
        ]
    )
    if grid.root:
        overrides.append(f"data.root={grid.root}")
    return overrides


def _cell_job(cell: Cell, grid: GridConfig) -> dict[str, Any] | None:
    """What to run for a cell (None: it is evaluated already)."""
    state = RunDir(cell.run_dir).state
    if state == "evaluated":
        return None
    return {
        "cmd": cell_command(cell, grid, state),
        "log_path": str(cell.run_dir / CELL_LOG),
        "forget": (str(cell.run_dir / CELL_ERROR),),
    }


def _cell_status(cell: Cell, outcome: dict[str, Any]) -> dict[str, Any]:
    """A cell's status record from its process's outcome; a failure is written to error.json."""
    status = {"cell": cell.key, "seconds": outcome.get("seconds")}
    if not outcome["started"]:
        return {**status, "status": "not started"}
    if outcome["stopped"]:
        return {**status, "status": "interrupted"}
    if outcome["returncode"] == 0:
        return {**status, "status": "ran"}
    error = outcome["error"]
    atomic_write_json(
        cell.run_dir / CELL_ERROR, {"returncode": outcome["returncode"], "error": error}
    )
    return {**status, "status": "failed", "error": error}


def run_cell(
    cell: Cell,
    grid: GridConfig,
    threads: int | None = None,
    procs: CellProcesses | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one cell in a subprocess (`python -m firmad train/evaluate`); its status record.

    ``status``: ``done`` (already evaluated), ``ran``, ``failed`` (error.json written),
    ``interrupted`` (stopped; it resumes from its checkpoint next time) or ``not started``
    (the grid was stopping). Output goes to the cell's log.txt as it runs; the process dies
    with this one (`firmad.cellproc`).
    """
    job = _cell_job(cell, grid)
    if job is None:
        return {"cell": cell.key, "status": "done"}
    env = dict(env or {})
    if threads:  # N cells at once share the cores
        env["OMP_NUM_THREADS"] = str(threads)
    return _cell_status(cell, run_process(**job, env=env, procs=procs))


@contextlib.contextmanager
def _stop_signals():
    """SIGINT (Ctrl-C, even where a shell started the grid with SIGINT ignored) and SIGTERM (a
    scheduler ending the job, `kill`) stop the grid: KeyboardInterrupt in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def parse_devices(text: str | None) -> list[str]:
    """'0,1,3' -> ['0', '1', '3'] (CUDA device ids for --devices)."""
    if not text:
        return []
    devices = [d.strip() for d in str(text).split(",") if d.strip()]
    if not devices or not all(d.isdigit() for d in devices):
        raise ConfigError(f"--devices: expected GPU ids like 0,1,2; got {shorten(text)}")
    if len(set(devices)) != len(devices):
        raise ConfigError(f"--devices: {shorten(text)} names a device twice")
    return devices


def run_grid(
    config: Path,
    out_dir: Path | None = None,
    workers: int = 1,
    quiet: bool = False,
    overrides: list[str] | None = None,
    executor: str = "local",
    devices: list[str] | str | None = None,
    address: str | None = None,
    cell_cpus: float = 1.0,
    cell_gpus: float = 0.0,
    classes: list[str] | None = None,
    seeds: list[int] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run every cell of a grid not yet evaluated, and write the tables.

    ``classes`` / ``seeds`` run only those cells of the grid (a part of a long grid now, the
    rest later); the tables still cover the whole grid, the cells not run shown as they are.

    ``executor``: ``local`` runs ``workers`` cells at once as subprocesses of this process
    (``devices``: GPU ids, one cell per GPU at a time, pinned with CUDA_VISIBLE_DEVICES);
    ``ray`` runs each cell as a Ray task (``cell_cpus`` CPUs and ``cell_gpus`` GPUs) on the
    cluster at ``address``, or on a local Ray runtime (or the one this process already joined).
    With Ray, ``out_dir`` and the data must be on a filesystem every node sees. ``threads``
    (or the grid's ``threads:``) fixes each cell's CPU threads whichever executor runs it.

    Ctrl-C or SIGTERM stops the grid at once: no new cell starts, running cells save a
    checkpoint and stop, the tables are written (unfinished cells ``interrupted`` or
    ``pending``), then KeyboardInterrupt is raised. The result's ``statuses`` has one record
    per cell that ran or was looked at.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor: {shorten(executor)} is not one of {', '.join(EXECUTORS)}")
    devices = parse_devices(devices) if isinstance(devices, str) else list(devices or [])
    if devices and executor != "local":
        raise ConfigError(
            "--devices pins cells to GPUs of this machine: use it with --executor local"
        )
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    grid = read_grid(config)
    grid.set = grid.set + list(overrides or [])
    if threads is not None:
        grid.threads = threads
        check_grid(grid, "--threads")
    out_dir = Path(out_dir or Path("runs") / "bench" / grid.name)
    if executor == "ray":
        out_dir = out_dir.resolve()  # Ray workers may run elsewhere: no relative paths
    cells = plan_cells(grid, out_dir)
    to_run = select_cells(cells, grid, classes, seeds)
    out_dir.mkdir(parents=True, exist_ok=True)
    statuses: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    progress = (
        None
        if quiet
        else live_progress(
            TextColumn("[bold]grid"),
            BarColumn(bar_width=20),
            TextColumn("{task.completed}/{task.total} cells"),
            TimeElapsedColumn(table_column=Column(min_width=7, no_wrap=True)),
            TextColumn("{task.fields[info]}", table_column=Column(overflow="ellipsis", ratio=1)),
            expand=True,
            unit="cells",
        )
    )
    task = progress.add_task("grid", total=len(to_run), info="") if progress else None

    def record(status: dict[str, Any], running: set[str]) -> None:
        # Tables are rewritten after every cell, so a stopped grid still has them.
        with lock:
            statuses[status["cell"]] = status
            if progress:
                progress.update(task, advance=1, info=f"{status['cell']}: {status['status']}")
            summarise(grid, cells, out_dir, list(statuses.values()), running=running)

    if progress:
        progress.start()
    try:
        with _stop_signals():
            if executor == "local":
                _run_local(to_run, grid, workers, devices, record)
            else:
                _run_ray(to_run, grid, address, cell_cpus, cell_gpus, record)
    finally:
        if progress:
            progress.stop()
        # Whatever happened, the last tables describe the cells as they are now on disk.
        ordered = [statuses[c.key] for c in cells if c.key in statuses]
        result = summarise(grid, cells, out_dir, ordered)
    return result


def _run_local(cells, grid, workers, devices, record) -> None:
    workers = len(devices) if devices else workers
    threads = grid.threads or (max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None)
    free: queue.Queue[str] = queue.Queue()
    for d in devices:
        free.put(d)
    procs = CellProcesses()

    def one(cell: Cell) -> dict[str, Any]:
        device = free.get() if devices else None
        env = {"CUDA_VISIBLE_DEVICES": device} if device is not None else None
        try:
            return run_cell(cell, grid, threads, procs, env=env)
        except (OSError, FirmadError) as err:  # the cell could not even start: record it
            error = f"{type(err).__name__}: {err}"
            cell.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cell.run_dir / CELL_ERROR, {"returncode": None, "error": error})
            return {"cell": cell.key, "status": "failed", "error": error}
        finally:
            if device is not None:
                free.put(device)

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cell")
    futures = {pool.submit(one, c): c for c in cells}
    pending = set(futures)

    def running() -> set[str]:
        return {futures[f].key for f in pending if f.running()}

    try:
        while pending:
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in done:
                record(fut.result(), running())
    except KeyboardInterrupt:
        # Stop at once: queued cells never start, running ones save a checkpoint and stop.
        procs.stop(signal.SIGINT)
        pool.shutdown(wait=False, cancel_futures=True)
        # Cancelled futures never count as done for wait(): wait for the running ones only.
        pending = {f for f in pending if not f.cancelled()}
        try:
            wait(pending, timeout=STOP_GRACE_S)
        except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
            procs.stop(signal.SIGKILL)
            wait(pending, timeout=30)
        procs.stop(signal.SIGKILL)  # any cell that ignored the grace period
        for fut in pending:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                record(fut.result(), set())
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_ray(cells, grid, address, cell_cpus, cell_gpus, record) -> None:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--executor ray needs Ray: pip install 'firmad[ray]' (on every node of the cluster)"
        ) from None
    started = not ray.is_initialized()
    if started:
        # No address: a runtime of this machine alone, kept on the loopback interface.
        local = {} if address else {"_node_ip_address": "127.0.0.1"}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **local)
    try:
        # A cell is the same subprocess as in a local grid, started by the Ray worker on the
        # node Ray chose; the worker imports only firmad.cellproc.
        remote = ray.remote(run_process).options(
            num_cpus=cell_cpus, num_gpus=cell_gpus, max_retries=0
        )
        env = {k: v for k, v in os.environ.items() if k.startswith("FIRMAD_")}
        env["OMP_NUM_THREADS"] = str(grid.threads or max(1, int(cell_cpus)))
        refs = {}
        for cell in cells:
            job = _cell_job(cell, grid)
            if job is None:
                record({"cell": cell.key, "status": "done"}, set())
            else:
                refs[remote.remote(**job, env=env, cwd=os.getcwd())] = cell
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for ref in done:
                    record(_ray_status(ray, ref, refs[ref]), set())
        except KeyboardInterrupt:
            for ref in pending:  # queued: dropped; running: KeyboardInterrupt in the task
                ray.cancel(ref)
            with contextlib.suppress(KeyboardInterrupt):
                ray.wait(pending, num_returns=len(pending), timeout=STOP_GRACE_S)
            raise
    finally:
        if started:
            ray.shutdown()


def _ray_status(ray, ref, cell: Cell) -> dict[str, Any]:
    try:
        return _cell_status(cell, ray.get(ref))
    except ray.exceptions.TaskCancelledError:
        return {"cell": cell.key, "status": "interrupted"}
    except ray.exceptions.RayError as err:  # the worker or its node died: record it as failed
        error = (str(err).strip().splitlines() or [type(err).__name__])[0]
        atomic_write_json(cell.run_dir / CELL_ERROR, {"returncode": None, "error": error})
        return {"cell": cell.key, "status": "failed", "error": error}


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


def collect_rows(cells: list[Cell], running: set[str] | frozenset = frozenset()) -> list[dict]:
    """One row per result of a done cell; one row with the status of every other cell:
    ``running``, ``failed`` (error.json), ``interrupted`` (a checkpoint, no results: it resumes)
    or ``pending`` (nothing to resume)."""
    rows = []
    for cell in cells:
        base = {
            "recipe": cell.label,
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
        elif cell.key in running:
            rows.append({**base, "status": "running"})
        elif error.exists():
            rows.append(
                {
                    **base,
                    "status": "failed",
                    "error": json.loads(error.read_text()).get("error", ""),
                }
            )
        else:
            try:
                state = RunDir(cell.run_dir).state
            except FirmadError as err:
                rows.append({**base, "status": "failed", "error": str(err).splitlines()[0]})
                continue
            status = "interrupted" if state in ("partial", "finished") else "pending"
            rows.append({**base, "status": status})
    return rows


def _scorer_label(row: dict[str, Any]) -> str:
    return result_name(row["scorer"], row.get("k"))


def _headline_label(spec: str) -> str:
    """A grid's headline scorer spec ("knn_cos:k=5") as a row label ("knn_cos k=5")."""
    name, params = parse_scorer(spec)
    return result_name(name, params.get("k"))


def summarise(
    grid: GridConfig,
    cells: list[Cell],
    out_dir: Path,
    statuses: list[dict[str, Any]] | None = None,
    running: set[str] | frozenset = frozenset(),
) -> dict[str, Any]:
    rows = collect_rows(cells, running)
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
        "rows": rows,
    }


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    arr = 100 * np.asarray(values)
    return f"{arr.mean():.1f}" + (f" ± {arr.std(ddof=1):.1f}" if len(arr) > 1 else "")


def bench_markdown(grid: GridConfig, cells: list[Cell], rows: list[dict[str, Any]]) -> str:
    done = [r for r in rows if r["status"] == "done"]
    recipes = list(dict.fromkeys(c.label for c in cells))
    lines = [f"# Benchmark grid: {grid.name}", ""]
    n_done = len({(r["recipe"], r["dataset"], r["normal_class"], r["seed"]) for r in done})
    failed = [r for r in rows if r["status"] == "failed"]
    count = {s: sum(r["status"] == s for r in rows) for s in ("running", "interrupted", "pending")}
    others = ", ".join(f"{n} {s}" for s, n in count.items() if n or s == "pending")
    lines.append(
        f"Cells: {len(cells)} planned, {n_done} done, {len(failed)} failed, {others}. "
        "Results from the last checkpoint."
    )
    if count["interrupted"]:
        lines[-1] += " Interrupted cells continue from their checkpoint when the grid runs again."
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
    recipes = list(dict.fromkeys(c.label for c in cells))
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
            per_epoch = points.setdefault(cell.label, {})
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
