"""Texture probes: how a detector's AUROC changes when shape or texture is taken away.

Conventions: images are float (N, C, H, W) in [0, 1] (uint8 is accepted by `texture_probe` and
converted per batch); anomaly scores are higher for more anomalous inputs; label 1 = anomaly.

- `fourier_filter` keeps only low or only high spatial frequencies (a circular mask in the 2-D
  Fourier spectrum). A detector that still separates the classes on high-passed images relies on
  fine texture; one that needs the low frequencies relies on coarse shape and colour.
- `patch_shuffle` permutes a grid of patches per image: global shape is destroyed, local
  texture is kept.
- `texture_probe` scores the test set under each transform and reports the metrics per setting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from firmad.errors import InputError
from firmad.metrics import evaluate_scores

__all__ = ["fourier_filter", "frequency_radius", "patch_shuffle", "texture_probe"]

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def _check_images(x: torch.Tensor, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{what} must be a tensor of images (N, C, H, W), got {shape}.")


def frequency_radius(h: int, w: int, device=None) -> torch.Tensor:
    """(H, W) distance of every entry of ``torch.fft.fft2``'s output from the zero frequency.

    Unit: cycles per image. The entry at (u, v) is the sinusoid with ``fy`` cycles over the
    image height and ``fx`` cycles over its width (``fy = fftfreq(H) * H``, the signed integer
    frequency, likewise ``fx``), and its radius is ``sqrt(fy**2 + fx**2)``. This is the centred
    circular mask of an ``fftshift``-ed spectrum, laid out in the unshifted order.
    """
    fy = torch.fft.fftfreq(h, d=1.0 / h, device=device)
    fx = torch.fft.fftfreq(w, d=1.0 / w, device=device)
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def fourier_filter(x: torch.Tensor, radius: float, kind: str = "low") -> torch.Tensor:
    """Keep the spatial frequencies inside (``kind="low"``) or outside (``"high"``) a circle.

    Args:
        x: float images (N, C, H, W) in [0, 1]; each channel is filtered on its own.
        radius: in cycles per image (see `frequency_radius`). Low-pass keeps frequencies with
            radius <= ``radius`` (``radius=0`` keeps only the mean); high-pass keeps those with
            radius > ``radius`` (``radius=0`` removes only the mean).
        kind: ``"low"`` or ``"high"``.

    Returns:
        Real images of the same shape and dtype, in [0, 1]. The mask is symmetric about the zero
        frequency, so the inverse transform is real up to rounding. Low-pass output is clamped
        (ringing can overshoot slightly). High-pass output has zero mean per channel; it is
        shifted by 0.5 (mid-grey) and clamped. A constant offset, not each image's own mean, is
        added back on purpose: the mean is the zero frequency, and restoring it would hand the
        detector a low-frequency cue (brightness, colour) the high-pass probe is meant to hide.
        The detector sees every high-passed image at mid-grey, inside its usual input range.
    """
    _check_images(x)
    if kind not in ("low", "high"):
        raise InputError(f"kind must be 'low' or 'high', got {kind!r}.")
    if not radius >= 0:
        raise InputError(f"radius must be >= 0 cycles per image, got {radius}.")
    if not x.is_floating_point():
        raise InputError(f"x must hold float images in [0, 1], got {x.dtype}; divide by 255.")
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()  # no half-precision FFT
    r = frequency_radius(x.shape[-2], x.shape[-1], device=x.device)
    keep = r <= radius if kind == "low" else r > radius
    spectrum = torch.fft.fft2(work) * keep.to(work.dtype)
    out = torch.fft.ifft2(spectrum).real
    if kind == "high":
        out = out + 0.5
    return out.clamp(0.0, 1.0).to(x.dtype)


def patch_shuffle(x: torch.Tensor, grid: int, gen: torch.Generator | None) -> torch.Tensor:
    """Cut each image into ``grid`` x ``grid`` patches and put them back in a random order.

    Every image gets its own permutation, drawn from ``gen`` (a CPU generator; ``None`` uses
    torch's global RNG), so the result is reproducible for a seeded generator. The identity is
    one of the ``(grid**2)!`` permutations and may be drawn; ``grid=1`` returns a copy of x.
    H and W must be multiples of ``grid``.
    """
    _check_images(x)
    n, c, h, w = x.shape
    if not isinstance(grid, int) or grid < 1:
        raise InputError(f"grid must be a positive integer, got {grid!r}.")
    if h % grid or w % grid:
        raise InputError(
            f"images of {h}x{w} pixels cannot be cut into a {grid}x{grid} grid of equal patches; "
            "pick a grid that divides both sides."
        )
    ph, pw = h // grid, w // grid
    # (N, C, g, ph, g, pw) -> (N, g*g, C, ph, pw): patches in row-major order
    patches = x.reshape(n, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(n, grid * grid, c, ph, pw)
    order = torch.rand(n, grid * grid, generator=gen).argsort(dim=1).to(x.device)
    patches = patches[torch.arange(n, device=x.device)[:, None], order]
    out = patches.reshape(n, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(n, c, h, w).contiguous()


def texture_probe(
    score_fn: ScoreFn,
    x: torch.Tensor,
    y,
    radii: Sequence[float] = (2, 4, 8, 16),
    grids: Sequence[int] = (2, 4),
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> list[dict]:
    """Detection metrics of ``score_fn`` on the test set under each texture / shape transform.

    Args:
        score_fn: float images in [0, 1] (on ``device``) -> anomaly scores (N,), higher = more
            anomalous. Called in batches under ``torch.no_grad()``; put a model in eval mode first.
        x: test images (N, C, H, W), uint8 or float in [0, 1].
        y: labels (N,), 1 = anomaly, 0 = normal; both must be present.
        radii: radii (cycles per image) for the low-pass and the high-pass rows.
        grids: grid sizes for the patch-shuffle rows.
        batch_size: images per call of ``score_fn``.
        seed: seeds the patch permutations (same seed, same permutations).
        device: where batches go before transform and scoring (default: x's device).

    Returns:
        One dict per setting, in this order: ``{"transform": "none", "param": None}``, then
        ``"low_pass"`` and ``"high_pass"`` for every radius, then ``"patch_shuffle"`` for every
        grid, each with the metrics of `firmad.metrics.evaluate_scores` (``auroc``,
        ``aupr_anomaly``, ``aupr_normal``, ``fpr95``).
    """
    _check_images(x)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}.")
    device = torch.device(device) if device is not None else x.device
    settings: list[tuple[str, float | int | None, Callable]] = [("none", None, lambda b: b)]
    for r in radii:
        settings.append(("low_pass", r, lambda b, r=r: fourier_filter(b, r, "low")))
    for r in radii:
        settings.append(("high_pass", r, lambda b, r=r: fourier_filter(b, r, "high")))
    gen = torch.Generator().manual_seed(seed)
    for g in grids:
        settings.append(("patch_shuffle", g, lambda b, g=g: patch_shuffle(b, g, gen)))

    rows = []
    for name, param, transform in settings:
        scores = []
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                batch = x[start : start + batch_size].to(device)
                batch = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
                scores.append(torch.as_tensor(score_fn(transform(batch))).reshape(-1).cpu())
        rows.append({"transform": name, "param": param, **evaluate_scores(y, torch.cat(scores))})
    return rows
