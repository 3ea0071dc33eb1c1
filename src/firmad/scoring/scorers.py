"""Anomaly scorers on features, in torch (higher score = more anomalous).

Each scorer is an ``nn.Module``: ``fit(bank)`` stores what it learns from the normal training
features as buffers (so it moves with ``.to(device)``, saves to safetensors and exports to ONNX),
``forward(features)`` is the differentiable score, and ``score(features)`` is the batch path that
returns numpy float64 (kNN may use faiss there, which agrees with the torch path to 1e-5).

Scorers are fitted in float64 and score in the dtype of their buffers (``.float()`` for export).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from firmad.errors import ConfigError, InputError

# Bound on the (test chunk x bank) similarity matrix held at once: 64M elements.
_MAX_CHUNK_ELEMENTS = 64 * 1024 * 1024


def tracing() -> bool:
    """True while torch.export / torch.compile / jit trace the code: no data-dependent checks."""
    c = torch.compiler
    return c.is_compiling() or c.is_exporting() or torch.jit.is_tracing()


def as_features(x, what: str = "features") -> torch.Tensor:
    """Features as a float tensor (N, D) on their device, checked (no NaN, N >= 1)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{what} must be a torch tensor or numpy array, got {type(x).__name__}.")
    if not x.is_floating_point():
        x = x.float()
    if x.dim() == 1:
        x = x[:, None]
    if x.dim() != 2 or x.shape[0] == 0:
        raise InputError(f"{what} must have shape (N, D) with N >= 1, got {tuple(x.shape)}.")
    if not tracing() and not torch.isfinite(x.detach()).all():
        raise InputError(f"{what} contain NaN or infinite values; the model may have diverged.")
    return x


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1, eps=1e-12)


def _bank_variance(bank_n: torch.Tensor) -> float:
    """Mean over dimensions of the per-dimension (population) variance of normalised features.

    Used for the KDE and RBF OC-SVM bandwidths gamma = c / (var * d); clamped away from zero
    so a degenerate bank (all features equal) still gives a finite gamma.
    """
    return max(float(bank_n.var(dim=0, unbiased=False).mean()), 1e-12)


