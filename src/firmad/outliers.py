"""Synthetic outliers ("negatives") made from normal images, batched with per-sample randomness.

Each transform is ``fn(x, gen) -> x'`` on a float batch (B, C, H, W) in [0, 1], on any device.
Random numbers come from the explicit ``torch.Generator`` (drawn on its device in one call per
batch, then moved to the images' device). Pixel-moving transforms (scramble, cutpaste) build one
per-sample source-index map and apply it with a single ``gather``; the scar uses one
``grid_sample``. Names can be chained with "+": "rot90+cutpaste" is one outlier kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from firmad.augment import color_jitter
from firmad.errors import ConfigError, InputError

__all__ = [
    "OUTLIERS",
    "OUTLIER_NAMES",
    "OutlierKind",
    "apply_kinds",
    "cutpaste",
    "cutpaste_scar",
    "hflip",
    "make_frozen_outliers",
    "mixup",
    "parse_outliers",
    "rot90",
    "rot180",
    "rot270",
    "scramble",
]

Transform = Callable[[Tensor, torch.Generator], Tensor]


def _uniform(gen: torch.Generator, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, then moved to ``device``."""
    return torch.rand(shape, generator=gen, device=gen.device).to(device, non_blocking=True)


def _randint(u: Tensor, n: Tensor | int) -> Tensor:
    """Integers uniform in [0, n) from uniforms ``u`` (float), as int64."""
    return torch.minimum(torch.floor(u * n), torch.as_tensor(n, device=u.device) - 1).long()


def _gather_pixels(x: Tensor, index: Tensor) -> Tensor:
    """out[b, c, p] = x[b, c, index[b, p]] over flattened pixels; index (B, H*W) int64."""
    B, C, H, W = x.shape
    flat = x.reshape(B, C, H * W)
    return flat.gather(2, index.unsqueeze(1).expand(B, C, H * W)).reshape(B, C, H, W)


def _check_batch(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise InputError(
            f"outlier '{name}' expects a float (B, C, H, W) batch in [0, 1], got "
            f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
        )


# ---------------------------------------------------------------------------------------------
# Deterministic geometric outliers
# ---------------------------------------------------------------------------------------------


def _rot(x: Tensor, k: int, name: str) -> Tensor:
    _check_batch(x, name)
    if k % 2 and x.shape[2] != x.shape[3]:
        raise InputError(
            f"outlier '{name}' needs square images to keep their shape, got "
            f"{x.shape[2]}x{x.shape[3]}; resize them first (firmad.augment.to_float(..., size=))"
        )
    return torch.rot90(x, k, dims=(2, 3))


def rot90(x: Tensor, gen: torch.Generator | None = None) -> Tensor:
    """Rotate by 90 degrees (counter-clockwise, torch.rot90 k=1). Square images only."""
    return _rot(x, 1, "rot90")


def rot180(x: Tensor, gen: torch.Generator | None = None) -> Tensor:
    """Rotate by 180 degrees."""
    return _rot(x, 2, "rot180")


def rot270(x: Tensor, gen: torch.Generator | None = None) -> Tensor:
    """Rotate by 270 degrees (torch.rot90 k=3). Square images only."""
    return _rot(x, 3, "rot270")


def hflip(x: Tensor, gen: torch.Generator | None = None) -> Tensor:
    """Mirror left-right."""
    _check_batch(x, "hflip")
    return torch.flip(x, dims=(3,))


# ---------------------------------------------------------------------------------------------
# Mixup
# ---------------------------------------------------------------------------------------------


def _beta_same(gen: torch.Generator, n: int, a: float, device: torch.device) -> Tensor:
    """Beta(a, a) samples (a <= 1) by Johnk's rejection method, vectorised and in log space.

    X = U^(1/a), Y = V^(1/a), accepted when X + Y <= 1; then X / (X + Y) ~ Beta(a, a).
    Acceptance is about 85 % for a = 0.4, so 16 candidates per sample almost always suffice;
    the rare rest is redrawn (deterministic given the generator).
    """
    out = torch.empty(n, device=device)
    todo = torch.arange(n, device=device)
    m = 16
    while todo.numel() > 0:
        u = _uniform(gen, (todo.numel(), 2, m), device)
        logs = torch.log1p(-u) / a  # log(1 - U) / a: finite, same law as log(U) / a
        ok = torch.logaddexp(logs[:, 0], logs[:, 1]) <= 0
        lam = torch.sigmoid(logs[:, 0] - logs[:, 1])
        first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)
        got = ok.any(dim=1)
        out[todo[got]] = lam.gather(1, first).squeeze(1)[got]
        todo = todo[~got]
    return out


