"""Robustness audits: attack a detector at several ε and write the evidence.

`audit(det, data, spec, hooks, out_dir=...)` runs the sweep (`firmad.robustness.evaluate`) on
a fitted `OneClassDetector` and labelled test images (`AuditData`) with an `AuditSpec`, and
writes the set of files: ``attack.json`` (every setting, the subset, intervals, verdicts,
decisions at the detector's threshold, the detector with its size and cost), ``attack.md``,
``attack_auroc.png`` and ``attack_examples.png`` (`firmad.robustness.plots`). With
``hooks.resume`` each finished attack, and the finished batches of the attack in progress, are
kept in ``.attack-partial/`` of the output folder (`firmad.robustness.resume`) until the four
files are written; the files are written as a set, ``attack.incomplete`` marking a set being
written. Run and detector folders: `firmad.robustness.folders`.

Threat model (``input_space``): "model" attacks the test images as the evaluation scores them
(resized to the detector's input size, uint8), "native" at their own size.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from firmad.errors import ConfigError, InputError
from firmad.io import atomic_write_json, atomic_write_text
from firmad.robustness.base import score, score_fn_of
from firmad.robustness.evaluate import SweepHooks, sweep
from firmad.robustness.gradient import run_attack, surrogates_of
from firmad.robustness.markdown import AUROC_PNG, EXAMPLES_PNG, attack_markdown
from firmad.robustness.plots import plot_attack_auroc, plot_attack_examples
from firmad.robustness.resume import PartialAttacks, digest_tensors
from firmad.robustness.spec import AttackSpec, AuditSpec
from firmad.robustness.square import run_square
from firmad.robustness.targets import ImageTarget, NearestTarget, TargetStart, TwoLogitCE
from firmad.run import ATTACK_FILES
from firmad.run import ATTACK_INCOMPLETE as INCOMPLETE
from firmad.run import ATTACK_PARTIAL as PARTIAL

__all__ = [
    "ATTACK_FILES",
    "AuditData",
    "AuditHooks",
    "PartialAttacks",
    "attack_files_complete",
    "attack_markdown",
    "audit",
    "check_writable",
    "describe_detector",
    "offered_surrogates",
    "plot_attack_auroc",
    "plot_attack_examples",
    "test_images",
    "threat_model",
    "write_attack_files",
]

ATTACK_JSON = "attack.json"
ATTACK_MD = "attack.md"
NO_THRESHOLD = (
    "the detector has no decision threshold (a run directory has none; `firmad fit` sets "
    "one), so no flipped decisions are counted: AUROC only"
)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditData:
    """What an audit attacks: images ``x`` in [0, 1] (N, C, H, W) and labels ``y`` (1 =
    anomaly); ``normals``: normal images in the same input space for the per-image targets
    (e.g. the training normals); ``source``: where the detector came from; ``native_shape``:
    the test images' own size (for the threat model's words); ``transfer``: another detector
    and its name for the transfer check."""

    x: torch.Tensor
    y: Any
    normals: torch.Tensor | None = None
    source: str | Path | None = None
    native_shape: Sequence[int] | None = None
    transfer: tuple[Any, str] | None = None


@dataclass
class AuditHooks:
    """How an audit reports and keeps its work (results do not depend on these): progress,
    on_step and plan as in `SweepHooks`; ``note(message)`` hears what was reused or discarded
    (default: a logged warning); ``resume`` keeps finished work in ``.attack-partial/``."""

    progress: Callable[[int, int, str], None] | None = None
    on_step: Callable[[int, int], None] | None = None
    plan: Callable[[list[tuple[str, float]]], None] | None = None
    note: Callable[[str], None] | None = None
    resume: bool = False


def describe_detector(det, source: str | Path | None = None) -> dict[str, Any]:
    """What was attacked: method, backbone, scorer, input size, encoder parameters and FLOPs
    per image (`firmad.models.complexity`), adversarial training settings, recipe."""
    from firmad.models import complexity

    cfg = det.config_
    c, s = cfg.data.channels, cfg.data.size
    cost = complexity(det.model_.encoder, (c, s, s))
    params = det.scorer_.per_angle[0].get_params()
    plain = (bool, int, float, str, type(None))
    return {
        "source": None if source is None else str(source),
        "recipe": cfg.name,
        "method": cfg.method.name,
        "backbone": cfg.model.backbone,
        "width": cfg.model.width,
        "input": [c, s, s],
        "scorer": det.scorer_.name,
        "scorer_params": {k: v for k, v in params.items() if isinstance(v, plain)},
        "variant": det.scorer_.variant,
        "n_bank": det.n_bank_,
        "params": cost["params"],
        "flops": cost["flops"],
        "cost_note": "encoder only; FLOPs of one forward pass per image (2 per multiply-add)",
        "adversarial_training": cfg.adversarial.model_dump() if cfg.adversarial.enabled else None,
        "device": str(det.extractor_.device),
    }


def _weights_digest(det) -> str:
    """SHA-256 of the detector's weights and fitted scorer tensors: a rerun continues only
    attacks of the very same detector (a retrained run has other weights)."""
    h = hashlib.sha256()
    tensors = sorted(det.model_.state_dict().items())
    for i, scorer in enumerate(det.scorer_.per_angle):
        tensors += [(f"scorer.{i}.{k}", v) for k, v in sorted(scorer.fitted_state().items())]
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed and prove a file can be written there, before any work."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file, not a folder; choose another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise InputError(
            f"cannot write into {folder} ({exc.strerror or exc}); choose a writable --out"
        ) from None
    return folder


def attack_files_complete(folder: str | Path) -> bool:
    """Whether ``folder`` holds a whole set of attack files (no write was cut short)."""
    folder = Path(folder)
    return not (folder / INCOMPLETE).exists() and all(
        (folder / name).is_file() for name in ATTACK_FILES
    )


def threat_model(input_space: str, shape: Sequence[int], native: Sequence[int] | None) -> str:
    """Where the perturbation lives, in words, for attack.json and attack.md."""
    size = " x ".join(map(str, shape))
    if input_space == "native":
        return (
            f"the perturbation is added to the test images at their native size ({size}, "
            "uint8 / 255) before the detector resizes them, as a user would hand them over"
        )
    where = f" (native {' x '.join(map(str, native))})" if native else ""
    return (
        f"the perturbation is added to the test images after their resize to the detector's "
        f"input size ({size}, rounded to uint8, / 255){where}, the images the evaluation scores"
    )


TARGET_CANDIDATES = 2000  # normal images scored to pick the typical targets from


def offered_surrogates(
    det, targeted: bool, normals: torch.Tensor | None = None, typical: float = 0.1,
    start: bool = False,
):  # fmt: skip
    """The surrogates of an audit: the detector's own (``True``), plus with ``targeted`` one
    per-image target: an `ImageTarget` on ``normals`` (normal images in the attacked input
    space, e.g. the training normals; a seeded sample of at most TARGET_CANDIDATES; targets
    among the ``typical`` share with the lowest scores) and, with ``start``, its targeted
    start (`TargetStart`: the score's own gradient from the target); without normals a
    `NearestTarget` on the feature bank (kNN-type scorers)."""
    if not targeted:
        return True
    out = dict(det.surrogate_scores())
    features = functools.partial(_features, det)
    if normals is not None and len(normals):
        if len(normals) > TARGET_CANDIDATES:
            gen = torch.Generator().manual_seed(0)
            normals = normals[torch.randperm(len(normals), generator=gen)[:TARGET_CANDIDATES]]
        normals = normals.to(det.extractor_.device)
        out["image"] = ImageTarget(features, normals, score(det, normals, 256), typical)
        if start:
            out["start"] = TargetStart(out["image"], score_fn_of(det))
        return out
    bank = getattr(det.scorer_.per_angle[0], "bank_", None)
    if isinstance(bank, torch.Tensor) and bank.ndim == 2:
        out["nearest"] = NearestTarget(features, bank)
    return out


def _features(det, x: torch.Tensor) -> torch.Tensor:
    """The detector's (unrotated, uncropped) features of images in its input layout."""
    if det.input_layout_ == "NHWC":
        x = x.permute(0, 3, 1, 2)
    return det.extractor_(x.to(det.extractor_.device), angle=0)


def test_images(images: torch.Tensor, size: int, input_space: str = "model") -> torch.Tensor:
    """Test images in [0, 1]: at the detector's input size as its evaluation sees them (uint8
    after the resize), or at their native size (``input_space="native"``)."""
    from firmad.data.pool import prepare_images

    if input_space == "native":
        return images.float().div(255.0)
    return prepare_images(images, size).float().div_(255.0)


_test_images = test_images  # the name older scripts import
test_images.__test__ = False  # not a test for pytest


def audit(
    det, data: AuditData, spec: AuditSpec, hooks: AuditHooks | None = None, *,
    out_dir: str | Path,
) -> dict[str, Any]:  # fmt: skip
    """Robust AUROC of a fitted `OneClassDetector` on ``data`` with the settings of ``spec``;
    writes the attack files (a set: ``attack.incomplete`` marks one being written) into
    ``out_dir`` and returns the attack.json dict. ``hooks.resume``: the same call continues
    after an interruption, and says what it reused."""
    hooks = hooks or AuditHooks()
    note = hooks.note or log.warning
    x, y = data.x.to(det.extractor_.device), torch.as_tensor(data.y).reshape(-1)
    _check_l2_radius(x, spec.sweep.eps_list, spec.sweep.norm)
    out_dir, description = check_writable(out_dir), describe_detector(det, data.source)
    cache = (
        _resume_cache(out_dir, det, (x, y), spec, (description, data, note))
        if hooks.resume
        else None
    )
    surrogates = offered_surrogates(det, spec.targeted, data.normals, start=True)
    sweep_spec = replace(spec.sweep, surrogates=surrogates)
    transfer, transfer_name = data.transfer or (None, None)
    sweep_hooks = SweepHooks(hooks.progress, hooks.on_step, hooks.plan, cache, note)
    result = sweep(det, x, y, sweep_spec, sweep_hooks, transfer_from=transfer)
    _describe_result(result, description, list(x.shape[1:]), (spec, data.native_shape),
                     transfer_name)  # fmt: skip
    examples = _examples(det, x, y, result, spec, surrogates)
    write_attack_files(out_dir, result, examples)
    if cache is not None:
        cache.remove()
    return result


def _resume_cache(out_dir: Path, det, xy: tuple, spec: AuditSpec, context: tuple):
    """The store of finished attacks, kept to one set of settings, one detector (its weights)
    and one set of images (their digest). ``context``: (description, data, note)."""
    description, data, note = context
    x, y = xy
    settings = {
        **spec.settings(),
        "n_images": len(y),
        "transfer_from": data.transfer[1] if data.transfer else None,
        "detector": {k: v for k, v in description.items() if k != "device"},
        "weights": _weights_digest(det),
        "data": digest_tensors({"x": x.float(), "y": y.long()}),
    }
    max_bytes = 3 * x.numel() * 8 + (1 << 24)  # two image sets and more, in float64 at most
    return PartialAttacks.open(out_dir / PARTIAL, settings, note, max_bytes)


def _check_l2_radius(x: torch.Tensor, eps_list, norm) -> None:
    """An L2 radius beyond the diameter of the image cube is refused (any image is
    reachable)."""
    largest = math.sqrt(x[0].numel())
    if norm == "l2" and max(eps_list, default=0) > largest:
        raise ConfigError(
            f"L2 radius {max(eps_list):.4g} is larger than the diameter of the image cube "
            f"[0, 1]^{x[0].numel()} ({' x '.join(map(str, x.shape[1:]))}), sqrt(C*H*W) = "
            f"{largest:.4g}, beyond which every image is reachable; use radii up to that"
        )


def _describe_result(result, description, shape, space: tuple, transfer_name) -> None:
    """What an audit adds to the sweep's result: input space (``space``: the spec and the
    native shape), threat model, transfer source, the detector, the threshold's absence,
    versions and the file list."""
    st, (spec, native_shape) = result["settings"], space
    if st["norm"] == "linf":
        st["eps_255"] = [round(e * 255, 6) for e in st["eps_list"]]
    st["input_space"] = spec.input_space
    st["threat_model"] = threat_model(spec.input_space, shape, native_shape)
    st["input_shape"] = shape
    st["targeted"] = spec.targeted
    if transfer_name is not None:
        st["transfer_from"] = transfer_name
    result["detector"] = description
    if "threshold" not in result:
        result["threshold"], result["threshold_note"] = None, NO_THRESHOLD
    from firmad.versions import versions

    result["versions"] = versions()
    result["files"] = list(ATTACK_FILES)


def write_attack_files(out_dir: Path, result: dict[str, Any], examples) -> None:
    """The four files as one set: a marker first, attack.json (the index) last, then the marker
    goes; a reader that finds the marker (or a file missing) knows the set is not whole."""
    marker = out_dir / INCOMPLETE
    atomic_write_text(
        marker, "The attack files in this folder are being written or a write was cut short; "
        "run the same `firmad attack` command again.\n",
    )  # fmt: skip
    plot_attack_auroc(out_dir / AUROC_PNG, result)
    plot_attack_examples(out_dir / EXAMPLES_PNG, *examples, result)
    atomic_write_text(out_dir / ATTACK_MD, attack_markdown(result))
    atomic_write_json(out_dir / ATTACK_JSON, result)
    marker.unlink()


def _examples(det, x, y, result, spec: AuditSpec, surrogates=True):
    """The first ``n_examples`` normals and anomalies of the evaluated subset, attacked (both
    sides) at the largest ε with the sweep's settings: clean, adversarial, labels, scores."""
    st, n, sw = result["settings"], spec.n_examples, spec.sweep
    idx = result["subset"]["indices"]
    idx = torch.arange(len(y)) if idx is None else torch.as_tensor(idx)
    ys = y[idx]
    pick = torch.cat([idx[ys == 0][:n], idx[ys == 1][:n]])
    xe, ye = x[pick.to(x.device)], y[pick]
    eps = max(st["eps_list"])
    if sw.attack == "square":
        a = AttackSpec(eps, "linf", sw.steps, None, sw.restarts, "both", 1, True, sw.seed,
                       sw.batch_size)  # fmt: skip
        res = run_square(det, xe, ye, a)
    else:
        # the default step of the schedule, as in the sweep
        a = AttackSpec(eps, sw.norm, sw.steps, None, sw.restarts, "both", 1, True, sw.seed,
                       sw.batch_size, sw.schedule)  # fmt: skip
        sources = surrogates_of(det, surrogates)
        if sw.attack == "ensemble":
            sources["ce"] = TwoLogitCE(score_fn_of(det))
        res = run_attack(det, xe, ye, a, surrogates=sources)
    clean_scores = score(det, xe, sw.batch_size)
    return xe.cpu(), res.images.cpu(), ye.cpu(), clean_scores.cpu(), res.scores.cpu()
