"""The sync-free training step (what `train.cuda_graph` captures) computes what the eager step
computes; several one-class models trained together equal each trained alone."""

from __future__ import annotations

import pytest
import torch

from firmad.augment import ViewAugment, ViewSettings
from firmad.config import load_config
from firmad.errors import ConfigError
from firmad.factory import build_trainer

# Two epochs of 3 steps: an epoch boundary (a new permutation) and the OneCycle warm-up, with
# jitter, blur and flips all on. A small learning rate: at 0.01 this tiny net amplifies rounding
# differences (another summation order) to 5e-4 within 3 steps.
STEPS = [
    "train.lr=0.001",
    "train.epochs=2",
    "train.steps_per_epoch=3",
    "train.threads=1",
    "augment.blur_p=0.75",
    "augment.hflip_p=0.5",
    "augment.jitter_p=0.8",
]


@pytest.mark.parametrize("C", [1, 3])
def test_device_view_parameters_equal_the_host_ones(C):
    aug = ViewAugment(
        size=16,
        views=ViewSettings(hflip_p=0.5, grayscale_p=0.3, jitter_p=0.7, ratio=(0.75, 1.33)),
    )
    x = torch.rand(9, C, 20, 20)
    g_host, g_dev = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(3):
        params, order = aug.sample_params(tuple(x.shape), g_host)
        params_dev, slots = aug.sample_params_device(tuple(x.shape), g_dev)
        assert torch.equal(params, params_dev)
        assert torch.equal(
            aug.apply_params(x, params, order), aug.apply_params_slots(x, params, slots)
        )


