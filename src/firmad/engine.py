"""The engine: fits an `AnomalyModel` and evaluates trained networks.

``Engine(cfg).fit(images, scorer)`` trains the encoder on normal uint8 images (the run's
method, model and schedule) and fits the scorer on the features of a bank of them;
``Engine(cfg).fit_scorer(network, images, scorer)`` only the scorer, on an encoder trained
elsewhere (a `firmad train` run); ``Engine(cfg).evaluate(network, ...)`` scores a labelled test
set with every scorer x variant, features extracted once per rotation (the benchmark's path).
`OneClassDetector`, `firmad fit` and the run pipeline all go through here, so the API, the CLI
and the tables share one path.

Configuration is typed: `detector_config` reads a recipe and applies settings as values (never
as "a.b=c" strings), and `with_device` / `with_channels` return validated copies.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from firmad.anomaly_model import AnomalyModel, is_degenerate
from firmad.config import RunConfig, apply_overrides, config_from_dict, read_recipe
from firmad.data import OneClassSplit
from firmad.data.pool import prepare_images
from firmad.errors import ConfigError, InputError
from firmad.factory import build_extractor, build_method, build_trainer
from firmad.scoring import (
    ScoreOptions,
    VariantScorer,
    bank_crops,
    bank_subset,
    build_scorer,
    extract_banks,
    parse_scorer,
    score_run,
    scorer_parameters,
)
from firmad.training import ProgressBar
from firmad.training.callbacks import progress_bar
from firmad.validation import validate_as

MIN_STEPS = 10  # fewer training steps than this barely move the encoder from its start
DEFAULT_RECIPE = "fmnist-cpu"


# --- configuration --------------------------------------------------------------------------------


def detector_config(
    recipe: str | None, settings: dict[str, dict[str, Any]], overrides=()
) -> RunConfig:
    """A recipe (default fmnist-cpu) with typed ``settings`` ({section: {key: value}}, None
    values skipped) and then the user's ``section.key=value`` overrides, validated once."""
    if isinstance(overrides, str):
        raise ConfigError("overrides must be a list of 'section.key=value' strings")
    data = read_recipe(recipe or DEFAULT_RECIPE)
    for section, values in settings.items():
        for key, value in values.items():
            if value is not None:
                if not isinstance(data.get(section), dict):
                    data[section] = {}
                data[section][key] = value
    return config_from_dict(apply_overrides(data, list(overrides)))


def with_device(cfg: RunConfig, device: str | None) -> RunConfig:
    """A copy of ``cfg`` that runs on ``device`` (checked as the recipe key is); None: cfg."""
    if device is None:
        return cfg
    train = validate_as(type(cfg.train), {**cfg.train.model_dump(), "device": device}, "train")
    return cfg.model_copy(update={"train": train})


def with_channels(cfg: RunConfig, channels: int) -> RunConfig:
    """Colour images need a colour encoder; grey ones keep the recipe's (repeated to RGB)."""
    if channels == 3 and cfg.data.channels == 1:
        return cfg.model_copy(update={"data": cfg.data.model_copy(update={"channels": 3})})
    return cfg


def resolve_scorer(cfg: RunConfig, scorer: str, k: int | None = None, network=None):
    """(name, params) of a scorer spec for this config's method: ``"own"`` is the method's own
    score (its trained modules' values from ``network``); ``k`` fills in a kNN scorer's k
    unless the spec gives one. Unknown names and parameters are refused here."""
    if not isinstance(scorer, str):
        raise ConfigError(f"scorer must be a spec such as 'knn_cos:k=5', got {scorer!r}")
    name, params = parse_scorer(scorer)
    method = build_method(cfg)
    if name == "own":
        if method.own_scorer is None:
            raise ConfigError(
                f"scorer='own': method {method.name!r} has no score of its own; use a "
                "feature scorer such as knn_cos, kde or mahalanobis"
            )
        name = method.own_scorer
    if k is not None and "k" in scorer_parameters(name):
        params.setdefault("k", k)
    if name == method.own_scorer and network is not None:
        params.update(method.own_scorer_params(network))
    build_scorer(name, **params)
    return name, params


