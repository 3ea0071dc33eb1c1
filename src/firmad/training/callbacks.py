"""What happens around the training loop, each a callback: the progress bar, the JSONL metrics
log, checkpoints and learning curves. A callback implements any of the ``on_*`` hooks."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from firmad.io import REQUIRED_META, atomic_write_text, load_checkpoint, save_checkpoint


class Callback:
    def on_train_start(self, trainer) -> None: ...
    def on_step_end(self, trainer) -> None: ...
    def on_epoch_end(self, trainer, record: dict) -> None: ...
    def on_train_end(self, trainer) -> None: ...
    def on_interrupt(self, trainer) -> None: ...
    def on_diverged(self, trainer) -> None: ...


class CheckpointSaver(Callback):
    """Saves the whole training state every ``every`` epochs (0: only at the end), at the end,
    and when the run is interrupted (after a complete step)."""

    def __init__(self, directory: Path, name: str = "checkpoint", every: int = 0):
        self.directory, self.name, self.every = Path(directory), name, every

    def save(self, trainer, reason: str) -> None:
        tensors, meta = trainer.state()  # on every rank: the state gathers their generators
        world = getattr(trainer, "world", None)
        if world is None or world.is_main:
            save_checkpoint(self.directory, self.name, tensors, {**meta, "reason": reason})
        if world is not None and world.distributed:
            import torch.distributed as dist

            dist.barrier()  # the checkpoint is complete when save returns on any rank

    def restore(self, trainer) -> bool:
        """Load the saved state into ``trainer``; False when there is no checkpoint yet."""
        if not (self.directory / f"{self.name}.json").exists():
            return False
        required = (*REQUIRED_META, "optimizer", "scheduler", "step_in_epoch")
        tensors, meta = load_checkpoint(self.directory, self.name, required=required)
        trainer.load_state(tensors, meta)
        return True

    def on_epoch_end(self, trainer, record: dict) -> None:
        if self.every and trainer.epoch % self.every == 0 and not trainer.finished:
            self.save(trainer, "periodic")

    def on_train_end(self, trainer) -> None:
        self.save(trainer, "final")

    def on_interrupt(self, trainer) -> None:
        self.save(trainer, "interrupted")


def _finite_or_none(record: dict) -> dict:
    """JSON has no NaN: non-finite numbers are written as null."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }


class MetricsLog(Callback):
    """One JSON line per epoch (and per learning-curve point) in ``path``.

    On resume, lines past the checkpoint's step are dropped first, so the log describes one run
    with no repeated epochs."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = None

    def on_train_start(self, trainer) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                step = entry.get("step", entry.get("curve", {}).get("step", 0))
                if step is not None and step <= trainer.global_step:
                    kept.append(line)
            atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        self.file = open(self.path, "a")  # noqa: SIM115 - closed in on_train_end / on_interrupt

    def write(self, entry: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(entry, allow_nan=False) + "\n")
            self.file.flush()

    def on_epoch_end(self, trainer, record: dict) -> None:
        self.write(_finite_or_none(record))

    def _close(self, trainer=None) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    on_train_end = on_interrupt = on_diverged = _close


class LearningCurve(Callback):
    """A diagnostic AUROC point every ``every_epochs`` (may be fractional) and at the end.

    ``curve_fn(model) -> auroc``; points go into ``trainer.history`` (saved with checkpoints)
    and into the metrics log. Never used to pick a checkpoint."""

    def __init__(self, curve_fn: Callable, every_epochs: float, log: MetricsLog | None = None):
        self.curve_fn, self.every_epochs, self.log = curve_fn, every_epochs, log

    def on_step_end(self, trainer) -> None:
        every = max(1, round(self.every_epochs * trainer.steps_per_epoch))
        if trainer.global_step % every and not trainer.finished:
            return
        tic = time.perf_counter()
        point = {
            "epoch": round(trainer.global_step / trainer.steps_per_epoch, 4),
            "step": trainer.global_step,
            "auroc": self.curve_fn(trainer.model),
        }
        trainer.history.append(point)
        if self.log is not None:
            self.log.write({"curve": point})
        trainer.model.train()
        trainer.paused += time.perf_counter() - tic


PLAIN_EVERY_S = 15.0  # seconds between two progress lines where output is not a terminal


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def live_progress(*columns, unit: str = "", **kwargs):
    """A rich Progress on a terminal; where output goes to a file or a pipe, a plain line at
    the start, every PLAIN_EVERY_S seconds and at the end (rich alone would print the bar
    once, at the end)."""
    from rich.progress import Progress

    class _Progress(Progress):
        def __init__(self) -> None:
            super().__init__(*columns, **kwargs)
            self.plain = not self.disable and not self.console.is_terminal
            self.disable = self.disable or self.plain  # no live display in a file
            self._last: dict = {}

        def update(self, task_id, **changes) -> None:
            super().update(task_id, **changes)
            self._line(task_id)

        def advance(self, task_id, advance: float = 1) -> None:
            super().advance(task_id, advance)
            self._line(task_id)

        def _line(self, task_id, force: bool = False) -> None:
            if not self.plain:
                return
            task = self._tasks[task_id]
            now = time.monotonic()
            last = self._last.get(task_id)
            if not force and last is not None and now - last < PLAIN_EVERY_S:
                return
            if force and last is None and not task.completed:
                return
            self._last[task_id] = now
            total = f"/{task.total:g}" if task.total is not None else ""
            total += f" {unit}" if unit else ""
            info = task.fields.get("info", "")
            left = f", {_clock(task.time_remaining)} left" if task.total else ""
            self.console.print(
                f"{task.description}: {task.completed:g}{total}, {_clock(task.elapsed)} "
                f"elapsed{left}" + (f", {info}" if info else ""),
                highlight=False,
                markup=False,
                soft_wrap=True,
            )

        def stop(self) -> None:
            for task_id in list(self._tasks):
                self._line(task_id, force=True)
            super().stop()

    return _Progress()


def progress_bar():
    """The progress bar of a training run: steps, elapsed and remaining time, info. In 80
    columns the info text is cut (…), never the times."""
    from rich.progress import (
        BarColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )  # fmt: skip
    from rich.table import Column

    times = {"table_column": Column(min_width=7, no_wrap=True)}  # h:mm:ss, never cut
    return live_progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=20),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(**times),
        TimeRemainingColumn(**times),
        # The info takes the width that is left (expand + ratio) and is cut there.
        TextColumn(
            "{task.fields[info]}",
            table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1, min_width=0),
        ),
        expand=True,
        unit="steps",
    )


class ProgressBar(Callback):
    """Updates a rich Progress task with the step count, loss, learning rate and speed."""

    def __init__(self, progress):
        self.progress, self.task = progress, None

    def on_train_start(self, trainer) -> None:
        self.task = self.progress.add_task(
            "train", total=trainer.total_steps, completed=trainer.global_step, info=""
        )

    def on_step_end(self, trainer) -> None:
        if trainer.global_step % 10 == 0 or trainer.step_in_epoch == 0:
            self.progress.update(self.task, completed=trainer.global_step)

    def on_epoch_end(self, trainer, record: dict) -> None:
        info = (
            f"epoch {trainer.epoch}/{trainer.settings.epochs} loss {record['loss']:.3f} "
            f"lr {record['lr']:.2e} {record['views_per_s']:.0f} views/s"
        )
        self.progress.update(self.task, info=info)
