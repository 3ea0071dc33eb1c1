"""Several processes, one model: DistributedDataParallel started by torchrun.

    torchrun --nproc_per_node=N -m firmad train --config RECIPE ...

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`process_group` joins the group they describe (NCCL on CUDA, gloo on the CPU) and the
:class:`~firmad.training.Trainer` finds it and trains one model across the processes.

What makes an N-process run equal to one process with the same global batch:

- ``train.batch_size`` is the *global* batch; each rank trains on ``batch_size / N`` samples
  (it must divide). Every rank draws the random numbers of the whole global batch with the same
  generator (the epoch's permutation, fresh outliers, the view parameters) and keeps its own
  slice, so rank r's samples and views are rows ``r*b .. (r+1)*b`` of the single process's.
  The cost: each rank draws N times the random numbers it uses, and with fresh outliers builds
  the outliers of the whole global batch (cheap next to the encoder, which sees only the slice).
- The forward that DDP wraps is encoder -> the method's embeddings (:class:`EmbeddingNet`). The
  embeddings and the labels are all-gathered before the loss -- the embeddings *with* gradients
  (an autograd-aware all-gather) -- so every rank computes the loss of the whole global batch,
  with every negative and every positive a single process would see.
- Gradients: the gather's backward sums the gradient of each rank's copy of the loss into the
  rank that owns the rows, so a rank's local gradient is N times its share of the global one;
  DDP's gradient averaging divides by N. The update equals the single-process update, with the
  loss left unscaled.
- Batch normalisation: with ``train.sync_bn`` (the default) every BatchNorm layer normalises with
  the statistics of the global batch (torch's SyncBatchNorm on CUDA, :class:`GlobalBatchNorm` on
  the CPU, where SyncBatchNorm does not run). Without it each rank normalises with its own slice's
  statistics, and DDP broadcasts rank 0's running statistics at every step.

Rank 0 alone writes checkpoints, the metrics log, results and reports. A checkpoint keeps every
rank's generator state and the number of processes; ``--resume`` needs the same number, and the
run directory on a filesystem every rank sees. SIGINT / SIGTERM on any rank stops all ranks after
the same step (the ranks agree after every step).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from firmad.errors import ConfigError

__all__ = [
    "EmbeddingNet",
    "GlobalBatchNorm",
    "World",
    "any_rank",
    "broadcast_int",
    "convert_sync_bn",
    "gather_labels",
    "gather_rows",
    "gather_states",
    "process_group",
    "world",
]


@dataclass(frozen=True)
class World:
    """This process's place in the process group (rank 0 of 1 without one)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return World(dist.get_rank(), dist.get_world_size(), local)
    return World()


def env_world_size() -> int:
    """The number of processes torchrun (or a launcher that sets its variables) started."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def backend_for(device: str) -> str:
    """NCCL when the training device is CUDA, gloo on the CPU."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


@contextlib.contextmanager
def process_group(device: str = "auto", timeout_s: float = 1800.0):
    """Join the process group described by torchrun's environment for the block's duration.

    A no-op for a single process (``WORLD_SIZE`` unset or 1) and when a group exists already
    (a caller that set one up itself). On CUDA each process uses the GPU ``LOCAL_RANK``.
    """
    if env_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        yield world()
        return
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE is set but {', '.join(missing)} are not; start several processes with "
            "torchrun --nproc_per_node=N -m firmad train ..."
        )
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield world()
        # every rank done before any tears down: gloo aborts a process whose peer vanished
        dist.barrier()
    finally:
        dist.destroy_process_group()


# --- collectives the trainer uses ----------------------------------------------------------------


def _comm_device(device: torch.device) -> torch.device:
    """Where a collective's tensors must live: the GPU for NCCL, else the CPU."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


class _AllGatherRows(torch.autograd.Function):
    """All-gather along dim 0 with gradients. Every rank computes the same loss of the gathered
    rows, so the gradient of a rank's own rows is the sum over the ranks' copies (all-reduce, then
    this rank's slice): the gradient of N times the loss, which DDP's averaging divides by N."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty((dist.get_world_size() * x.shape[0], *x.shape[1:]), dtype=x.dtype,
                          device=x.device)  # fmt: skip
        dist.all_gather(list(out.chunk(dist.get_world_size())), x)
        ctx.rows = x.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        rank = dist.get_rank()
        return grad[rank * ctx.rows : (rank + 1) * ctx.rows]


