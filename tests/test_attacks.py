"""Tests for firmad.robustness: PGD/FGSM on an anomaly score, robust AUROC, strength checks.

Every test uses tiny synthetic detectors defined here (a random conv net with cosine kNN to a
bank of 'normal' images, a linear score, a stepwise score), so each runs in about a second.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm
from torch import nn

from firmad.errors import ConfigError, InputError
from firmad.metrics import evaluate_scores
from firmad.perturb import project
from firmad.robustness import (
    attack_detector,
    bootstrap_auroc,
    fgsm,
    format_markdown,
    pgd,
    robust_auroc_sweep,
    score,
    stratified_subset,
)
from firmad.robustness.attacks import ImageTarget, apgd_checkpoints, square_attack

# --------------------------------------------------------------------------- toy detectors


class ToyKNN(nn.Module):
    """Random conv features (normalisation inside), score = 1 - mean cosine sim to k nearest."""

    def __init__(self, bank: torch.Tensor, k: int = 3, seed: int = 0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)  # train/eval mode matters for this one
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in [self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias]:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        self.k = k
        self.eval()
        with torch.no_grad():
            self.register_buffer("bank", self.features(bank))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1((x - 0.5) / 0.25))
        h = F.relu(self.bn(self.conv2(h)))
        return F.normalize(h.flatten(1), dim=1)

    def score_tensor(self, x: torch.Tensor) -> torch.Tensor:
        sim = self.features(x) @ self.bank.T
        return 1 - sim.topk(self.k, dim=1).values.mean(1)

    def surrogate_scores(self):
        """Smooth surrogate: distance to the mean normal feature."""
        centre = F.normalize(self.bank.mean(0), dim=0)
        return {"centre": lambda x: 1 - self.features(x) @ centre}


class Stepwise:
    """A masked score: the toy score rounded to coarse steps (zero gradient almost everywhere)."""

    def __init__(self, inner: ToyKNN):
        self.inner = inner

    def score_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(self.inner.score_tensor(x) * 5) / 5


def _images(n: int, horizontal: bool, gen: torch.Generator) -> torch.Tensor:
    """Normals: brightness ramp top to bottom; anomalies: left to right; small noise."""
    ramp = torch.linspace(0.2, 0.8, 8)
    base = ramp.view(1, 1, 1, 8) if horizontal else ramp.view(1, 1, 8, 1)
    return (base.expand(n, 3, 8, 8) + 0.05 * torch.randn(n, 3, 8, 8, generator=gen)).clamp(0, 1)


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    bank = _images(30, False, gen)
    x = torch.cat([_images(20, False, gen), _images(20, True, gen)])
    y = torch.cat([torch.zeros(20), torch.ones(20)]).long()
    return bank, x, y


@pytest.fixture(scope="module")
def toy(data):
    return ToyKNN(data[0])


def _auroc(det, x, y) -> float:
    return evaluate_scores(y, score(det, x))["auroc"]


def _linear(d: int = 12, seed: int = 0):
    w = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return lambda x: x.flatten(1) @ w[: x[0].numel()]


# --------------------------------------------------------------------------- projections


@settings(max_examples=40, deadline=None)
@given(
    norm=st.sampled_from(["linf", "l2"]),
    eps=st.floats(0.0, 2.0),
    scale=st.floats(0.0, 5.0),
    seed=st.integers(0, 10_000),
)
def test_property_projection_stays_in_ball_and_box(norm, eps, scale, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 3, 2, 2, generator=gen)
    x_adv = x + scale * torch.randn(x.shape, generator=gen)
    p = project(x_adv, x, norm, eps)
    d = (p - x).flatten(1)
    assert p.min() >= 0 and p.max() <= 1
    if norm == "linf":
        assert d.abs().max() <= eps + 1e-6
    else:
        assert (d.norm(dim=1) <= eps * (1 + 1e-5) + 1e-6).all()


@settings(max_examples=25, deadline=None)
@given(
    norm=st.sampled_from(["linf", "l2"]),
    eps=st.floats(0.0, 1.5),
    steps=st.integers(1, 4),
    big_step=st.booleans(),
    restarts=st.integers(1, 2),
    seed=st.integers(0, 10_000),
    schedule=st.sampled_from(["fixed", "apgd"]),
)
def test_property_pgd_output_in_ball_and_box(
    norm, eps, steps, big_step, restarts, seed, schedule
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 1, 3, 4, generator=gen)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    step = 3 * eps if big_step and eps > 0 else None  # overshoot: projection must catch it
    adv = pgd(
        _linear(),
        x,
        y,
        eps=eps,
        norm=norm,
        steps=steps,
        step_size=step,
        restarts=restarts,
        seed=seed,
        schedule=schedule,
    )
    d = (adv - x).flatten(1)
    assert adv.min() >= 0 and adv.max() <= 1
    if norm == "linf":
        assert d.abs().max() <= eps + 1e-6
    else:
        assert (d.norm(dim=1) <= eps * (1 + 1e-5) + 1e-6).all()


# --------------------------------------------------------------------------- attack behaviour


@pytest.mark.parametrize("schedule", ["fixed", "apgd"])
@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_attack_drives_auroc_far_below_clean(toy, data, norm, eps, schedule) -> None:
    _, x, y = data
    clean = _auroc(toy, x, y)
    adv = pgd(toy, x, y, eps=eps, norm=norm, steps=20, schedule=schedule)
    assert clean > 0.95
    assert _auroc(toy, adv, y) < 0.3


@pytest.mark.parametrize("targets", ["normal", "anomaly"])
def test_targets_move_only_their_group(toy, data, targets) -> None:
    _, x, y = data
    adv = pgd(toy, x, y, eps=8 / 255, steps=10, targets=targets)
    s0, s1 = score(toy, x), score(toy, adv)
    group = y == (0 if targets == "normal" else 1)
    assert torch.equal(adv[~group], x[~group])  # the other group is untouched
    moved = s1[group] - s0[group]
    if targets == "normal":
        assert (moved >= 0).all() and moved.mean() > 0  # false alarms: scores go up
    else:
        assert (moved <= 0).all() and moved.mean() < 0  # evasion: scores go down


def test_apgd_checkpoints_follow_the_paper() -> None:
    # p: 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (Croce & Hein 2020, section 3.2)
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(10) == [3, 5, 6, 7, 8, 9]


def test_apgd_halves_its_step_where_a_fixed_step_oscillates() -> None:
    """A narrow peak at mean 0.52 from 0.5 inside ε = 0.1: a fixed step of 0.05 keeps
    jumping over it; APGD's halving lands close to it with the same number of steps."""

    def peaked(x):
        return -((x.mean(dim=(1, 2, 3)) - 0.52) ** 2)

    x = torch.full((1, 1, 2, 2), 0.5)
    y = torch.tensor([0])
    args = dict(eps=0.1, steps=20, step_size=0.05, random_start=False)
    fixed = peaked(pgd(peaked, x, y, **args))
    adaptive = peaked(pgd(peaked, x, y, schedule="apgd", **args))
    assert fixed < -1e-4  # 0.5 or 0.55: at least 0.02 from the peak
    assert adaptive > -1e-5  # within about 0.003 of it


