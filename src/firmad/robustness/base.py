"""What every attack on an anomaly score shares: the detector protocol, the checks of images
and labels, eval mode, and batched scoring.

A *detector* is any object with ``score_tensor(x) -> Tensor (N,)`` or a plain callable
``f(x) -> Tensor (N,)``; ``x`` is float (N, C, H, W) in [0, 1], a higher score means more
anomalous. Labels: 1 = anomaly, 0 = normal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from firmad.errors import InputError

__all__ = [
    "BINDS",
    "ScoreFn",
    "batches",
    "call_scores",
    "check_images",
    "check_labels",
    "eval_mode",
    "score",
    "score_fn_of",
    "targeted_rows",
]

ScoreFn = Callable[[Tensor], Tensor]
BINDS = ("score_tensor", "bind")


def score_fn_of(detector) -> ScoreFn:
    """The score function of a detector: its ``score_tensor`` method, or the callable itself."""
    fn = getattr(detector, "score_tensor", None)
    if callable(fn):
        return fn
    if callable(detector):
        return detector
    raise InputError(
        f"{type(detector).__name__} is not a detector: pass an object with a "
        "score_tensor(x) -> Tensor (N,) method, or a callable f(x) -> Tensor (N,)."
    )


def _modules_of(obj, depth: int = 2) -> list[nn.Module]:
    """The nn.Modules an attack puts in eval mode. The protocol: a detector (or a bound
    method's owner) declares them with ``attack_modules()``; an nn.Module is its own. Objects
    that declare nothing (plain callables, wrappers) fall back to a walk over their attributes
    down to ``depth`` levels (e.g. wrapper.scorer.encoder)."""
    owner = getattr(obj, "__self__", None)  # a bound method such as detector.score_tensor
    if owner is not None and not isinstance(owner, type):
        return _modules_of(owner, depth)
    declared = getattr(obj, "attack_modules", None)
    if callable(declared):
        return list(declared())
    if isinstance(obj, nn.Module):
        return [obj]
    attrs = getattr(obj, "__dict__", None)
    if depth == 0 or not isinstance(attrs, dict):
        return []
    return [m for v in attrs.values() for m in _modules_of(v, depth - 1)]


@contextmanager
def eval_mode(*objects) -> Iterator[None]:
    """Put detectors in eval mode (their ``eval()`` and every reachable module); restore every
    module's train/eval flag afterwards, and a plain detector's own ``training`` flag through
    its ``train(mode)``."""
    modules: dict[int, tuple[nn.Module, bool]] = {}
    plain: dict[int, tuple[object, bool]] = {}
    for obj in objects:
        for top in _modules_of(obj):
            for m in top.modules():
                modules.setdefault(id(m), (m, m.training))
        flag = getattr(obj, "training", None)
        if not isinstance(obj, nn.Module) and isinstance(flag, bool) and hasattr(obj, "train"):
            plain.setdefault(id(obj), (obj, flag))
    try:
        for obj in objects:
            eval_fn = getattr(obj, "eval", None)
            if callable(eval_fn) and not isinstance(obj, type):
                eval_fn()
            for top in _modules_of(obj):
                top.eval()
        yield
    finally:
        for obj, was_training in plain.values():
            obj.train(was_training)
        for m, was_training in modules.values():
            m.training = was_training


def call_scores(fn: ScoreFn, x: Tensor) -> Tensor:
    """Call a score function and check that it returns one score per image."""
    s = fn(x)
    if not isinstance(s, Tensor):
        raise InputError(f"the score function returned {type(s).__name__}, not a Tensor (N,).")
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if s.shape != (x.shape[0],):
        raise InputError(
            f"the score function must return one score per image, shape ({x.shape[0]},), "
            f"got {tuple(s.shape)}."
        )
    return s


def batches(n: int, batch_size: int | None) -> list[slice]:
    size = n if batch_size is None else batch_size
    return [slice(i, min(i + size, n)) for i in range(0, n, max(size, 1))]


def score(detector, x: Tensor, batch_size: int | None = None) -> Tensor:
    """Anomaly scores (N,) of images in eval mode, without gradients, in batches."""
    x = check_images(x)
    fn = score_fn_of(detector)
    with eval_mode(detector), torch.no_grad():
        parts = [call_scores(fn, x[b]).detach() for b in batches(x.shape[0], batch_size)]
    return torch.cat(parts)


def check_images(x) -> Tensor:
    if not isinstance(x, Tensor):
        raise InputError(f"images must be a torch.Tensor (N, C, H, W), got {type(x).__name__}.")
    if not x.is_floating_point():
        raise InputError(
            f"images must be float in [0, 1], got dtype {x.dtype}; convert uint8 images "
            "with x.float() / 255."
        )
    if x.ndim < 2:
        raise InputError(f"images must have a batch dimension, (N, C, H, W); got {tuple(x.shape)}.")
    if x.shape[0] == 0:
        raise InputError("no images to score or attack (N = 0).")
    if not torch.isfinite(x).all():
        raise InputError("images contain NaN or infinite values.")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise InputError(
            f"images must lie in [0, 1] (found [{float(x.min()):.3g}, {float(x.max()):.3g}]); "
            "attacks work in pixel space, so undo any normalisation and put it inside the "
            "detector."
        )
    return x.detach()


def check_labels(y, n: int, device) -> Tensor:
    if not isinstance(y, Tensor):
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError) as exc:
            raise InputError(f"labels must be 0/1 numbers: {exc}") from exc
    y = y.reshape(-1) if y.ndim == 2 and 1 in y.shape else y
    if y.shape != (n,):
        raise InputError(f"labels must have shape ({n},) (one per image), got {tuple(y.shape)}.")
    if y.numel() and not ((y == 0) | (y == 1)).all():
        raise InputError("labels must be 0 (normal) or 1 (anomaly).")
    return y.to(device=device, dtype=torch.long)


def targeted_rows(y: Tensor, targets: str) -> tuple[Tensor, Tensor]:
    """The rows to attack and their direction: +1 normals (raise the score), -1 anomalies."""
    if targets == "both":
        idx = torch.arange(y.shape[0], device=y.device)
    else:
        idx = torch.nonzero(y == (0 if targets == "normal" else 1)).flatten()
    return idx, 1.0 - 2.0 * y[idx]
