"""The engine and the model keep the numbers: a detector fitted through OneClassDetector ->
Engine -> AnomalyModel scores exactly as the pieces assembled by hand the way firmad did
before (override strings, the same seeded split, trainer, bank and scorer), in one process;
the benchmark's evaluation is the same call; a step budget trains exactly that many steps."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import yaml

from firmad.anomaly_model import AnomalyModel
from firmad.config import AugmentConfig, load_config
from firmad.data.pool import prepare_images
from firmad.detector import OneClassDetector
from firmad.engine import Engine, image_stats
from firmad.factory import build_extractor, build_trainer
from firmad.fitting import FitOptions, detector_for_fit
from firmad.scoring import ScoreOptions, VariantScorer, bank_subset, extract_banks, score_run
from tests.test_detector import TRAIN, split  # noqa: F401  (module fixture)


def _old_fit_by_hand(images: torch.Tensor, holdout: float, scorer: str, k: int):
    """Before the engine: the config from "a.b=c" strings, the seeded held-out draw, the
    trainer, the extractor and the scorer fitted on the training images' bank."""
    from firmad.engine import _train_only_split  # the same empty-test split as before

    cfg = load_config("fmnist-cpu", ["data.dataset=custom", *TRAIN])
    if images.shape[1] == 3 and cfg.data.channels == 1:
        cfg.data.channels = 3
    n = len(images)
    n_held = int(round(holdout * n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.train.seed))
    train = images[order[n_held:].sort().values]
    trainer = build_trainer(
        cfg, split=_train_only_split(train, "custom"), normalisation=image_stats(train)
    )
    trainer.fit()
    model = trainer.model.to(memory_format=torch.contiguous_format).eval()
    extractor = build_extractor(cfg, model.encoder)
    vs = VariantScorer(scorer, {"k": k}, "plain", cfg.eval.n_crops)
    bank = bank_subset(prepare_images(train, cfg.data.size), None, cfg.train.seed)
    e = cfg.eval
    seed = cfg.train.seed
    vs.fit(extract_banks(extractor, bank, vs.angles, e.batch_size, e.bank_centroids, seed))
    return cfg, model, extractor, vs


def test_the_detector_scores_as_the_pieces_assembled_by_hand(split):  # noqa: F811
    images = split.train_images
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = OneClassDetector(overrides=TRAIN, holdout=0.3, target_fpr=0.1).fit(images)
        cfg, model, extractor, vs = _old_fit_by_hand(images, 0.3, "knn_cos", 5)
    assert det.config_ == cfg  # typed settings give the config the strings gave
    x = split.test_images
    with torch.no_grad():
        old = vs(extractor, x.float() / 255).double().numpy()
    np.testing.assert_array_equal(det.decision_function(x), old)
    # and the AnomalyModel is what persistence, export and attacks take
    assert isinstance(det.anomaly_model_, AnomalyModel)
    np.testing.assert_array_equal(det.anomaly_model_.score_images(x), old)
    assert det.attack_modules() == det.anomaly_model_.attack_modules()
    t = det.anomaly_model_.score_tensor(x[:4].float() / 255)
    np.testing.assert_allclose(t.detach().numpy(), old[:4], atol=1e-6)


