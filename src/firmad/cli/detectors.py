"""`firmad fit`, `score`, `export` and `serve`: detectors of a folder of images."""

from __future__ import annotations

from pathlib import Path

import typer

from firmad.cli.common import (
    app,
    console,
    interruptible,
    out,
    say,
    state,
    warn,
)
from firmad.errors import FirmadError

# --- detectors: fit / score / export --------------------------------------------------------------


FIT_RECIPE_HELP = (
    "Recipe (default fmnist-cpu: FIRM, narrow ResNet-10, with fit's milder random crops, "
    "augment.scale=[0.6,1.0]; a recipe named here is trained as written)."
)
FIT_VARIANT_HELP = "plain/angled/ensemble (default: angled)."


@app.command(
    epilog="Examples:\n\n"
    "  firmad fit photos/good_parts --out det/\n\n"
    "  firmad fit photos/drones --out det/ --config fmnist-cpu --epochs 8 --scorer knn_cos:k=1"
    "\n\n  firmad fit photos/good_parts --out det/ --target-fpr 0.01 --seed 1 --device cuda"
)
def fit(
    folder: Path = typer.Argument(..., help="A folder of normal images (searched recursively)."),
    out_dir: Path = typer.Option(..., "--out", help="Detector directory to write (new or empty)."),
    config: str | None = typer.Option(None, "--config", "-c", help=FIT_RECIPE_HELP),
    set_: list[str] = typer.Option([], "--set", help="Override a key: section.key=value."),
    scorer: str | None = typer.Option(
        None, "--scorer", help="Scorer spec, e.g. knn_cos:k=5 (default: maha_rotation)."
    ),
    variant: str | None = typer.Option(None, "--variant", help=FIT_VARIANT_HELP),
    holdout: str = typer.Option(
        "auto",
        "--holdout",
        help="Share of the images kept out of training to set the threshold on; auto = "
        "max(10 %, 10 / target-fpr images), at most half.",
    ),
    target_fpr: float = typer.Option(
        0.05,
        "--target-fpr",
        help="At most this share of the held-out normals scores above the threshold.",
    ),
    epochs: int | None = typer.Option(None, "--epochs", help="Training epochs (train.epochs)."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N."),
    seed: int | None = typer.Option(
        None, "--seed", help="Seeds training and the held-out draw (train.seed)."
    ),
    steps: int | None = typer.Option(
        None, "--steps", min=1, help="Train exactly this many steps (default 1500; or --epochs)."
    ),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="The quick training budget (the recipe's epochs: 400 steps on 1000 images).",
    ),
) -> None:
    """Train a detector on a folder of normal images; set its threshold on held-out ones."""
    with interruptible("nothing was saved; run the command again"):
        from firmad import fitting
        from firmad.outputs import check_folder

        check_folder(out_dir, "--out", inputs=[folder])  # its plots would be training images
        opts = fitting.FitOptions(
            config, list(set_), scorer or fitting.DEFAULT_SCORER,
            variant or fitting.DEFAULT_VARIANT, holdout, target_fpr,
            epochs, device, seed, verbose=not state["quiet"], steps=steps, quick=quick,
        )  # fmt: skip
        det = fitting.detector_for_fit(opts)
        fitting.check_fit_out(out_dir)
        report = fitting.fit_folder(det, folder, out_dir, say=say, warn=warn)
        say(f"Report: {report}")
    cal = det.calibration_
    ci = cal.get("interval")
    interval = f", 95 % interval {ci[0]:.3f}-{ci[1]:.3f}" if ci else ""
    rule = f"anomaly when p <= {target_fpr:g}, " if cal["source"] == "held-out" else ""
    say(
        f"Detector: {out_dir} ({rule}threshold {det.threshold_:.4g}: {cal['n_above']} of "
        f"{cal['n']} {cal['source']} images above it, FPR {cal['achieved_fpr']:.3f}{interval})"
    )