def mixup(x: Tensor, gen: torch.Generator, alpha: float = 0.4) -> Tensor:
    """Blend each image with another image of the batch: lam * x_i + (1 - lam) * x_j,
    lam ~ Beta(alpha, alpha) per sample, j a random derangement of the batch (j != i if B > 1)."""
    _check_batch(x, "mixup")
    B = x.shape[0]
    lam = _beta_same(gen, B, alpha, x.device).to(x.dtype)
    # A random cycle through the batch: partner of order[k] is order[k + 1] (never itself).
    order = torch.randperm(B, generator=gen, device=gen.device).to(x.device)
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)
    return torch.lerp(x[partner], x, lam.view(B, 1, 1, 1))


# ---------------------------------------------------------------------------------------------
# Scramble
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _dihedral_maps(s: int, device: torch.device) -> Tensor:
    """(8, s*s) local source indices of an s x s cell under the 8 rotations/flips."""
    grid = torch.arange(s * s).view(s, s)
    maps = [torch.rot90(g, k, dims=(0, 1)) for g in (grid, grid.flip(1)) for k in range(4)]
    return torch.stack(maps).reshape(8, s * s).to(device)


# The 120 (first, last) cell pairs of a run of length >= 2 in a row of 16 cells.
_RUNS = torch.tensor([(i, j) for i in range(16) for j in range(i + 1, 16)])


