"""Robustness audits: attack a detector at several ε and write the evidence.

- `audit`: `robust_auroc_sweep` on a detector and labelled test images, written to a folder as
  ``attack.json`` (every setting, the subset, intervals, verdicts, the detector with its size
  and cost), ``attack.md`` (a Markdown table), ``attack_auroc.png`` (AUROC vs ε, one curve per
  attacked group) and ``attack_examples.png`` (clean / adversarial / amplified perturbation).
- `audit_path`: the same for a `firmad train` run directory (its own test split) or a
  `firmad fit` detector directory (a test split named by the caller); what `firmad attack` runs.
  With ``resume`` each finished attack is kept in ``.attack-partial/`` of the output folder
  (tied to the settings and the detector's weights) until the four files are written; the
  files are written as a set, ``attack.incomplete`` marking a set being written.
- Threat model (``input_space``): "model" attacks the test images as the evaluation scores
  them (resized to the detector's input size, uint8), "native" at their own size.
- `robustness_for_run`: the ``attack`` recipe key. After a run's evaluation, the sweep on its
  headline detector, summarised for results.json (``robustness``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from firmad.errors import CheckpointError, ConfigError, InputError
from firmad.io import atomic_write_json, atomic_write_text
from firmad.methods import method_class
from firmad.perturb import attack_name
from firmad.robustness.attacks import (
    ImageTarget,
    NearestTarget,
    attack_detector,
    score,
    square_attack,
)
from firmad.robustness.evaluate import format_markdown, robust_auroc_sweep
from firmad.run import ATTACK_FILES
from firmad.run import ATTACK_INCOMPLETE as INCOMPLETE
from firmad.run import ATTACK_PARTIAL as PARTIAL

__all__ = [
    "ATTACK_FILES",
    "PartialAttacks",
    "attack_files_complete",
    "audit",
    "audit_path",
    "check_writable",
    "describe_detector",
    "headline_scorer",
    "offered_surrogates",
    "plot_attack_auroc",
    "plot_attack_examples",
    "robustness_for_run",
    "robustness_summary",
    "threat_model",
]

ATTACK_JSON = "attack.json"
ATTACK_MD = "attack.md"
AUROC_PNG = "attack_auroc.png"
EXAMPLES_PNG = "attack_examples.png"
_MODE_LABELS = {"normal": "normals attacked", "anomaly": "anomalies attacked", "both": "both"}


def headline_scorer(cfg) -> str:
    """The scorer a run is summarised by: the method's own score (Deep SVDD distance,
    classifier logit) where it has one, else kNN-cosine with k = 5."""
    return "own" if method_class(cfg.method.name).own_scorer else "knn_cos:k=5"


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


INPUT_SPACES = ("model", "native")


class PartialAttacks:
    """Finished attacks of one audit in ``folder`` (one JSON file per attack), tied to one set
    of settings: `open` refuses a folder holding attacks made with other settings."""

    def __init__(self, folder: Path, settings: dict[str, Any]) -> None:
        self.folder, self.settings = folder, settings

    @classmethod
    def open(cls, folder: Path, settings: dict[str, Any]) -> PartialAttacks:
        settings = json.loads(json.dumps(settings))  # as it reads back
        meta = folder / "settings.json"
        if meta.is_file():
            try:
                old = json.loads(meta.read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old != settings:
                diff = _differences(old, settings)
                raise ConfigError(
                    f"{folder.parent} holds an unfinished attack made with other settings "
                    f"({diff}); run it again with the same settings to continue it, or choose "
                    f"another --out (or delete {folder} to start over)"
                )
        else:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(meta, settings)
        return cls(folder, settings)

    def _path(self, key: str) -> Path:
        return self.folder / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".json")

    def get(self, key: str) -> dict | None:
        try:
            data = json.loads(self._path(key).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) and data.get("key") == key else None

    def put(self, key: str, value: dict) -> None:
        atomic_write_json(self._path(key), {"key": key, **value})

    def __len__(self) -> int:
        return sum(1 for p in self.folder.glob("*.json") if p.name != "settings.json")

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _differences(old, new: dict) -> str:
    if not isinstance(old, dict):
        return "unreadable settings"
    keys = sorted(set(old) | set(new))
    diff = [
        f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)
    ]
    return "; ".join(diff[:4]) + ("; ..." if len(diff) > 4 else "")


def _digest(det) -> str:
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
    det, targeted: bool, normals: torch.Tensor | None = None, typical: float = 0.1
):
    """The surrogates of an audit: the detector's own (``True``), plus with ``targeted`` one
    per-image target: an `ImageTarget` on ``normals`` (normal images in the attacked input
    space, e.g. the training normals; a seeded sample of at most TARGET_CANDIDATES; targets
    among the ``typical`` share with the lowest scores), or without them a `NearestTarget` on
    the feature bank (kNN-type scorers)."""
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


def audit(
    det,
    x: torch.Tensor,
    y,
    out_dir: str | Path,
    *,
    eps_list: Sequence[float],
    norm: str = "linf",
    steps: int = 100,
    restarts: int = 1,
    schedule: str = "fixed",
    targets: Sequence[str] = ("normal", "anomaly", "both"),
    subset: int | None = 1000,
    seed: int = 0,
    batch_size: int | None = 256,
    checks: bool = True,
    n_examples: int = 4,
    source: str | Path | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    resume: bool = False,
    targeted: bool = False,
    attack: str = "pgd",
    square_check: bool = False,
    transfer_from=None,
    transfer_name: str | None = None,
    input_space: str = "model",
    native_shape: Sequence[int] | None = None,
    check_eps: float | None = None,
    normal_images: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Robust AUROC of a fitted `OneClassDetector` on images ``x`` in [0, 1] (N, C, H, W),
    labels ``y`` (1 = anomaly); writes the attack files (a set: ``attack.incomplete`` marks one
    being written) into ``out_dir``, returns the attack.json dict. Arguments as in
    `robust_auroc_sweep` (surrogates on; ``targeted`` adds an `ImageTarget` on ``normal_images``,
    else a `NearestTarget`). ``resume``: the same call continues after an interruption."""
    x, y = x.to(det.extractor_.device), torch.as_tensor(y).reshape(-1)
    _check_l2_radius(x, eps_list, norm, input_space)
    out_dir, description = check_writable(out_dir), describe_detector(det, source)
    sweep = dict(
        eps_list=eps_list, norm=norm, steps=steps, restarts=restarts, schedule=schedule,
        targets_list=tuple(targets), seed=seed, batch_size=batch_size, subset=subset,
        checks=checks, attack=attack, square_check=square_check, check_eps=check_eps,
    )  # fmt: skip
    more = {"targeted": targeted, "input_space": input_space, "n_images": len(y)}
    fingerprint = {**sweep, **more, "transfer_from": transfer_name}
    cache = _resume_cache(out_dir, det, description, fingerprint) if resume else None
    surrogates = offered_surrogates(det, targeted, normal_images)
    result = robust_auroc_sweep(
        det, x, y, surrogates=surrogates, progress=progress,
        on_step=on_step, cache=cache, transfer_from=transfer_from, **sweep,
    )  # fmt: skip
    _describe_result(result, description, list(x.shape[1:]), (input_space, native_shape),
                     transfer_name)  # fmt: skip
    examples = _examples(det, x, y, result, n_examples, batch_size, surrogates)
    write_attack_files(out_dir, result, examples)
    if cache is not None:
        cache.remove()
    return result


