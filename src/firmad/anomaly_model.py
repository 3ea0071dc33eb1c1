"""`AnomalyModel`: preprocessing + encoder + fitted scorer, images in [0, 1] -> anomaly scores.

The one object that files (`firmad.persistence`), ONNX (`firmad.export`) and attacks take: an
``nn.Module`` whose ``forward`` is differentiable w.r.t. the pixels. Resizing, the grey-to-RGB
repeat, the test transform and normalisation happen inside (`FeatureExtractor`), so every user
of it sees the same input space. The trained network is frozen (no parameter takes gradient).

Attacks see it through ``score_tensor`` + ``attack_modules()`` (firmad.robustness.attacks).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from firmad.errors import InputError
from firmad.factory import build_extractor
from firmad.inputs import check_unit_range, to_batch
from firmad.scoring import VariantScorer
from firmad.scoring.features import eval_mode

CHUNK = 256  # images per forward pass when scoring
DEGENERATE_SPREAD = 1e-4  # rows this close to their mean (relative to their norm) are one point


class AnomalyModel(nn.Module):
    """A trained network's encoder with its preprocessing, and a scorer fitted on the
    features of normal images.

    network: the trained model (its ``encoder`` gives the features; frozen here); config: the
    RunConfig it was trained with (size, channels, test transform, seed); scorer: a fitted
    `VariantScorer`; input_shape: (C, H, W) of the images it was fitted on; input_layout:
    "NCHW" or "NHWC", how they came; n_bank: how many normal images the scorer's bank holds.
    """

    def __init__(self, network: nn.Module, config, scorer: VariantScorer,
                 input_shape: tuple[int, int, int], input_layout: str = "NCHW",
                 n_bank: int = 0) -> None:  # fmt: skip
        super().__init__()
        for p in network.parameters():
            p.requires_grad_(False)  # gradients of its scores reach the pixels only
            p.grad = None  # the last training step's gradients
        self.network = network.eval()
        self.config = config
        self.extractor = build_extractor(config, network.encoder)
        self.scorer = scorer.to(self.extractor.device)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.input_layout = input_layout
        self.n_bank = int(n_bank)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.extractor.device

    def forward(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Anomaly scores (N,) of float images in [0, 1], (N, C, H, W) or (N, H, W, C) (read
        by the channel axis), any size; differentiable w.r.t. ``x``."""
        x, _ = to_batch(x)
        with eval_mode(self.extractor):
            return self.scorer(self.extractor, x.to(self.device), gen=gen)

    def score_tensor(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """`forward` after checking the input (a float tensor of 4 dimensions in [0, 1])."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
            raise InputError(
                "score_tensor expects a float tensor of 4 dimensions with values in [0, 1]; "
                "convert uint8 images with x.float() / 255"
            )
        check_unit_range(x)
        return self(x, gen=gen)

    def score_images(self, images: torch.Tensor) -> np.ndarray:
        """Scores of uint8 images (N, C, H, W), float64, no gradient; the ensemble's crops are
        drawn from a fixed seed, so the same images always get the same scores."""
        gen = torch.Generator().manual_seed(self.config.train.seed + 1)
        out = []
        with torch.no_grad():
            for chunk in images.split(CHUNK):
                x = chunk.to(self.device).float().div_(255.0)
                out.append(self.scorer(self.extractor, x, gen=gen).double().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float64)

    def attack_modules(self) -> list[nn.Module]:
        """The modules an attack puts in eval mode: the feature extractor and the scorer."""
        return [self.extractor, self.scorer]

    def surrogate_scores(self) -> dict[str, SurrogateScore]:
        """Smooth score functions of the same model, for attacks: a kNN score passes gradient
        only to the current neighbours, so KDE and the distance to the mean normal feature
        (fitted on the same bank) are offered beside it. Empty for other scorers."""
        first = self.scorer.per_angle[0]
        if not hasattr(first, "bank_") or self.scorer.name == "kde":
            return {}
        banks = {a: s.bank_ for a, s in zip(self.scorer.angles, self.scorer.per_angle, strict=True)}
        out = {}
        for name in ("kde", "centre"):
            vs = VariantScorer(name, {}, self.scorer.variant, self.scorer.n_crops).fit(banks)
            out[name] = SurrogateScore(self.extractor, vs.to(self.device))
        return out


class SurrogateScore:
    """A surrogate score function: the model's preprocessing and encoder, another scorer."""

    def __init__(self, extractor: nn.Module, scorer: VariantScorer) -> None:
        self.extractor, self.scorer = extractor, scorer

    def attack_modules(self) -> list[nn.Module]:
        return [self.extractor, self.scorer]

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        x, _ = to_batch(x)
        with eval_mode(self.extractor):
            return self.scorer(self.extractor, x.to(self.extractor.device), gen=gen)


def is_degenerate(t: torch.Tensor) -> bool:
    """All zero, or (2-d) every row (nearly) the same point: no spread to score against."""
    if t.numel() >= 2 and not t.any():
        return True
    if t.dim() != 2 or t.shape[0] < 2:
        return False
    x = t.double()
    spread = (x - x.mean(dim=0)).norm()
    return bool(spread <= DEGENERATE_SPREAD * x.norm())
