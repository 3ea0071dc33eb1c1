"""Gradient attacks on a scalar anomaly score: PGD / APGD, FGSM, and the strongest per image
over several gradient sources (`attack_detector`).

Conventions:

- A *detector* is any object with ``score_tensor(x) -> Tensor (N,)`` or a plain callable
  ``f(x) -> Tensor (N,)``. ``x`` is float (N, C, H, W) in [0, 1]; a higher score means more
  anomalous. Normalisation belongs inside the detector, so ε is measured in [0, 1] pixel space.
- Labels: 1 = anomaly, 0 = normal. The attack pushes normals towards *higher* scores (false
  alarms) and anomalies towards *lower* scores (evasion). ``targets`` chooses which of the two
  groups is attacked; the others come back unchanged.
- Steps: L∞ ``x + α·sign(g)``, L2 ``x + α·g/‖g‖₂``; after every step δ is projected onto the
  ε-ball (L∞: clamp to ±ε, L2: rescale to ‖δ‖₂ ≤ ε) and ``x + δ`` is clamped to [0, 1].
  Default step size α = 2.5·ε/steps.
- ``schedule="apgd"`` replaces the fixed step by the step-size rule of APGD (Croce & Hein 2020,
  "Reliable evaluation of adversarial robustness..."): start at η = 2ε, a momentum of 0.75 on
  the iterates, and at checkpoints (22 %, 41 %, 57 %, 70 %... of the steps) η is halved and the
  attack restarts from its best point wherever progress stalled. Same gradient budget.
- The best iterate per sample (by the true score, in the attack direction) over every step,
  restart and gradient source is returned; the clean image is a candidate too, so the result
  is never weaker than no attack.
- Scores are assumed to be per sample (no interaction between images in a batch), which holds
  for a detector in eval mode. Attacks run in eval mode; the train/eval flags of the detector
  are restored afterwards. Gradients are taken with ``torch.autograd.grad`` w.r.t. the input
  only, so parameter ``.grad`` fields are never touched.
- Random starts come from a ``torch.Generator`` seeded with ``seed`` + the source's index
  (drawn on the CPU, so the same seed gives the same starts on any device). Randomness
  *inside* a stochastic score is the detector's own business; ``eot`` averages over it.
- Work units: one gradient source x one restart x one batch of images. With a ``checkpoint``
  the attack saves its state after finished units when it is interrupted (and at most every
  `CHECKPOINT_EVERY` seconds), and continues from a saved state: the result equals an
  uninterrupted attack's for a deterministic score.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from firmad.errors import ConfigError
from firmad.perturb import project
from firmad.robustness.base import (
    BINDS,
    ScoreFn,
    batches,
    check_images,
    check_labels,
    eval_mode,
    score_fn_of,
    targeted_rows,
)
from firmad.robustness.spec import AttackSpec
from firmad.robustness.walks import WALKS, objective, random_start

__all__ = [
    "CHECKPOINT_EVERY",
    "AttackResult",
    "Checkpoint",
    "attack_detector",
    "clean_scores",
    "fgsm",
    "in_ball",
    "pgd",
    "run_attack",
    "run_sources",
    "surrogates_of",
]

CHECKPOINT_EVERY = 60.0  # seconds between saves of an attack in progress (and at Ctrl-C)


class Checkpoint(Protocol):
    """Where an attack in progress keeps its state: ``load()`` the saved state (a dict of
    tensors and ``done``, or None) and ``save(state)``. `firmad.robustness.resume` checks what
    it loads; `run_attack` checks it again against the images it attacks."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...


@dataclass
class AttackResult:
    """Outcome of ``attack_detector``.

    images: the strongest perturbed images (N, C, H, W); images not targeted are unchanged.
    scores: the true score of ``images`` as used for selection (mean over ``eot``), float64 (N,).
    winner: per image, the index into ``attacks`` of the attack that won, -1 if not targeted.
    attacks: names, ``"exact"`` (or ``"grad_fn"``) first, then ``"surrogate:<name>"``.
    wins: how many targeted images each attack won (ties go to the earlier attack).
    resumed: work units taken from a checkpoint (0 when none), of ``units`` in all.
    """

    images: Tensor
    scores: Tensor
    winner: Tensor
    attacks: list[str]
    wins: dict[str, int] = field(default_factory=dict)
    resumed: int = 0
    units: int = 0


