"""What a fitted scorer's number means, in words: the fit report, the serve page and the ONNX
contract all explain a detector's score scale with `score_scale`. Each scorer says what its own
number means (`Scorer.explain_scale`); this module adds the variant and the direction."""

from __future__ import annotations

_VARIANTS = {
    "plain": "The image is scored as it is.",
    "angled": "The score is the mean over the image rotated by 0, 90, 180 and 270 degrees "
    "(one set of normal features per rotation), so the scale is the same.",
    "ensemble": "The score is the mean over {n_crops} random crops at each of the four "
    "rotations, so the scale is the same.",
}


def scale_sentence(scorer, n_bank: int | None = None) -> str:
    """What one fitted scorer's number means, in words (plain text)."""
    words = scorer.explain_scale(n_bank if n_bank is not None else "the")
    if words is None:
        return f"The score of the {scorer.name} scorer; higher = more anomalous."
    return f"The {scorer.name} score is {words}"


def score_scale(det) -> str:
    """The detector's score scale explained: scorer, variant, direction (plain text)."""
    vs = det.scorer_
    text = scale_sentence(vs.per_angle[0], getattr(det, "n_bank_", None))
    variant = _VARIANTS.get(vs.variant, "").format(n_crops=vs.n_crops)
    return f"{text} {variant} Higher = more anomalous.".replace("  ", " ")
