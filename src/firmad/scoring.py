"""Feature extraction and anomaly scorers (higher score = more anomalous).

The path: a trained encoder maps the normal training images to a *bank* of features and the
test images to test features (eval mode, test transform: resize to 36 then centre-crop 32);
a scorer is fitted on the bank and scores the test features; `score_run` does this for several
scorers and the paper's three variants and returns the metrics.

Scorers follow scikit-learn's style: ``build_scorer(name, **params).fit(bank).score(features)``.
Features may be torch tensors or numpy arrays of shape (N, D).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from firmad.errors import ConfigError, InputError
from firmad.metrics import evaluate_scores

__all__ = [
    "DEFAULT_SCORERS",
    "SCORERS",
    "VARIANTS",
    "CentreScorer",
    "KdeScorer",
    "KnnCosNormScorer",
    "KnnCosScorer",
    "LogitScorer",
    "MahalanobisScorer",
    "OcsvmLinearScorer",
    "OcsvmRbfScorer",
    "Scorer",
    "SvddScorer",
    "build_scorer",
    "extract_features",
    "knn_similarities",
    "result_name",
    "score_run",
]

# Bound on the (test chunk x bank) similarity matrix held at once: 64M float32 = 256 MiB.
_MAX_CHUNK_ELEMENTS = 64 * 1024 * 1024

VARIANTS = ("plain", "angled", "ensemble")
_ANGLES = (0, 90, 180, 270)


# --------------------------------------------------------------------------- features


def _encoder_device(encoder: nn.Module) -> torch.device | None:
    for p in encoder.parameters():
        return p.device
    for b in encoder.buffers():
        return b.device
    return None


def extract_features(
    encoder: nn.Module,
    images_uint8: torch.Tensor,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    size: int = 32,
    resize_ratio: float = 1.125,
    angle: int = 0,
    crops: int | None = None,
    gen: torch.Generator | None = None,
    channels: int = 3,
) -> torch.Tensor:
    """Encoder features of uint8 images, in eval mode without gradients.

    Per batch: uint8 -> float [0, 1] (grayscale repeated to ``channels``) -> test transform
    (resize to ``round(size * resize_ratio)``, centre-crop ``size``; ratio 1.0 only resizes)
    -> rotation by ``angle`` degrees (a multiple of 90) -> encoder.

    Args:
        encoder: module mapping float images (B, C, size, size) in [0, 1] to (B, D); it must
            already live on ``device``. Its train/eval modes are restored afterwards.
        images_uint8: (N, C, H, W) uint8 tensor (CPU or on ``device``).
        crops: if given, ``n`` random crops (scale 0.55-1) per image after the test transform,
            for the ensemble variant; the result is then (n, N, D).
        gen: generator for the random crops (a CPU generator is fine); seeded 0 if None.

    Returns:
        float32 CPU tensor (N, D), or (crops, N, D) when ``crops`` is set.
    """
    from firmad import augment  # imported here: scorers work without the image stack

    images = _check_images(images_uint8)
    if angle % 90 != 0:
        raise InputError(f"angle must be a multiple of 90 degrees, got {angle}.")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}.")
    if crops is not None and crops < 1:
        raise InputError(f"crops must be a positive number of crops or None, got {crops}.")
    device = torch.device(device)
    enc_dev = _encoder_device(encoder)
    if enc_dev is not None and enc_dev.type != device.type:
        raise InputError(
            f"the encoder lives on {enc_dev} but features were requested on {device}; "
            f"move it first with encoder.to('{device}')."
        )
    if crops is not None and gen is None:
        gen = torch.Generator().manual_seed(0)
    k_rot = (angle // 90) % 4

    modes = [(m, m.training) for m in encoder.modules()]
    encoder.eval()
    chunks: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            for start in range(0, images.shape[0], batch_size):
                xb = images[start : start + batch_size].to(device, non_blocking=True)
                x = augment.to_float(xb, size=None, channels=channels)
                x = augment.test_transform(x, size, resize_ratio)
                if crops is None:
                    chunks.append(_encode(encoder, augment.rotate90(x, k_rot)))
                    continue
                views = _crop_views(augment, x, crops, size, gen)  # (n, B, C, s, s)
                feats = [_encode(encoder, augment.rotate90(v, k_rot)) for v in views]
                chunks.append(torch.stack(feats))
    finally:
        for m, mode in modes:
            m.training = mode
    if not chunks:
        raise InputError("no images to extract features from (empty tensor).")
    return torch.cat(chunks, dim=1 if crops is not None else 0)


def _encode(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu":
        # oneDNN convolutions run markedly faster on channels-last input (same numbers)
        x = x.contiguous(memory_format=torch.channels_last)
    out = encoder(x)
    if isinstance(out, tuple | list):  # encoders returning (features, extras): take features
        out = out[0]
    return out.reshape(out.shape[0], -1).float().cpu()


def _crop_views(augment, x: torch.Tensor, n: int, size: int, gen) -> torch.Tensor:
    """``n`` random crops (scale 0.55-1) of a batch as (n, B, C, size, size)."""
    if "n" in inspect.signature(augment.random_crops).parameters:  # the n-crops-at-once form
        out = augment.random_crops(x, n=n, size=size, scale=(0.55, 1.0), gen=gen)
        return out.reshape(n, x.shape[0], *out.shape[-3:])
    # one crop per sample per call
    return torch.stack(
        [augment.random_crops(x, size=size, scale=(0.55, 1.0), gen=gen) for _ in range(n)]
    )


def _check_images(images) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = (
            f"{images.dtype} tensor of shape {tuple(images.shape)}"
            if isinstance(images, torch.Tensor)
            else type(images).__name__
        )
        raise InputError(f"images must be a uint8 tensor of shape (N, C, H, W); got {got}.")
    return images


# --------------------------------------------------------------------------- helpers


def _features(x, what: str = "features") -> torch.Tensor:
    """Convert features to a contiguous float32 CPU tensor (N, D) and check them."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{what} must be a torch tensor or numpy array, got {type(x).__name__}.")
    x = x.detach().to("cpu", torch.float32)
    if x.dim() == 1:
        x = x[:, None]
    if x.dim() != 2 or x.shape[0] == 0:
        raise InputError(f"{what} must have shape (N, D) with N >= 1, got {tuple(x.shape)}.")
    if not torch.isfinite(x).all():
        raise InputError(f"{what} contain NaN or infinite values; the model may have diverged.")
    return x.contiguous()


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1, eps=1e-12)