def clean_scores(score_fn: ScoreFn, x: Tensor, eot: int, batch_size: int | None) -> Tensor:
    return torch.cat([objective(score_fn, x[b], 1.0, eot) for b in batches(x.shape[0], batch_size)])


def _bound(source, x0: Tensor, sign: Tensor):
    """The gradient source for the rows ``x0`` (attack direction ``sign``: +1 normals, −1
    anomalies): a source with ``bind(x0, sign)`` (a per-image target chosen from the clean
    images, e.g. `ImageTarget`) is bound to them; a plain score function is used as is."""
    bind = getattr(source, "bind", None)
    return bind(x0, sign) if callable(bind) else source


def _walk_settings(spec: AttackSpec, on_step, total: int) -> dict:
    """The dict the walks read (`firmad.robustness.walks`)."""
    return dict(
        norm=spec.norm, eps=float(spec.eps), steps=spec.steps, restarts=spec.restarts,
        eot=spec.eot, alpha=spec.alpha, random_start=spec.random_start,
        batch_size=spec.batch_size, schedule=spec.schedule, on_step=on_step, done=0,
        total=total,
    )  # fmt: skip


class _Strongest:
    """One walk per gradient source, restart and batch, in that order (seed + i for the i-th
    source); per row the best images, their objective and the index of the source that won
    (ties go to the earlier one). ``state`` holds what is finished: ``done`` units, the best
    over finished sources (``best_*``) and the source in progress (``src_*``)."""

    def __init__(self, score_fn, sources: list, x: Tensor, sign: Tensor, cfg: dict, seed: int):
        self.score_fn, self.sources, self.x, self.sign = score_fn, sources, x, sign
        self.cfg, self.seed = cfg, seed
        self.chunks = batches(x.shape[0], cfg["batch_size"])
        self.per_source = cfg["restarts"] * len(self.chunks)
        self.units = len(sources) * self.per_source
        self.state: dict[str, Any] = {"done": 0}

    def run(self, checkpoint: Checkpoint | None) -> tuple[Tensor, Tensor, Tensor]:
        self.last_save = time.monotonic()
        try:
            for i, source in enumerate(self.sources):
                if self.state["done"] >= (i + 1) * self.per_source:
                    continue  # this source is finished and merged
                self._source(i, source, checkpoint)
        except KeyboardInterrupt:
            if checkpoint is not None and 0 < self.state["done"] < self.units:
                checkpoint.save(self.state)
            raise
        st = self.state
        return st["best_x"], st["best_obj"], st["best_i"]

    def _source(self, i: int, source, checkpoint: Checkpoint | None) -> None:
        x, sign, cfg = self.x, self.sign, self.cfg
        gen = torch.Generator().manual_seed(int(self.seed) + i)
        if "src_x" not in self.state:
            eot = cfg["eot"]
            obj = torch.cat([objective(self.score_fn, x[b], sign[b], eot) for b in self.chunks])
            self.state = {**self.state, "src_x": x.clone(), "src_obj": obj}
        unit = i * self.per_source
        for r in range(cfg["restarts"]):
            # One draw for all images per restart, so results do not depend on batch_size.
            start = random_start(x, cfg["norm"], cfg["eps"], gen) if cfg["random_start"] else x
            for b in self.chunks:
                unit += 1
                if unit <= self.state["done"]:
                    continue  # finished before an interruption
                self._walk(source, r, b, start)
                self._finish_unit(i, unit)
                if checkpoint is not None and time.monotonic() - self.last_save > CHECKPOINT_EVERY:
                    checkpoint.save(self.state)
                    self.last_save = time.monotonic()

    def _walk(self, source, r: int, b: slice, start: Tensor) -> None:
        """Walk the rows ``b`` from restart ``r``'s start; keep what beats the source's best."""
        x, sign, cfg = self.x, self.sign, self.cfg
        bound = _bound(source, x[b], sign[b])
        first = getattr(bound, "start", None) if r == 0 else None  # a target's own start
        first = start[b] if first is None else project(first, x[b], cfg["norm"], cfg["eps"])
        walk = WALKS[cfg["schedule"]]
        run_x, run_obj = walk(self.score_fn, bound, x[b], first.clone(), sign[b], cfg)
        src_x, src_obj = self.state["src_x"].clone(), self.state["src_obj"].clone()
        better = run_obj > src_obj[b]  # ties keep the earlier candidate
        src_x[b][better] = run_x[better]
        src_obj[b] = torch.where(better, run_obj, src_obj[b])
        self.state = {**self.state, "src_x": src_x, "src_obj": src_obj}

    def _finish_unit(self, i: int, unit: int) -> None:
        """Count the unit; after a source's last one, merge it into the best over sources.
        The state is replaced in one assignment, so Ctrl-C never leaves half an update."""
        st = dict(self.state, done=unit)
        if unit % self.per_source == 0:
            adv, obj = st.pop("src_x"), st.pop("src_obj")
            if "best_x" not in st:
                best_i = torch.zeros(self.x.shape[0], dtype=torch.long, device=self.x.device)
                st.update(best_x=adv, best_obj=obj, best_i=best_i)
            else:
                better = obj > st["best_obj"]
                best_x, best_i = st["best_x"].clone(), st["best_i"].clone()
                best_x[better], best_i[better] = adv[better], i
                st.update(best_x=best_x, best_obj=torch.where(better, obj, st["best_obj"]),
                          best_i=best_i)  # fmt: skip
        self.state = st

    def restore(self, saved: dict[str, Any] | None) -> int:
        """Continue from ``saved`` when it fits these images and settings; the units taken."""
        if saved is None:
            return 0
        state = _valid_state(saved, self)
        if state is None:
            return 0
        self.state = state
        self.cfg["done"] = state["done"] * self.cfg["steps"]
        return state["done"]


