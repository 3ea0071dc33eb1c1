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
        ({"eval": {"ensemble_bank": "edges"}}, "eval.ensemble_bank"),
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


# --- reliability: scientific notation, malformed values, bounds, scorers, run config files ---


def test_scientific_notation_is_a_number_everywhere(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: fmnist-cpu\ntrain:\n  lr: 1e-4\n  weight_decay: 5E-4\n")
    cfg = load_config(
        str(recipe),
        ["train.eval_every=1.0e9", "data.max_train=1e3", "eval.scorers=[kde:scale=2e1]"],
    )
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.eval_every) == (1e-4, 5e-4, 1e9)
    assert cfg.data.max_train == 1000 and isinstance(cfg.data.max_train, int)
    assert parse_scorer("kde:scale=2e1") == ("kde", {"scale": 20.0})
    assert parse_scorer("ocsvm_rbf:nu=-1.5e-2") == ("ocsvm_rbf", {"nu": -0.015})


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["train.lr=[1,2"], "train.lr=[1,2"),
        (["eval.scorers=[knn_cos:k=1"], "eval.scorers=[knn_cos:k=1"),
    ],
)
def test_malformed_yaml_in_set_names_the_item(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("fmnist-cpu", overrides)
    assert fragment in str(err.value) and "not valid YAML" in str(err.value)


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"train": {"threads": -1}}, ["train.threads", ">= 1", "null"]),
        ({"train": {"threads": True}}, ["train.threads", "integer"]),
        ({"data": {"size": 4096}}, ["data.size", "memory", "1024"]),
        ({"data": {"size": 4}}, ["data.size", "8"]),
        ({"train": {"device": "tpu"}}, ["train.device", "cpu", "cuda:N", "mps"]),
        ({"eval": {"batch_size": 0}}, ["eval.batch_size", ">= 1"]),
        ({"eval": {"scorers": ["knn_cos:k=abc"]}}, ["knn_cos:k=abc", "integer"]),
        ({"eval": {"scorers": ["knn_cos:k=0"]}}, ["knn_cos:k=0", "k must be an integer >= 1"]),
        ({"eval": {"scorers": ["knn_cos:q=1"]}}, ["unknown parameter 'q'", "k, knn_backend"]),
        ({"eval": {"scorers": ["centre:k=1"]}}, ["unknown parameter 'k'"]),
        ({"eval": {"scorers": ["kde:scale=yes"]}}, ["kde:scale=yes", "number"]),
        ({"eval": {"scorers": ["knn_cos:k=[1"]}}, ["knn_cos:k=[1", "not valid YAML"]),
        ({"train": {"lr": "abc"}}, ["train.lr: expected a number, got 'abc'"]),
        ({"train": {"pct_start": 1.0}}, ["train.pct_start: must be in (0, 1), got 1.0"]),
    ],
)
def test_impossible_values_fail_at_config_time(data, fragments):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_removed_names_and_unused_eval_enabled():
    import firmad.config as config

    assert not hasattr(config, "METHODS")
    assert not hasattr(config, "CONTRASTIVE_METHODS")  # methods live in firmad.methods
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['enabled'\]"):
        config_from_dict({"eval": {"enabled": True}})


def test_typed_sections_and_python_callers():
    # Tuples from Python callers, empty YAML sections (`train:`), defaults and equality.
    cfg = config_from_dict({"augment": {"scale": (0.5, 1.0)}, "train": None})
    assert cfg.augment.scale == [0.5, 1.0] and cfg.train == RunConfig().train
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="data.normal_class: expected an integer or a string"):
        config_from_dict({"data": {"normal_class": [1.5]}})
    with pytest.raises(ConfigError, match=r"outliers.kinds\[0\]: expected a string"):
        config_from_dict({"outliers": {"kinds": [90]}})


def test_build_validates_plain_dataclasses():
    from dataclasses import dataclass, field

    from firmad.config import validate_as

    @dataclass
    class Grid:
        name: str = "grid"
        seeds: list[int] = field(default_factory=lambda: [0])
        classes: list[int | str] | str = "all"

    grid = validate_as(Grid, {"seeds": [1, 2], "classes": [0, "Bag"]}, "")
    assert grid == Grid(seeds=[1, 2], classes=[0, "Bag"]) and isinstance(grid, Grid)
    with pytest.raises(ConfigError, match=r"grid.seeds\[1\]: expected an integer, got True"):
        validate_as(Grid, {"seeds": [1, True]}, "grid")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['seed'\]; allowed keys: name"):
        validate_as(Grid, {"seed": [1]}, "")