def _bank_variance(bank_n: torch.Tensor) -> float:
    """Mean over dimensions of the per-dimension (population) variance of normalised features.

    Used for the KDE and RBF OC-SVM bandwidths gamma = c / (var * d); clamped away from zero
    so a degenerate bank (all features equal) still gives a finite gamma.
    """
    return max(float(bank_n.var(dim=0, unbiased=False).mean()), 1e-12)


def _row_chunk(bank_rows: int) -> int:
    return max(1, _MAX_CHUNK_ELEMENTS // max(1, bank_rows))


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def knn_similarities(
    bank_n: torch.Tensor, queries_n: torch.Tensor, k: int, backend: str = "auto"
) -> torch.Tensor:
    """Top-``k`` inner products (cosine similarities for normalised inputs), (N, k), descending.

    ``backend``: "faiss" (exact IndexFlatIP), "torch" (exact chunked matmul + topk, memory
    bounded by ~64M floats per chunk) or "auto" (faiss when importable).
    """
    if backend not in ("auto", "faiss", "torch"):
        raise ConfigError(f"knn_backend must be 'auto', 'faiss' or 'torch', got {backend!r}.")
    if not 1 <= k <= bank_n.shape[0]:
        raise InputError(
            f"k={k} nearest neighbours requested but the bank has {bank_n.shape[0]} features; "
            "use a smaller k or a larger bank."
        )
    faiss = _faiss() if backend in ("auto", "faiss") else None
    if backend == "faiss" and faiss is None:
        raise ConfigError("knn_backend='faiss' but faiss is not installed; pip install faiss-cpu.")
    if faiss is not None:
        index = faiss.IndexFlatIP(bank_n.shape[1])
        index.add(bank_n.numpy())
        sims, _ = index.search(queries_n.numpy(), k)
        return torch.from_numpy(sims)
    step = _row_chunk(bank_n.shape[0])
    out = [
        torch.topk(queries_n[i : i + step] @ bank_n.T, k, dim=1).values
        for i in range(0, queries_n.shape[0], step)
    ]
    return torch.cat(out)


# --------------------------------------------------------------------------- scorers


class Scorer:
    """Base class: ``fit(bank) -> self``, ``score(features) -> np.ndarray`` (higher = anomalous)."""

    name = "scorer"

    def fit(self, bank) -> Scorer:
        raise NotImplementedError

    def score(self, features) -> np.ndarray:
        raise NotImplementedError

    def _check_fitted(self, attr: str) -> None:
        if getattr(self, attr, None) is None:
            raise InputError(f"{self.name} scorer is not fitted; call fit(bank_features) first.")

    def _check_dim(self, x: torch.Tensor, d: int) -> None:
        if x.shape[1] != d:
            raise InputError(
                f"{self.name}: features have {x.shape[1]} dimensions but the bank has {d}; "
                "score with features from the same encoder."
            )

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.endswith("_"))
        return f"{type(self).__name__}({params})"


