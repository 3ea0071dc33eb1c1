"""The one place that reads a `RunConfig` and builds the components of a run from it.

Methods, models, augmentation, the training pool, optimiser, schedule and the trainer all take
explicit arguments; the functions here turn the config's sections into those arguments, once
per run. Nothing below this module (methods, losses, scorers, models, data, the trainer) reads a
config.

The order of the steps in `build_trainer` is part of the numbers: the model is initialised from
the global RNG right after ``torch.manual_seed(train.seed)``, after the pool is built.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from firmad.augment import ViewAugment, ViewSettings
from firmad.config import RunConfig
from firmad.data.pool import Pool, build_pool, match_channels, normal_class_ids, prepare_images
from firmad.data.protocol import (
    OneClassSplit,
    dataset_vs_dataset,
    multi_class_normal,
    one_vs_rest,
)
from firmad.errors import ConfigError
from firmad.hardware import resolve_amp, run_numerics
from firmad.methods import Method, method_class
from firmad.models import HeadSettings, build_backbone, normalisation_for
from firmad.outliers import parse_outliers
from firmad.scoring import FeatureExtractor
from firmad.training import distributed
from firmad.training.model import OneClassModel, resolve_device
from firmad.training.settings import AdversarialSettings, TrainSettings, plan_epochs
from firmad.training.trainer import Trainer

# --- components ---------------------------------------------------------------------------------


def head_settings(cfg: RunConfig) -> HeadSettings:
    """The projection head's sizes (``model.head_*``), for methods that train a head."""
    m = cfg.model
    return HeadSettings(hidden=m.head_hidden, out_dim=m.head_out, depth=m.head_depth)


def build_method(cfg: RunConfig) -> Method:
    """The method ``cfg.method.name`` of the registry, built from its own settings (the
    ``method`` section is that method's settings model) and the head sizes."""
    return method_class(cfg.method.name).create(cfg.method, head=head_settings(cfg))


def build_model(
    cfg: RunConfig, dataset: str, normalisation=None, method: Method | None = None
) -> OneClassModel:
    """The encoder of ``cfg.model`` (normalised with the dataset's statistics, or the given
    (mean, std) measured on the user's own images) plus the method's modules."""
    m, channels = cfg.model, cfg.data.channels
    mean, std = normalisation or normalisation_for(dataset, channels)
    encoder = build_backbone(
        m.backbone,
        in_channels=channels,
        width=m.width,
        bn_momentum=m.bn_momentum,
        mean=mean,
        std=std,
    )
    method = method or build_method(cfg)
    return OneClassModel(encoder, method.build_modules(encoder.feature_dim))


def view_settings(cfg: RunConfig) -> ViewSettings:
    """The augmentation section as `ViewSettings` (without ``enabled``)."""
    return ViewSettings(**cfg.augment.model_dump(exclude={"enabled"}))


def build_augment(cfg: RunConfig) -> ViewAugment | None:
    """The training views' augmentation, or None when ``augment.enabled`` is false."""
    if not cfg.augment.enabled:
        return None
    return ViewAugment(size=cfg.data.size, views=view_settings(cfg))


def build_extractor(cfg: RunConfig, encoder: nn.Module) -> FeatureExtractor:
    """The encoder with the run's test-time preprocessing (size, channels, resize ratio)."""
    return FeatureExtractor(encoder, cfg.data.size, cfg.eval.resize_ratio, cfg.data.channels)


def build_split(cfg: RunConfig) -> OneClassSplit:
    """The run's one-class split (one-vs-rest, several normals, or two sets) from the ``data``
    section, seeded by ``train.seed``."""
    d = cfg.data
    common = dict(root=d.root, download=d.download, max_train=d.max_train, max_test=d.max_test)
    if d.outlier_dataset:
        split = dataset_vs_dataset(d.dataset, d.outlier_dataset, seed=cfg.train.seed, **common)
    elif isinstance(d.normal_class, list):
        split = multi_class_normal(d.dataset, d.normal_class, seed=cfg.train.seed, **common)
    else:
        split = one_vs_rest(d.dataset, d.normal_class, seed=cfg.train.seed, **common)
    if d.channels == 1 and split.train_images.shape[1] != 1:
        # A grayscale model of a colour source: convert once here, so that training, the
        # learning curve and evaluation all see the images the encoder expects.
        split = dataclasses.replace(
            split,
            train_images=match_channels(split.train_images, 1),
            test_images=match_channels(split.test_images, 1),
        )
    return split


def build_training_pool(
    cfg: RunConfig, split: OneClassSplit, method: Method, device: torch.device
) -> Pool:
    """The normals at the training size and the frozen outliers (or real outlier exposure)."""
    d, o = cfg.data, cfg.outliers
    normals = prepare_images(split.train_images, d.size)
    multi = isinstance(d.normal_class, list) and not d.outlier_dataset
    ids = normal_class_ids(split, len(normals), multi)
    frozen = o.kinds and o.mode == "frozen" and method.uses_outliers
    return build_pool(
        normals,
        ids,
        device,
        seed=cfg.train.seed,
        frozen=parse_outliers(o.kinds) if frozen else (),
        exposure=o.exposure,
        exposure_copies=max(1, len(o.kinds)),
        download=d.download,
    )