def test_best_iterate_is_kept() -> None:
    """Score peaks at mean 0.52; sign steps of 0.1 from 0.5 overshoot and oscillate."""

    def peaked(x):
        return -((x.mean(dim=(1, 2, 3)) - 0.52) ** 2)

    x = torch.full((2, 1, 2, 2), 0.5)
    y = torch.tensor([0, 0])
    last = x.clone()
    for _ in range(3):  # what a last-iterate PGD would return: 0.6, worse than clean
        last = (last + 0.1 * torch.sign(torch.full_like(last, 0.02))).clamp(0.4, 0.6)
    adv = pgd(peaked, x, y, eps=0.1, steps=3, step_size=0.1, random_start=False)
    assert (peaked(last) < peaked(x)).all()
    assert (peaked(adv) >= peaked(x)).all()


def test_returned_score_never_worse_than_clean(toy, data) -> None:
    _, x, y = data
    sign = 1 - 2 * y.double()
    adv = pgd(toy, x, y, eps=8 / 255, steps=5, step_size=0.2)  # deliberately huge steps
    assert (sign * score(toy, adv).double() >= sign * score(toy, x).double() - 1e-7).all()


def test_fgsm_is_one_full_step(toy, data) -> None:
    _, x, y = data
    eps = 4 / 255
    adv = fgsm(toy, x, y, eps=eps)
    d = (adv - x).abs()
    at_edge = (d - eps).abs() < 1e-6
    at_zero = d < 1e-7
    clipped = (adv == 0) | (adv == 1)
    assert (at_edge | at_zero | clipped).all()
    assert at_edge.float().mean() > 0.5


