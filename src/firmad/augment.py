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

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from firmad.errors import ConfigError, InputError
from firmad.imageops import (
    COLOR_OPS,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernels,
    blur_with_kernels,
    check_images,
    color_jitter,
    constant,
    crop_coords,
    crop_resize,
    gaussian_blur,
    grayscale,
    rrc_boxes,
    sample_grid,
)

__all__ = [
    "ViewAugment",
    "ViewSettings",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "broadcast_channel",
    "check_view_settings",
    "color_jitter",
    "gaussian_blur",
    "grayscale",
    "random_crops",
    "repeat_views",
    "rotate90",
    "test_transform",
    "to_float",
]


def _is_number(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass(frozen=True)
class ViewSettings:
    """What a training view is made of (the recipe's ``augment`` section, less ``enabled``).

    Defaults are FIRM's recipe: RandomResizedCrop(scale 0.25-1, ratio 1, bilinear),
    ColorJitter(0.4, 0.4, 0.4, 0.4) with p = 1, GaussianBlur(3, sigma 0.1-2) with p = 0.75.
    Checked by `check_view_settings` when a `ViewAugment` is built.
    """

    scale: Sequence[float] = (0.25, 1.0)
    ratio: Sequence[float] = (1.0, 1.0)
    jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.4)
    jitter_p: float = 1.0
    blur_kernel: int = 3
    blur_sigma: Sequence[float] = (0.1, 2.0)
    blur_p: float = 0.75
    hflip_p: float = 0.0
    grayscale_p: float = 0.0


def check_view_settings(views: ViewSettings) -> None:
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

    pair("scale", views.scale, 1.0)
    pair("ratio", views.ratio, None)
    pair("blur_sigma", views.blur_sigma, None)
    j = list(views.jitter)
    if len(j) != 4 or not all(map(_is_number, j)) or min(j) < 0 or j[3] > 0.5:
        raise ConfigError(
            "augment.jitter: expected 4 values >= 0 (brightness, contrast, saturation, hue) "
            f"with hue <= 0.5, got {j}"
        )
    blur_kernel = views.blur_kernel
    whole = _is_number(blur_kernel) and float(blur_kernel).is_integer()
    if not whole or blur_kernel < 1 or blur_kernel % 2 == 0:
        raise ConfigError(
            f"augment.blur_kernel: must be a positive odd integer, got {blur_kernel!r}"
        )
    for key, p in (
        ("jitter_p", views.jitter_p),
        ("blur_p", views.blur_p),
        ("hflip_p", views.hflip_p),
        ("grayscale_p", views.grayscale_p),
    ):
        if not _is_number(p) or not 0.0 <= p <= 1.0:
            raise ConfigError(f"augment.{key}: must be a probability in [0, 1], got {p!r}")