class KnnCosScorer(Scorer):
    """Negated mean of the top-``k`` cosine similarities to the bank."""

    name = "knn_cos"

    def __init__(self, k: int = 5, knn_backend: str = "auto") -> None:
        if int(k) < 1:
            raise ConfigError(f"{self.name}: k must be >= 1, got {k}.")
        self.k = int(k)
        self.knn_backend = knn_backend
        self.bank_ = None

    def fit(self, bank) -> KnnCosScorer:
        self.bank_ = _normalise(_features(bank, "bank features"))
        return self

    def _mean_topk(self, x: torch.Tensor) -> torch.Tensor:
        self._check_fitted("bank_")
        self._check_dim(x, self.bank_.shape[1])
        sims = knn_similarities(self.bank_, _normalise(x), self.k, self.knn_backend)
        return sims.double().mean(dim=1)

    def score(self, features) -> np.ndarray:
        return (-self._mean_topk(_features(features))).numpy()


class KnnCosNormScorer(KnnCosScorer):
    """CSI's trick: top-``k`` mean cosine times the un-normalised test feature norm, negated."""

    name = "knn_cos_norm"

    def score(self, features) -> np.ndarray:
        x = _features(features)
        return (-self._mean_topk(x) * x.double().norm(dim=1)).numpy()


class KdeScorer(Scorer):
    """Negated (1/gamma) log sum_j exp(gamma cos(x, x_j)) over the whole bank.

    gamma = ``scale`` / (var * d): var is the mean over dimensions of the per-dimension
    population variance of the L2-normalised bank features, d their dimension.
    """

    name = "kde"

    def __init__(self, scale: float = 20.0) -> None:
        self.scale = float(scale)
        self.bank_ = None
        self.gamma_ = None

    def fit(self, bank) -> KdeScorer:
        self.bank_ = _normalise(_features(bank, "bank features"))
        self.gamma_ = self.scale / (_bank_variance(self.bank_) * self.bank_.shape[1])
        return self

    def score(self, features) -> np.ndarray:
        self._check_fitted("bank_")
        x = _normalise(_features(features))
        self._check_dim(x, self.bank_.shape[1])
        step = _row_chunk(self.bank_.shape[0])
        out = [
            torch.logsumexp((x[i : i + step] @ self.bank_.T).double() * self.gamma_, dim=1)
            for i in range(0, x.shape[0], step)
        ]
        return (-torch.cat(out) / self.gamma_).numpy()


