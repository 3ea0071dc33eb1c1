"""The built-in anomaly scorers on features, in torch (higher score = more anomalous).

Each scorer is an ``nn.Module``: ``fit(bank)`` stores what it learns from the normal training
features as buffers (so it moves with ``.to(device)``, saves to safetensors and exports to ONNX),
``forward(features)`` is the differentiable score, and ``score(features)`` is the batch path that
returns numpy float64 (kNN may use faiss there, which agrees with the torch path to 1e-5). Each
explains its own scale in words (`Scorer.explain_scale`) and registers itself by name.

Scorers are fitted in float64 and score in the dtype of their buffers (``.float()`` for export).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch

from firmad.errors import ConfigError, InputError
from firmad.scoring.base import (  # noqa: F401  (kept importable from here)
    KNN_BACKENDS,
    Scorer,
    as_features,
    faiss_or_none,
    knn_similarities,
    l2_normalise,
    row_chunks,
    tracing,
)
from firmad.scoring.specs import (  # noqa: F401  (SCORERS kept importable from here)
    SCORERS,
    ScorerSpec,
    register_scorer,
    scorer_class,
)


def _bank_variance(bank_n: torch.Tensor) -> float:
    """Mean over dimensions of the per-dimension (population) variance of normalised features.

    Used for the KDE and RBF OC-SVM bandwidths gamma = c / (var * d); clamped away from zero
    so a degenerate bank (all features equal) still gives a finite gamma.
    """
    return max(float(bank_n.var(dim=0, unbiased=False).mean()), 1e-12)


def _positive(name: str, key: str, value: Any) -> float:
    """A finite number > 0 (a bandwidth scale): anything else is a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ConfigError(f"{name}: {key} must be a number > 0, got {value!r}.")
    if not math.isfinite(float(value)) or float(value) <= 0:
        raise ConfigError(f"{name}: {key} must be a finite number > 0, got {value!r}.")
    return float(value)


@register_scorer
class KnnCosScorer(Scorer):
    """Negated mean of the top-``k`` cosine similarities to the bank (the paper's cos_k)."""

    name = "knn_cos"
    fitted = ("bank_",)
    label_keys = ("k",)

    def __init__(self, k: int = 5, knn_backend: Literal["auto", "faiss", "torch"] = "auto") -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or int(k) < 1:
            raise ConfigError(f"{self.name}: k must be an integer >= 1, got {k!r}.")
        if knn_backend not in KNN_BACKENDS:
            raise ConfigError(
                f"knn_backend must be 'auto', 'faiss' or 'torch', got {knn_backend!r}."
            )
        self.k = int(k)
        self.knn_backend = knn_backend

    def fit(self, bank) -> KnnCosScorer:
        self.bank_ = l2_normalise(as_features(bank, "bank features").detach().double())
        return self

    def mean_topk(self, x: torch.Tensor) -> torch.Tensor:
        self._check_dim(x, self.bank_.shape[1])
        sims = knn_similarities(self.bank_, l2_normalise(x), self.k, self.knn_backend)
        return sims.to(x.dtype).mean(dim=1)

    def forward(self, features) -> torch.Tensor:
        return -self.mean_topk(self.prepare(features))

    def explain_scale(self, n_bank) -> str:
        return (
            f"minus the mean cosine similarity between the image's feature vector and its "
            f"{self.k} most similar features among the {n_bank} normal training images. It lies "
            "between -1 and 1: about -1 means the image's features point the same way as its "
            "nearest normals (very like the normals), 0 means unrelated features, and anything "
            "higher is less like the normals. Small steps matter: a move from -0.99 to -0.90 is "
            "large."
        )


@register_scorer
class KnnCosNormScorer(KnnCosScorer):
    """CSI's trick: top-``k`` mean cosine times the un-normalised test feature norm, negated."""

    name = "knn_cos_norm"

    def forward(self, features) -> torch.Tensor:
        x = self.prepare(features)
        return -self.mean_topk(x) * x.norm(dim=1)

    def explain_scale(self, n_bank) -> str:
        return (
            f"minus the mean cosine similarity to the {self.k} most similar of the {n_bank} "
            "normal training features, times the length of the image's feature vector (CSI's "
            "score). It has no fixed range: it is negative for images like the normals, and its "
            "size grows with the feature length, so read it against this detector's own "
            "held-out scores."
        )


