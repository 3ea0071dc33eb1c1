"""The model a run trains: the encoder (whose features are scored) plus the method's modules."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from firmad.errors import ConfigError


class OneClassModel(nn.Module):
    """``encoder`` maps images in [0, 1] to features (``encoder.feature_dim`` of them);
    ``modules`` are the method's modules on top, by attribute name: ``head`` (contrastive
    methods) or ``classifier`` (binary); ``centre`` is Deep SVDD's fixed centre (a buffer, so
    it is saved with the weights; zeros for the other methods)."""

    def __init__(self, encoder: nn.Module, modules: Mapping[str, nn.Module] | None = None):
        super().__init__()
        self.encoder = encoder
        self.head = None
        self.classifier = None
        for name, module in (modules or {}).items():
            setattr(self, name, module)
        self.register_buffer("centre", torch.zeros(encoder.feature_dim))


def resolve_device(name: str) -> torch.device:
    """ "auto" is CUDA when available, else the CPU; an unavailable device is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: CUDA was requested but is not available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device: MPS was requested but is not available; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def weights_mismatch(err: RuntimeError) -> str:
    """The first line naming a tensor of PyTorch's load_state_dict error, not all of them."""
    lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
    more = f", and {len(lines) - 1} more" if len(lines) > 1 else ""
    return (lines[0].rstrip(".") + more) if lines else str(err).splitlines()[0]