def _resume_cache(out_dir: Path, det, description: dict, settings: dict):
    """The store of finished attacks, kept to one set of ``settings`` and one detector."""
    transfer = settings.pop("transfer_from")  # the fingerprint's last key, as before
    fingerprint = {
        **settings,
        "detector": {k: v for k, v in description.items() if k != "device"},
        "weights": _digest(det),
        "transfer_from": transfer,
    }
    return PartialAttacks.open(out_dir / PARTIAL, fingerprint)


def _check_l2_radius(x: torch.Tensor, eps_list, norm, input_space: str) -> None:
    """The input space is known; an L2 radius beyond the diameter of the image cube is refused
    (any image is reachable)."""
    _check_input(input_space)
    largest = math.sqrt(x[0].numel())
    radii = [e for e in eps_list if isinstance(e, int | float)]  # the sweep checks the rest
    if str(norm).lower() == "l2" and max(radii, default=0) > largest:
        raise ConfigError(
            f"L2 radius {max(radii):.4g} is larger than the diameter of the image cube "
            f"[0, 1]^{x[0].numel()} ({' x '.join(map(str, x.shape[1:]))}), sqrt(C*H*W) = "
            f"{largest:.4g}, beyond which every image is reachable; use radii up to that"
        )


def _describe_result(result, description, shape, space: tuple, transfer_name) -> None:
    """What an audit adds to the sweep's result: input space (``space``: the name and the
    native shape), threat model, transfer source, the detector, versions and the file list."""
    st, (input_space, native_shape) = result["settings"], space
    if st["norm"] == "linf":
        st["eps_255"] = [round(e * 255, 6) for e in st["eps_list"]]
    st["input_space"] = input_space
    st["threat_model"] = threat_model(input_space, shape, native_shape)
    st["input_shape"] = shape
    if transfer_name is not None:
        st["transfer_from"] = transfer_name
    result["detector"] = description
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