def _valid_state(saved: dict[str, Any], run: _Strongest) -> dict[str, Any] | None:
    """``saved`` on this device when every tensor has its shape, every image lies in the
    ε-ball around its clean row and in [0, 1], and every stored objective is the true one of
    its image (so a state that does not belong here is recomputed, never used)."""
    x, cfg = run.x, run.cfg
    done = saved.get("done")
    if isinstance(done, bool) or not isinstance(done, int) or not 0 < done < run.units:
        return None
    keys = (("best_x", "best_obj", "best_i") if done >= run.per_source else ()) + (
        ("src_x", "src_obj") if done % run.per_source else ()
    )
    state: dict[str, Any] = {"done": done}
    for k in keys:
        t = saved.get(k)
        want = x.shape if k.endswith("_x") else (x.shape[0],)
        if not isinstance(t, Tensor) or tuple(t.shape) != tuple(want):
            return None
        state[k] = t.to(x.device, dtype=x.dtype if k.endswith("_x") else t.dtype)
    for prefix in ("best", "src"):
        if f"{prefix}_x" in state and not _fits(state, prefix, run, cfg):
            return None
    if "best_i" in state:
        i = state["best_i"]
        if i.dtype != torch.long or bool((i < 0).any() | (i >= len(run.sources)).any()):
            return None
    return state


def in_ball(adv: Tensor, x: Tensor, norm: str, eps: float) -> bool:
    """Whether every row of ``adv`` lies in [0, 1] and in the ε-ball around its row of ``x``
    (up to float rounding)."""
    if not bool(torch.isfinite(adv).all()) or adv.min() < 0 or adv.max() > 1:
        return False
    d = (adv - x).flatten(1).double()
    size = d.abs().amax(dim=1) if norm == "linf" else d.norm(dim=1)
    return bool((size <= eps * (1 + 1e-5) + 1e-6).all())


