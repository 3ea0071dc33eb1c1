"""AttackSpec and SweepSpec: frozen, validated once with the messages the keyword APIs give,
and the spec entry points give the keyword APIs' results."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from firmad.errors import ConfigError
from firmad.robustness import AttackSpec, SweepSpec, attack_detector, robust_auroc_sweep, sweep
from firmad.robustness.attacks import run_attack
from tests.golden_attacks import _data


def test_attack_spec_is_frozen_and_normalised():
    spec = AttackSpec(0.1, norm="LINF", steps=4)
    assert spec.norm == "linf" and spec.alpha == pytest.approx(2.5 * 0.1 / 4)
    assert AttackSpec(0.1, schedule="apgd").alpha == pytest.approx(0.2)
    assert AttackSpec(0.1, step_size=0.03).alpha == 0.03
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.eps = 0.2


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"norm": "l1"}, "norm must be linf or l2"),
        ({"eps": -1}, "eps must be >= 0"),
        ({"eps": float("nan")}, "eps must be a finite number"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"restarts": True}, "restarts must be an integer >= 1"),
        ({"step_size": 0}, "step_size must be a positive number"),
        ({"targets": "all"}, "targets must be one of"),
        ({"schedule": "cosine"}, "schedule must be fixed or apgd"),
        ({"restarts": 2, "random_start": False}, "without a random start"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ],
)
def test_attack_spec_refuses_what_pgd_refuses(changes, message):
    det, x, y = _data()
    settings = {"eps": 0.1, **changes}
    with pytest.raises(ConfigError, match=message):
        AttackSpec(**settings)
    with pytest.raises(ConfigError, match=message):
        attack_detector(det, x, y, **settings)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"eps_list": []}, "eps_list must be a non-empty list"),
        ({"eps_list": [0.1, -1]}, "every eps must be a finite number"),
        ({"targets_list": ["all"]}, "targets must be some of"),
        ({"n_bootstrap": 0}, "n_bootstrap must be a positive integer"),
        ({"attack": "cw"}, "attack must be one of"),
        ({"attack": "square", "norm": "l2"}, "implemented for norm='linf' only"),
        ({"check_eps": -0.1}, "check_eps must be a positive number"),
        ({"steps": 0}, "steps must be an integer >= 1"),
    ],
)
def test_sweep_spec_refuses_what_the_sweep_refuses(changes, message):
    det, x, y = _data()
    settings = {"eps_list": [0.0, 0.1], **changes}
    with pytest.raises(ConfigError, match=message):
        SweepSpec(**settings)
    with pytest.raises(ConfigError, match=message):
        robust_auroc_sweep(det, x, y, **settings)


def test_sweep_spec_normalises_and_derives():
    spec = SweepSpec([0.05, 0, 0.02, 0.05], norm="L2", targets_list="anomaly")
    assert spec.norm == "l2" and spec.eps_list == [0.0, 0.02, 0.05]
    assert spec.targets_list == ["anomaly"] and spec.attack_targets == "anomaly"
    assert spec.check_at == 0.02 and spec.large_at(4) == 2.0
    one = spec.attack_at(0.05, "both", steps=8)
    assert one.steps == 8 and one.step_size == pytest.approx(2.5 * 0.05 / 8)


def test_spec_entry_points_equal_the_keyword_apis():
    det, x, y = _data()
    spec = AttackSpec(0.05, steps=3, restarts=2, seed=4)
    a = run_attack(det, x, y, spec)
    b = attack_detector(det, x, y, eps=0.05, steps=3, restarts=2, seed=4)
    assert a.scores.tolist() == b.scores.tolist() and a.winner.tolist() == b.winner.tolist()
    kw = dict(eps_list=[0.0, 0.05], steps=2, n_bootstrap=20, seed=1, checks=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert sweep(det, x, y, SweepSpec(**kw)) == robust_auroc_sweep(det, x, y, **kw)


# --- one set of defaults: the presets, the recipe section, the CLI --------------------------------


def test_presets_fill_what_is_not_given():
    from firmad.perturb.spec import PRESETS
    from firmad.robustness.spec import AuditSpec

    quick = AuditSpec.preset("quick")
    sw = quick.sweep
    assert (sw.steps, sw.restarts, sw.schedule, sw.attack, sw.subset) == (10, 1, "apgd", "pgd", 200)
    assert quick.targeted and not sw.square_check and sw.eps_list == [0, 2 / 255, 4 / 255, 8 / 255]
    full = AuditSpec.preset("full", steps=None, subset=0)
    assert full.sweep.attack == "ensemble" and full.sweep.restarts == PRESETS["full"]["restarts"]
    assert full.sweep.square_check and full.sweep.subset is None  # 0: every image
    assert not AuditSpec.preset("full", checks=False).sweep.square_check
    mine = AuditSpec.preset("full", steps=1000, schedule="fixed", norm="l2")
    assert (mine.sweep.steps, mine.sweep.schedule) == (1000, "fixed")
    assert mine.sweep.eps_list == [0, 0.25, 0.5, 1.0]  # the norm's radii
    with pytest.raises(ConfigError, match="unknown audit setting"):
        AuditSpec.preset("quick", stpes=3)
    with pytest.raises(ConfigError, match="preset must be one of"):
        AuditSpec.preset("thorough")
    with pytest.raises(ConfigError, match="input space must be model or native"):
        AuditSpec.preset("quick", input_space="raw")


def test_recipe_section_takes_the_same_presets_and_checks():
    from firmad.config import AttackConfig, load_config
    from firmad.robustness.folders import attack_spec_of
    from firmad.robustness.spec import AuditSpec

    cfg = load_config("fmnist-cpu", ["attack.enabled=true"])
    same = AuditSpec.preset("quick", seed=cfg.train.seed, batch_size=cfg.eval.batch_size)
    assert attack_spec_of(cfg) == same  # the recipe's default is the CLI's quick default
    full = AttackConfig.model_validate({"preset": "full", "steps": 7})
    assert (full.steps, full.restarts, full.attack, full.square_check) == (7, 2, "ensemble", True)
    for bad, message in [
        (["attack.eps=[0, 8]"], "1/255 units"),
        (["attack.attack=square", "attack.norm=l2", "attack.eps=[0, 0.5]"], "linf' only"),
        (["attack.targets=[]"], "targets must be some of"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config("fmnist-cpu", bad)
