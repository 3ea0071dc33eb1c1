"""What every scorer is: the `Scorer` base class, and the tensor helpers scorers share.

A scorer in a module of its own imports this module and `firmad.scoring.specs` (for
`register_scorer`), never the module of the built-in scorers, so registering it makes no
import cycle.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from firmad.errors import ConfigError, InputError
from firmad.scoring.specs import ScorerSpec, scorer_parameters, scorer_signature

# Bound on the (test chunk x bank) similarity matrix held at once: 64M elements.
MAX_CHUNK_ELEMENTS = 64 * 1024 * 1024
KNN_BACKENDS = ("auto", "faiss", "torch")


def tracing() -> bool:
    """True while torch.export / torch.compile / jit trace the code: no data-dependent checks."""
    c = torch.compiler
    return c.is_compiling() or c.is_exporting() or torch.jit.is_tracing()


def as_features(x, what: str = "features") -> torch.Tensor:
    """Features as a float tensor (N, D) on their device, checked (no NaN, N >= 1)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{what} must be a torch tensor or numpy array, got {type(x).__name__}.")
    if not x.is_floating_point():
        x = x.float()
    if x.dim() == 1:
        x = x[:, None]
    if x.dim() != 2 or x.shape[0] == 0:
        raise InputError(f"{what} must have shape (N, D) with N >= 1, got {tuple(x.shape)}.")
    if not tracing() and not torch.isfinite(x.detach()).all():
        raise InputError(f"{what} contain NaN or infinite values; the model may have diverged.")
    return x


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1, eps=1e-12)


def row_chunks(x: torch.Tensor, bank_rows: int) -> list[torch.Tensor]:
    """Row chunks of ``x`` so that (chunk x bank) stays bounded in memory; one chunk when
    tracing (an exported graph keeps its batch dimension free)."""
    if tracing():
        return [x]
    return list(x.split(max(1, MAX_CHUNK_ELEMENTS // max(1, bank_rows))))


def faiss_or_none():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def knn_similarities(
    bank_n: torch.Tensor, queries_n: torch.Tensor, k: int, backend: str = "auto"
) -> torch.Tensor:
    """Top-``k`` inner products (cosine similarities for normalised inputs), (N, k), descending.

    ``backend``: "torch" (exact chunked matmul + topk, differentiable), "faiss" (exact
    IndexFlatIP, no gradient) or "auto" (faiss when importable and no gradient is needed).
    """
    if backend not in KNN_BACKENDS:
        raise ConfigError(f"knn_backend must be 'auto', 'faiss' or 'torch', got {backend!r}.")
    if not 1 <= k <= bank_n.shape[0]:
        raise InputError(
            f"k={k} nearest neighbours requested but the bank has {bank_n.shape[0]} features; "
            "use a smaller k or a larger bank."
        )
    faiss = faiss_or_none() if backend in ("auto", "faiss") else None
    if backend == "faiss" and faiss is None:
        raise ConfigError("knn_backend='faiss' but faiss is not installed; pip install faiss-cpu.")
    needs_grad = torch.is_grad_enabled() and queries_n.requires_grad
    if faiss is not None and not needs_grad and not tracing():
        index = faiss.IndexFlatIP(bank_n.shape[1])
        index.add(bank_n.detach().to("cpu", torch.float32).numpy())
        sims, _ = index.search(queries_n.detach().to("cpu", torch.float32).numpy(), k)
        return torch.from_numpy(sims).to(queries_n.device)
    chunks = row_chunks(queries_n, bank_n.shape[0])
    return torch.cat([torch.topk(q @ bank_n.T, k, dim=1).values for q in chunks])


class Scorer(nn.Module):
    """Base class. Subclasses set ``name``, list their fitted buffers in ``fitted``, implement
    ``fit`` and ``forward``, and say what their number means in `explain_scale`; the class
    decorator `firmad.scoring.specs.register_scorer` registers one by its name.

    Parameters are the constructor's keyword arguments, each stored as the attribute of the
    same name (`get_params`); the constructor refuses values out of range with a ConfigError
    (`ScorerSpec` builds one to check a spec). ``label_keys``: parameters shown in result
    labels even at their default (kNN's k). ``data_params``: constructor arguments that carry
    data (a trained centre, a classifier's weights), not settings: they are no part of the spec.
    """

    name = "scorer"
    fitted: tuple[str, ...] = ()
    differentiable = True
    label_keys: tuple[str, ...] = ()
    data_params: tuple[str, ...] = ()
    # True: fitted on the features of every rotation at once, `fit(banks, angle=...)` (the
    # rotation scorer); `VariantScorer` then extracts all 4 rotations whatever the variant.
    fits_on_angles = False

    def __init__(self) -> None:
        super().__init__()
        for key in self.fitted:
            self.register_buffer(key, None)

    # --- parameters and fitted state (for saving a detector) ---------------------------------

    def get_params(self) -> dict[str, Any]:
        """The scorer's settings (its spec's parameters), by name."""
        return {key: getattr(self, key) for key in scorer_signature(type(self))}

    @property
    def spec(self) -> ScorerSpec:
        """This scorer's identity: its name and parameters."""
        return ScorerSpec(self.name, tuple(self.get_params().items()))

    def explain_scale(self, n_bank: int | str) -> str | None:
        """What the fitted scorer's number means, as the end of a sentence that begins "The
        <name> score is ..." (``n_bank``: normal training images in the bank, or "the");
        None: the generic words."""
        return None

    def fitted_state(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        return {k: getattr(self, k) for k in self.fitted}

    def load_fitted(self, tensors: dict[str, torch.Tensor], where: str = "scorer") -> Scorer:
        """Restore ``fitted_state()``; missing or extra keys are an InputError naming them."""
        missing = sorted(set(self.fitted) - set(tensors))
        extra = sorted(set(tensors) - set(self.fitted))
        if missing or extra:
            raise InputError(f"{where}: {self.name} expects {list(self.fitted)}, missing "
                             f"{missing}, unexpected {extra}.")  # fmt: skip
        for k in self.fitted:
            setattr(self, k, tensors[k])
        return self

    # --- scoring -----------------------------------------------------------------------------

    def fit(self, bank) -> Scorer:
        raise NotImplementedError

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        for b in self.buffers():
            return b.dtype
        return torch.float64

    def prepare(self, features) -> torch.Tensor:
        """Checked features in the scorer's dtype and on its device."""
        self._check_fitted()
        x = as_features(features)
        ref = next(iter(self.buffers()), None)
        return x.to(ref.device if ref is not None else x.device, self.dtype)

    def score(self, features) -> np.ndarray:
        """Scores of a batch of features, no gradient, as float64 numpy."""
        with torch.no_grad():
            return self(features).double().cpu().numpy()

    def _check_fitted(self) -> None:
        if any(getattr(self, k) is None for k in self.fitted):
            raise InputError(f"{self.name} scorer is not fitted; call fit(bank_features) first.")

    def _check_dim(self, x: torch.Tensor, d: int) -> None:
        if x.shape[1] != d:
            raise InputError(
                f"{self.name}: features have {x.shape[1]} dimensions but the bank has {d}; "
                "score with features from the same encoder."
            )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())


__all__ = [
    "KNN_BACKENDS",
    "Scorer",
    "as_features",
    "faiss_or_none",
    "knn_similarities",
    "l2_normalise",
    "row_chunks",
    "scorer_parameters",
    "tracing",
]
