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
import numbers
from collections.abc import Sequence
from functools import lru_cache

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
    "check_view_settings",
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


@lru_cache(maxsize=64)
def _const(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A small constant tensor, cached per device: no host-to-device copy per call (and none
    while a CUDA graph is being captured)."""
    return torch.tensor(values, dtype=dtype, device=device)


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
    w = _const(_LUMA, x.device, x.dtype)
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
    n = _const((5.0, 3.0, 1.0), x.device, x.dtype).view(1, 3, 1, 1)
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


def _blur(x: Tensor, k1: Tensor) -> Tensor:
    """Separable blur with per-sample 1-D kernels (B, k): reflect padding, one grouped conv2d."""
    B, C, H, W = x.shape
    k = k1.shape[1]
    k2 = (k1.unsqueeze(2) * k1.unsqueeze(1)).repeat_interleave(C, dim=0)  # (B*C, k, k)
    p = k // 2
    xp = F.pad(x.reshape(1, B * C, H, W), (p, p, p, p), mode="reflect")
    return F.conv2d(xp, k2.unsqueeze(1), groups=B * C).reshape(B, C, H, W)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int = 3) -> Tensor:
    """Gaussian blur with a per-sample sigma (B,), reflect padding, as one grouped conv2d.

    A sigma of 0 (or below) leaves that sample unchanged (its kernel is a delta).
    """
    k1 = _blur_kernels(sigma.detach().cpu(), kernel_size)
    return _blur(x, k1.to(device=x.device, dtype=x.dtype))


# ---------------------------------------------------------------------------------------------
# Crops
# ---------------------------------------------------------------------------------------------


def _fallback_size(H: int, W: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """(w, h) of the whole image cut to the closest allowed aspect ratio (torchvision's
    fallback when no random box fits)."""
    in_ratio = W / H
    if in_ratio < min(ratio):
        return W, int(round(W / min(ratio)))
    if in_ratio > max(ratio):
        return int(round(H * max(ratio))), H
    return W, H


def _sample_grid(x: Tensor, gx: Tensor, gy: Tensor) -> Tensor:
    """Bilinear resampling of every sample at its own separable grid -- one grid_sample."""
    B, S = gx.shape
    grid = torch.stack((gx[:, None, :].expand(B, S, S), gy[:, :, None].expand(B, S, S)), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _crop_resize(x: Tensor, boxes: Tensor, size: int, flip: Tensor | None = None) -> Tensor:
    """Crop each sample to its box (top, left, h, w) and resize to ``size`` (bilinear)."""
    gx, gy = _crop_coords(boxes.double(), x.shape[2], x.shape[3], size, flip)
    return _sample_grid(x, gx.to(x.device, x.dtype), gy.to(x.device, x.dtype))


def _rrc_boxes(
    u: Tensor, H: int, W: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> Tensor:
    """Integer crop boxes (B, 4) = (top, left, height, width) from uniforms ``u`` (B, 22),
    float64 on u's device.

    torchvision's RandomResizedCrop.get_params, vectorised: 10 attempts per sample (columns
    0..19), the first that fits is kept, else the fallback centre crop; columns 20, 21 place
    the box.
    """
    area = float(H * W)
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, 0:20:2])
    aspect = torch.exp(lr[0] + (lr[1] - lr[0]) * u[:, 1:20:2])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting attempt
    any_ok = ok.any(dim=1)
    w = torch.gather(w, 1, first)[:, 0]
    h = torch.gather(h, 1, first)[:, 0]
    # Fallback: the whole image cut to the closest allowed aspect ratio, centred.
    fw, fh = _fallback_size(H, W, ratio)
    w = torch.where(any_ok, w, float(fw))
    h = torch.where(any_ok, h, float(fh))
    top = torch.minimum(torch.floor(u[:, 20] * (H - h + 1)), H - h)
    left = torch.minimum(torch.floor(u[:, 21] * (W - w + 1)), W - w)
    top = torch.where(any_ok, top, torch.round((H - h) / 2))
    left = torch.where(any_ok, left, torch.round((W - w) / 2))
    return torch.stack((top, left, h, w), dim=1)


def _crop_coords(
    boxes: Tensor, H: int, W: int, size: int, flip: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Normalised sampling coordinates gx (B, size), gy (B, size) for crop boxes (B, 4) =
    (top, left, h, w) in float64, mirrored where ``flip`` is true.

    The crop is axis-aligned, so x depends on the output column only and y on the row: this
    is affine_grid's map without its batched matmul over every output pixel.
    """
    top, left, h, w = (boxes[:, i : i + 1] for i in range(4))
    sx = w / W
    if flip is not None:
        sx = torch.where(flip[:, None], -sx, sx)
    base = (2.0 * torch.arange(size, dtype=torch.float64, device=boxes.device) + 1.0) / size - 1.0
    gx = sx * base + ((2 * left + w) / W - 1.0)
    gy = (h / H) * base + ((2 * top + h) / H - 1.0)
    # Clamp to the crop's outer pixel centres: the crop's edge is replicated as torchvision's
    # crop-then-resize does, instead of blending in pixels outside the crop.
    gx = torch.clamp(gx, (2 * left + 1) / W - 1.0, (2 * (left + w) - 1) / W - 1.0)
    gy = torch.clamp(gy, (2 * top + 1) / H - 1.0, (2 * (top + h) - 1) / H - 1.0)
    return gx, gy


