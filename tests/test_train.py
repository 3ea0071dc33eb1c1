"""The training loop on the fixture: every objective runs, the loss falls, resume is exact."""

from __future__ import annotations

import json

import pytest
import torch

from firmad.config import load_config
from firmad.factory import build_method, build_trainer
from firmad.methods import METHODS
from firmad.training import CheckpointSaver, MetricsLog
from tests.conftest import DSVDD_TINY, sigint_at_call


def _trainer(tmp_path, overrides, name="run"):
    """A trainer with the callbacks of a run directory: the JSONL log and checkpoints."""
    cfg = load_config("fmnist-cpu", overrides)
    run = tmp_path / name
    saver = CheckpointSaver(run)
    trainer = build_trainer(cfg, callbacks=[MetricsLog(run / "metrics.jsonl"), saver])
    trainer.saver = saver
    return trainer


def loss_labels(method, class_ids, kind_ids):
    cfg = load_config("fmnist-cpu", [f"method.name={method}"])
    return build_method(cfg).labels(class_ids, kind_ids)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_objective_trains_two_epochs(tmp_path, tiny, method):
    extra = [f"method.name={method}"]
    if not METHODS[method].uses_outliers:  # Deep SVDD: its own recipe, normals only
        extra = [*DSVDD_TINY, f"method.name={method}", "train.optimizer=adam", "train.lr=0.001"]
    trainer = _trainer(tmp_path, tiny + extra)
    summary = trainer.fit()
    assert summary["epochs"] == 2 and summary["steps"] == 8
    log = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_loss_falls_with_training(tmp_path, tiny):
    # Same batches before and after: the objective on a fixed batch must go down.
    trainer = _trainer(
        tmp_path,
        tiny
        + ["train.epochs=6", "train.steps_per_epoch=10", "train.lr=0.05", "augment.enabled=false"],
    )
    gen_state = trainer.gen.get_state()
    x, c, k = trainer.sample_batch()
    trainer.perm = None
    trainer.gen.set_state(gen_state)

    def fixed_loss():
        trainer.model.eval()
        with torch.no_grad():
            value = float(trainer.compute_loss(x, c, k))
        trainer.model.train()
        return value

    before = fixed_loss()
    trainer.fit()
    assert fixed_loss() < before - 0.05


def test_pool_holds_frozen_rotations(tmp_path, tiny):
    trainer = _trainer(tmp_path, tiny)
    pool = trainer.pool
    assert len(pool.images) == 4 * pool.n_normal  # normals + rot90/180/270 copies
    assert (pool.kind_ids[: pool.n_normal] == 0).all() and (
        pool.class_ids[pool.n_normal :] == -1
    ).all()
    n = pool.n_normal
    assert torch.equal(pool.images[n], torch.rot90(pool.images[0], 1, (1, 2)))
    assert trainer.pool.images.dtype == torch.uint8


def test_fresh_outliers_mix(tmp_path, tiny):
    trainer = _trainer(
        tmp_path, tiny + ["outliers.mode=fresh", "outliers.kinds=[cutpaste, scramble]"]
    )
    x, class_ids, kind_ids = trainer.sample_batch()
    assert x.dtype == torch.float32 and x.shape[1] == 3
    assert set(kind_ids.tolist()) <= {0, 1, 2}
    assert ((kind_ids > 0) == (class_ids == -1)).all()
    trainer.fit()


def test_loss_labels():
    class_ids = torch.tensor([0, 0, -1, -1])
    kind_ids = torch.tensor([0, 0, 1, 3])
    assert loss_labels("firm", class_ids, kind_ids).tolist() == [0, 0, -1, -1]
    assert loss_labels("rotsupcon", class_ids, kind_ids).tolist() == [0, 0, 1, 3]
    assert loss_labels("supcon-binary", class_ids, kind_ids).tolist() == [0, 0, 1, 1]


