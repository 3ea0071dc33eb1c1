"""The score-based black-box Square attack (Andriushchenko et al. 2020, L∞) on an anomaly
score: no gradients, only score queries. Same conventions and result type as the gradient
attacks (`firmad.robustness.gradient`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from firmad.errors import ConfigError
from firmad.robustness.base import (
    batches,
    check_images,
    check_labels,
    eval_mode,
    score_fn_of,
    targeted_rows,
)
from firmad.robustness.gradient import AttackResult, clean_scores
from firmad.robustness.spec import AttackSpec
from firmad.robustness.walks import objective, tick

__all__ = ["SQUARE_HALVINGS", "run_square", "square_attack", "square_fraction"]

# Iterations (out of 10 000) at which the square's area p is halved (Andriushchenko et al.).
SQUARE_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_fraction(p_init: float, i: int, queries: int) -> float:
    """The share of the image a square covers at iteration ``i`` of ``queries``: ``p_init``
    halved at each of SQUARE_HALVINGS, the schedule rescaled to ``queries`` iterations."""
    at = i * 10000 / max(queries, 1)
    return p_init / 2 ** sum(at > h for h in SQUARE_HALVINGS)


def _square_walk(score_fn, x0: Tensor, sign: Tensor, cfg: dict, gen: torch.Generator):
    """One run of the L∞ Square attack on the rows ``x0``: best images and objectives."""
    n, c, h, w = x0.shape
    eps, queries = cfg["eps"], cfg["steps"]

    def signs(*shape) -> Tensor:
        return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(x0)

    delta = eps * signs(n, c, 1, w).expand(n, c, h, w).clone()  # vertical stripes
    best_obj = objective(score_fn, (x0 + delta).clamp(0, 1), sign, 1)
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    for i in range(1, queries):
        side = max(
            1, min(round(math.sqrt(square_fraction(cfg["p_init"], i, queries) * h * w)), h, w)
        )
        top = torch.randint(0, h - side + 1, (n, 1, 1), generator=gen)
        left = torch.randint(0, w - side + 1, (n, 1, 1), generator=gen)
        window = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
        window = window.unsqueeze(1).to(x0.device)  # (n, 1, h, w)
        value = eps * signs(n, c, 1, 1)
        # A square that would change nothing takes the opposite values.
        same = ((delta == value) | ~window).flatten(1).all(1)
        value[same] = -value[same]
        cand = torch.where(window, value.expand(n, c, h, w), delta)
        obj = objective(score_fn, (x0 + cand).clamp(0, 1), sign, 1)
        better = obj > best_obj  # NaN never wins
        delta[better], best_obj[better] = cand[better], obj[better]
        tick(cfg)
    return (x0 + delta).clamp(0, 1), best_obj


def square_attack(
    detector, x: Tensor, y, *, queries: int = 1000, p_init: float = 0.05,
    on_step: Callable[[int, int], None] | None = None, **settings,
) -> AttackResult:  # fmt: skip
    """Score-based black-box Square attack (Andriushchenko et al. 2020, L∞), on the score.

    No gradients: it starts from vertical stripes of ±ε, then at each of ``queries`` - 1
    iterations sets one random square (area ``p``·H·W, ``p`` from ``p_init`` halved on the
    paper's schedule) of the perturbation to ±ε per channel and keeps the change where the
    score moved in the attack direction. The clean image stays a candidate. Restarts are
    independent runs (seed + r), the best per image kept. Same result type as
    ``attack_detector`` (``attacks == ["square"]``). ``settings``: eps, norm, restarts,
    targets, seed, batch_size, as in ``pgd``.
    """
    allowed = {"eps", "norm", "restarts", "targets", "seed", "batch_size"}
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise TypeError(f"square_attack() got unexpected keyword argument(s) {unknown}")
    spec = AttackSpec(steps=queries, **settings)
    return run_square(detector, x, y, spec, p_init=p_init, on_step=on_step)


def run_square(detector, x, y, spec: AttackSpec, *, p_init: float = 0.05, on_step=None):
    """``square_attack`` with its settings in an `AttackSpec` (``steps`` = queries)."""
    if spec.norm != "linf":
        raise ConfigError("the Square attack is implemented for norm='linf' only.")
    if isinstance(p_init, bool) or not isinstance(p_init, int | float) or not 0 < p_init <= 1:
        raise ConfigError(f"p_init must be a number in (0, 1], got {p_init!r}.")
    x = check_images(x)
    y = check_labels(y, x.shape[0], x.device)
    idx, sign = targeted_rows(y, spec.targets)
    sign = sign.to(x.dtype)
    score_fn = score_fn_of(detector)
    chunks = batches(idx.numel(), spec.batch_size)
    cfg = dict(eps=float(spec.eps), steps=spec.steps, p_init=float(p_init), on_step=on_step, done=0)
    cfg["total"] = spec.restarts * len(chunks) * max(spec.steps - 1, 0)
    images, winner = x.clone(), torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    with eval_mode(detector), torch.no_grad():
        scores = clean_scores(score_fn, x, 1, spec.batch_size)
        if spec.eps > 0 and idx.numel() > 0:
            xs = x[idx]
            best_x, best_obj = xs.clone(), sign.double() * scores[idx]
            for r in range(spec.restarts):
                gen = torch.Generator().manual_seed(int(spec.seed) + r)
                for b in chunks:
                    adv, obj = _square_walk(score_fn, xs[b], sign[b], cfg, gen)
                    better = obj > best_obj[b]
                    best_x[b][better] = adv[better]
                    best_obj[b] = torch.where(better, obj, best_obj[b])
            images[idx] = best_x
            scores[idx] = sign.double() * best_obj
        winner[idx] = 0
    return AttackResult(images, scores, winner, ["square"], {"square": int(idx.numel())})
