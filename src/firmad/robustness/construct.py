"""Constructed datasets after Ilyas et al. 2019 ("Adversarial examples are not bugs, they are
features"), adapted to one-class training sets.

For every training image x, start from another image z0 (an image of another class, as Ilyas
et al. did, or a class-free one such as noise) and move z until its features point the way
x's do: minimise ``1 - cos(g(z), g(x))`` with Adam on ``z = sigmoid(w)``, where g is a feature
extractor (the encoder a cosine kNN scorer reads). With an adversarially trained g the result
keeps only the features a robust model uses (D_R); with a standard g it also carries the
non-robust ones (D_NR). The images are saved as an ``npz:`` dataset that
`firmad.data.load_dataset` reads, so a fresh detector can be trained on them and tested on the
original test set. `same_norm_noise` builds the controls of a perturbed set: random directions
of the same per-image size.

Conventions: images are float (N, C, H, W) in [0, 1] (uint8 is accepted and divided by 255);
labels are the inlier class ids (>= 0).
"""

from __future__ import annotations

import contextlib
import io
import math
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
    "near_starts",
    "invert_features",
    "pick_starts",
    "same_norm_noise",
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
    steps: int = 3000,
    lr: float = 0.05,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Find images z whose features point the way the targets' do, starting from other images.

    Minimises the cosine distance ``d(z) = 1 - cos(g(z), g(x))`` (features flattened per
    sample): the space of a cosine kNN scorer, which reads only the direction of a feature.
    The images are parametrised as ``z = sigmoid(w)``, so they stay inside (0, 1) without a
    clamp that would pin pixels to its edges; ``w`` follows Adam with a learning rate that
    decays from ``lr`` to 0 on a cosine schedule. Each sample's best iterate is kept (the start
    included); samples are independent (Adam's moments are per pixel).

    Args:
        feature_fn: float images in [0, 1] -> features (N, D) or (N, ...), e.g. an encoder. It
            must treat samples independently (BatchNorm in eval mode). An ``nn.Module`` is put in
            eval mode for the call and every submodule's training flag is restored afterwards;
            for other callables that is the caller's job. Gradients are taken with respect to
            the images only (``torch.autograd.grad``); no parameter ``.grad`` is touched.
        targets: images x (N, C, H, W) whose features are matched.
        starts: start images z0, same shape, on the device ``feature_fn`` expects. Pixels are
            moved inside [1/512, 1 - 1/512] first (the sigmoid never reaches 0 or 1), which
            rounds back to the same uint8 value.
        steps: Adam steps (>= 0).
        lr: the first learning rate of Adam on w (> 0).
        batch_size: samples optimised together.
        progress: called as ``progress(done, total)`` after each batch (samples done / total).

    Returns:
        ``(images, final, initial)``: the best iterates (float, N, C, H, W, in (0, 1)), their
        cosine distances ``d`` and those of the starts, both float (N,) on the CPU.
        Deterministic for a deterministic ``feature_fn``.
    """
    x_all, z_all = _check_inversion(targets, starts, steps, lr, batch_size)
    n = x_all.shape[0]
    images, final, initial = [], [], []
    with _eval_mode(feature_fn):
        for lo in range(0, n, batch_size):
            part = slice(lo, lo + batch_size)
            best, d_best, d0 = _invert_batch(feature_fn, x_all[part], z_all[part], steps, lr)
            images.append(best)
            final.append(d_best.cpu())
            initial.append(d0.cpu())
            if progress is not None:
                progress(min(lo + batch_size, n), n)
    return torch.cat(images), torch.cat(final), torch.cat(initial)


@contextlib.contextmanager
def _eval_mode(feature_fn: FeatureFn):
    """An ``nn.Module`` in eval mode for the block; every submodule's own flag restored after
    (a wrapper in training mode may hold an encoder in eval mode, and restoring only the
    wrapper's flag would switch the encoder's BatchNorm to training)."""
    module = feature_fn if isinstance(feature_fn, nn.Module) else None
    modes = [(m, m.training) for m in module.modules()] if module is not None else []
    if module is not None:
        module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _check_inversion(targets, starts, steps, lr, batch_size):
    """The targets and starts as float tensors of one shape; the settings in range."""
    x_all = _as_float(targets, "targets")
    z_all = _as_float(starts, "starts")
    if x_all.shape != z_all.shape:
        raise InputError(
            f"targets {tuple(x_all.shape)} and starts {tuple(z_all.shape)} must have the same "
            "shape: one start image per target."
        )
    if steps < 0 or batch_size < 1 or not lr > 0:
        raise InputError(
            f"need steps >= 0, batch_size >= 1 and lr > 0; got {steps}, {batch_size}, {lr}."
        )
    return x_all, z_all


def _direction(feature_fn: FeatureFn, x: torch.Tensor) -> torch.Tensor:
    """Unit feature vectors (N, D) of images x."""
    return nn.functional.normalize(feature_fn(x).reshape(x.shape[0], -1), dim=1)


def _invert_batch(feature_fn, x, z0, steps: int, lr: float):
    """One batch of `invert_features`: best iterates, their distances, initial distances."""
    with torch.no_grad():
        gx = _direction(feature_fn, x)
    edge = 1.0 / 512
    w = torch.logit(z0.clamp(edge, 1.0 - edge)).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / max(1, steps)))
    )
    best = torch.sigmoid(w).detach()
    d_best = torch.full((x.shape[0],), float("inf"), device=x.device)
    d0 = None
    for step in range(steps + 1):
        last = step == steps  # the last iterate is only measured
        with torch.set_grad_enabled(not last):
            z = torch.sigmoid(w)
            d = 1.0 - (_direction(feature_fn, z) * gx).sum(dim=1)
            grad = None if last else torch.autograd.grad(d.sum(), w)[0]
        d = d.detach()
        if d0 is None:
            d0 = d.clone()
        better = d < d_best
        best[better] = z.detach()[better]
        d_best = torch.where(better, d, d_best)
        if grad is None:
            break
        w.grad = grad
        opt.step()
        schedule.step()
    return best, d_best, d0


def near_starts(targets: torch.Tensor, noise: float, gen: torch.Generator | None = None):
    """Starts for a reachability check: each target plus Gaussian pixel noise of standard
    deviation ``noise``, clamped to [0, 1]. An optimiser that cannot match a target's features
    from close by has failed (or has wrong settings); only one that can tells an unreachable
    target apart when it fails from far away."""
    x = _as_float(targets, "targets")
    return (x + noise * torch.randn(x.shape, generator=gen).to(x.device)).clamp(0.0, 1.0)


def same_norm_noise(
    source: torch.Tensor, norms: torch.Tensor, gen: torch.Generator | None = None
) -> torch.Tensor:
    """``source`` moved in a random direction by ``norms[i]`` (L2, pixel space [0, 1]) per
    image, inside [0, 1]: the control of a constructed set whose perturbations have these
    norms. The direction is Gaussian; its length is found by bisection so that the *clamped*
    image is ``norms[i]`` away (clamping shortens a step that leaves the pixel range, as it
    does on Fashion-MNIST's black backgrounds). A norm that no length reaches (the whole
    direction clamped away) gives the farthest image found."""
    x = _as_float(source, "source")
    norms = torch.as_tensor(norms, dtype=x.dtype).reshape(-1).to(x.device)
    if len(norms) != len(x) or bool((norms < 0).any()):
        raise InputError(f"need one norm >= 0 per image ({len(x)}), got {tuple(norms.shape)}.")
    u = torch.randn(x.shape, generator=gen).to(x.device)
    u = u / u.reshape(len(u), -1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    lo = torch.zeros_like(norms)
    hi = 4.0 * norms + 1e-6
    view = (-1, *([1] * (x.ndim - 1)))

    def moved(t: torch.Tensor) -> torch.Tensor:
        return (x + t.view(view) * u).clamp(0.0, 1.0)

    for _ in range(8):  # grow hi until it reaches the norm (or saturates)
        short = (moved(hi) - x).reshape(len(x), -1).norm(dim=1) < norms
        if not bool(short.any()):
            break
        hi = torch.where(short, hi * 4.0, hi)
    for _ in range(40):
        mid = (lo + hi) / 2
        short = (moved(mid) - x).reshape(len(x), -1).norm(dim=1) < norms
        lo, hi = torch.where(short, mid, lo), torch.where(short, hi, mid)
    return moved(hi)


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
    """Unit feature vectors (N, D) of uint8 or float images, in eval mode, without gradients."""
    with _eval_mode(feature_fn), torch.no_grad():
        parts = [_direction(feature_fn, _as_float(images[i : i + batch_size], "images"))
                 for i in range(0, len(images), batch_size)]  # fmt: skip
    return torch.cat(parts).double()


def feature_distance(
    feature_fn: FeatureFn, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Cosine distance ``1 - cos(g(images[i]), g(targets[i]))`` per pair (float, N), in eval
    mode: the space of `invert_features` and of a cosine kNN scorer."""
    a = _features(feature_fn, images, batch_size)
    b = _features(feature_fn, targets, batch_size)
    return (1.0 - (a * b).sum(dim=1)).float().cpu()


def nearest_other_distance(
    feature_fn: FeatureFn, pool: torch.Tensor, index: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """For each target ``pool[index[i]]``, the cosine distance to its nearest *other* image of
    ``pool`` (its own row is skipped by index, so batch-dependent rounding cannot make the
    target its own neighbour). The scale an inversion's residual is judged against: a residual
    below it means the inversion is closer to its target than any other normal image is."""
    index = torch.as_tensor(index).reshape(-1).long()
    fp = _features(feature_fn, pool, batch_size)
    d = 1.0 - fp[index] @ fp.T
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
    # an exact share (36 of 40 is 0.9, which a float32 mean rounds to 0.89999998 < 0.9)
    below = int((final < nearest).sum()) / max(len(final), 1)
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
