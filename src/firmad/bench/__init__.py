"""Benchmark grids: recipes (methods) x datasets x normal classes x seeds, one run directory a cell.

A finished cell (results.json present) is never redone; an interrupted cell resumes from its
checkpoint; a failed cell is recorded with its error and the grid goes on. Each cell runs in its own
process (`firmad train`), so a crash cannot take the grid down. Executors: ``local`` (`--workers N`
cells at once on this machine, `--devices 0,1` one cell per GPU) and ``ray`` (each cell a Ray task
on a cluster; the same subprocess, the same files). Ctrl-C stops a grid at once, and running cells
keep a checkpoint; running the same command again continues it.
"""

from firmad.bench.executors import (
    EXECUTORS,
    GridExecutor,
    cell_command,
    parse_devices,
    run_cell,
    run_grid,
    run_jobs,
)
from firmad.bench.grid import (
    Cell,
    GridConfig,
    cell_overrides,
    check_grid,
    plan_cells,
    read_grid,
    select_cells,
)
from firmad.bench.tables import (
    CSV_FIELDS,
    RESULT_FIELDS,
    bench_markdown,
    collect_rows,
    learning_curves,
    summarise,
)

__all__ = [
    "CSV_FIELDS",
    "EXECUTORS",
    "RESULT_FIELDS",
    "Cell",
    "GridConfig",
    "GridExecutor",
    "bench_markdown",
    "cell_command",
    "cell_overrides",
    "check_grid",
    "collect_rows",
    "learning_curves",
    "parse_devices",
    "plan_cells",
    "read_grid",
    "run_cell",
    "run_grid",
    "run_jobs",
    "select_cells",
    "summarise",
]