# --- held-out split -------------------------------------------------------------------------------

MIN_HOLDOUT_SHARE = 0.1


def holdout_size(n: int, holdout: float | str, rate: float, min_above: int) -> int:
    """How many of n images to keep out of training for the threshold: a share, or "auto":
    max(10 %, min_above / rate images), at most half of them."""
    if holdout == "auto":
        want = max(math.ceil(MIN_HOLDOUT_SHARE * n), math.ceil(min_above / rate))
        return min(want, n // 2)
    return int(round(float(holdout) * n))


def heldout_split(n: int, n_held: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out indices, training indices), both sorted: a seeded draw."""
    if not n_held:
        return torch.zeros(0, dtype=torch.int64), torch.arange(n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:n_held].sort().values, order[n_held:].sort().values


# --- the engine -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScorerChoice:
    """What to fit on the features: a scorer spec ("knn_cos:k=5", "own"), kNN's k when the
    spec gives none, the variant, and the bank (a seeded subset of this many images)."""

    spec: str = "knn_cos"
    k: int | None = 5
    variant: str = "plain"
    bank_size: int | None = None


class Engine:
    """Fits and evaluates models of one config; ``verbose``: a training progress bar and a
    line per stage, on stderr."""

    def __init__(self, cfg: RunConfig, verbose: bool = False) -> None:
        self.cfg, self.verbose = cfg, verbose

    def say(self, message: str) -> None:
        if self.verbose:
            print(f"firmad: {message}", file=sys.stderr, flush=True)

    def fit(self, images: torch.Tensor, choice: ScorerChoice, layout: str = "NCHW",
            steps: int | None = None) -> AnomalyModel:  # fmt: skip
        """Train on normal uint8 images (N, C, H, W), then fit the scorer on their features."""
        trainer = self.trainer(images, steps)
        self.check_bank(choice, len(images))
        network = self.run(trainer)
        prepared = prepare_images(images, self.cfg.data.size)
        return self.fit_scorer(network, prepared, choice, tuple(images.shape[1:]), layout)

    def check_bank(self, choice: ScorerChoice, n_train: int) -> None:
        """Enough images for k neighbours (one batch is checked by the Trainer)."""
        name, params = resolve_scorer(self.cfg, choice.spec, choice.k)
        n_bank = min(n_train, choice.bank_size or n_train)
        k = params.get("k")
        if k is not None and k > n_bank:
            raise ConfigError(
                f"scorer {name} with k={k} needs at least {k} training images in its bank; "
                f"there are {n_bank}: lower k or give more images"
            )

    def train(self, images: torch.Tensor, steps: int | None = None):
        """The network trained on these normal uint8 images (`trainer`, then `run`)."""
        return self.run(self.trainer(images, steps))

    def trainer(self, images: torch.Tensor, steps: int | None = None):
        """The Trainer for these normal images: the config's epochs, or exactly ``steps``
        steps (epochs x steps per epoch; ``self.cfg`` becomes the config used)."""
        split = _train_only_split(images, self.cfg.data.dataset)
        normalisation = image_stats(images)
        trainer = self._trainer(split, normalisation)
        if steps is not None and trainer.total_steps != steps:
            self.cfg = _with_steps(self.cfg, steps, trainer.steps_per_epoch)
            trainer = self._trainer(split, normalisation)
        if trainer.total_steps < MIN_STEPS:
            warnings.warn(
                f"{len(images)} training images give only {trainer.total_steps} training "
                f"step(s) (batch {trainer.settings.batch_size}): the encoder barely learns; "
                "give more images or epochs",
                UserWarning,
                stacklevel=4,
            )
        return trainer

    def run(self, trainer):
        """Train to the end (a progress bar if asked); the trained network."""
        if self.verbose:
            pool = trainer.pool
            self.say(
                f"training: {trainer.total_steps} steps on {pool.n_normal} normal images "
                f"(and {len(pool.images) - pool.n_normal} synthetic outliers)"
            )
        if self.verbose:
            bar = progress_bar()
            trainer.callbacks.insert(0, ProgressBar(bar))
            with bar:
                trainer.fit()
        else:
            trainer.fit()
        return trainer.model.to(memory_format=torch.contiguous_format)

    def _trainer(self, split: OneClassSplit, normalisation):
        try:
            return build_trainer(self.cfg, split=split, normalisation=normalisation)
        except ConfigError as err:
            if "train.batch_size" not in str(err):
                raise
            raise InputError(
                f"{len(split.train_images)} image(s) for training do not fill one batch "
                f"(train.batch_size {self.cfg.train.batch_size}, synthetic outliers included): "
                "give more normal images (hundreds are better), or lower the batch with "
                "--set train.batch_size=N"
            ) from None

    def fit_scorer(self, network, images: torch.Tensor, choice: ScorerChoice,
                   input_shape=None, layout: str = "NCHW") -> AnomalyModel:  # fmt: skip
        """The model of a trained network and a scorer fitted on the features of these
        normal images (uint8, at the training size)."""
        cfg, e = self.cfg, self.cfg.eval
        name, params = resolve_scorer(cfg, choice.spec, choice.k, network)
        vs = VariantScorer(name, params, choice.variant, e.n_crops)
        bank = bank_subset(images, choice.bank_size, cfg.train.seed)
        self.say(f"fitting the {name} scorer on {len(bank)} images")
        crops = bank_crops(choice.variant, e.ensemble_bank, e.n_crops)
        extractor = build_extractor(cfg, network.encoder)
        banks = extract_banks(
            extractor, bank, vs.bank_angles, e.batch_size, e.bank_centroids, cfg.train.seed, crops
        )
        check_features(banks)
        shape = tuple(input_shape or images.shape[1:])
        return AnomalyModel(network, cfg, vs.fit(banks), shape, layout, int(bank.shape[0]))

    def evaluate(self, network, train_images, test_images, test_labels, scorers, variants):
        """Every scorer x variant on a labelled test set (uint8 images), features extracted
        once per rotation; the method's own score, if any, first. ``(rows, details)``."""
        cfg, e = self.cfg, self.cfg.eval
        method = build_method(cfg)
        extractor = build_extractor(cfg, network.encoder)
        own = []
        if method.own_scorer is not None:
            own_vs = VariantScorer(method.own_scorer, method.own_scorer_params(network))
            own.append(own_vs.fit({0: None}).to(extractor.device))
        options = ScoreOptions(
            batch_size=e.batch_size, n_crops=e.n_crops, seed=cfg.train.seed,
            bank_size=e.bank_size, bank_centroids=e.bank_centroids, ensemble_bank=e.ensemble_bank,
        )  # fmt: skip
        return score_run(
            extractor, prepare_images(train_images, cfg.data.size),
            prepare_images(test_images, cfg.data.size), test_labels, [*own, *scorers],
            variants, options, return_details=True,
        )  # fmt: skip


def _with_steps(cfg: RunConfig, steps: int, per_epoch: int) -> RunConfig:
    """epochs x steps_per_epoch = steps exactly, steps per epoch a divisor of ``steps`` no
    larger than one pass over the pool (``per_epoch``)."""
    per = max(d for d in range(1, min(per_epoch, steps) + 1) if steps % d == 0)
    train = {**cfg.train.model_dump(), "epochs": steps // per, "steps_per_epoch": per}
    return cfg.model_copy(update={"train": validate_as(type(cfg.train), train, "train")})


def check_features(banks) -> None:
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


def image_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] (the encoder's normalisation)."""
    x = images[:10_000].float().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return mean.tolist(), std.tolist()


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