def test_deterministic_with_seed_and_independent_of_batch_size(toy, data) -> None:
    _, x, y = data
    a = pgd(toy, x, y, eps=8 / 255, steps=5, seed=3)
    b = pgd(toy, x, y, eps=8 / 255, steps=5, seed=3)
    c = pgd(toy, x, y, eps=8 / 255, steps=5, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    lin = _linear(d=192)
    full = pgd(lin, x, y, eps=0.1, norm="l2", steps=3, seed=1)
    chunked = pgd(lin, x, y, eps=0.1, norm="l2", steps=3, seed=1, batch_size=7)
    assert torch.allclose(full, chunked, atol=1e-6)


def test_eot_with_stochastic_score(toy, data) -> None:
    _, x, y = data
    torch.manual_seed(0)

    def noisy(z):
        return toy.score_tensor(z) + 0.01 * torch.randn(z.shape[0])

    adv = pgd(noisy, x, y, eps=8 / 255, steps=10, eot=3)
    assert adv.shape == x.shape
    assert _auroc(toy, adv, y) < 0.5


def test_eval_mode_restored_and_no_parameter_grads(data) -> None:
    bank, x, y = data
    det = ToyKNN(bank)
    det.train()
    pgd(det, x, y, eps=4 / 255, steps=2)
    assert det.training and det.bn.training
    assert all(p.grad is None for p in det.parameters())
    det.eval()
    pgd(det, x, y, eps=4 / 255, steps=2)
    assert not det.training and not det.bn.training


def test_surrogate_gradient_breaks_a_masked_score(toy, data) -> None:
    _, x, y = data
    masked = Stepwise(toy)
    exact = pgd(masked, x, y, eps=8 / 255, steps=10)
    via_surrogate = pgd(masked, x, y, eps=8 / 255, steps=10, grad_fn=toy)
    assert _auroc(masked, exact, y) > 0.9  # no gradient: the exact attack does nothing
    assert _auroc(masked, via_surrogate, y) < 0.5


def test_attack_detector_keeps_the_strongest_per_sample(toy, data) -> None:
    _, x, y = data
    res = attack_detector(toy, x, y, eps=6 / 255, steps=10)
    assert res.attacks == ["exact", "surrogate:centre"]
    assert sum(res.wins.values()) == len(y)
    single = pgd(toy, x, y, eps=6 / 255, steps=10)
    sign = 1 - 2 * y.double()
    assert (sign * res.scores >= sign * score(toy, single).double() - 1e-7).all()
    assert torch.allclose(res.scores, score(toy, res.images).double(), atol=1e-6)
    only_exact = attack_detector(toy, x, y, eps=6 / 255, steps=10, surrogates=False)
    assert only_exact.attacks == ["exact"] and torch.equal(only_exact.images, single)


# --------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    "kwargs",
    [
        {"norm": "l3"},
        {"eps": -0.1},
        {"eps": float("nan")},
        {"steps": 0},
        {"restarts": 2, "random_start": False},
        {"targets": "all"},
        {"eot": 0},
        {"step_size": -1.0},
        {"batch_size": 0},
        {"schedule": "cosine"},
    ],
)
def test_bad_settings_raise_config_error(kwargs) -> None:
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 1])
    args = {"eps": 0.1, **kwargs}
    with pytest.raises(ConfigError):
        pgd(_linear(), x, y, **args)


def test_bad_inputs_raise_input_error() -> None:
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 1])
    with pytest.raises(InputError, match="float"):
        pgd(_linear(), (x * 255).to(torch.uint8), y, eps=0.1)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        pgd(_linear(), x * 3 - 1, y, eps=0.1)
    with pytest.raises(InputError, match="shape"):
        pgd(_linear(), x, torch.tensor([0, 1, 1]), eps=0.1)
    with pytest.raises(InputError, match="0 \\(normal\\)"):
        pgd(_linear(), x, torch.tensor([0, 2]), eps=0.1)
    with pytest.raises(InputError, match="one score per image"):
        pgd(lambda z: z.flatten(1), x, y, eps=0.1)
    with pytest.raises(InputError, match="not a detector"):
        pgd(object(), x, y, eps=0.1)


# --------------------------------------------------------------------------- robust AUROC


def test_bootstrap_auroc_matches_sklearn_and_brackets_it() -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(30), np.ones(20)].astype(int)
    s = np.round(rng.normal(size=50) + y, 1)  # ties
    point, lo, hi = bootstrap_auroc(y, s, n_resamples=200, seed=1)
    assert abs(point - skm.roc_auc_score(y, s)) < 1e-12
    assert lo <= point <= hi
    assert bootstrap_auroc(y, s, n_resamples=200, seed=1) == (point, lo, hi)


def test_stratified_subset_keeps_shares_and_seed() -> None:
    y = torch.tensor([0] * 90 + [1] * 30)
    idx = stratified_subset(y, 40, seed=0)
    assert len(idx) == 40 and int(y[idx].sum()) == 10
    assert torch.equal(idx, stratified_subset(y, 40, seed=0))
    assert not torch.equal(idx, stratified_subset(y, 40, seed=1))
    assert torch.equal(stratified_subset(y, None), torch.arange(120))