class CentreScorer(Scorer):
    """Negated cosine to the normalised mean of the normalised bank features."""

    name = "centre"

    def __init__(self) -> None:
        self.centre_ = None

    def fit(self, bank) -> CentreScorer:
        mean = _normalise(_features(bank, "bank features")).double().mean(dim=0, keepdim=True)
        self.centre_ = _normalise(mean)[0]
        return self

    def score(self, features) -> np.ndarray:
        self._check_fitted("centre_")
        x = _normalise(_features(features).double())
        self._check_dim(x, self.centre_.shape[0])
        return (-(x @ self.centre_)).numpy()


class _OcsvmScorer(Scorer):
    """One-class SVM on normalised features; score = -decision_function.

    The bank is capped at ``max_bank`` features (random subset drawn with ``seed``) because
    kernel OC-SVM training is O(n^2) in time and memory.
    """

    kernel = "rbf"

    def __init__(self, nu: float = 0.1, max_bank: int = 5000, seed: int = 0) -> None:
        if not 0.0 < float(nu) <= 1.0:
            raise ConfigError(f"{self.name}: nu must be in (0, 1], got {nu}.")
        if int(max_bank) < 2:
            raise ConfigError(f"{self.name}: max_bank must be >= 2, got {max_bank}.")
        self.nu = float(nu)
        self.max_bank = int(max_bank)
        self.seed = int(seed)
        self.svm_ = None

    def _gamma(self, bank_n: torch.Tensor) -> float | str:
        return "scale"

    def fit(self, bank) -> _OcsvmScorer:
        from sklearn.svm import OneClassSVM

        bank_n = _normalise(_features(bank, "bank features"))
        if bank_n.shape[0] > self.max_bank:
            g = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(bank_n.shape[0], generator=g)[: self.max_bank]
            bank_n = bank_n[idx.sort().values]
        self.dim_ = bank_n.shape[1]
        self.svm_ = OneClassSVM(kernel=self.kernel, nu=self.nu, gamma=self._gamma(bank_n))
        self.svm_.fit(bank_n.double().numpy())
        return self

    def score(self, features) -> np.ndarray:
        self._check_fitted("svm_")
        x = _normalise(_features(features))
        self._check_dim(x, self.dim_)
        return -np.asarray(self.svm_.decision_function(x.double().numpy()), dtype=np.float64)


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


class OcsvmLinearScorer(_OcsvmScorer):
    """Linear one-class SVM on normalised features."""

    name = "ocsvm_linear"
    kernel = "linear"


class MahalanobisScorer(Scorer):
    """Squared Mahalanobis distance to the bank mean, Ledoit-Wolf shrinkage covariance.

    Shrinkage keeps the covariance well conditioned for rank-deficient banks (duplicate
    dimensions, fewer samples than dimensions); the precision comes from a pseudo-inverse,
    so even a constant bank does not fail. ``normalize=True`` L2-normalises features first.
    """

    name = "mahalanobis"

    def __init__(self, normalize: bool = False) -> None:
        self.normalize = bool(normalize)
        self.cov_ = None

    def _prep(self, x) -> torch.Tensor:
        x = _features(x).double()
        return _normalise(x) if self.normalize else x

    def fit(self, bank) -> MahalanobisScorer:
        from sklearn.covariance import LedoitWolf

        x = self._prep(bank)
        if x.shape[0] < 2:
            raise InputError("mahalanobis needs a bank of at least 2 features.")
        self.cov_ = LedoitWolf(assume_centered=False).fit(x.numpy())
        return self

    def score(self, features) -> np.ndarray:
        self._check_fitted("cov_")
        x = self._prep(features)
        self._check_dim(x, self.cov_.location_.shape[0])
        return np.asarray(self.cov_.mahalanobis(x.numpy()), dtype=np.float64)