def _fits(state: dict, prefix: str, run: _Strongest, cfg: dict) -> bool:
    """The images of ``state`` are in the ball and their objective is the true one (up to the
    rounding of a forward pass with or without autograd)."""
    adv, obj = state[f"{prefix}_x"], state[f"{prefix}_obj"]
    if obj.dtype != torch.float64 or not in_ball(adv, run.x, cfg["norm"], cfg["eps"]):
        return False
    with torch.no_grad():
        true = torch.cat([objective(run.score_fn, adv[b], run.sign[b], cfg["eot"])
                          for b in run.chunks])  # fmt: skip
    return bool(torch.allclose(true, obj, rtol=1e-5, atol=1e-7))


def _attack(detector, x, y, grad_fns: dict, spec: AttackSpec, hooks=(None, None)) -> AttackResult:
    """Shared core of ``pgd`` and ``attack_detector``: one PGD run per gradient source
    (None = the detector's own score, seed + i for the i-th), best per image by the score.
    ``hooks``: (on_step, checkpoint)."""
    on_step, checkpoint = hooks
    x = check_images(x)
    y = check_labels(y, x.shape[0], x.device)
    idx, sign = targeted_rows(y, spec.targets)
    sign = sign.to(x.dtype)
    score_fn = score_fn_of(detector)
    sources = [None if g is None else _source_of(g) for g in grad_fns.values()]
    total = len(sources) * spec.restarts * len(batches(idx.numel(), spec.batch_size)) * spec.steps
    cfg = _walk_settings(spec, on_step, total)
    images = x.clone()
    winner = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    resumed = units = 0
    with eval_mode(detector, *(g for g in grad_fns.values() if g is not None)):
        scores = clean_scores(score_fn, x, spec.eot, spec.batch_size)
        if spec.eps > 0 and idx.numel() > 0:
            run = _Strongest(score_fn, sources, x[idx], sign, cfg, spec.seed)
            units = run.units
            resumed = run.restore(checkpoint.load() if checkpoint is not None else None)
            best_x, best_obj, best_i = run.run(checkpoint)
            images[idx] = best_x
            scores[idx] = sign.double() * best_obj  # sign is ±1: objective back to score
            winner[idx] = best_i
        else:
            winner[idx] = 0
    names = list(grad_fns)
    wins = {name: int((winner == i).sum()) for i, name in enumerate(names)}
    return AttackResult(images, scores, winner, names, wins, resumed, units)


def pgd(detector, x: Tensor, y, *, grad_fn: ScoreFn | None = None, **settings) -> Tensor:
    """Projected gradient attack on an anomaly score; returns the perturbed images.

    Args:
        detector: object with ``score_tensor(x)`` or a callable ``f(x) -> (N,)``; higher =
            more anomalous. Its score selects the best iterate.
        x: float images (N, C, H, W) in [0, 1].
        y: labels (N,), 1 = anomaly, 0 = normal. Normals are pushed up, anomalies down.
        grad_fn: optional surrogate score (callable or detector, same input space and
            direction) that provides the gradients; the true score still selects the best
            iterate.
        settings: the fields of `AttackSpec` by keyword:
            eps: radius of the perturbation in [0, 1] pixel space (L∞ or L2); 0 = no attack.
            norm: ``"linf"`` or ``"l2"``. steps: gradient steps per restart.
            step_size: α (the first η with ``schedule="apgd"``); default 2.5·eps/steps (APGD:
                2·eps).
            restarts: independent random starts; the best iterate over all of them is kept.
            targets: ``"both"``, ``"normal"`` (false alarms only) or ``"anomaly"`` (evasion
                only); images not targeted are returned unchanged.
            eot: evaluations averaged per step (gradient and selection score) for stochastic
                scores.
            random_start: uniform start in the ε-ball (see ``random_delta``); else start at x.
            seed: seeds the ``torch.Generator`` of the random starts.
            batch_size: images per forward/backward pass; None = all at once.
            schedule: ``"fixed"`` (step α throughout) or ``"apgd"`` (APGD's halving step size
                with momentum; see the module docstring).
    """
    spec = AttackSpec(**settings)
    grad_fns = {"exact" if grad_fn is None else "grad_fn": grad_fn}
    return _attack(detector, x, y, grad_fns, spec).images


