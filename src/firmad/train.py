"""The training loop: one readable loop over an in-memory uint8 pool of normals and outliers.

A step: index the pool on the device -> (fresh outliers) -> float -> two augmented views in one
batched call -> encoder -> head -> loss -> SGD. No per-sample Python, no DataLoader.
Checkpoints hold everything needed to continue bit-for-bit on CPU (weights, optimizer, scheduler,
RNG state, position inside the epoch); Ctrl-C writes one and stops cleanly.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from firmad.augment import ViewAugment, to_float
from firmad.config import CONTRASTIVE_METHODS, RunConfig, save_config
from firmad.data import OneClassSplit, dataset_vs_dataset, load_dataset, multi_class_normal
from firmad.data import one_vs_rest as split_one_vs_rest
from firmad.errors import CheckpointError, ConfigError
from firmad.io import join_state, load_checkpoint, prefixed, save_checkpoint, split_state
from firmad.losses import FIRMLoss, NTXentLoss, SupConLoss
from firmad.models import build_backbone, build_head, normalisation_for
from firmad.outliers import apply_kinds, make_frozen_outliers, parse_outliers

CHECKPOINT = "checkpoint"


# --- data ----------------------------------------------------------------------------------------


def load_split(cfg: RunConfig) -> OneClassSplit:
    d = cfg.data
    common = dict(root=d.root, download=d.download, max_train=d.max_train, max_test=d.max_test)
    if d.outlier_dataset:
        return dataset_vs_dataset(d.dataset, d.outlier_dataset, seed=cfg.train.seed, **common)
    if isinstance(d.normal_class, list):
        return multi_class_normal(d.dataset, d.normal_class, seed=cfg.train.seed, **common)
    return split_one_vs_rest(d.dataset, d.normal_class, seed=cfg.train.seed, **common)


def prepare_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 images once to the training size (kept uint8, native channels)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    for chunk in images.split(4096):
        x = to_float(chunk, size=size, channels=chunk.shape[1])
        out.append((x * 255).round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


@dataclass
class Pool:
    """Everything one epoch samples from: normals first, then outliers."""

    images: torch.Tensor  # uint8 (M, C, H, W) on the training device
    class_ids: torch.Tensor  # int64 (M,): inlier class id, -1 for outliers
    kind_ids: torch.Tensor  # int64 (M,): 0 for inliers, 1..K outlier kind
    n_normal: int


def build_pool(
    cfg: RunConfig, normals: torch.Tensor, normal_ids: torch.Tensor, device: torch.device
) -> Pool:
    """Frozen outliers are drawn once from the run's seed: a resumed run rebuilds the same pool."""
    o = cfg.outliers
    gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + 17)
    images, class_ids, kind_ids = [normals], [normal_ids], [torch.zeros_like(normal_ids)]
    if o.exposure:
        # Outlier exposure: real outlier images fill the outlier slots (one per kind per normal).
        real = prepare_images(_load_exposure(o.exposure, cfg), normals.shape[-1])
        real = _match_channels(real, normals.shape[1])
        n = len(normals) * max(1, len(o.kinds))
        pick = torch.randint(len(real), (n,), generator=gen)
        images.append(real[pick])
        class_ids.append(torch.full((n,), -1))
        kind_ids.append(torch.ones(n, dtype=torch.int64))
    elif o.kinds and o.mode == "frozen" and _uses_outliers(cfg):
        out, kinds = make_frozen_outliers(normals, parse_outliers(o.kinds), gen)
        images.append(out)
        class_ids.append(torch.full((len(out),), -1))
        kind_ids.append(kinds)
    return Pool(
        images=torch.cat(images).to(device),
        class_ids=torch.cat(class_ids).to(device),
        kind_ids=torch.cat(kind_ids).to(device),
        n_normal=len(normals),
    )


def _uses_outliers(cfg: RunConfig) -> bool:
    return cfg.method.name != "dsvdd"


def _load_exposure(spec: str, cfg: RunConfig) -> torch.Tensor:
    return load_dataset(spec, split="train", root=None, download=cfg.data.download).images


def _match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    if images.shape[1] == channels:
        return images
    if channels == 1:
        return images.float().mean(1, keepdim=True).round().to(torch.uint8)
    return images.expand(-1, channels, -1, -1).contiguous()


# --- model ---------------------------------------------------------------------------------------