class ViewAugment(nn.Module):
    """Per-sample random views: RandomResizedCrop -> hflip -> ColorJitter -> grayscale -> blur.

    ``views``: the `ViewSettings` (default: FIRM's recipe), the crops ``size`` x ``size``.
    Semantics follow torchvision, with one difference: the order of the four colour ops is
    drawn once per batch (torchvision draws it per image), so the whole batch stays batched.
    Inputs larger than ``size`` are not antialiased; resize them first with :func:`to_float`.
    A grey batch broadcast to 3 channels (``to_float(..., broadcast=True)``: channel stride 0)
    is augmented once, on its one channel, and comes back broadcast: the same numbers as for
    its 3-channel copy at a third of the work (and no hue maths, a no-op on grey images).
    """

    def __init__(
        self, size: int = 32, views: ViewSettings | None = None, cuda_graphs: bool = True
    ) -> None:
        super().__init__()
        if int(size) <= 0:
            raise ConfigError(f"augment size must be a positive integer, got {size}")
        views = views or ViewSettings()
        check_view_settings(views)
        scale, ratio, blur_sigma = views.scale, views.ratio, views.blur_sigma
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.jitter = tuple(float(j) for j in views.jitter)
        self.jitter_p = float(views.jitter_p)
        self.blur_kernel = int(views.blur_kernel)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.blur_p = float(views.blur_p)
        self.hflip_p = float(views.hflip_p)
        self.grayscale_p = float(views.grayscale_p)
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
        boxes = rrc_boxes(u[:, :22], H, W, self.scale, self.ratio)
        parts = list(crop_coords(boxes, H, W, self.size, flip))
        do_jitter, do_gray, do_blur = self._stages(C)
        if do_jitter:
            b, c, s, h = self.jitter if C == 3 else (*self.jitter[:2], 0.0, 0.0)
            lo = constant((max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h), u.device,
                        torch.float64)  # fmt: skip
            span = constant((1 + b, 1 + c, 1 + s, h), u.device, torch.float64) - lo
            factors = lo + span * u[:, 23:27]
            if self.jitter_p < 1:
                keep = (u[:, 27] < self.jitter_p)[:, None]
                factors = torch.where(keep, factors, constant((1.0, 1.0, 1.0, 0.0), u.device,
                                                            torch.float64))  # fmt: skip
            parts.append(factors)
        if do_gray:
            parts.append((u[:, 28:29] < self.grayscale_p).double())
        if do_blur:
            lo_s, hi_s = self.blur_sigma
            sigma = torch.where(u[:, 30] < self.blur_p, lo_s + (hi_s - lo_s) * u[:, 29], 0.0)
            parts.append(blur_kernels(sigma, self.blur_kernel))
        return torch.cat(parts, dim=1), torch.argsort(u[0, 31:35])

    def apply_params(self, x: Tensor, params: Tensor, order: tuple[int, ...]) -> Tensor:
        """The deterministic part: augment ``x`` with packed ``params`` (on x's device).

        Fixed shapes, no host synchronisation: safe to capture in a CUDA graph.
        """
        S, C = self.size, x.shape[1]
        grey = broadcast_channel(x)
        do_jitter, do_gray, do_blur = self._stages(C)
        out = sample_grid(x if grey is None else grey, params[:, :S], params[:, S : 2 * S])
        i = 2 * S
        if do_jitter:
            out = color_jitter(out, params[:, i : i + 4], order, C)
            i += 4
        out = self._gray_and_blur(out, params, i, (do_gray, do_blur), C)
        return out if grey is None else out.expand(-1, C, -1, -1)

    def _gray_and_blur(
        self, out: Tensor, params: Tensor, i: int, stages: tuple[bool, bool], channels: int
    ) -> Tensor:
        """The last two stages (which run: ``stages``), from the parameter columns starting at
        ``i``; ``channels``: what ``out`` stands for (3 for a grey batch's one channel)."""
        do_gray, do_blur = stages
        if do_gray:
            flag = params[:, i].view(-1, 1, 1, 1)
            out = torch.lerp(out, grayscale(out, channels).expand_as(out), flag)
            i += 1
        if do_blur:
            out = blur_with_kernels(out, params[:, i : i + self.blur_kernel])
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
        check_images(x)
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
        S, C = self.size, x.shape[1]
        grey = broadcast_channel(x)
        do_jitter, do_gray, do_blur = self._stages(C)
        out = sample_grid(x if grey is None else grey, params[:, :S], params[:, S : 2 * S])
        i = 2 * S
        if do_jitter:
            factors = params[:, i : i + 4]
            active = self._active_ops(C)
            for slot in range(4):
                before = out
                for k in active:
                    op = COLOR_OPS[k](before, factors[:, k], C)
                    out = torch.where(slots[slot] == k, op, out)
            i += 4
        out = self._gray_and_blur(out, params, i, (do_gray, do_blur), C)
        return out if grey is None else out.expand(-1, C, -1, -1)

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
        check_images(x)
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


def to_float(
    x: Tensor, size: int | None = None, channels: int = 3, broadcast: bool = False
) -> Tensor:
    """uint8 images (B, C, H, W) -> float32 in [0, 1], resized (bilinear, antialias) to
    ``size`` x ``size`` if given and different, and a single channel repeated to 3 channels
    when ``channels == 3`` (with ``broadcast``: as a view with channel stride 0, no copy, which
    `ViewAugment` augments once). Float64 input stays float64 (gradient checks); other floats
    become float32."""
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
        out = out.expand(-1, 3, -1, -1)
        return out if broadcast else out.contiguous()
    return out


def broadcast_channel(x: Tensor) -> Tensor | None:
    """The one channel (B, 1, H, W) of a batch whose channels all are that channel broadcast
    (channel stride 0, as ``to_float(..., broadcast=True)`` makes them), else None."""
    if x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 0:
        return x[:, :1]
    return None


def repeat_views(x: Tensor, n: int) -> Tensor:
    """``n`` copies of a batch stacked (view-major), as the methods' views start: a broadcast
    grey batch stays broadcast (its one channel is copied, not three)."""
    if n == 1:
        return x
    grey = broadcast_channel(x)
    if grey is None:
        return torch.cat([x] * n)
    return torch.cat([grey] * n).expand(-1, x.shape[1], -1, -1)


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
    check_images(x)
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
    check_images(x)
    if gen is None:
        gen = torch.Generator().manual_seed(0)
    B, C, H, W = x.shape
    u = torch.rand((B, 22), generator=gen, device=gen.device).cpu().double()
    boxes = rrc_boxes(u, H, W, scale, (1.0, 1.0))
    return crop_resize(x, boxes, size)


def rotate90(x: Tensor, k: int) -> Tensor:
    """Rotate a batch by ``k`` quarter turns (counter-clockwise) over dims (2, 3)."""
    return torch.rot90(x, k, dims=(2, 3))