def test_augment_and_head_checks_have_one_source():
    from firmad.augment import ViewAugment, ViewSettings
    from firmad.models import build_head

    with pytest.raises(ConfigError) as by_config:
        config_from_dict({"augment": {"scale": [0.9, 0.1]}})
    with pytest.raises(ConfigError) as by_module:
        ViewAugment(views=ViewSettings(scale=(0.9, 0.1)))
    assert str(by_config.value) == str(by_module.value)
    assert str(by_config.value).startswith("augment.scale:")
    with pytest.raises(ConfigError) as by_config:
        config_from_dict({"model": {"head_depth": -1}})
    with pytest.raises(ConfigError) as by_module:
        build_head(32, depth=-1)
    assert str(by_config.value) == str(by_module.value)
    assert str(by_config.value).startswith("model.head_depth:")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "empty"),
        ("# only a comment\n", "empty"),
        ("train: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping"),
        ("train:\n  epochs: 0\n", "train.epochs"),
    ],
)
def test_run_config_file_refuses_empty_or_broken(tmp_path, content, fragment):
    from firmad.config import read_run_config_file

    path = tmp_path / "config.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        read_run_config_file(path)
    msg = str(err.value)
    assert str(path) in msg and fragment in msg and "restore it from a copy" in msg.lower()


def test_run_config_file_round_trip(tmp_path):
    from firmad.config import read_run_config_file

    cfg = load_config("fmnist-cpu", ["train.lr=1e-5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert read_run_config_file(tmp_path / "config.yaml") == cfg


# --- the method section is the named method's own settings model ------------------------------

# What the current version wrote for every method: the full flat section (before methods owned
# their settings), e.g. into a run's config.yaml and a detector's detector.json.
FLAT = {"tau": 0.2, "loss_mode": "pairwise", "symmetric": False}


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["method.name=ntxent", "method.loss_mode=concat"], ["ntxent", "'loss_mode'", "symmetric"]),
        (["method.name=dsvdd", "method.tau=0.2"], ["dsvdd does not take ['tau']", "are name"]),
        (["method.name=dsvdd", "method.symmetric=false"], ["dsvdd", "'symmetric'"]),
        (["method.name=rotsupcon", "method.symmetric=true"], ["rotsupcon", "name, tau"]),
        (["method.loss_mode=concat", "method.symmetric=true"], ["firm", "loss_mode"]),
        (["method.tau=0"], ["method.tau: must be > 0"]),
        (["method.loss_mode=both"], ["method.loss_mode", "'pairwise'", "'concat'"]),
    ],
)
def test_a_method_refuses_keys_it_does_not_take(overrides, fragments):
    with pytest.raises(ConfigError) as err:
        load_config("fmnist-cpu", overrides)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_each_method_has_its_own_keys_and_defaults():
    from firmad.methods import METHODS

    assert {n: c.setting_keys() for n, c in METHODS.items()} == {
        "firm": ("tau", "loss_mode"), "ntxent": ("tau", "symmetric"), "rotsupcon": ("tau",),
        "supcon-binary": ("tau",), "dsvdd": (), "binary": (),
    }  # fmt: skip
    assert load_config("fmnist-cpu-dsvdd").to_dict()["method"] == {"name": "dsvdd"}
    ntxent = load_config("fmnist-cpu-ntxent").method
    assert ntxent.model_dump() == {"name": "ntxent", "tau": 0.2, "symmetric": False}
    typed = RunConfig(method={"name": "ntxent", "symmetric": True})
    assert typed.method.symmetric and typed.method.tau == 0.2
    copied = typed.model_copy(update={"method": METHODS["firm"].Config(loss_mode="concat")})
    assert copied.to_dict()["method"] == {"name": "firm", "tau": 0.2, "loss_mode": "concat"}
    assert typed.method.name == "ntxent"  # a copy, the original unchanged


