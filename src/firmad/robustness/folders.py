"""Audits of folders: a `firmad train` run directory (its own test split) or a `firmad fit`
detector directory (a test split named by the caller) — what `firmad attack` runs
(`audit_path`) — and the ``attack`` recipe key after a run's evaluation (`robustness_for_run`,
summarised for results.json by `robustness_summary`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmad.errors import CheckpointError, ConfigError, InputError
from firmad.methods import method_class
from firmad.outputs import check_folder
from firmad.robustness.audit import (
    ATTACK_JSON,
    AuditData,
    AuditHooks,
    attack_files_complete,
    audit,
    test_images,
)
from firmad.robustness.spec import AuditSpec
from firmad.run import ATTACK_FILES, ATTACK_INCOMPLETE, ATTACK_PARTIAL

__all__ = [
    "AuditTarget",
    "audit_path",
    "check_attack_folder",
    "default_out",
    "headline_scorer",
    "robustness_for_run",
    "robustness_summary",
]

_OURS = {*ATTACK_FILES, ATTACK_INCOMPLETE, ATTACK_PARTIAL}


def headline_scorer(cfg) -> str:
    """The scorer a run is summarised by: the method's own score (Deep SVDD distance,
    classifier logit) where it has one, else kNN-cosine with k = 5."""
    return "own" if method_class(cfg.method.name).own_scorer else "knn_cos:k=5"


@dataclass(frozen=True)
class AuditTarget:
    """What `audit_path` attacks: ``path``, a run directory or a detector directory; for a
    detector, ``data`` and ``normal_class`` (and ``root``) name a one-vs-rest test split; for a
    run, ``scorer`` (default: the headline scorer) and ``variant``; ``device``; and
    ``transfer_from``, another run or detector directory for the transfer check."""

    path: Path
    data: str | None = None
    normal_class: int | str | None = None
    root: str | Path | None = None
    scorer: str | None = None
    variant: str = "plain"
    device: str | None = None
    transfer_from: str | Path | None = None


def default_out(path: str | Path, suffix: str = ".attack") -> Path:
    """A folder next to ``path`` named after it: det/ -> det.attack/."""
    path = Path(path)
    path = path if path.name else path.resolve()
    return path.with_name(path.name + suffix)


def check_attack_folder(folder: str | Path, inputs: tuple = ()) -> Path:
    """``folder`` for a set of attack files: new, or holding nothing but an attack's files
    (attack files are never written among a user's images or other files), a folder that can
    be written (`firmad.outputs.check_folder`), and not inside any of ``inputs`` (the attacked
    folder, the data)."""
    folder = check_folder(folder, "--out", inputs=[i for i in inputs if i is not None])
    if folder.is_dir() and not folder.is_symlink():
        foreign = sorted(p.name for p in folder.iterdir() if not _is_ours(p.name))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise InputError(
                f"{folder} holds {len(foreign)} file(s) that are not an attack's ({shown}); "
                "the attack files would be written among them: choose a new or empty folder "
                "for --out"
            )
    return folder


def _is_ours(name: str) -> bool:
    """An attack's file, or the temporary file of one being written."""
    if name in _OURS or name.startswith(".write-test-"):
        return True
    return name.startswith(".") and name.endswith(".tmp") and name[1:].startswith(tuple(_OURS))


def audit_path(
    target: AuditTarget, spec: AuditSpec, hooks: AuditHooks | None = None,
    out_dir: str | Path | None = None,
) -> tuple[dict[str, Any], Path]:  # fmt: skip
    """`audit` of a run directory (its last checkpoint, the scorer fitted on its normal training
    images, its test split) or of a detector directory (with ``data`` and ``normal_class``
    naming a one-vs-rest test split). Files go to ``out_dir`` (default: beside the target,
    `default_out`), which must be new or hold only attack files. Returns (result, folder)."""
    from firmad.detector import META

    path = Path(target.path)
    is_run, is_det = (path / "config.yaml").is_file(), (path / META).is_file()
    if is_run and (target.data is not None or target.normal_class is not None):
        raise ConfigError(
            f"{path} is a run directory: it is attacked on its own test split; drop --data "
            "and --normal-class (they are for detector directories)"
        )
    if is_det and (target.data is None or target.normal_class is None):
        raise InputError(
            f"{path} is a detector directory, which holds no test set: name one with "
            "--data DATASET --normal-class C (e.g. --data fashion-mnist --normal-class 0)"
        )
    if is_det and (target.scorer is not None or target.variant != "plain"):
        raise ConfigError(
            "--scorer and --variant apply to run directories; a detector's scorer and "
            "variant were fixed by `firmad fit`"
        )
    if not (is_run or is_det):
        raise CheckpointError(
            f"{path} is neither a run directory (config.yaml, from `firmad train`) nor a "
            "detector directory (detector.json, from `firmad fit`)"
        )
    inputs = (path, target.root, target.transfer_from)
    folder = check_attack_folder(out_dir if out_dir is not None else default_out(path), inputs)
    transfer = None
    if target.transfer_from is not None:
        transfer = (_load_other(target.transfer_from, target.device), str(target.transfer_from))
    load = _audit_run if is_run else _audit_detector
    return load(path, target, (spec, hooks, transfer), folder), folder


def _load_other(path: str | Path, device: str | None) -> Any:
    """The detector of a run directory (headline scorer) or detector directory, for the
    transfer check."""
    from firmad.detector import META, OneClassDetector

    path = Path(path)
    if (path / "config.yaml").is_file():
        from firmad.run import RunDir

        cfg = RunDir(path).read_config()
        spec = headline_scorer(cfg)
        name, _, k = spec.partition(":k=")
        return OneClassDetector.from_run(path, scorer=name, k=int(k) if k else None, device=device)
    if (path / META).is_file():
        return OneClassDetector.load(path, device=device)
    raise CheckpointError(
        f"--transfer-from {path}: neither a run directory (config.yaml) nor a detector "
        "directory (detector.json)"
    )


def _audit_run(path: Path, target: AuditTarget, job: tuple, folder: Path) -> dict:
    """`audit_path` of a run directory; ``job``: (spec, hooks, transfer)."""
    from firmad.detector import OneClassDetector
    from firmad.factory import build_split
    from firmad.run import RunDir

    spec, hooks, transfer = job
    run = RunDir(path)
    cfg = run.read_config()
    if target.device is not None:
        train = cfg.train.model_copy(update={"device": target.device})
        cfg = cfg.model_copy(update={"train": train})
    with run:  # no training or evaluation writes into the run meanwhile
        split = build_split(cfg)
        model = run.load_model(cfg, device=cfg.train.device)
        det = OneClassDetector.from_model(
            model, cfg, scorer=target.scorer or headline_scorer(cfg), k=None,
            variant=target.variant,
        ).fit_bank(split.train_images)  # fmt: skip
        data = _audit_data(split, cfg.data.size, spec, path, transfer)
        return audit(det, data, spec, hooks, out_dir=folder)


def _audit_data(split, size: int, spec: AuditSpec, source, transfer) -> AuditData:
    """The test images and the training normals of a split, in the spec's input space."""
    space = spec.input_space
    return AuditData(
        test_images(split.test_images, size, space), split.test_labels,
        normals=test_images(split.train_images, size, space), source=source,
        native_shape=list(split.test_images.shape[1:]), transfer=transfer,
    )  # fmt: skip


def _audit_detector(path: Path, target: AuditTarget, job: tuple, folder: Path) -> dict:
    """`audit_path` of a detector directory on the test split ``target`` names."""
    from firmad.data import one_vs_rest
    from firmad.detector import OneClassDetector

    spec, hooks, transfer = job
    det = OneClassDetector.load(path, device=target.device)
    if det.input_layout_ == "NHWC":
        raise InputError(
            f"{path} was fitted on channels-last (N, H, W, C) arrays; attack it from Python "
            "with firmad.robustness.audit.audit on images in that layout"
        )
    split = one_vs_rest(
        target.data, target.normal_class, root=target.root, seed=det.config_.train.seed
    )
    data = _audit_data(split, det.config_.data.size, spec, path, transfer)
    return audit(det, data, spec, hooks, out_dir=folder)


def robustness_summary(result: dict[str, Any], cfg=None, step: int | None = None) -> dict:
    """The results.json entry of an attack: settings, the detector, per ε and target mode the
    AUROC with its interval, and whether the strength checks passed."""
    st = result["settings"]
    rows = []
    for r in result["rows"]:
        row = {"eps": r["eps"], "target": r["target"], "auroc": r["auroc"]}
        row.update(ci_low=r["ci_low"], ci_high=r["ci_high"])
        if st["norm"] == "linf":
            row["eps_255"] = round(r["eps"] * 255, 6)
        rows.append(row)
    d = result["detector"]
    return {
        "file": ATTACK_JSON,
        "checkpoint_step": step,
        "attack": cfg.attack.model_dump() if cfg is not None else None,
        "detector": {k: d[k] for k in ("scorer", "scorer_params", "variant", "params", "flops")},
        "norm": st["norm"],
        "steps": st["steps"],
        "restarts": st["restarts"],
        "schedule": st.get("schedule", "fixed"),
        "n": result["subset"]["n"],
        "passed": result["passed"],
        "verdicts": {v["name"]: v["passed"] for v in result["verdicts"]},
        "rows": rows,
    }


def attack_spec_of(cfg) -> AuditSpec:
    """The audit spec of a run's ``attack`` recipe section (seed: the run's; batch size: its
    evaluation's; subset None there means every image)."""
    a = cfg.attack
    return AuditSpec.preset(
        a.preset, eps_list=a.eps, norm=a.norm, steps=a.steps, restarts=a.restarts,
        schedule=a.schedule, attack=a.attack, targeted=a.targeted, targets_list=a.targets,
        subset=0 if a.subset is None else a.subset, checks=a.checks,
        square_check=a.square_check, seed=cfg.train.seed, batch_size=cfg.eval.batch_size,
    )  # fmt: skip


def robustness_for_run(run, cfg, model, split, step: int | None) -> dict | None:
    """The ``attack`` recipe key: None when it is off. Otherwise the robustness entry for
    results.json, reused from the run's previous results.json when the checkpoint and the
    attack settings are the same, else measured now on the run's headline detector (attack
    files written into the run directory)."""
    if not cfg.attack.enabled:
        return None
    if run.results.exists():
        try:
            old = json.loads(run.results.read_text()).get("robustness")
        except (OSError, json.JSONDecodeError):
            old = None
        if (
            isinstance(old, dict)
            and old.get("checkpoint_step") == step
            and old.get("attack") == cfg.attack.model_dump()
            and attack_files_complete(run.path)
        ):
            return old
    from firmad.detector import OneClassDetector

    spec = attack_spec_of(cfg)
    det = OneClassDetector.from_model(model.eval(), cfg, scorer=headline_scorer(cfg), k=None)
    det.fit_bank(split.train_images)
    data = _audit_data(split, cfg.data.size, spec, run.path, None)
    result = audit(det, data, spec, out_dir=run.path)
    return robustness_summary(result, cfg, step)