def _with_image_target(toy, bank) -> dict:
    """The toy's surrogates plus the pixel-space target on its normal bank images."""
    with torch.no_grad():
        image = ImageTarget(toy.features, bank, toy.score_tensor(bank), typical=0.5)
    return {**toy.surrogate_scores(), "image": image}


def test_sweep_smooth_detector_passes_checks(toy, data) -> None:
    bank, x, y = data
    other = ToyKNN(bank, seed=1)
    res = robust_auroc_sweep(
        toy,
        x,
        y,
        eps_list=[0, 2 / 255, 8 / 255],
        steps=10,
        subset=30,
        n_bootstrap=200,
        transfer_from=other,
        surrogates=_with_image_target(toy, bank),  # else anomalies-only stalls at large eps
    )
    json.dumps(res)  # serialisable as is
    assert res["subset"]["n"] == 30 and res["subset"]["n_anomaly"] == 15
    assert len(res["rows"]) == 9
    rows = {(r["eps"], r["target"]): r for r in res["rows"]}
    clean = res["clean"]["auroc"]
    for mode in ("normal", "anomaly", "both"):
        assert rows[(0.0, mode)]["auroc"] == clean
        r = rows[(8 / 255, mode)]
        assert r["ci_low"] <= r["auroc"] <= r["ci_high"]
    assert rows[(8 / 255, "both")]["auroc"] < 0.3 < clean
    assert rows[(8 / 255, "normal")]["wins"].keys() == {
        "exact", "surrogate:centre", "surrogate:image"
    }  # fmt: skip
    verdicts = {v["name"]: v for v in res["verdicts"]}
    assert set(verdicts) == {"monotone", "large_eps", "more_steps", "more_restarts", "transfer"}
    assert all(v["passed"] for v in verdicts.values()), verdicts
    assert res["passed"] and res["checks_skipped"] == []
    md = format_markdown(res)
    assert "| eps | normal | anomaly | both |" in md and "8/255" in md


def test_large_eps_check_looks_at_each_attacked_side(toy, data) -> None:
    """'both' collapses at eps = 1 while anomalies attacked alone stay above every normal:
    the check fails and names that side; the pixel-space target fixes the side."""
    bank, x, y = data
    kw = dict(eps_list=[0, 8 / 255], steps=10, n_bootstrap=50, check_eps=8 / 255)
    with pytest.warns(RuntimeWarning, match="anomalies-only"):
        res = robust_auroc_sweep(toy, x, y, **kw)
    large = next(v for v in res["verdicts"] if v["name"] == "large_eps")
    assert not large["passed"] and "anomalies-only" in large["detail"]
    assert "'both' 0.0" in large["detail"] and "masked" not in large["detail"]
    res = robust_auroc_sweep(toy, x, y, surrogates=_with_image_target(toy, bank), **kw)
    large = next(v for v in res["verdicts"] if v["name"] == "large_eps")
    assert large["passed"], large


def test_sweep_flags_a_masked_score(toy, data) -> None:
    _, x, y = data
    with pytest.warns(RuntimeWarning, match="masked"):
        res = robust_auroc_sweep(
            Stepwise(toy),
            x,
            y,
            eps_list=[0, 8 / 255],
            steps=5,
            n_bootstrap=100,
            targets_list=("both",),
        )
    verdicts = {v["name"]: v for v in res["verdicts"]}
    assert not verdicts["large_eps"]["passed"]
    assert "masked" in verdicts["large_eps"]["detail"]
    assert not res["passed"]
    assert res["checks_skipped"] == ["transfer"]
    assert "FAIL `large_eps`" in format_markdown(res)


def test_monotone_check_fails_only_for_a_clear_rise() -> None:
    from firmad.robustness.evaluate import _check_monotone

    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.01, 200)
    rows = [{"eps": e, "target": "both", "auroc": a} for e, a in [(0.0, 0.9), (0.1, 0.6)]]
    boot = {(0.0, "both"): 0.9 + noise, (0.1, "both"): 0.6 + noise}
    assert _check_monotone(rows, boot, ["both"]).passed
    rows.append({"eps": 0.2, "target": "both", "auroc": 0.7})  # rises by 10 points
    boot[(0.2, "both")] = 0.7 + noise
    verdict = _check_monotone(rows, boot, ["both"])
    assert not verdict.passed and "rises" in verdict.detail
    rows[-1]["auroc"], boot[(0.2, "both")] = 0.603, 0.603 + noise  # within tolerance
    assert _check_monotone(rows, boot, ["both"]).passed


