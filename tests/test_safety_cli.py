"""The CLI's own polish: one-line command summaries, help for every option, a progress bar that
keeps its times in 80 columns and prints plain lines while it runs where output is a file."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from firmad.training import callbacks

ROOT = Path(__file__).resolve().parents[1]


def _help(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "80", "TERM": "dumb"}
    cmd = [sys.executable, "-m", "firmad", *args, "--help"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return proc.stdout


@pytest.mark.parametrize("group", [[], ["data"]])
def test_command_summaries_are_whole_in_80_columns(group):
    text = _help(*group)
    commands = text.split("Commands:")[1]
    assert "…" not in commands and "..." not in commands
    assert all(len(line) <= 80 for line in text.splitlines())


@pytest.mark.parametrize(
    ("command", "option"),
    [(["evaluate"], "--device"), (["train"], "--seed"), (["data", "list"], "--root")],
)
def test_every_option_has_help(command, option):
    text = _help(*command)
    line = next(line for line in text.splitlines() if line.strip().startswith(option))
    # "--seed <int>" alone would be an option without help
    assert re.search(rf"{option}\s+<\w+>\s+\S", line) or re.search(
        rf"{option}\s+\S+\s{{2,}}\S", line
    )


def _render(progress, width: int = 80) -> str:
    console = Console(width=width, record=True, force_terminal=True, color_system=None,
                      file=io.StringIO())  # fmt: skip
    console.print(progress.make_tasks_table(progress.tasks))
    return console.export_text()


@pytest.mark.parametrize("width", [60, 80, 120])
def test_the_training_bar_never_cuts_its_times(width):
    progress = callbacks.progress_bar()
    info = "epoch 12/2000 loss 3.123 lr 1.00e-02 1234 views/s " * 2
    progress.add_task("train", total=400000, completed=1230, info=info)
    text = _render(progress, width)
    assert re.search(r"\d:\d\d:\d\d -:--:--", text), text
    assert "1230/400000 steps" in text


def test_progress_in_a_file_is_plain_lines_while_it_runs(monkeypatch):
    monkeypatch.setattr(callbacks, "PLAIN_EVERY_S", 0.05)
    out = io.StringIO()
    from rich.progress import TextColumn

    progress = callbacks.live_progress(
        TextColumn("{task.description}"), console=Console(file=out), unit="steps"
    )
    task = progress.add_task("train", total=30, info="")
    seen = []
    with progress:
        for i in range(30):
            time.sleep(0.01)
            progress.update(task, completed=i + 1, info=f"epoch {i + 1}")
            seen.append(out.getvalue().count("\n"))
    lines = out.getvalue().splitlines()
    assert seen[-1] >= 2 and seen[5] >= 1  # lines appear during the run, not only at the end
    assert lines[-1].startswith("train: 30/30 steps,") and "epoch 30" in lines[-1]
    assert all("\x1b" not in line and "━" not in line for line in lines)


def test_quiet_and_verbose_work_after_the_sub_command(capsys):
    from firmad.cli import main
    from firmad.cli.common import global_flags_first, state

    assert global_flags_first(["score", "d", "a.png", "-q"]) == ["-q", "score", "d", "a.png"]
    assert global_flags_first(["fit", "x", "-v", "--out", "o"]) == ["-v", "fit", "x", "--out", "o"]
    assert global_flags_first(["score", "--", "-q"]) == ["score", "--", "-q"]  # a file named -q
    state["quiet"] = False
    assert main(["data", "list", "-q"]) == 0
    assert state["quiet"] is True
    state["quiet"] = False
