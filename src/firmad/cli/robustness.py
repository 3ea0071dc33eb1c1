"""`firmad features` and `firmad attack`: the robustness commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from firmad.cli.common import (
    app,
    clock,
    comma_list,
    console,
    interruptible,
    out,
    state,
)
from firmad.errors import FirmadError

# --- the robust / non-robust feature study -------------------------------------------------------


@app.command(
    epilog="Examples:\n\n  firmad features --config benchmarks/features-fmnist-cpu.yaml\n\n"
    "  firmad features --config STUDY.yaml --out runs/features/mine --workers 2"
)
def features(
    config: Path = typer.Option(..., "--config", "-c", help="Study YAML (see robustness.study)."),
    out_dir: Path | None = typer.Option(None, "--out", help="Study directory."),
    workers: int | None = typer.Option(
        None,
        "--workers",
        min=1,
        max=64,
        help="Cells (class x seed) run at once, each in its own process with the study's "
        "train.threads (default: the study's `workers`, 1: one after the other here).",
    ),
    executor: str | None = typer.Option(
        None,
        "--executor",
        help="local (this machine's processes) or ray (one Ray task a cell, on the cluster at "
        "the study's `address`); default: the study's `executor`, local.",
    ),
    cell: str | None = typer.Option(None, "--cell", hidden=True, help="Run this cell only."),
) -> None:
    """Are non-robust features useful for one class? Constructed sets, floors, a computed rule."""
    from firmad.bench.executors import EXECUTORS
    from firmad.errors import ConfigError

    if executor is not None and executor not in EXECUTORS:
        raise ConfigError(f"--executor: {executor!r} is not one of {', '.join(EXECUTORS)}")
    config = config.absolute()  # a file, even one named like a shipped recipe
    if out_dir is not None:
        from firmad.outputs import check_folder

        check_folder(out_dir, "--out")
    log = (lambda *a: None) if state["quiet"] else (lambda msg: console.print(msg, highlight=False))
    with interruptible("finished stages are kept; run the same command again to continue"):
        if cell is not None:  # one cell in a process of its own (the executors' job)
            from firmad.robustness.study import run_cell_process

            run_cell_process(config, out_dir or Path("."), cell)
            return
        from firmad.robustness.study import run_study, study_markdown

        result = run_study(config, out_dir, log=log, workers=workers, executor=executor)
    out.print(study_markdown(result), highlight=False)


# --- robustness ----------------------------------------------------------------------------------


# The options of `firmad attack` (Annotated, so that the command reads as its parameters).
_OPT_TARGET = Annotated[
    Path,
    typer.Argument(
        help="A run directory (firmad train) or a detector directory (firmad fit).",
    ),
]

_OPT_NORM = Annotated[
    str | None,
    typer.Option(
        "--norm",
        help="linf (the default) or l2.",
    ),
]

_OPT_EPS = Annotated[
    str | None,
    typer.Option(
        "--eps",
        help="Comma-separated radii. linf: in 1/255 units (8 means 8/255; default 0,2,4,8); "
        "l2: plain numbers in [0, 1] pixel space (default 0,0.25,0.5,1), at most sqrt(C*H*W). "
        "0 is the clean AUROC.",
    ),
]

_OPT_FULL = Annotated[
    bool,
    typer.Option(
        "--full",
        help="The strongest mode: the ensemble (per image the worst over every gradient "
        "source, restart, the targeted start and the CE-style member) of APGD-100 with 2 "
        "restarts, 1000 images, all strength checks with the Square check (hours on a CPU). "
        "Options given win.",
    ),
]

_OPT_STEPS = Annotated[
    int | None,
    typer.Option(
        "--steps",
        min=1,
        help="Steps per attack (default 10, --full 100; e.g. 1000 for "
        "PGD-1000). With --schedule apgd (the default) the step starts at 2 eps and is halved at "
        "APGD's checkpoints (22 %, 41 %, 57 %, 70 %... of the steps) where progress stalls; "
        "fixed: 2.5 eps / steps throughout. With --attack square: the number of queries.",
    ),
]

_OPT_RESTARTS = Annotated[
    int | None,
    typer.Option(
        "--restarts",
        min=1,
        help="Random restarts per attack (default 1, --full 2).",
    ),
]

_OPT_SCHEDULE = Annotated[
    str | None,
    typer.Option(
        "--schedule",
        help="Step sizes: apgd (the default; APGD: 2 eps, halved where the attack stalls, "
        "momentum) or fixed (2.5 eps / steps, classic PGD).",
    ),
]

_OPT_ATTACK_KIND = Annotated[
    str | None,
    typer.Option(
        "--attack",
        help="pgd (white-box: one walk per gradient source; the quick default), ensemble "
        "(pgd plus the CE-style member; the --full default) or square (score-based black-box "
        "Square attack, L-inf; --steps queries).",
    ),
]

_OPT_TARGETED = Annotated[
    bool | None,
    typer.Option(
        "--targeted/--no-targeted",
        help="Add the per-image targets (on by default): a typical normal training image "
        "for each image (turned by 90 degrees for normals), walked to in pixel space, and the "
        "targeted start (the score's own gradient from that image).",
    ),
]

_OPT_TARGETS = Annotated[
    str | None,
    typer.Option(
        "--targets",
        help="Attacked groups: some of normal, anomaly, both (default all three).",
    ),
]

_OPT_SUBSET = Annotated[
    int | None,
    typer.Option(
        "--subset",
        min=0,
        help="Stratified seeded test subset size (default 200, --full 1000); 0 = every test image.",
    ),
]

_OPT_SCORER = Annotated[
    str | None,
    typer.Option(
        "--scorer",
        help="Runs only: scorer spec (knn_cos:k=5, kde, own, ...); default the method's own "
        "score (dsvdd, binary) or knn_cos:k=5.",
    ),
]

_OPT_VARIANT = Annotated[
    str,
    typer.Option(
        "--variant",
        help="Runs only: plain, angled, ensemble.",
    ),
]

_OPT_INPUT_SPACE = Annotated[
    str | None,
    typer.Option(
        "--input",
        help="model (the default): attack the test images resized to the detector's "
        "input size (as its evaluation scores them); native: at their own size (e.g. 28 x 28), "
        "resized inside the detector.",
    ),
]

_OPT_TRANSFER_FROM = Annotated[
    Path | None,
    typer.Option(
        "--transfer-from",
        help="Another run or detector directory: its white-box attack "
        "is transferred to this detector (the transfer check).",
    ),
]

_OPT_SQUARE_CHECK = Annotated[
    bool | None,
    typer.Option(
        "--square-check/--no-square-check",
        help="Check that the black-box Square attack "
        "(1000+ queries) is not stronger (default: on with --full).",
    ),
]

_OPT_OUT_DIR = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Folder for the attack files (default: TARGET.attack beside the "
        "run or detector); a new folder, or one holding only attack files. Finished attacks "
        "and the finished batches of the attack in progress are kept there until the set is "
        "written, so the same command continues after Ctrl-C.",
    ),
]

_OPT_SEED = Annotated[
    int | None,
    typer.Option(
        "--seed",
        min=0,
        help="Seeds the subset, the attacks, the bootstrap (default 0).",
    ),
]

_OPT_DATA = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Detectors: the test dataset.",
    ),
]

_OPT_NORMAL_CLASS = Annotated[
    str | None,
    typer.Option(
        "--normal-class",
        help="Detectors: the normal class of --data (id or name).",
    ),
]

_OPT_ROOT = Annotated[
    Path | None,
    typer.Option(
        "--root",
        help="Folder holding --data.",
    ),
]

_OPT_DEVICE = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="auto, cpu, cuda, cuda:N.",
    ),
]

_OPT_BATCH_SIZE = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        min=1,
        help="Images per pass (default 256).",
    ),
]

_OPT_NO_CHECKS = Annotated[
    bool,
    typer.Option(
        "--no-checks",
        help="Skip the strength checks (about four more attacks).",
    ),
]


@app.command(
    epilog="Examples:\n\n"
    "  firmad attack runs/fmnist-cpu/fashion-mnist-c0-firm-s0   (quick: minutes on a CPU)\n\n"
    "  firmad attack RUN --full   (the strongest mode: the ensemble, APGD-100 x 2 restarts, "
    "1000 images, all checks)\n\n"
    "  firmad attack det/ --data fashion-mnist --normal-class 0 --norm l2 --eps 0,0.25,0.5\n\n"
    "  firmad attack RUN --steps 1000 --subset 500 --out audits/pgd1000\n\n"
    "  firmad attack RUN --attack square --steps 5000   (black-box, 5000 queries)\n\n"
    "  firmad attack RUN --transfer-from OTHER_RUN_OR_DETECTOR"
)
def attack(
    target: _OPT_TARGET,
    norm: _OPT_NORM = None,
    eps: _OPT_EPS = None,
    full: _OPT_FULL = False,
    steps: _OPT_STEPS = None,
    restarts: _OPT_RESTARTS = None,
    schedule: _OPT_SCHEDULE = None,
    attack_kind: _OPT_ATTACK_KIND = None,
    targeted: _OPT_TARGETED = None,
    targets: _OPT_TARGETS = None,
    subset: _OPT_SUBSET = None,
    scorer: _OPT_SCORER = None,
    variant: _OPT_VARIANT = "plain",
    input_space: _OPT_INPUT_SPACE = None,
    transfer_from: _OPT_TRANSFER_FROM = None,
    square_check: _OPT_SQUARE_CHECK = None,
    out_dir: _OPT_OUT_DIR = None,
    seed: _OPT_SEED = None,
    data: _OPT_DATA = None,
    normal_class: _OPT_NORMAL_CLASS = None,
    root: _OPT_ROOT = None,
    device: _OPT_DEVICE = None,
    batch_size: _OPT_BATCH_SIZE = None,
    no_checks: _OPT_NO_CHECKS = False,
) -> None:
    """Robust AUROC under attack on the anomaly score: attack.json, attack.md and two plots."""
    from firmad.robustness.audit import AuditHooks, attack_markdown
    from firmad.robustness.folders import AuditTarget, audit_path, default_out
    from firmad.robustness.spec import AuditSpec

    spec = AuditSpec.preset(
        "full" if full else "quick", norm=norm, eps_list=_parse_eps(eps, norm),
        steps=steps, restarts=restarts, schedule=schedule, attack=attack_kind,
        targeted=targeted, targets_list=comma_list(targets, "--targets", "groups"),
        subset=subset, seed=seed, batch_size=batch_size, checks=False if no_checks else None,
        square_check=square_check, input_space=input_space,
    )  # fmt: skip
    klass = None
    if normal_class is not None:
        klass = int(normal_class) if normal_class.lstrip("-").isdigit() else normal_class
    what = AuditTarget(target, data, klass, root, scorer, variant, device, transfer_from)
    folder = out_dir if out_dir is not None else default_out(target)
    show = AttackProgress(console, quiet=state["quiet"])
    hooks = AuditHooks(show.attack, show.step, show.plan, show.note, resume=True)
    kept = "finished attacks, and the finished batches of the attack in progress, are kept"
    with show, interruptible(f"{kept} in {folder}; run the same command again to continue"):
        result, folder = audit_path(what, spec, hooks, out_dir=folder)
    print(attack_markdown(result), end="")  # plain: a Markdown table must not be wrapped
    print(f"Attack files: {folder}/attack.json, attack.md, attack_auroc.png, attack_examples.png")


class AttackProgress:
    """Progress of `firmad attack`: a rich bar on a terminal, otherwise a plain line when each
    attack starts and at most every 30 s during it; the share done and the ETA weigh every
    attack by its cost (`firmad.robustness.progress.Timeline`). Notes (what a resumed run
    reused or discarded) are printed as they come."""

    def __init__(self, console: Console, quiet: bool) -> None:
        import time

        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from firmad.robustness.progress import Timeline

        self.clock, self.quiet, self.console = time.monotonic, quiet, console
        self.plain = not console.is_terminal
        self.bar = Progress(
            TextColumn("[bold]attack {task.fields[n]}"), BarColumn(bar_width=20),
            TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
            TextColumn("{task.fields[info]}"), console=console, disable=quiet or self.plain,
        )  # fmt: skip
        self.task = self.bar.add_task("attack", total=1.0, info="", n="", eta="-")
        self.timeline = Timeline([])
        self.done, self.total, self.what, self.start, self.last = 0, 1, "", self.clock(), 0.0

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def plan(self, plan: list[tuple[str, float]]) -> None:
        from firmad.robustness.progress import Timeline

        self.timeline = Timeline(plan)

    def note(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def _eta(self) -> str:
        eta = self.timeline.eta()
        return "-" if eta is None else clock(eta)

    def attack(self, done: int, total: int, what: str) -> None:
        self.done, self.total, self.what = done, max(total, 1), what
        self.timeline.begin(done)
        n = f"{min(done + 1, total)}/{total}"
        room = max(self.console.width - 58, 8)  # the bar and its times come first
        info = what if len(what) <= room else what[: room - 1] + "…"
        share = 1.0 if done >= total else self.timeline.share()
        self.bar.update(self.task, completed=share, info=info, n=n, eta=self._eta())
        if self.plain and not self.quiet:
            text = "done" if done >= total else f"{n} {what}"
            self._line(f"attack {text}", force=True)

    def step(self, done: int, total: int) -> None:
        self.timeline.step(done, total)
        self.bar.update(self.task, completed=self.timeline.share(), eta=self._eta())
        if self.plain and not self.quiet:
            self._line(f"attack {self.done + 1}/{self.total} {self.what}: step {done}/{total}")

    def _line(self, text: str, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self.last < 30:
            return
        self.last = now
        eta = self.timeline.eta()
        left = f", ETA {clock(eta)}" if eta is not None and self.done < self.total else ""
        self.console.print(f"{text} ({clock(now - self.start)} elapsed{left})", highlight=False)


def _parse_eps(text: str | None, norm: str | None) -> list[float] | None:
    """'0,2,4,8' -> radii in [0, 1] pixel space (L∞ values are in 1/255 units); the settings
    check the values (`firmad.perturb.spec`)."""
    if text is None:
        return None
    values = []
    for item in text.split(","):
        try:
            values.append(float(item))
        except ValueError:
            raise FirmadError(
                f"--eps {text!r}: {item.strip()!r} is not a number; write e.g. --eps 0,2,4,8 "
                "(L∞ in 1/255 units) or --norm l2 --eps 0,0.25,0.5"
            ) from None
    linf = (norm or "linf").lower() == "linf"
    return [v / 255 if linf else v for v in values]
