"""The whole study: every cell (normal class x seed) run in this process or through the
bench executors (`firmad.bench.executors.run_jobs`: local processes or Ray tasks), then
study.json and study.md written from the cells' records."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from firmad.errors import ConfigError, FirmadError
from firmad.io import atomic_write_json, atomic_write_text
from firmad.robustness.study.cell import Cell, key_of
from firmad.robustness.study.config import ConstructionError, StudyConfig, read_study
from firmad.robustness.study.markdown import study_markdown
from firmad.robustness.study.stats import summarise

DROPPED = {
    "D_NRonly": (
        "dropped: the one-class detector would have to learn the planted perturbations through "
        "FIRM's contrastive training views (random crops of 25-100 %, colour jitter, blur), "
        "which destroy most of them, and training FIRM without its views changes the method; "
        "the one-class branch asks the question through inversions (D_NR) instead"
    )
}
CONFIG_FILE = "study-config.yaml"  # the settings the cells' processes read
# settings that may change between runs of one study directory (the artefacts do not
# depend on them): branches, classes and seeds may be added; the summary may change
FREE = {
    "name",
    "reductions",
    "branches",
    "classes",
    "seeds",
    "one_class_seeds",
    "chance",
    "confidence",
    "cells_floor",
    "executor",
    "workers",
    "address",
}


class CellError(FirmadError):
    """A cell's process failed (not a floor: an error); its log says why."""


class Study:
    """Runs every cell (class x seed) in ``out_dir`` and writes study.json / study.md."""

    def __init__(self, cfg: StudyConfig, out_dir: Path, log=print) -> None:
        self.cfg, self.out, self.log = cfg, Path(out_dir), log

    def check_settings(self) -> None:
        """Refuse to resume a study directory whose artefacts were built with other settings."""
        mine = {k: v for k, v in self.cfg.model_dump().items() if k not in FREE}
        path = self.out / "study-settings.json"
        if path.exists():
            theirs = json.loads(path.read_text())
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if changed:
                raise ConfigError(
                    f"{self.out} holds a study built with other settings ({', '.join(changed)}); "
                    "its stages cannot be reused. Give another --out, or restore the settings."
                )
        else:
            atomic_write_json(path, mine)

    def run(self) -> dict[str, Any]:
        tic = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_settings()
        keys = [(c, s) for c in self.cfg.classes for s in self.cfg.seeds]
        self.run_cells(keys)
        results, errors = {}, []
        for key in keys:  # every cell is finished now: this reads its records
            cell = Cell(self.cfg, *key, self.out, self.log)
            results[key] = cell.run()
            errors += cell.errors
        out = {
            "settings": self.cfg.model_dump(),
            "dropped_sets": DROPPED,
            "cells": {key_of(*k): r for k, r in results.items()},
            "summary": summarise(self.cfg, results),
            # over every invocation that completed the study (a resumed study adds its time)
            "wall_time_s": round(self._previous_time() + time.perf_counter() - tic, 1),
        }
        self._plot_drift(out)
        atomic_write_json(self.out / "study.json", out)
        atomic_write_text(self.out / "study.md", study_markdown(out))
        if errors:
            raise ConstructionError(
                f"{len(errors)} stage(s) stopped (study.md lists them); the first: {errors[0]}"
            )
        return out

    def run_cells(self, keys: list[tuple[int, int]]) -> None:
        """Run the cells not finished yet: here, one after the other, with the local executor
        and one worker; else one process each through the bench executors."""
        todo = [k for k in keys if not self._finished(k)]
        c = self.cfg
        if not todo:
            return
        if c.executor == "local" and (c.workers == 1 or len(todo) == 1):
            for key in todo:
                Cell(c, *key, self.out, self.log).run()
            return
        self._run_jobs(todo)

    def _finished(self, key: tuple[int, int]) -> bool:
        branches = [
            b
            for b in self.cfg.branches
            if b == "binary" or key[1] in (self.cfg.one_class_seeds or [key[1]])
        ]
        return all((self.out / key_of(*key) / f"{b}.json").exists() for b in branches)

    def _run_jobs(self, keys: list[tuple[int, int]]) -> None:
        from firmad.bench.executors import run_jobs
        from firmad.config import load_config

        c = self.cfg
        out = self.out.resolve() if c.executor == "ray" else self.out
        config = out / CONFIG_FILE
        atomic_write_text(config, json.dumps(c.model_dump(), indent=1))  # JSON is YAML
        jobs = [
            {
                "key": key_of(*k),
                "log_path": str(out / key_of(*k) / "log.txt"),
                "cmd": [
                    sys.executable,
                    "-m",
                    "firmad",
                    "features",
                    "--config",
                    str(config),
                    "--out",
                    str(out),
                    "--cell",
                    key_of(*k),
                ],
            }
            for k in keys
        ]
        threads = load_config(c.recipe, c.set).train.threads or 1
        self.log(
            f"running {len(jobs)} cell(s) through the {c.executor} executor "
            f"({c.workers} at once, {threads} thread(s) each); logs in <cell>/log.txt"
        )
        outcomes = run_jobs(jobs, c.executor, c.workers, threads, c.address, cpus=threads)
        failed = {k: o for k, o in outcomes.items() if o.get("returncode") != 0}
        if failed:
            key, o = next(iter(failed.items()))
            raise CellError(
                f"{len(failed)} cell(s) failed; {key}: {o.get('error') or o.get('returncode')} "
                f"(its log: {out / key / 'log.txt'}). Finished stages are kept: fix the cause and "
                "run the same command again."
            )

    def _previous_time(self) -> float:
        try:
            return float(json.loads((self.out / "study.json").read_text())["wall_time_s"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0

    def _plot_drift(self, out: dict) -> None:
        if not (self.cfg.drift_eps and "one_class" in self.cfg.branches):
            return
        from firmad.report import plot_drift

        unit = 255.0 if self.cfg.attack_norm == "linf" else 1.0
        drift = {
            f"{k}, {label}": rows
            for k, r in out["cells"].items()
            for label, rows in r.get("one_class", {}).get("drift", {}).items()
        }
        plot_drift(self.out / "drift.png", drift, unit)


def run_study(
    config: str | Path,
    out_dir: Path | None = None,
    log=print,
    workers: int | None = None,
    executor: str | None = None,
) -> dict[str, Any]:
    cfg = read_study(config)
    update = {k: v for k, v in (("workers", workers), ("executor", executor)) if v is not None}
    cfg = cfg.model_copy(update=update) if update else cfg
    return Study(cfg, out_dir or Path("runs") / "features" / cfg.name, log).run()
