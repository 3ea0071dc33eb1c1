"""The training step that never synchronises with the device (capturable as a CUDA graph).

A mixin of `firmad.training.Trainer`: the same step as the eager one, for the same numbers,
with every value it needs on the device.
"""

from __future__ import annotations

from typing import Any

import torch

from firmad.augment import to_float
from firmad.errors import ConfigError


class SyncFreeStep:
    """`Trainer`'s sync-free step (``train.cuda_graph``); uses the trainer's attributes."""

    def enable_sync_free(self) -> None:
        """Train with the step that never synchronises with the device (``train.cuda_graph``
        replays it from a CUDA graph; on any device it can run as it is).

        What differs from the eager step, for the same numbers: the batch indices come from
        the epoch's permutation by a step counter on the device; the view parameters are
        computed on the device (`ViewAugment.forward_device`); SGD runs as foreach ops with the
        learning rate and momentum as device tensors, filled from the host scheduler before
        each step (a kernel launch, not a synchronisation), so the schedule, the checkpoint
        format and resuming stay those of the eager step. Needs SGD, frozen outliers, one
        process, no fp16 loss scaling, no torch.compile and no adversarial training.
        """
        need = []
        if not isinstance(self.optimizer, torch.optim.SGD):
            need.append("train.optimizer=sgd")
        if self.fresh_kinds:
            need.append("outliers.mode=frozen (fresh outliers are drawn on the host)")
        if self.world.distributed:
            need.append("a single process")
        if self.amp_dtype is torch.float16:
            need.append("train.amp none or bf16 (fp16 loss scaling syncs)")
        if self.settings.compile:
            need.append("train.compile=false")
        if self.adversarial is not None:
            need.append("adversarial.enabled=false (not checked for host syncs)")
        if need:
            raise ConfigError("train.cuda_graph (the sync-free step) needs " + "; ".join(need))
        self.sync_free = True
        self._sf: dict[str, Any] | None = None

    def _sync_free_setup(self) -> dict[str, Any]:
        """Static tensors of the sync-free step (after any checkpoint was loaded)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            state = self.optimizer.state[p]
            if state.get("momentum_buffer") is None:  # buf = m * 0 + g: SGD's first step
                state["momentum_buffer"] = torch.zeros_like(p)
        dev = self.device
        return {
            "params": params,
            "bufs": [self.optimizer.state[p]["momentum_buffer"] for p in params],
            "neg_lr": torch.zeros((), device=dev),
            "momentum": torch.zeros((), device=dev),
            "step": torch.zeros((), dtype=torch.int64, device=dev),  # step in the epoch
            "arange": torch.arange(self.local_batch, device=dev),
            "perm": torch.zeros(self.samples_per_epoch, dtype=torch.int64, device=dev),
            "perm_of": None,  # the permutation the buffer holds
        }

    def _sync_free_step(self) -> torch.Tensor:
        if self._sf is None:
            self._sf = self._sync_free_setup()
        sf = self._sf
        if self.perm is None:
            self.perm = torch.randperm(
                self.samples_per_epoch, generator=self.gen, device=self.device
            )
        if sf["perm_of"] is not self.perm:  # a new epoch, or a loaded checkpoint
            sf["perm"].copy_(self.perm)
            sf["step"].fill_(self.step_in_epoch)
            sf["perm_of"] = self.perm
        group = self.optimizer.param_groups[0]
        sf["neg_lr"].fill_(-group["lr"])
        sf["momentum"].fill_(group.get("momentum", 0.0))
        if not self.settings.cuda_graph:
            return self._sync_free_body()
        return self._graph_step()

    def _sync_free_body(self) -> torch.Tensor:
        """One step, every value on the device: what a CUDA graph captures."""
        sf = self._sf
        idx = sf["perm"].index_select(0, sf["step"] * self.local_batch + sf["arange"])
        x = to_float(self.pool.images[idx], channels=self.settings.channels)
        for p in sf["params"]:
            p.grad = None
        loss = self.compute_loss(x, self.pool.class_ids[idx], self.pool.kind_ids[idx])
        loss.backward()
        with torch.no_grad():
            self._sgd_update(sf)
            sf["step"].add_(1)
        return loss.detach()

    def _sgd_update(self, sf: dict[str, Any]) -> None:
        """torch.optim.SGD's update (dampening 0, no Nesterov), bit for bit on the CPU, with
        the learning rate and momentum as device tensors. As SGD does, a parameter without a
        gradient is left alone (no weight decay, no momentum decay). The update is one
        multiply-add, as SGD's ``add_(buf, alpha=-lr)``: a multiply then a subtraction rounds
        twice where the CPU kernels fuse them (AVX2, AVX-512), and that last-bit difference
        grows into another trajectory within a few steps."""
        live = [i for i, p in enumerate(sf["params"]) if p.grad is not None]
        params = [sf["params"][i] for i in live]
        bufs = [sf["bufs"][i] for i in live]
        grads = [p.grad for p in params]
        wd = self.optimizer.param_groups[0]["weight_decay"]
        if wd:
            grads = torch._foreach_add(grads, params, alpha=wd)
        torch._foreach_mul_(bufs, sf["momentum"])
        torch._foreach_add_(bufs, grads)
        torch._foreach_addcmul_(params, bufs, [sf["neg_lr"]] * len(params))

    def _graph_step(self) -> torch.Tensor:
        """Warm up on a side stream (real steps), capture one step, then replay it."""
        sf = self._sf
        if self._graph is None:
            if sf.setdefault("warmup", 0) < 3:
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    loss = self._sync_free_body()
                torch.cuda.current_stream(self.device).wait_stream(side)
                sf["warmup"] += 1
                return loss
            graph = torch.cuda.CUDAGraph()
            if hasattr(graph, "register_generator_state"):  # views drawn in the graph
                graph.register_generator_state(self.gen)
            for p in sf["params"]:
                p.grad = None
            with torch.cuda.graph(graph):
                sf["loss"] = self._sync_free_body()
            self._graph = graph
        self._graph.replay()
        return sf["loss"].clone()  # the next replay overwrites it
