"""Batched, per-sample random view augmentation and test-time transforms.

Everything here runs in the training hot loop, so every op works on the whole batch at once
with per-sample random parameters (no Python loop over samples) and on any device. Random
numbers come from an explicit ``torch.Generator``; they are drawn on the generator's device
(typically the CPU) in one call per batch and moved to the images' device.

Kornia's per-sample ColorJitter and RandomResizedCrop are much slower than the rest of a small
training step on CPU (many small kernels and per-op parameter objects), so the ops are written
directly with a handful of batched torch ops: one ``affine_grid`` + ``grid_sample`` for the
crop (and flip), closed-form colour adjustments, and one grouped ``conv2d`` for the blur.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from firmad.errors import ConfigError, InputError

__all__ = [
    "ViewAugment",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "color_jitter",
    "gaussian_blur",
    "grayscale",
    "random_crops",
    "rotate90",
    "test_transform",
    "to_float",
]

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)


def _uniform(gen: torch.Generator | None, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, then moved to ``device``."""
    gen_device = gen.device if gen is not None else torch.device("cpu")
    u = torch.rand(shape, generator=gen, device=gen_device)
    return u.to(device, non_blocking=True)


def _check_images(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"{name} must be a (B, C, H, W) tensor, got {shape}")
    if not x.is_floating_point():
        raise InputError(f"{name} must be a float tensor in [0, 1], got {x.dtype}; use to_float()")


# ---------------------------------------------------------------------------------------------
# Colour ops with per-sample factors (torchvision semantics, batched)
# ---------------------------------------------------------------------------------------------


def _per_sample(f: Tensor | float, x: Tensor) -> Tensor:
    f = torch.as_tensor(f, dtype=x.dtype, device=x.device)
    return f.reshape(-1, 1, 1, 1) if f.dim() > 0 else f


def grayscale(x: Tensor) -> Tensor:
    """Luma of a (B, 3, H, W) batch as (B, 1, H, W); a 1-channel batch is returned unchanged."""
    if x.shape[1] == 1:
        return x
    B, C, H, W = x.shape
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device)
    # One matmul over the channel axis: ~2x faster than a weighted sum on CPU.
    return torch.matmul(w, x.reshape(B, C, H * W)).reshape(B, 1, H, W)


