"""One benchmark cell as a process: its own session, its output in a log, gone with its parent.

Standard library only, so a Ray worker that runs a cell starts in a moment (it imports neither
torch nor the grid's tables). `firmad.bench` decides what a cell runs and what its outcome means.

- Every cell runs in a session (process group) of its own: stopping a cell reaches the processes
  it started too, and a terminal's Ctrl-C reaches only the grid, which stops its cells with
  SIGINT -- they finish their step, save a checkpoint and exit.
- A cell dies with the process that started it, even when that one is killed with SIGKILL: on
  Linux `python -m firmad` sets the parent-death signal (SIGTERM, which the training loop turns
  into a checkpoint) when $FIRMAD_PARENT_PID is set (:func:`die_with_parent`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PARENT_ENV = "FIRMAD_PARENT_PID"
STOP_GRACE_S = 300.0  # a stopped cell's time to save its checkpoint before it is killed
# Exit statuses of a cell process that was stopped: the CLI's 130, or the signal itself.
STOPPED_CODES = frozenset({130, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL})


class CellProcesses:
    """The cell processes of one grid (or one Ray task), and its stop request."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def start(self, cmd: list[str], **kwargs) -> subprocess.Popen | None:
        """Start a cell process in its own session; None once a stop was requested."""
        with self._lock:
            if self.stopping.is_set():
                return None
            proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
            self._procs.add(proc)
            return proc

    def finished(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.discard(proc)

    def stop(self, sig: int = signal.SIGINT) -> None:
        """No new cell starts; every running cell's process group gets ``sig``."""
        with self._lock:
            self.stopping.set()
            procs = list(self._procs)
        for proc in procs:
            signal_group(proc, sig)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _wait(proc: subprocess.Popen, procs: CellProcesses) -> int:
    """The exit status of a cell process. Waits in short slices, so an exception raised in this
    thread (a Ray task's cancellation) arrives at once; it stops the cell before passing on."""
    try:
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
    except KeyboardInterrupt:
        procs.stopping.set()
        signal_group(proc, signal.SIGINT)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            signal_group(proc, signal.SIGKILL)
            proc.wait()
        raise


@contextlib.contextmanager
def _interruptible():
    """In the main thread (a Ray task), SIGINT raises KeyboardInterrupt while the cell runs --
    also where the process inherited SIGINT ignored -- so Ray's cancellation (which interrupts
    the main thread as SIGINT would) reaches the cell."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines()]
    except OSError:
        return "(no log)"
    return next((line for line in reversed(lines) if line), "(no message)")


def run_process(
    cmd: list[str],
    log_path: str | Path,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    procs: CellProcesses | None = None,
    forget: tuple[str | Path, ...] = (),
) -> dict[str, Any]:
    """Run a cell's command to its end; output (stdout and stderr) to ``log_path`` as it runs.

    Returns ``{"started", "returncode", "seconds", "stopped", "error"}``: ``stopped`` when the
    process was stopped on request (a stop of ``procs``, or KeyboardInterrupt in this thread --
    then the cell is stopped first); ``error`` is the log's last line after a failure. ``forget``:
    files to delete once the process started (the previous attempt's error record).
    """
    procs = procs or CellProcesses()
    if procs.stopping.is_set():
        return {"started": False, "returncode": None, "seconds": 0.0, "stopped": True}
    child_env = {**os.environ, **(env or {}), PARENT_ENV: str(os.getpid())}
    if cwd is not None and not os.path.isdir(cwd):
        cwd = None  # another node without the driver's folder
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = procs.start(
            cmd, env=child_env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if proc is None:
            return {"started": False, "returncode": None, "seconds": 0.0, "stopped": True}
        for path in forget:
            Path(path).unlink(missing_ok=True)
        try:
            with _interruptible():
                returncode = _wait(proc, procs)
            stopped = procs.stopping.is_set() and returncode in STOPPED_CODES
        except KeyboardInterrupt:
            returncode, stopped = proc.returncode, True
        finally:
            procs.finished(proc)
    failed = returncode != 0 and not stopped
    return {
        "started": True,
        "returncode": returncode,
        "seconds": time.perf_counter() - start,
        "stopped": stopped,
        "error": last_line(log_path) if failed else None,
    }


def die_with_parent() -> None:
    """In a cell process (``$FIRMAD_PARENT_PID`` set): end with the process that started it, and
    hear SIGINT / SIGTERM.

    Linux only (prctl PR_SET_PDEATHSIG): the kernel sends SIGTERM when the parent dies, however
    it dies. Elsewhere cells rely on their process group alone. The variable is removed, so the
    cell's own children do not inherit it. A blocked signal mask is inherited through exec, and
    Ray's workers block SIGINT: a cell unblocks SIGINT and SIGTERM, or it could not be stopped."""
    parent = os.environ.pop(PARENT_ENV, None)
    if not parent:
        return
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
