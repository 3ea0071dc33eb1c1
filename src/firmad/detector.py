"""`OneClassDetector`: train on normal images, score new ones, save, load, attack, export.

One object for research and deployment, in the habits users know: scikit-learn's estimator API
(``__init__`` only stores parameters, ``fit`` returns self, fitted attributes end in ``_``,
``score_samples`` higher = more normal) and PyOD's (``decision_function`` higher = more
anomalous, ``predict`` 1 = anomaly by ``threshold_``).

    det = OneClassDetector(method="firm", backbone="resnet_small", epochs=4, scorer="knn_cos", k=5)
    det.fit(images)                      # uint8 N x C x H x W / N x H x W x C, PIL list, folder
    det.calibrate(held_out_normals, target_fpr=0.05)
    det.predict(new_images)              # 1 = anomaly
    det.score_tensor(x01)                # the same scores, differentiable w.r.t. the pixels
    det.save("det/"); OneClassDetector.load("det/")

A detector directory holds ``weights.safetensors`` (encoder, method modules, fitted scorer) and
``detector.json`` (config, preprocessing, scorer, threshold, versions, tensor manifest and the
weights' SHA-256). Nothing is pickled, and a pickle is never loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from firmad.data import OneClassSplit
from firmad.data.pool import load_split, prepare_images
from firmad.errors import CheckpointError, ConfigError, InputError
from firmad.io import atomic_save_tensors, atomic_write_json, prefixed
from firmad.methods import get_method
from firmad.scoring import (
    FeatureExtractor,
    VariantScorer,
    bank_crops,
    bank_subset,
    extract_banks,
)
from firmad.scoring.features import eval_mode

FORMAT = "firmad-detector-1"
WEIGHTS = "weights.safetensors"
META = "detector.json"
CHUNK = 256  # images per forward pass when scoring


class NotFittedError(InputError):
    """The detector was used before `fit` (or `calibrate`, for `predict`)."""


class OneClassDetector:
    """A one-class anomaly detector: an encoder trained by a firmad method plus a scorer.

    Parameters (stored as given; nothing happens until `fit`):
        recipe: a shipped recipe name or YAML path giving every training setting
            (default ``fmnist-cpu``: FIRM, a narrow ResNet-10, 4 epochs; minutes on a CPU).
        method, backbone, epochs, seed, size, device: shortcuts for the recipe keys
            ``method.name``, ``model.backbone``, ``train.epochs``, ``train.seed``, ``data.size``,
            ``train.device``; None keeps the recipe's value.
        overrides: more ``section.key=value`` settings, as with ``--set``.
        scorer: a scorer name (``knn_cos``, ``kde``, ``mahalanobis``, ``svdd``, ...) or a spec
            ``"knn_cos:k=1"``; ``"own"`` is the method's own score (Deep SVDD distance,
            classifier logit). k: neighbours for the kNN scorers.
        variant: ``plain`` (angle 0), ``angled`` (mean over 4 rotations) or ``ensemble``
            (random crops x rotations; stochastic in `score_tensor`).
        bank_size: score against a seeded subset of this many normal training images.
        verbose: show a progress bar while training.
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

    # --- scikit-learn conventions -------------------------------------------------------------

    _PARAMS = (
        "recipe", "method", "backbone", "epochs", "scorer", "k", "variant", "seed", "size",
        "device", "overrides", "bank_size", "verbose",
    )  # fmt: skip

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._PARAMS}

    def set_params(self, **params: Any) -> OneClassDetector:
        bad = sorted(set(params) - set(self._PARAMS))
        if bad:
            raise ConfigError(f"unknown parameter(s) {bad}; allowed: {', '.join(self._PARAMS)}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.get_params().items() if v != _DEFAULTS.get(k)}
        return f"OneClassDetector({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    def _check_fitted(self) -> None:
        if not hasattr(self, "scorer_"):
            raise NotFittedError(
                "this OneClassDetector is not fitted yet; call fit(normal_images) first, or "
                "load one with OneClassDetector.load(DIR) / .from_run(RUN_DIR)"
            )

    # --- configuration ------------------------------------------------------------------------

    def make_config(self, dataset: str = "custom"):
        """The RunConfig this detector trains with (recipe + shortcuts + overrides)."""
        from firmad.config import load_config

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
        return load_config(self.recipe or "fmnist-cpu", sets + list(self.overrides))

    def _scorer_spec(self, model=None) -> tuple[str, dict[str, Any]]:
        from firmad.config import parse_scorer

        name, params = parse_scorer(self.scorer)
        method = get_method(self.config_)
        if name == "own":
            if method.own_scorer is None:
                raise ConfigError(
                    f"scorer='own': method {method.name!r} has no score of its own; use a "
                    "feature scorer such as knn_cos, kde or mahalanobis"
                )
            name = method.own_scorer
        if name in ("knn_cos", "knn_cos_norm") and self.k is not None:
            params.setdefault("k", self.k)
        if name == method.own_scorer and model is not None:
            params.update(method.own_scorer_params(model))
        return name, params

    # --- fit ----------------------------------------------------------------------------------

    def fit(self, X, y=None) -> OneClassDetector:
        """Train on normal images only and fit the scorer on their features; returns self.

        X: uint8 images (N, C, H, W) or (N, H, W, C) or (N, H, W) as a numpy array or tensor,
        a list of PIL images, or a folder of image files (searched recursively). ``y`` is
        ignored (scikit-learn compatibility).
        """
        from firmad.training import ProgressBar, Trainer

        cfg = self.make_config("custom")
        images, layout = as_uint8_images(X, size=cfg.data.size, channels=cfg.data.channels)
        cfg = _with_channels(cfg, images.shape[1])
        self.config_ = cfg
        split = _train_only_split(images, cfg.data.dataset)
        callbacks = []
        progress = _progress() if self.verbose else None
        if progress is not None:
            callbacks.append(ProgressBar(progress))
        trainer = Trainer(cfg, split=split, callbacks=callbacks, normalisation=_stats(images))
        if progress is not None:
            with progress:
                trainer.fit()
        else:
            trainer.fit()
        self._set_model(trainer.model.to(memory_format=torch.contiguous_format), layout)
        self.input_shape_ = tuple(images.shape[1:])
        self._fit_scorer(prepare_images(images, cfg.data.size))
        return self

    def _set_model(self, model, layout: str) -> None:
        # A fitted detector is frozen: gradients of its scores reach the pixels only.
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None  # the last training step's gradients
        self.model_ = model.eval()
        self.extractor_ = FeatureExtractor.from_config(model.encoder, self.config_)
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
        from firmad.scoring import score_run

        cfg = self.config_
        method = get_method(cfg)
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
        from firmad.run import RunDir

        run = RunDir(run_dir)
        cfg = run.read_config()
        if device is not None:
            cfg.train.device = device
        model = run.load_model(cfg, device=cfg.train.device)
        det = cls.from_model(model, cfg, scorer, k, variant, bank_size)
        return det.fit_bank(load_split(cfg).train_images)

    # --- scoring ------------------------------------------------------------------------------

    def score_tensor(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Anomaly scores (N,) as a differentiable function of the pixels.

        x: float images in [0, 1] in the layout given to `fit` (N, C, H, W) or (N, H, W, C);
        any size (resized inside). Resizing, channel repeat, the test transform and
        normalisation all happen inside, so gradients reach the input pixels. Runs in eval
        mode; parameters get no gradient unless they require one.
        """
        self._check_fitted()
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
            raise InputError(
                "score_tensor expects a float tensor of 4 dimensions with values in [0, 1]; "
                "convert uint8 images with x.float() / 255"
            )
        if self.input_layout_ == "NHWC":
            x = x.permute(0, 3, 1, 2)
        x = x.to(self.extractor_.device)
        with eval_mode(self.extractor_):
            return self.scorer_(self.extractor_, x, gen=gen)

    __call__ = score_tensor

    def decision_function(self, X) -> np.ndarray:
        """Anomaly scores, higher = more anomalous (PyOD's convention), float64 (N,)."""
        self._check_fitted()
        c = self.config_.data
        images, _ = as_uint8_images(X, self.input_layout_, c.size, c.channels)
        return self.score_images(images)

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

    def calibrate(
        self, X, target_fpr: float | None = None, contamination: float | None = None
    ) -> OneClassDetector:
        """Set ``threshold_`` from images not used in `fit`.

        ``target_fpr``: X are normal images; the threshold flags that share of them.
        ``contamination``: X is an unlabelled mix with that share of anomalies.
        """
        if (target_fpr is None) == (contamination is None):
            raise InputError("calibrate: give exactly one of target_fpr= or contamination=")
        rate = target_fpr if target_fpr is not None else contamination
        if not 0.0 < float(rate) < 1.0:
            raise InputError(f"calibrate: the rate must be in (0, 1), got {rate}")
        scores = self.decision_function(X)
        self.threshold_ = float(np.quantile(scores, 1.0 - float(rate), method="higher"))
        self.calibration_ = {
            "n": int(len(scores)),
            "target_fpr": target_fpr,
            "contamination": contamination,
        }
        return self

    def predict(self, X) -> np.ndarray:
        """1 = anomaly (score above ``threshold_``), 0 = normal."""
        if getattr(self, "threshold_", None) is None:
            raise NotFittedError(
                "no threshold yet: call calibrate(held_out_normals, target_fpr=0.05) (or "
                "contamination=...) before predict, or set threshold_ yourself"
            )
        return (self.decision_function(X) > self.threshold_).astype(np.int64)

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

    # --- save / load --------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write the detector to a directory (created if needed); returns its path."""
        self._check_fitted()
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise InputError(f"{directory} exists and is not a directory; choose another path")
        if directory.is_dir() and any(directory.iterdir()) and not (directory / META).exists():
            raise InputError(
                f"{directory} is a non-empty folder that is not a firmad detector; choose a new "
                "or empty folder so nothing of yours is overwritten"
            )
        tensors = {f"model.{k}": v for k, v in self.model_.state_dict().items()}
        for i, scorer in enumerate(self.scorer_.per_angle):
            for key, value in scorer.fitted_state().items():
                tensors[f"scorer.{i}.{key}"] = value
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        atomic_save_tensors(directory / WEIGHTS, tensors)
        from firmad.report import versions

        meta = {
            "format": FORMAT,
            "versions": versions(),
            "params": {
                k: v if not isinstance(v, tuple) else list(v) for k, v in self.get_params().items()
            },  # fmt: skip
            "config": self.config_.to_dict(),
            "normalisation": {
                "mean": self.model_.encoder.normalize.mean.flatten().tolist(),
                "std": self.model_.encoder.normalize.std.flatten().tolist(),
            },
            "input": {"layout": self.input_layout_, "shape": list(self.input_shape_)},
            "scorer": {
                "name": self.scorer_.name,
                "params": _jsonable(self.scorer_.per_angle[0].get_params()),
                "variant": self.scorer_.variant,
                "n_crops": self.scorer_.n_crops,
                "n_bank": self.n_bank_,
            },
            "threshold": getattr(self, "threshold_", None),
            "calibration": getattr(self, "calibration_", None),
            "tensors": {
                k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()
            },  # fmt: skip
            "weights_sha256": sha256_file(directory / WEIGHTS),
        }
        atomic_write_json(directory / META, meta)
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None) -> OneClassDetector:
        """Load a detector directory written by `save`, checking it before use: format version,
        no pickles, the weights' checksum, and every tensor's name, shape and dtype."""
        from firmad.config import config_from_dict
        from firmad.training import build_model

        directory = Path(directory)
        meta_path, weights_path = directory / META, directory / WEIGHTS
        if not directory.is_dir() or not meta_path.exists():
            raise CheckpointError(
                f"{directory} is not a firmad detector (no {META}); make one with "
                "`firmad fit` or OneClassDetector.save"
            )
        refuse_pickles(directory)
        meta = _read_meta(meta_path)
        if not weights_path.exists():
            raise CheckpointError(f"{weights_path} is missing; save the detector again")
        if sha256_file(weights_path) != meta["weights_sha256"]:
            raise CheckpointError(
                f"{weights_path} does not match the checksum in {META}: the file is damaged or "
                "was changed; restore it from a copy or save the detector again"
            )
        try:
            tensors = load_file(str(weights_path))
        except Exception as err:  # safetensors raises several types for damaged files
            raise CheckpointError(
                f"{weights_path} is not a readable safetensors file ({err}); save it again"
            ) from None
        _check_manifest(tensors, meta["tensors"], weights_path)
        try:
            cfg = config_from_dict(meta["config"])
        except ConfigError as err:
            raise CheckpointError(f"{meta_path}: the stored config is invalid ({err})") from None
        if device is not None:
            cfg.train.device = device
        params = {k: v for k, v in meta["params"].items() if k in cls._PARAMS}
        det = cls(**params)
        det.config_ = cfg
        from firmad.training import resolve_device

        norm = meta["normalisation"]
        model = build_model(cfg, cfg.data.dataset, normalisation=(norm["mean"], norm["std"]))
        try:
            model.load_state_dict(prefixed(tensors, "model"))
        except RuntimeError as err:
            raise CheckpointError(
                f"{weights_path}: weights do not fit the stored config ({err})"
            ) from None
        det._set_model(model.to(resolve_device(cfg.train.device)), meta["input"]["layout"])
        det.input_shape_ = tuple(meta["input"]["shape"])
        s = meta["scorer"]
        vs = VariantScorer(s["name"], s["params"], s["variant"], s["n_crops"])
        for i, scorer in enumerate(vs.per_angle):
            scorer.load_fitted(prefixed(tensors, f"scorer.{i}"), where=str(weights_path))
        det.scorer_ = vs.to(det.extractor_.device)
        det.n_bank_ = s["n_bank"]
        det.threshold_ = meta.get("threshold")
        det.calibration_ = meta.get("calibration")
        return det


_DEFAULTS = OneClassDetector().get_params()


class _BoundScore:
    """A surrogate score function of a detector: same preprocessing and encoder."""

    def __init__(self, det: OneClassDetector, scorer: VariantScorer) -> None:
        self.det, self.scorer = det, scorer

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        if self.det.input_layout_ == "NHWC":
            x = x.permute(0, 3, 1, 2)
        with eval_mode(self.det.extractor_):
            return self.scorer(self.det.extractor_, x.to(self.det.extractor_.device), gen=gen)


# --- inputs ------------------------------------------------------------------------------------


def as_uint8_images(
    X, layout: str | None = None, size: int = 32, channels: int = 3
) -> tuple[torch.Tensor, str]:
    """Images as uint8 (N, C, H, W) and the layout they came in ("NCHW" or "NHWC").

    Accepts numpy arrays or tensors (uint8, or float in [0, 1]) of shape (N, C, H, W),
    (N, H, W, C) or (N, H, W); a list of PIL images; a folder path (recursive). ``layout``
    forces the layout of 4-d arrays (the detector passes the one it was fitted with); image
    files are read at ``size`` x ``size`` with ``channels`` channels.
    """
    if isinstance(X, str | Path):
        return load_folder_images(Path(X), size, channels), "NCHW"
    if isinstance(X, list | tuple) and X and hasattr(X[0], "convert"):
        return _pil_images(X), "NCHW"
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(np.ascontiguousarray(X))
    if not isinstance(X, torch.Tensor):
        raise InputError(
            f"images must be a numpy array, a torch tensor, a list of PIL images or a folder "
            f"path; got {type(X).__name__}"
        )
    if X.dim() == 3:
        X = X[:, None]
        layout = "NCHW"
    if X.dim() != 4 or X.shape[0] == 0:
        raise InputError(
            f"images must have shape (N, C, H, W) or (N, H, W, C); got {tuple(X.shape)}"
        )
    if layout is None:
        layout = "NHWC" if X.shape[1] not in (1, 3) and X.shape[-1] in (1, 3) else "NCHW"
    if layout == "NHWC":
        X = X.permute(0, 3, 1, 2)
    if X.shape[1] not in (1, 3):
        raise InputError(
            f"images must have 1 (grey) or 3 (RGB) channels; got {X.shape[1]} (shape "
            f"{tuple(X.shape)} read as {layout}); drop an alpha channel first"
        )
    if X.dtype != torch.uint8:
        if not X.is_floating_point():
            raise InputError(f"images must be uint8, or float in [0, 1]; got {X.dtype}")
        if X.numel() and (X.min() < 0 or X.max() > 1 or not torch.isfinite(X).all()):
            raise InputError("float images must lie in [0, 1]; scale uint8 images by 1/255")
        X = (X * 255).round().to(torch.uint8)
    return X.contiguous(), layout


def image_files(path: Path) -> list[Path]:
    """Image files of a folder (recursive, sorted, hidden ones skipped), or the file itself."""
    from firmad.data.sources import IMAGE_EXTENSIONS, _image_files
    from firmad.errors import DataNotFoundError

    if path.is_file():
        return [path] if path.suffix.lower() in IMAGE_EXTENSIONS else []
    if not path.is_dir():
        raise DataNotFoundError(f"{path}: no such file or folder")
    return _image_files(path)


def load_folder_images(folder: Path, size: int, channels: int) -> torch.Tensor:
    """Every image under a folder, squashed to size x size; any unreadable file is an error
    that names it (use `firmad score` to skip broken files instead)."""
    from firmad.data.sources import IMAGE_EXTENSIONS, load_image

    files = image_files(folder)
    if not files:
        raise InputError(
            f"{folder}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found, "
            "recursively; point to the folder that holds your normal images"
        )
    return torch.from_numpy(np.stack([load_image(f, size, channels) for f in files]))


def _pil_images(images) -> torch.Tensor:
    arrays = []
    first_size = images[0].size
    grey = all(img.mode in ("L", "1", "I;16", "I") for img in images)
    for img in images:
        if img.size != first_size:
            img = img.resize(first_size)
        arr = np.asarray(img.convert("L" if grey else "RGB"), dtype=np.uint8)
        arrays.append(arr[None] if grey else arr.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays))


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


def _progress():
    from firmad.training.callbacks import progress_bar

    return progress_bar()


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in params.items()}