class SvddScorer(Scorer):
    """Deep SVDD: squared Euclidean distance to a centre ``c`` (the bank mean if not given)."""

    name = "svdd"

    def __init__(self, c=None) -> None:
        self.c = c
        self.centre_ = None if c is None else _features(torch.as_tensor(c).reshape(1, -1))[0]

    def fit(self, bank) -> SvddScorer:
        if self.c is None:
            self.centre_ = _features(bank, "bank features").double().mean(dim=0).float()
        return self

    def score(self, features) -> np.ndarray:
        self._check_fitted("centre_")
        x = _features(features).double()
        self._check_dim(x, self.centre_.shape[0])
        return ((x - self.centre_.double()) ** 2).sum(dim=1).numpy()


class LogitScorer(Scorer):
    """The model's scalar output is the anomaly score (``negate=True`` if it scores normality)."""

    name = "logit"

    def __init__(self, negate: bool = False) -> None:
        self.negate = bool(negate)

    def fit(self, bank=None) -> LogitScorer:
        return self

    def score(self, features) -> np.ndarray:
        x = _features(features, "model outputs")
        if x.shape[1] != 1:
            raise InputError(
                f"logit scorer needs one output per sample, got shape {tuple(x.shape)}."
            )
        s = x[:, 0].double().numpy()
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

DEFAULT_SCORERS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("knn_cos", {"k": 1}),
    ("knn_cos", {"k": 5}),
    ("knn_cos_norm", {"k": 5}),
    ("kde", {}),
    ("centre", {}),
    ("mahalanobis", {}),
    ("ocsvm_rbf", {}),
    ("ocsvm_linear", {}),
)


def build_scorer(name: str, **params: Any) -> Scorer:
    """Build a scorer by registry name, e.g. ``build_scorer("knn_cos", k=5)``."""
    if name not in SCORERS:
        raise ConfigError(f"unknown scorer {name!r}; choose one of: {', '.join(SCORERS)}.")
    try:
        return SCORERS[name](**params)
    except TypeError as exc:
        raise ConfigError(f"invalid parameters {params} for scorer {name!r}: {exc}") from exc


def _scorer_specs(scorers) -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for spec in scorers:
        if isinstance(spec, str):
            specs.append((spec, {}))
        else:
            name, params = spec
            specs.append((name, dict(params or {})))
    return specs


def result_name(scorer: str, k: int | None, variant: str) -> str:
    """Readable label of one result row, e.g. ``"knn_cos k=5 (plain)"``."""
    return f"{scorer}{'' if k is None else f' k={k}'} ({variant})"


# --------------------------------------------------------------------------- a whole run


def kmeans_centroids(features: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """k spherical k-means centroids of the features, scaled to the features' mean norm (so the
    norm-based scorers still see typical norms). faiss when installed, else scikit-learn."""
    if k < 1:
        raise InputError(f"bank_centroids must be >= 1, got {k}.")
    x = _normalise(features.float()).numpy().astype(np.float32)
    faiss = _faiss()
    if faiss is not None:
        km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, spherical=True, verbose=False)
        km.train(x)
        centroids = torch.from_numpy(km.centroids.copy())
    else:
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(x)
        centroids = torch.from_numpy(km.cluster_centers_.astype(np.float32))
    return _normalise(centroids) * features.norm(dim=1).mean()