@pytest.mark.numeric
def test_sync_free_step_gives_the_eager_weights(tiny, one_thread):
    """Same process, same kernels: on the CPU the sync-free step is the eager step bit for bit
    (losses, weights, BatchNorm statistics and SGD's momentum buffers), on every ISA. A
    tolerance would not do: a last-bit difference in one update moves a ReLU input near zero
    to its other side a few steps later, and the gradients then differ by 1e-2."""
    cfg = load_config("fmnist-cpu", [*tiny, *STEPS, "train.amp=none"])
    eager, sync_free = build_trainer(cfg), build_trainer(cfg)
    sync_free.enable_sync_free()
    for step in range(6):
        a, b = eager.train_step(), sync_free.train_step()
        assert torch.equal(a, b), f"step {step}: loss {float(a)!r} vs {float(b)!r}"
    for (name, a), b in zip(
        eager.model.state_dict().items(), sync_free.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    # The optimiser state is SGD's, so checkpoints and resuming are the eager step's.
    for i, (a, b) in enumerate(
        zip(eager.model.parameters(), sync_free.model.parameters(), strict=True)
    ):
        m_eager = eager.optimizer.state[a]["momentum_buffer"]
        assert torch.equal(sync_free.optimizer.state[b]["momentum_buffer"], m_eager), i


@pytest.mark.numeric
@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_sync_free_update_is_sgds_bit_for_bit(weight_decay):
    """The sync-free SGD update equals torch.optim.SGD's on the same gradients, exactly; a
    parameter without a gradient is left alone, as SGD leaves it."""
    from types import SimpleNamespace

    from firmad.training.sync_free import SyncFreeStep

    gen = torch.Generator().manual_seed(0)
    shapes = [(37,), (8, 3, 3, 3), (5,), (64, 33)]
    ref = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    mine = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    sgd = torch.optim.SGD(ref, lr=0.1, momentum=0.9, weight_decay=weight_decay)
    host = SimpleNamespace(optimizer=SimpleNamespace(param_groups=sgd.param_groups))
    sf = {
        "params": mine,
        "bufs": [torch.zeros_like(p) for p in mine],
        "neg_lr": torch.zeros(()),
        "momentum": torch.zeros(()),
    }
    for step, lr in enumerate((0.1, 0.0137, 0.3)):
        sgd.param_groups[0].update(lr=lr, momentum=0.85 + 0.05 * step)
        for j, (a, b) in enumerate(zip(ref, mine, strict=True)):
            g = None if j == 2 else torch.randn(a.shape, generator=gen)  # j=2: never a gradient
            a.grad, b.grad = g, None if g is None else g.clone()
        sgd.step()
        sf["neg_lr"].fill_(-lr)
        sf["momentum"].fill_(sgd.param_groups[0]["momentum"])
        with torch.no_grad():
            SyncFreeStep._sgd_update(host, sf)
        for a, b in zip(ref, mine, strict=True):
            assert torch.equal(a, b)
        for a, buf in zip(ref, sf["bufs"], strict=True):
            if a in sgd.state:
                assert torch.equal(sgd.state[a]["momentum_buffer"], buf)
    assert not sf["bufs"][2].any()


def test_cuda_graph_is_a_clear_error_without_cuda(tiny):
    with pytest.raises(ConfigError, match="CUDA"):
        load_config("fmnist-cpu", tiny + ["train.cuda_graph=true"])  # device=cpu
    if not torch.cuda.is_available():
        cfg = load_config("fmnist-cpu", [*tiny, "train.device=auto", "train.cuda_graph=true"])
        with pytest.raises(ConfigError, match="CUDA device"):
            build_trainer(cfg)
    trainer = build_trainer(load_config("fmnist-cpu", tiny + ["outliers.mode=fresh"]))
    with pytest.raises(ConfigError, match="frozen"):
        trainer.enable_sync_free()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_step_equals_the_eager_sync_free_step(tiny):
    over = [s for s in tiny + STEPS if not s.startswith("train.device")] + ["train.device=cuda"]
    cfg_graph = load_config("fmnist-cpu", over + ["train.cuda_graph=true", "train.epochs=4"])
    cfg = load_config("fmnist-cpu", over + ["train.epochs=4"])
    graphed, eager = build_trainer(cfg_graph), build_trainer(cfg)
    eager.enable_sync_free()
    for _ in range(12):  # 3 warm-up steps, the capture, replays across epochs
        torch.testing.assert_close(graphed.train_step(), eager.train_step(), rtol=1e-4, atol=1e-5)
    for a, b in zip(graphed.model.parameters(), eager.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.numeric
def test_two_models_trained_together_equal_each_trained_alone(tiny):
    from firmad.training import fit_together

    torch.set_num_threads(1)
    # of different lengths: the shorter one finishes first while the other goes on alone
    cfgs = [
        load_config("fmnist-cpu", tiny + [f"data.normal_class={c}", f"train.epochs={e}"])
        for c, e in ((0, 1), (1, 2))
    ]
    together = [build_trainer(c) for c in cfgs]
    summaries = fit_together(together)
    assert [s["steps"] for s in summaries] == [4, 8]
    for cfg, mixed in zip(cfgs, together, strict=True):
        alone = build_trainer(cfg)
        alone.fit()
        for (name, a), b in zip(
            alone.model.state_dict().items(), mixed.model.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), name


def test_cli_trains_several_classes_in_one_process(tmp_path, tiny):
    import json

    from firmad.cli import main

    sets = [a for s in tiny + ["train.epochs=1"] for a in ("--set", s)]
    out = tmp_path / "runs"
    args = ["-q", "train", "--config", "fmnist-cpu", "--classes", "0,Trouser", "--out", str(out)]
    assert main([*args, "--no-eval", *sets]) == 0
    for name, cls in (("c0", 0), ("cTrouser", 1)):
        meta = json.loads((out / name / "checkpoint.json").read_text())
        assert meta["finished"] and meta["config"]["data"]["normal_class"] in (cls, "Trouser")
    # Resuming finished runs evaluates them.
    assert main(["-q", "train", "--resume", "--out", str(out), "--classes", "0,Trouser"]) == 0
    assert (out / "c0" / "results.json").exists() and (out / "cTrouser" / "results.json").exists()
