"""Scoring: features (preprocessing + encoder), torch-native scorers, variants, evaluation.

The path: a trained encoder maps the normal training images to a *bank* of features and the
test images to test features; a scorer fitted on the bank scores the test features (higher =
more anomalous). Every scorer is a differentiable torch module (OC-SVMs are fitted by
scikit-learn and evaluated in torch from their support vectors).

Adding a scorer: a module with a `Scorer` subclass decorated with `register_scorer`, and one
import line below (the built-in scorers are registered by importing `scorers`, `rotation` and
`combined`).
A result is named by its `ScorerSpec` (the scorer with every parameter), never by the scorer's
name alone.
"""

from firmad.scoring.banks import bank_crops, bank_subset, extract_banks, kmeans_centroids
from firmad.scoring.combined import MahalanobisRotationScorer
from firmad.scoring.evaluate import (
    VARIANTS,
    ScoreOptions,
    VariantScorer,
    angles_for,
    result_identity,
    row_name,
    score_run,
    scorer_specs,
)
from firmad.scoring.features import (
    ANGLES,
    ExtractOptions,
    FeatureExtractor,
    check_uint8,
    extract_features,
)
from firmad.scoring.rotation import RotationScorer
from firmad.scoring.scorers import (
    SCORERS,
    CentreScorer,
    KdeScorer,
    KnnCosNormScorer,
    KnnCosScorer,
    LogitScorer,
    MahalanobisScorer,
    OcsvmLinearScorer,
    OcsvmRbfScorer,
    Scorer,
    SvddScorer,
    build_scorer,
    knn_similarities,
)
from firmad.scoring.specs import (
    ScorerSpec,
    parse_scorer,
    register_scorer,
    scorer_class,
    scorer_parameters,
    spec_label,
)

__all__ = [
    "ANGLES",
    "SCORERS",
    "VARIANTS",
    "CentreScorer",
    "ExtractOptions",
    "FeatureExtractor",
    "KdeScorer",
    "KnnCosNormScorer",
    "KnnCosScorer",
    "LogitScorer",
    "MahalanobisRotationScorer",
    "MahalanobisScorer",
    "OcsvmLinearScorer",
    "OcsvmRbfScorer",
    "RotationScorer",
    "Scorer",
    "ScoreOptions",
    "ScorerSpec",
    "SvddScorer",
    "VariantScorer",
    "angles_for",
    "bank_crops",
    "bank_subset",
    "build_scorer",
    "check_uint8",
    "extract_banks",
    "extract_features",
    "kmeans_centroids",
    "knn_similarities",
    "parse_scorer",
    "register_scorer",
    "result_identity",
    "row_name",
    "score_run",
    "scorer_class",
    "scorer_parameters",
    "scorer_specs",
    "spec_label",
]