def test_resume_is_identical_to_an_uninterrupted_run(tmp_path, tiny):
    overrides = tiny + ["train.epochs=3", "train.steps_per_epoch=3"]
    full = _trainer(tmp_path, overrides, "full")
    full.fit()

    # A real SIGINT during step 4 (inside epoch 2): the step finishes, then the run stops.
    part = _trainer(tmp_path, overrides, "part")
    part.train_step = sigint_at_call(part.train_step, 4)
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    meta = json.loads((tmp_path / "part" / "checkpoint.json").read_text())
    assert meta["reason"] == "interrupted" and meta["global_step"] == 4

    resumed = _trainer(tmp_path, overrides, "part")
    assert resumed.saver.restore(resumed)
    assert resumed.global_step == 4 and resumed.epoch == 1 and resumed.step_in_epoch == 1
    resumed.fit()
    for (name, a), b in zip(
        full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_batch_larger_than_data_is_a_clear_error(tmp_path, tiny):
    from firmad.errors import ConfigError

    with pytest.raises(ConfigError, match="batch_size"):
        _trainer(tmp_path, tiny + ["data.max_train=4", "train.batch_size=64"])


def test_outlier_exposure_fills_outlier_slots_with_real_images(tmp_path, tiny):
    import numpy as np

    real = np.full((10, 16, 16, 1), 200, dtype=np.uint8)  # NHWC, one grey level
    np.savez(tmp_path / "oe.npz", images=real, labels=np.zeros(10, dtype=np.int64))
    trainer = _trainer(tmp_path, tiny + [f"outliers.exposure=npz:{tmp_path / 'oe.npz'}"])
    pool = trainer.pool
    outliers = pool.images[pool.n_normal :]
    assert len(outliers) == 3 * pool.n_normal  # one real image per synthetic slot
    assert (outliers == 200).all() and (pool.class_ids[pool.n_normal :] == -1).all()
    trainer.fit()


def test_multi_class_normal_keeps_class_ids(tmp_path, tiny):
    trainer = _trainer(tmp_path, tiny + ["data.normal_class=[0, Trouser]"])
    ids = trainer.pool.class_ids[: trainer.pool.n_normal]
    assert set(ids.tolist()) == {0, 1}  # multi-class FIRM: positives within a class
    trainer.fit()


def test_a_trainer_from_explicit_components_equals_the_factorys(tiny, one_thread):
    """Every component takes plain arguments; `build_trainer` only wires the config into them
    (in the order the numbers rely on), so a trainer built by hand trains identically."""
    from firmad.augment import ViewAugment, ViewSettings
    from firmad.data.pool import build_pool, prepare_images
    from firmad.factory import build_split
    from firmad.hardware import resolve_amp
    from firmad.methods import FIRM
    from firmad.models import HeadSettings, build_backbone, normalisation_for
    from firmad.outliers import parse_outliers
    from firmad.training import OneClassModel, Trainer, TrainSettings

    cfg = load_config("fmnist-cpu", tiny)
    cpu = torch.device("cpu")
    method = FIRM(tau=0.2, loss_mode="pairwise", head=HeadSettings(hidden=64, out_dim=32, depth=2))
    normals = prepare_images(build_split(cfg).train_images, 16)
    ids = torch.zeros(len(normals), dtype=torch.int64)
    kinds = parse_outliers(["rot90", "rot180", "rot270"])
    pool = build_pool(normals, ids, cpu, seed=0, frozen=kinds)
    torch.manual_seed(0)
    mean, std = normalisation_for("fashion-mnist", 3)
    encoder = build_backbone("resnet_small", in_channels=3, width=0.25, mean=mean, std=std)
    model = OneClassModel(encoder, method.build_modules(encoder.feature_dim))
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=3e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.01, total_steps=8, pct_start=0.25, anneal_strategy="cos"
    )
    augment = ViewAugment(size=16, views=ViewSettings(blur_p=0.0))
    amp = resolve_amp("auto", cpu)[0]  # what the recipe's train.amp: auto gives here
    settings = TrainSettings(batch_size=16, epochs=2, seed=0, device=cpu, steps_per_epoch=4,
                             amp=amp, channels_last=True)  # fmt: skip
    by_hand = Trainer(model, method, pool, optimizer, scheduler, augment, (), settings)
    factory = build_trainer(cfg)
    for _ in range(3):
        assert float(by_hand.train_step()) == float(factory.train_step())