class OneClassModel(nn.Module):
    """Encoder (features used for scoring) plus what the method trains on top of it."""

    def __init__(self, cfg: RunConfig, dataset: str):
        super().__init__()
        m, channels = cfg.model, cfg.data.channels
        mean, std = normalisation_for(dataset, channels)
        self.encoder = build_backbone(
            m.backbone,
            in_channels=channels,
            width=m.width,
            bn_momentum=m.bn_momentum,
            mean=mean,
            std=std,
        )
        dim = self.encoder.feature_dim
        self.head = None
        self.classifier = None
        if cfg.method.name in CONTRASTIVE_METHODS:
            self.head = build_head(dim, m.head_hidden, m.head_out, m.head_depth)
        elif cfg.method.name == "binary":
            self.classifier = nn.Linear(dim, 1)
        # Deep SVDD's centre c: fixed after the first forward pass, saved with the weights.
        self.register_buffer("centre", torch.zeros(dim))


def build_model(cfg: RunConfig, dataset: str) -> OneClassModel:
    return OneClassModel(cfg, dataset)


def build_loss(cfg: RunConfig) -> nn.Module | None:
    m = cfg.method
    if m.name == "firm":
        return FIRMLoss(tau=m.tau, mode=m.loss_mode)
    if m.name == "ntxent":
        return NTXentLoss(tau=m.tau, symmetric=m.symmetric)
    if m.name in ("rotsupcon", "supcon-binary"):
        return SupConLoss(tau=m.tau)
    return None


def loss_labels(method: str, class_ids: torch.Tensor, kind_ids: torch.Tensor) -> torch.Tensor:
    """The labels each objective sees (see DESIGN: inliers >= 0, outliers -1)."""
    if method == "rotsupcon":
        return kind_ids  # 0 = inlier, 1..K = each outlier kind its own class
    if method in ("supcon-binary", "binary"):
        return (kind_ids > 0).long()
    return class_ids


# --- the trainer ---------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: CUDA was requested but is not available; use --device cpu")
    return device