# --- files -------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def refuse_pickles(directory: Path) -> None:
    """A detector directory never holds a pickle (nor a torch.save zip); refuse one that does."""
    for path in sorted(directory.iterdir()):
        if not path.is_file():
            continue
        with open(path, "rb") as f:
            head = f.read(4)
        if path.suffix in (".pkl", ".pickle", ".pt", ".pth", ".bin") or head.startswith(
            _PICKLE_MAGIC
        ):
            raise CheckpointError(
                f"{path} looks like a pickle; firmad never loads pickles (they can run code). "
                "Remove it, or re-create the detector with `firmad fit`/OneClassDetector.save"
            )


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{path} is not valid JSON ({err}); save the detector again"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a detector description; save the detector again")
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: format {meta.get('format')!r} is not {FORMAT!r}; this firmad reads "
            f"{FORMAT} only — re-create the detector with this version"
        )
    required = ("config", "params", "normalisation", "input", "scorer", "tensors", "weights_sha256")
    missing = [k for k in required if k not in meta]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; save the detector again")
    return meta


def _check_manifest(tensors: dict[str, torch.Tensor], manifest: dict, path: Path) -> None:
    missing = sorted(set(manifest) - set(tensors))
    extra = sorted(set(tensors) - set(manifest))
    if missing or extra:
        raise CheckpointError(
            f"{path}: tensors missing {missing[:5]} / unexpected {extra[:5]}; the file does not "
            "belong to this detector — save it again"
        )
    for key, (dtype, shape) in manifest.items():
        t = tensors[key]
        if str(t.dtype).removeprefix("torch.") != dtype or list(t.shape) != list(shape):
            raise CheckpointError(
                f"{path}: tensor {key!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} "
                f"{tuple(shape)}; the file was changed — save the detector again"
            )