def adjust_brightness(x: Tensor, factor: Tensor | float) -> Tensor:
    """Multiply by a per-sample factor (B,) and clamp to [0, 1]."""
    return (x * _per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor | float) -> Tensor:
    """Blend each image with the mean of its grayscale version, per-sample factor (B,)."""
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return torch.lerp(mean.expand_as(x), x, _per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_saturation(x: Tensor, factor: Tensor | float) -> Tensor:
    """Blend each image with its grayscale version, per-sample factor (B,). No-op for 1 channel."""
    if x.shape[1] == 1:
        return x
    return torch.lerp(grayscale(x).expand_as(x), x, _per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_hue(x: Tensor, shift: Tensor | float) -> Tensor:
    """Rotate the hue by a per-sample shift (B,) in turns ([-0.5, 0.5]). No-op for 1 channel.

    Batched RGB -> HSV -> RGB. With d = max - min (= v * s), the inverse is the closed form
    ``c_n = v - d * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6 h) mod 6``, n = 5, 3, 1.
    Branches and wraps use mask arithmetic: torch.where, floor and remainder are several times
    slower than plain arithmetic on CPU.
    """
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    v = x.amax(dim=1)
    d = v - x.amin(dim=1)
    # Where d == 0 all channels are equal, so the differences below are exactly 0 (hue 0).
    inv = d.clamp_min(1e-12).reciprocal_()
    # Hue in sextants; the branch follows the channel holding the maximum (r, then g, then b).
    is_r = v == r
    is_g = (v == g) & ~is_r
    is_b = ~(is_r | is_g)
    h6 = (g - b) * is_r + (b - r + 2.0 * d) * is_g + (r - g + 4.0 * d) * is_b
    h6 = h6 * inv + 6.0 * _per_sample(shift, x).squeeze(1)  # in [-4, 8)
    h6 = h6 + 6.0 * (h6 < 0) - 6.0 * (h6 >= 6.0)  # [0, 6)
    n = torch.tensor((5.0, 3.0, 1.0), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = n + h6.unsqueeze(1)  # [1, 11)
    k = k - 6.0 * (k >= 6.0)  # [0, 6)
    w = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (v.unsqueeze(1) - d.unsqueeze(1) * w).clamp_(0.0, 1.0)


_COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: Tensor, factors: Tensor, order: tuple[int, ...] = (0, 1, 2, 3)) -> Tensor:
    """Apply brightness, contrast, saturation, hue with per-sample ``factors`` (B, 4).

    ``order`` lists op indices (0 brightness, 1 contrast, 2 saturation, 3 hue) in the order
    they are applied. Identity factors are (1, 1, 1, 0).
    """
    for i in order:
        x = _COLOR_OPS[i](x, factors[:, i])
    return x


# ---------------------------------------------------------------------------------------------
# Blur
# ---------------------------------------------------------------------------------------------


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int = 3) -> Tensor:
    """Gaussian blur with a per-sample sigma (B,), reflect padding, as one grouped conv2d.

    A sigma of 0 (or below) leaves that sample unchanged (its kernel is a delta).
    """
    B, C, H, W = x.shape
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, dtype=x.dtype, device=x.device)
    sig = sigma.to(dtype=x.dtype, device=x.device).reshape(B, 1)
    k1 = torch.exp(-0.5 * (t / sig.clamp_min(1e-6)) ** 2)
    delta = (t == 0).to(x.dtype).expand_as(k1)
    k1 = torch.where(sig > 0, k1, delta)
    k1 = k1 / k1.sum(dim=1, keepdim=True)
    k2 = (k1.unsqueeze(2) * k1.unsqueeze(1)).repeat_interleave(C, dim=0)  # (B*C, k, k)
    p = kernel_size // 2
    xp = F.pad(x.reshape(1, B * C, H, W), (p, p, p, p), mode="reflect")
    return F.conv2d(xp, k2.unsqueeze(1), groups=B * C).reshape(B, C, H, W)


# ---------------------------------------------------------------------------------------------
# Crops
# ---------------------------------------------------------------------------------------------


def _rrc_boxes(
    u: Tensor, H: int, W: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> Tensor:
    """Integer crop boxes (B, 4) = (top, left, height, width) from uniforms ``u`` (B, 22).

    torchvision's RandomResizedCrop.get_params, vectorised: 10 attempts per sample (columns
    0..19), the first that fits is kept, else the fallback centre crop; columns 20, 21 place
    the box.
    """
    B = u.shape[0]
    area = float(H * W)
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, 0:20:2])
    aspect = torch.exp(lr[0] + (lr[1] - lr[0]) * u[:, 1:20:2])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)  # first fitting attempt
    any_ok = ok.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    # Fallback: the whole image cut to the closest allowed aspect ratio, centred.
    in_ratio = W / H
    if in_ratio < min(ratio):
        fw, fh = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(H * max(ratio))), H
    else:
        fw, fh = W, H
    w = torch.where(any_ok, w, torch.full_like(w, fw))
    h = torch.where(any_ok, h, torch.full_like(h, fh))
    top = torch.floor(u[:, 20] * (H - h + 1)).clamp_max(H - h)
    left = torch.floor(u[:, 21] * (W - w + 1)).clamp_max(W - w)
    top = torch.where(any_ok, top, torch.round((H - h) / 2))
    left = torch.where(any_ok, left, torch.round((W - w) / 2))
    return torch.stack((top, left, h, w), dim=1).reshape(B, 4)