def scramble(x: Tensor, gen: torch.Generator, shuffle_p: float = 0.5) -> Tensor:
    """Cut each image into a 4x4 grid of square cells; rotate/flip every cell at random (one of
    the 8 symmetries of the square, identity included); with probability ``shuffle_p`` shuffle
    a random contiguous run (raster order, length >= 2) of cells among itself.

    If H or W is not a multiple of 4 the top-left 4s x 4s region (s = min(H, W) // 4) is
    scrambled and the rest kept. Only pixels move: one gather with a per-sample index map.
    """
    _check_batch(x, "scramble")
    B, C, H, W = x.shape
    s = min(H, W) // 4
    if s == 0:
        raise InputError(f"outlier 'scramble' needs images of at least 4x4 pixels, got {H}x{W}")
    dev = x.device
    u = _uniform(gen, (B, 34), dev)
    sym = _randint(u[:, :16], 8)  # (B, 16) symmetry per output cell
    run = _RUNS.to(dev)[_randint(u[:, 32], len(_RUNS))]  # (B, 2)
    pos = torch.arange(16, device=dev).expand(B, 16)
    in_run = (pos >= run[:, :1]) & (pos <= run[:, 1:]) & (u[:, 33:34] < shuffle_p)
    # Sorting keys: cells outside the run keep their index, cells inside get a random key in
    # [first, last + 1), so argsort permutes the run among itself and fixes everything else.
    length = (run[:, 1:] - run[:, :1] + 1).to(u.dtype)
    keys = torch.where(in_run, run[:, :1] + u[:, 16:32] * length, pos.to(u.dtype))
    src_cell = torch.argsort(keys, dim=1)  # (B, 16) source cell of each output cell
    local = _dihedral_maps(s, dev)[sym]  # (B, 16, s*s) source pixel inside the source cell
    src_y = (src_cell // 4).unsqueeze(2) * s + local // s
    src_x = (src_cell % 4).unsqueeze(2) * s + local % s
    region = (src_y * W + src_x).view(B, 4, 4, s, s).permute(0, 1, 3, 2, 4).reshape(B, 4 * s, 4 * s)
    index = torch.arange(H * W, device=dev).view(1, H, W).repeat(B, 1, 1)
    index[:, : 4 * s, : 4 * s] = region
    return _gather_pixels(x, index.view(B, H * W))


# ---------------------------------------------------------------------------------------------
# CutPaste (Li et al. 2021)
# ---------------------------------------------------------------------------------------------


def cutpaste(
    x: Tensor,
    gen: torch.Generator,
    area: tuple[float, float] = (0.02, 0.15),
    aspect: tuple[float, float] = (0.3, 3.3),
) -> Tensor:
    """Copy a rectangle of ``area`` fraction of the image (aspect ratio log-uniform in
    ``aspect``) from a random place to another random place of the same image.

    Batched: per-sample rectangles become one source-index map, applied with one gather.
    """
    _check_batch(x, "cutpaste")
    B, C, H, W = x.shape
    dev = x.device
    u = _uniform(gen, (B, 6), dev)
    target = H * W * (area[0] + (area[1] - area[0]) * u[:, 0])
    la, lb = math.log(aspect[0]), math.log(aspect[1])
    ratio = torch.exp(la + (lb - la) * u[:, 1])
    w = torch.round(torch.sqrt(target * ratio)).clamp(1, W).long()
    h = torch.round(torch.sqrt(target / ratio)).clamp(1, H).long()
    sy, sx = _randint(u[:, 2], H - h + 1), _randint(u[:, 3], W - w + 1)
    dy, dx = _randint(u[:, 4], H - h + 1), _randint(u[:, 5], W - w + 1)
    ys = torch.arange(H, device=dev).view(1, H, 1)
    xs = torch.arange(W, device=dev).view(1, 1, W)
    v = lambda t: t.view(B, 1, 1)  # noqa: E731
    inside = (ys >= v(dy)) & (ys < v(dy + h)) & (xs >= v(dx)) & (xs < v(dx + w))
    # Inside the destination the source pixel is a constant per-sample offset away.
    offset = (sy - dy) * W + (sx - dx)
    index = (ys * W + xs) + inside.long() * v(offset)
    return _gather_pixels(x, index.view(B, H * W))


def cutpaste_scar(x: Tensor, gen: torch.Generator, jitter: float = 0.1) -> Tensor:
    """CutPaste-Scar: a thin rectangle cut from a random place, colour-jittered (``jitter``
    for brightness, contrast, saturation and hue), rotated by U[-45, 45] degrees and pasted
    at another random place.

    Sizes follow the original at 256 px (width 2-16 px, height 10-25 px), scaled by H / 256
    for other sizes but at least 1 x 2 px. One grid_sample maps the rotated destination
    rectangle back to the source rectangle; the mask is the analytic rotated rectangle.
    The jitter's contrast mean is taken over the whole warped image rather than the patch
    alone (keeps it batched; the effect is a slightly different grey reference).
    """
    _check_batch(x, "cutpaste-scar")
    B, C, H, W = x.shape
    dev, dt = x.device, x.dtype
    u = _uniform(gen, (B, 11), dev).to(dt)
    f = H / 256.0
    w = ((2 + 14 * u[:, 0]) * f).clamp(min=1.0, max=W)
    h = ((10 + 15 * u[:, 1]) * f).clamp(min=2.0, max=H)
    theta = (u[:, 2] - 0.5) * (math.pi / 2)
    cos, sin = torch.cos(theta), torch.sin(theta)
    # Source: axis-aligned rectangle inside the image; destination: rotated box inside too.
    csx = w / 2 + u[:, 3] * (W - w)
    csy = h / 2 + u[:, 4] * (H - h)
    ex = (0.5 * (w * cos.abs() + h * sin.abs())).clamp(max=W / 2)
    ey = (0.5 * (w * sin.abs() + h * cos.abs())).clamp(max=H / 2)
    cdx = ex + u[:, 5] * (W - 2 * ex)
    cdy = ey + u[:, 6] * (H - 2 * ey)
    # Pixel centres relative to the destination centre, rotated back into the patch frame.
    px = (torch.arange(W, device=dev, dtype=dt) + 0.5).view(1, 1, W) - cdx.view(B, 1, 1)
    py = (torch.arange(H, device=dev, dtype=dt) + 0.5).view(1, H, 1) - cdy.view(B, 1, 1)
    c, s_ = cos.view(B, 1, 1), sin.view(B, 1, 1)
    qx = c * px + s_ * py
    qy = c * py - s_ * px
    inside = (qx.abs() <= w.view(B, 1, 1) / 2) & (qy.abs() <= h.view(B, 1, 1) / 2)
    gx = 2 * (csx.view(B, 1, 1) + qx) / W - 1
    gy = 2 * (csy.view(B, 1, 1) + qy) / H - 1
    patch = F.grid_sample(
        x,
        torch.stack((gx, gy), dim=-1),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    if jitter > 0:
        lo = torch.tensor((1 - jitter, 1 - jitter, 1 - jitter, -jitter), device=dev, dtype=dt)
        factors = lo + 2 * jitter * u[:, 7:11]
        order = torch.randperm(4, generator=gen, device=gen.device).tolist()
        patch = color_jitter(patch, factors, tuple(order))
    mask = inside.unsqueeze(1).to(dt)
    return x + mask * (patch - x)


# ---------------------------------------------------------------------------------------------
# Registry, kinds, frozen and fresh application
# ---------------------------------------------------------------------------------------------

OUTLIERS: dict[str, Transform] = {
    "rot90": rot90,
    "rot180": rot180,
    "rot270": rot270,
    "hflip": hflip,
    "mixup": mixup,
    "scramble": scramble,
    "cutpaste": cutpaste,
    "cutpaste-scar": cutpaste_scar,
}
OUTLIER_NAMES: tuple[str, ...] = tuple(OUTLIERS)


@dataclass(frozen=True)
class OutlierKind:
    """One outlier kind: a chain of registered transforms, e.g. "rot90+cutpaste"."""

    name: str
    parts: tuple[str, ...]

    def apply(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """Apply the chain (left to right) to a float batch (B, C, H, W) in [0, 1]."""
        for part in self.parts:
            x = OUTLIERS[part](x, gen)
        return x

    __call__ = apply


def _parse_kind(name: str) -> OutlierKind:
    parts = tuple(p.strip().lower().replace("_", "-") for p in str(name).split("+"))
    bad = [p for p in parts if p not in OUTLIERS]
    if bad:
        raise ConfigError(
            f"unknown outlier transform {bad[0]!r} in {name!r}; allowed: "
            f"{', '.join(OUTLIER_NAMES)} (chain with '+', e.g. 'rot90+cutpaste')"
        )
    return OutlierKind(name="+".join(parts), parts=parts)


def parse_outliers(spec: str | Sequence[str]) -> list[OutlierKind]:
    """Outlier kinds from "rot90,rot180,rot270" or ["rot90", "rot90+cutpaste"]; an empty spec
    gives no kinds. Unknown names raise ConfigError listing the allowed names."""
    if isinstance(spec, str):
        items = spec.split(",")
    elif isinstance(spec, Sequence):
        items = list(spec)
    else:
        raise ConfigError(f"outlier spec must be a string or a list of names, got {spec!r}")
    return [_parse_kind(item) for item in items if str(item).strip()]


def make_frozen_outliers(
    normals: Tensor,
    kinds: Sequence[OutlierKind],
    gen: torch.Generator,
    batch_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """One outlier per kind per normal image, drawn once ("frozen" mode).

    ``normals`` uint8 (N, C, H, W) -> (images uint8 (N*K, C, H, W), kind_ids int64 (N*K,)),
    kind-major: rows k*N .. (k+1)*N - 1 hold kind k+1 (ids 1..K in the order of ``kinds``).
    """
    if not isinstance(normals, Tensor) or normals.dim() != 4 or normals.dtype != torch.uint8:
        raise InputError("make_frozen_outliers expects uint8 images (N, C, H, W)")
    N = normals.shape[0]
    K = len(kinds)
    out = torch.empty((N * K, *normals.shape[1:]), dtype=torch.uint8, device=normals.device)
    for k, kind in enumerate(kinds):
        for start in range(0, N, batch_size):
            chunk = normals[start : start + batch_size].float().div_(255.0)
            y = kind.apply(chunk, gen)
            rows = slice(k * N + start, k * N + start + chunk.shape[0])
            out[rows] = y.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    ids = torch.arange(1, K + 1, device=normals.device).repeat_interleave(N)
    return out, ids


def apply_kinds(
    x: Tensor, kind_ids: Tensor, kinds: Sequence[OutlierKind], gen: torch.Generator
) -> Tensor:
    """``fresh`` mode: give sample i the kind ``kind_ids[i]`` (1..K; 0 = unchanged), with one
    batched call per kind present. Returns a new tensor."""
    _check_batch(x, "apply_kinds")
    if kind_ids.shape != (x.shape[0],):
        raise InputError(f"kind_ids must have shape ({x.shape[0]},), got {tuple(kind_ids.shape)}")
    ids = kind_ids.to(x.device)
    lo, hi = (int(ids.min()), int(ids.max())) if ids.numel() else (0, 0)
    if lo < 0 or hi > len(kinds):
        raise InputError(f"kind_ids must lie in 0..{len(kinds)}, got values in {lo}..{hi}")
    out = x.clone()
    for k, kind in enumerate(kinds, start=1):
        idx = (ids == k).nonzero().squeeze(1)
        if idx.numel():
            out[idx] = kind.apply(x[idx], gen)
    return out
