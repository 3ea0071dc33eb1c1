"""The FIRM paper's projection head (used in training only, discarded at test time)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from firmad.errors import ConfigError

__all__ = ["HeadSettings", "ProjectionHead", "build_head", "check_head_settings"]


@dataclass(frozen=True)
class HeadSettings:
    """The projection head's sizes (`build_head`): the paper's defaults."""

    hidden: int = 1024
    out_dim: int = 128
    depth: int = 8


class ProjectionHead(nn.Module):
    """MLP of bias-free linear layers, BN + ReLU between them, a final BN without affine
    parameters, and an L2-normalised output. Attributes ``in_dim``, ``out_dim``, ``depth``."""

    def __init__(self, in_dim: int, hidden: int = 1024, out_dim: int = 128, depth: int = 8):
        super().__init__()
        self.in_dim, self.depth = in_dim, depth
        if depth == 0:
            self.mlp: nn.Module = nn.Identity()
            self.out_dim = in_dim
            return
        dims = [in_dim] + [hidden] * (depth - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=False))
            if i < depth - 1:
                layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.mlp = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=1)


def _is_int(v: object) -> bool:
    """An integer (numpy's too) or a whole float, but not a bool."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return False
    return isinstance(v, numbers.Integral) or float(v).is_integer()


def check_head_settings(*, hidden: int, out_dim: int, depth: int) -> None:
    """Check the head's sizes; ConfigError names the recipe key (``model.head_*``).

    The one check of these values: the config calls it before any work starts, and
    `build_head` calls it when used directly.
    """
    for key, v in (("head_hidden", hidden), ("head_out", out_dim)):
        if not _is_int(v) or v < 1:
            raise ConfigError(f"model.{key}: must be an integer >= 1, got {v!r}")
    if not _is_int(depth) or depth < 0:
        raise ConfigError(f"model.head_depth: must be an integer >= 0, got {depth!r}")


def build_head(in_dim: int, hidden: int = 1024, out_dim: int = 128, depth: int = 8) -> nn.Module:
    """The paper's head: ``depth`` bias-free linear layers in_dim -> hidden, (depth - 2) x
    hidden -> hidden, hidden -> out_dim; BatchNorm1d + ReLU after each but the last;
    BatchNorm1d(out_dim, affine=False) at the end; output L2-normalised.

    ``depth=1``: one linear in_dim -> out_dim plus the final BN. ``depth=0``: identity followed by
    L2 normalisation (for debugging; ``out_dim`` is then ``in_dim``). Like any BatchNorm network it
    needs batches of at least 2 samples in training mode.
    """
    if not _is_int(in_dim) or in_dim < 1:
        raise ConfigError(f"head in_dim must be a positive integer; got {in_dim!r}")
    check_head_settings(hidden=hidden, out_dim=out_dim, depth=depth)
    return ProjectionHead(int(in_dim), int(hidden), int(out_dim), int(depth))
