"""One owner of a run directory: its file names, its state, and its lock.

A run directory holds ``config.yaml`` (the resolved recipe), ``checkpoint.safetensors`` +
``checkpoint.json`` (the training state), ``metrics.jsonl``, ``results.json``, ``report.md`` and
``plots/``. Its state is one of:

- ``new``: nothing there yet (or an empty folder);
- ``started``: a config but no checkpoint (stopped before the first save — safe to restart);
- ``partial``: a checkpoint of an unfinished run (continue with ``--resume``);
- ``finished``: training done, not evaluated;
- ``evaluated``: results.json written.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from firmad.config import read_run_config_file, save_config
from firmad.errors import CheckpointError, ConfigError, StorageError
from firmad.factory import build_model
from firmad.io import (
    check_checkpoint_meta,
    load_checkpoint,
    prefixed,
    recover_checkpoint,
    remove_temp_files,
    storage_advice,
)
from firmad.training import resolve_device
from firmad.training.model import weights_mismatch

CONFIG = "config.yaml"
CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
REPORT = "report.md"
PLOTS = "plots"
LOCK = ".lock"
CELL_LOG = "log.txt"  # a benchmark grid's record of one cell's process
CELL_ERROR = "error.json"
# `firmad attack` / the `attack` recipe key (firmad.robustness.audit)
ATTACK_FILES = ("attack.json", "attack.md", "attack_auroc.png", "attack_examples.png")
ATTACK_INCOMPLETE = "attack.incomplete"  # present while (or if cut while) the set is written
ATTACK_PARTIAL = ".attack-partial"  # finished attacks of an unfinished audit, to continue it
# Files a run writes under its lock (a firmad folder holding any of them also holds LOCK).
RUN_FILES = (CONFIG, f"{CHECKPOINT}.json", f"{CHECKPOINT}.safetensors", METRICS, RESULTS, REPORT)


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # --- paths --------------------------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def checkpoint_json(self) -> Path:
        return self.path / f"{CHECKPOINT}.json"

    @property
    def checkpoint_weights(self) -> Path:
        return self.path / f"{CHECKPOINT}.safetensors"

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def results(self) -> Path:
        return self.path / RESULTS

    @property
    def report(self) -> Path:
        return self.path / REPORT

    @property
    def plots(self) -> Path:
        return self.path / PLOTS

    # --- state --------------------------------------------------------------------------------

    def checkpoint_meta(self) -> dict | None:
        """The checkpoint's JSON description (checked like `firmad.io.load_checkpoint` checks
        it: an object with the entries every checkpoint has); None when there is none."""
        if not self.checkpoint_json.exists():
            return None
        try:
            meta = json.loads(self.checkpoint_json.read_bytes())
        except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError
            raise CheckpointError(
                f"{self.checkpoint_json} is damaged ({err}); the weights in "
                f"{self.checkpoint_weights.name} are not affected, but the training state is "
                "lost: restore the file from a copy, or start the run again in a new --out"
            ) from None
        return check_checkpoint_meta(meta, self.checkpoint_json)

    @property
    def state(self) -> str:
        """new, started (config written), partial (a checkpoint), finished (trained) or
        evaluated (results written)."""
        if self.results.exists():
            return "evaluated"
        meta = self.checkpoint_meta()
        if meta is not None:
            return "finished" if meta.get("finished") else "partial"
        if self.config.exists():
            return "started"
        return "new"

    def own_names(self) -> set[str]:
        return {
            CONFIG, f"{CHECKPOINT}.json", f"{CHECKPOINT}.safetensors", METRICS, RESULTS,
            REPORT, PLOTS, LOCK, CELL_LOG, CELL_ERROR, *ATTACK_FILES, ATTACK_INCOMPLETE,
            ATTACK_PARTIAL,
        }  # fmt: skip

    def foreign_files(self) -> list[str]:
        """Names in the folder that firmad did not write there: it is never written into.

        Besides names no run uses, that is a run's own file names (config.yaml, metrics.jsonl,
        ...) in a folder without the lock file, which a run creates before writing anything:
        the user's own config.yaml is not a run's."""
        if not self.path.exists():
            return []
        if not self.path.is_dir():
            return [self.path.name]
        names = sorted(p.name for p in self.path.iterdir() if not p.name.startswith("."))
        foreign = [n for n in names if n not in self.own_names()]
        if not foreign and not (self.path / LOCK).exists():
            foreign = [n for n in names if n in (*RUN_FILES, PLOTS)]
        return foreign

    def check_writable_new(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path} is a file, not a folder; choose another --out")
        foreign = self.foreign_files()
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise ConfigError(
                f"{self.path} holds files that no firmad run wrote there ({shown}); choose a new "
                "or empty --out so none of your files are overwritten"
            )

    # --- config and model ---------------------------------------------------------------------

    def read_config(self):
        if not self.config.exists():
            raise CheckpointError(f"{self.path} is not a firmad run directory (no {CONFIG})")
        return read_run_config_file(self.config)

    def write_config(self, cfg) -> None:
        save_config(cfg, self.config)

    def load_checkpoint(self):
        return load_checkpoint(self.path, CHECKPOINT)

    def load_model(self, cfg, device: str = "cpu"):
        """The model of the run's last checkpoint, in eval mode; the run must be finished."""
        tensors, meta = self.load_checkpoint()
        if not meta.get("finished"):
            raise CheckpointError(
                f"{self.path}: training stopped at epoch {meta.get('epoch')} of "
                f"{cfg.train.epochs}; finish it with `firmad train --resume --out {self.path}`"
            )
        model = build_model(cfg, meta.get("dataset", cfg.data.dataset))
        try:
            model.load_state_dict(prefixed(tensors, "model"))
        except RuntimeError as err:
            raise CheckpointError(
                f"{self.checkpoint_weights}: the weights do not fit {self.config} "
                f"({weights_mismatch(err)}); was the config edited? Restore it"
            ) from None
        return model.to(resolve_device(device)).eval()

    # --- one writer -----------------------------------------------------------------------------

    def lock(self) -> RunDir:
        """Hold an exclusive lock on the run directory until `unlock` (or the process ends).
        A second writer gets a ConfigError naming the holder."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path} is a file, not a run directory; choose another --out")
        for _ in range(10):  # a holder may remove the lock file while we open it: try again
            fd = self._open_lock()
            if self._take(fd):
                break
        else:
            raise ConfigError(f"{self.path}: its lock file keeps changing; try again")
        try:  # who holds it, for a second writer's message
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}".encode())
        except OSError:
            pass  # a full disk: the lock holds all the same
        self._lock_fd = fd
        self._tidy()
        return self

    def _open_lock(self) -> int:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            return os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            advice = storage_advice(err)
            if advice is None:
                raise
            raise StorageError(f"cannot write in {self.path}: {advice}") from None

    def _take(self, fd: int) -> bool:
        """Lock the open lock file; False (closed) when it is no longer the folder's lock
        file (its holder removed it meanwhile)."""
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"{self.path} is in use by {holder}; wait for it to finish or stop it, or "
                "choose another --out"
            ) from None
        try:
            current = os.stat(self.path / LOCK).st_ino
        except OSError:
            current = None
        if current != os.fstat(fd).st_ino:
            os.close(fd)
            return False
        return True

    def _tidy(self) -> None:
        """Under the lock: finish a checkpoint save cut between its renames by a crash, and
        remove the temporary files a killed process left behind."""
        try:
            recover_checkpoint(self.path, CHECKPOINT)
            remove_temp_files(self.path, RUN_FILES)
            if self.plots.is_dir():
                remove_temp_files(self.plots, ["*"])
        except OSError:
            pass  # a read-only run can still be read; writing it will say why it cannot

    def unlock(self, remove: bool = False) -> None:
        """Release the lock; ``remove``: delete the lock file first (a detector folder keeps
        none), while still holding it, so no other writer can hold it meanwhile."""
        if self._lock_fd is not None:
            if remove:
                with contextlib.suppress(OSError):
                    (self.path / LOCK).unlink()
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> RunDir:
        return self.lock()

    def __exit__(self, *exc) -> None:
        self.unlock()


def safe_component(name: str) -> str:
    """A run or cell name as one safe path component (no separators, no '..', no hidden)."""
    cleaned = "".join(c if c.isalnum() or c in "-_.+=" else "-" for c in str(name))
    cleaned = cleaned.strip(".") or "run"
    return cleaned