def _examples(det, x, y, result, n: int, batch_size, surrogates=True):
    """The first ``n`` normals and ``n`` anomalies of the evaluated subset, attacked (both
    sides) at the largest ε with the sweep's settings: clean, adversarial, labels, scores."""
    st = result["settings"]
    idx = result["subset"]["indices"]
    idx = torch.arange(len(y)) if idx is None else torch.as_tensor(idx)
    ys = y[idx]
    pick = torch.cat([idx[ys == 0][:n], idx[ys == 1][:n]])
    xe, ye = x[pick.to(x.device)], y[pick]
    eps = max(st["eps_list"])
    if st.get("attack") == "square":
        res = square_attack(
            det, xe, ye, eps=eps, queries=st["steps"], restarts=st["restarts"],
            targets="both", seed=st["seed"], batch_size=batch_size,
        )  # fmt: skip
    else:
        res = attack_detector(  # the default step of the schedule, as in the sweep
            det, xe, ye, eps=eps, norm=st["norm"], steps=st["steps"], restarts=st["restarts"],
            targets="both", seed=st["seed"], batch_size=batch_size,
            schedule=st.get("schedule", "fixed"), surrogates=surrogates,
        )  # fmt: skip
    from firmad.robustness.attacks import score

    clean_scores = score(det, xe, batch_size)
    return xe.cpu(), res.images.cpu(), ye.cpu(), clean_scores.cpu(), res.scores.cpu()


# --------------------------------------------------------------------------- reports


def _eps_axis(eps: float, norm: str) -> float:
    return eps * 255 if norm == "linf" else eps