@app.command(
    epilog="Examples:\n\n  firmad score det/ new_images/ --out scores.csv\n\n"
    "  firmad score det/ a.png b.jpg --threshold 0.2\n\n"
    "  firmad score det/ incoming/ --out scores.csv --labels-from-folders  (incoming/CLASS/*.png)"
)
def score(
    detector: Path = typer.Argument(..., help="A detector directory (firmad fit)."),
    paths: list[Path] = typer.Argument(..., help="Image files or folders (recursive)."),
    out_csv: Path | None = typer.Option(None, "--out", help="CSV to write (default: stdout)."),
    threshold: float | None = typer.Option(None, "--threshold", help="Override the threshold."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    report_dir: Path | None = typer.Option(
        None, "--report", help="Folder for report.md and plots (default: beside --out CSV)."
    ),
    labels: Path | None = typer.Option(
        None,
        "--labels",
        help="A CSV with the columns path and label (a class per image): the report adds the "
        "share flagged per label (recall of each anomaly class).",
    ),
    labels_from_folders: bool = typer.Option(
        False,
        "--labels-from-folders",
        help="Each image's label is the name of its folder (incoming/trouser/a.png: trouser): "
        "the report adds the share flagged per label.",
    ),
) -> None:
    """Score images: a CSV with columns path, score (higher = more anomalous), anomaly (1
    above the threshold, 0 not, empty without a threshold) and p_value (the share of held-out
    normals at least as anomalous, +1 corrected). Every file not scored is listed with its
    reason; nothing is written when no image could be scored. Every output is checked before
    scoring starts."""
    from firmad.detector import OneClassDetector
    from firmad.inputs import scores_csv
    from firmad.io import atomic_write_text
    from firmad.persistence import check_threshold

    if threshold is not None:
        threshold = check_threshold(threshold, "--threshold")
    report_dir, table = _check_score_outputs(
        paths, out_csv, report_dir, labels, labels_from_folders
    )
    det = OneClassDetector.load(detector)
    thr = threshold if threshold is not None else getattr(det, "threshold_", None)
    names, scores, skipped = _score_with_progress(det, paths, batch_size)
    for f, why in skipped:
        warn(f"skipped {f}: {why}")
    if not names:
        raise FirmadError(
            "no image could be scored; check the paths and files above"
            + (f" ({out_csv} was left as it was)" if out_csv is not None else "")
        )
    text = scores_csv(names, scores, thr, getattr(det, "heldout_scores_", None))
    if out_csv is not None:
        atomic_write_text(out_csv, text)  # only now: a failed run changes nothing
    else:
        print(text, end="")
    if report_dir is not None:
        use_labels = table is not None or labels_from_folders
        _score_report(det, names, scores, skipped, report_dir, thr, table, use_labels)
    warn(
        f"{len(names)} scored, {len(skipped)} skipped"
        + ("" if thr is not None else "; no threshold, so no decisions (use --threshold)")
        + (f"; written to {out_csv}" if out_csv else "")
    )


def _check_score_outputs(paths, out_csv, report_dir, labels, labels_from_folders):
    """Check every output of `score` (and read --labels) before scoring; returns the report
    folder (None: no report) and the labels table."""
    from firmad.outputs import check_file
    from firmad.persistence import check_output_file
    from firmad.report_detector import check_report_folder, read_labels

    if labels is not None and labels_from_folders:
        raise FirmadError("give either --labels or --labels-from-folders, not both")
    if out_csv is not None:
        check_file(out_csv, "--out", example="scores.csv")
        check_output_file(out_csv, "scores.csv")
    option = "--report"
    if report_dir is None and out_csv is not None:
        report_dir = out_csv.with_name(f"{out_csv.stem}-report")
        option = "the report folder beside --out (choose another with --report):"
    if report_dir is None and (labels is not None or labels_from_folders):
        raise FirmadError("the per-label table is in the report: give --out or --report too")
    if report_dir is not None:
        check_report_folder(report_dir, option=option, inputs=paths)
    return report_dir, (read_labels(labels) if labels is not None else None)


def _score_report(det, names, scores, skipped, report_dir, thr, table, use_labels) -> None:
    """The score report: scores vs held-out normals and threshold, p-values, per label, a
    gallery; a failure here leaves the written scores alone."""
    from firmad.inputs import decisions
    from firmad.report_detector import Scored, labels_for, write_score_report

    scored = Scored(
        names,
        [float(s) for s in scores],
        decisions(scores, thr),
        labels=labels_for(names, table) if use_labels else None,
        skipped=skipped,
    )
    try:
        warn(f"Report: {write_score_report(det, scored, report_dir, thr)}")
    except FirmadError as err:  # the scores are written; only the report is not
        warn(f"report not written: {err}")


def _score_with_progress(det, paths: list[Path], batch_size: int):
    """`score_paths` with a progress bar on stderr (none with --quiet)."""
    from rich.progress import Progress

    with Progress(console=console, disable=state["quiet"]) as progress:
        task = progress.add_task("score", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return det.score_paths(paths, batch_size, advance)


@app.command(epilog="Example:\n\n  firmad export det/ --format onnx --out det.onnx")
def export(
    detector: Path = typer.Argument(..., help="A detector directory (firmad fit)."),
    out_file: Path = typer.Option(..., "--out", help="File to write."),
    fmt: str = typer.Option("onnx", "--format", help="onnx"),
) -> None:
    """Export a detector as one graph: uint8 images in, anomaly scores out."""
    from firmad.detector import OneClassDetector
    from firmad.export import check_export_paths, export_onnx, sidecar_path
    from firmad.persistence import check_output_file

    if fmt != "onnx":
        raise FirmadError(f"--format {fmt!r} is not supported; use onnx")
    check_export_paths(out_file)
    check_output_file(out_file, "det.onnx")
    det = OneClassDetector.load(detector)
    export_onnx(det, out_file)
    c, h, w = det.input_shape_
    out.print(f"{out_file}: input images uint8 (N, {c}, {h}, {w}), output scores (N,)")
    out.print(f"{sidecar_path(out_file)}: how to feed it (examples/onnx_score.py)", highlight=False)


@app.command(
    epilog="Examples:\n\n  firmad serve det/\n\n"
    "  firmad serve det/ --port 8000 --report runs/fmnist-cpu/fashion-mnist-c0-firm-s0 "
    "--report scores-report"
)
def serve(
    detector: Path = typer.Argument(..., help="A detector directory (firmad fit)."),
    port: int = typer.Option(
        8765, "--port", min=0, max=65535, help="Port to listen on (0 picks a free one)."
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to listen on; the default keeps it on this computer."
    ),
    reports: list[Path] = typer.Option(
        [], "--report", help="A run, attack or score-report folder to browse too (repeatable)."
    ),
    open_browser: bool = typer.Option(False, "--open", help="Open the page in a web browser."),
) -> None:
    """A local web page: drop images to score them; browse the detector's and other reports."""
    from firmad.serve import serve as serve_page

    def say(message: str) -> None:
        console.print(message, highlight=False)

    serve_page(detector, host=host, port=port, reports=reports, open_browser=open_browser, say=say)
