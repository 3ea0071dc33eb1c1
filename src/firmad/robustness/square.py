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
from firmad.robustness.gradient import AttackResult, clean_scores, in_ball
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


def run_square(detector, x, y, spec: AttackSpec, *, p_init: float = 0.05, on_step=None,
               checkpoint=None) -> AttackResult:  # fmt: skip
    """``square_attack`` with its settings in an `AttackSpec` (``steps`` = queries);
    ``checkpoint`` keeps the finished batches of an interrupted attack, as for `run_attack`."""
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
    resumed = 0
    with eval_mode(detector), torch.no_grad():
        scores = clean_scores(score_fn, x, 1, spec.batch_size)
        if spec.eps > 0 and idx.numel() > 0:
            run = _Squares(score_fn, x[idx], sign, cfg, chunks)
            start = {"best_x": x[idx].clone(), "best_obj": sign.double() * scores[idx]}
            resumed = run.restore(checkpoint.load() if checkpoint else None, start, spec)
            best_x, best_obj = run.run(spec, checkpoint)
            images[idx] = best_x
            scores[idx] = sign.double() * best_obj
        winner[idx] = 0
    units = spec.restarts * len(chunks)
    return AttackResult(images, scores, winner, ["square"], {"square": int(idx.numel())},
                        resumed, units)  # fmt: skip


class _Squares:
    """The Square attack's work units: one restart (seed + r, its generator shared by the
    batches in order) x one batch; ``state`` holds what is finished (``done``, the best images
    and objectives, the generator of the restart in progress)."""

    def __init__(self, score_fn, x: Tensor, sign: Tensor, cfg: dict, chunks: list[slice]):
        self.score_fn, self.x, self.sign, self.cfg, self.chunks = score_fn, x, sign, cfg, chunks
        self.state: dict = {}

    def restore(self, saved, start: dict, spec: AttackSpec) -> int:
        """Continue from ``saved`` when its images lie in the ball, its objectives are the
        true ones and its count fits; else start afresh. The units taken."""
        self.state = {"done": 0, **start}
        units = spec.restarts * len(self.chunks)
        if not isinstance(saved, dict) or not isinstance(saved.get("gen"), Tensor):
            return 0
        done, adv, obj = saved.get("done"), saved.get("best_x"), saved.get("best_obj")
        ok = isinstance(done, int) and 0 < done < units and isinstance(adv, Tensor)
        ok = ok and isinstance(obj, Tensor) and adv.shape == self.x.shape
        ok = ok and obj.shape == (self.x.shape[0],) and obj.dtype == torch.float64
        if ok:
            adv = adv.to(self.x)
            true = objective(self.score_fn, (adv).clamp(0, 1), self.sign, 1)
            ok = in_ball(adv, self.x, "linf", self.cfg["eps"]) and bool(
                torch.allclose(true, obj.to(true), rtol=1e-5, atol=1e-7)
            )
        if not ok:
            return 0
        self.state = {"done": done, "best_x": adv, "best_obj": obj.to(self.x.device),
                      "gen": saved["gen"].to(torch.uint8)}  # fmt: skip
        self.cfg["done"] = done * max(self.cfg["steps"] - 1, 0)
        return done

    def run(self, spec: AttackSpec, checkpoint) -> tuple[Tensor, Tensor]:
        try:
            unit = 0
            for r in range(spec.restarts):
                gen = torch.Generator().manual_seed(int(spec.seed) + r)
                for b in self.chunks:
                    unit += 1
                    if unit <= self.state["done"]:
                        if unit == self.state["done"]:
                            gen.set_state(self.state["gen"])
                        continue
                    self._unit(b, gen, unit)
        except KeyboardInterrupt:
            if checkpoint is not None and self.state["done"] > 0:
                checkpoint.save(self.state)
            raise
        return self.state["best_x"], self.state["best_obj"]

    def _unit(self, b: slice, gen: torch.Generator, unit: int) -> None:
        adv, obj = _square_walk(self.score_fn, self.x[b], self.sign[b], self.cfg, gen)
        best_x, best_obj = self.state["best_x"].clone(), self.state["best_obj"].clone()
        better = obj > best_obj[b]
        best_x[b][better] = adv[better]
        best_obj[b] = torch.where(better, obj, best_obj[b])
        self.state = {"done": unit, "best_x": best_x, "best_obj": best_obj,
                      "gen": gen.get_state()}  # fmt: skip
