"""Scoring: features (preprocessing + encoder), torch-native scorers, variants, evaluation.

The path: a trained encoder maps the normal training images to a *bank* of features and the
test images to test features; a scorer fitted on the bank scores the test features (higher =
more anomalous). Every scorer is a differentiable torch module (OC-SVMs are fitted by
scikit-learn and evaluated in torch from their support vectors).
"""

from firmad.scoring.banks import bank_crops, bank_subset, extract_banks, kmeans_centroids
from firmad.scoring.evaluate import (
    VARIANTS,
    VariantScorer,
    angles_for,
    result_identity,
    score_run,
    scorer_specs,
)
from firmad.scoring.features import ANGLES, FeatureExtractor, check_uint8, extract_features
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
    result_keys_of,
    result_name,
    row_name,
)
from firmad.scoring.specs import parse_scorer

__all__ = [
    "ANGLES",
    "SCORERS",
    "VARIANTS",
    "CentreScorer",
    "FeatureExtractor",
    "KdeScorer",
    "KnnCosNormScorer",
    "KnnCosScorer",
    "LogitScorer",
    "MahalanobisScorer",
    "OcsvmLinearScorer",
    "OcsvmRbfScorer",
    "Scorer",
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
    "result_identity",
    "result_keys_of",
    "result_name",
    "row_name",
    "score_run",
    "scorer_specs",
]
