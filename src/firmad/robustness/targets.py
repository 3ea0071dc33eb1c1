"""Per-image gradient sources for the attacks: targets chosen from the clean images.

A *binder* has ``bind(x0, sign) -> score function`` for the rows ``x0`` (attack direction
``sign``: +1 normals, -1 anomalies); the function it returns gives the gradients of one walk
while the detector's true score still selects the best iterate. A function with a ``start``
attribute (an image per row) makes the first restart start there, projected onto the ε-ball.

- `NearestTarget`: the cosine to one typical bank feature (feature space).
- `ImageTarget`: the squared pixel distance to one typical normal image.
- `TargetStart`: the detector's own score, started at an `ImageTarget`'s image.
- `TwoLogitCE`: the cross-entropy of the score read as a two-logit classifier.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from firmad.errors import ConfigError, InputError
from firmad.robustness.base import ScoreFn

__all__ = ["ImageTarget", "NearestTarget", "TargetStart", "TwoLogitCE"]


class NearestTarget:
    """A per-image targeted gradient source: the cosine to one fixed bank feature.

    ``features(x) -> (N, D)`` maps images to the detector's feature space and ``bank`` (M, D)
    holds the normal features. Candidates are the ``typical`` share of the bank rows most
    similar to their own ``k`` nearest other rows (the most normal normals: the bank row
    nearest to an anomaly is often an odd normal that scores high itself). For each clean
    image, ``bind(x0)`` fixes its nearest candidate (cosine) as the target and returns the
    surrogate score 1 − cos(features(x), target): anomalies are pulled towards one chosen
    typical normal instead of the moving top-k neighbours of a kNN score, normals pushed away
    from it. Use it as a surrogate of ``attack_detector`` (the true score still selects).
    """

    def __init__(
        self, features: Callable[[Tensor], Tensor], bank: Tensor, typical: float = 0.1,
        k: int = 5, name: str = "nearest",
    ) -> None:  # fmt: skip
        if not 0 < typical <= 1:
            raise ConfigError(f"typical must be a share in (0, 1], got {typical!r}.")
        self.features, self.name = features, name
        bank = nn.functional.normalize(bank.detach().double(), dim=1)
        keep = max(1, round(typical * bank.shape[0]))
        self.bank = bank[torch.argsort(_self_similarity(bank, k), descending=True)[:keep]]

    def targets(self, x0: Tensor) -> Tensor:
        """The nearest candidate feature of each clean image (N, D), no gradient."""
        with torch.no_grad():
            f = nn.functional.normalize(self.features(x0).double(), dim=1)
            bank = self.bank.to(f.device)
            return bank[(f @ bank.T).argmax(dim=1)]

    def bind(self, x0: Tensor, sign: Tensor | None = None) -> ScoreFn:
        target = self.targets(x0)

        def surrogate(x: Tensor) -> Tensor:
            f = nn.functional.normalize(self.features(x).double(), dim=1)
            return 1.0 - (f * target).sum(dim=1)

        return surrogate


def _self_similarity(bank: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Per bank row, the mean cosine to its ``k`` nearest other rows (rows L2-normalised)."""
    k = min(k, bank.shape[0] - 1)
    if k < 1:
        return torch.ones(bank.shape[0], dtype=bank.dtype)
    out = []
    for i in range(0, bank.shape[0], chunk):
        sims = bank[i : i + chunk] @ bank.T
        sims[torch.arange(sims.shape[0]), torch.arange(i, i + sims.shape[0])] = -math.inf
        out.append(sims.topk(k, dim=1).values.mean(dim=1))
    return torch.cat(out)