def _blur_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """1-D Gaussian kernels (B, k) for per-sample sigmas (B,), float64 on sigma's device;
    sigma <= 0 gives a delta."""
    half = (kernel_size - 1) / 2
    t = torch.arange(kernel_size, dtype=torch.float64, device=sigma.device) - half
    sig = sigma.double().reshape(-1, 1)
    k1 = torch.exp(-0.5 * (t / torch.clamp(sig, min=1e-6)) ** 2)
    k1 = torch.where(sig > 0, k1, (t == 0).double())
    return k1 / k1.sum(dim=1, keepdim=True)


def _is_number(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_view_settings(
    *,
    scale: Sequence[float],
    ratio: Sequence[float],
    jitter: Sequence[float],
    jitter_p: float,
    blur_kernel: int,
    blur_sigma: Sequence[float],
    blur_p: float,
    hflip_p: float,
    grayscale_p: float,
) -> None:
    """Check view augmentation settings; ConfigError names the recipe key (``augment.KEY``).

    The one check of these values: the config calls it before any work starts, and
    `ViewAugment` calls it when built directly.
    """

    def pair(key: str, value: Sequence[float], top: float | None) -> None:
        v = list(value)
        bound = "" if top is None else f" <= {top:g}"
        ok = len(v) == 2 and all(map(_is_number, v)) and 0 < v[0] <= v[1]
        if not ok or (top is not None and v[1] > top):
            raise ConfigError(
                f"augment.{key}: expected [low, high] with 0 < low <= high{bound}, got {v}"
            )

    pair("scale", scale, 1.0)
    pair("ratio", ratio, None)
    pair("blur_sigma", blur_sigma, None)
    j = list(jitter)
    if len(j) != 4 or not all(map(_is_number, j)) or min(j) < 0 or j[3] > 0.5:
        raise ConfigError(
            "augment.jitter: expected 4 values >= 0 (brightness, contrast, saturation, hue) "
            f"with hue <= 0.5, got {j}"
        )
    whole = _is_number(blur_kernel) and float(blur_kernel).is_integer()
    if not whole or blur_kernel < 1 or blur_kernel % 2 == 0:
        raise ConfigError(
            f"augment.blur_kernel: must be a positive odd integer, got {blur_kernel!r}"
        )
    for key, p in (
        ("jitter_p", jitter_p),
        ("blur_p", blur_p),
        ("hflip_p", hflip_p),
        ("grayscale_p", grayscale_p),
    ):
        if not _is_number(p) or not 0.0 <= p <= 1.0:
            raise ConfigError(f"augment.{key}: must be a probability in [0, 1], got {p!r}")


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
        cuda_graphs: bool = True,
    ) -> None:
        super().__init__()
        if int(size) <= 0:
            raise ConfigError(f"augment size must be a positive integer, got {size}")
        check_view_settings(
            scale=scale,
            ratio=ratio,
            jitter=jitter,
            jitter_p=jitter_p,
            blur_kernel=blur_kernel,
            blur_sigma=blur_sigma,
            blur_p=blur_p,
            hflip_p=hflip_p,
            grayscale_p=grayscale_p,
        )
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
        self.cuda_graphs = bool(cuda_graphs)
        # CUDA graphs by (shape, dtype, device, colour-op order); at most 24 orders per shape.
        self._graphs: dict[tuple, tuple] = {}
        self._pool = None

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, scale={self.scale}, ratio={self.ratio}, jitter={self.jitter}, "
            f"jitter_p={self.jitter_p}, blur_kernel={self.blur_kernel}, "
            f"blur_sigma={self.blur_sigma}, blur_p={self.blur_p}, hflip_p={self.hflip_p}, "
            f"grayscale_p={self.grayscale_p}"
        )

    def _stages(self, C: int) -> tuple[bool, bool, bool]:
        """Which of jitter, grayscale, blur run for C-channel inputs."""
        b, c, s, h = self.jitter
        jitter = self.jitter_p > 0 and (b > 0 or c > 0 or (C == 3 and (s > 0 or h > 0)))
        return jitter, self.grayscale_p > 0 and C == 3, self.blur_p > 0 and self.blur_kernel > 1

    def sample_params(
        self, x_shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, tuple[int, ...]]:
        """Draw every per-sample parameter from ``gen``, packed in one (B, P) CPU tensor: crop
        coordinates gx, gy (size each), jitter factors (4), grayscale flag (1), blur kernel
        (blur_kernel) -- only the stages that run. Also returns the colour-op order (a tuple).
        """
        B, C, H, W = x_shape
        u = torch.rand((B, 35), generator=gen, device=gen.device).cpu().double()
        params, slots = self._params(u, C, H, W)
        order: tuple[int, ...] = ()
        if self._stages(C)[0]:  # ops with an empty range are skipped
            active = self._active_ops(C)
            order = tuple(i for i in slots.tolist() if i in active)
        return params.to(dtype), order

    def _active_ops(self, C: int) -> list[int]:
        """The colour ops (0 brightness, 1 contrast, 2 saturation, 3 hue) with a range."""
        b, c, s, h = self.jitter if C == 3 else (*self.jitter[:2], 0.0, 0.0)
        return [k for k, r in enumerate((b, c, s, h)) if r > 0]

    def _params(self, u: Tensor, C: int, H: int, W: int) -> tuple[Tensor, Tensor]:
        """The packed float64 parameters and the colour-op slots (4,) from the uniforms ``u``
        (B, 35) on their device: 22 crop, 1 flip, 4 + 1 jitter, 1 gray, 2 blur, and the
        colour-op order from row 0's last 4 columns (one order per batch)."""
        flip = u[:, 22] < self.hflip_p if self.hflip_p > 0 else None
        boxes = _rrc_boxes(u[:, :22], H, W, self.scale, self.ratio)
        parts = list(_crop_coords(boxes, H, W, self.size, flip))
        do_jitter, do_gray, do_blur = self._stages(C)
        if do_jitter:
            b, c, s, h = self.jitter if C == 3 else (*self.jitter[:2], 0.0, 0.0)
            lo = _const((max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h), u.device,
                        torch.float64)  # fmt: skip
            span = _const((1 + b, 1 + c, 1 + s, h), u.device, torch.float64) - lo
            factors = lo + span * u[:, 23:27]
            if self.jitter_p < 1:
                keep = (u[:, 27] < self.jitter_p)[:, None]
                factors = torch.where(keep, factors, _const((1.0, 1.0, 1.0, 0.0), u.device,
                                                            torch.float64))  # fmt: skip
            parts.append(factors)
        if do_gray:
            parts.append((u[:, 28:29] < self.grayscale_p).double())
        if do_blur:
            lo_s, hi_s = self.blur_sigma
            sigma = torch.where(u[:, 30] < self.blur_p, lo_s + (hi_s - lo_s) * u[:, 29], 0.0)
            parts.append(_blur_kernels(sigma, self.blur_kernel))
        return torch.cat(parts, dim=1), torch.argsort(u[0, 31:35])

    def apply_params(self, x: Tensor, params: Tensor, order: tuple[int, ...]) -> Tensor:
        """The deterministic part: augment ``x`` with packed ``params`` (on x's device).

        Fixed shapes, no host synchronisation: safe to capture in a CUDA graph.
        """
        S = self.size
        do_jitter, do_gray, do_blur = self._stages(x.shape[1])
        out = _sample_grid(x, params[:, :S], params[:, S : 2 * S])
        i = 2 * S
        if do_jitter:
            out = color_jitter(out, params[:, i : i + 4], order)
            i += 4
        return self._gray_and_blur(out, params, i, do_gray, do_blur)

    def _gray_and_blur(
        self, out: Tensor, params: Tensor, i: int, do_gray: bool, do_blur: bool
    ) -> Tensor:
        """The last two stages, from the parameter columns starting at ``i``."""
        if do_gray:
            flag = params[:, i].view(-1, 1, 1, 1)
            out = torch.lerp(out, grayscale(out).expand_as(out), flag)
            i += 1
        if do_blur:
            out = _blur(out, params[:, i : i + self.blur_kernel])
        return out

    def forward(
        self,
        x: Tensor,
        gen: torch.Generator,
        rows: Tensor | None = None,
        n_draw: int | None = None,
    ) -> Tensor:
        """Augment a float batch (B, C, H, W) in [0, 1] -> (B, C, size, size) in [0, 1].

        Parameters are drawn from ``gen`` (a CPU generator is fastest, also for CUDA inputs).
        With ``rows`` (B indices) and ``n_draw``, the parameters of a batch of ``n_draw`` images
        are drawn and ``x`` gets those of ``rows``: a slice of a larger batch (one rank of a
        distributed step) gets exactly the views it would get as part of the whole.
        On CUDA the image work is replayed from a CUDA graph captured once per input shape and
        colour-op order (set ``self.cuda_graphs = False`` to run eagerly): a small batch is
        otherwise bound by the launch cost of its ~40 tiny kernels.
        """
        _check_images(x)
        if not isinstance(gen, torch.Generator):
            raise InputError("ViewAugment needs a torch.Generator (gen) to draw its parameters")
        if x.shape[1] not in (1, 3):
            raise InputError(f"ViewAugment expects 1 or 3 channels, got {x.shape[1]}")
        if rows is None:
            params, order = self.sample_params(tuple(x.shape), gen, x.dtype)
        else:
            if n_draw is None or rows.shape != (x.shape[0],):
                raise InputError("rows needs n_draw and one index per image of x")
            params, order = self.sample_params((n_draw, *x.shape[1:]), gen, x.dtype)
            params = params[rows.cpu()]
        if x.is_cuda:
            # Pinned (cached by PyTorch's host allocator) so the copy is asynchronous: a copy
            # from pageable memory would wait for all queued GPU work, stalling the step.
            params = params.pin_memory()
        params = params.to(x.device, non_blocking=True)
        if (
            self.cuda_graphs
            and x.is_cuda
            and not x.requires_grad
            and not torch.cuda.is_current_stream_capturing()
        ):
            return self._replay(x, params, order)
        return self.apply_params(x, params, order)

    # --- the sync-free path: a training step that can be captured in a CUDA graph ----------

    def sample_params_device(
        self, x_shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        """:meth:`sample_params` without the host: the same random numbers and the same maths
        on the generator's device, so nothing waits for the device.

        Returns ``(params, slots)``: the packed (B, P) parameters of :meth:`sample_params`, and
        the colour-op order as a (4,) device tensor (op index per slot) instead of a tuple.
        """
        B, C, H, W = x_shape
        u = torch.rand((B, 35), generator=gen, device=gen.device).double()
        params, slots = self._params(u, C, H, W)
        return params.to(dtype), slots

    def apply_params_slots(self, x: Tensor, params: Tensor, slots: Tensor) -> Tensor:
        """:meth:`apply_params` with the colour-op order as a device tensor: every slot
        computes each active op and keeps the one its order names (torch.where), so one fixed
        sequence of kernels serves every order -- capturable once in a CUDA graph. The colour
        ops cost 4x as much; the result is the same as with the order as a tuple."""
        S = self.size
        do_jitter, do_gray, do_blur = self._stages(x.shape[1])
        out = _sample_grid(x, params[:, :S], params[:, S : 2 * S])
        i = 2 * S
        if do_jitter:
            factors = params[:, i : i + 4]
            active = self._active_ops(x.shape[1])
            for slot in range(4):
                before = out
                for k in active:
                    op = _COLOR_OPS[k](before, factors[:, k])
                    out = torch.where(slots[slot] == k, op, out)
            i += 4
        return self._gray_and_blur(out, params, i, do_gray, do_blur)

    def forward_device(
        self,
        x: Tensor,
        gen: torch.Generator,
        rows: Tensor | None = None,
        n_draw: int | None = None,
    ) -> Tensor:
        """:meth:`forward` without host synchronisation (the parameters are computed on the
        generator's device, which should be x's): the same views as :meth:`forward` for the
        same generator state, to float tolerance."""
        _check_images(x)
        shape = tuple(x.shape) if rows is None else (n_draw, *x.shape[1:])
        params, slots = self.sample_params_device(shape, gen, x.dtype)
        if rows is not None:
            params = params[rows.to(params.device)]
        return self.apply_params_slots(x, params.to(x.device), slots.to(x.device))

    def _replay(self, x: Tensor, params: Tensor, order: tuple[int, ...]) -> Tensor:
        key = (tuple(x.shape), x.dtype, x.device, order)
        entry = self._graphs.get(key)
        if entry is None:
            static_x, static_p = x.clone(), params.clone()
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs need
                for _ in range(2):
                    self.apply_params(static_x, static_p, order)
            torch.cuda.current_stream(x.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                static_out = self.apply_params(static_x, static_p, order)
            entry = (graph, static_x, static_p, static_out)
            self._graphs[key] = entry
        graph, static_x, static_p, static_out = entry
        static_x.copy_(x)
        static_p.copy_(params)
        graph.replay()
        return static_out.clone()  # the next replay overwrites static_out


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
    when ``channels == 3``. Float64 input stays float64 (gradient checks); other floats become
    float32."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise InputError("to_float expects a (B, C, H, W) tensor of uint8 images")
    if x.dtype == torch.uint8:
        out = x.float().div_(255.0)
    else:
        out = x if x.dtype == torch.float64 else x.float()
    if size is not None:
        # not in place: at the target size _resize returns the caller's (maybe leaf) tensor
        out = _resize(out, int(size)).clamp(0.0, 1.0)
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
    u = torch.rand((B, 22), generator=gen, device=gen.device).cpu().double()
    boxes = _rrc_boxes(u, H, W, scale, (1.0, 1.0))
    return _crop_resize(x, boxes, size)


def rotate90(x: Tensor, k: int) -> Tensor:
    """Rotate a batch by ``k`` quarter turns (counter-clockwise) over dims (2, 3)."""
    return torch.rot90(x, k, dims=(2, 3))
