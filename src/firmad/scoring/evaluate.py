"""Scoring variants and the evaluation loop (features once per rotation, every scorer on them).

A `VariantScorer` is one scorer under one of the paper's variants:

- ``plain`` (s_con): the score at angle 0;
- ``angled`` (s_shift): the mean over the 4 rotations of the score against a bank of features
  at the same rotation (a fitted copy of the scorer per rotation);
- ``ensemble`` (s_ens): ``n_crops`` random crops (scale 0.55-1) x 4 rotations, each scored
  against the bank at that rotation, averaged — stochastic unless its generator is seeded.

`OneClassDetector` and `score_run` (the benchmark) both score through it, so the API and the
tables share one path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from firmad.errors import ConfigError, InputError
from firmad.metrics import evaluate_scores
from firmad.scoring.banks import bank_crops, bank_subset, extract_banks
from firmad.scoring.features import ANGLES, FeatureExtractor, check_uint8, full_precision
from firmad.scoring.scorers import build_scorer
from firmad.scoring.specs import ScorerSpec, parse_scorer, scorer_class

SpecLike = ScorerSpec | str | tuple[str, Mapping[str, Any] | None]

VARIANTS = ("plain", "angled", "ensemble")


def angles_for(variant: str) -> tuple[int, ...]:
    check_variants([variant])
    return (0,) if variant == "plain" else ANGLES


def check_variants(variants: Sequence[str]) -> tuple[str, ...]:
    variants = tuple(variants)
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ConfigError(f"unknown variant(s) {bad}; choose from: {', '.join(VARIANTS)}.")
    return variants


class VariantScorer(nn.Module):
    """A scorer fitted per rotation and combined as the variant says.

    ``scorer``: a `ScorerSpec`, its text (``"knn_cos:k=5"``) or a registered name with
    ``params``; parameters that carry data (`Scorer.data_params`, e.g. a trained centre) are
    passed to the scorer and are no part of its spec."""

    def __init__(
        self, scorer: SpecLike, params: Mapping[str, Any] | None = None,
        variant: str = "plain", n_crops: int = 10,
    ) -> None:  # fmt: skip
        super().__init__()
        self.spec, self.data = _spec_and_data(scorer, params)
        self.name, self.params, self.variant = self.spec.name, self.spec.kwargs, variant
        self.angles = angles_for(variant)
        self.n_crops = int(n_crops)
        if self.n_crops < 1:
            raise ConfigError(f"n_crops must be >= 1, got {n_crops}.")
        self.per_angle = nn.ModuleList(
            build_scorer(self.name, **self.params, **self.data) for _ in self.angles
        )

    @property
    def label(self) -> str:
        """The result label: the spec's canonical string and the variant, e.g.
        ``"knn_cos:k=5 (plain)"``."""
        return f"{self.spec.label} ({self.variant})"

    def result_row(self, metrics: Mapping[str, float]) -> dict[str, Any]:
        """A result row: scorer, its label (`ScorerSpec.label`), every parameter, ``k`` (the
        kNN neighbours as earlier rows had it; None for other scorers), variant, metrics."""
        spec = self.spec
        return {"scorer": spec.name, "label": spec.label, "params": spec.kwargs,
                "k": spec.kwargs.get("k"), "variant": self.variant, **metrics}  # fmt: skip

    @property
    def differentiable(self) -> bool:
        return all(s.differentiable for s in self.per_angle)

    @property
    def bank_angles(self) -> tuple[int, ...]:
        """The rotations whose bank features `fit` needs: all 4 for a scorer fitted on every
        rotation at once (the rotation scorer), else the variant's own."""
        return ANGLES if self.per_angle[0].fits_on_angles else self.angles

    def fit(self, banks: Mapping[int, torch.Tensor], cache: dict | None = None) -> VariantScorer:
        """``banks[angle]``: the normal training features at that rotation. With a ``cache``
        dict, scorers already fitted with the same name and parameters at that angle (by
        another variant) are shared instead of fitted again (OC-SVMs take seconds)."""
        for i, angle in enumerate(self.angles):
            key = (self.spec, angle)
            if cache is not None and not self.data and key in cache:
                self.per_angle[i] = cache[key]
                continue
            if not self.per_angle[i].fits_on_angles:
                self.per_angle[i].fit(banks[angle])
            elif i == 0:
                self.per_angle[i].fit(banks, angle=angle)
            else:  # one classifier of the rotations, read at another angle
                self.per_angle[i] = self.per_angle[0].at_angle(angle)
            if cache is not None and not self.data:
                cache[key] = self.per_angle[i]
        return self

    def combine(self, feats: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Scores from test features: ``feats[angle]`` is (N, D), or (n_crops, N, D) for the
        ensemble variant. Differentiable when the features are."""
        total = None
        for angle, scorer in zip(self.angles, self.per_angle, strict=True):
            f = feats[angle]
            if self.variant == "ensemble":
                s = sum(scorer(c) for c in f) / (f.shape[0] * len(self.angles))
            elif self.variant == "angled":
                s = scorer(f) / len(self.angles)
            else:
                s = scorer(f)
            total = s if total is None else total + s
        return total

    def forward(
        self, extractor: FeatureExtractor, x: torch.Tensor, gen: torch.Generator | None = None
    ) -> torch.Tensor:
        """Differentiable scores of images in [0, 1] through ``extractor``, in float32 even
        under a caller's autocast (`full_precision`)."""
        crops = self.n_crops if self.variant == "ensemble" else None
        feats = {}
        with full_precision(x.device.type):
            for angle in self.angles:
                f = extractor(x, angle=angle, crops=crops, gen=gen)
                feats[angle] = f.reshape(crops, x.shape[0], -1) if crops else f
            return self.combine(feats)


def _spec_and_data(
    scorer: SpecLike, params: Mapping[str, Any] | None
) -> tuple[ScorerSpec, dict[str, Any]]:
    """The spec of a scorer argument (``params`` update it), and the data parameters given."""
    if isinstance(scorer, ScorerSpec):
        return (scorer.replace(**params) if params else scorer), {}
    if isinstance(scorer, tuple):
        scorer, written = scorer
        params = {**(written or {}), **(params or {})}
    elif isinstance(scorer, str) and ":" in scorer:
        scorer, written = parse_scorer(scorer)
        params = {**written, **(params or {})}
    params = dict(params or {})
    data = {key: params.pop(key) for key in scorer_class(scorer).data_params if key in params}
    return ScorerSpec.of(scorer, params), data


def scorer_specs(scorers: Iterable[SpecLike]) -> list[ScorerSpec]:
    """Scorers as normalised specs (from specs, "name:key=value" strings or (name, params)
    pairs); the same scorer twice, however written, is a ConfigError (one row each)."""
    specs = [ScorerSpec.coerce(s) for s in scorers]
    for i, spec in enumerate(specs):
        if spec in specs[:i]:
            raise ConfigError(
                f"scorer {spec.label} is listed twice (as {specs.index(spec) + 1}. and "
                f"{i + 1}.); list each scorer once"
            )
    return specs


def row_name(row: Mapping[str, Any], variant: bool = False) -> str:
    """The label of a result row (its spec's canonical string), with the variant if asked."""
    label = ScorerSpec.from_row(row).label
    return f"{label} ({row.get('variant')})" if variant else label


def result_identity(row: Mapping[str, Any]) -> tuple:
    """What tells result rows apart: the scorer's spec (every parameter) and the variant."""
    return (ScorerSpec.from_row(row), row.get("variant"))


@dataclass(frozen=True)
class ScoreOptions:
    """How `score_run` extracts features and builds the banks.

    ``size``, ``resize_ratio``, ``channels``: the test-time preprocessing (`FeatureExtractor`'s;
    unused when the encoder given is one); ``device``: where the encoder must be (None: where
    it is); ``bank_size``: a subset of the training images drawn from ``seed`` as the bank;
    ``bank_centroids``: that many k-means centroids instead; ``n_crops``: the ensemble's crops
    per image, drawn from ``seed``; ``ensemble_bank="crops"``: the ensemble's bank is
    ``n_crops`` random crops of each bank image (the paper's script: the centre crop);
    ``knn_backend``: for the kNN scorers left at "auto"."""

    batch_size: int = 512
    size: int = 32
    resize_ratio: float = 1.125
    channels: int = 3
    device: str | torch.device | None = None
    n_crops: int = 10
    seed: int = 0
    bank_size: int | None = None
    bank_centroids: int | None = None
    ensemble_bank: str = "centre"
    knn_backend: str = "auto"


def score_run(
    encoder: nn.Module | FeatureExtractor,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    test_labels,
    scorers: Iterable[SpecLike | VariantScorer],
    variants: Sequence[str] = ("plain",),
    options: ScoreOptions | None = None,
    return_details: bool = False,
):
    """Score the test images with every scorer x variant and evaluate the metrics.

    Features are extracted once per rotation (and once for the crops), shared by all scorers.
    ``scorers``: specs (or their text, or (name, params) pairs), each run under every variant;
    fitted `VariantScorer`s among them (a method's own score) are scored as they are, and
    reported first. ``options``: how features and banks are made (`ScoreOptions`).

    Returns rows (`VariantScorer.result_row`); with ``return_details`` ``(rows, details)``:
    ``"scores"`` (label -> np.ndarray), ``"labels"``, ``"test_features"`` (plain, (N, D)).
    """
    o = options or ScoreOptions()
    scorers = list(scorers)
    extra_scorers = [s for s in scorers if isinstance(s, VariantScorer)]
    scorers = [s for s in scorers if not isinstance(s, VariantScorer)]
    batch_size, n_crops, seed = o.batch_size, o.n_crops, o.seed
    variants = check_variants(variants)
    crops_of = {v: bank_crops(v, o.ensemble_bank, n_crops) for v in variants}
    scorers_ = _variant_scorers(scorers, variants, n_crops, o.knn_backend)
    _check_labels([*extra_scorers, *scorers_])
    train_images, test_images = check_uint8(train_images), check_uint8(test_images)
    labels = _labels(test_labels, test_images.shape[0])
    extractor = _extractor(encoder, o.size, o.resize_ratio, o.channels, o.device)
    on_angles = any(vs.bank_angles != vs.angles for vs in scorers_)
    angles = (0,) if variants == ("plain",) and not on_angles else ANGLES
    bank_images = bank_subset(train_images, o.bank_size, seed)
    banks = {  # keyed by crops per image (None: centre crops); only the kinds some variant uses
        c: extract_banks(extractor, bank_images, angles, batch_size, o.bank_centroids, seed, c)
        for c in dict.fromkeys(crops_of.values())
    }  # fmt: skip
    test = {a: extractor.extract(test_images, batch_size, angle=a) for a in angles}
    crops, fitted = {}, {}
    if "ensemble" in variants:
        crops = _test_crops(extractor, test_images, angles, n_crops, batch_size, seed)

    with torch.no_grad():
        for vs in scorers_:  # a scorer is fitted once per bank, shared by the variants
            vs.fit(banks[crops_of[vs.variant]], cache=fitted.setdefault(crops_of[vs.variant], {}))
        results, all_scores = _score_all([*extra_scorers, *scorers_], test, crops, labels)
    if return_details:
        return results, {"scores": all_scores, "labels": labels, "test_features": test[0]}
    return results


def _check_labels(scorers: list[VariantScorer]) -> None:
    """Each result has a label of its own (a method's own score may share a scorer's name)."""
    labels = [vs.label for vs in scorers]
    twice = next((label for i, label in enumerate(labels) if label in labels[:i]), None)
    if twice is not None:
        raise ConfigError(
            f"two results would both be {twice}: the method's own score is one of them; "
            "leave that scorer out of the scorers to evaluate"
        )


def _score_all(scorers: list[VariantScorer], test, crops, labels: np.ndarray):
    """(result rows, scores by result label) of fitted scorers on the test features."""
    results, all_scores = [], {}
    for vs in scorers:
        scores = vs.combine(crops if vs.variant == "ensemble" else test).double().cpu().numpy()
        all_scores[vs.label] = scores
        results.append(vs.result_row(evaluate_scores(labels, scores)))
    return results, all_scores


def _extractor(encoder, size: int, resize_ratio: float, channels: int, device):
    """The encoder with its test-time preprocessing (a `FeatureExtractor` as it is)."""
    extractor = (
        encoder
        if isinstance(encoder, FeatureExtractor)
        else FeatureExtractor(encoder, size, resize_ratio, channels)
    )
    if device is not None and extractor.device.type != torch.device(device).type:
        raise InputError(f"the encoder lives on {extractor.device} but device={device} was given.")
    return extractor


def _test_crops(extractor, test_images, angles, n_crops: int, batch_size: int, seed: int):
    """The ensemble's ``n_crops`` random crops of every test image, per rotation, drawn in
    angle order from seed + 1 (the crops drawn are part of the result)."""
    gen = torch.Generator().manual_seed(seed + 1)
    return {
        a: extractor.extract(test_images, batch_size, angle=a, crops=n_crops, gen=gen)
        for a in angles
    }


def _variant_scorers(scorers, variants, n_crops: int, knn_backend: str) -> list[VariantScorer]:
    """One unfitted `VariantScorer` per scorer x variant; scorers that choose a kNN backend
    and leave it at "auto" get ``knn_backend`` (so it is in their label)."""
    specs = scorer_specs(scorers)
    if not specs:
        raise ConfigError("no scorers given; pass e.g. [('knn_cos', {'k': 5})].")
    if knn_backend != "auto":
        specs = [
            s.replace(knn_backend=knn_backend) if s.kwargs.get("knn_backend") == "auto" else s
            for s in specs
        ]
        scorer_specs(specs)  # two specs may now be one
    return [VariantScorer(spec, None, v, n_crops) for spec in specs for v in variants]


def _labels(test_labels, n_test: int) -> np.ndarray:
    """Test labels (1 = anomaly) as a flat numpy array, one per test image."""
    labels = np.asarray(
        test_labels.detach().cpu().numpy() if hasattr(test_labels, "detach") else test_labels
    ).reshape(-1)
    if labels.shape[0] != n_test:
        raise InputError(
            f"{n_test} test images but {labels.shape[0]} test labels; "
            "pass one label (1 = anomaly) per test image."
        )
    return labels