def _crop_resize(x: Tensor, boxes: Tensor, size: int, flip: Tensor | None = None) -> Tensor:
    """Crop each sample to its box (top, left, h, w) and resize to ``size`` (bilinear), flipping
    horizontally where ``flip`` is true -- one affine_grid + grid_sample for the whole batch."""
    B, C, H, W = x.shape
    top, left, h, w = boxes.to(x.dtype).unbind(1)
    # The affine map of affine_grid, built directly: the crop is axis-aligned, so x depends on the
    # output column only and y on the row (cheaper than affine_grid's batched matmul).
    sx = w / W
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    base = (2.0 * torch.arange(size, dtype=x.dtype, device=x.device) + 1.0) / size - 1.0
    gx = sx[:, None] * base + ((2 * left + w) / W - 1.0)[:, None]
    gy = (h / H)[:, None] * base + ((2 * top + h) / H - 1.0)[:, None]
    # Clamp to the crop's outer pixel centres: the crop's edge is replicated as torchvision's
    # crop-then-resize does, instead of blending in pixels outside the crop.
    gx = gx.clamp(((2 * left + 1) / W - 1.0)[:, None], ((2 * (left + w) - 1) / W - 1.0)[:, None])
    gy = gy.clamp(((2 * top + 1) / H - 1.0)[:, None], ((2 * (top + h) - 1) / H - 1.0)[:, None])
    grid = torch.stack(
        (gx[:, None, :].expand(B, size, size), gy[:, :, None].expand(B, size, size)), dim=-1
    )
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ViewAugment(nn.Module):
    """Per-sample random views: RandomResizedCrop -> hflip -> ColorJitter -> grayscale -> blur.

    Defaults are FIRM's recipe: RandomResizedCrop(32, scale 0.25-1, ratio 1, bilinear),
    ColorJitter(0.4, 0.4, 0.4, 0.4) with p = 1, GaussianBlur(3, sigma 0.1-2) with p = 0.75.
    Semantics follow torchvision, with one difference: the order of the four colour ops is
    drawn once per batch (torchvision draws it per image), so the whole batch stays batched.
    Inputs larger than ``size`` are not antialiased; resize them first with :func:`to_float`.
    """

    def __init__(
        self,
        size: int = 32,
        scale: tuple[float, float] = (0.25, 1.0),
        ratio: tuple[float, float] = (1.0, 1.0),
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.4),
        jitter_p: float = 1.0,
        blur_kernel: int = 3,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_p: float = 0.75,
        hflip_p: float = 0.0,
        grayscale_p: float = 0.0,
    ) -> None:
        super().__init__()
        if int(size) <= 0:
            raise ConfigError(f"augment size must be a positive integer, got {size}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ConfigError(f"augment scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ConfigError(f"augment ratio must satisfy 0 < min <= max, got {ratio}")
        if len(jitter) != 4 or any(j < 0 for j in jitter) or jitter[3] > 0.5:
            raise ConfigError(
                "augment jitter must be 4 non-negative values (brightness, contrast, "
                f"saturation, hue) with hue <= 0.5, got {jitter}"
            )
        if blur_kernel < 1 or blur_kernel % 2 == 0:
            raise ConfigError(
                f"augment blur_kernel must be a positive odd integer, got {blur_kernel}"
            )
        if not (0 < blur_sigma[0] <= blur_sigma[1]):
            raise ConfigError(f"augment blur_sigma must satisfy 0 < min <= max, got {blur_sigma}")
        for name, p in (
            ("jitter_p", jitter_p),
            ("blur_p", blur_p),
            ("hflip_p", hflip_p),
            ("grayscale_p", grayscale_p),
        ):
            if not (0.0 <= p <= 1.0):
                raise ConfigError(f"augment {name} must be a probability in [0, 1], got {p}")
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.jitter = tuple(float(j) for j in jitter)
        self.jitter_p = float(jitter_p)
        self.blur_kernel = int(blur_kernel)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.blur_p = float(blur_p)
        self.hflip_p = float(hflip_p)
        self.grayscale_p = float(grayscale_p)

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, scale={self.scale}, ratio={self.ratio}, jitter={self.jitter}, "
            f"jitter_p={self.jitter_p}, blur_kernel={self.blur_kernel}, "
            f"blur_sigma={self.blur_sigma}, blur_p={self.blur_p}, hflip_p={self.hflip_p}, "
            f"grayscale_p={self.grayscale_p}"
        )

    def forward(self, x: Tensor, gen: torch.Generator | None = None) -> Tensor:
        """Augment a float batch (B, C, H, W) in [0, 1] -> (B, C, size, size) in [0, 1]."""
        _check_images(x)
        B, C, H, W = x.shape
        # All per-sample random numbers in one draw: 22 crop, 1 flip, 4 + 1 jitter, 1 gray, 2 blur.
        u = _uniform(gen, (B, 31), x.device).to(x.dtype)
        flip = u[:, 22] < self.hflip_p if self.hflip_p > 0 else None
        boxes = _rrc_boxes(u[:, :22], H, W, self.scale, self.ratio)
        out = _crop_resize(x, boxes, self.size, flip)

        b, c, s, h = self.jitter
        if C == 1:
            s = h = 0.0
        if self.jitter_p > 0 and (b or c or s or h):
            lo = torch.tensor((max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h))
            hi = torch.tensor((1 + b, 1 + c, 1 + s, h))
            lo, hi = lo.to(out), hi.to(out)
            factors = lo + (hi - lo) * u[:, 23:27]
            if self.jitter_p < 1:
                identity = torch.tensor((1.0, 1.0, 1.0, 0.0)).to(out)
                factors = torch.where((u[:, 27] < self.jitter_p)[:, None], factors, identity)
            # Ops whose range is empty are skipped; the order is one random permutation per batch.
            active = [i for i, r in enumerate((b, c, s, h)) if r > 0]
            perm = torch.randperm(
                4, generator=gen, device=gen.device if gen is not None else "cpu"
            ).tolist()
            out = color_jitter(out, factors, tuple(i for i in perm if i in active))

        if self.grayscale_p > 0 and C == 3:
            gray = (u[:, 28] < self.grayscale_p).view(B, 1, 1, 1)
            out = torch.where(gray, grayscale(out).expand_as(out), out)

        if self.blur_p > 0 and self.blur_kernel > 1:
            lo, hi = self.blur_sigma
            sigma = lo + (hi - lo) * u[:, 29]
            sigma = torch.where(u[:, 30] < self.blur_p, sigma, torch.zeros_like(sigma))
            out = gaussian_blur(out, sigma, self.blur_kernel)
        return out