class _AllReduceSum(torch.autograd.Function):
    """All-reduce (sum) with gradients: the gradient of a sum used on every rank is the sum of
    the ranks' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def gather_rows(z: torch.Tensor, n_views: int) -> torch.Tensor:
    """All-gather view-major rows WITH gradients: rank r holds rows ``[v*b:(v+1)*b]`` of each
    view v; the result holds every rank's rows of view 0, then of view 1, ... (the layout of one
    process with the global batch)."""
    chunks = z.chunk(n_views) if n_views > 1 else (z,)
    return torch.cat([_AllGatherRows.apply(c) for c in chunks])


def gather_labels(labels: torch.Tensor) -> torch.Tensor:
    """All-gather a rank's labels (no gradients): the global batch's, in rank order."""
    device = labels.device
    comm = labels.to(_comm_device(device))
    out = [torch.empty_like(comm) for _ in range(dist.get_world_size())]
    dist.all_gather(out, comm.contiguous())
    return torch.cat(out).to(device)


def gather_states(state: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Every rank's copy of a same-sized tensor (a generator state), on the CPU."""
    comm = state.to(_comm_device(device))
    out = [torch.empty_like(comm) for _ in range(dist.get_world_size())]
    dist.all_gather(out, comm.contiguous())
    return [t.cpu() for t in out]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (a stop request)."""
    t = torch.tensor([int(flag)], dtype=torch.int32, device=_comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_int(value: int, device: torch.device | None = None) -> int:
    """Rank 0's ``value`` on every rank (what rank 0 decided before training)."""
    comm = _comm_device(device or torch.device("cuda" if dist.get_backend() == "nccl" else "cpu"))
    t = torch.tensor([int(value)], dtype=torch.int64, device=comm)
    dist.broadcast(t, src=0)
    return int(t.item())


# --- the module DDP wraps ----------------------------------------------------------------------


class EmbeddingNet(nn.Module):
    """The training forward: views -> encoder -> the method's embeddings (:meth:`Method.embed`).

    ``encode`` is the encoder to call (``model.encoder`` or its ``torch.compile`` wrapper); it is
    not registered as a submodule, so the parameters are the model's, once.
    """

    def __init__(self, model: nn.Module, method, encode=None) -> None:
        super().__init__()
        self.model = model
        self.method = method
        object.__setattr__(self, "encode", encode if encode is not None else model.encoder)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.method.embed(self.model, self.encode(views))


# --- global batch statistics -------------------------------------------------------------------


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the whole global batch, on any device.

    torch's SyncBatchNorm only runs on accelerators; this one all-reduces the per-channel sums
    (with gradients) -- two small collectives per
    layer: the sum, then the sum of squared deviations from the global mean. Every rank must hold
    the same number of rows (the trainer's equal slices). In eval mode, or outside a process
    group, it is an ordinary BatchNorm. Its state dict is BatchNorm's.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        size = dist.get_world_size()
        if size == 1:
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        xf = x.float()
        n = (x.numel() // x.shape[1]) * size  # equal slices on every rank
        mean = all_reduce(xf.sum(dims)) / n
        centred = xf - mean.view(shape)
        var = all_reduce(centred.square().sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum
                if m is None:  # cumulative moving average
                    m = 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * (n / max(n - 1, 1))
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        return y.to(x.dtype)


def convert_sync_bn(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer normalises with the global batch's statistics: torch's SyncBatchNorm
    on CUDA, :class:`GlobalBatchNorm` elsewhere. Parameter and buffer names are unchanged."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global_bn(module)


def _to_global_bn(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, GlobalBatchNorm
    ):
        out = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_global_bn(child))
    return out
