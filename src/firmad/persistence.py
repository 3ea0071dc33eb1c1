"""A detector folder on disk: ``weights.safetensors`` + ``detector.json``, written together.

Loading treats the folder as untrusted: only regular files are opened (never a device, pipe or
folder in their place), each under a size cap read from the open file; the JSON's nesting,
types and ranges are checked key by key; the weights must match their SHA-256, and the settings
(everything in ``detector.json``) theirs; every tensor must have its recorded name, shape and
dtype, be finite, and the fitted scorer must not be degenerate; the input shape, layout,
normalisation and scorer must agree with the stored config. Nothing is pickled, and a pickle is
never loaded.

The two checksums detect damage and edits by hand, not a forger who recomputes them: that is why
every value is also checked for what it can be.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from firmad.anomaly_model import AnomalyModel, is_degenerate
from firmad.config import config_from_dict
from firmad.detector_params import PARAMS, check_params
from firmad.engine import with_device
from firmad.errors import CheckpointError, ConfigError, DataError, InputError, StorageError
from firmad.factory import build_model
from firmad.inputs import read_regular_file
from firmad.io import atomic_write_files, json_default, prefixed, storage_advice, tensor_bytes
from firmad.run import RunDir
from firmad.scoring import VARIANTS, VariantScorer, bank_crops
from firmad.training import resolve_device
from firmad.versions import versions

FORMAT = "firmad-detector-2"
WEIGHTS = "weights.safetensors"
META = "detector.json"
LOCK = ".lock"  # the folder lock of a run directory (firmad.run.RunDir.lock)
MAX_META_BYTES = 16 * 2**20
MAX_WEIGHTS_BYTES = 4 * 2**30
MAX_SIDE = 4096  # pixels: an input side beyond this is not an image size firmad was fitted at
MAX_THRESHOLD = 1e15  # scores are O(1)..O(1e4); a larger threshold flags nothing, by mistake
_SETTINGS_KEY = "settings_sha256"
_FIX = "restore the folder from a copy, or fit the detector again"

_held: set[Path] = set()  # folders this process has locked (the lock is per process)


@contextlib.contextmanager
def folder_lock(directory: Path) -> Iterator[None]:
    """Hold a detector folder's lock (created if needed) for the block; a second process gets
    a ConfigError naming the holder. Re-entrant within this process. The lock file goes when
    the block ends: a finished detector folder holds its two files only."""
    key = Path(directory).absolute()
    if key in _held:
        yield
        return
    run = RunDir(directory).lock()
    _held.add(key)
    try:
        yield
    finally:
        _held.discard(key)
        run.unlock(remove=True)


# --- reading untrusted files --------------------------------------------------------------------


def read_file(path: Path, max_bytes: int) -> bytes:
    """A regular file's bytes under a size cap; anything else is a CheckpointError naming it."""
    try:
        return read_regular_file(path, max_bytes)
    except DataError as err:
        raise CheckpointError(f"{err}; {_FIX}") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror or err}); {_FIX}") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    return sha256_bytes(read_file(Path(path), MAX_WEIGHTS_BYTES))


_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def refuse_pickles(directory: Path) -> None:
    """A detector directory never holds a pickle (nor a torch.save zip); refuse one that does.
    Only regular files are opened (a pipe in the folder would block a plain open)."""
    for path in sorted(directory.iterdir()):
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue  # a broken link or unreadable entry: the files we need are checked later
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            head = os.read(fd, 4)
        except OSError as err:  # /proc/self/mem and the like: EIO
            raise CheckpointError(
                f"{path}: cannot be read ({err.strerror or err}); {_FIX}"
            ) from None
        finally:
            os.close(fd)
        if path.suffix in (".pkl", ".pickle", ".pt", ".pth", ".bin") or head.startswith(
            _PICKLE_MAGIC
        ):
            raise CheckpointError(
                f"{path} looks like a pickle; firmad never loads pickles (they can run code). "
                "Remove it, or re-create the detector with `firmad fit`/OneClassDetector.save"
            )


# --- the settings checksum ------------------------------------------------------------------------


