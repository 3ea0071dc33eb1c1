"""One walk of a gradient attack from a start point: fixed-step PGD or APGD's schedule.

A walk attacks the rows ``x0`` in the direction ``sign`` (+1 normals: raise the score, -1
anomalies: lower it) from ``start``; gradients come from ``grad_fn`` (a surrogate) or the
score, the true score selects the best iterate. ``cfg`` holds the settings (norm, eps, steps,
alpha, eot) and the step counter read by `tick` (on_step, done, total).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from firmad.perturb import ascent_step, project, random_delta
from firmad.robustness.base import ScoreFn, call_scores

__all__ = [
    "APGD_MOMENTUM",
    "APGD_RHO",
    "WALKS",
    "apgd_checkpoints",
    "ascent",
    "objective",
    "random_start",
    "tick",
    "walk_apgd",
    "walk_fixed",
]


def random_start(x: Tensor, norm: str, eps: float, gen: torch.Generator) -> Tensor:
    delta = random_delta(x.shape, norm, eps, gen)
    return project(x + delta.to(device=x.device, dtype=x.dtype), x, norm, eps)


def objective(fn: ScoreFn, x: Tensor, sign: Tensor | float, eot: int) -> Tensor:
    """Mean over ``eot`` evaluations of sign·score (higher = stronger attack), float64."""
    with torch.no_grad():
        return sum(sign * call_scores(fn, x).detach().double() for _ in range(eot)) / eot


def gradient(fn: ScoreFn, x: Tensor, sign: Tensor, eot: int) -> tuple[Tensor, Tensor]:
    """Gradient of sign·score w.r.t. the input (mean over ``eot``) and the objective (float64).

    Only the input gets a gradient (``torch.autograd.grad``); a score without a graph gives a
    zero gradient and a warning (Python shows it once per session by default).
    """
    grad = torch.zeros_like(x)
    obj = torch.zeros(x.shape[0], device=x.device, dtype=torch.float64)
    for _ in range(eot):
        xi = x.detach().requires_grad_(True)
        with torch.enable_grad():
            s = call_scores(fn, xi)
            g = None
            if s.requires_grad:
                (g,) = torch.autograd.grad((sign * s).sum(), xi, allow_unused=True)
        if g is None:
            warnings.warn(
                "the score has no gradient w.r.t. the input (detached, no_grad or a non-torch "
                "backend); the attack is blind: only random starts and best-iterate selection "
                "act. Pass a differentiable surrogate (grad_fn / surrogate_scores).",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            grad += torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        obj += sign.double() * s.detach().double()
    return grad / eot, obj / eot


def ascent(score_fn: ScoreFn, grad_fn: ScoreFn | None, x: Tensor, sign: Tensor, eot: int):
    """The gradient at ``x`` (from ``grad_fn`` or the score) and the objective that selects
    iterates, always the true score's: taken from the same forward pass as the gradient when
    no separate ``grad_fn`` is given."""
    grad, obj = gradient(grad_fn or score_fn, x, sign, eot)
    if grad_fn is not None:
        obj = objective(score_fn, x, sign, eot)
    return grad, obj


def walk_fixed(score_fn, grad_fn, x0: Tensor, start: Tensor, sign: Tensor, cfg: dict):
    """Fixed-step PGD from ``start``: the best of iterates 0..steps and its objective."""
    norm, eps, steps, alpha, eot = cfg["norm"], cfg["eps"], cfg["steps"], cfg["alpha"], cfg["eot"]
    cur = start
    run_x, run_obj = start.clone(), torch.full_like(sign, -math.inf, dtype=torch.float64)
    for k in range(steps + 1):
        if k < steps:
            grad, obj = ascent(score_fn, grad_fn, cur, sign, eot)
        else:
            obj = objective(score_fn, cur, sign, eot)
        better = obj > run_obj  # NaN never wins
        run_x[better], run_obj[better] = cur[better], obj[better]
        if k < steps:
            cur = project(ascent_step(cur, grad, norm, alpha), x0, norm, eps)
            tick(cfg)
    return run_x, run_obj


APGD_MOMENTUM = 0.75  # weight of the new step against the previous direction (Croce & Hein)
APGD_RHO = 0.75  # at a checkpoint, halve η if fewer than this share of steps made progress


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations at which APGD may halve its step: p0 = 0, p1 = 0.22,
    p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06), times ``steps``."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(round(q * steps, 9)) for q in p[1:]} - {0, steps})


def walk_apgd(score_fn, grad_fn, x0: Tensor, start: Tensor, sign: Tensor, cfg: dict):
    """APGD from ``start`` (per image): η starts at ``cfg["alpha"]`` and the iterates move with
    momentum; at each checkpoint an image whose objective rose in fewer than 75 % of the steps
    since the last one, or whose η and best objective did not change, halves η and jumps back
    to its best point. Returns the best iterate and its objective, as ``walk_fixed``."""
    norm, eps, steps, eot = cfg["norm"], cfg["eps"], cfg["steps"], cfg["eot"]
    checkpoints = set(apgd_checkpoints(steps))
    shape = (-1,) + (1,) * (start.ndim - 1)
    cur = prev = start
    grad, obj = ascent(score_fn, grad_fn, cur, sign, eot)
    run_x, run_obj, run_grad = cur.clone(), torch.full_like(obj, -math.inf), grad.clone()
    better = obj > run_obj  # NaN never wins
    run_obj[better] = obj[better]
    eta = torch.full((cur.shape[0],), cfg["alpha"], dtype=cur.dtype, device=cur.device)
    rises = torch.zeros_like(obj)
    last_check, eta_at_check, best_at_check = 0, eta.clone(), run_obj.clone()
    for k in range(steps):
        z = project(ascent_step(cur, grad, norm, eta.view(shape)), x0, norm, eps)
        a = 1.0 if k == 0 else APGD_MOMENTUM
        prev, cur = cur, project(cur + a * (z - cur) + (1 - a) * (cur - prev), x0, norm, eps)
        last = k + 1 == steps
        if last:
            new_obj = objective(score_fn, cur, sign, eot)
        else:
            grad, new_obj = ascent(score_fn, grad_fn, cur, sign, eot)
        rises += (new_obj > obj).double()
        obj = new_obj
        better = obj > run_obj
        run_x[better], run_obj[better] = cur[better], obj[better]
        if not last:
            run_grad[better] = grad[better]
        if k + 1 in checkpoints:
            stalled = (rises < APGD_RHO * (k + 1 - last_check)) | (
                (eta == eta_at_check) & (run_obj == best_at_check)
            )
            eta_at_check, best_at_check = eta.clone(), run_obj.clone()
            eta = torch.where(stalled, eta / 2, eta)
            cur, prev, grad = cur.clone(), prev.clone(), grad.clone()
            cur[stalled], prev[stalled] = run_x[stalled], run_x[stalled]
            grad[stalled], obj[stalled] = run_grad[stalled], run_obj[stalled]
            rises.zero_()
            last_check = k + 1
        tick(cfg)
    return run_x, run_obj


WALKS = {"fixed": walk_fixed, "apgd": walk_apgd}


def tick(cfg: dict) -> None:
    """One gradient step done: tell ``cfg["on_step"]`` (done, total) if there is one."""
    if cfg.get("on_step") is not None:
        cfg["done"] += 1
        cfg["on_step"](cfg["done"], cfg["total"])