class Trainer:
    """Builds everything from a RunConfig and runs the loop; `run_dir` holds all outputs."""

    def __init__(self, cfg: RunConfig, run_dir: Path, split: OneClassSplit | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = resolve_device(t.device)
        self.split = split if split is not None else load_split(cfg)
        self.method = cfg.method.name
        normals = prepare_images(self.split.train_images, cfg.data.size)
        if isinstance(cfg.data.normal_class, list) and not cfg.data.outlier_dataset:
            # Multi-class normal: each normal class keeps its id (multi-class FIRM positives).
            normal_ids = self.split.train_labels.long()  # original class ids
        else:
            normal_ids = torch.zeros(len(normals), dtype=torch.int64)
        self.pool = build_pool(cfg, normals, normal_ids, self.device)
        self.fresh_kinds = (
            parse_outliers(cfg.outliers.kinds)
            if cfg.outliers.mode == "fresh"
            and cfg.outliers.kinds
            and not cfg.outliers.exposure
            and _uses_outliers(cfg)
            else []
        )

        torch.manual_seed(t.seed)  # model initialisation
        self.model = build_model(cfg, cfg.data.dataset).to(self.device)
        self.use_cuda = self.device.type == "cuda"
        # channels_last: faster convolutions on CPU (mkldnn) and GPU alike.
        channels_last = t.channels_last in ("on", "auto")
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        amp = t.amp if t.amp != "auto" else ("bf16" if self.use_cuda else "none")
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16" and self.use_cuda)
        self.loss_fn = build_loss(cfg)
        a = cfg.augment
        self.augment = (
            ViewAugment(
                size=cfg.data.size,
                scale=tuple(a.scale),
                ratio=tuple(a.ratio),
                jitter=tuple(a.jitter),
                jitter_p=a.jitter_p,
                blur_kernel=a.blur_kernel,
                blur_sigma=tuple(a.blur_sigma),
                blur_p=a.blur_p,
                hflip_p=a.hflip_p,
                grayscale_p=a.grayscale_p,
            )
            if a.enabled
            else None
        )
        self.n_views = 2 if self.method in CONTRASTIVE_METHODS else 1

        self.samples_per_epoch = len(self.pool.images)
        if self.fresh_kinds:  # same mix of inliers and outliers as the frozen pool
            self.samples_per_epoch = self.pool.n_normal * (1 + len(self.fresh_kinds))
        full = self.samples_per_epoch // t.batch_size
        if full < 1:
            raise ConfigError(
                f"train.batch_size: {t.batch_size} is larger than the {self.samples_per_epoch} "
                "training samples; lower it"
            )
        self.steps_per_epoch = min(full, t.steps_per_epoch) if t.steps_per_epoch else full
        self.total_steps = self.steps_per_epoch * t.epochs

        params = [p for p in self.model.parameters() if p.requires_grad]
        if t.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(
                params,
                lr=t.lr,
                momentum=t.momentum,
                weight_decay=t.weight_decay,
                **_fused_kwargs(self.device),
            )
        else:
            self.optimizer = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = self._build_scheduler()
        self.gen = torch.Generator(self.device).manual_seed(t.seed)
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.perm: torch.Tensor | None = None
        self.history: list[dict[str, Any]] = []  # learning-curve points (diagnostic)
        self.elapsed = 0.0
        # Compile the encoder itself: attributes of a compiled parent module (compiled.encoder)
        # are the plain, uncompiled submodules.
        self.train_encoder = torch.compile(self.model.encoder) if t.compile else self.model.encoder

    def _build_scheduler(self):
        t = self.cfg.train
        if t.schedule == "onecycle":
            # PyTorch divides by zero when pct_start * total_steps <= 1 (tiny runs): widen it.
            pct = min(0.5, max(t.pct_start, 2.0 / self.total_steps))
            return torch.optim.lr_scheduler.OneCycleLR(
                self.optimizer,
                max_lr=t.lr,
                total_steps=self.total_steps,
                pct_start=pct,
                anneal_strategy="cos",
            )
        if t.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, self.total_steps)
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)

    # --- one step ---------------------------------------------------------------------------

    def sample_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] (B, C, S, S) with their class ids and outlier kind ids."""
        b = self.cfg.train.batch_size
        if self.perm is None:
            self.perm = torch.randperm(
                self.samples_per_epoch, generator=self.gen, device=self.device
            )
        idx = self.perm[self.step_in_epoch * b : (self.step_in_epoch + 1) * b]
        if self.fresh_kinds:
            # Slot i of the virtual pool: normal i % N, outlier kind i // N (0 = none).
            n = self.pool.n_normal
            kind_ids = idx // n
            x = to_float(self.pool.images[idx % n], channels=self.cfg.data.channels)
            x = apply_kinds(x, kind_ids, self.fresh_kinds, self.gen)
            class_ids = torch.where(kind_ids > 0, -1, self.pool.class_ids[idx % n])
            return x, class_ids, kind_ids
        x = to_float(self.pool.images[idx], channels=self.cfg.data.channels)
        return x, self.pool.class_ids[idx], self.pool.kind_ids[idx]

    def compute_loss(self, x: torch.Tensor, class_ids: torch.Tensor, kind_ids: torch.Tensor):
        views = torch.cat([x] * self.n_views) if self.n_views > 1 else x
        if self.augment is not None:
            views = self.augment(views, self.gen)
        if self.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        labels = loss_labels(self.method, class_ids, kind_ids)
        with torch.autocast(
            self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        ):
            feats = self.train_encoder(views)
            if self.method in CONTRASTIVE_METHODS:
                z = self.model.head(feats).float()
                z1, z2 = z.chunk(2)
                return self.loss_fn(z1, z2, labels)
            if self.method == "binary":
                logits = self.model.classifier(feats).float().squeeze(1)
                return F.binary_cross_entropy_with_logits(logits, labels.float())
            # Deep SVDD: mean squared distance of normals to the fixed centre.
            return (feats.float() - self.model.centre).pow(2).sum(1).mean()

    def train_step(self) -> torch.Tensor:
        x, class_ids, kind_ids = self.sample_batch()
        loss = self.compute_loss(x, class_ids, kind_ids)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step_in_epoch += 1
        self.global_step += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
            self.perm = None
        return loss.detach()

    @torch.no_grad()
    def init_svdd_centre(self, eps: float = 0.1) -> None:
        """Ruff et al.: c = mean feature of the normals at initialisation, away from zero."""
        self.model.eval()
        feats = []
        for chunk in self.pool.images[: self.pool.n_normal].split(512):
            x = to_float(chunk, channels=self.cfg.data.channels)
            feats.append(self.model.encoder(x).float())
        c = torch.cat(feats).mean(0)
        c = torch.where(c.abs() < eps, torch.where(c < 0, -eps, eps), c)
        self.model.centre.copy_(c)
        self.model.train()

    # --- checkpoints ------------------------------------------------------------------------

    def save(self, reason: str = "periodic") -> None:
        tensors: dict[str, torch.Tensor] = {}
        for k, v in self.model.state_dict().items():
            tensors[f"model.{k}"] = v
        optim_meta = split_state(self.optimizer.state_dict(), "optim", tensors)
        tensors["rng.train"] = self.gen.get_state()
        if self.perm is not None:
            tensors["epoch_perm"] = self.perm
        meta = {
            "format": "firmad-checkpoint-1",
            "reason": reason,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "total_steps": self.total_steps,
            "finished": self.global_step >= self.total_steps,
            "elapsed_s": self.elapsed,
            "optimizer": optim_meta,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": self.history,
            "dataset": self.split.dataset,
        }
        save_checkpoint(self.run_dir, CHECKPOINT, tensors, meta)

    def restore(self) -> None:
        tensors, meta = load_checkpoint(self.run_dir, CHECKPOINT)
        if meta.get("format") != "firmad-checkpoint-1":
            raise CheckpointError(f"{self.run_dir}: unknown checkpoint format {meta.get('format')}")
        self.model.load_state_dict(prefixed(tensors, "model"))
        optim_state = join_state(meta["optimizer"], tensors)
        optim_state["state"] = {int(k): v for k, v in optim_state["state"].items()}
        self.optimizer.load_state_dict(optim_state)
        # Checkpoints store tensors contiguous; fused SGD needs each momentum buffer in its
        # parameter's memory layout (channels_last weights), or the update goes wrong.
        for param in self.model.parameters():
            state = self.optimizer.state.get(param, {})
            if state.get("momentum_buffer") is not None:
                state["momentum_buffer"] = torch.empty_like(param).copy_(state["momentum_buffer"])
        self.scheduler.load_state_dict(meta["scheduler"])
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.gen.set_state(tensors["rng.train"])
        self.perm = tensors["epoch_perm"].to(self.device) if "epoch_perm" in tensors else None
        self.epoch = meta["epoch"]
        self.step_in_epoch = meta["step_in_epoch"]
        self.global_step = meta["global_step"]
        self.history = meta.get("history", [])
        self.elapsed = meta.get("elapsed_s", 0.0)

    # --- the loop ---------------------------------------------------------------------------

    def fit(self, progress=None, curve_fn=None) -> dict[str, Any]:
        """Train to the end; returns a summary. `curve_fn(model) -> auroc` draws learning curves."""
        t = self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.run_dir / "metrics.jsonl"
        if self.method == "dsvdd" and self.global_step == 0:
            self.init_svdd_centre()
        self.model.train()
        views_per_step = t.batch_size * self.n_views
        task = (
            progress.add_task("train", total=self.total_steps, completed=self.global_step, info="")
            if progress
            else None
        )
        # Learning-curve points every `eval_every` epochs (may be fractional), and at the end.
        curve_steps = max(1, round(t.eval_every * self.steps_per_epoch)) if t.eval_every else 0
        loss_sum, loss_n = torch.zeros((), device=self.device), 0
        epoch_start, curve_seconds = time.perf_counter(), 0.0
        try:
            with open(log_path, "a") as log:
                while self.global_step < self.total_steps:
                    loss_sum += self.train_step()
                    loss_n += 1
                    if task is not None and (self.global_step % 10 == 0 or self.step_in_epoch == 0):
                        progress.update(task, completed=self.global_step)
                    if (
                        curve_fn
                        and curve_steps
                        and (
                            self.global_step % curve_steps == 0
                            or self.global_step == self.total_steps
                        )
                    ):
                        tic = time.perf_counter()
                        point = {
                            "epoch": round(self.global_step / self.steps_per_epoch, 4),
                            "step": self.global_step,
                            "auroc": curve_fn(self.model),
                        }
                        self.history.append(point)
                        log.write(json.dumps({"curve": point}) + "\n")
                        self.model.train()
                        curve_seconds += time.perf_counter() - tic
                    if self.step_in_epoch != 0:
                        continue
                    # End of an epoch: log, maybe checkpoint.
                    seconds = time.perf_counter() - epoch_start
                    self.elapsed += seconds
                    record = {
                        "epoch": self.epoch,
                        "step": self.global_step,
                        "loss": float(loss_sum) / max(loss_n, 1),
                        "lr": self.scheduler.get_last_lr()[0],
                        "views_per_s": loss_n * views_per_step / max(seconds - curve_seconds, 1e-9),
                        "time_s": round(self.elapsed, 3),
                        "curve_time_s": round(curve_seconds, 3),
                    }
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    if task is not None:
                        info = (
                            f"epoch {self.epoch}/{t.epochs} loss {record['loss']:.3f} "
                            f"lr {record['lr']:.2e} {record['views_per_s']:.0f} views/s"
                        )
                        progress.update(task, info=info)
                    if t.checkpoint_every and self.epoch % t.checkpoint_every == 0:
                        self.save()
                    loss_sum, loss_n = torch.zeros((), device=self.device), 0
                    epoch_start, curve_seconds = time.perf_counter(), 0.0
        except KeyboardInterrupt:
            self.elapsed += time.perf_counter() - epoch_start
            self.save(reason="interrupted")
            raise
        self.save(reason="final")
        return {"epochs": self.epoch, "steps": self.global_step, "train_time_s": self.elapsed}


def _fused_kwargs(device: torch.device) -> dict[str, bool]:
    """Fused SGD saves a pass over the parameters; fall back where a build lacks it."""
    try:
        torch.optim.SGD([nn.Parameter(torch.zeros(1, device=device))], lr=0.1, fused=True)
        return {"fused": True}
    except (RuntimeError, TypeError, ValueError):
        return {"foreach": True}


def save_run_config(cfg: RunConfig, run_dir: Path) -> None:
    save_config(cfg, Path(run_dir) / "config.yaml")
