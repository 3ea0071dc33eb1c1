"""Recipes: typed, validated before any work starts, overridable, round-trippable."""

from __future__ import annotations

import pytest
import yaml

from firmad.config import (
    RunConfig,
    available_recipes,
    config_from_dict,
    load_config,
    parse_scorer,
    save_config,
)
from firmad.errors import ConfigError


def test_every_shipped_recipe_is_valid():
    names = available_recipes()
    for required in (
        "cifar10-firm",
        "cifar100-firm",
        "fmnist-firm",
        "fmnist-cpu",
        "fmnist-cpu-ntxent",
        "fmnist-cpu-rotsupcon",
        "fmnist-cpu-dsvdd",
    ):
        assert required in names
    for name in names:
        assert isinstance(load_config(name), RunConfig)


def test_paper_recipe_values():
    cfg = load_config("cifar10-firm")
    assert cfg.method.name == "firm" and cfg.method.tau == 0.2
    assert cfg.model.backbone == "resnet18_cifar" and cfg.model.head_depth == 8
    assert cfg.outliers.kinds == ["rot90", "rot180", "rot270"]
    t = cfg.train
    assert (t.optimizer, t.lr, t.momentum, t.weight_decay) == ("sgd", 0.01, 0.9, 3e-4)
    assert (t.schedule, t.pct_start, t.batch_size, t.epochs) == ("onecycle", 0.01, 32, 2000)
    assert load_config("cifar100-firm").data.dataset == "cifar100-coarse"
    assert load_config("fmnist-rotsupcon").method.name == "rotsupcon"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"train": {"epochs": -1}}, "train.epochs"),
        ({"train": {"epochs": "ten"}}, "train.epochs"),
        ({"train": {"epoch": 3}}, "unknown key(s) ['epoch']"),
        ({"bogus": {}}, "unknown key(s) ['bogus']"),
        ({"model": {"backbone": "resnet999"}}, "resnet18_cifar"),
        ({"outliers": {"kinds": ["rot45"]}}, "outliers.kinds"),
        ({"method": {"name": "simclr"}}, "method.name"),
        ({"augment": {"scale": [0.9, 0.1]}}, "augment.scale"),
        ({"eval": {"scorers": ["knn_l2"]}}, "knn_cos"),
        ({"train": {"lr": True}}, "train.lr"),
    ],
)
def test_bad_values_name_the_key(data, fragment):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert fragment in str(err.value)


def test_unknown_outlier_lists_allowed_names():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"outliers": {"kinds": ["rot45"]}})
    assert "rot90" in str(err.value) and "cutpaste" in str(err.value)


def test_overrides_and_round_trip(tmp_path):
    cfg = load_config(
        "fmnist-cpu",
        [
            "train.epochs=3",
            "data.normal_class=Trouser",
            "outliers.kinds=[rot90+cutpaste, scramble]",
        ],
    )
    assert cfg.train.epochs == 3 and cfg.data.normal_class == "Trouser"
    assert cfg.outliers.kinds == ["rot90+cutpaste", "scramble"]
    save_config(cfg, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("fmnist-cpu", ["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-recipe")


def test_parse_scorer():
    assert parse_scorer("knn_cos:k=5") == ("knn_cos", {"k": 5})
    assert parse_scorer("kde") == ("kde", {})
    with pytest.raises(ConfigError):
        parse_scorer("knn_cos:5")
