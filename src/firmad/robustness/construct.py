"""Constructed datasets after Ilyas et al. 2019 ("Adversarial examples are not bugs, they are
features"), adapted to one-class training sets.

For every training image x, start from a different training image z0 and move z towards
``g(z) = g(x)`` by minimising ``||g(z) - g(x)||_2`` over ``z in [0, 1]^d``, where g is a feature
extractor (the encoder's penultimate layer). With an adversarially trained g the result keeps
only the features a robust model uses (D_R); with a standard g it also carries the non-robust ones
(D_NR). The images are saved as an ``npz:`` dataset that `firmad.data.load_dataset` reads, so a
fresh detector can be trained on them and tested on the original test set.

Conventions: images are float (N, C, H, W) in [0, 1] (uint8 is accepted and divided by 255);
labels are the inlier class ids (>= 0).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from firmad.errors import InputError
from firmad.io import atomic_write_bytes, atomic_write_json

__all__ = [
    "centre_perturbation",
    "feature_distance",
    "inversion_convergence",
    "nearest_other_distance",
    "reach_by_target",
    "invert_features",
    "pick_starts",
    "sample_grid_png",
    "save_constructed",
    "to_uint8",
]

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def _as_float(x: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{what} must be a tensor of images (N, C, H, W), got {shape}.")
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def pick_starts(n: int, gen: torch.Generator | None) -> torch.Tensor:
    """A random pairing ``starts[i] != i`` of n images: image i starts from image ``starts[i]``.

    The result is a permutation without fixed points (a derangement), drawn uniformly by
    rejection: random permutations are drawn from ``gen`` until one has no fixed point (on
    average e ~ 2.7 draws). Every image serves as the start of exactly one other image.
    """
    if n < 2:
        raise InputError(f"pick_starts needs at least 2 images to pair, got {n}.")
    identity = torch.arange(n)
    while True:
        perm = torch.randperm(n, generator=gen)
        if bool((perm != identity).all()):
            return perm


def invert_features(
    feature_fn: FeatureFn,
    targets: torch.Tensor,
    starts: torch.Tensor,
    steps: int = 1000,
    step_size: float = 0.1,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Find images z whose features match the targets', starting from other images.

    Minimises ``d(z) = ||g(z) - g(x)||_2`` (features flattened per sample) over ``z in [0, 1]^d``
    with normalised-gradient L2 steps ``z <- clamp(z - step_size * grad / ||grad||_2, 0, 1)``
    (one gradient norm per sample) and keeps each sample's best iterate, z0 included.

    Args:
        feature_fn: float images in [0, 1] -> features (N, D) or (N, ...), e.g. an encoder. It
            must treat samples independently (BatchNorm in eval mode). An ``nn.Module`` is put in
            eval mode for the call and every submodule's training flag is restored afterwards;
            for other callables that is the caller's job. Gradients are taken with respect to z
            only (``torch.autograd.grad``); no parameter ``.grad`` is touched.
        targets: images x (N, C, H, W) whose features are matched.
        starts: start images z0, same shape (e.g. ``targets[pick_starts(N, gen)]``), on the
            device ``feature_fn`` expects; batches stay on the inputs' device.
        steps: number of gradient steps (Ilyas et al.: 1000).
        step_size: L2 length of each step in pixel space [0, 1] (Ilyas et al.: 0.1).
        batch_size: samples optimised together.
        progress: called as ``progress(done, total)`` after each batch (samples done / total).

    Returns:
        ``(images, final, initial)``: the best iterates (float, N, C, H, W, in [0, 1]), their
        distances ``d`` and the distances of the starts, both float (N,) on the CPU.
        Deterministic for a deterministic ``feature_fn``.
    """
    x_all, z_all = _check_inversion(targets, starts, steps, step_size, batch_size)
    module = feature_fn if isinstance(feature_fn, nn.Module) else None
    # Every submodule's own flag: a wrapper in training mode may hold an encoder in eval mode,
    # and restoring only the wrapper's flag would switch the encoder's BatchNorm to training.
    modes = [(m, m.training) for m in module.modules()] if module is not None else []
    if module is not None:
        module.eval()
    n = x_all.shape[0]
    images, final, initial = [], [], []
    try:
        for lo in range(0, n, batch_size):
            part = slice(lo, lo + batch_size)
            best, d_best, d0 = _invert_batch(feature_fn, x_all[part], z_all[part], steps, step_size)
            images.append(best)
            final.append(d_best.cpu())
            initial.append(d0.cpu())
            if progress is not None:
                progress(min(lo + batch_size, n), n)
    finally:
        for m, training in modes:
            m.training = training
    return torch.cat(images), torch.cat(final), torch.cat(initial)


