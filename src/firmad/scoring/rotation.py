"""The rotation scorer: how badly a linear read-out of the features predicts an image's rotation.

A shifting-transformation score in the sense of GEOM (Golan & El-Yaniv 2018) and CSI's s_shift
(Tack et al. 2020), on a trained encoder's frozen features: a multinomial logistic regression
learns, from the normal training features at the 4 rotations, which rotation a feature comes
from; the score of a feature given at rotation ``a`` is ``-log p(a | feature)``. Normal images
show their rotation clearly; an image of another kind (a trouser to a detector of T-shirts)
does not. Under the ``angled`` variant the score is the mean over the 4 rotations (GEOM's
score with rotations only); under ``plain``, ``-log p(upright | features)``.

It is fitted on the features of all 4 rotations at once, so `VariantScorer` gives it the banks
of every rotation (``fits_on_angles``) and the rotation of the copy it fits (``angle``); the
angled variant's other copies read the same classifier at their own rotation (`at_angle`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch

from firmad.errors import ConfigError, InputError
from firmad.scoring.base import Scorer, as_features
from firmad.scoring.features import ANGLES
from firmad.scoring.specs import register_scorer

MIN_SCALE = 1e-6  # a feature dimension constant over the bank is not divided by ~0


def rotation_index(angle: int) -> torch.Tensor:
    """The class index of a rotation, as the buffer a copy of the scorer reads."""
    if angle not in ANGLES:
        raise InputError(f"rotation: angle must be one of {ANGLES}, got {angle!r}.")
    return torch.tensor(ANGLES.index(angle))


def rotation_nll(fitted, x: torch.Tensor) -> torch.Tensor:
    """``-log p(rotation | x)`` for prepared features ``x``, read from a fitted rotation
    classifier's buffers (``mean_``, ``scale_``, ``weight_``, ``bias_``, ``target_``): the
    rotation scorer's and `maha_rotation`'s."""
    logits = ((x - fitted.mean_) / fitted.scale_) @ fitted.weight_.T + fitted.bias_
    return -torch.log_softmax(logits, dim=1).index_select(1, fitted.target_.reshape(1))[:, 0]


@register_scorer
class RotationScorer(Scorer):
    """``-log p(rotation | features)`` by a logistic regression of the 4 rotations (L2 penalty
    ``c`` as scikit-learn's ``C``, on features standardised over the bank)."""

    name = "rotation"
    fitted = ("mean_", "scale_", "weight_", "bias_", "target_")
    fits_on_angles = True

    def __init__(self, c: float = 0.1, max_iter: int = 1000) -> None:
        super().__init__()
        if isinstance(c, bool) or not isinstance(c, int | float) or not 0 < float(c) < np.inf:
            raise ConfigError(f"rotation: c must be a finite number > 0, got {c!r}.")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ConfigError(f"rotation: max_iter must be an integer >= 1, got {max_iter!r}.")
        self.c, self.max_iter = float(c), int(max_iter)

    def fit(self, bank, angle: int = 0) -> RotationScorer:
        """``bank``: {rotation: normal training features at that rotation} for all of
        `ANGLES`; ``angle``: the rotation whose probability this copy scores."""
        from sklearn.linear_model import LogisticRegression

        if not isinstance(bank, Mapping) or set(bank) != set(ANGLES):
            raise InputError(
                "the rotation scorer is fitted on the features of the 4 rotations "
                f"{{angle: features}} for angles {ANGLES}; fit it through VariantScorer "
                "(any variant), which extracts them."
            )
        target = rotation_index(angle)
        feats = [as_features(bank[a], "bank features").detach().double().cpu() for a in ANGLES]
        x = torch.cat(feats)
        if min(f.shape[0] for f in feats) < 2:
            raise InputError("rotation needs a bank of at least 2 features per rotation.")
        mean, scale = x.mean(0), x.std(0).clamp_min(MIN_SCALE)
        y = np.repeat(np.arange(len(ANGLES)), [f.shape[0] for f in feats])
        lr = LogisticRegression(C=self.c, max_iter=self.max_iter)
        lr.fit(((x - mean) / scale).numpy(), y)
        self.mean_, self.scale_ = mean, scale
        self.weight_ = torch.from_numpy(lr.coef_).double()
        self.bias_ = torch.from_numpy(lr.intercept_).double()
        self.target_ = target
        return self

    def at_angle(self, angle: int) -> RotationScorer:
        """A copy of this fitted scorer that scores the probability of ``angle`` instead."""
        self._check_fitted()
        other = copy.deepcopy(self)
        other.target_ = rotation_index(angle)
        return other

    def forward(self, features) -> torch.Tensor:
        x = self.prepare(features)
        self._check_dim(x, self.mean_.shape[0])
        return rotation_nll(self, x)

    def explain_scale(self, n_bank) -> str:
        return (
            "minus the log-probability that the image shows the rotation it was given, by a "
            "linear classifier of the 4 rotations fitted on the features of the "
            f"{n_bank} normal training images: 0 is certain, {np.log(len(ANGLES)):.2f} "
            "(log 4) is a guess, higher values mean the classifier sees another rotation."
        )
