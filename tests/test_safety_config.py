"""Untrusted recipes: refused early, with a short message naming the file or key, exit 2 from
the CLI, nothing written. Aliases, huge or special files, deep nesting, base: cycles, duplicate
keys, shipped names shadowed by local files, and sizes far beyond any real use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from firmad.cli import main
from firmad.config import MAX_RECIPE_BYTES, available_recipes, load_config, read_recipe
from firmad.errors import ConfigError

LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# (file name, content or a maker, fragments the message must hold)
BAD_RECIPES = [
    ("laughs.yaml", LAUGHS + "train: {epochs: *i}\n", ["laughs.yaml", "aliases"]),
    ("alias.yaml", "x: &x 5\ntrain: {epochs: *x}\n", ["alias.yaml", "line 2", "aliases"]),
    ("dup.yaml", "train:\n  epochs: 3\n  epochs: 5\n", ["dup.yaml", "'epochs'", "line 3", "twice"]),
    ("deep.yaml", "train: " + "[" * 5000 + "]" * 5000 + "\n", ["deep.yaml", "nested"]),
    ("maps.yaml", "train: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", ["maps.yaml", "nested"]),
    ("self.yaml", "base: self.yaml\n", ["cycle", "self.yaml"]),
    ("a.yaml", "base: b.yaml\n", ["cycle", "a.yaml -> ", "b.yaml"]),
    ("big.yaml", "#" * (MAX_RECIPE_BYTES + 10) + "\n", ["big.yaml", "KiB"]),
    ("bin.yaml", b"\xff\xfe\x00".decode("latin1"), ["bin.yaml"]),
    ("zero.yaml", "base: /dev/zero\n", ["/dev/zero", "not a regular file"]),
    ("folder.yaml", "base: sub/\n", ["sub", "folder"]),
    ("nan.yaml", "method: {tau: .inf}\n", ["method.tau", "finite"]),
]


@pytest.mark.parametrize(
    ("name", "text", "fragments"), BAD_RECIPES, ids=[c[0] for c in BAD_RECIPES]
)
def test_bad_recipe_files_are_refused_with_a_short_message(tmp_path, name, text, fragments):
    _write(tmp_path, "b.yaml", "base: a.yaml\n")
    (tmp_path / "sub").mkdir()
    path = tmp_path / name
    if name == "bin.yaml":
        path.write_bytes(b"\xff\xfe\x00\x81")
    else:
        _write(tmp_path, name, text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    message = str(err.value)
    assert len(message) < 600, message[:300]
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("special", ["/dev/zero", "fifo.yaml", "folder.yaml"])
def test_special_files_are_refused_before_reading(tmp_path, special):
    if special == "fifo.yaml":
        os.mkfifo(tmp_path / special)  # opening it for reading would wait for a writer
    elif special == "folder.yaml":
        (tmp_path / special).mkdir()
    path = special if special.startswith("/") else str(tmp_path / special)
    with pytest.raises(ConfigError, match="not a regular file|a folder"):
        read_recipe(path)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.epochs=" + "[" * 5000 + "]" * 5000, "nested"),
        ("a." * 3000 + "b=1", "key path"),
        ("eval.resize_ratio=1000", "eval.resize_ratio"),
        ("eval.n_crops=1e8", "eval.n_crops"),
        ("model.head_hidden=1e9", "model.head_hidden"),
        ("model.head_out=1e9", "model.head_out"),
        ("model.head_depth=100000", "model.head_depth"),
        ("model.width=1000", "model.width"),
        ("train.threads=100000", "train.threads"),
        ("train.batch_size=1e9", "train.batch_size"),
        ("eval.batch_size=1e9", "eval.batch_size"),
        ("train.epochs=1e12", "train.epochs"),
        ("train.steps_per_epoch=1e12", "train.steps_per_epoch"),
        ("eval.bank_centroids=1e9", "eval.bank_centroids"),
        ("attack.steps=1e9", "attack.steps"),
        ("attack.restarts=1e9", "attack.restarts"),
        ("adversarial.steps=1e9", "adversarial.steps"),
        ("augment.blur_kernel=1000001", "augment.blur_kernel"),
        ("eval.resize_ratio=2.5", "eval.resize_ratio"),
        ("train.seed=1e30", "train.seed"),
        ("method.tau=.inf", "finite"),
        ("train.lr=.nan", "finite"),
    ],
)
def test_overrides_beyond_limits_fail_at_config_time(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("fmnist-cpu", [override])
    assert len(str(err.value)) < 600
    if fragment:
        assert fragment in str(err.value)


def test_values_at_the_limits_and_the_usual_ones_still_pass():
    cfg = load_config(
        "fmnist-cpu",
        ["eval.resize_ratio=2", "train.threads=1024", "model.head_depth=64", "eval.n_crops=1000"],
    )
    assert cfg.eval.resize_ratio == 2 and cfg.train.threads == 1024
    for name in available_recipes():
        load_config(name)


def test_huge_values_are_not_echoed_in_full():
    alias_value = "[" + ", ".join(["x" * 100] * 2000) + "]"
    with pytest.raises(ConfigError) as err:
        load_config("fmnist-cpu", [f"train.epochs={alias_value}"])
    assert len(str(err.value)) < 600 and "characters" in str(err.value)


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_local_file_named_like_a_shipped_recipe_does_not_shadow_it(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    if kind == "folder":
        (tmp_path / "fmnist-cpu").mkdir()
    else:
        (tmp_path / "fmnist-cpu").write_text("train: {epochs: 1}\n")
    _write(tmp_path, "mine.yaml", "base: fmnist-cpu\n")
    shipped = load_config("fmnist-cpu")
    assert shipped.train.epochs > 1
    assert load_config("mine.yaml").train.epochs == shipped.train.epochs
    # A path must look like one: ./NAME or NAME.yaml reads the local file.
    if kind == "file":
        assert load_config("./fmnist-cpu").train.epochs == 1


def test_a_bare_name_that_is_no_shipped_recipe_says_how_to_give_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "myrecipe").write_text("train: {epochs: 1}\n")
    with pytest.raises(ConfigError, match=r"\./NAME"):
        load_config("myrecipe")


def test_a_relative_base_is_read_from_the_recipe_folder(tmp_path, monkeypatch):
    _write(tmp_path, "recipes/parent.yaml", "train: {batch_size: 8}\n")
    _write(tmp_path, "recipes/child.yaml", "base: parent.yaml\ntrain: {epochs: 3}\n")
    _write(tmp_path, "recipes/deeper/grandchild.yaml", "base: ../child.yaml\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _write(elsewhere, "parent.yaml", "train: {batch_size: 64}\n")  # must not be used
    cfg = load_config(str(tmp_path / "recipes/deeper/grandchild.yaml"))
    assert (cfg.train.batch_size, cfg.train.epochs) == (8, 3)


# A key the method does not take: refused before any data is read or folder made (these were
# accepted and ignored before methods owned their settings).
METHOD_KEYS_NOT_TAKEN = [
    ["train", "--config", "fmnist-cpu-ntxent", "--set", "method.loss_mode=concat"],
    ["train", "--config", "fmnist-cpu-dsvdd", "--set", "method.tau=0.2"],
    ["train", "--config", "fmnist-cpu-dsvdd", "--set", "method.symmetric=true"],
    ["fit", "{dir}", "--set", "method.name=dsvdd", "--set", "method.tau=0.5"],
]
# Scorer parameters out of range: refused before training (kde:scale=-5 trained and saved
# before, kde:scale=nan trained and then failed).
SCORER_VALUES_REFUSED = [
    ["fit", "{dir}", "--scorer", "kde:scale=-5"],
    ["fit", "{dir}", "--scorer", "kde:scale=nan"],
    ["fit", "{dir}", "--scorer", "kde:scale=.nan"],
    ["fit", "{dir}", "--scorer", "kde:scale=0"],
    ["fit", "{dir}", "--scorer", "ocsvm_rbf:scale=-1"],
    ["train", "--config", "fmnist-cpu", "--set", "eval.scorers=[kde:scale=-5]"],
    ["evaluate", "{dir}", "--scorers", "kde:scale=.inf"],
]


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--config", "{dir}/alias.yaml"],
        ["train", "--config", "/dev/zero"],
        ["train", "--config", "{dir}/self.yaml"],
        ["train", "--config", "fmnist-cpu", "--set", "train.epochs=" + "[" * 3000],
        ["train", "--config", "fmnist-cpu", "--set", "eval.resize_ratio=1000"],
        ["features", "--config", "/dev/zero"],
        ["bench", "--config", "/dev/zero"],
        *METHOD_KEYS_NOT_TAKEN,
        *SCORER_VALUES_REFUSED,
    ],
)
def test_the_cli_refuses_with_status_2_and_writes_nothing(tmp_path, monkeypatch, capsys, args):
    _write(tmp_path, "alias.yaml", "x: &x 5\ntrain: {epochs: *x}\n")
    _write(tmp_path, "self.yaml", "base: ./self.yaml\n")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    out = tmp_path / "out"
    args = [a.replace("{dir}", str(tmp_path)) for a in args]
    if args[0] in ("train", "fit"):
        args += ["--out", str(out)]
    assert main(["-q", *args]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err and len(err) < 1000
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_fit_and_demo_defaults_ignore_a_local_folder_named_like_the_recipe(tmp_path, monkeypatch):
    from firmad.detector import OneClassDetector

    monkeypatch.chdir(tmp_path)
    (tmp_path / "fmnist-cpu").mkdir()
    assert OneClassDetector().make_config().train.epochs == load_config("fmnist-cpu").train.epochs


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (METHOD_KEYS_NOT_TAKEN[0], ["ntxent does not take ['loss_mode']", "name, tau, symmetric"]),
        (METHOD_KEYS_NOT_TAKEN[1], ["dsvdd does not take ['tau']", "are name"]),
        (SCORER_VALUES_REFUSED[0], ["kde:scale=-5", "scale must be a finite number > 0"]),
        (SCORER_VALUES_REFUSED[1], ["kde:scale=nan", "scale expects a number"]),
        (SCORER_VALUES_REFUSED[2], ["scale must be a finite number, got nan"]),
    ],
)
def test_the_refusals_say_what_is_allowed(tmp_path, capsys, args, fragments):
    (tmp_path / "in").mkdir()  # the input folder, beside --out (an --out inside it is refused)
    args = [a.replace("{dir}", str(tmp_path / "in")) for a in args]
    args += ["--out", str(tmp_path / "o")]
    assert main(["-q", *args]) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err
    assert not (tmp_path / "o").exists()