def test_sweep_argument_errors(toy, data) -> None:
    _, x, y = data
    with pytest.raises(ConfigError):
        robust_auroc_sweep(toy, x, y, eps_list=[])
    with pytest.raises(ConfigError):
        robust_auroc_sweep(toy, x, y, eps_list=[0.1], targets_list=("sideways",))
    with pytest.raises(ConfigError, match="steps"):
        robust_auroc_sweep(toy, x, y, eps_list=[0.1], steps=0)
    with pytest.raises(ConfigError, match="large_eps"):
        robust_auroc_sweep(toy, x, y, eps_list=[0.1], large_eps=-1.0)
    with pytest.raises(InputError, match="both"):
        robust_auroc_sweep(toy, x[y == 0], y[y == 0], eps_list=[0.1])


# --------------------------------------------------------------------------- library cross-check


class TwoLogit(nn.Module):
    """The anomaly score as a 2-class classifier: logits (-s/2, s/2), class 1 = anomaly."""

    def __init__(self, det: ToyKNN):
        super().__init__()
        self.det = det

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.det.score_tensor(x)
        return torch.stack([-s / 2, s / 2], dim=1)


@pytest.mark.slow  # secml-torch's first SGD import pulls in torch._dynamo: 2-9 s once
def test_cross_check_against_secml_torch(toy, data) -> None:
    secmlt = pytest.importorskip("secmlt", reason="secml-torch not installed (dev extra)")
    from secmlt.adv.evasion.pgd import PGD
    from secmlt.models.pytorch.base_pytorch_nn import BasePyTorchClassifier
    from torch.utils.data import DataLoader, TensorDataset

    del secmlt
    _, x, y = data
    eps, steps = 8 / 255, 20
    # Untargeted cross-entropy on the true label: normals pushed to class 1, anomalies to 0.
    attack = PGD(
        perturbation_model="linf",
        epsilon=eps,
        num_steps=steps,
        step_size=2.5 * eps / steps,
        random_start=False,
        backend="native",
    )
    loader = attack(BasePyTorchClassifier(TwoLogit(toy)), DataLoader(TensorDataset(x, y), 40))
    theirs = torch.cat([xb for xb, _ in loader])
    ours = pgd(toy, x, y, eps=eps, steps=steps, random_start=False)
    assert (theirs - x).abs().max() <= eps + 1e-6
    a_clean, a_theirs, a_ours = (_auroc(toy, z, y) for z in (x, theirs, ours))
    assert a_theirs < a_clean - 0.2  # the library attack works through the wrapper
    assert abs(a_ours - a_theirs) < 0.1  # and both reach a similar robust AUROC
    assert a_ours <= a_theirs + 0.02  # ours is not the weaker one


def test_eval_mode_restored_for_a_wrapping_detector(data) -> None:
    """A plain detector object holding its network two levels down, with its own flag."""
    bank, x, y = data

    class Scorer:
        def __init__(self):
            self.encoder = ToyKNN(bank)

    class Wrapper:
        def __init__(self):
            self.scorer, self.training = Scorer(), True
            self.scorer.encoder.train()

        def train(self, mode: bool = True):
            self.training = mode
            self.scorer.encoder.train(mode)
            return self

        def eval(self):
            return self.train(False)

        def score_tensor(self, z):
            assert not self.scorer.encoder.bn.training  # attacks run in eval mode
            return self.scorer.encoder.score_tensor(z)

    det = Wrapper()
    pgd(det, x, y, eps=4 / 255, steps=2)
    attack_detector(det, x, y, eps=4 / 255, steps=2)
    assert det.training and det.scorer.encoder.bn.training


# --------------------------------------------------------------------------- Square attack


def test_square_schedule_halves_the_area() -> None:
    from firmad.robustness.attacks import square_fraction

    assert square_fraction(0.05, 0, 10000) == 0.05
    assert square_fraction(0.05, 11, 10000) == 0.025
    assert square_fraction(0.05, 9000, 10000) == 0.05 / 512
    assert square_fraction(0.05, 2, 100) == 0.0125  # rescaled: 2 of 100 is 200 of 10 000


def test_square_attack_lowers_auroc_but_not_below_white_box(toy, data) -> None:
    _, x, y = data
    clean = _auroc(toy, x, y)
    calls = []
    res = square_attack(
        toy, x, y, eps=16 / 255, queries=300, on_step=lambda d, t: calls.append((d, t))
    )
    assert res.attacks == ["square"] and calls[-1] == (299, 299)
    black = evaluate_scores(y, res.scores)["auroc"]
    assert black < clean - 0.2  # it works without gradients
    assert torch.allclose(res.scores, score(toy, res.images).double(), atol=1e-6)
    assert (res.images - x).abs().max() <= 16 / 255 + 1e-6
    assert res.images.min() >= 0 and res.images.max() <= 1
    white = attack_detector(toy, x, y, eps=16 / 255, steps=20)
    assert evaluate_scores(y, white.scores)["auroc"] <= black + 0.01
    # anomalies only: normals unchanged; deterministic with the seed
    only = square_attack(toy, x, y, eps=16 / 255, queries=50, targets="anomaly", seed=3)
    assert torch.equal(only.images[y == 0], x[y == 0])
    again = square_attack(toy, x, y, eps=16 / 255, queries=50, targets="anomaly", seed=3)
    assert torch.equal(only.images, again.images)