def score_run(
    encoder: nn.Module,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    test_labels,
    scorers: Iterable[tuple[str, dict[str, Any]] | str] = DEFAULT_SCORERS,
    variants: Sequence[str] = ("plain",),
    device: str | torch.device = "cpu",
    batch_size: int = 512,
    size: int = 32,
    resize_ratio: float = 1.125,
    n_crops: int = 10,
    seed: int = 0,
    bank_size: int | None = None,
    channels: int = 3,
    knn_backend: str = "auto",
    return_details: bool = False,
    bank_centroids: int | None = None,
):
    """Score the test images with every scorer and variant and evaluate the metrics.

    Variants (paper): ``plain`` = angle 0 (s_con); ``angled`` = mean over the 4 rotations of
    the score against a bank at the same rotation (s_shift); ``ensemble`` = ``n_crops`` random
    crops x 4 rotations, each scored against the bank at that rotation, averaged (s_ens).
    Each feature set is extracted once and shared by all scorers; each scorer is fitted once
    per rotation. ``bank_size`` draws a seeded random subset of the training images;
    ``bank_centroids`` replaces the bank's features by that many k-means centroids (for big banks).

    Returns:
        list of dicts ``{"scorer", "k", "variant", "auroc", "aupr_anomaly", "aupr_normal",
        "fpr95"}``; with ``return_details=True`` a tuple ``(results, details)`` where details
        holds ``"scores"`` (result_name -> np.ndarray), ``"labels"`` (np.ndarray) and
        ``"test_features"`` (plain test features, float32 tensor (N, D)).
    """
    variants = tuple(variants)
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ConfigError(f"unknown variant(s) {bad}; choose from: {', '.join(VARIANTS)}.")
    specs = _scorer_specs(scorers)
    if not specs:
        raise ConfigError("no scorers given; pass e.g. [('knn_cos', {'k': 5})].")
    for name, params in specs:
        if name == "knn_cos" or name == "knn_cos_norm":
            params.setdefault("knn_backend", knn_backend)
        build_scorer(name, **params)  # fail early on bad names / parameters
    train_images = _check_images(train_images)
    test_images = _check_images(test_images)
    labels = np.asarray(
        test_labels.detach().cpu().numpy() if hasattr(test_labels, "detach") else test_labels
    ).reshape(-1)
    if labels.shape[0] != test_images.shape[0]:
        raise InputError(
            f"{test_images.shape[0]} test images but {labels.shape[0]} test labels; "
            "pass one label (1 = anomaly) per test image."
        )

    if bank_size is not None and bank_size < train_images.shape[0]:
        if bank_size < 1:
            raise InputError(f"bank_size must be >= 1 or None, got {bank_size}.")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(train_images.shape[0], generator=g)[:bank_size].sort().values
        train_images = train_images[idx]
    crop_gen = torch.Generator().manual_seed(seed + 1)
    feat_kw = dict(
        batch_size=batch_size, device=device, size=size, resize_ratio=resize_ratio,
        channels=channels,
    )  # fmt: skip

    angles = (0,) if variants == ("plain",) else _ANGLES
    sums = {(i, v): None for i in range(len(specs)) for v in variants}
    plain_features = None
    for angle in angles:
        bank = extract_features(encoder, train_images, angle=angle, **feat_kw)
        if bank_centroids is not None and bank_centroids < bank.shape[0]:
            bank = kmeans_centroids(bank, bank_centroids, seed)
        test = extract_features(encoder, test_images, angle=angle, **feat_kw)
        if angle == 0:
            plain_features = test
        crop_feats = None
        if "ensemble" in variants:
            crop_feats = extract_features(
                encoder, test_images, angle=angle, crops=n_crops, gen=crop_gen, **feat_kw
            )
        for i, (name, params) in enumerate(specs):
            scorer = build_scorer(name, **params).fit(bank)
            s = scorer.score(test)
            contrib = {}
            if angle == 0 and "plain" in variants:
                contrib["plain"] = s
            if "angled" in variants:
                contrib["angled"] = s / len(angles)
            if crop_feats is not None:
                crop_scores = sum(scorer.score(c) for c in crop_feats)
                contrib["ensemble"] = crop_scores / (n_crops * len(angles))
            for v, val in contrib.items():
                sums[i, v] = val if sums[i, v] is None else sums[i, v] + val

    results, all_scores = [], {}
    for i, (name, params) in enumerate(specs):
        k = params.get("k")
        if k is None and name in ("knn_cos", "knn_cos_norm"):
            k = KnnCosScorer().k
        for v in variants:
            scores = sums[i, v]
            all_scores[result_name(name, k, v)] = scores
            results.append(
                {"scorer": name, "k": k, "variant": v, **evaluate_scores(labels, scores)}
            )
    if return_details:
        return results, {"scores": all_scores, "labels": labels, "test_features": plain_features}
    return results
