"""A scorer combining two: Mahalanobis and the rotation scorer, each standardised on the bank.

Its own module because it builds on two built-in scorers' modules (`scorers`, `rotation`),
neither of which imports it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch

from firmad.errors import ConfigError, InputError
from firmad.scoring.base import Scorer, as_features
from firmad.scoring.features import ANGLES
from firmad.scoring.rotation import MIN_SCALE, RotationScorer, rotation_index, rotation_nll
from firmad.scoring.scorers import MahalanobisScorer
from firmad.scoring.specs import register_scorer


@register_scorer
class MahalanobisRotationScorer(Scorer):
    """The mean of two scores on the same features, each standardised on the normal bank: the
    squared Mahalanobis distance at the copy's rotation and the rotation scorer's
    ``-log p(rotation | features)``. They fail on different images: on Fashion-MNIST folders
    the rotation scorer did better for T-shirts and bags, Mahalanobis for pullovers, coats,
    shirts and sneakers (benchmarks/RESULTS.md, "The default detector III").

    Standardised by out-of-fold scores: the bank is split into ``folds`` parts (drawn with
    ``seed``; fewer for a bank under 2 x folds), each scored by both scorers fitted on the
    other parts, so neither score's scale is measured on the features it was fitted on
    (in-sample Mahalanobis distances are smaller than a new normal's). The held-out images
    that set a detector's threshold are never used.
    """

    name = "maha_rotation"
    fitted = ("location_", "precision_", "mean_", "scale_", "weight_", "bias_", "target_",
              "centre_", "spread_")  # fmt: skip
    fits_on_angles = True

    def __init__(self, c: float = 0.1, folds: int = 5, seed: int = 0, max_iter: int = 1000) -> None:
        super().__init__()
        RotationScorer(c=c, max_iter=max_iter)  # checks c and max_iter
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
            raise ConfigError(f"maha_rotation: folds must be an integer >= 2, got {folds!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"maha_rotation: seed must be an integer, got {seed!r}.")
        self.c, self.folds, self.seed, self.max_iter = float(c), folds, seed, max_iter

    def _parts(self, bank) -> tuple[RotationScorer, list]:
        """The rotation scorer and one Mahalanobis per rotation, fitted on ``bank``."""
        rotation = RotationScorer(c=self.c, max_iter=self.max_iter).fit(bank)
        return rotation, [MahalanobisScorer().fit(bank[a]) for a in ANGLES]

    def fit(self, bank, angle: int = 0) -> MahalanobisRotationScorer:
        """``bank``: {rotation: normal training features at that rotation} for all of
        `ANGLES` (the same images in the same order); ``angle``: this copy's rotation."""
        if not isinstance(bank, Mapping) or set(bank) != set(ANGLES):
            raise InputError(
                "maha_rotation is fitted on the features of the 4 rotations {angle: features} "
                f"for angles {ANGLES}; fit it through VariantScorer (any variant)."
            )
        bank = {a: as_features(bank[a], "bank features").detach().double().cpu() for a in ANGLES}
        n = bank[0].shape[0]
        if any(f.shape[0] != n for f in bank.values()):
            raise InputError("maha_rotation needs the same images at every rotation.")
        if n < 4:
            raise InputError(f"maha_rotation needs a bank of at least 4 features (2 folds of 2); "
                             f"got {n}.")  # fmt: skip
        folds = min(self.folds, n // 2)  # a small bank: fewer folds, each of 2 or more
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        oof = torch.zeros(len(ANGLES), 2, n, dtype=torch.float64)
        for part in order.tensor_split(folds):
            rest = torch.ones(n, dtype=torch.bool)
            rest[part] = False
            rotation, mahas = self._parts({a: f[rest] for a, f in bank.items()})
            for i, a in enumerate(ANGLES):
                oof[i, 0, part] = torch.from_numpy(mahas[i].score(bank[a][part]))
                oof[i, 1, part] = torch.from_numpy(rotation.at_angle(a).score(bank[a][part]))
        rotation, mahas = self._parts(bank)
        self.mean_, self.scale_ = rotation.mean_, rotation.scale_
        self.weight_, self.bias_ = rotation.weight_, rotation.bias_
        # every rotation's part, kept (not saved) for `at_angle`; the copy holds its own only
        self._all_angles = {
            "location_": torch.stack([m.location_ for m in mahas]),
            "precision_": torch.stack([m.precision_ for m in mahas]),
            "centre_": oof.mean(2),
            "spread_": oof.std(2).clamp_min(MIN_SCALE),
        }
        self._select(angle)
        return self

    def _select(self, angle: int) -> None:
        self.target_ = rotation_index(angle)
        for key, stacked in self._all_angles.items():
            setattr(self, key, stacked[int(self.target_)].clone())

    def at_angle(self, angle: int) -> MahalanobisRotationScorer:
        """A copy of this scorer, just fitted, that scores at ``angle`` instead."""
        self._check_fitted()
        if not hasattr(self, "_all_angles"):
            raise InputError("maha_rotation: at_angle needs the scorer as fitted, not as loaded; "
                             "fit it again.")  # fmt: skip
        other = copy.deepcopy(self)
        other._select(angle)
        return other

    def forward(self, features) -> torch.Tensor:
        x = self.prepare(features)
        self._check_dim(x, self.mean_.shape[0])
        d = x - self.location_
        maha = ((d @ self.precision_) * d).sum(dim=1)
        rotation = rotation_nll(self, x)
        c, s = self.centre_, self.spread_
        return ((maha - c[0]) / s[0] + (rotation - c[1]) / s[1]) / 2

    def explain_scale(self, n_bank) -> str:
        return (
            "the mean of two standardised scores of the features: their squared Mahalanobis "
            f"distance to the {n_bank} normal training features and how badly a linear "
            "classifier of the 4 rotations tells the image's rotation, each measured in "
            "standard deviations of normal training images held out of its fit: about 0 is "
            "typical of a normal image, higher values are more anomalous."
        )
