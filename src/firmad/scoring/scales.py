"""What a fitted scorer's number means, in words: the fit report, the serve page and the ONNX
contract all explain a detector's score scale with `score_scale`."""

from __future__ import annotations

import numpy as np


def _scale_knn_cos(s, n_bank) -> str:
    return (
        f"minus the mean cosine similarity between the image's feature vector and its {s.k} "
        f"most similar features among the {n_bank} normal training images. It lies between "
        "-1 and 1: about -1 means the image's features point the same way as its nearest "
        "normals (very like the normals), 0 means unrelated features, and anything higher is "
        "less like the normals. Small steps matter: a move from -0.99 to -0.90 is large."
    )


def _scale_knn_cos_norm(s, n_bank) -> str:
    return (
        f"minus the mean cosine similarity to the {s.k} most similar of the {n_bank} normal "
        "training features, times the length of the image's feature vector (CSI's score). It "
        "has no fixed range: it is negative for images like the normals, and its size grows "
        "with the feature length, so read it against this detector's own held-out scores."
    )


def _scale_kde(s, n_bank) -> str:
    gamma = float(s.gamma_)
    bonus = float(np.log(max(int(s.bank_.shape[0]), 1))) / gamma
    return (
        f"minus a soft maximum of the cosine similarities to all {s.bank_.shape[0]} normal "
        f"training features, -(1/g) log sum exp(g cos), with g = {gamma:.3g}. It behaves like "
        "minus the highest cosine similarity, lowered by up to log(n)/g = "
        f"{bonus:.3g} when many normals are close, so it lies between {-1 - bonus:.3g} (very "
        "like many normals) and 1 (unlike all of them)."
    )


def _scale_centre(s, n_bank) -> str:
    return (
        "minus the cosine similarity between the image's feature vector and the mean "
        f"direction of the {n_bank} normal training features: -1 points exactly along the "
        "normal mean, 0 is unrelated, 1 is the opposite direction."
    )


def _scale_mahalanobis(s, n_bank) -> str:
    d = int(s.location_.shape[0])
    kind = "L2-normalised features" if s.normalize else "features"
    return (
        f"the squared Mahalanobis distance of the image's {kind} to the mean of the "
        f"{n_bank} normal training features, with their (Ledoit-Wolf shrunk) covariance. 0 is "
        f"the normal mean; there is no upper bound; if the features were Gaussian, normal "
        f"images would average about d = {d} (the feature dimension)."
    )


def _scale_ocsvm(s, n_bank) -> str:
    return (
        f"minus the decision function of a one-class SVM ({s.kernel} kernel, nu = {s.nu:.3g}) "
        "fitted on the L2-normalised normal training features: negative inside the region the "
        "SVM learnt as normal, positive outside it; 0 is the SVM's own boundary, outside which "
        f"about {100 * s.nu:.0f} % of the training normals lie."
    )


def _scale_svdd(s, n_bank) -> str:
    return (
        "the squared Euclidean distance of the image's feature vector to the Deep SVDD centre "
        "(the network was trained to pull normal features onto it): 0 is the centre, there is "
        "no upper bound, and the unit is the feature space's own."
    )


def _scale_logit(s, n_bank) -> str:
    which = "normal, negated" if s.negate else "outlier"
    return (
        f"the logit (log-odds) of the classifier trained to tell normal images from synthetic "
        f"outliers, for the class {which}: 0 is even odds, +2 is about 88 % outlier, negative "
        "values look normal to the classifier."
    )


# scorer name -> sentence saying what its number means (fitted scorer, bank size)
SCORE_SCALES = {
    "knn_cos": _scale_knn_cos,
    "knn_cos_norm": _scale_knn_cos_norm,
    "kde": _scale_kde,
    "centre": _scale_centre,
    "mahalanobis": _scale_mahalanobis,
    "ocsvm_rbf": _scale_ocsvm,
    "ocsvm_linear": _scale_ocsvm,
    "svdd": _scale_svdd,
    "logit": _scale_logit,
}
_VARIANTS = {
    "plain": "The image is scored as it is.",
    "angled": "The score is the mean over the image rotated by 0, 90, 180 and 270 degrees "
    "(one set of normal features per rotation), so the scale is the same.",
    "ensemble": "The score is the mean over {n_crops} random crops at each of the four "
    "rotations, so the scale is the same.",
}


def scale_sentence(scorer, n_bank: int | None = None) -> str:
    """What one fitted scorer's number means, in words (plain text)."""
    n = n_bank if n_bank is not None else "the"
    explain = SCORE_SCALES.get(scorer.name)
    if explain is None:
        return f"The score of the {scorer.name} scorer; higher = more anomalous."
    return f"The {scorer.name} score is " + explain(scorer, n)


def score_scale(det) -> str:
    """The detector's score scale explained: scorer, variant, direction (plain text)."""
    vs = det.scorer_
    text = scale_sentence(vs.per_angle[0], getattr(det, "n_bank_", None))
    variant = _VARIANTS.get(vs.variant, "").format(n_crops=vs.n_crops)
    return f"{text} {variant} Higher = more anomalous.".replace("  ", " ")