# ---------------------------------------------------------------------------------------------
# Conversions and test-time transforms
# ---------------------------------------------------------------------------------------------


def _resize(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == hw:
        return x
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)


def to_float(x: Tensor, size: int | None = None, channels: int = 3) -> Tensor:
    """uint8 images (B, C, H, W) -> float32 in [0, 1], resized (bilinear, antialias) to
    ``size`` x ``size`` if given and different, and a single channel repeated to 3 channels
    when ``channels == 3``."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise InputError("to_float expects a (B, C, H, W) tensor of uint8 images")
    out = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    if size is not None:
        out = _resize(out, int(size)).clamp_(0.0, 1.0)
    if channels == 3 and out.shape[1] == 1:
        out = out.expand(-1, 3, -1, -1).contiguous()
    return out


def _center_crop(x: Tensor, size: int) -> Tensor:
    H, W = x.shape[-2:]
    if size > H or size > W:
        raise InputError(f"cannot centre-crop {size} px from {H}x{W} images")
    top = int(round((H - size) / 2.0))
    left = int(round((W - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def test_transform(x: Tensor, size: int = 32, resize_ratio: float = 1.125) -> Tensor:
    """Resize to ``round(size * resize_ratio)`` (bilinear, antialias), then centre-crop ``size``
    (the paper's 36 -> 32)."""
    _check_images(x)
    resized = _resize(x, int(round(size * resize_ratio)))
    return _center_crop(resized, size).contiguous()


def random_crops(
    x: Tensor,
    size: int = 32,
    scale: tuple[float, float] = (0.55, 1.0),
    gen: torch.Generator | None = None,
) -> Tensor:
    """One RandomResizedCrop (ratio 1, bilinear) per sample -> (B, C, size, size).

    Used by the ensemble scoring variant (resize 36 -> centre-crop 32 -> this). Without a
    generator a fixed seed (0) is used, so results stay reproducible.
    """
    _check_images(x)
    if gen is None:
        gen = torch.Generator().manual_seed(0)
    B, C, H, W = x.shape
    u = _uniform(gen, (B, 22), x.device).to(x.dtype)
    boxes = _rrc_boxes(u, H, W, scale, (1.0, 1.0))
    return _crop_resize(x, boxes, size)


def rotate90(x: Tensor, k: int) -> Tensor:
    """Rotate a batch by ``k`` quarter turns (counter-clockwise) over dims (2, 3)."""
    return torch.rot90(x, k, dims=(2, 3))