def _canonical(meta: dict[str, Any]) -> bytes:
    body = {k: v for k, v in meta.items() if k != _SETTINGS_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def meta_bytes(meta: dict[str, Any]) -> bytes:
    """detector.json's bytes, with the checksum of everything else in it."""
    plain = json.loads(json.dumps(meta, default=json_default, allow_nan=False))
    plain[_SETTINGS_KEY] = sha256_bytes(_canonical(plain))
    return (json.dumps(plain, indent=2, allow_nan=False) + "\n").encode()


# --- checking detector.json -----------------------------------------------------------------------


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; {_FIX}")


def _number(value: Any, where: str, path: Path, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(path, f"{where} must be a number, got {value!r:.60}")
    try:
        x = float(value)
    except OverflowError:
        raise _fail(path, f"{where} is too large") from None
    if not math.isfinite(x) or (positive and x <= 0):
        raise _fail(path, f"{where} must be a finite{' positive' if positive else ''} number")
    return x


def _int(value: Any, where: str, path: Path, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _fail(path, f"{where} must be an integer in [{lo}, {hi}], got {value!r:.60}")
    return value


def _dict(meta: dict, key: str, path: Path, keys: tuple[str, ...] = ()) -> dict:
    value = meta.get(key)
    if not isinstance(value, dict):
        raise _fail(path, f"{key!r} must be an object, got {type(value).__name__}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise _fail(path, f"{key!r} lacks {missing}")
    return value


def check_threshold(value: Any, where: str = "threshold") -> float:
    """A threshold is a finite number of a sensible size (no NaN, bool, string, list)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{where} must be a number, got {value!r:.60}")
    try:
        x = float(value)
    except OverflowError:
        raise InputError(f"{where} is too large ({len(str(value))} digits)") from None
    if not math.isfinite(x) or abs(x) > MAX_THRESHOLD:
        raise InputError(f"{where} must be a finite number of at most {MAX_THRESHOLD:g}, got {x}")
    return x


def parse_meta(data: bytes, path: Path) -> dict[str, Any]:
    """detector.json parsed and checked: format, settings checksum, every section's type."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise _fail(path, "nested too deeply to be a detector description") from None
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError, too-long integers
        raise _fail(path, f"not valid JSON ({str(err)[:200]})") from None
    if not isinstance(meta, dict):
        raise _fail(path, "not a detector description (a JSON object)")
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: format {str(meta.get('format'))[:60]!r} is not {FORMAT!r}; this firmad "
            f"reads {FORMAT} only — re-create the detector with `firmad fit` (or .save)"
        )
    required = ("config", "params", "normalisation", "input", "scorer", "tensors", "weights_sha256")
    missing = [k for k in required if k not in meta]
    if missing:
        raise _fail(path, f"lacks {missing}")
    try:
        canonical = _canonical(meta)
    except ValueError:  # NaN / Infinity somewhere
        raise _fail(path, "holds a non-finite number (NaN or Infinity)") from None
    if meta.get(_SETTINGS_KEY) != sha256_bytes(canonical):
        raise _fail(
            path,
            "its settings do not match their checksum (the file was edited or damaged). To "
            "change the threshold, use `firmad score --threshold` or set threshold_ and save",
        )
    for key in ("config", "params"):
        _dict(meta, key, path)
    if not isinstance(meta["weights_sha256"], str):
        raise _fail(path, "'weights_sha256' must be a string")
    return meta


def check_sections(meta: dict[str, Any], cfg, path: Path) -> dict[str, Any]:
    """Input, normalisation, scorer, threshold and calibration, cross-checked with the config;
    returns them parsed: layout, shape, mean, std, threshold, heldout scores."""
    inp = _dict(meta, "input", path, ("layout", "shape", "size"))
    if inp["size"] != cfg.data.size or isinstance(inp["size"], bool):
        raise _fail(
            path,
            f"input.size {str(inp['size'])[:20]} differs from config data.size {cfg.data.size}",
        )
    if inp["layout"] not in ("NCHW", "NHWC"):
        raise _fail(path, f"input.layout must be NCHW or NHWC, got {str(inp['layout'])[:40]!r}")
    shape = inp["shape"]
    if not isinstance(shape, list) or len(shape) != 3:
        raise _fail(path, f"input.shape must be [C, H, W], got {str(shape)[:60]!r}")
    c = _int(shape[0], "input.shape[0] (channels)", path, 1, 3)
    h, w = (_int(s, "input.shape (side)", path, 1, MAX_SIDE) for s in shape[1:])
    if c not in (1, 3) or (c == 3 and cfg.data.channels != 3):
        raise _fail(path, f"input.shape has {c} channels; the config reads {cfg.data.channels}")
    if not 1 <= cfg.data.size <= MAX_SIDE:
        raise _fail(path, f"config data.size {cfg.data.size} is not in [1, {MAX_SIDE}]")
    norm = _dict(meta, "normalisation", path, ("mean", "std"))
    stats = {}
    for key in ("mean", "std"):
        values = norm[key]
        if not isinstance(values, list) or len(values) not in (1, cfg.data.channels):
            sizes = " or ".join(map(str, sorted({1, cfg.data.channels})))
            raise _fail(path, f"normalisation.{key} must be a list of {sizes} numbers")
        stats[key] = [_number(v, f"normalisation.{key}", path, key == "std") for v in values]
    if len(stats["mean"]) != len(stats["std"]):
        raise _fail(path, "normalisation.mean and .std differ in length")
    s = _dict(meta, "scorer", path, ("name", "params", "variant", "n_crops", "n_bank"))
    if not isinstance(s["name"], str) or not isinstance(s["params"], dict):
        raise _fail(path, "scorer.name must be a string and scorer.params an object")
    if s["variant"] not in VARIANTS:
        raise _fail(path, f"scorer.variant must be one of {', '.join(VARIANTS)}")
    _int(s["n_crops"], "scorer.n_crops", path, 1, 1000)
    if s["n_crops"] != cfg.eval.n_crops:
        raise _fail(path, "scorer.n_crops differs from the config's eval.n_crops")
    _int(s["n_bank"], "scorer.n_bank", path, 1, 10**9)
    threshold = meta.get("threshold")
    if threshold is not None:
        try:
            threshold = check_threshold(threshold, "threshold")
        except InputError as err:
            raise _fail(path, str(err)) from None
    return {
        "layout": inp["layout"],
        "shape": (c, h, w),
        "mean": stats["mean"],
        "std": stats["std"],
        "threshold": threshold,
        "heldout": _heldout_scores(meta.get("calibration"), path),
    }


def _heldout_scores(calibration: Any, path: Path):
    import numpy as np

    if calibration is None:
        return None
    if not isinstance(calibration, dict):
        raise _fail(path, "calibration must be an object")
    scores = calibration.get("scores")
    if scores is None:
        return None
    if not isinstance(scores, list) or len(scores) > 10**7:
        raise _fail(path, "calibration.scores must be a list of numbers")
    return np.array([_number(v, "calibration.scores", path) for v in scores], dtype=np.float64)


def check_manifest(tensors: dict[str, torch.Tensor], manifest: Any, path: Path) -> None:
    """The tensors are exactly those recorded, with their dtype and shape, all finite."""
    if not isinstance(manifest, dict) or not all(
        isinstance(v, list) and len(v) == 2 and isinstance(v[1], list) for v in manifest.values()
    ):
        raise _fail(path, "the tensor manifest must map each name to a (dtype, shape) pair")
    missing = sorted(set(manifest) - set(tensors))
    extra = sorted(set(tensors) - set(manifest))
    if missing or extra:
        raise CheckpointError(
            f"{path}: tensors missing {missing[:5]} / unexpected {extra[:5]}; the file does not "
            "belong to this detector — save it again"
        )
    for key, (dtype, shape) in manifest.items():
        t = tensors[key]
        if str(t.dtype).removeprefix("torch.") != dtype or list(t.shape) != list(shape):
            raise CheckpointError(
                f"{path}: tensor {key!r} is {t.dtype} {tuple(t.shape)}, expected {str(dtype)[:20]} "
                f"{tuple(shape)[:8]}; the file was changed — save the detector again"
            )
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise _fail(path, f"tensor {key!r} holds NaN or infinite values")
    for key, t in tensors.items():
        if key.startswith("scorer.") and t.is_floating_point() and is_degenerate(t):
            raise _fail(
                path, f"the fitted scorer's {key!r} is degenerate (all zero, or its rows one point)"
            )


# --- fitted values -------------------------------------------------------------------------------


def check_fitted_values(scorer: VariantScorer, n_bank: int, cfg, path: Path) -> None:
    """What a fitted scorer's values can be: bandwidths (``gamma_``) finite and positive, a
    bank of ``n_bank`` images' features (per crop for the crop ensemble, or the k-means
    centroids); (nearly) one-point tensors are refused by `check_manifest`."""
    e = cfg.eval
    rows = n_bank * (bank_crops(scorer.variant, e.ensemble_bank, e.n_crops) or 1)
    if e.bank_centroids is not None:
        rows = min(rows, e.bank_centroids)
    for i, fitted in enumerate(scorer.per_angle):
        gamma = getattr(fitted, "gamma_", None)
        if gamma is not None and not (torch.isfinite(gamma).all() and (gamma > 0).all()):
            raise _fail(path, f"scorer {i}: gamma_ must be a finite positive number")
        bank = getattr(fitted, "bank_", None)
        if bank is not None and bank.shape[0] != rows:
            raise _fail(
                path,
                f"scorer.n_bank {n_bank} does not fit the bank's {bank.shape[0]} rows "
                f"(expected {rows})",
            )


# --- save / load ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredDetector:
    """A detector folder's contents, checked: the model, the estimator's parameters, the
    threshold, the calibration record and the held-out scores (None where absent)."""

    model: AnomalyModel
    params: dict[str, Any]
    threshold: float | None
    calibration: dict[str, Any] | None
    heldout: Any


def save_detector(
    directory: str | Path,
    model: AnomalyModel,
    params: dict[str, Any],
    threshold: float | None = None,
    calibration: dict | None = None,
) -> Path:
    """Write a fitted model with its estimator parameters, threshold and calibration record
    to a folder (created if needed): both files as one atomic unit, under the folder lock, so
    two writers never leave a mixed pair."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} exists and is not a directory; choose another path")
    if directory.is_dir() and not (directory / META).exists():
        names = [p.name for p in directory.iterdir() if p.name != LOCK]
        if names:
            raise InputError(
                f"{directory} is a non-empty folder that is not a firmad detector; choose a new "
                "or empty folder so nothing of yours is overwritten"
            )
    tensors = _tensors_of(model)
    weights = tensor_bytes(tensors)
    meta = _meta_of(model, params, threshold, calibration, tensors)
    try:
        meta_data = meta_bytes({**meta, "weights_sha256": sha256_bytes(weights)})
    except ValueError as err:
        raise InputError(f"the detector holds a non-finite number ({err}); fit it again") from None
    try:
        with folder_lock(directory):
            atomic_write_files([(directory / WEIGHTS, weights), (directory / META, meta_data)])
    except OSError as err:
        advice = storage_advice(err)
        if advice is None:
            raise
        raise StorageError(f"cannot write {directory}: {advice}") from None
    return directory


def _tensors_of(model: AnomalyModel) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v for k, v in model.network.state_dict().items()}
    for i, scorer in enumerate(model.scorer.per_angle):
        for key, value in scorer.fitted_state().items():
            tensors[f"scorer.{i}.{key}"] = value
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _meta_of(model: AnomalyModel, params, threshold, calibration, tensors) -> dict[str, Any]:
    norm = model.network.encoder.normalize
    vs = model.scorer
    return {
        "format": FORMAT,
        "versions": versions(),
        "params": {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
        "config": model.config.to_dict(),
        "normalisation": {"mean": norm.mean.flatten().tolist(), "std": norm.std.flatten().tolist()},
        "input": {  # size: what images are squashed to (data.size), kept twice on purpose
            "layout": model.input_layout,
            "shape": list(model.input_shape),
            "size": model.config.data.size,
        },
        "scorer": {
            "name": vs.name,
            "params": _jsonable(vs.per_angle[0].get_params()),
            "variant": vs.variant,
            "n_crops": vs.n_crops,
            "n_bank": model.n_bank,
        },
        "threshold": None if threshold is None else check_threshold(threshold, "threshold_"),
        "calibration": calibration,
        "tensors": {
            k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()
        },  # fmt: skip
    }


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in params.items()}


def load_detector(directory: str | Path, device: str | None = None) -> StoredDetector:
    """A detector folder written by `save_detector`, checked as the module says."""
    from safetensors.torch import load as load_tensors

    directory = Path(directory)
    meta_path, weights_path = directory / META, directory / WEIGHTS
    if not directory.is_dir() or not os.path.lexists(meta_path):
        raise CheckpointError(
            f"{directory} is not a firmad detector (no {META}); make one with "
            "`firmad fit` or OneClassDetector.save"
        )
    refuse_pickles(directory)
    meta = parse_meta(read_file(meta_path, MAX_META_BYTES), meta_path)
    if not os.path.lexists(weights_path):
        raise CheckpointError(f"{weights_path} is missing; save the detector again")
    data = read_file(weights_path, MAX_WEIGHTS_BYTES)
    if sha256_bytes(data) != meta["weights_sha256"]:
        raise CheckpointError(
            f"{weights_path} does not match the checksum in {META}: the file is damaged or "
            "was changed; restore it from a copy or save the detector again"
        )
    try:
        tensors = load_tensors(data)
    except Exception as err:  # safetensors raises several types for damaged files
        raise CheckpointError(
            f"{weights_path} is not a readable safetensors file ({err}); save it again"
        ) from None
    check_manifest(tensors, meta["tensors"], weights_path)
    try:
        cfg = config_from_dict(meta["config"])
    except (ConfigError, RecursionError, TypeError, ValueError) as err:
        raise _fail(meta_path, f"the stored config is invalid ({str(err)[:300]})") from None
    parts = check_sections(meta, cfg, meta_path)
    params = {k: v for k, v in meta["params"].items() if k in PARAMS}  # older keys: dropped
    try:
        check_params(params)
    except ConfigError as err:
        raise _fail(meta_path, f"the stored parameters are invalid ({err})") from None
    model = _restore(meta, tensors, with_device(cfg, device), parts, meta_path, weights_path)
    return StoredDetector(
        model=model,
        params=params,
        threshold=parts["threshold"],
        calibration=meta.get("calibration"),
        heldout=parts["heldout"],
    )


def _restore(meta, tensors, cfg, parts, meta_path: Path, weights_path: Path) -> AnomalyModel:
    """The model from checked parts."""
    try:
        network = build_model(cfg, cfg.data.dataset, normalisation=(parts["mean"], parts["std"]))
        network.load_state_dict(prefixed(tensors, "model"))
    except (RuntimeError, ValueError) as err:
        raise _fail(weights_path, f"weights do not fit the stored config ({err})") from None
    s = meta["scorer"]
    try:
        vs = VariantScorer(s["name"], s["params"], s["variant"], s["n_crops"])
        for i, scorer in enumerate(vs.per_angle):
            scorer.load_fitted(prefixed(tensors, f"scorer.{i}"), where=str(weights_path))
    except (ConfigError, InputError, TypeError, ValueError) as err:
        raise _fail(meta_path, f"the stored scorer is invalid ({err})") from None
    check_fitted_values(vs, s["n_bank"], cfg, weights_path)
    network = network.to(resolve_device(cfg.train.device))
    return AnomalyModel(network, cfg, vs, parts["shape"], parts["layout"], s["n_bank"])


def check_output_file(out_file: Path, example: str) -> None:
    """An output file (--out) is a new file or one of ours to replace: never a folder, never a
    detector's or a run's own file (that would destroy it)."""
    if out_file.is_dir():
        raise InputError(f"--out {out_file} is a folder; give a file name such as {example}")
    target = out_file.resolve()
    folder = target.parent
    own = {META, WEIGHTS, LOCK}
    if (folder / "config.yaml").is_file() or (folder / LOCK).exists():
        own |= RunDir(folder).own_names()
    ours = (folder / META).exists() or (folder / "config.yaml").is_file()
    if ours and target.name in own:
        raise InputError(
            f"--out {out_file} is a file of the detector or run in {folder}; writing it "
            f"would destroy that folder — choose another name, e.g. {example}"
        )