def fgsm(detector, x: Tensor, y, *, eps: float, grad_fn: ScoreFn | None = None, **settings):
    """One gradient step of size ε from the clean image (no random start); the clean image is
    kept where the step does not help. ``settings``: norm, targets, eot, batch_size, as in
    ``pgd``."""
    allowed = {"norm", "targets", "eot", "batch_size"}
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise TypeError(f"fgsm() got unexpected keyword argument(s) {unknown}")
    step = eps if isinstance(eps, int | float) and not isinstance(eps, bool) and eps > 0 else None
    return pgd(
        detector, x, y, eps=eps, steps=1, step_size=step, restarts=1, random_start=False,
        grad_fn=grad_fn, **settings,
    )  # fmt: skip


def _source_of(g):
    """A gradient source: a binder (``bind(x0)``) as is, else its score function."""
    return g if callable(getattr(g, "bind", None)) else score_fn_of(g)


def surrogates_of(detector, surrogates) -> dict[str, Any]:
    """The surrogate gradient sources of an attack: none (False / None), the detector's own
    ``surrogate_scores()`` (True), or the mapping name -> score function (or binder) given."""
    if surrogates is False or surrogates is None:
        return {}
    if surrogates is True:
        offer = getattr(detector, "surrogate_scores", None)
        if not callable(offer):
            return {}
        surrogates = offer()
    if not isinstance(surrogates, Mapping):
        raise ConfigError(
            "surrogates must be True/False or a mapping name -> score function; "
            f"got {type(surrogates).__name__}."
        )
    for name, fn in surrogates.items():
        if not any(callable(f) for f in (fn, *(getattr(fn, a, None) for a in BINDS))):
            raise ConfigError(f"surrogate {name!r} is not callable; pass f(x) -> Tensor (N,).")
    return dict(surrogates)


def attack_detector(
    detector, x: Tensor, y, *, surrogates: bool | Mapping[str, ScoreFn] = True,
    on_step: Callable[[int, int], None] | None = None, **settings,
) -> AttackResult:  # fmt: skip
    """The exact attack plus one attack per surrogate score; keeps the strongest per image.

    The exact attack takes gradients from the detector's own score (it is ``pgd`` with the
    same settings). With ``surrogates=True`` and a detector offering ``surrogate_scores()``,
    each surrogate provides the gradients of one more PGD run (seed + i) while the true score
    selects the best iterate; a mapping name -> score function may be passed instead. Per
    image the result with the best true score in the attack direction is kept. ``settings``:
    the fields of `AttackSpec`, as in ``pgd``. ``on_step(done, total)`` is called after every
    gradient step (total: steps x restarts x batches x attacks), e.g. for a progress bar.
    """
    spec = AttackSpec(**settings)
    return run_attack(detector, x, y, spec, surrogates=surrogates, on_step=on_step)


def run_sources(detector, x: Tensor, y, spec: AttackSpec, sources: Mapping) -> AttackResult:
    """One walk per gradient source of ``sources`` (name -> None for the detector's own score,
    a score function, a detector or a binder; seed + i for the i-th), the best per image: the
    members of an attack, run alone or together with the same randomness."""
    return _attack(detector, x, y, dict(sources), spec)


def run_attack(
    detector, x: Tensor, y, spec: AttackSpec, *, surrogates: bool | Mapping = True,
    on_step: Callable[[int, int], None] | None = None, checkpoint: Checkpoint | None = None,
) -> AttackResult:  # fmt: skip
    """``attack_detector`` with its settings in an `AttackSpec`; ``checkpoint`` keeps the
    finished work units of an interrupted attack (see `Checkpoint`)."""
    sources = {"exact": None}
    sources.update({f"surrogate:{k}": f for k, f in surrogates_of(detector, surrogates).items()})
    return _attack(detector, x, y, sources, spec, (on_step, checkpoint))