def _row_chunks(x: torch.Tensor, bank_rows: int) -> list[torch.Tensor]:
    """Row chunks of ``x`` so that (chunk x bank) stays bounded in memory; one chunk when
    tracing (an exported graph keeps its batch dimension free)."""
    if tracing():
        return [x]
    return list(x.split(max(1, _MAX_CHUNK_ELEMENTS // max(1, bank_rows))))


def faiss_or_none():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def knn_similarities(
    bank_n: torch.Tensor, queries_n: torch.Tensor, k: int, backend: str = "auto"
) -> torch.Tensor:
    """Top-``k`` inner products (cosine similarities for normalised inputs), (N, k), descending.

    ``backend``: "torch" (exact chunked matmul + topk, differentiable), "faiss" (exact
    IndexFlatIP, no gradient) or "auto" (faiss when importable and no gradient is needed).
    """
    if backend not in ("auto", "faiss", "torch"):
        raise ConfigError(f"knn_backend must be 'auto', 'faiss' or 'torch', got {backend!r}.")
    if not 1 <= k <= bank_n.shape[0]:
        raise InputError(
            f"k={k} nearest neighbours requested but the bank has {bank_n.shape[0]} features; "
            "use a smaller k or a larger bank."
        )
    faiss = faiss_or_none() if backend in ("auto", "faiss") else None
    if backend == "faiss" and faiss is None:
        raise ConfigError("knn_backend='faiss' but faiss is not installed; pip install faiss-cpu.")
    needs_grad = torch.is_grad_enabled() and queries_n.requires_grad
    if faiss is not None and not needs_grad and not tracing():
        index = faiss.IndexFlatIP(bank_n.shape[1])
        index.add(bank_n.detach().to("cpu", torch.float32).numpy())
        sims, _ = index.search(queries_n.detach().to("cpu", torch.float32).numpy(), k)
        return torch.from_numpy(sims).to(queries_n.device)
    chunks = _row_chunks(queries_n, bank_n.shape[0])
    return torch.cat([torch.topk(q @ bank_n.T, k, dim=1).values for q in chunks])


class Scorer(nn.Module):
    """Base class. Subclasses set ``name``, list their fitted buffers in ``fitted``, and
    implement ``fit`` and ``forward``. Parameters are plain attributes (see ``get_params``)."""

    name = "scorer"
    fitted: tuple[str, ...] = ()
    differentiable = True
    # The parameters that tell two results of this scorer apart (e.g. kNN's k): they go into
    # every result row and label.
    result_keys: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        for key in self.fitted:
            self.register_buffer(key, None)

    # --- parameters and fitted state (for saving a detector) ---------------------------------

    def get_params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "training"}

    def fitted_state(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        return {k: getattr(self, k) for k in self.fitted}

    def load_fitted(self, tensors: dict[str, torch.Tensor], where: str = "scorer") -> Scorer:
        """Restore ``fitted_state()``; missing or extra keys are an InputError naming them."""
        missing = sorted(set(self.fitted) - set(tensors))
        extra = sorted(set(tensors) - set(self.fitted))
        if missing or extra:
            raise InputError(f"{where}: {self.name} expects {list(self.fitted)}, missing "
                             f"{missing}, unexpected {extra}.")  # fmt: skip
        for k in self.fitted:
            setattr(self, k, tensors[k])
        return self

    # --- scoring -----------------------------------------------------------------------------

    def fit(self, bank) -> Scorer:
        raise NotImplementedError

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        for b in self.buffers():
            return b.dtype
        return torch.float64

    def prepare(self, features) -> torch.Tensor:
        """Checked features in the scorer's dtype and on its device."""
        self._check_fitted()
        x = as_features(features)
        ref = next(iter(self.buffers()), None)
        return x.to(ref.device if ref is not None else x.device, self.dtype)

    def score(self, features) -> np.ndarray:
        """Scores of a batch of features, no gradient, as float64 numpy."""
        with torch.no_grad():
            return self(features).double().cpu().numpy()

    def _check_fitted(self) -> None:
        if any(getattr(self, k) is None for k in self.fitted):
            raise InputError(f"{self.name} scorer is not fitted; call fit(bank_features) first.")

    def _check_dim(self, x: torch.Tensor, d: int) -> None:
        if x.shape[1] != d:
            raise InputError(
                f"{self.name}: features have {x.shape[1]} dimensions but the bank has {d}; "
                "score with features from the same encoder."
            )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())


class KnnCosScorer(Scorer):
    """Negated mean of the top-``k`` cosine similarities to the bank (the paper's cos_k)."""

    name = "knn_cos"
    fitted = ("bank_",)
    result_keys = ("k",)

    def __init__(self, k: int = 5, knn_backend: str = "auto") -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or int(k) < 1:
            raise ConfigError(f"{self.name}: k must be an integer >= 1, got {k!r}.")
        if knn_backend not in ("auto", "faiss", "torch"):
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


class KnnCosNormScorer(KnnCosScorer):
    """CSI's trick: top-``k`` mean cosine times the un-normalised test feature norm, negated."""

    name = "knn_cos_norm"

    def forward(self, features) -> torch.Tensor:
        x = self.prepare(features)
        return -self.mean_topk(x) * x.norm(dim=1)


class KdeScorer(Scorer):
    """Negated (1/gamma) log sum_j exp(gamma cos(x, x_j)) over the whole bank.

    gamma = ``scale`` / (var * d): var is the mean over dimensions of the per-dimension
    population variance of the L2-normalised bank features, d their dimension.
    """

    name = "kde"
    fitted = ("bank_", "gamma_")

    def __init__(self, scale: float = 20.0) -> None:
        super().__init__()
        self.scale = float(scale)

    def fit(self, bank) -> KdeScorer:
        self.bank_ = l2_normalise(as_features(bank, "bank features").detach().double())
        d = self.bank_.shape[1]
        self.gamma_ = torch.tensor(self.scale / (_bank_variance(self.bank_) * d), dtype=self.dtype)
        return self

    def forward(self, features) -> torch.Tensor:
        x = l2_normalise(self.prepare(features))
        self._check_dim(x, self.bank_.shape[1])
        chunks = _row_chunks(x, self.bank_.shape[0])
        out = [torch.logsumexp((q @ self.bank_.T) * self.gamma_, dim=1) for q in chunks]
        return -torch.cat(out) / self.gamma_


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


class OcsvmRbfScorer(_OcsvmScorer):
    """RBF one-class SVM with gamma = ``scale`` / (var * d) (var as in `KdeScorer`)."""

    name = "ocsvm_rbf"
    kernel = "rbf"

    def __init__(
        self, nu: float = 0.1, scale: float = 10.0, max_bank: int = 5000, seed: int = 0
    ) -> None:
        super().__init__(nu=nu, max_bank=max_bank, seed=seed)
        self.scale = float(scale)

    def _gamma(self, bank_n: torch.Tensor) -> float:
        return self.scale / (_bank_variance(bank_n) * bank_n.shape[1])

    def kernel_matrix(self, x: torch.Tensor) -> torch.Tensor:
        # ||x - s||^2 = |x|^2 + |s|^2 - 2 x.s, clamped at 0 against rounding
        sq = (x * x).sum(1, keepdim=True) + (self.support_ * self.support_).sum(1)[None]
        sq = (sq - 2 * x @ self.support_.T).clamp_min(0)
        return torch.exp(-self.gamma_ * sq)


class OcsvmLinearScorer(_OcsvmScorer):
    """Linear one-class SVM on normalised features."""

    name = "ocsvm_linear"
    kernel = "linear"

    def kernel_matrix(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.support_.T


class SvddScorer(Scorer):
    """Deep SVDD: squared Euclidean distance to a centre ``c`` (the bank mean if not given)."""

    name = "svdd"
    fitted = ("centre_",)

    def __init__(self, c=None) -> None:
        super().__init__()
        self.c = None if c is None else torch.as_tensor(c).detach().reshape(-1).double()

    def get_params(self) -> dict[str, Any]:
        return {}  # the centre is fitted state, saved with the tensors

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


class LogitScorer(Scorer):
    """A linear read-out of the features is the anomaly score (the binary classifier's logit).

    Without ``weight`` the input already is the model's one output per sample (N,) or (N, 1).
    ``negate=True`` if the output scores normality.
    """

    name = "logit"
    fitted = ("weight_", "bias_")

    def __init__(self, negate: bool = False, weight=None, bias=None) -> None:
        super().__init__()
        self.negate = bool(negate)
        w = torch.ones(1, dtype=torch.float64) if weight is None else torch.as_tensor(weight)
        b = torch.zeros((), dtype=torch.float64) if bias is None else torch.as_tensor(bias)
        self.weight_ = w.detach().reshape(-1).double()
        self.bias_ = b.detach().reshape(()).double()

    def get_params(self) -> dict[str, Any]:
        return {"negate": self.negate}

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


SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls
    for cls in (
        KnnCosScorer,
        KnnCosNormScorer,
        KdeScorer,
        CentreScorer,
        OcsvmRbfScorer,
        OcsvmLinearScorer,
        MahalanobisScorer,
        SvddScorer,
        LogitScorer,
    )
}


def build_scorer(name: str, **params: Any) -> Scorer:
    """Build a scorer by registry name, e.g. ``build_scorer("knn_cos", k=5)``."""
    if name not in SCORERS:
        raise ConfigError(f"unknown scorer {name!r}; choose one of: {', '.join(SCORERS)}.")
    try:
        return SCORERS[name](**params)
    except TypeError as exc:
        raise ConfigError(f"invalid parameters {params} for scorer {name!r}: {exc}") from exc


def result_name(scorer: str, k: int | None = None, variant: str | None = None, **keys) -> str:
    """The one label of a result row, e.g. ``"knn_cos k=5 (plain)"`` (``"knn_cos k=5"``
    without a variant): the scorer, its result keys (`Scorer.result_keys`) that are set, and
    the variant; used by the reports, the grids and the score dictionaries."""
    values = {"k": k, **keys}
    name = f"{scorer}" + "".join(f" {key}={v}" for key, v in values.items() if v not in (None, ""))
    return name if variant is None else f"{name} ({variant})"


def result_keys_of(scorer: str) -> tuple[str, ...]:
    """The result keys of a registered scorer (``("k",)`` for one that is not registered)."""
    return SCORERS[scorer].result_keys if scorer in SCORERS else ("k",)


def row_name(row: dict[str, Any], variant: bool = False) -> str:
    """The label of a result row (``{"scorer", "k", ..., "variant", metrics}``)."""
    keys = {key: row.get(key) for key in result_keys_of(row["scorer"])}
    k = keys.pop("k", None)
    return result_name(row["scorer"], k, row.get("variant") if variant else None, **keys)