def test_sweep_square_attack_and_square_check(toy, data) -> None:
    _, x, y = data
    res = robust_auroc_sweep(
        toy, x, y, eps_list=[0, 8 / 255], steps=50, schedule="apgd", n_bootstrap=50,
        square_check=True, surrogates=_with_image_target(toy, data[0]),
    )  # fmt: skip
    square = next(v for v in res["verdicts"] if v["name"] == "square")
    assert square["passed"] and "Square attack (1000 queries)" in square["detail"]
    res = robust_auroc_sweep(
        toy, x, y, eps_list=[0, 8 / 255], steps=200, n_bootstrap=50, attack="square",
        checks=False,
    )  # fmt: skip
    both = {r["eps"]: r["auroc"] for r in res["rows"] if r["target"] == "both"}
    assert both[8 / 255] < both[0] and res["settings"]["attack"] == "square"
    assert res["settings"]["step_size"] == "square (no gradient)"
    with pytest.raises(ConfigError, match="linf"):
        square_attack(toy, x, y, eps=0.5, norm="l2")


def test_attack_detector_reports_every_step(toy, data) -> None:
    _, x, y = data
    calls = []
    attack_detector(
        toy, x, y, eps=4 / 255, steps=3, restarts=2, batch_size=15,
        on_step=lambda d, t: calls.append((d, t)),
    )  # fmt: skip
    total = 2 * 2 * 3 * 3  # exact + centre, restarts, batches of 15 of 40, steps
    assert calls == [(i, total) for i in range(1, total + 1)]


def test_targets_pick_typical_normals(toy, data) -> None:
    from firmad.robustness.attacks import NearestTarget

    bank, x, y = data
    odd = torch.cat([bank, 1 - bank[:1]])  # one odd "normal"
    with torch.no_grad():
        image = ImageTarget(toy.features, odd, toy.score_tensor(odd), typical=0.5)
    assert len(image.images) == 16 and not (image.images == odd[-1]).all((1, 2, 3)).any()
    fn = image.bind(x[:4])
    assert torch.equal(fn.start, image.targets(x[:4])) and fn(fn.start).abs().max() == 0
    sign = torch.tensor([1.0, 1.0, -1.0, -1.0])  # two normals, two anomalies
    fn = image.bind(x[:4], sign)
    turned = image.targets(x[:4]).rot90(1, (-2, -1))
    assert torch.equal(fn.start[:2], turned[:2])
    assert torch.equal(fn.start[2:], image.targets(x[:4])[2:])
    assert fn(fn.start).abs().max() == 0
    away = fn(x[:4])
    assert (away[:2] < 0).all() and (away[2:] > 0).all()  # normals: -distance, maximised
    near = NearestTarget(toy.features, toy.features(odd), typical=0.5)
    assert len(near.bank) == 16
    sur = near.bind(x[:4])(x[:4])
    assert sur.shape == (4,) and (sur >= -1e-9).all()


def test_attacks_use_the_modules_a_detector_declares() -> None:
    """The detector protocol: score_tensor + attack_modules(); only declared modules are put in
    eval mode (and restored), attributes are not walked for a detector that declares them."""
    torch.manual_seed(0)
    x, y = torch.rand(8, 1, 8, 8), torch.tensor([0, 1] * 4)

    class Declared:
        def __init__(self):
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.BatchNorm1d(4))
            self.other = nn.BatchNorm1d(4)  # not declared: an attack leaves it alone

        def attack_modules(self):
            return [self.net]

        def score_tensor(self, z):
            assert not self.net.training  # the declared module is in eval mode
            assert self.other.training  # an undeclared one is not walked to
            return self.net(z).sum(1)

    det = Declared()
    pgd(det, x, y, eps=4 / 255, steps=2)
    assert det.net.training and det.other.training


# ------------------------------------------------------------------ ensemble, targeted start


def _ensemble_sources(toy, bank) -> dict:
    """Every member of the ensemble on the toy: exact, its surrogate, the pixel-space target,
    the targeted start and the CE-style member."""
    from firmad.robustness.targets import TargetStart, TwoLogitCE

    sources = {"exact": None, **_with_image_target(toy, bank)}
    sources["start"] = TargetStart(sources["image"], toy.score_tensor)
    sources["ce"] = TwoLogitCE(toy.score_tensor)
    return sources


