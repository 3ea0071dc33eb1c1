"""The training loop: one readable, method-agnostic loop over an in-memory uint8 pool.

A step: index the pool on the device -> (fresh outliers) -> float -> the method's views in one
batched augmentation call -> encoder -> the method's loss -> SGD. No per-sample Python, no
DataLoader. What happens around the loop (checkpoints, the JSONL log, progress, learning curves)
is done by callbacks (`firmad.training.callbacks`).

SIGINT and SIGTERM never cut a step in half: the loop finishes the current step, lets the
callbacks save, and then raises KeyboardInterrupt — so a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from firmad.augment import ViewAugment, repeat_views, to_float
from firmad.data.pool import Pool
from firmad.errors import CheckpointError, ConfigError, FirmadError
from firmad.io import join_state, prefixed, split_state
from firmad.methods import Method
from firmad.outliers import apply_kinds
from firmad.perturb import ascent_step, project, random_delta
from firmad.training import distributed
from firmad.training.model import weights_mismatch
from firmad.training.settings import TrainSettings, plan_epochs
from firmad.training.sync_free import SyncFreeStep

CHECKPOINT_FORMAT = "firmad-checkpoint-1"


class TrainingDiverged(FirmadError):
    """The loss became NaN or infinite; the weights are no longer usable."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped the loop after a complete step; the checkpoint was saved."""

    def __init__(self, signal_name: str, step: int) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}")
        self.signal_name, self.step = signal_name, step