class ImageTarget:
    """A per-image targeted gradient source in pixel space: the squared distance to one normal
    image.

    ``images`` (M, C, H, W) in [0, 1] are normal images (e.g. the training normals) and
    ``scores`` (M,) their anomaly scores; candidates are the ``typical`` share with the lowest
    scores. ``bind(x0)`` fixes for each clean image the candidate nearest to it in the
    detector's feature space (``features``) and returns the surrogate score
    ``mean((x − target)²)``: the attack walks anomalies straight towards a typical normal
    image: the first restart starts at the target projected onto the ε-ball (the pixel blend
    of image and target), where gradient steps on the score alone wander off (see
    benchmarks/RESULTS.md), then follows this gradient. Normals (``bind(x0, sign)`` with
    sign +1) walk the same way towards the target turned by 90 degrees, an outlier.
    """

    def __init__(
        self, features: Callable[[Tensor], Tensor], images: Tensor, scores: Tensor,
        typical: float = 0.1, name: str = "image",
    ) -> None:  # fmt: skip
        if not 0 < typical <= 1:
            raise ConfigError(f"typical must be a share in (0, 1], got {typical!r}.")
        keep = max(1, round(typical * images.shape[0]))
        self.images = images[torch.argsort(scores.to(images.device))[:keep]].detach()
        self.features, self.name = features, name
        with torch.no_grad():
            feats = [features(b) for b in self.images.split(256)]
        self.keys = nn.functional.normalize(torch.cat(feats).double(), dim=1)

    def targets(self, x0: Tensor) -> Tensor:
        """The candidate image nearest (in feature space) to each clean image."""
        with torch.no_grad():
            f = nn.functional.normalize(self.features(x0).double(), dim=1)
            pick = (f @ self.keys.to(f.device).T).argmax(dim=1)
        return self.images[pick.to(self.images.device)].to(x0)

    def bind(self, x0: Tensor, sign: Tensor | None = None) -> ScoreFn:
        target = self.targets(x0)
        if target.shape[1:] != x0.shape[1:]:
            raise InputError(
                f"target images {tuple(target.shape[1:])} and attacked images "
                f"{tuple(x0.shape[1:])} differ in shape; give normal images of the same size."
            )
        pull = torch.ones(x0.shape[0], dtype=torch.float64, device=x0.device)
        if sign is not None and target.shape[-1] == target.shape[-2]:
            # Normals (sign +1) walk towards the target turned by 90 degrees: a typical normal
            # made an outlier (what a rotation-trained detector flags most).
            up = sign.to(x0.device) > 0
            target = torch.where(up.view(-1, 1, 1, 1), target.rot90(1, (-2, -1)), target)
            pull = torch.where(up, -1.0, 1.0).double()

        def surrogate(x: Tensor) -> Tensor:
            return pull * (x - target).square().flatten(1).mean(dim=1).double()

        surrogate.start = target  # the first restart starts at the target, projected
        return surrogate


class TargetStart:
    """The targeted start: the detector's own score ``score_fn`` as the gradient source, with
    the first restart started at ``image_target``'s image for each row (anomalies: a typical
    normal; normals: that normal turned by 90 degrees), projected onto the ε-ball.

    `ImageTarget` walks to its target along the pixel distance and stops there, at that
    normal's score; from the same start this source keeps descending (or climbing) the score
    itself, past the typical normals. Without it, anomalies-only AUROC at a large ε stays near
    the share of normals scored below the targets (benchmarks/RESULTS.md).
    """

    def __init__(self, image_target: ImageTarget, score_fn: ScoreFn, name: str = "start") -> None:
        self.image_target, self.score_fn, self.name = image_target, score_fn, name

    def bind(self, x0: Tensor, sign: Tensor | None = None) -> ScoreFn:
        start = self.image_target.bind(x0, sign).start

        def own_score(x: Tensor) -> Tensor:
            return self.score_fn(x)

        own_score.start = start
        return own_score


class TwoLogitCE:
    """The CE-style member: the score read as a two-logit classifier, logits ``(0, (s - t)/τ)``
    with class 1 = anomaly, and its cross-entropy on the true label as the gradient source.

    ``t`` is the median clean score of the bound rows and ``τ`` their score spread (median
    absolute deviation; 1 where it is 0), so the logit is of order 1. For normals (sign +1) the
    surrogate is ``softplus((s - t)/τ)``, for anomalies ``-softplus(-(s - t)/τ)``: both rise
    with ``s``, so the attack direction is the score's. Its gradient is the score's times
    σ(±(s - t)/τ) > 0, a positive factor per image: sign steps (L∞) and normalised steps (L2)
    move exactly as on the score, except where that factor underflows. The member therefore
    mostly adds one more random start (its own seed), which is how an attack suite with a CE
    loss differs from a score attack on a one-score detector.
    """

    def __init__(self, score_fn: ScoreFn, name: str = "ce") -> None:
        self.score_fn, self.name = score_fn, name

    def bind(self, x0: Tensor, sign: Tensor | None = None) -> ScoreFn:
        with torch.no_grad():
            s0 = self.score_fn(x0).detach().double().reshape(-1)
        t = s0.median()
        tau = float((s0 - t).abs().median()) or 1.0
        up = torch.ones_like(s0) if sign is None else sign.to(s0.device).double()

        def ce(x: Tensor) -> Tensor:
            z = (self.score_fn(x).double().reshape(-1) - t) / tau
            return up * nn.functional.softplus(up * z)

        return ce