def fresh_outliers(cfg: RunConfig, method: Method) -> tuple:
    """The outlier kinds drawn anew every step (``outliers.mode=fresh``), else ()."""
    o = cfg.outliers
    fresh = o.mode == "fresh" and o.kinds and not o.exposure and method.uses_outliers
    return tuple(parse_outliers(o.kinds)) if fresh else ()


def build_optimizer(cfg: RunConfig, model: nn.Module, device: torch.device):
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
            **_fused_kwargs(device),
        )  # fmt: skip
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


def build_scheduler(cfg: RunConfig, optimizer, total_steps: int):
    t = cfg.train
    if t.schedule == "onecycle" and total_steps >= 3:
        # PyTorch divides by zero when pct_start * total_steps <= 1 (tiny runs): widen it.
        pct = min(0.5, max(t.pct_start, 2.0 / total_steps))
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=t.lr, total_steps=total_steps, pct_start=pct, anneal_strategy="cos"
        )
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
    # constant, or OneCycle without room for a warm-up and an annealing step (a run of one or
    # two steps on tiny data): keep the peak learning rate instead of failing.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def train_settings(
    cfg: RunConfig, method: Method, device: torch.device, dataset: str
) -> TrainSettings:
    t, a = cfg.train, cfg.adversarial
    adversarial = None
    if a.enabled:
        adversarial = AdversarialSettings(a.norm, a.eps, a.steps, a.alpha(), a.random_start)
    # auto: bf16 autocast where the device computes it natively, fp32 elsewhere (firmad.hardware)
    amp, amp_reason = resolve_amp(t.amp, device)
    channels_last = t.channels_last in ("on", "auto")  # faster convolutions on CPU and GPU
    numerics = run_numerics(amp, amp_reason, channels_last)
    return TrainSettings(
        batch_size=t.batch_size,
        epochs=t.epochs,
        seed=t.seed,
        device=device,
        channels=cfg.data.channels,
        steps_per_epoch=t.steps_per_epoch or 0,
        amp=amp,
        channels_last=channels_last,
        compile=t.compile,
        cuda_graph=t.cuda_graph,
        adversarial=adversarial,
        fresh_outliers=fresh_outliers(cfg, method),
        checkpoint_meta={"dataset": dataset, "config": cfg.to_dict(), "numerics": numerics},
    )


# --- the trainer --------------------------------------------------------------------------------


def training_device(cfg: RunConfig, world: distributed.World) -> torch.device:
    """``train.device``, one GPU per process under torchrun; the global batch must divide."""
    device = resolve_device(cfg.train.device)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    batch = cfg.train.batch_size
    if batch % world.size:
        raise ConfigError(
            f"train.batch_size: {batch} is the global batch of all {world.size} processes and "
            f"must be divisible by their number; choose a multiple of {world.size}"
        )
    return device


def build_trainer(
    cfg: RunConfig,
    split: OneClassSplit | None = None,
    callbacks=(),
    normalisation=None,
) -> Trainer:
    """Everything a run trains with, built from its config in the order the numbers rely on.

    ``split`` defaults to the config's; ``normalisation`` is (mean, std) of the user's own
    images (else the dataset's known statistics)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    world = distributed.world()
    device = training_device(cfg, world)
    split = split if split is not None else build_split(cfg)
    method = build_method(cfg)
    pool = build_training_pool(cfg, split, method, device)
    settings = train_settings(cfg, method, device, split.dataset)
    _, _, total_steps = plan_epochs(pool, settings)  # a too large batch fails before the model
    torch.manual_seed(cfg.train.seed)  # model initialisation
    model = build_model(cfg, cfg.data.dataset, normalisation, method).to(device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world.distributed and cfg.train.sync_bn:
        model = distributed.convert_sync_bn(model, device)
    optimizer = build_optimizer(cfg, model, device)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    augment = build_augment(cfg)
    return Trainer(model, method, pool, optimizer, scheduler, augment, callbacks, settings)


def _fused_kwargs(device: torch.device) -> dict[str, bool]:
    """Fused SGD saves a pass over the parameters; fall back where a build lacks it."""
    try:
        torch.optim.SGD([nn.Parameter(torch.zeros(1, device=device))], lr=0.1, fused=True)
        return {"fused": True}
    except (RuntimeError, TypeError, ValueError):
        return {"foreach": True}


__all__ = [
    "build_augment",
    "build_extractor",
    "build_method",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "build_split",
    "build_trainer",
    "build_training_pool",
    "head_settings",
    "train_settings",
    "view_settings",
]
