"""`OneClassDetector`: the scikit-learn / PyOD face of a detector.

A thin estimator over three parts: the `AnomalyModel` it fits (preprocessing + encoder + fitted
scorer: what files, ONNX and attacks take), the `Engine` that fits it, and the calibrator
(`firmad.calibration`: threshold, its count and interval, p-values). Habits users know:
scikit-learn's (``__init__`` only stores parameters, ``fit`` returns self, fitted attributes end
in ``_``, ``score_samples`` higher = more normal) and PyOD's (``decision_function`` higher = more
anomalous, ``contamination``, ``threshold_``, ``decision_scores_``, ``labels_``, ``predict`` 1 =
anomaly, ``fit_predict``, ``predict_proba``, ``predict_confidence``).

    det = OneClassDetector(method="firm", epochs=4, scorer="knn_cos", k=5)
    det.fit(images)              # arrays, PIL images, files or folders; holds out normals
    det.predict(new_images)      # 1 = anomaly: p-value <= target (see firmad.calibration)
    det.p_values(new_images)     # the share of held-out normals at least as anomalous (+1)
    det.save("det/"); OneClassDetector.load("det/")
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin

from firmad import calibration as cal
from firmad.data.pool import prepare_images
from firmad.engine import (
    Engine,
    ScorerChoice,
    detector_config,
    heldout_split,
    holdout_size,
    resolve_scorer,
    with_channels,
    with_device,
)
from firmad.errors import CheckpointError, ConfigError, InputError
from firmad.factory import build_split
from firmad.inputs import as_uint8_images, score_inputs, score_paths
from firmad.persistence import META, load_detector, save_detector
from firmad.run import RunDir
from firmad.scoring import VARIANTS


class NotFittedError(InputError, AttributeError):
    """The detector was used before `fit` (or before a threshold exists, for `predict`)."""


class OneClassDetector(OutlierMixin, BaseEstimator):
    """A one-class anomaly detector: an encoder trained by a firmad method plus a scorer.

    recipe: a shipped recipe name or YAML path (default fmnist-cpu: FIRM, a narrow ResNet-10).
    method, backbone, epochs, seed, size, device: the recipe keys method.name, model.backbone,
    train.epochs, train.seed (also the held-out draw), data.size, train.device (None: the
    recipe's). steps: train exactly this many steps instead of whole epochs. overrides: more
    ``section.key=value`` settings, as with ``--set``. scorer: ``knn_cos``, ``kde``,
    ``mahalanobis``, ... or ``"knn_cos:k=1"``; ``"own"`` is the method's own score. k: the kNN
    scorers' neighbours. variant: plain, angled or ensemble. bank_size: a seeded subset of the
    training images as the bank. verbose: progress while fitting (None: when in a terminal or
    a notebook). contamination: share of anomalies expected (PyOD), in (0, 0.5]. holdout: the
    share of images kept out of training to set the threshold on, or "auto" (max(10 %,
    10 / rate images), at most half); 0 sets it on the training images' scores, with a warning.
    target_fpr: the share of normals to flag (else contamination). unreadable: "nan" (NaN and a
    warning for an input file that cannot be scored) or "raise".
    """

    def __init__(
        self, recipe: str | None = None, method: str | None = None,
        backbone: str | None = None, epochs: int | None = None, scorer: str = "knn_cos",
        k: int | None = 5, variant: str = "plain", seed: int | None = None,
        size: int | None = None, device: str | None = None, overrides=(),
        bank_size: int | None = None, verbose: bool | None = None, contamination: float = 0.1,
        holdout: float | str = "auto", target_fpr: float | None = None,
        steps: int | None = None, unreadable: str = "nan",
    ) -> None:  # fmt: skip
        given = locals()
        for name in self._PARAMS:  # stored as given (scikit-learn's rule)
            setattr(self, name, given[name])

    _PARAMS = (
        "recipe", "method", "backbone", "epochs", "scorer", "k", "variant", "seed", "size",
        "device", "overrides", "bank_size", "verbose", "contamination", "holdout", "target_fpr",
        "steps", "unreadable",
    )  # fmt: skip
    _RATES = ("contamination", "target_fpr")  # applied to a fitted detector at once

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._PARAMS}

    def set_params(self, **params: Any) -> OneClassDetector:
        """On a fitted detector, ``contamination`` / ``target_fpr`` move the threshold at once
        (or a warning says why they cannot); other parameters wait for the next `fit`."""
        bad = sorted(set(params) - set(self._PARAMS))
        if bad:
            raise ConfigError(f"unknown parameter(s) {bad}; allowed: {', '.join(self._PARAMS)}")
        for name, value in params.items():
            setattr(self, name, value)
        if self.__sklearn_is_fitted__():
            refit = sorted(set(params) - {*self._RATES, "verbose", "unreadable"})
            if refit:
                _warn(
                    f"set_params({', '.join(refit)}) on a fitted detector: the fitted encoder "
                    "and scorer keep their settings until you call fit(X) again"
                )
            if set(params) & set(self._RATES):
                self._check_rates()
                self._move_threshold(set(params))
        return self

    def __sklearn_is_fitted__(self) -> bool:
        return "anomaly_model_" in self.__dict__

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

    def make_config(self, dataset: str = "custom"):
        """The RunConfig this detector trains with: the recipe, the shortcut parameters, then
        ``overrides`` (every value checked)."""
        return detector_config(self.recipe, {
            "data": {"dataset": dataset or None, "size": self.size},
            "method": {"name": self.method}, "model": {"backbone": self.backbone},
            "train": {"epochs": self.epochs, "seed": self.seed, "device": self.device},
        }, self.overrides)  # fmt: skip

    def _check_rates(self) -> None:
        c, t = self.contamination, self.target_fpr
        if not _is_real(c) or not 0.0 < c <= 0.5:
            raise ConfigError(f"contamination must be a number in (0, 0.5], got {c!r}")
        if t is not None and (not _is_real(t) or not 0.0 < t < 1.0):
            raise ConfigError(f"target_fpr must be a number in (0, 1), got {t!r}")

    def _check_params(self) -> None:
        self._check_rates()
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant {self.variant!r}: choose one of {', '.join(VARIANTS)}")
        h = self.holdout
        if h != "auto" and (not _is_real(h) or not 0.0 <= h < 1.0):
            raise ConfigError(f"holdout must be 'auto' or a share in [0, 1), got {h!r}")
        for name in ("k", "bank_size", "steps"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {v!r}")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give epochs or steps, not both (steps sets the epochs)")
        if self.unreadable not in ("nan", "raise"):
            raise ConfigError(f"unreadable must be 'nan' or 'raise', got {self.unreadable!r}")

    def check_params(self):
        """Every parameter, the recipe and the scorer checked, before any work (a typo must
        not cost a training run); returns the RunConfig `fit` trains with."""
        self._check_params()
        cfg = self.make_config()
        resolve_scorer(cfg, self.scorer, self.k)  # unknown names and parameters
        return cfg

    def _scorer_spec(self) -> tuple[str, dict[str, Any]]:
        return resolve_scorer(self.config_, self.scorer, self.k)

    def _rate(self) -> float:
        return self.target_fpr if self.target_fpr is not None else self.contamination

    # --- fit ----------------------------------------------------------------------------------

    def fit(self, X, y=None, layout: str | None = None) -> OneClassDetector:
        """Train on normal images, fit the scorer on their features and set the threshold on
        the held-out ones (``holdout``); returns self. X: uint8 (or [0, 1] float) images as an
        array or tensor (``layout`` for shapes that read two ways), PIL images, files or
        folders. ``y`` is ignored. Everything is checked before training starts."""
        cfg = self.config_ = self.check_params()
        choice = ScorerChoice(self.scorer, self.k, self.variant, self.bank_size)
        images, in_layout = as_uint8_images(X, layout, cfg.data.size, cfg.data.channels)
        cfg = self.config_ = with_channels(cfg, images.shape[1])
        n_held = self.holdout_size(len(images))
        if n_held:
            cal.check_reachable(n_held, self._rate())
        held, train = heldout_split(len(images), n_held, cfg.train.seed)
        say = self._say()
        if say is not None:
            say(f"{len(train)} images for training, {n_held} held out for the threshold")
        engine = Engine(cfg, progress=say is not None, say=say)
        self.anomaly_model_ = engine.fit(images[train], choice, in_layout, self.steps)
        self.config_ = engine.cfg
        self.decision_scores_ = self.anomaly_model_.score_images(images)
        self.heldout_indices_ = held.numpy() if n_held else None  # rows of X held out
        self.heldout_scores_ = self.decision_scores_[held.numpy()] if n_held else None
        self._set_threshold()
        return self

    def holdout_size(self, n: int) -> int:
        """How many of n images `fit` keeps out of training for the threshold."""
        return holdout_size(n, self.holdout, self._rate(), cal.MIN_ABOVE)

    def _say(self):
        on = self.verbose if self.verbose is not None else _interactive()
        return (lambda m: print(f"firmad: {m}", file=sys.stderr, flush=True)) if on else None

    @classmethod
    def from_model(
        cls, model, cfg, scorer: str = "knn_cos", k: int | None = 5, variant: str = "plain",
        bank_size: int | None = None,
    ) -> OneClassDetector:  # fmt: skip
        """A detector around a trained network and its run config; `fit_bank` fits its scorer."""
        det = cls(scorer=scorer, k=k, variant=variant, bank_size=bank_size)
        det.config_, det._network = cfg, model
        return det

    def fit_bank(self, train_images) -> OneClassDetector:
        """Fit only the scorer, on the features of these normal images (no training)."""
        network = self.__dict__.get("_network")
        network = self.model_ if network is None else network
        images, _ = as_uint8_images(train_images, "NCHW")
        choice = ScorerChoice(self.scorer, self.k, self.variant, self.bank_size)
        prepared = prepare_images(images, self.config_.data.size)
        self.anomaly_model_ = Engine(self.config_).fit_scorer(
            network, prepared, choice, tuple(images.shape[1:])
        )
        return self

    @classmethod
    def from_run(
        cls, run_dir: str | Path, scorer: str = "knn_cos", k: int | None = 5,
        variant: str = "plain", device: str | None = None, bank_size: int | None = None,
    ) -> OneClassDetector:  # fmt: skip
        """A detector from any finished `firmad train` run: its last checkpoint's encoder, the
        scorer fitted on the run's normal training images."""
        run = RunDir(run_dir)
        cfg = with_device(run.read_config(), device)
        model = run.load_model(cfg, device=cfg.train.device)
        det = cls.from_model(model, cfg, scorer, k, variant, bank_size)
        return det.fit_bank(build_split(cfg).train_images)

    # --- scoring ------------------------------------------------------------------------------

    def score_tensor(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Anomaly scores (N,) of float images in [0, 1], differentiable w.r.t. the pixels
        (`AnomalyModel.score_tensor`: resizing and normalisation happen inside)."""
        self._check_fitted()
        return self.anomaly_model_.score_tensor(x, gen=gen)

    __call__ = score_tensor

    def decision_function(self, X, layout: str | None = None) -> np.ndarray:
        """Anomaly scores, higher = more anomalous (PyOD), float64, one per image. Paths give
        one score per file named (and per image file under a folder named, sorted), in order:
        NaN, with a warning, where a file cannot be scored (``unreadable="raise"``: an error)."""
        self._check_fitted()
        c = self.config_.data
        if isinstance(X, str | Path) or (
            isinstance(X, list | tuple) and X and all(isinstance(x, str | Path) for x in X)
        ):
            scores, skipped = score_inputs(self.anomaly_model_.score_images, X, c.size, c.channels)
            _report_unscored(skipped, self.unreadable == "raise" and np.isnan(scores).any())
            return scores
        images, _ = as_uint8_images(X, layout, c.size, c.channels)
        return self.anomaly_model_.score_images(images)

    def score_paths(self, paths, batch_size: int = 64, progress=None):
        """``(names, scores, skipped)`` of files and folders (recursive): the names scored, in
        order, and (path, reason) of every path not scored. The `firmad score` command."""
        self._check_fitted()
        c = self.config_.data
        return score_paths(self.score_images, paths, c.size, c.channels, batch_size, progress)

    def score_images(self, images: torch.Tensor) -> np.ndarray:
        """`decision_function` for uint8 images already in (N, C, H, W) layout."""
        self._check_fitted()
        return self.anomaly_model_.score_images(images)

    def score_samples(self, X, layout: str | None = None) -> np.ndarray:
        """Normality scores, higher = more normal (scikit-learn's convention)."""
        return -self.decision_function(X, layout)

    # --- threshold ----------------------------------------------------------------------------

    def calibrate(
        self,
        X,
        target_fpr: float | None = None,
        contamination: float | None = None,
        layout: str | None = None,
    ) -> OneClassDetector:
        """Set the threshold on images not used in `fit`: normals at ``target_fpr``, or an
        unlabelled mix with that share of anomalies (``contamination``); their scores become
        ``heldout_scores_``, the p-values' reference (`firmad.calibration`)."""
        if (target_fpr is None) == (contamination is None):
            raise InputError("calibrate: give exactly one of target_fpr= or contamination=")
        rate = target_fpr if target_fpr is not None else contamination
        if not _is_real(rate) or not 0.0 < float(rate) < 1.0:
            raise InputError(f"calibrate: the rate must be a number in (0, 1), got {rate!r}")
        scores = self.decision_function(X, layout)
        if np.isnan(scores).any():
            raise InputError("calibrate needs a score for every image; remove unreadable files")
        self.heldout_scores_ = scores
        self._store(cal.calibrate(scores, target_fpr, contamination))
        return self

    def _set_threshold(self) -> None:
        """The threshold from the held-out scores, else from the training images' scores."""
        held = getattr(self, "heldout_scores_", None)
        t, c = (
            (self.target_fpr, None) if self.target_fpr is not None else (None, self.contamination)
        )
        if held is not None and len(held):
            self._store(cal.calibrate(held, t, c))
        else:
            _warn(
                "no images were held out: the threshold is set on the training images' own "
                "scores (PyOD's way; optimistic, the bank holds them), and there are no "
                "p-values. Use holdout='auto', or calibrate(normal_images, target_fpr=...)"
            )
            self._store(cal.calibrate(self.decision_scores_, t, c, source=cal.TRAINING))

    def _move_threshold(self, changed: set[str]) -> None:
        if "target_fpr" not in changed and self.target_fpr is not None:
            _warn(
                f"contamination={self.contamination!r} leaves the threshold where it is: it "
                f"is set at target_fpr={self.target_fpr!r}; set target_fpr to move it, or "
                "target_fpr=None to set it by contamination"
            )
        elif getattr(self, "heldout_scores_", None) is None and not hasattr(
            self, "decision_scores_"
        ):
            _warn(
                "the threshold stays where it is: this detector keeps no scores to set it on "
                "(it was calibrated on its training images); call calibrate(images, ...)"
            )
        else:
            self._set_threshold()

    def _store(self, c: cal.Calibration) -> None:
        self.threshold_, self.calibration_ = c.threshold, c.as_dict()
        if getattr(self, "decision_scores_", None) is not None:  # PyOD: labels_ follow it
            self.labels_ = (self.decision_scores_ > self.threshold_).astype(np.int64)
        message = cal.too_few_warning(c)
        if message:
            _warn(message)

    def _threshold(self) -> float:
        if getattr(self, "threshold_", None) is None:
            raise NotFittedError(
                "no threshold yet: fit the detector (fit sets one), or call "
                "calibrate(held_out_normals, target_fpr=0.05) before predict"
            )
        return self.threshold_

    def predict(self, X, layout: str | None = None) -> np.ndarray:
        """1 = anomaly (score above ``threshold_``: p-value <= the target), 0 = normal; float
        with NaN where a file could not be scored."""
        threshold = self._threshold()
        s = self.decision_function(X, layout)
        flags = (s > threshold).astype(np.int64)
        return np.where(np.isnan(s), np.nan, flags) if np.isnan(s).any() else flags

    def fit_predict(self, X, y=None) -> np.ndarray:
        """`fit` then the labels of X (``labels_``: 1 = anomaly)."""
        return self.fit(X).labels_

    def p_values(self, X, layout: str | None = None) -> np.ndarray:
        """Conformal p-values: (1 + held-out normals scoring at least as high) / (n + 1). On a
        normal image like the held-out ones, P(p <= a) <= a; ``predict`` flags p <= target."""
        self._check_fitted()
        held = getattr(self, "heldout_scores_", None)
        cal.p_values(held, [])  # no held-out scores: say so before scoring
        return cal.p_values(held, self.decision_function(X, layout))

    def predict_confidence(self, X, layout: str | None = None) -> np.ndarray:
        """PyOD's confidence in each prediction, in [0, 1] (ExCeeD, `calibration.confidence`)."""
        ref = self._reference()
        s = self.decision_function(X, layout)
        return cal.confidence(ref, s, self._threshold(), self.calibration_["n_above"])

    def predict_proba(self, X, method: str = "linear") -> np.ndarray:
        """(N, 2) probabilities of normal and anomaly, PyOD's way (`calibration.proba`)."""
        return cal.proba(self._reference(), self.decision_function(X), method)

    def _reference(self) -> np.ndarray:
        """The scores the threshold was set on: held-out, else the images given to `fit`."""
        ref = getattr(self, "heldout_scores_", None)
        ref = ref if ref is not None else getattr(self, "decision_scores_", None)
        if ref is None:
            raise NotFittedError("this needs the detector fitted with fit() or calibrated")
        return ref

    def surrogate_scores(self) -> dict[str, Any]:
        """Smooth score functions for attacks (`AnomalyModel.surrogate_scores`)."""
        self._check_fitted()
        return self.anomaly_model_.surrogate_scores()

    def eval(self) -> OneClassDetector:
        return self

    def attack_modules(self) -> list[torch.nn.Module]:
        """The modules an attack puts in eval mode (with ``score_tensor``, the protocol)."""
        self._check_fitted()
        return self.anomaly_model_.attack_modules()

    # --- save / load --------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write the detector to a directory (created if needed): `firmad.persistence`."""
        self._check_fitted()
        return save_detector(
            directory,
            self.anomaly_model_,
            self.get_params(),
            getattr(self, "threshold_", None),
            getattr(self, "calibration_", None),
        )

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None) -> OneClassDetector:
        """Load a detector directory written by `save`, checking everything in it first
        (`firmad.persistence`): an untrusted folder cannot hang, exhaust memory or mislead."""
        stored = load_detector(directory, device)
        det = cls()
        try:
            det.set_params(**{k: v for k, v in stored.params.items() if k in cls._PARAMS})
            det._check_params()
        except (ConfigError, InputError) as err:
            raise CheckpointError(
                f"{Path(directory) / META}: the stored parameters are invalid "
                f"({err}); restore the folder from a copy, or fit again"
            ) from None
        det.config_, det.anomaly_model_ = stored.model.config, stored.model
        det.threshold_, det.calibration_ = stored.threshold, stored.calibration
        det.heldout_scores_ = stored.heldout
        return det


def _model_part(name: str, doc: str) -> property:
    return property(lambda self: getattr(self.anomaly_model_, name), doc=doc)


# The fitted model's parts, as fitted attributes (AttributeError until fitted).
OneClassDetector.model_ = _model_part("network", "The trained network (encoder + modules).")
OneClassDetector.extractor_ = _model_part("extractor", "Preprocessing + encoder.")
OneClassDetector.scorer_ = _model_part("scorer", "The fitted VariantScorer.")
OneClassDetector.n_bank_ = _model_part("n_bank", "Normal images in the scorer's bank.")
OneClassDetector.input_shape_ = _model_part("input_shape", "(C, H, W) fitted on.")
OneClassDetector.input_layout_ = _model_part("input_layout", '"NCHW" or "NHWC", as given.')
_DEFAULTS = OneClassDetector().get_params()


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def _report_unscored(skipped, raise_on_nan: bool) -> None:
    """Paths not scored: an error when some input got NaN and ``unreadable="raise"``, else a
    warning listing them."""
    if not skipped:
        return
    lines = "\n".join(f"  {p}: {why}" for p, why in skipped[:20])
    more = f"\n  (and {len(skipped) - 20} more)" if len(skipped) > 20 else ""
    text = f"{len(skipped)} path(s) not scored:\n{lines}{more}"
    if raise_on_nan:
        raise InputError(f"{text}\nFix or remove them, or use unreadable='nan'")
    warnings.warn(f"{text}\n(NaN where a file given or found was not scored)", stacklevel=3)


def _interactive() -> bool:
    """A terminal or a notebook: someone watches, so `fit` shows its progress."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def _is_real(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, int | float) and math.isfinite(x)
