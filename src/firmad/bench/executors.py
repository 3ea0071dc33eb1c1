"""Running a grid's cells: each cell is one `firmad train` / `firmad evaluate` subprocess
(`firmad.cellproc`), started by the ``local`` executor (N at once, or one per GPU) or as a Ray
task; the tables are rewritten after every cell (`firmad.bench.tables`)."""

from __future__ import annotations

import contextlib
import math
import os
import queue
import signal
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
from rich.table import Column

from firmad.bench.grid import (
    Cell,
    GridConfig,
    cell_overrides,
    check_grid,
    plan_cells,
    read_grid,
    select_cells,
)
from firmad.bench.tables import summarise
from firmad.cellproc import STOP_GRACE_S, CellProcesses, run_process
from firmad.config import shorten
from firmad.errors import ConfigError, FirmadError
from firmad.io import atomic_write_json
from firmad.run import CELL_ERROR, CELL_LOG, RunDir
from firmad.training.callbacks import live_progress

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
    env = {**cell_env(cell), **(env or {})}
    return _cell_status(cell, run_process(**job, env=env, procs=procs))


# Variables that change a CPU's arithmetic (the kernels torch, oneDNN and MKL choose): a cell
# gets the grid's, also on a Ray worker started with another environment.
NUMERICS_ENV = (
    "ATEN_CPU_CAPABILITY",
    "DNNL_MAX_CPU_ISA",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "CUBLAS_WORKSPACE_CONFIG",
)


def cell_env(cell: Cell) -> dict[str, str]:
    """What a cell's process needs of its environment for its numbers, under any executor:
    its threads, and this process's numerics variables."""
    env = {k: os.environ[k] for k in NUMERICS_ENV if k in os.environ}
    return {**env, "OMP_NUM_THREADS": str(cell.threads)}


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


@dataclass(frozen=True)
class GridExecutor:
    """Where a grid's cells run.

    ``kind``: ``local`` runs ``workers`` cells at once as subprocesses of this process
    (``devices``: GPU ids, one cell per GPU at a time, pinned with CUDA_VISIBLE_DEVICES);
    ``ray`` runs each cell as a Ray task (``cell_cpus`` CPUs and ``cell_gpus`` GPUs) on the
    cluster at ``address``, or on a local Ray runtime (or the one this process already joined).
    Checked by `run_grid` before anything is planned.
    """

    kind: str = "local"
    workers: int = 1
    devices: list[str] | str | None = None
    address: str | None = None
    cell_cpus: float = 1.0
    cell_gpus: float = 0.0