def test_ensemble_is_never_weaker_than_any_member_per_image(toy, data) -> None:
    """Per image the ensemble's score is at least as far in the attack direction as each of
    its members run alone with the same randomness (member i: seed + i)."""
    from dataclasses import replace

    from firmad.robustness.attacks import AttackSpec, run_sources

    bank, x, y = data
    sources = _ensemble_sources(toy, bank)
    spec = AttackSpec(8 / 255, steps=4, restarts=2, schedule="apgd", seed=3, batch_size=15)
    both = run_sources(toy, x, y, spec, sources)
    sign = 1.0 - 2.0 * y.double()  # +1 normals (pushed up), -1 anomalies (pulled down)
    assert both.attacks == list(sources) and sum(both.wins.values()) == len(y)
    for i, (name, member) in enumerate(sources.items()):
        alone = run_sources(toy, x, y, replace(spec, seed=spec.seed + i), {name: member})
        assert (sign * both.scores >= sign * alone.scores).all(), name
        won = both.winner == i  # where the member won, the ensemble is exactly that member
        assert torch.equal(both.images[won], alone.images[won]), name
    res = robust_auroc_sweep(
        toy, x, y, eps_list=[0, 8 / 255], steps=4, attack="ensemble", checks=False,
        n_bootstrap=20, surrogates=_with_image_target(toy, bank),
    )  # fmt: skip
    wins = next(r["wins"] for r in res["rows"] if r["target"] == "both" and r["eps"] > 0)
    assert "surrogate:ce" in wins and res["settings"]["attack"] == "ensemble"
    assert "ensemble PGD-4" in format_markdown(res)


class Saturated:
    """A 'defended' toy: tanh of the mean squared distance to the mean normal image. Far from
    the normals (a random start at a large ε, APGD's first step of 2ε) it saturates and its
    gradient vanishes."""

    def __init__(self, centre: torch.Tensor, scale: float = 0.01):
        self.centre, self.scale = centre, scale

    def score_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh((x - self.centre).square().flatten(1).mean(1) / self.scale)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.centre).flatten(1)


def _saturated_case():
    gen = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0.3, 0.7, 8)

    def images(n: int, horizontal: bool, noise: float) -> torch.Tensor:
        base = ramp.view(1, 1, 1, 8) if horizontal else ramp.view(1, 1, 8, 1)
        return (base.expand(n, 1, 8, 8) + noise * torch.randn(n, 1, 8, 8, generator=gen)).clamp(
            0, 1
        )

    det = Saturated(images(200, False, 0.05).mean(0, keepdim=True))
    # the target candidates (e.g. training normals) are noisier than the test normals: their
    # most typical tenth scores above many test normals
    candidates = images(200, False, 0.06)
    x = torch.cat([images(20, False, 0.05), images(20, True, 0.05)])
    y = torch.tensor([0] * 20 + [1] * 20)
    return det, candidates, x, y


def test_targeted_start_passes_the_large_eps_check_on_a_defended_toy() -> None:
    """The quick default's members (APGD-10 on the score, the pixel-space target) leave the
    anomalies-only AUROC at eps = 1 at the score of the targets; the targeted start walks on
    from there down the score itself and the check passes."""
    from firmad.robustness.targets import TargetStart

    det, candidates, x, y = _saturated_case()
    image = ImageTarget(det.features, candidates, score(det, candidates), typical=0.1)
    kw = dict(eps_list=[0, 8 / 255], steps=10, schedule="apgd", n_bootstrap=20, check_eps=8 / 255)
    with pytest.warns(RuntimeWarning, match="anomalies-only"):
        res = robust_auroc_sweep(det, x, y, surrogates={"image": image}, **kw)
    large = next(v for v in res["verdicts"] if v["name"] == "large_eps")
    assert not large["passed"] and "anomalies-only" in large["detail"]
    start = TargetStart(image, det.score_tensor)
    res = robust_auroc_sweep(det, x, y, surrogates={"image": image, "start": start}, **kw)
    large = next(v for v in res["verdicts"] if v["name"] == "large_eps")
    assert large["passed"], large


def test_two_logit_ce_rises_with_the_score_in_both_directions(toy, data) -> None:
    from firmad.robustness.targets import TwoLogitCE

    _, x, _ = data
    sign = torch.tensor([1.0, 1.0, -1.0, -1.0])
    fn = TwoLogitCE(toy.score_tensor).bind(x[:4], sign)
    xi = x[:4].clone().requires_grad_(True)
    (g_ce,) = torch.autograd.grad(fn(xi).sum(), xi)
    xi = x[:4].clone().requires_grad_(True)
    (g_s,) = torch.autograd.grad(toy.score_tensor(xi).sum(), xi)
    # a positive factor per image: the CE gradient points where the score's does
    cos = F.cosine_similarity(g_ce.flatten(1), g_s.flatten(1).double(), dim=1)
    assert (cos > 0.999).all()


