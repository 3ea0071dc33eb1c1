"""`OneClassDetector`: train on normal images, score new ones, save, load, attack, export.

One object for research and deployment, in the habits users know: scikit-learn's estimator API
(``__init__`` only stores parameters, ``fit`` returns self, fitted attributes end in ``_``,
``score_samples`` higher = more normal, ``__sklearn_tags__`` so ``check_is_fitted`` and
``is_outlier_detector`` work) and PyOD's ``BaseDetector`` attribute set (``decision_function``
higher = more anomalous, ``contamination``, ``threshold_``, ``decision_scores_``, ``labels_``,
``predict`` 1 = anomaly, ``fit_predict``, ``predict_proba``).

    det = OneClassDetector(method="firm", backbone="resnet_small", epochs=4, scorer="knn_cos", k=5)
    det.fit(images)                      # arrays, PIL images, files or folders
    det.predict(new_images)              # 1 = anomaly, by threshold_ (set by fit)
    det.score_paths(["incoming/"])       # names, scores, skipped files with their reason
    det.score_tensor(x01)                # the same scores, differentiable w.r.t. the pixels
    det.save("det/"); OneClassDetector.load("det/")

The threshold: ``threshold_at`` puts it so that at most floor(rate x n) of n scores lie strictly
above it. ``fit`` applies it to the held-out images (``holdout``) at ``target_fpr`` (or at
``contamination`` when no target is given), or, without a held-out share, to the training images'
own scores at ``contamination`` (as PyOD does; those are optimistic, a kNN bank holds them).
Saving and loading live in `firmad.persistence`, input handling in `firmad.inputs`.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin

from firmad.config import load_config
from firmad.data import OneClassSplit
from firmad.data.pool import prepare_images
from firmad.errors import ConfigError, InputError
from firmad.factory import build_extractor, build_method, build_split, build_trainer
from firmad.inputs import (  # noqa: F401  (public names kept importable from here)
    as_uint8_images,
    check_unit_range,
    find_images,
    load_files,
    score_paths,
    to_batch,
    warn_skipped,
)
from firmad.methods import Method
from firmad.metrics import clopper_pearson, threshold_at  # noqa: F401  (kept importable here)
from firmad.persistence import (  # noqa: F401
    FORMAT,
    META,
    WEIGHTS,
    check_threshold,
    is_degenerate,
    load_detector,
    refuse_pickles,
    save_detector,
    sha256_file,
)
from firmad.run import RunDir
from firmad.scoring import (
    VARIANTS,
    VariantScorer,
    bank_crops,
    bank_subset,
    build_scorer,
    extract_banks,
    parse_scorer,
    score_run,
    scorer_parameters,
)
from firmad.scoring.features import eval_mode
from firmad.training import ProgressBar
from firmad.training.callbacks import progress_bar

CHUNK = 256  # images per forward pass when scoring
# The held-out share must put at least this many normals above the threshold: the 95 %
# interval of the achieved FPR is then about +-60 % of the target (1.96 / sqrt(10)); with 5 it
# would be +-90 %, with 20 +-45 % at twice the images taken from training.
MIN_ABOVE = 10
MIN_HOLDOUT_SHARE = 0.1
MIN_STEPS = 10  # fewer training steps than this barely move the encoder from its start


class NotFittedError(InputError):
    """The detector was used before `fit` (or before a threshold exists, for `predict`)."""


class OneClassDetector(OutlierMixin, BaseEstimator):
    """A one-class anomaly detector: an encoder trained by a firmad method plus a scorer.

    Parameters (stored as given; nothing happens until `fit`):
        recipe: a shipped recipe name or YAML path giving every training setting
            (default ``fmnist-cpu``: FIRM, a narrow ResNet-10, 4 epochs; minutes on a CPU).
        method, backbone, epochs, seed, size, device: shortcuts for the recipe keys
            ``method.name``, ``model.backbone``, ``train.epochs``, ``train.seed``, ``data.size``,
            ``train.device``; None keeps the recipe's value. The seed also draws the held-out
            split.
        overrides: more ``section.key=value`` settings, as with ``--set``.
        scorer: a scorer name (``knn_cos``, ``kde``, ``mahalanobis``, ``svdd``, ...) or a spec
            ``"knn_cos:k=1"``; ``"own"`` is the method's own score (Deep SVDD distance,
            classifier logit). k: neighbours for the kNN scorers.
        variant: ``plain`` (angle 0), ``angled`` (mean over 4 rotations) or ``ensemble``
            (random crops x rotations; stochastic in `score_tensor`).
        bank_size: score against a seeded subset of this many normal training images.
        verbose: show a progress bar while training.
        contamination: share of anomalies expected among the images (PyOD's meaning), in
            (0, 0.5]; sets ``threshold_`` when no ``target_fpr`` is given.
        holdout: share of the images kept out of training to set the threshold on
            (0 = none: the training images' scores are used), or ``"auto"``: max(10 %,
            MIN_ABOVE / rate images), at most half of them.
        target_fpr: share of held-out normals the threshold flags (the images are all normal).
    """

    def __init__(
        self,
        recipe: str | None = None,
        method: str | None = None,
        backbone: str | None = None,
        epochs: int | None = None,
        scorer: str = "knn_cos",
        k: int | None = 5,
        variant: str = "plain",
        seed: int | None = None,
        size: int | None = None,
        device: str | None = None,
        overrides: tuple[str, ...] | list[str] = (),
        bank_size: int | None = None,
        verbose: bool = False,
        contamination: float = 0.1,
        holdout: float | str = 0.0,
        target_fpr: float | None = None,
    ) -> None:
        self.recipe = recipe
        self.method = method
        self.backbone = backbone
        self.epochs = epochs
        self.scorer = scorer
        self.k = k
        self.variant = variant
        self.seed = seed
        self.size = size
        self.device = device
        self.overrides = overrides
        self.bank_size = bank_size
        self.verbose = verbose
        self.contamination = contamination
        self.holdout = holdout
        self.target_fpr = target_fpr

    # --- scikit-learn conventions -------------------------------------------------------------

    _PARAMS = (
        "recipe", "method", "backbone", "epochs", "scorer", "k", "variant", "seed", "size",
        "device", "overrides", "bank_size", "verbose", "contamination", "holdout", "target_fpr",
    )  # fmt: skip
    _THRESHOLD_PARAMS = ("contamination", "target_fpr")  # applied to a fitted detector at once

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._PARAMS}

    def set_params(self, **params: Any) -> OneClassDetector:
        """Set parameters. On a fitted detector, ``contamination`` / ``target_fpr`` move the
        threshold at once; any other parameter takes effect at the next `fit` (a warning says
        so: the fitted encoder and scorer are not changed)."""
        bad = sorted(set(params) - set(self._PARAMS))
        if bad:
            raise ConfigError(f"unknown parameter(s) {bad}; allowed: {', '.join(self._PARAMS)}")
        for name, value in params.items():
            setattr(self, name, value)
        if self.__sklearn_is_fitted__():
            refit = sorted(set(params) - {*self._THRESHOLD_PARAMS, "verbose"})
            if refit:
                warnings.warn(
                    f"set_params({', '.join(refit)}) on a fitted detector: the fitted encoder "
                    "and scorer keep their settings, so scores do not change until you call "
                    "fit(X) again",
                    UserWarning,
                    stacklevel=2,
                )
            if set(params) & set(self._THRESHOLD_PARAMS):
                self._check_rates()
                self._set_threshold()
        return self

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "scorer_")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False  # images: (N, C, H, W), PIL images, paths
        tags.input_tags.three_d_array = True
        tags.non_deterministic = True  # training on a GPU is not bit-reproducible
        return tags

    def __repr__(self, N_CHAR_MAX: int = 700) -> str:
        changed = {k: v for k, v in self.get_params().items() if v != _DEFAULTS.get(k)}
        text = f"OneClassDetector({', '.join(f'{k}={v!r}' for k, v in changed.items())})"
        if not self.__sklearn_is_fitted__():
            return text
        t = getattr(self, "threshold_", None)
        thr = "no threshold" if t is None else f"threshold_={t:.4g}"
        return f"{text} [fitted: {self.scorer_.name} on {self.n_bank_} images, {thr}]"

    def _check_fitted(self) -> None:
        if not self.__sklearn_is_fitted__():
            raise NotFittedError(
                "this OneClassDetector is not fitted yet; call fit(normal_images) first, or "
                "load one with OneClassDetector.load(DIR) / .from_run(RUN_DIR)"
            )

    # --- configuration ------------------------------------------------------------------------

    def make_config(self, dataset: str = "custom"):
        """The RunConfig this detector trains with (recipe + shortcuts + overrides); every
        number in it must be finite (an infinite temperature trains a constant loss)."""
        sets = [f"data.dataset={dataset}"] if dataset else []
        for key, value in (
            ("method.name", self.method),
            ("model.backbone", self.backbone),
            ("train.epochs", self.epochs),
            ("train.seed", self.seed),
            ("data.size", self.size),
            ("train.device", self.device),
        ):
            if value is not None:
                sets.append(f"{key}={value}")
        if isinstance(self.overrides, str):
            raise ConfigError("overrides must be a list of 'section.key=value' strings")
        cfg = load_config(self.recipe or "fmnist-cpu", sets + list(self.overrides))
        bad = _non_finite(cfg.to_dict())
        if bad:
            raise ConfigError(
                f"{bad[0][0]} = {bad[0][1]} is not a finite number; give a finite value"
            )
        return cfg

    def _check_rates(self) -> None:
        c, t = self.contamination, self.target_fpr
        if not _is_real(c) or not 0.0 < c <= 0.5:
            raise ConfigError(f"contamination must be a number in (0, 0.5], got {c!r}")
        if t is not None and (not _is_real(t) or not 0.0 < t < 1.0):
            raise ConfigError(f"target_fpr must be a number in (0, 1), got {t!r}")

    def _check_params(self) -> None:
        """Every parameter checked before any work (a typo must not cost a training run)."""
        self._check_rates()
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant {self.variant!r}: choose one of {', '.join(VARIANTS)}")
        h = self.holdout
        if h != "auto" and (not _is_real(h) or not 0.0 <= h < 1.0):
            raise ConfigError(f"holdout must be 'auto' or a share in [0, 1), got {h!r}")
        for name in ("k", "bank_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {v!r}")
        if not isinstance(self.scorer, str):
            raise ConfigError(f"scorer must be a spec such as 'knn_cos:k=5', got {self.scorer!r}")

    @property
    def method_(self) -> Method:
        """The method of ``config_`` (built once per config: it decides the own score)."""
        built = self.__dict__.get("_method")
        if built is None or built[0] is not self.config_:
            built = self._method = (self.config_, build_method(self.config_))
        return built[1]

    def _scorer_spec(self, model=None) -> tuple[str, dict[str, Any]]:
        name, params = parse_scorer(self.scorer)
        method = self.method_
        if name == "own":
            if method.own_scorer is None:
                raise ConfigError(
                    f"scorer='own': method {method.name!r} has no score of its own; use a "
                    "feature scorer such as knn_cos, kde or mahalanobis"
                )
            name = method.own_scorer
        if self.k is not None and "k" in scorer_parameters(name):
            params.setdefault("k", self.k)
        if name == method.own_scorer and model is not None:
            params.update(method.own_scorer_params(model))
        build_scorer(name, **params)  # unknown names and parameters are refused here
        return name, params

    # --- fit ----------------------------------------------------------------------------------

    def fit(self, X, y=None) -> OneClassDetector:
        """Train on normal images only, fit the scorer on their features and set the threshold;
        returns self.

        X: uint8 images (N, C, H, W), (N, H, W, C) or (N, H, W) as a numpy array or tensor, a
        list of PIL images, files or folders (searched recursively; non-image names are
        skipped with a warning). ``y`` is ignored (scikit-learn compatibility). Parameters,
        the recipe and the image count are all checked before training starts.
        """
        self._check_params()
        cfg = self.make_config("custom")
        self.config_ = cfg
        self._scorer_spec()
        images, layout = as_uint8_images(X, size=cfg.data.size, channels=cfg.data.channels)
        cfg = _with_channels(cfg, images.shape[1])
        held, train = self._split(images)
        self._train(train, layout, len(held))
        self.input_shape_ = tuple(images.shape[1:])
        self._fit_scorer(prepare_images(train, cfg.data.size))
        self.decision_scores_ = self.score_images(images)
        self.heldout_indices_ = held.numpy() if len(held) else None  # rows of X held out
        self.heldout_scores_ = self.decision_scores_[held.numpy()] if len(held) else None
        self._set_threshold()
        return self

    def _train(self, train: torch.Tensor, layout: str, n_held: int) -> None:
        cfg = self.config_
        split = _train_only_split(train, cfg.data.dataset)
        callbacks = []
        progress = progress_bar() if self.verbose else None
        if progress is not None:
            callbacks.append(ProgressBar(progress))
        try:
            trainer = build_trainer(
                cfg, split=split, callbacks=callbacks, normalisation=_stats(train)
            )
        except ConfigError as err:
            if "train.batch_size" not in str(err):
                raise
            held = f" ({n_held} more held out for the threshold)" if n_held else ""
            raise InputError(
                f"{len(train)} image(s) for training{held} do not fill one batch "
                f"(train.batch_size {cfg.train.batch_size}, synthetic outliers included): give "
                "more normal images (hundreds are better), or lower the batch with "
                "--set train.batch_size=N"
            ) from None
        self._check_sizes(len(train))
        _warn_tiny(trainer, len(train))
        if progress is not None:
            with progress:
                trainer.fit()
        else:
            trainer.fit()
        self._set_model(trainer.model.to(memory_format=torch.contiguous_format), layout)

    def holdout_size(self, n: int) -> int:
        """How many of n images `fit` keeps out of training for the threshold."""
        h = self.holdout
        if h == "auto":
            rate = self.target_fpr if self.target_fpr is not None else self.contamination
            want = max(math.ceil(MIN_HOLDOUT_SHARE * n), math.ceil(MIN_ABOVE / rate))
            return min(want, n // 2)
        return int(round(float(h) * n))

    def _split(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(held-out indices, training images): a seeded draw (train.seed)."""
        n = len(images)
        n_held = self.holdout_size(n)
        if not n_held:
            return torch.zeros(0, dtype=torch.int64), images
        gen = torch.Generator().manual_seed(self.config_.train.seed)
        order = torch.randperm(n, generator=gen)
        held = order[:n_held].sort().values
        return held, images[order[n_held:].sort().values]

    def _check_sizes(self, n_train: int) -> None:
        """Enough images for k neighbours (one batch is checked by the Trainer)."""
        name, params = self._scorer_spec()
        n_bank = min(n_train, self.bank_size or n_train)
        k = params.get("k")
        if k is not None and k > n_bank:
            raise ConfigError(
                f"scorer {name} with k={k} needs at least {k} training images in its bank; "
                f"there are {n_bank}: lower k or give more images"
            )

    def _set_model(self, model, layout: str) -> None:
        # A fitted detector is frozen: gradients of its scores reach the pixels only.
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None  # the last training step's gradients
        self.model_ = model.eval()
        self.extractor_ = build_extractor(self.config_, model.encoder)
        self.input_layout_ = layout

    def _fit_scorer(self, train_images: torch.Tensor) -> None:
        """Fit the scorer on the features of the normal training images (uint8, prepared)."""
        name, params = self._scorer_spec(self.model_)
        vs = VariantScorer(name, params, self.variant, self.config_.eval.n_crops)
        e, seed = self.config_.eval, self.config_.train.seed
        bank = bank_subset(train_images, self.bank_size, seed)
        crops = bank_crops(self.variant, e.ensemble_bank, e.n_crops)
        banks = extract_banks(
            self.extractor_, bank, vs.angles, e.batch_size, e.bank_centroids, seed, crops=crops
        )
        _check_features(banks)
        self.scorer_ = vs.fit(banks).to(self.extractor_.device)
        self.n_bank_ = int(bank.shape[0])

    @classmethod
    def from_model(
        cls, model, cfg, scorer: str = "knn_cos", k: int | None = 5, variant: str = "plain",
        bank_size: int | None = None,
    ) -> OneClassDetector:  # fmt: skip
        """A detector around a trained `OneClassModel` and its run config; call `fit_bank` (or
        use `evaluate`) before scoring."""
        det = cls(recipe=None, scorer=scorer, k=k, variant=variant, bank_size=bank_size)
        det.config_ = cfg
        det._set_model(model, "NCHW")
        return det

    def fit_bank(self, train_images: torch.Tensor) -> OneClassDetector:
        """Fit only the scorer, on the features of these normal images (no training)."""
        images, _ = as_uint8_images(train_images, "NCHW")
        self.input_shape_ = tuple(images.shape[1:])
        self._fit_scorer(prepare_images(images, self.config_.data.size))
        return self

    def evaluate(self, train_images, test_images, test_labels, scorers, variants, **kw):
        """Every scorer x variant on a labelled test set, features extracted once per rotation
        (the benchmark's path; `score_run` with this detector's preprocessing and encoder).
        The method's own score, if any, comes first. Returns ``(results, details)``."""
        cfg = self.config_
        method = self.method_
        own = []
        if method.own_scorer is not None:
            own_vs = VariantScorer(method.own_scorer, method.own_scorer_params(self.model_))
            own.append(own_vs.fit({0: None}).to(self.extractor_.device))
        e = cfg.eval
        return score_run(
            self.extractor_,
            prepare_images(train_images, cfg.data.size),
            prepare_images(test_images, cfg.data.size),
            test_labels,
            scorers=scorers,
            variants=variants,
            batch_size=e.batch_size,
            n_crops=e.n_crops,
            seed=cfg.train.seed,
            bank_size=e.bank_size,
            bank_centroids=e.bank_centroids,
            extra_scorers=own,
            ensemble_bank=e.ensemble_bank,
            return_details=True,
            **kw,
        )

    @classmethod
    def from_run(
        cls, run_dir: str | Path, scorer: str = "knn_cos", k: int | None = 5,
        variant: str = "plain", device: str | None = None, bank_size: int | None = None,
    ) -> OneClassDetector:  # fmt: skip
        """A detector from any finished `firmad train` run: its last checkpoint's encoder, the
        scorer fitted on the run's normal training images."""
        run = RunDir(run_dir)
        cfg = run.read_config()
        if device is not None:
            cfg.train.device = device
        model = run.load_model(cfg, device=cfg.train.device)
        det = cls.from_model(model, cfg, scorer, k, variant, bank_size)
        return det.fit_bank(build_split(cfg).train_images)

    # --- scoring ------------------------------------------------------------------------------

    def score_tensor(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Anomaly scores (N,) as a differentiable function of the pixels.

        x: float images in [0, 1], (N, C, H, W) or (N, H, W, C) (read by the channel axis, as
        everywhere); any size (resized inside). Resizing, channel repeat, the test transform
        and normalisation all happen inside, so gradients reach the input pixels. Runs in eval
        mode; parameters get no gradient unless they require one.
        """
        self._check_fitted()
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
            raise InputError(
                "score_tensor expects a float tensor of 4 dimensions with values in [0, 1]; "
                "convert uint8 images with x.float() / 255"
            )
        check_unit_range(x)
        x, _ = to_batch(x)
        x = x.to(self.extractor_.device)
        with eval_mode(self.extractor_):
            return self.scorer_(self.extractor_, x, gen=gen)

    __call__ = score_tensor

    def decision_function(self, X) -> np.ndarray:
        """Anomaly scores, higher = more anomalous (PyOD's convention), float64 (N,).

        X: images as `fit` takes them, one image, a PIL image, or paths. Paths are scored as
        `score_paths` does: files that cannot be read are skipped with a warning listing them,
        and the scores come in its order (given files as given, each folder's files sorted by
        path); use `score_paths` to get the names with the scores."""
        self._check_fitted()
        if isinstance(X, str | Path) or (
            isinstance(X, list | tuple) and X and all(isinstance(x, str | Path) for x in X)
        ):
            names, scores, skipped = self.score_paths(X)
            warn_skipped(skipped, names)
            return scores
        c = self.config_.data
        images, _ = as_uint8_images(X, None, c.size, c.channels)
        return self.score_images(images)

    def score_paths(
        self, paths, batch_size: int = 64, progress=None
    ) -> tuple[list[str], np.ndarray, list[tuple[Path, str]]]:
        """Score files and folders (recursive): ``(names, scores, skipped)``, where skipped
        lists (path, reason) for every path given or found that was not scored (hidden, not
        an image name, not a regular file, undecodable...). The `firmad score` command."""
        self._check_fitted()
        c = self.config_.data
        return score_paths(self.score_images, paths, c.size, c.channels, batch_size, progress)

    def score_images(self, images: torch.Tensor) -> np.ndarray:
        """`decision_function` for uint8 images already in (N, C, H, W) layout."""
        self._check_fitted()
        gen = torch.Generator().manual_seed(self.config_.train.seed + 1)  # ensemble: fixed crops
        out = []
        with torch.no_grad():
            for chunk in images.split(CHUNK):
                x = chunk.to(self.extractor_.device).float().div_(255.0)
                out.append(self.scorer_(self.extractor_, x, gen=gen).double().cpu())
        return torch.cat(out).numpy()

    def score_samples(self, X) -> np.ndarray:
        """Normality scores, higher = more normal (scikit-learn's convention)."""
        return -self.decision_function(X)

    # --- threshold ----------------------------------------------------------------------------

    def calibrate(
        self, X, target_fpr: float | None = None, contamination: float | None = None
    ) -> OneClassDetector:
        """Set ``threshold_`` from images not used in `fit` (see `threshold_at`).

        ``target_fpr``: X are normal images; at most floor(target_fpr x n) of them score
        above the threshold. ``contamination``: X is an unlabelled mix with that share of
        anomalies. Their scores become ``heldout_scores_``."""
        if (target_fpr is None) == (contamination is None):
            raise InputError("calibrate: give exactly one of target_fpr= or contamination=")
        rate = target_fpr if target_fpr is not None else contamination
        if not _is_real(rate) or not 0.0 < float(rate) < 1.0:
            raise InputError(f"calibrate: the rate must be a number in (0, 1), got {rate!r}")
        self.heldout_scores_ = self.decision_function(X)
        self._apply_threshold(self.heldout_scores_, float(rate), target_fpr, contamination)
        return self

    def _set_threshold(self) -> None:
        """The threshold from the held-out scores, else from the training images' scores."""
        held = getattr(self, "heldout_scores_", None)
        scores = held if held is not None and len(held) else getattr(self, "decision_scores_", None)
        if scores is None:
            return
        if self.target_fpr is not None:
            rate, target, contamination = self.target_fpr, self.target_fpr, None
        else:
            rate, target, contamination = self.contamination, None, self.contamination
        self._apply_threshold(scores, rate, target, contamination, scores is not held)

    def _apply_threshold(self, scores, rate, target, contamination, on_training=False) -> None:
        self.threshold_ = threshold_at(scores, rate)
        if getattr(self, "decision_scores_", None) is not None:  # PyOD: labels_ follow it
            self.labels_ = (self.decision_scores_ > self.threshold_).astype(np.int64)
        above = int((np.asarray(scores) > self.threshold_).sum())
        n = len(scores)
        self.calibration_ = {
            "source": "training" if on_training else "held-out",
            "n": n,
            "target_fpr": target,
            "contamination": contamination,
            "n_above": above,
            "achieved_fpr": above / n,
            "interval": clopper_pearson(above, n),
            "scores": [float(s) for s in scores] if not on_training else None,
        }
        if rate * n < MIN_ABOVE and not on_training:
            warnings.warn(
                f"the threshold rests on {n} held-out "
                f"images, {above} of them above it: too few for a rate of {rate:g} (at least "
                f"{math.ceil(MIN_ABOVE / rate)} are needed for {MIN_ABOVE} above it); the "
                "actual rate on new images may differ a lot. Give more images or a larger holdout",
                UserWarning,
                stacklevel=4,
            )

    def predict(self, X) -> np.ndarray:
        """1 = anomaly (score above ``threshold_``), 0 = normal."""
        if getattr(self, "threshold_", None) is None:
            raise NotFittedError(
                "no threshold yet: fit the detector (fit sets one), or call "
                "calibrate(held_out_normals, target_fpr=0.05) before predict"
            )
        return (self.decision_function(X) > self.threshold_).astype(np.int64)

    def fit_predict(self, X, y=None) -> np.ndarray:
        """`fit` then the labels of X (``labels_``: 1 = anomaly)."""
        return self.fit(X).labels_

    def predict_proba(self, X, method: str = "linear") -> np.ndarray:
        """(N, 2): probabilities of normal and anomaly, PyOD's way, from the scores of the
        images given to `fit` (``decision_scores_``): ``linear`` min-max scales a score to
        [0, 1] between their smallest and largest; ``unify`` is erf of the score standardised
        by their mean and std, clipped at 0. A ranking device, not a calibrated probability."""
        ref = getattr(self, "decision_scores_", None)
        if ref is None:  # a loaded detector keeps its held-out scores only
            ref = getattr(self, "heldout_scores_", None)
        if ref is None:
            raise NotFittedError("predict_proba needs the detector fitted with fit()")
        s = self.decision_function(X)
        if method == "linear":
            lo, hi = float(ref.min()), float(ref.max())
            p = (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
        elif method == "unify":
            from scipy.special import erf

            p = erf((s - ref.mean()) / (max(ref.std(), 1e-12) * np.sqrt(2)))
        else:
            raise InputError(f"predict_proba: method must be 'linear' or 'unify', got {method!r}")
        p = np.clip(p, 0.0, 1.0)
        return np.stack([1.0 - p, p], axis=1)

    def surrogate_scores(self) -> dict[str, Any]:
        """Smooth score functions of the same detector, for attacks: a kNN score passes gradient
        only to the current neighbours, so KDE and the distance to the mean normal feature
        (fitted on the same bank) are offered beside it. Empty for other scorers."""
        self._check_fitted()
        first = self.scorer_.per_angle[0]
        if not hasattr(first, "bank_") or self.scorer_.name == "kde":
            return {}
        out = {}
        for name in ("kde", "centre"):
            vs = VariantScorer(name, {}, self.variant, self.scorer_.n_crops)
            vs.fit(
                {
                    a: s.bank_
                    for a, s in zip(self.scorer_.angles, self.scorer_.per_angle, strict=True)
                }
            )
            vs.to(self.extractor_.device)
            out[name] = _BoundScore(self, vs)
        return out

    def eval(self) -> OneClassDetector:
        return self

    def attack_modules(self) -> list[torch.nn.Module]:
        """The modules an attack puts in eval mode (the attacks' detector protocol, with
        ``score_tensor``): the feature extractor and the fitted scorer."""
        self._check_fitted()
        return [self.extractor_, self.scorer_]

    # --- save / load --------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write the detector to a directory (created if needed): `firmad.persistence`."""
        self._check_fitted()
        return save_detector(self, directory)

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None) -> OneClassDetector:
        """Load a detector directory written by `save`, checking everything in it first
        (`firmad.persistence`): an untrusted folder cannot hang, exhaust memory or mislead."""
        return load_detector(cls, directory, device)


_DEFAULTS = OneClassDetector().get_params()


class _BoundScore:
    """A surrogate score function of a detector: same preprocessing and encoder."""

    def __init__(self, det: OneClassDetector, scorer: VariantScorer) -> None:
        self.det, self.scorer = det, scorer

    def attack_modules(self) -> list[torch.nn.Module]:
        return [self.det.extractor_, self.scorer]

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        x, _ = to_batch(x)
        with eval_mode(self.det.extractor_):
            return self.scorer(self.det.extractor_, x.to(self.det.extractor_.device), gen=gen)


def _is_real(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, int | float) and math.isfinite(x)


def _non_finite(data, where: str = "") -> list[tuple[str, float]]:
    """(key, value) of every non-finite float in a nested config dict."""
    if isinstance(data, dict):
        return [b for k, v in data.items() for b in _non_finite(v, f"{where}{k}.")]
    if isinstance(data, list):
        return [b for i, v in enumerate(data) for b in _non_finite(v, f"{where}{i}.")]
    if isinstance(data, float) and not math.isfinite(data):
        return [(where.rstrip("."), data)]
    return []


def _warn_tiny(trainer, n_train: int) -> None:
    if trainer.total_steps < MIN_STEPS:
        warnings.warn(
            f"{n_train} training images give only {trainer.total_steps} training step(s) "
            f"(batch {trainer.settings.batch_size}): the encoder barely learns; give more "
            "images or epochs",
            UserWarning,
            stacklevel=4,
        )


def _check_features(banks) -> None:
    """The trained encoder must give finite, distinct features (a collapsed encoder, e.g.
    after a diverged or constant loss, maps every image to the same point)."""

    for feats in banks.values():
        if feats is None:
            continue
        f = feats.reshape(-1, feats.shape[-1]).float()
        if not torch.isfinite(f).all() or (len(f) >= 2 and is_degenerate(f)):
            raise InputError(
                "training gave a useless encoder: its features are not finite, or the same for "
                "every image (a constant or diverged loss). Check the settings (e.g. "
                "method.tau, train.lr) and the images, then fit again"
            )


def _stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] (the encoder's normalisation)."""
    x = images[:10_000].float().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return mean.tolist(), std.tolist()


def _with_channels(cfg, channels: int):
    """Colour images need a colour encoder; grey ones keep the recipe's (repeated to RGB)."""
    if channels == 3 and cfg.data.channels == 1:
        cfg.data.channels = 3
    return cfg


def _train_only_split(images: torch.Tensor, dataset: str) -> OneClassSplit:
    empty = images[:0]
    return OneClassSplit(
        train_images=images,
        test_images=empty,
        test_labels=torch.zeros(0, dtype=torch.int64),
        test_classes=torch.zeros(0, dtype=torch.int64),
        normal_classes=[0],
        classes=["normal"],
        dataset=dataset,
        subsample={"n_train": int(images.shape[0])},
    )
