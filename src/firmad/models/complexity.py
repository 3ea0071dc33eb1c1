"""Size and cost of a model: parameters and FLOPs per image (torch's own FLOP counter)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def complexity(module: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """``{"params", "flops"}`` of ``module``: its parameter count, and the FLOPs of one forward
    pass on one image of ``input_shape`` (C, H, W), counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add is 2 FLOPs; convolutions and
    matrix products only, so normalisation and activations are not counted). The module's
    train/eval flag is restored; nothing is learned or changed."""
    params = sum(p.numel() for p in module.parameters())
    try:
        device = next(module.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    x = torch.zeros(1, *input_shape, device=device)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
    finally:
        module.train(was_training)
    return {"params": int(params), "flops": int(counter.get_total_flops())}