class Trainer(SyncFreeStep):
    """Runs the loop over a pool with a model, method, optimiser, schedule and augmentation
    (`firmad.factory.build_trainer` builds them from a RunConfig).

    Inside a torch.distributed process group (``torchrun``) it trains one model across the
    processes with DistributedDataParallel; ``settings.batch_size`` is then the global batch,
    and the run computes what one process with that batch computes
    (`firmad.training.distributed`).
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        pool: Pool,
        optimizer: torch.optim.Optimizer,
        scheduler,
        augment: ViewAugment | None,
        callbacks,
        settings: TrainSettings,
    ):
        self.model, self.method, self.pool, self.augment = model, method, pool, augment
        self.optimizer, self.scheduler, self.settings = optimizer, scheduler, settings
        self.callbacks = list(callbacks)
        self.world = distributed.world()
        self.device = settings.device
        self.local_batch = settings.batch_size // self.world.size
        self.fresh_kinds = list(settings.fresh_outliers)
        self.n_views = method.n_views
        self.adversarial = settings.adversarial
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[settings.amp]
        fp16_cuda = settings.amp == "fp16" and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16_cuda)
        self.channels_last = settings.channels_last
        self.attack_start_loss = torch.zeros((), device=self.device)  # summed over an epoch
        self.samples_per_epoch, self.steps_per_epoch, self.total_steps = plan_epochs(pool, settings)
        self.gen = torch.Generator(self.device).manual_seed(settings.seed)
        self._reset_progress()
        self.train_encoder, self.net = self._training_forward()
        self.sync_free = False  # the step without host synchronisation (enable_sync_free)
        self._graph = None
        if settings.cuda_graph:
            if self.device.type != "cuda":
                raise ConfigError(
                    f"train.cuda_graph: CUDA graphs need a CUDA device, but training runs on "
                    f"{self.device}; set train.cuda_graph=false (or train.device=cuda)"
                )
            self.enable_sync_free()

    def _reset_progress(self) -> None:
        """The counters of a run that has not started (`load_state` sets those of a resumed one)."""
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.perm: torch.Tensor | None = None
        self.history: list[dict[str, Any]] = []  # learning-curve points (diagnostic)
        self.elapsed = 0.0
        # (sum, count) of the losses of the current epoch's steps so far: checkpointed, so
        # that a run resumed mid-epoch logs the same epoch loss as an uninterrupted one.
        self.epoch_loss: tuple[float, int] = (0.0, 0)
        # Steps between finiteness checks (a check syncs a GPU); always checked before a save.
        self.finite_check_every = 1 if self.device.type == "cpu" else 10
        self.paused = 0.0  # seconds callbacks spent on evaluation inside the current epoch

    def _training_forward(self) -> tuple[nn.Module, nn.Module]:
        """(the encoder the step runs, the encoder -> embeddings module that DDP wraps).

        The encoder itself is compiled: attributes of a compiled parent module
        (compiled.encoder) are the plain, uncompiled submodules."""
        encoder = self.model.encoder
        if self.settings.compile:
            encoder = torch.compile(encoder)
        net: nn.Module = distributed.EmbeddingNet(self.model, self.method, encoder)
        if self.world.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = DistributedDataParallel(net, device_ids=ids)
        return encoder, net

    @property
    def finished(self) -> bool:
        return self.global_step >= self.total_steps

    # --- one step ---------------------------------------------------------------------------

    def sample_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] (B, C, S, S) with their class ids and outlier kind ids.

        With several processes, B is this rank's slice of the global batch: every rank draws
        the whole global batch's random numbers and keeps rows ``rank*B .. (rank+1)*B``. A grey
        pool of a 3-channel model comes as its channel broadcast (`firmad.augment.to_float`),
        so that the views are computed once per image, not once per channel."""
        b = self.settings.batch_size
        if self.perm is None:
            self.perm = torch.randperm(
                self.samples_per_epoch, generator=self.gen, device=self.device
            )
        idx = self.perm[self.step_in_epoch * b : (self.step_in_epoch + 1) * b]
        mine = slice(self.world.rank * self.local_batch, (self.world.rank + 1) * self.local_batch)
        if self.fresh_kinds:
            # Slot i of the virtual pool: normal i % N, outlier kind i // N (0 = none).
            # The whole global batch's outliers, so the generator advances as in one process.
            n = self.pool.n_normal
            kind_ids = idx // n
            x = to_float(self.pool.images[idx % n], channels=self.settings.channels)
            x = apply_kinds(x, kind_ids, self.fresh_kinds, self.gen)
            class_ids = torch.where(kind_ids > 0, -1, self.pool.class_ids[idx % n])
            return x[mine], class_ids[mine], kind_ids[mine]
        idx = idx[mine]
        x = to_float(self.pool.images[idx], channels=self.settings.channels, broadcast=True)
        return x, self.pool.class_ids[idx], self.pool.kind_ids[idx]

    def compute_loss(self, x: torch.Tensor, class_ids: torch.Tensor, kind_ids: torch.Tensor):
        views = repeat_views(x, self.n_views)
        if self.augment is not None:
            views = self.augment_views(views)
        if self.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        labels = self.method.labels(class_ids, kind_ids)
        if self.adversarial is not None:
            views = self.perturb(views, labels)
        with torch.autocast(
            self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
            cache_enabled=not self.sync_free,  # CUDA graphs: no autocast weight cache
        ):
            return self.embedding_loss(self.net(views), labels)

    def augment_views(self, views: torch.Tensor) -> torch.Tensor:
        """The method's views of this rank's samples, as in a single process's global batch."""
        if self.sync_free:
            return self.augment.forward_device(views, self.gen)
        if not self.world.distributed:
            return self.augment(views, self.gen)
        b, g = self.local_batch, self.settings.batch_size
        i = torch.arange(views.shape[0])
        rows = (i // b) * g + self.world.rank * b + i % b  # view-major rows of the global batch
        return self.augment(views, self.gen, rows=rows, n_draw=self.n_views * g)

    def embedding_loss(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The method's loss of the global batch: several processes gather every rank's
        embeddings (with gradients) and labels first."""
        if self.world.distributed:
            z = distributed.gather_rows(z, self.n_views)
            labels = distributed.gather_labels(labels)
        return self.method.embedding_loss(z, labels)

    def perturb(self, views: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Adversarial training's inner maximisation: PGD on the method's own loss.

        The views (in [0, 1]) move within the ε-ball of ``cfg.adversarial`` to raise
        ``method.loss(model, encoder(views + δ), labels)``; after every step δ is projected onto
        the ball and [0, 1]. Gradients are taken w.r.t. the views only. BatchNorm stays in train
        mode (the attack sees the batch statistics the update will see), but its running
        statistics are saved before the attack passes and restored after them, so only the
        update pass moves them, exactly as in clean training. The random start is drawn from
        the trainer's generator, so a resumed run continues bit for bit.
        """
        a = self.adversarial
        alpha = a.alpha
        x = views.detach()
        x_adv = x
        if a.random_start:
            delta = random_delta(x.shape, a.norm, a.eps, self.gen, dtype=x.dtype)
            x_adv = project(x + delta, x, a.norm, a.eps)
        with _running_stats_kept(self.model), torch.enable_grad():
            for k in range(a.steps):
                x_adv = x_adv.detach().requires_grad_(True)
                amp = self.amp_dtype is not None
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=amp):
                    loss = self.method.loss(self.model, self.train_encoder(x_adv), labels)
                (grad,) = torch.autograd.grad(loss.float(), x_adv)
                if k == 0:
                    self.attack_start_loss += loss.detach().float()
                x_adv = project(ascent_step(x_adv.detach(), grad, a.norm, alpha), x, a.norm, a.eps)
        if self.channels_last:
            x_adv = x_adv.contiguous(memory_format=torch.channels_last)
        return x_adv

    def train_step(self) -> torch.Tensor:
        if self.sync_free:
            loss = self._sync_free_step()
        else:
            x, class_ids, kind_ids = self.sample_batch()
            loss = self.compute_loss(x, class_ids, kind_ids)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.sync_free:  # SGD's update ran without optimizer.step(): that is expected
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Detected call of .lr_scheduler")
                self.scheduler.step()
        else:
            self.scheduler.step()
        self.step_in_epoch += 1
        self.global_step += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
            self.perm = None
        return loss.detach()

    # --- state: everything needed to continue bit for bit ---------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON metadata) of the whole training state."""
        tensors: dict[str, torch.Tensor] = {}
        for k, v in self.model.state_dict().items():
            tensors[f"model.{k}"] = v
        optim_meta = split_state(self.optimizer.state_dict(), "optim", tensors)
        tensors["rng.train"] = self.gen.get_state()
        if self.world.distributed:  # a collective: every rank calls state()
            for r, rng in enumerate(distributed.gather_states(self.gen.get_state(), self.device)):
                tensors[f"rng.train.rank{r}"] = rng
        if self.perm is not None:
            tensors["epoch_perm"] = self.perm
        meta = {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "total_steps": self.total_steps,
            "world_size": self.world.size,
            "finished": self.finished,
            "elapsed_s": self.elapsed,
            "epoch_loss": list(self.epoch_loss),
            "optimizer": optim_meta,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": self.history,
            **self.settings.checkpoint_meta,  # the dataset and the run config
        }
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"unknown checkpoint format {meta.get('format')!r}")
        if meta.get("total_steps") not in (None, self.total_steps):
            raise CheckpointError(
                f"the checkpoint was made for {meta['total_steps']} steps but this configuration "
                f"trains {self.total_steps}; resume with the run's own config.yaml"
            )
        saved_world = meta.get("world_size", 1)
        if saved_world != self.world.size:
            raise CheckpointError(
                f"the checkpoint was made by {saved_world} process(es) but this run has "
                f"{self.world.size}; resume with the same number (torchrun --nproc_per_node)"
            )
        try:
            self.model.load_state_dict(prefixed(tensors, "model"))
        except RuntimeError as err:
            raise CheckpointError(
                f"the checkpoint's weights do not fit this configuration "
                f"({weights_mismatch(err)}); resume with the run's own config.yaml"
            ) from None
        optim_state = join_state(meta["optimizer"], tensors)
        optim_state["state"] = {int(k): v for k, v in optim_state["state"].items()}
        self.optimizer.load_state_dict(optim_state)
        # Checkpoints store tensors contiguous; fused SGD needs each momentum buffer in its
        # parameter's memory layout (channels_last weights), or the update goes wrong.
        for param in self.model.parameters():
            state = self.optimizer.state.get(param, {})
            if state.get("momentum_buffer") is not None:
                state["momentum_buffer"] = torch.empty_like(param).copy_(state["momentum_buffer"])
        if self.sync_free:  # static tensors point at the replaced buffers: rebuild them
            self._sf, self._graph = None, None
        self.scheduler.load_state_dict(meta["scheduler"])
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        rng_key = f"rng.train.rank{self.world.rank}" if self.world.distributed else "rng.train"
        self.gen.set_state(tensors[rng_key])
        self.perm = tensors["epoch_perm"].to(self.device) if "epoch_perm" in tensors else None
        self.epoch = meta["epoch"]
        self.step_in_epoch = meta["step_in_epoch"]
        self.global_step = meta["global_step"]
        self.history = list(meta.get("history", []))
        self.elapsed = meta.get("elapsed_s", 0.0)
        loss_sum, loss_n = meta.get("epoch_loss") or (0.0, 0)
        self.epoch_loss = (float(loss_sum), int(loss_n))

    # --- the loop ---------------------------------------------------------------------------

    def _emit(self, event: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    def fit(self) -> dict[str, Any]:
        """Train to the end; returns a summary. Ctrl-C / SIGTERM: the step in flight finishes,
        callbacks see ``on_interrupt`` (the checkpoint is saved there), then
        `TrainingInterrupted` (a KeyboardInterrupt). The final save also runs with signals
        deferred, so it is never cut in half."""
        self._fit_begin()
        with deferred_signals() as stop:
            while not self.finished:
                self._fit_step(stop.requested is not None)
                if self._stop_requested(stop) and not self.finished:
                    self._fit_interrupt()
                    raise TrainingInterrupted(stop.requested or "another process", self.global_step)
            summary = self._fit_end()
            if stop.requested:  # during the last step: training is complete and saved
                raise TrainingInterrupted(stop.requested, self.global_step)
        return summary

    # The loop in pieces, so that several trainers can take turns (fit_together).

    def _fit_begin(self) -> None:
        if self.global_step == 0:
            normals = self.pool.images[: self.pool.n_normal]
            self.method.on_train_start(
                self.model, to_float(normals, channels=self.settings.channels)
            )
        self.model.train()
        self._emit("on_train_start")
        self._loss_sum = torch.tensor(self.epoch_loss[0], device=self.device)
        self._loss_n, self._steps_run = self.epoch_loss[1], 0  # steps_run: for the speed
        self.attack_start_loss.zero_()
        self._epoch_start = time.perf_counter()
        self.paused = 0.0

    def _fit_step(self, stopping: bool = False) -> None:
        """One step and what follows it: the finiteness check, callbacks, the epoch record."""
        loss = self.train_step()
        self._loss_sum += loss
        self._loss_n += 1
        self._steps_run += 1
        # Checked every few steps (a check syncs a GPU), and always before callbacks may save.
        check = self.global_step % self.finite_check_every == 0
        if check or self.step_in_epoch == 0 or stopping or self.finished:
            self._check_finite(self._loss_sum, loss)
        self._emit("on_step_end")
        if self.step_in_epoch == 0:  # an epoch just ended
            seconds = time.perf_counter() - self._epoch_start
            self.elapsed += seconds
            views = self._steps_run * self.settings.batch_size * self.n_views
            record = {
                "epoch": self.epoch,
                "step": self.global_step,
                "loss": float(self._loss_sum) / max(self._loss_n, 1),
                "lr": self.scheduler.get_last_lr()[0],
                "views_per_s": views / max(seconds - self.paused, 1e-9),
                "time_s": round(self.elapsed, 3),
                "curve_time_s": round(self.paused, 3),
            }
            if self.adversarial is not None:
                # "loss" is on the attacked views; this is at the attack's start point
                record["attack_start_loss"] = float(self.attack_start_loss) / max(self._loss_n, 1)
                self.attack_start_loss.zero_()
            self.epoch_loss = (0.0, 0)
            self._emit("on_epoch_end", record)
            self._loss_sum, self._loss_n = torch.zeros((), device=self.device), 0
            self._steps_run = 0
            self._epoch_start, self.paused = time.perf_counter(), 0.0

    def _fit_interrupt(self) -> None:
        self.elapsed += time.perf_counter() - self._epoch_start if self.step_in_epoch else 0
        self.epoch_loss = (float(self._loss_sum), self._loss_n)
        self._emit("on_interrupt")

    def _fit_end(self) -> dict[str, Any]:
        self._emit("on_train_end")
        return {"epochs": self.epoch, "steps": self.global_step, "train_time_s": self.elapsed}

    def _check_finite(self, loss_sum: torch.Tensor, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss_sum):
            self._emit("on_diverged")
            raise TrainingDiverged(
                f"the loss became {float(loss)} at step {self.global_step} (epoch "
                f"{self.epoch}); lower train.lr or check the data. The last checkpoint (if "
                "any) was kept; the diverged weights were not saved."
            )

    def _stop_requested(self, stop) -> bool:
        """Several processes stop after the same step: a signal to any rank stops them all."""
        if self.world.distributed:
            return distributed.any_rank(stop.requested is not None, self.device)
        return stop.requested is not None


class _StopFlag:
    requested: str | None = None


@contextlib.contextmanager
def deferred_signals():
    """SIGINT / SIGTERM set a flag that the loop reads between steps (main thread only)."""
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag.requested = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _running_stats_kept(model: nn.Module):
    """Forward passes inside leave BatchNorm's running statistics (and batch count) as they were."""
    saved = [
        (m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
