"""Perturbations in [0, 1] pixel space: ε-ball projections, random starts and ascent steps.

Shared by the attacks on detectors (`firmad.robustness`) and adversarial training (the trainer):
L∞ steps are α·sign(g), L2 steps α·g/‖g‖₂ per sample; every iterate is projected onto the
ε-ball around the clean images and onto [0, 1].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def attack_name(settings: dict) -> str:
    """Square, PGD or APGD, from an attack's settings (those written before the schedule
    existed are PGD), "ensemble APGD" for the ensemble mode."""
    if settings.get("attack") == "square":
        return "Square"
    name = "APGD" if settings.get("schedule") == "apgd" else "PGD"
    return f"ensemble {name}" if settings.get("attack") == "ensemble" else name


def _per_sample_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.ndim - 1)))


def project(x_adv: Tensor, x: Tensor, norm: str, eps: float) -> Tensor:
    """Project ``x_adv`` onto the ε-ball around ``x`` intersected with [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        scale = (eps / _per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        delta = delta * scale
    return (x + delta).clamp(0.0, 1.0)


def random_delta(
    shape: torch.Size, norm: str, eps: float, gen: torch.Generator, dtype=torch.float64
) -> Tensor:
    """A random start δ, drawn on the generator's device. L∞: uniform in [-ε, ε]^d. L2:
    uniform in the L2 ball (Gaussian direction, radius ε·u^(1/d)), which for image-sized d lies
    almost on the sphere."""
    device = gen.device
    if norm == "linf":
        return (torch.rand(shape, generator=gen, dtype=dtype, device=device) * 2 - 1) * eps
    direction = torch.randn(shape, generator=gen, dtype=dtype, device=device)
    direction = direction / _per_sample_norm(direction).clamp_min(1e-12)
    d = math.prod(shape[1:])
    u = torch.rand(shape[0], generator=gen, dtype=dtype, device=device)
    radius = eps * u.pow(1.0 / d)
    return direction * radius.view(-1, *([1] * (len(shape) - 1)))


def ascent_step(x_adv: Tensor, grad: Tensor, norm: str, alpha: float) -> Tensor:
    """One step of size α up the gradient: L∞ ``α·sign(g)``, L2 ``α·g/‖g‖₂`` (per sample)."""
    if norm == "linf":
        return x_adv + alpha * grad.sign()
    return x_adv + alpha * grad / _per_sample_norm(grad).clamp_min(1e-12)