def test_the_engine_evaluates_as_score_run(split):  # noqa: F811
    """`pipeline` evaluates runs with Engine.evaluate: the benchmark's score_run, called as
    the detector called it before."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = OneClassDetector(overrides=TRAIN, holdout=0).fit(split.train_images)
    cfg, e = det.config_, det.config_.eval
    args = (split.train_images, split.test_images, split.test_labels)
    rows, details = Engine(cfg).evaluate(det.model_, *args, ["knn_cos:k=5", "kde"], ["plain"])
    old_rows, old_details = score_run(
        build_extractor(cfg, det.model_.encoder),
        prepare_images(split.train_images, cfg.data.size),
        prepare_images(split.test_images, cfg.data.size),
        split.test_labels, scorers=["knn_cos:k=5", "kde"], variants=["plain"],
        options=ScoreOptions(
            batch_size=e.batch_size, n_crops=e.n_crops, seed=cfg.train.seed,
            bank_size=e.bank_size, bank_centroids=e.bank_centroids,
            ensemble_bank=e.ensemble_bank,
        ), return_details=True,
    )  # fmt: skip
    assert rows == old_rows
    for label, scores in old_details["scores"].items():
        np.testing.assert_array_equal(details["scores"][label], scores)


def test_a_step_budget_trains_exactly_that_many_steps(split):  # noqa: F811
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = OneClassDetector(overrides=TRAIN, steps=6, holdout=0).fit(split.train_images[:64])
    t = det.config_.train
    assert t.epochs * t.steps_per_epoch == 6 and t.steps_per_epoch <= 4  # TRAIN caps at 4
    with pytest.raises(ValueError, match="epochs or steps"):
        OneClassDetector(overrides=TRAIN, steps=6, epochs=2).fit(split.train_images)


def test_the_default_budget_never_replaces_one_the_user_set(monkeypatch):
    from firmad import fitting

    monkeypatch.setattr(fitting, "DEFAULT_STEPS", 123)
    monkeypatch.setattr(fitting, "QUICK_STEPS", 7)
    assert fitting.training_steps(FitOptions()) == 123
    assert fitting.training_steps(FitOptions(quick=True)) == 7
    assert fitting.training_steps(FitOptions(steps=5)) == 5
    assert fitting.training_steps(FitOptions(epochs=2)) is None  # the epochs asked for
    for chosen in (["train.epochs=2"], ["train.steps_per_epoch = 4"], TRAIN):
        assert fitting.training_steps(FitOptions(overrides=list(chosen))) is None, chosen
    assert fitting.training_steps(FitOptions(overrides=["train.lr=0.1"])) == 123


def test_fit_trains_its_default_recipe_with_its_own_crops_and_never_over_the_users():
    """`fit`'s milder random crops (DEFAULT_OVERRIDES) apply to its default recipe; a
    --set augment.scale=... replaces them, and a recipe named with --config is trained as
    written."""
    from firmad import fitting

    own = fitting.DEFAULT_OVERRIDES[0].split("=", 1)[1]
    default = detector_for_fit(FitOptions(overrides=TRAIN)).check_params()
    assert default.augment.scale == yaml.safe_load(own) != AugmentConfig().scale
    mine = detector_for_fit(FitOptions(overrides=[*TRAIN, "augment.scale=[0.3,0.9]"]))
    assert mine.check_params().augment.scale == [0.3, 0.9]
    named = detector_for_fit(FitOptions(recipe="fmnist-cpu", overrides=TRAIN)).check_params()
    assert named.augment.scale == load_config("fmnist-cpu").augment.scale == [0.25, 1.0]


def test_fit_options_keep_todays_budget_with_quick():
    quick = detector_for_fit(FitOptions(overrides=TRAIN, quick=True))
    default = detector_for_fit(FitOptions(overrides=TRAIN))
    assert quick.steps is None and quick.epochs == default.epochs == 1  # the recipe's epochs
    assert detector_for_fit(FitOptions(overrides=TRAIN, steps=1500)).steps == 1500
    for bad in (
        {"quick": True, "steps": 5},
        {"quick": True, "epochs": 2},
        {"steps": 5, "epochs": 2},
    ):
        with pytest.raises(ValueError, match="steps"):
            detector_for_fit(FitOptions(overrides=TRAIN, **bad))


def test_user_errors_are_value_errors():
    from firmad.errors import CheckpointError, ConfigError, DataError, FirmadError, InputError

    for cls in (ConfigError, InputError, DataError):
        assert issubclass(cls, ValueError) and issubclass(cls, FirmadError)
    assert not issubclass(CheckpointError, ValueError)  # a damaged file is not a wrong value
    with pytest.raises(ValueError, match="contamination"):
        OneClassDetector(contamination=2.0).fit(np.zeros((4, 8, 8), dtype=np.uint8))


def test_the_estimator_and_its_typed_parameters_agree():
    import inspect

    from firmad.detector_params import DetectorParams

    signature = inspect.signature(OneClassDetector.__init__).parameters
    fields = DetectorParams.model_fields
    assert list(signature)[1:] == list(fields)
    assert {n: p.default for n, p in signature.items() if n != "self"} == {
        n: f.default for n, f in fields.items()
    }
