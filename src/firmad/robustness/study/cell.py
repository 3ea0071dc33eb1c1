"""One cell of the study: a normal class and a seed (the seed covers construction and
training). Its data, its two branches, each cached on disk as a whole once finished."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import torch

from firmad.io import atomic_write_json
from firmad.robustness.study.celldata import (  # noqa: F401 (importable from here too)
    CellData,
    load_cell_data,
    other_class_images,
)
from firmad.robustness.study.config import ConstructionError, StudyConfig


class Cell:
    """One normal class and one seed: every set built, trained and tested (resumable). The data
    are loaded on first use, so a finished cell is read back without them."""

    def __init__(self, cfg: StudyConfig, normal_class: int, seed: int, out: Path, log) -> None:
        self.cfg, self.cls, self.seed, self.log = cfg, normal_class, seed, log
        self.out = Path(out) / key_of(normal_class, seed)
        self.errors: list[ConstructionError] = []

    def tag(self) -> str:
        return f"class {self.cls}, seed {self.seed}"

    @functools.cached_property
    def data(self) -> CellData:
        return load_cell_data(self.cfg, self.cls, self.seed)

    def stop(self, stopped: dict[str, str], stage: str, error: ConstructionError) -> None:
        """Record a stage that missed its floor; the cell goes on with what does not need it."""
        self.log(f"[{self.tag()}] stopped: {error}")
        stopped[stage] = str(error)

    def run(self) -> dict[str, Any]:
        """Both branches, each cached as a whole once finished (its stages are cached too)."""
        from firmad.robustness.study.binary import run_binary
        from firmad.robustness.study.one_class import run_one_class

        result: dict[str, Any] = {"class": self.cls, "seed": self.seed}
        for branch, build in (("binary", run_binary), ("one_class", run_one_class)):
            if branch not in self.cfg.branches:
                continue
            if branch == "one_class" and self.seed not in (self.cfg.one_class_seeds or [self.seed]):
                continue
            done = self.out / f"{branch}.json"
            if not done.exists():
                tic, cpu = time.perf_counter(), time.process_time()
                part = build(self)
                part["seconds_last_invocation"] = round(time.perf_counter() - tic, 1)
                part["cpu_s_last_invocation"] = round(time.process_time() - cpu, 1)
                atomic_write_json(done, part)
            result[branch] = json.loads(done.read_text())
            # a stopped stage is kept with its reason and reported on every run
            self.errors += [
                ConstructionError(f"{key_of(self.cls, self.seed)} {branch}: {m}")
                for m in result[branch].get("stopped", {}).values()
            ]
        return result


def key_of(normal_class: int, seed: int) -> str:
    return f"c{normal_class}-s{seed}"


def run_cell_process(config: Path, out: Path, key: str) -> None:
    """A cell in a process of its own (the executors' job): run it; its branches' records on
    disk are its result. Threads: the study's train.threads, else OMP_NUM_THREADS."""
    from firmad.config import load_config
    from firmad.errors import ConfigError
    from firmad.robustness.study.config import read_study

    cfg = read_study(config)
    cells = {key_of(c, s): (c, s) for c in cfg.classes for s in cfg.seeds}
    if key not in cells:
        raise ConfigError(f"--cell {key}: not a cell of this study ({', '.join(cells)})")
    threads = load_config(cfg.recipe, cfg.set).train.threads
    if threads:
        torch.set_num_threads(threads)
    Cell(cfg, *cells[key], out, lambda msg: print(msg, flush=True)).run()
