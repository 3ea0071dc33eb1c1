"""`OneClassDetector`: the scikit-learn / PyOD face of a detector.

A thin estimator over three parts: the `AnomalyModel` it fits (preprocessing + encoder + fitted
scorer: what files, ONNX and attacks take), the `Engine` that fits it, and the calibrator
(`firmad.calibration`: the threshold, its count and interval, p-values). The habits users know:
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

import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin

from firmad import calibration as cal
from firmad.anomaly_model import AnomalyModel
from firmad.data.pool import prepare_images
from firmad.detector_params import PARAMS, check_params
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
from firmad.errors import InputError
from firmad.factory import build_split
from firmad.inputs import as_uint8_images, is_path_input, score_inputs, score_paths
from firmad.persistence import META, load_detector, save_detector  # noqa: F401  (META: kept)
from firmad.run import RunDir


class NotFittedError(InputError, AttributeError):
    """The detector was used before `fit` (or before a threshold exists, for `predict`)."""


class OneClassDetector(OutlierMixin, BaseEstimator):
    """A one-class anomaly detector: an encoder trained by a firmad method plus a scorer.
    The parameters, their meaning and their values: `firmad.detector_params.DetectorParams`.
    """

    # Over 8 parameters on purpose: scikit-learn needs every hyper-parameter in __init__.
    def __init__(
        self, recipe: str | None = None, method: str | None = None, backbone: str | None = None,
        epochs: int | None = None, scorer: str = "knn_cos", k: int | None = 5,
        variant: str = "plain", seed: int | None = None, size: int | None = None,
        device: str | None = None, overrides=(), bank_size: int | None = None,
        verbose: bool | None = None, contamination: float = 0.1, holdout: float | str = "auto",
        target_fpr: float | None = None, steps: int | None = None, unreadable: str = "nan",
    ) -> None:  # fmt: skip
        given = locals()
        for name in PARAMS:  # stored as given (scikit-learn's rule); checked by `fit`
            setattr(self, name, given[name])

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PARAMS}

    def set_params(self, **params: Any) -> OneClassDetector:
        """On a fitted detector, ``contamination`` / ``target_fpr`` move the threshold at once
        (or a warning says why they cannot); other parameters wait for the next `fit`."""
        check_params({**self.get_params(), **params})
        vars(self).update(params)
        refit = sorted(set(params) - {"contamination", "target_fpr", "verbose", "unreadable"})
        if self.__sklearn_is_fitted__() and refit:
            _warn(f"set_params({', '.join(refit)}) on a fitted detector: the fitted encoder and "
                  "scorer keep their settings until you call fit(X) again")  # fmt: skip
        if self.__sklearn_is_fitted__() and {"contamination", "target_fpr"} & set(params):
            self._set_threshold(set(params))
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
        t = "no threshold" if t is None else f"threshold_={t:.4g}"
        return f"{text} [fitted: {self.scorer_.name} on {self.n_bank_} images, {t}]"

    def _model(self) -> AnomalyModel:
        if not self.__sklearn_is_fitted__():
            raise NotFittedError("not fitted: call fit(normal_images), or .load(DIR)")
        return self.anomaly_model_

    def make_config(self, dataset: str = "custom"):
        """The RunConfig: the recipe, the shortcut parameters, then ``overrides``."""
        return detector_config(self.recipe, {
            "data": {"dataset": dataset or None, "size": self.size},
            "method": {"name": self.method}, "model": {"backbone": self.backbone},
            "train": {"epochs": self.epochs, "seed": self.seed, "device": self.device},
        }, self.overrides)  # fmt: skip

    def check_params(self):
        """Parameters, recipe and scorer checked before any work; the RunConfig to train."""
        check_params(self.get_params())
        cfg = self.make_config()
        resolve_scorer(cfg, self.scorer, self.k)
        return cfg

    def _scorer_spec(self) -> tuple[str, dict[str, Any]]:
        return resolve_scorer(self.config_, self.scorer, self.k)

    def _choice(self) -> ScorerChoice:
        return ScorerChoice(self.scorer, self.k, self.variant, self.bank_size)

    def fit(self, X, y=None, layout: str | None = None) -> OneClassDetector:
        """Train on normal images X (arrays or tensors, uint8 or [0, 1] float, ``layout`` for a
        shape that reads two ways; PIL images; files or folders), fit the scorer, set the
        threshold on the held-out ones; returns self. Everything is checked first."""
        cfg = self.config_ = self.check_params()
        images, in_layout = as_uint8_images(X, layout, cfg.data.size, cfg.data.channels)
        cfg = self.config_ = with_channels(cfg, images.shape[1])
        n_held = self.holdout_size(len(images))
        if n_held:
            cal.check_reachable(n_held, self._rate())
        held, train = heldout_split(len(images), n_held, cfg.train.seed)
        engine = Engine(cfg, verbose=self.verbose if self.verbose is not None else _interactive())
        engine.say(f"{len(train)} images for training, {n_held} held out for the threshold")
        self.anomaly_model_ = engine.fit(images[train], self._choice(), in_layout, self.steps)
        self.config_ = engine.cfg
        self.decision_scores_ = self.anomaly_model_.score_images(images)
        self.heldout_indices_ = held.numpy() if n_held else None  # rows of X held out
        self.heldout_scores_ = self.decision_scores_[held.numpy()] if n_held else None
        self._set_threshold()
        return self

    def holdout_size(self, n: int) -> int:
        """How many of n images `fit` keeps out of training for the threshold."""
        return holdout_size(n, self.holdout, self._rate(), cal.MIN_ABOVE)

    def _rate(self) -> float:
        return self.target_fpr if self.target_fpr is not None else self.contamination

    @classmethod
    def from_model(cls, model, cfg, scorer: str = "knn_cos", k: int | None = 5,
                   variant: str = "plain", bank_size: int | None = None):  # fmt: skip
        """A detector around a trained network and its run config; `fit_bank` fits its scorer."""
        det = cls(scorer=scorer, k=k, variant=variant, bank_size=bank_size)
        det.config_, det._network = cfg, model
        return det

    def fit_bank(self, train_images) -> OneClassDetector:
        """Fit only the scorer, on the features of these normal images (no training)."""
        network = getattr(self, "_network", None)  # from_model's, else the fitted one
        network = self.model_ if network is None else network
        images, _ = as_uint8_images(train_images, "NCHW")
        prepared = prepare_images(images, self.config_.data.size)
        engine = Engine(self.config_)
        self.anomaly_model_ = engine.fit_scorer(network, prepared, self._choice(), images.shape[1:])
        return self

    @classmethod
    def from_run(cls, run_dir: str | Path, scorer: str = "knn_cos", k: int | None = 5,
                 variant: str = "plain", device: str | None = None,
                 bank_size: int | None = None) -> OneClassDetector:  # fmt: skip
        """A finished `firmad train` run's last encoder, the scorer fitted on its normals."""
        run = RunDir(run_dir)
        cfg = with_device(run.read_config(), device)
        det = cls.from_model(
            run.load_model(cfg, cfg.train.device), cfg, scorer, k, variant, bank_size
        )
        return det.fit_bank(build_split(cfg).train_images)

    def score_tensor(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Anomaly scores (N,) of float images in [0, 1], differentiable w.r.t. the pixels."""
        return self._model().score_tensor(x, gen=gen)

    __call__ = score_tensor

    def decision_function(self, X, layout: str | None = None) -> np.ndarray:
        """Anomaly scores, higher = more anomalous (PyOD), one per image or path, in order (a
        folder: its image files, sorted); NaN and a warning where a file cannot be scored."""
        score, c = self._model().score_images, self.config_.data
        if not is_path_input(X):
            return score(as_uint8_images(X, layout, c.size, c.channels)[0])
        scores, skipped = score_inputs(score, X, c.size, c.channels)
        _report_unscored(skipped, self.unreadable == "raise" and np.isnan(scores).any())
        return scores

    def score_paths(self, paths, batch_size: int = 64, progress=None):
        """``(names, scores, skipped)`` of files and folders, as `firmad score` lists them."""
        score, c = self._model().score_images, self.config_.data
        return score_paths(score, paths, c.size, c.channels, batch_size, progress)

    def score_images(self, images: torch.Tensor) -> np.ndarray:
        """`decision_function` for uint8 images already in (N, C, H, W) layout."""
        return self._model().score_images(images)

    def score_samples(self, X, layout: str | None = None) -> np.ndarray:
        """Normality scores, higher = more normal (scikit-learn's convention)."""
        return -self.decision_function(X, layout)

    def calibrate(self, X, target_fpr: float | None = None, contamination: float | None = None,
                  layout: str | None = None) -> OneClassDetector:  # fmt: skip
        """The threshold set on images not used in `fit`: normals at ``target_fpr``, or a mix
        with that share of anomalies (``contamination``). They become ``heldout_scores_``."""
        cal.check_rates(target_fpr, contamination)
        scores = self.decision_function(X, layout)  # NaN (a file not read) is refused below
        self._store(cal.calibrate(scores, target_fpr, contamination))
        self.heldout_scores_ = scores
        return self

    def _set_threshold(self, changed: set[str] | None = None) -> None:
        c = cal.recalibrate(*self._scores(), self.target_fpr, self.contamination, changed)
        if c is not None:
            self._store(c)

    def _store(self, c: cal.Calibration) -> None:
        self.threshold_, self.calibration_ = c.threshold, c.as_dict()
        if getattr(self, "decision_scores_", None) is not None:  # PyOD: labels_ follow it
            self.labels_ = (self.decision_scores_ > self.threshold_).astype(np.int64)

    def _scores(self) -> tuple:
        """(held-out scores, training images' scores): what a threshold is set on."""
        return getattr(self, "heldout_scores_", None), getattr(self, "decision_scores_", None)

    def _threshold(self) -> float:
        if getattr(self, "threshold_", None) is None:
            raise NotFittedError("no threshold yet: fit the detector (fit sets one), or call "
                                 "calibrate(held_out_normals, target_fpr=0.05) first")  # fmt: skip
        return self.threshold_

    def predict(self, X, layout: str | None = None) -> np.ndarray:
        """1 = anomaly (score above ``threshold_``, i.e. p-value <= the target), 0 = normal;
        float with NaN where a file could not be scored."""
        threshold, s = self._threshold(), self.decision_function(X, layout)
        flags = (s > threshold).astype(np.int64)
        return np.where(np.isnan(s), np.nan, flags) if np.isnan(s).any() else flags

    def fit_predict(self, X, y=None) -> np.ndarray:
        """`fit` then the labels of X (``labels_``: 1 = anomaly)."""
        return self.fit(X).labels_

    def p_values(self, X, layout: str | None = None) -> np.ndarray:
        """Conformal p-values: (1 + held-out normals scoring at least as high) / (n + 1). For
        a normal image like the held-out ones P(p <= a) <= a; `predict` flags p <= target."""
        held = getattr(self, "heldout_scores_", None)  # none: refused before scoring
        return cal.p_values(held, [] if held is None else self.decision_function(X, layout))

    def predict_confidence(self, X, layout: str | None = None) -> np.ndarray:
        """PyOD's confidence in each prediction, in [0, 1] (ExCeeD, `calibration.confidence`)."""
        s, n_above = self.decision_function(X, layout), self.calibration_["n_above"]
        return cal.confidence(cal.reference(*self._scores()), s, self._threshold(), n_above)

    def predict_proba(self, X, method: str = "linear") -> np.ndarray:
        """(N, 2) probabilities of normal and anomaly, PyOD's way (`calibration.proba`)."""
        return cal.proba(cal.reference(*self._scores()), self.decision_function(X), method)

    def surrogate_scores(self) -> dict[str, Any]:
        """Smooth score functions for attacks (`AnomalyModel.surrogate_scores`)."""
        return self._model().surrogate_scores()

    def eval(self) -> OneClassDetector:
        return self

    def attack_modules(self) -> list[torch.nn.Module]:
        """The modules an attack puts in eval mode (with ``score_tensor``, the protocol)."""
        return self._model().attack_modules()

    def save(self, directory: str | Path) -> Path:
        """Write the detector to a directory (created if needed)."""
        t, c = getattr(self, "threshold_", None), getattr(self, "calibration_", None)
        return save_detector(directory, self._model(), self.get_params(), t, c)

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None) -> OneClassDetector:
        """A detector folder written by `save`, everything in it checked first (untrusted)."""
        stored = load_detector(directory, device)
        det = cls(**stored.params)
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
    """Paths not scored: an error when an input got NaN and ``unreadable="raise"``, else a
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
