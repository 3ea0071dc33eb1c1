"""Several models trained in one process, one step of each in turn."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from firmad.errors import ConfigError
from firmad.training.trainer import Trainer, TrainingInterrupted, deferred_signals


def fit_together(trainers: list[Trainer]) -> list[dict[str, Any]]:
    """Train several models in one process, one step of each in turn; their summaries.

    Each model's numbers are those of its own ``fit()``: the trainers share nothing (each has
    its own generator, pool, model and optimiser). On CUDA each trainer queues its work on a
    stream of its own, so several small models keep one GPU busy where one alone leaves it
    waiting on kernel launches (with ``train.cuda_graph`` each replays its own graph). An
    epoch's ``views_per_s`` is then the model's share. Ctrl-C / SIGTERM: every unfinished
    trainer saves (``on_interrupt``), then `TrainingInterrupted`. One process only.
    """
    if any(t.world.distributed for t in trainers):
        raise ConfigError("training several models together runs in one process, not torchrun")
    streams = [_own_stream(t) for t in trainers]
    for t, stream in zip(trainers, streams, strict=True):
        with _on_stream(stream):
            t._fit_begin()
    with deferred_signals() as stop:
        while not all(t.finished for t in trainers):
            for t, stream in zip(trainers, streams, strict=True):
                if not t.finished:
                    with _on_stream(stream):
                        t._fit_step()
            if stop.requested:
                _join(trainers, streams)  # saves read the weights on the default stream
                for t in trainers:
                    if not t.finished:
                        t._fit_interrupt()
                raise TrainingInterrupted(stop.requested, max(t.global_step for t in trainers))
        _join(trainers, streams)  # the final saves and the caller's evaluation come after
        return [t._fit_end() for t in trainers]  # final saves, with signals still deferred


def _join(trainers: list[Trainer], streams: list) -> None:
    """The default stream waits for each trainer's stream (CUDA)."""
    for t, stream in zip(trainers, streams, strict=True):
        if stream is not None:
            torch.cuda.current_stream(t.device).wait_stream(stream)


def _own_stream(trainer: Trainer):
    if trainer.device.type != "cuda":
        return None
    stream = torch.cuda.Stream(trainer.device)
    stream.wait_stream(torch.cuda.current_stream(trainer.device))  # the pool and weights
    return stream


def _on_stream(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