def _human(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def attack_markdown(result: dict[str, Any]) -> str:
    """attack.md: the detector, the robust AUROC table with intervals, the checks, the plots."""
    d = result["detector"]
    adv = d.get("adversarial_training")
    trained = (
        f"adversarially trained ({adv['norm']} eps={adv['eps']:.4g}, {adv['steps']} step(s))"
        if adv
        else "standard training"
    )
    params = ", ".join(f"{k}={v}" for k, v in d["scorer_params"].items())
    lines = [
        "# Robustness audit",
        "",
        f"- Detector: {d['method']} / {d['backbone']} (width {d['width']}), {trained}",
        f"- Scorer: {d['scorer']}" + (f" ({params})" if params else "") + f", {d['variant']}",
        f"- Input: {' x '.join(map(str, d['input']))}; encoder {_human(d['params'])} parameters, "
        f"{_human(d['flops'])}FLOPs per image",
    ]
    if d.get("source"):
        lines.append(f"- Source: {d['source']}")
    st = result["settings"]
    if st.get("threat_model"):
        lines.append(f"- Threat model: {st['threat_model']}")
    if isinstance(st.get("surrogates"), list):
        lines.append("- Surrogate gradients: " + ", ".join(st["surrogates"]))
    lines += ["", format_markdown(result).rstrip(), ""]
    lines += [f"![AUROC vs eps]({AUROC_PNG})", "", f"![Examples]({EXAMPLES_PNG})", ""]
    return "\n".join(lines)


def plot_attack_auroc(path: str | Path, result: dict[str, Any]) -> Path:
    """AUROC % vs ε, one curve (with its 95 % band) per target mode, chance at 50."""
    from firmad.report import new_figure, save_png

    st = result["settings"]
    norm = st["norm"]
    fig = new_figure()
    ax = fig.add_subplot()
    for i, mode in enumerate(st["targets_list"]):
        rows = sorted((r for r in result["rows"] if r["target"] == mode), key=lambda r: r["eps"])
        e = [_eps_axis(r["eps"], norm) for r in rows]
        ax.plot(
            e, [100 * r["auroc"] for r in rows], marker="o", ms=4, color=f"C{i}",
            label=_MODE_LABELS.get(mode, mode),
        )  # fmt: skip
        lo, hi = [100 * r["ci_low"] for r in rows], [100 * r["ci_high"] for r in rows]
        ax.fill_between(e, lo, hi, color=f"C{i}", alpha=0.15, lw=0)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    unit = "ε (x 1/255, L∞)" if norm == "linf" else "ε (L2, pixel space [0, 1])"
    sub = result["subset"]
    ax.set(xlabel=unit, ylabel="AUROC %", ylim=(0, 100))
    ax.set_title(
        f"{attack_name(st)}-{st['steps']} on the anomaly score (n = {sub['n']})", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_attack_examples(
    path: str | Path, clean, adv, labels, clean_scores, adv_scores, result: dict[str, Any]
) -> Path:
    """A grid: columns are normals then anomalies (score clean -> attacked), rows are the clean
    image, the adversarial one and the perturbation amplified to the full grey range."""
    from firmad.report import new_figure, save_png
    from firmad.robustness.construct import centre_perturbation

    st = result["settings"]
    eps = max(st["eps_list"])
    n = max(len(clean), 1)
    fig = new_figure((1.0 + 1.3 * n, 4.6))
    axes = fig.subplots(3, n, squeeze=False)
    pert = centre_perturbation(adv - clean) if len(clean) else adv
    rows = (("clean", clean), ("adversarial", adv), ("perturbation\n(amplified)", pert))
    for r, (name, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(images):
                ax.set_axis_off()
                continue
            img = images[c].clamp(0, 1).permute(1, 2, 0).numpy()
            if img.shape[2] == 1:
                ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(img, interpolation="nearest")
            if r == 0:
                kind = "anomaly" if int(labels[c]) == 1 else "normal"
                ax.set_title(
                    f"{kind}\n{float(clean_scores[c]):.3g} -> {float(adv_scores[c]):.3g}",
                    fontsize=7,
                )
        axes[r][0].set_ylabel(name, fontsize=8)
    eps_text = f"{eps * 255:.3g}/255" if st["norm"] == "linf" else f"{eps:.3g}"
    fig.suptitle(f"{st['norm']} eps = {eps_text}; anomaly score clean -> attacked", fontsize=9)
    return save_png(fig, path)


# --------------------------------------------------------------------------- runs, detectors


def _test_images(images: torch.Tensor, size: int, input_space: str = "model") -> torch.Tensor:
    """Test images in [0, 1]: at the detector's input size as its evaluation sees them (uint8
    after the resize), or at their native size (``input_space="native"``)."""
    from firmad.data.pool import prepare_images

    if input_space == "native":
        return images.float().div(255.0)
    return prepare_images(images, size).float().div_(255.0)


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


def _check_input(input_space: str) -> None:
    if input_space not in INPUT_SPACES:
        raise ConfigError(f"input space must be one of {INPUT_SPACES}, got {input_space!r}")


def audit_path(
    target: str | Path,
    *,
    data: str | None = None,
    normal_class: int | str | None = None,
    root: str | Path | None = None,
    scorer: str | None = None,
    variant: str = "plain",
    device: str | None = None,
    out_dir: str | Path | None = None,
    input_space: str = "model",
    transfer_from: str | Path | None = None,
    **sweep,
) -> tuple[dict[str, Any], Path]:
    """`audit` of a run directory (its last checkpoint, the scorer fitted on its normal training
    images, its test split) or of a detector directory (with ``data`` and ``normal_class``
    naming a one-vs-rest test split). ``scorer`` (runs only) defaults to the headline scorer.
    Files go to ``out_dir`` or into the run / detector directory. ``input_space``: "model"
    attacks the test images resized to the detector's input size, "native" the images at
    their own size. ``transfer_from``: another run or detector directory whose white-box
    attack is transferred (the ``transfer`` check). Returns (result, folder)."""
    from firmad.detector import META

    _check_input(input_space)
    path = Path(target)
    if transfer_from is not None:
        other = _load_other(transfer_from, device)
        sweep.update(transfer_from=other, transfer_name=str(transfer_from))
    where = dict(device=device, out_dir=out_dir, input_space=input_space)
    if (path / "config.yaml").is_file():
        if data is not None or normal_class is not None:
            raise ConfigError(
                f"{path} is a run directory: it is attacked on its own test split; drop --data "
                "and --normal-class (they are for detector directories)"
            )
        return _audit_run(path, scorer, variant, where, sweep)
    if (path / META).is_file():
        if data is None or normal_class is None:
            raise InputError(
                f"{path} is a detector directory, which holds no test set: name one with "
                "--data DATASET --normal-class C (e.g. --data fashion-mnist --normal-class 0)"
            )
        if scorer is not None or variant != "plain":
            raise ConfigError(
                "--scorer and --variant apply to run directories; a detector's scorer and "
                "variant were fixed by `firmad fit`"
            )
        return _audit_detector(path, (data, normal_class, root), where, sweep)
    raise CheckpointError(
        f"{path} is neither a run directory (config.yaml, from `firmad train`) nor a detector "
        "directory (detector.json, from `firmad fit`)"
    )


def _audit_run(path: Path, scorer, variant: str, where: dict, sweep: dict):
    """`audit_path` of a run directory (``where``: device, out_dir, input_space)."""
    from firmad.detector import OneClassDetector
    from firmad.factory import build_split
    from firmad.run import RunDir

    device, out_dir, input_space = where["device"], where["out_dir"], where["input_space"]
    run = RunDir(path)
    cfg = run.read_config()
    if device is not None:
        cfg.train.device = device
    folder = Path(out_dir) if out_dir is not None else path
    with run:  # no training or evaluation writes into the run meanwhile
        split = build_split(cfg)
        model = run.load_model(cfg, device=cfg.train.device)
        det = OneClassDetector.from_model(
            model, cfg, scorer=scorer or headline_scorer(cfg), k=None, variant=variant
        ).fit_bank(split.train_images)
        x = _test_images(split.test_images, cfg.data.size, input_space)
        native = list(split.test_images.shape[1:])
        normals = _test_images(split.train_images, cfg.data.size, input_space)
        result = audit(
            det, x, split.test_labels, folder, source=path, input_space=input_space,
            native_shape=native, normal_images=normals, **sweep,
        )  # fmt: skip
    return result, folder


def _audit_detector(path: Path, test_set: tuple, where: dict, sweep: dict):
    """`audit_path` of a detector directory on ``test_set`` (data, normal class, root)."""
    from firmad.data import one_vs_rest
    from firmad.detector import OneClassDetector

    device, out_dir, input_space = where["device"], where["out_dir"], where["input_space"]
    data, normal_class, root = test_set
    det = OneClassDetector.load(path, device=device)
    split = one_vs_rest(data, normal_class, root=root, seed=det.config_.train.seed)
    x = _test_images(split.test_images, det.config_.data.size, input_space)
    if det.input_layout_ == "NHWC":
        raise InputError(
            f"{path} was fitted on channels-last (N, H, W, C) arrays; attack it from Python "
            "with firmad.robustness.audit.audit on images in that layout"
        )
    folder = Path(out_dir) if out_dir is not None else path
    native = list(split.test_images.shape[1:])
    normals = _test_images(split.train_images, det.config_.data.size, input_space)
    result = audit(
        det, x, split.test_labels, folder, source=path, input_space=input_space,
        native_shape=native, normal_images=normals, **sweep,
    )  # fmt: skip
    return result, folder


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
            # results written before the schedule key existed used the fixed schedule
            and {"schedule": "fixed", **(old.get("attack") or {})} == cfg.attack.model_dump()
            and attack_files_complete(run.path)
        ):
            return old
    from firmad.detector import OneClassDetector

    a = cfg.attack
    det = OneClassDetector.from_model(model.eval(), cfg, scorer=headline_scorer(cfg), k=None)
    det.fit_bank(split.train_images)
    x = _test_images(split.test_images, cfg.data.size)
    result = audit(
        det, x, split.test_labels, run.path, eps_list=a.eps, norm=a.norm, steps=a.steps,
        restarts=a.restarts, schedule=a.schedule, targets=a.targets, subset=a.subset,
        seed=cfg.train.seed,
        batch_size=cfg.eval.batch_size, checks=a.checks, source=run.path,
    )  # fmt: skip
    return robustness_summary(result, cfg, step)