def test_switching_method_starts_its_section_afresh(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("base: fmnist-cpu\nmethod: {name: firm, tau: 0.5, loss_mode: concat}\n")
    (tmp_path / "child.yaml").write_text("base: ./base.yaml\nmethod: {name: ntxent}\n")
    (tmp_path / "same.yaml").write_text("base: ./base.yaml\nmethod: {tau: 0.3}\n")
    child = load_config(str(tmp_path / "child.yaml")).method
    assert child.model_dump() == {"name": "ntxent", "tau": 0.2, "symmetric": False}
    same = load_config(str(tmp_path / "same.yaml")).method
    assert (same.name, same.tau, same.loss_mode) == ("firm", 0.3, "concat")
    for order in (
        ["method.tau=0.4", "method.name=ntxent"],
        ["method.name=ntxent", "method.tau=0.4"],
    ):
        assert load_config(str(base), order).method.tau == 0.4
    assert load_config(str(base), ["method.name=ntxent"]).method.tau == 0.2


def test_saved_configs_with_the_former_flat_method_section_still_load(tmp_path):
    from firmad.config import read_run_config_file

    for name, takes in (("dsvdd", {}), ("ntxent", {"tau": 0.2, "symmetric": False})):
        saved = load_config("fmnist-cpu", ["method.name=" + name]).to_dict()
        saved["method"] = {"name": name, **FLAT}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(saved, sort_keys=False))
        cfg = read_run_config_file(path)
        assert cfg.to_dict()["method"] == {"name": name, **takes}
        assert config_from_dict(saved) == cfg
        with pytest.raises(ConfigError, match=f"{name} does not take"):
            config_from_dict(saved, strict=True)  # what a user writes gets the strict check
    saved["method"] = {"name": "ntxent", **FLAT, "loss_mode": "concat"}
    with pytest.raises(ConfigError, match="ntxent does not take loss_mode.*gives 'concat'"):
        config_from_dict(saved)
    saved["method"] = {"name": "dsvdd", **FLAT, "tau": 0.5}
    with pytest.raises(ConfigError, match="method.tau: method dsvdd does not take tau"):
        config_from_dict(saved)


def test_method_configs_pickle_for_spawned_workers():
    import pickle

    cfg = load_config("fmnist-cpu-ntxent", ["method.symmetric=true"])
    assert pickle.loads(pickle.dumps(cfg)) == cfg


# --- scorers: one normalised spec, checked before any work ------------------------------------


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("kde:scale=-5", ["kde:scale=-5", "scale must be a finite number > 0"]),
        ("kde:scale=0", ["scale must be a finite number > 0"]),
        ("kde:scale=.nan", ["scale must be a finite number"]),
        ("kde:scale=nan", ["scale expects a number, got 'nan'"]),
        ("kde:scale=.inf", ["finite"]),
        ("ocsvm_rbf:scale=-1", ["ocsvm_rbf", "scale must be a finite number > 0"]),
        ("knn_cos:knn_backend=gpu", ["'auto', 'faiss', 'torch'"]),
        ("knn_cos:k=true", ["k expects an integer"]),
    ],
)
def test_scorer_values_out_of_range_fail_at_config_time(spec, fragments):
    with pytest.raises(ConfigError) as err:
        load_config("fmnist-cpu", [f"eval.scorers=[{spec}]"])
    assert str(err.value).startswith("eval.scorers: ")
    for fragment in fragments:
        assert fragment in str(err.value)


def test_scorer_specs_normalise_and_the_same_scorer_twice_is_refused():
    from firmad.scoring import ScorerSpec

    assert ScorerSpec.parse("kde:scale=5") == ScorerSpec.parse("kde:scale=5.0")
    assert ScorerSpec.parse("kde:scale=5") != ScorerSpec.parse("kde:scale=50")
    assert ScorerSpec.parse("kde").params == (("scale", 20.0),)
    assert ScorerSpec.parse("knn_cos:k=1e1").kwargs == {"k": 10, "knn_backend": "auto"}
    for text in ("knn_cos:k=5", "kde:scale=0.5", "ocsvm_rbf:nu=0.05,scale=1e-05", "centre",
                 "mahalanobis:normalize=true", "knn_cos:k=2,knn_backend=torch"):  # fmt: skip
        assert ScorerSpec.parse(text).label == text
        assert ScorerSpec.parse(ScorerSpec.parse(text).label) == ScorerSpec.parse(text)
    assert ScorerSpec.parse("knn_cos").label == "knn_cos:k=5"  # k always shown
    assert ScorerSpec.parse("kde:scale=20").label == "kde"  # the default
    with pytest.raises(ConfigError, match="'kde' and 'kde:scale=20.0' are the same scorer"):
        load_config("fmnist-cpu", ["eval.scorers=[kde, knn_cos:k=5, kde:scale=20.0]"])