def _check_inversion(targets, starts, steps, step_size, batch_size):
    """The targets and starts as float tensors of one shape; the settings in range."""
    x_all = _as_float(targets, "targets")
    z_all = _as_float(starts, "starts")
    if x_all.shape != z_all.shape:
        raise InputError(
            f"targets {tuple(x_all.shape)} and starts {tuple(z_all.shape)} must have the same "
            "shape: one start image per target."
        )
    if steps < 0 or batch_size < 1 or not step_size > 0:
        raise InputError(
            f"need steps >= 0, batch_size >= 1 and step_size > 0; got {steps}, {batch_size}, "
            f"{step_size}."
        )
    return x_all, z_all


def _invert_batch(feature_fn, x, z0, steps: int, step_size: float):
    """One batch of `invert_features`: best iterates, their distances, initial distances."""
    with torch.no_grad():
        gx = feature_fn(x).reshape(x.shape[0], -1)
    z = z0.clone()
    best = z0.clone()
    d_best = torch.full((x.shape[0],), float("inf"), device=x.device)
    d0 = None
    for step in range(steps + 1):
        last = step == steps  # the last iterate is only measured
        with torch.set_grad_enabled(not last):
            z.requires_grad_(not last)
            sq = (feature_fn(z).reshape(z.shape[0], -1) - gx).pow(2).sum(dim=1)
            # d^2 has the same per-sample gradient direction as d, and no NaN at d = 0
            grad = None if last else torch.autograd.grad(sq.sum(), z)[0]
        z = z.detach()
        d = sq.detach().sqrt()
        if d0 is None:
            d0 = d.clone()
        better = d < d_best
        best[better] = z[better]
        d_best = torch.where(better, d, d_best)
        if grad is None:
            break
        norm = grad.reshape(grad.shape[0], -1).norm(dim=1).clamp_min(1e-12)
        z = (z - step_size * grad / norm.view(-1, 1, 1, 1)).clamp(0.0, 1.0)
    return best, d_best, d0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as they are; float images in [0, 1] -> round(255 * x), clamped to 0..255."""
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise InputError(f"images must be uint8 or float in [0, 1], got {images.dtype}.")
    return (images.detach().float() * 255.0).round().clamp(0, 255).to(torch.uint8)


def save_constructed(
    path: str | Path,
    images: torch.Tensor,
    labels,
    meta: Mapping,
    classes: Sequence[str] | None = None,
) -> tuple[Path, Path]:
    """Write a constructed dataset as ``path`` (npz) plus a JSON sidecar (``path`` with ``.json``).

    The npz holds ``images`` (uint8, N, C, H, W with C = 1 or 3), ``labels`` (int64, N) and,
    if given, ``classes`` (names); without train_/test_ keys, ``load_dataset("npz:PATH")``
    returns the same arrays for both splits. The sidecar holds ``meta`` (the construction
    settings) plus the number of images and their shape. Both files are written atomically,
    the npz first, so a sidecar marks a complete dataset. Float images are stored as
    ``round(255 * x)``. Returns ``(npz_path, json_path)``.
    """
    path = Path(path)
    if path.suffix == ".json":
        raise InputError(f"{path}: the dataset file must not end in .json (the sidecar does).")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"images must be (N, C, H, W) with C = 1 or 3, got {shape}.")
    pixels = to_uint8(images).cpu().numpy()
    y = torch.as_tensor(labels).reshape(-1).to(torch.int64).cpu().numpy()
    if len(y) != len(pixels):
        raise InputError(f"{len(pixels)} images but {len(y)} labels; give one label per image.")
    if len(y) and y.min() < 0:
        raise InputError("labels must be class ids >= 0 (the npz reader rejects negatives).")
    arrays = {"images": np.ascontiguousarray(pixels), "labels": y}
    if classes is not None:
        arrays["classes"] = np.asarray([str(c) for c in classes])
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
    sidecar = path.with_suffix(".json")
    info = {**dict(meta), "n_images": len(y), "image_shape": list(pixels.shape[1:])}
    atomic_write_json(sidecar, info)
    return path, sidecar


def centre_perturbation(delta: torch.Tensor) -> torch.Tensor:
    """Show a signed perturbation as an image: ``0.5 + 0.5 * delta / max|delta|`` per image.

    Zero maps to mid-grey; each image is amplified so that its largest change reaches 0 or 1.
    """
    delta = delta.detach().float()
    peak = delta.abs().reshape(delta.shape[0], -1).amax(dim=1).clamp_min(1e-12)
    return (0.5 + 0.5 * delta / peak.view(-1, 1, 1, 1)).clamp(0.0, 1.0)


def sample_grid_png(path: str | Path, rows: Mapping[str, torch.Tensor], n: int = 8) -> Path:
    """A PNG grid: one row per named set (label on the left), its first ``n`` images.

    Images are (M, C, H, W), uint8 or float in [0, 1]; grey for C = 1. Rows with fewer than n
    images leave blank cells. Written atomically with the usual file permissions.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise InputError("sample_grid_png needs at least one named row of images.")
    if n < 1:
        raise InputError(f"n must be >= 1, got {n}.")
    fig = Figure(figsize=(1.0 + 1.1 * n, 1.1 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), n, squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        shown = _as_float(images, f"rows[{name!r}]")[:n].detach().cpu().clamp(0.0, 1.0)
        for c in range(n):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < shown.shape[0]:
                img = shown[c].permute(1, 2, 0).numpy()
                if img.shape[2] == 1:
                    ax.imshow(
                        img[:, :, 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest"
                    )
                else:
                    ax.imshow(img, interpolation="nearest")
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def reach_by_target(scores: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Share of images a binary score reads as their target (score > 0: label 1), per target.

    Returns ``{"to_normal": share among target 0, "to_outlier": share among target 1,
    "all": share overall}``; a direction without images counts as reached (1.0).
    """
    read = (scores.reshape(-1) > 0).long().cpu()
    target = torch.as_tensor(target).reshape(-1).long().cpu()
    hit = (read == target).float()

    def share(mask: torch.Tensor) -> float:
        return float(hit[mask].mean()) if bool(mask.any()) else 1.0

    return {"to_normal": share(target == 0), "to_outlier": share(target == 1),
            "all": share(torch.ones_like(target, dtype=torch.bool))}  # fmt: skip


def _features(feature_fn: FeatureFn, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Flattened features (N, D) of uint8 or float images, in eval mode, without gradients."""
    module = feature_fn if isinstance(feature_fn, nn.Module) else None
    modes = [(m, m.training) for m in module.modules()] if module is not None else []
    if module is not None:
        module.eval()
    try:
        with torch.no_grad():
            parts = [feature_fn(_as_float(images[i : i + batch_size], "images"))
                     for i in range(0, len(images), batch_size)]  # fmt: skip
    finally:
        for m, training in modes:
            m.training = training
    return torch.cat([p.reshape(p.shape[0], -1) for p in parts]).double()


def feature_distance(
    feature_fn: FeatureFn, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """``||g(images[i]) - g(targets[i])||_2`` per pair (float, N), in eval mode."""
    a = _features(feature_fn, images, batch_size)
    b = _features(feature_fn, targets, batch_size)
    return (a - b).norm(dim=1).float().cpu()


def nearest_other_distance(
    feature_fn: FeatureFn, pool: torch.Tensor, index: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """For each target ``pool[index[i]]``, the feature distance to its nearest *other* image of
    ``pool`` (its own row is skipped by index, so batch-dependent rounding cannot make the
    target its own neighbour). The scale an inversion's residual is judged against: a residual
    below it means the inversion is closer to its target than any other normal image is."""
    index = torch.as_tensor(index).reshape(-1).long()
    fp = _features(feature_fn, pool, batch_size)
    d = torch.cdist(fp[index], fp)
    d[torch.arange(len(index)), index] = float("inf")
    return d.min(dim=1).values.float().cpu()


def inversion_convergence(
    final: torch.Tensor,
    initial: torch.Tensor,
    nearest: torch.Tensor,
    max_ratio: float = 0.1,
    min_share: float = 0.9,
) -> dict[str, float | bool]:
    """Has a feature inversion converged? Median final/initial residual ratio <= ``max_ratio``
    and the residual below the target's nearest-other-normal distance for >= ``min_share``."""
    ratio = final / initial.clamp_min(1e-12)
    below = float((final < nearest).float().mean())
    median = float(ratio.median())
    return {
        "median_ratio": median,
        "share_below_nearest": below,
        "residual_median": float(final.median()),
        "initial_median": float(initial.median()),
        "nearest_median": float(nearest.median()),
        "max_ratio": max_ratio,
        "min_share": min_share,
        "converged": bool(median <= max_ratio and below >= min_share),
    }