def run_grid(
    config: Path,
    out_dir: Path | None = None,
    quiet: bool = False,
    overrides: list[str] | None = None,
    executor: GridExecutor | None = None,
    classes: list[str] | None = None,
    seeds: list[int] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run every cell of a grid not yet evaluated, and write the tables.

    ``classes`` / ``seeds`` run only those cells of the grid (a part of a long grid now, the
    rest later); the tables still cover the whole grid, the cells not run shown as they are.

    ``executor``: where the cells run (`GridExecutor`; default: one local worker). With Ray,
    ``out_dir`` and the data must be on a filesystem every node sees. ``threads``
    (or the grid's ``threads:``) sets each cell's CPU threads, whichever executor runs it
    (default: the recipe's ``train.threads``, else `CELL_THREADS`).

    Ctrl-C or SIGTERM stops the grid at once: no new cell starts, running cells save a
    checkpoint and stop, the tables are written (unfinished cells ``interrupted`` or
    ``pending``), then KeyboardInterrupt is raised. The result's ``statuses`` has one record
    per cell that ran or was looked at.
    """
    ex = executor or GridExecutor()
    devices = _check_executor(ex.kind, ex.devices, ex.workers)
    _check_cell_resources(ex.cell_cpus, ex.cell_gpus)
    grid = _read_grid(config, overrides, threads)
    out_dir = Path(out_dir or Path("runs") / "bench" / grid.name)
    if ex.kind == "ray":
        out_dir = out_dir.resolve()  # Ray workers may run elsewhere: no relative paths
    cells = plan_cells(grid, out_dir)
    to_run = select_cells(cells, grid, classes, seeds)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = _Recorder(grid, cells, out_dir, None if quiet else _grid_progress(), len(to_run))
    try:
        with _stop_signals():
            if ex.kind == "local":
                _run_local(to_run, grid, ex.workers, devices, record)
            else:
                _run_ray(to_run, grid, ex.address, ex.cell_cpus, ex.cell_gpus, record)
    finally:
        record.stop()
        # Whatever happened, the last tables describe the cells as they are now on disk.
        ordered = [record.statuses[c.key] for c in cells if c.key in record.statuses]
        result = summarise(grid, cells, out_dir, ordered)
    return result


class _Recorder:
    """Takes each cell's status as it comes (from any thread): the progress line advances and
    the tables are rewritten, so a stopped grid still has them."""

    def __init__(self, grid: GridConfig, cells: list[Cell], out_dir: Path, progress, n: int):
        self.grid, self.cells, self.out_dir, self.progress = grid, cells, out_dir, progress
        self.statuses: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.task = progress.add_task("grid", total=n, info="") if progress else None
        if progress:
            progress.start()

    def __call__(self, status: dict[str, Any], running: set[str]) -> None:
        with self.lock:
            self.statuses[status["cell"]] = status
            if self.progress:
                info = f"{status['cell']}: {status['status']}"
                self.progress.update(self.task, advance=1, info=info)
            statuses = list(self.statuses.values())
            summarise(self.grid, self.cells, self.out_dir, statuses, running=running)

    def stop(self) -> None:
        if self.progress:
            self.progress.stop()


def _read_grid(config: Path, overrides: list[str] | None, threads: int | None) -> GridConfig:
    """The grid file with the command line's --set and --threads applied."""
    grid = read_grid(config)
    grid.set = grid.set + list(overrides or [])
    if threads is not None:
        grid.threads = threads
        check_grid(grid, "--threads")
    return grid


def _check_executor(executor: str, devices: list[str] | str | None, workers: int) -> list[str]:
    """The executor's settings checked before anything is planned; the GPU ids."""
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor: {shorten(executor)} is not one of {', '.join(EXECUTORS)}")
    devices = parse_devices(devices) if isinstance(devices, str) else list(devices or [])
    if devices and executor != "local":
        raise ConfigError(
            "--devices pins cells to GPUs of this machine: use it with --executor local"
        )
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if devices:
        _check_devices_exist(devices)
    return devices


def _check_devices_exist(devices: list[str]) -> None:
    """--devices names GPUs this machine has: a cell pinned to a missing one would quietly
    train on the CPU."""
    import torch

    count = torch.cuda.device_count()
    missing = [d for d in devices if int(d) >= count]
    if missing:
        have = f"GPUs 0..{count - 1}" if count else "no CUDA GPU"
        raise ConfigError(
            f"--devices: GPU {', '.join(missing)} not found; this machine has {have} (as torch "
            "sees it). Name GPUs it has, or leave out --devices to run cells on the CPU"
        )


def _check_cell_resources(cell_cpus: float, cell_gpus: float) -> None:
    """--cell-cpus / --cell-gpus as Ray takes them: finite, CPUs > 0, GPUs >= 0, and a whole
    number above 1 (Ray shares only a single CPU or GPU between tasks)."""
    checks = (("--cell-cpus", cell_cpus, cell_cpus > 0, "> 0"),
              ("--cell-gpus", cell_gpus, cell_gpus >= 0, ">= 0"))  # fmt: skip
    for option, value, in_range, rule in checks:
        if not (math.isfinite(value) and in_range):
            raise ConfigError(f"{option}: must be a number {rule}, e.g. 1 or 0.5; got {value}")
        if value > 1 and value != int(value):
            raise ConfigError(
                f"{option}: {value}: above 1 it must be a whole number (Ray shares only a single "
                f"CPU or GPU between tasks), e.g. {int(value)} or {int(value) + 1}"
            )


def _grid_progress():
    """The grid's one-line progress: cells done of all, elapsed time, the last cell's status."""
    return live_progress(
        TextColumn("[bold]grid"),
        BarColumn(bar_width=20),
        TextColumn("{task.completed}/{task.total} cells"),
        TimeElapsedColumn(table_column=Column(min_width=7, no_wrap=True)),
        TextColumn("{task.fields[info]}", table_column=Column(overflow="ellipsis", ratio=1)),
        expand=True,
        unit="cells",
    )


def _run_local(cells, grid, workers, devices, record) -> None:
    workers = len(devices) if devices else workers
    free: queue.Queue[str] = queue.Queue()
    for d in devices:
        free.put(d)
    procs = CellProcesses()

    def one(cell: Cell) -> dict[str, Any]:
        device = free.get() if devices else None
        env = {"CUDA_VISIBLE_DEVICES": device} if device is not None else None
        try:
            return run_cell(cell, grid, procs, env=env)
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


def _start_ray(address: str | None, option: str):
    """Ray, connected (to ``address``, or a runtime of this machine alone on the loopback
    interface); (the module, whether this call started it, so the caller shuts it down)."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            f"{option} ray needs Ray: pip install 'firmad[ray]' (on every node of the cluster)"
        ) from None
    started = not ray.is_initialized()
    if started:
        local = {} if address else {"_node_ip_address": "127.0.0.1"}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **local)
    return ray, started


def _run_ray(cells, grid, address, cell_cpus, cell_gpus, record) -> None:
    ray, started = _start_ray(address, "--executor")
    try:
        # A cell is the same subprocess as in a local grid, started by the Ray worker on the
        # node Ray chose; the worker imports only firmad.cellproc.
        remote = ray.remote(run_process).options(
            num_cpus=cell_cpus, num_gpus=cell_gpus, max_retries=0
        )
        firmad_env = {k: v for k, v in os.environ.items() if k.startswith("FIRMAD_")}
        refs = {}
        for cell in cells:
            job = _cell_job(cell, grid)
            if job is None:
                record({"cell": cell.key, "status": "done"}, set())
            else:
                env = {**firmad_env, **cell_env(cell)}
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


# --- any commands through the same executors (the feature study's cells) ------------------------


def run_jobs(
    jobs: list[dict[str, Any]],
    executor: str = "local",
    workers: int = 1,
    threads: int | None = None,
    address: str | None = None,
    cpus: float = 1.0,
    gpus: float = 0.0,
) -> dict[str, dict[str, Any]]:
    """Run commands the way a grid runs its cells: each job (``{"key", "cmd", "log_path"}``,
    optionally ``"forget"``) is one process in its own session with its output in its log,
    started by the ``local`` executor (``workers`` at once) or as a Ray task (``cpus`` /
    ``gpus`` each, on the cluster at ``address`` or a local runtime). ``threads`` sets each
    process's OMP_NUM_THREADS. Ctrl-C or SIGTERM stops them as it stops a grid's cells, then
    raises KeyboardInterrupt. Returns each job's outcome (`run_process`'s record) by key."""
    _check_executor(executor, None, workers)
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    with _stop_signals():
        if executor == "local":
            return _local_jobs(jobs, workers, env)
        return _ray_jobs(jobs, address, cpus, gpus, env)


def _local_jobs(jobs, workers: int, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    procs = CellProcesses()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="job")
    futures = {pool.submit(run_process, j["cmd"], j["log_path"], env=env, procs=procs,
                           forget=tuple(j.get("forget", ()))): j["key"] for j in jobs}  # fmt: skip
    pending, outcomes = set(futures), {}
    try:
        while pending:
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            outcomes.update({futures[f]: f.result() for f in done})
    except KeyboardInterrupt:
        procs.stop(signal.SIGINT)  # as a grid: running jobs stop, queued ones never start
        pool.shutdown(wait=False, cancel_futures=True)
        wait({f for f in pending if not f.cancelled()}, timeout=STOP_GRACE_S)
        procs.stop(signal.SIGKILL)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return outcomes


def _ray_jobs(jobs, address, cpus: float, gpus: float, env) -> dict[str, dict[str, Any]]:
    ray, started = _start_ray(address, "executor")
    try:
        remote = ray.remote(run_process).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
        env = {**{k: v for k, v in os.environ.items() if k.startswith("FIRMAD_")}, **env}
        cwd, refs = os.getcwd(), {}
        for j in jobs:
            forget = tuple(j.get("forget", ()))
            refs[remote.remote(j["cmd"], j["log_path"], env=env, cwd=cwd, forget=forget)] = j["key"]
        pending, outcomes = list(refs), {}
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                outcomes.update({refs[r]: _ray_outcome(ray, r) for r in done})
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref)
            with contextlib.suppress(KeyboardInterrupt):
                ray.wait(pending, num_returns=len(pending), timeout=STOP_GRACE_S)
            raise
        return outcomes
    finally:
        if started:
            ray.shutdown()


def _ray_outcome(ray, ref) -> dict[str, Any]:
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as err:  # cancelled, or the worker or its node died
        error = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return {"started": True, "returncode": None, "stopped": False, "error": error}
