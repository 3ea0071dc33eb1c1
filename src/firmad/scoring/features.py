"""Features for scoring: preprocessing + encoder, in eval mode, as one differentiable module.

`FeatureExtractor` is the single place where test-time images become features, for the
evaluation, the detector API, attacks and the ONNX export alike:

    x in [0, 1] (N, C, H, W) -> resize to the training size (bilinear, antialias; skipped when
    already that size) -> grey repeated to the encoder's channels -> test transform (resize
    ``size * resize_ratio``, centre-crop ``size``; the paper's 36 -> 32) -> rotation by a
    multiple of 90 degrees -> encoder (its first layer normalises) -> (N, D).

Features are computed in float32 (the encoder's dtype) with channels-last input on the CPU,
never under autocast (`full_precision`): a run may train in bf16, but scores, attacks and the
ONNX export see the fp32 model a deployment runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from firmad import augment
from firmad.errors import InputError
from firmad.scoring.base import tracing

ANGLES = (0, 90, 180, 270)
ENSEMBLE_CROP_SCALE = (0.55, 1.0)


class FeatureExtractor(nn.Module):
    """Encoder features of images in [0, 1]; ``forward`` is differentiable, ``extract`` is the
    batched, gradient-free path for uint8 images."""

    def __init__(
        self, encoder: nn.Module, size: int = 32, resize_ratio: float = 1.125, channels: int = 3
    ) -> None:
        super().__init__()
        if resize_ratio < 1.0:
            raise InputError(f"resize_ratio must be >= 1, got {resize_ratio}.")
        self.encoder = encoder
        self.size = int(size)
        self.resize_ratio = float(resize_ratio)
        self.channels = int(channels)

    def preprocess(
        self,
        x: torch.Tensor,
        angle: int = 0,
        crops: int | None = None,
        gen: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Images in [0, 1] -> the encoder's input; with ``crops`` n random crops per image
        (scale 0.55-1, the ensemble variant) as (n * N, C, size, size), crop-major."""
        if angle % 90 != 0:
            raise InputError(f"angle must be a multiple of 90 degrees, got {angle}.")
        if x.shape[1] == 3 and self.channels == 1:
            x = x.mean(dim=1, keepdim=True)  # colour images into a grey encoder
        x = augment.to_float(x, size=self.size, channels=self.channels)
        x = augment.test_transform(x, self.size, self.resize_ratio)
        if crops is not None:
            if gen is None:
                gen = torch.Generator().manual_seed(0)
            x = torch.cat(
                [
                    augment.random_crops(x, size=self.size, scale=ENSEMBLE_CROP_SCALE, gen=gen)
                    for _ in range(crops)
                ]
            )
        return augment.rotate90(x, (angle // 90) % 4)

    def forward(
        self,
        x: torch.Tensor,
        angle: int = 0,
        crops: int | None = None,
        gen: torch.Generator | None = None,
    ) -> torch.Tensor:
        x = self.preprocess(x, angle, crops, gen).to(self.dtype)
        if x.device.type == "cpu" and not tracing():
            # oneDNN convolutions run markedly faster on channels-last input (same numbers up
            # to the order of float sums)
            x = x.contiguous(memory_format=torch.channels_last)
        with full_precision(x.device.type):
            out = self.encoder(x)
        if isinstance(out, tuple | list):  # encoders returning (features, extras)
            out = out[0]
        out = out.reshape(out.shape[0], -1)
        return out if out.dtype == torch.float64 else out.float()

    @property
    def dtype(self) -> torch.dtype:
        """The encoder's parameter dtype (float32 unless converted, e.g. ``.double()``)."""
        for t in self.encoder.parameters():
            return t.dtype
        return torch.float32

    @property
    def device(self) -> torch.device:
        for t in self.encoder.parameters():
            return t.device
        for t in self.encoder.buffers():
            return t.device
        return torch.device("cpu")

    @torch.inference_mode()
    def extract(
        self,
        images_uint8: torch.Tensor,
        batch_size: int = 512,
        angle: int = 0,
        crops: int | None = None,
        gen: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Features of uint8 images (N, C, H, W), eval mode, in batches on the encoder's device.

        Returns a float32 CPU tensor (N, D), or (crops, N, D) with ``crops``.
        """
        images = check_uint8(images_uint8)
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}.")
        if crops is not None and crops < 1:
            raise InputError(f"crops must be a positive number of crops or None, got {crops}.")
        if crops is not None and gen is None:
            gen = torch.Generator().manual_seed(0)
        device = self.device
        chunks: list[torch.Tensor] = []
        with eval_mode(self):
            for start in range(0, images.shape[0], batch_size):
                xb = images[start : start + batch_size].to(device, non_blocking=True)
                x = xb.float().div_(255.0)
                feats = self(x, angle=angle, crops=crops, gen=gen).cpu()
                if crops is not None:
                    feats = feats.reshape(crops, xb.shape[0], -1)
                chunks.append(feats)
        if not chunks:
            raise InputError("no images to extract features from (empty tensor).")
        return torch.cat(chunks, dim=1 if crops is not None else 0)


def full_precision(device_type: str):
    """A context without autocast: inside it the encoder and scorers compute in their own dtype
    (float32), also when the caller runs under ``torch.autocast`` -- an attacker of an fp32
    deployment does not see bf16 gradients. Nothing to switch off while tracing (ONNX export,
    torch.compile): a traced graph holds no autocast."""
    if tracing():
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


class eval_mode:
    """Context manager: a module in eval mode, each submodule's own mode restored after."""

    def __init__(self, module: nn.Module) -> None:
        self.modes = [(m, m.training) for m in module.modules()]
        self.module = module

    def __enter__(self):
        self.module.eval()
        return self.module

    def __exit__(self, *exc) -> None:
        for m, mode in self.modes:
            m.training = mode


def check_uint8(images) -> torch.Tensor:
    """uint8 (N, C, H, W) as a tensor, or a clear InputError."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = (
            f"{images.dtype} tensor of shape {tuple(images.shape)}"
            if isinstance(images, torch.Tensor)
            else type(images).__name__
        )
        raise InputError(f"images must be a uint8 tensor of shape (N, C, H, W); got {got}.")
    return images


@dataclass(frozen=True)
class ExtractOptions:
    """How `extract_features` runs: the test-time preprocessing (``size``, ``resize_ratio``,
    ``channels``: `FeatureExtractor`'s), the batch size, and the device the encoder must be on
    (None: wherever it is)."""

    size: int = 32
    resize_ratio: float = 1.125
    channels: int = 3
    batch_size: int = 512
    device: str | torch.device | None = None


def extract_features(
    encoder: nn.Module,
    images_uint8: torch.Tensor,
    options: ExtractOptions | None = None,
    angle: int = 0,
    crops: int | None = None,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """Encoder features of uint8 images (a functional shortcut to `FeatureExtractor.extract`).

    The encoder must already live on ``options.device`` (when given); its modes are restored
    afterwards.
    """
    o = options or ExtractOptions()
    extractor = FeatureExtractor(encoder, o.size, o.resize_ratio, o.channels)
    device = o.device
    if device is not None and extractor.device.type != torch.device(device).type:
        raise InputError(
            f"the encoder lives on {extractor.device} but features were requested on {device}; "
            f"move it first with encoder.to('{device}')."
        )
    return extractor.extract(images_uint8, o.batch_size, angle, crops, gen)