@register_scorer
class KdeScorer(Scorer):
    """Negated (1/gamma) log sum_j exp(gamma cos(x, x_j)) over the whole bank.

    gamma = ``scale`` / (var * d): var is the mean over dimensions of the per-dimension
    population variance of the L2-normalised bank features, d their dimension.
    """

    name = "kde"
    fitted = ("bank_", "gamma_")

    def __init__(self, scale: float = 20.0) -> None:
        super().__init__()
        self.scale = _positive(self.name, "scale", scale)

    def fit(self, bank) -> KdeScorer:
        self.bank_ = l2_normalise(as_features(bank, "bank features").detach().double())
        d = self.bank_.shape[1]
        self.gamma_ = torch.tensor(self.scale / (_bank_variance(self.bank_) * d), dtype=self.dtype)
        return self

    def forward(self, features) -> torch.Tensor:
        x = l2_normalise(self.prepare(features))
        self._check_dim(x, self.bank_.shape[1])
        chunks = row_chunks(x, self.bank_.shape[0])
        out = [torch.logsumexp((q @ self.bank_.T) * self.gamma_, dim=1) for q in chunks]
        return -torch.cat(out) / self.gamma_

    def explain_scale(self, n_bank) -> str:
        gamma, n = float(self.gamma_), int(self.bank_.shape[0])
        bonus = float(np.log(max(n, 1))) / gamma
        return (
            f"minus a soft maximum of the cosine similarities to all {n} normal training "
            f"features, -(1/g) log sum exp(g cos), with g = {gamma:.3g}. It behaves like minus "
            f"the highest cosine similarity, lowered by up to log(n)/g = {bonus:.3g} when many "
            f"normals are close, so it lies between {-1 - bonus:.3g} (very like many normals) "
            "and 1 (unlike all of them)."
        )


@register_scorer
class CentreScorer(Scorer):
    """Negated cosine to the normalised mean of the normalised bank features."""

    name = "centre"
    fitted = ("centre_",)

    def fit(self, bank) -> CentreScorer:
        bank_n = l2_normalise(as_features(bank, "bank features").detach().double())
        self.centre_ = l2_normalise(bank_n.mean(dim=0, keepdim=True))[0]
        return self

    def forward(self, features) -> torch.Tensor:
        x = l2_normalise(self.prepare(features))
        self._check_dim(x, self.centre_.shape[0])
        return -(x @ self.centre_)

    def explain_scale(self, n_bank) -> str:
        return (
            "minus the cosine similarity between the image's feature vector and the mean "
            f"direction of the {n_bank} normal training features: -1 points exactly along the "
            "normal mean, 0 is unrelated, 1 is the opposite direction."
        )


@register_scorer
class MahalanobisScorer(Scorer):
    """Squared Mahalanobis distance to the bank mean, Ledoit-Wolf shrinkage covariance.

    Shrinkage keeps the covariance well conditioned for rank-deficient banks; the precision is a
    pseudo-inverse, so even a constant bank does not fail. ``normalize=True`` L2-normalises
    features first.
    """

    name = "mahalanobis"
    fitted = ("location_", "precision_")

    def __init__(self, normalize: bool = False) -> None:
        super().__init__()
        self.normalize = bool(normalize)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return l2_normalise(x) if self.normalize else x

    def fit(self, bank) -> MahalanobisScorer:
        from sklearn.covariance import LedoitWolf

        x = self._prep(as_features(bank, "bank features").detach().double().cpu())
        if x.shape[0] < 2:
            raise InputError("mahalanobis needs a bank of at least 2 features.")
        lw = LedoitWolf(assume_centered=False, store_precision=True).fit(x.numpy())
        self.location_ = torch.from_numpy(lw.location_).double()
        self.precision_ = torch.from_numpy(lw.get_precision()).double()
        return self

    def forward(self, features) -> torch.Tensor:
        x = self._prep(self.prepare(features))
        self._check_dim(x, self.location_.shape[0])
        d = x - self.location_
        return ((d @ self.precision_) * d).sum(dim=1)

    def explain_scale(self, n_bank) -> str:
        d = int(self.location_.shape[0])
        kind = "L2-normalised features" if self.normalize else "features"
        return (
            f"the squared Mahalanobis distance of the image's {kind} to the mean of the "
            f"{n_bank} normal training features, with their (Ledoit-Wolf shrunk) covariance. 0 "
            "is the normal mean; there is no upper bound; if the features were Gaussian, normal "
            f"images would average about d = {d} (the feature dimension)."
        )