# --------------------------------------------------------------------------- decisions, ETA


class WithThreshold(ToyKNN):
    threshold_ = None


def test_decisions_flipped_at_the_detectors_threshold(data) -> None:
    bank, x, y = data
    det = WithThreshold(bank)
    clean = score(det, x).double()
    det.threshold_ = float(clean[y == 0].quantile(0.9))
    res = robust_auroc_sweep(det, x, y, eps_list=[0, 8 / 255], steps=5, checks=False,
                             n_bootstrap=20)  # fmt: skip
    assert res["threshold"] == det.threshold_
    t = det.threshold_
    clean_row = res["clean"]["decisions"]
    assert clean_row["normals_flagged"] == int((clean[y == 0] > t).sum())
    assert clean_row["normals_pushed_over"] == clean_row["anomalies_pulled_under"] == 0
    adv = attack_detector(det, x, y, eps=8 / 255, steps=5).scores
    for row in (r for r in res["rows"] if r["eps"] > 0):
        s = torch.where(y == (0 if row["target"] == "normal" else 1), adv, clean)
        s = adv if row["target"] == "both" else s
        d = row["decisions"]
        assert d["normals_flagged"] == int((s[y == 0] > t).sum())
        assert d["anomalies_flagged"] == int((s[y == 1] > t).sum())
        assert d["normals_pushed_over"] == int(((clean <= t) & (s > t) & (y == 0)).sum())
        assert d["anomalies_pulled_under"] == int(((clean > t) & (s <= t) & (y == 1)).sum())
    both = next(r for r in res["rows"] if r["target"] == "both" and r["eps"] > 0)
    assert both["decisions"]["normals_pushed_over"] > 0  # the attack flips decisions here
    assert "Decisions at the detector's threshold" in format_markdown(res)
    plain = robust_auroc_sweep(ToyKNN(bank), x, y, eps_list=[0, 8 / 255], steps=2, checks=False,
                               n_bootstrap=20)  # fmt: skip
    assert "threshold" not in plain and "decisions" not in plain["rows"][0]


def test_timeline_weighs_attacks_by_cost() -> None:
    """Four attacks, the last two twice as costly (the convergence checks): after the first
    one the ETA is the remaining cost at the speed measured, not the remaining count."""
    from firmad.robustness.progress import Timeline

    now = [0.0]
    line = Timeline([("a", 1), ("b", 1), ("c", 2), ("d", 2)], clock=lambda: now[0])
    assert line.eta() is None
    now[0] = 5.0  # loading before the first step is not timed
    line.begin(0)
    for k in range(1, 11):
        now[0] += 1.0  # 10 s per unit of cost
        line.step(k, 10)
    assert line.share() == pytest.approx(1 / 6)
    assert line.eta() == pytest.approx(50.0)  # 5 units left; counting attacks would say 30 s
    line.begin(1)  # taken from a cache: no time passes
    line.begin(2)
    now[0] += 2.0  # one step of attack c: 0.2 units of cost, at the same speed
    line.step(7, 10)  # a resumed attack: 6 of its steps were kept, one is timed
    assert line.share() == pytest.approx((2 + 1.4) / 6)
    assert line.eta() == pytest.approx((6 - 3.4) * 10.0)


@pytest.mark.filterwarnings("ignore:AUROC stays")
def test_sweep_plan_costs_follow_the_steps_taken(toy, data) -> None:
    """The plan names every attack in order, in the CLI's units, with a cost proportional to the
    steps x sources x images it takes."""
    from firmad.robustness.evaluate import SweepHooks, SweepSpec, sweep

    _, x, y = data
    plan, steps, current = [], {}, []

    def progress(done, total, what):
        current[:] = [what]

    def on_step(done, total):
        steps[current[0]] = total

    spec = SweepSpec([0, 4 / 255, 8 / 255], steps=3, n_bootstrap=10)
    sweep(toy, x, y, spec, SweepHooks(progress=progress, on_step=on_step, plan=plan.extend))
    assert [w for w, _ in plan] == [
        "eps=4/255", "eps=8/255", "large_eps: eps=255/255", "more_steps: eps=4/255, steps=6",
        "more_restarts: eps=4/255, restarts=2",
    ]  # fmt: skip
    assert list(steps) == [w for w, _ in plan]
    ratio = {w: c / steps[w] for w, c in plan}
    assert len(set(ratio.values())) == 1  # cost / gradient steps is the same for every attack
