"""Size and cost of a network: parameters and FLOPs per image (torch's own FLOP counter)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def complexity(module: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, int]:
    """``{"params": ..., "flops": ...}``: parameter count and FLOPs of one forward pass on one
    image of ``input_shape`` (C, H, W) (a multiply-add counts as 2 FLOPs), in eval mode."""
    params = sum(p.numel() for p in module.parameters())
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        x = torch.zeros(1, *input_shape, device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
    finally:
        for m, mode in modes:
            m.training = mode
    return {"params": int(params), "flops": int(counter.get_total_flops())}