class _OcsvmScorer(Scorer):
    """One-class SVM on normalised features, fitted by scikit-learn; the score is
    -decision_function, evaluated in torch from the support vectors (so it is differentiable,
    saveable and exportable).

    The bank is capped at ``max_bank`` features (random subset drawn with ``seed``) because
    kernel OC-SVM training is O(n^2) in time and memory.
    """

    kernel = "rbf"
    fitted = ("support_", "dual_coef_", "intercept_", "gamma_")

    def __init__(self, nu: float = 0.1, max_bank: int = 5000, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 < float(nu) <= 1.0:
            raise ConfigError(f"{self.name}: nu must be in (0, 1], got {nu}.")
        if int(max_bank) < 2:
            raise ConfigError(f"{self.name}: max_bank must be >= 2, got {max_bank}.")
        self.nu = float(nu)
        self.max_bank = int(max_bank)
        self.seed = int(seed)

    def _gamma(self, bank_n: torch.Tensor) -> float:
        return 1.0

    def fit(self, bank) -> _OcsvmScorer:
        from sklearn.svm import OneClassSVM

        bank_n = l2_normalise(as_features(bank, "bank features").detach().double().cpu())
        if bank_n.shape[0] > self.max_bank:
            g = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(bank_n.shape[0], generator=g)[: self.max_bank]
            bank_n = bank_n[idx.sort().values]
        gamma = self._gamma(bank_n)
        svm = OneClassSVM(kernel=self.kernel, nu=self.nu, gamma=gamma).fit(bank_n.numpy())
        self.support_ = torch.from_numpy(svm.support_vectors_).double()
        self.dual_coef_ = torch.from_numpy(svm.dual_coef_[0]).double()
        self.intercept_ = torch.tensor(float(svm.intercept_[0]), dtype=torch.float64)
        self.gamma_ = torch.tensor(float(gamma), dtype=torch.float64)
        return self

    def kernel_matrix(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features) -> torch.Tensor:
        x = l2_normalise(self.prepare(features))
        self._check_dim(x, self.support_.shape[1])
        return -(self.kernel_matrix(x) @ self.dual_coef_ + self.intercept_)

    def explain_scale(self, n_bank) -> str:
        return (
            f"minus the decision function of a one-class SVM ({self.kernel} kernel, nu = "
            f"{self.nu:.3g}) fitted on the L2-normalised normal training features: negative "
            "inside the region the SVM learnt as normal, positive outside it; 0 is the SVM's own "
            f"boundary, outside which about {100 * self.nu:.0f} % of the training normals lie."
        )


@register_scorer
class OcsvmRbfScorer(_OcsvmScorer):
    """RBF one-class SVM with gamma = ``scale`` / (var * d) (var as in `KdeScorer`)."""

    name = "ocsvm_rbf"
    kernel = "rbf"

    def __init__(
        self, nu: float = 0.1, scale: float = 10.0, max_bank: int = 5000, seed: int = 0
    ) -> None:
        super().__init__(nu=nu, max_bank=max_bank, seed=seed)
        self.scale = _positive(self.name, "scale", scale)

    def _gamma(self, bank_n: torch.Tensor) -> float:
        return self.scale / (_bank_variance(bank_n) * bank_n.shape[1])

    def kernel_matrix(self, x: torch.Tensor) -> torch.Tensor:
        # ||x - s||^2 = |x|^2 + |s|^2 - 2 x.s, clamped at 0 against rounding
        sq = (x * x).sum(1, keepdim=True) + (self.support_ * self.support_).sum(1)[None]
        sq = (sq - 2 * x @ self.support_.T).clamp_min(0)
        return torch.exp(-self.gamma_ * sq)


@register_scorer
class OcsvmLinearScorer(_OcsvmScorer):
    """Linear one-class SVM on normalised features."""

    name = "ocsvm_linear"
    kernel = "linear"

    def kernel_matrix(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.support_.T


@register_scorer
class SvddScorer(Scorer):
    """Deep SVDD: squared Euclidean distance to a centre ``c`` (the bank mean if not given)."""

    name = "svdd"
    fitted = ("centre_",)
    data_params = ("c",)  # the trained centre: fitted state, saved with the tensors

    def __init__(self, c=None) -> None:
        super().__init__()
        self.c = None if c is None else torch.as_tensor(c).detach().reshape(-1).double()

    def fit(self, bank=None) -> SvddScorer:
        if self.c is not None:
            self.centre_ = self.c.clone()
        else:
            self.centre_ = as_features(bank, "bank features").detach().double().mean(dim=0)
        return self

    def forward(self, features) -> torch.Tensor:
        if self.centre_ is None and self.c is not None:
            self.fit()
        x = self.prepare(features)
        self._check_dim(x, self.centre_.shape[0])
        return ((x - self.centre_) ** 2).sum(dim=1)

    def explain_scale(self, n_bank) -> str:
        return (
            "the squared Euclidean distance of the image's feature vector to the Deep SVDD "
            "centre (the network was trained to pull normal features onto it): 0 is the centre, "
            "there is no upper bound, and the unit is the feature space's own."
        )


@register_scorer
class LogitScorer(Scorer):
    """A linear read-out of the features is the anomaly score (the binary classifier's logit).

    Without ``weight`` the input already is the model's one output per sample (N,) or (N, 1).
    ``negate=True`` if the output scores normality.
    """

    name = "logit"
    fitted = ("weight_", "bias_")
    data_params = ("weight", "bias")  # the classifier's trained read-out

    def __init__(self, negate: bool = False, weight=None, bias=None) -> None:
        super().__init__()
        self.negate = bool(negate)
        w = torch.ones(1, dtype=torch.float64) if weight is None else torch.as_tensor(weight)
        b = torch.zeros((), dtype=torch.float64) if bias is None else torch.as_tensor(bias)
        self.weight_ = w.detach().reshape(-1).double()
        self.bias_ = b.detach().reshape(()).double()

    def fit(self, bank=None) -> LogitScorer:
        return self

    def forward(self, features) -> torch.Tensor:
        x = self.prepare(features)
        if x.shape[1] != self.weight_.shape[0]:
            raise InputError(
                f"logit scorer needs {self.weight_.shape[0]} value(s) per sample, got shape "
                f"{tuple(x.shape)}."
            )
        s = x @ self.weight_ + self.bias_
        return -s if self.negate else s

    def explain_scale(self, n_bank) -> str:
        which = "normal, negated" if self.negate else "outlier"
        return (
            f"the logit (log-odds) of the classifier trained to tell normal images from "
            f"synthetic outliers, for the class {which}: 0 is even odds, +2 is about 88 % "
            "outlier, negative values look normal to the classifier."
        )


def build_scorer(name: str, **params: Any) -> Scorer:
    """Build a scorer by registry name, e.g. ``build_scorer("knn_cos", k=5)``; parameters are
    checked and normalised as `ScorerSpec` does (data parameters, such as Deep SVDD's trained
    centre, are passed through)."""
    cls = scorer_class(name)
    data = {key: params.pop(key) for key in cls.data_params if key in params}
    return cls(**ScorerSpec.of(name, params).kwargs, **data)
