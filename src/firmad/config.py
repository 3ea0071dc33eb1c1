"""Typed, validated run configuration (recipes are YAML files of these sections).

A recipe is checked completely before any work starts: unknown keys, wrong types and impossible
values raise ConfigError with the key path and the allowed values. Types and simple bounds are
checked by pydantic models; names from registries (backbones, outliers, scorers) and the
augmentation and head settings are checked by the modules that own them, after the types.

The ``method:`` section belongs to the method it names: its keys and defaults are that method's
``Settings`` (`firmad.methods`), so nothing here names a method's setting. When a recipe over a
``base:``, or a ``--set method.name=...``, names another method than the one before, the section
starts afresh from the new method's defaults: the earlier method's keys are not inherited, and
every key written with the new name (in that recipe, or in the --set options) must be one the
new method takes.

Configs that firmad wrote itself (a run's config.yaml and checkpoint, a detector's
detector.json) were written by earlier versions with every method's section holding ``tau``,
``loss_mode`` and ``symmetric``, taken or not. `config_from_dict` drops those keys where the
method does not take them and they hold the values earlier versions wrote for every method (0.2,
pairwise, false: the method ignored them); any other value of them is refused. Recipes and
``--set`` options (`load_config`, grids) get the strict check (``strict=True``).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    SerializeAsAny,
    field_validator,
    model_validator,
)

from firmad.augment import ViewSettings, check_view_settings
from firmad.errors import ConfigError
from firmad.io import atomic_write_text
from firmad.methods import (
    DEFAULT_METHOD,
    MethodSettings,
    method_class,
    method_section,
)
from firmad.models import BACKBONES, WIDTH_SCALABLE, check_width
from firmad.models.heads import check_head_settings
from firmad.outliers import parse_outliers
from firmad.perturb.spec import AUDIT_DEFAULTS, NORMS, PRESETS, SweepSpec, default_eps
from firmad.safeyaml import (  # noqa: F401  (MAX_YAML_DEPTH, parse_yaml: kept importable here)
    MAX_YAML_DEPTH,
    parse_yaml,
    shorten,
    yaml_problem,
)
from firmad.scoring import ScorerSpec
from firmad.scoring.specs import parse_scorer  # noqa: F401  (kept importable from here)
from firmad.validation import Int, validate_as
from firmad.validation import Section as _Section

DEVICES = "auto, cpu, cuda, cuda:N (N = 0, 1, ...), mps"
MIN_SIZE, MAX_SIZE = 8, 1024


class DataConfig(_Section):
    dataset: str = "fashion-mnist"
    root: str | None = None
    # One class id/name, or a list of them (multi-class normal).
    normal_class: int | str | list[int | str] = 0
    # Another dataset whose test split is the anomalies (normal dataset vs outlier dataset).
    outlier_dataset: str | None = None
    max_train: Int | None = Field(None, ge=1)
    max_test: Int | None = Field(None, ge=2)
    size: Int = 32  # images are resized once to this size (paper: Fashion-MNIST upsampled to 32)
    channels: Int = 3  # grayscale is repeated to 3 channels as in the paper
    download: bool = False

    @field_validator("size")
    @classmethod
    def _size(cls, v: int) -> int:
        if v < MIN_SIZE:
            raise ValueError(
                f"{v} px is too small for the encoders' downsampling; use {MIN_SIZE}..{MAX_SIZE}"
            )
        if v > MAX_SIZE:
            # Every image of the split is held in memory at this size, and activations grow
            # with size squared: a typo like 10240 would exhaust memory long after the start.
            raise ValueError(
                f"{v} px is too large: all images are kept in memory at this size and the "
                f"encoder's memory grows with size squared; use {MIN_SIZE}..{MAX_SIZE}"
            )
        return v

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: int) -> int:
        if v not in (1, 3):
            raise ValueError(f"must be 1 or 3, got {v}")
        return v


class OutlierConfig(_Section):
    # Each entry is one outlier kind; "a+b" chains transforms into one kind.
    kinds: list[str] = Field(default_factory=lambda: ["rot90", "rot180", "rot270"])
    mode: Literal["frozen", "fresh"] = "frozen"
    # Real outlier exposure: "folder:PATH" / "npz:PATH" / a dataset name; replaces synthetic kinds.
    exposure: str | None = None


class ModelConfig(_Section):
    backbone: str = "resnet18_cifar"
    width: float = Field(1.0, gt=0)
    # the paper's code effectively used 0.9 (PyTorch convention)
    bn_momentum: float = Field(0.1, ge=0, le=1)
    # Checked by firmad.models.heads.check_head_settings (one source of truth).
    # Upper bounds (here, so a typo fails before any work): far above the paper's 8 / 1024 / 128.
    head_depth: Int = 8
    head_hidden: Int = 1024
    head_out: Int = 128


class AugmentConfig(_Section):
    # Values are checked by firmad.augment.check_view_settings (one source of truth).
    enabled: bool = True
    scale: list[float] = Field(default_factory=lambda: [0.25, 1.0])
    ratio: list[float] = Field(default_factory=lambda: [1.0, 1.0])
    jitter: list[float] = Field(default_factory=lambda: [0.4, 0.4, 0.4, 0.4])
    jitter_p: float = 1.0
    blur_kernel: Int = 3
    blur_sigma: list[float] = Field(default_factory=lambda: [0.1, 2.0])
    blur_p: float = 0.75
    hflip_p: float = 0.0
    grayscale_p: float = 0.0


class TrainConfig(_Section):
    epochs: Int = Field(2000, ge=1)
    # samples per step (each gives two views); with several processes the global batch
    batch_size: Int = Field(32, ge=2)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(3e-4, ge=0)
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    pct_start: float = Field(0.01, gt=0, lt=1)
    seed: Int = Field(0, ge=0)
    device: str = "auto"
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto = on
    compile: bool = False
    # cap, for CPU budgets; None = a full pass over the pool
    steps_per_epoch: Int | None = Field(None, ge=1)
    checkpoint_every: Int = Field(0, ge=0)  # epochs; 0 = only at the end (and on Ctrl-C)
    # epochs between learning-curve points (0.25 = 4 an epoch); 0 = none
    eval_every: float = Field(0, ge=0)
    threads: Int | None = Field(None, ge=1)  # None = torch's default
    # Several processes (torchrun): BatchNorm with the global batch's statistics, so N processes
    # train as one with the same (global) batch_size. Ignored by a single process.
    sync_bn: bool = True
    # Replay the training step from a CUDA graph (no host synchronisation in the step): CUDA,
    # SGD, frozen outliers, one process. Same numbers as the eager step, to float tolerance.
    cuda_graph: bool = False

    @field_validator("channels_last", mode="before")
    @classmethod
    def _on_off(cls, v):
        # YAML reads a bare on / off (`--set train.channels_last=off`) as a boolean
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError(f"{shorten(v)} is not a device; choose from {DEVICES}")
        return v

    @model_validator(mode="after")
    def _cuda_graph_needs_cuda(self):
        if self.cuda_graph and self.device in ("cpu", "mps"):
            raise ValueError(
                f"cuda_graph: CUDA graphs need a CUDA device, not train.device={self.device}; "
                "set train.cuda_graph=false or train.device=cuda"
            )
        return self


class EvalConfig(_Section):
    scorers: list[str] = Field(
        default_factory=lambda: [
            "knn_cos:k=1",
            "knn_cos:k=5",
            "knn_cos_norm:k=5",
            "kde",
            "centre",
            "mahalanobis",
            "ocsvm_rbf",
            "ocsvm_linear",
        ]
    )
    variants: list[Literal["plain", "angled", "ensemble"]] = Field(
        default_factory=lambda: ["plain"]
    )
    batch_size: Int = Field(512, ge=1)
    # test transform: resize to 1.125x then centre-crop (36 -> 32)
    resize_ratio: float = Field(1.125, ge=1)
    bank_size: Int | None = Field(None, ge=1)  # random subset of the normal training images
    bank_centroids: Int | None = Field(None, ge=1)  # or k-means centroids of the bank's features
    n_crops: Int = Field(10, ge=1)
    # the crop ensemble's bank: centre crops of the training images (the paper's script) or
    # the same n_crops random crops of each, so the bank sees what the test crops see
    ensemble_bank: Literal["centre", "crops"] = "centre"
    # test subsample for learning-curve points (diagnostic only)
    curve_max_test: Int = Field(2000, ge=2)


class AdversarialConfig(_Section):
    """Adversarial training (Madry et al.): each step trains on views perturbed within ε to
    maximise the method's own loss. ``steps: 1`` with ``random_start`` is the cheap single-step
    "FGSM with a random start" (Wong et al. 2020); more steps are PGD-k."""

    enabled: bool = False
    norm: Literal["linf", "l2"] = "linf"
    # radius in [0, 1] pixel space (L∞: 8/255 = 0.0314; L2: e.g. 0.5)
    eps: float = Field(0.0314, ge=0)
    steps: Int = Field(1, ge=1)
    step_size: float | None = Field(None, gt=0)  # None: 2.5·eps/steps (PGD), 1.25·eps (1 step)
    random_start: bool = True

    @field_validator("eps")
    @classmethod
    def _eps(cls, v: float, info) -> float:
        if info.data.get("enabled") and v <= 0:
            raise ValueError("must be > 0 when adversarial.enabled is true")
        if info.data.get("norm") == "linf" and v > 1:
            raise ValueError(
                f"{v} is larger than the whole [0, 1] pixel range; L∞ eps is in pixel space "
                "(8/255 = 0.0314)"
            )
        return v

    def alpha(self) -> float:
        """The step size: ``step_size``, or 2.5·eps/steps (PGD) / 1.25·eps (a single step)."""
        if self.step_size is not None:
            return self.step_size
        return 1.25 * self.eps if self.steps == 1 else 2.5 * self.eps / self.steps


class AttackConfig(_Section):
    """A robustness audit after training (`firmad.robustness`): the sweep on the run's headline
    detector at every ε, written to attack.json / attack.md / plots and results.json.

    Settings not given come from ``preset`` (`firmad.perturb.spec.PRESETS`: quick, full), the
    same presets as `firmad attack`; eps defaults to the norm's radii (L∞ 0, 2, 4, 8 /255).
    Everything is checked by `SweepSpec`, the one place that checks attack settings.
    """

    enabled: bool = False
    preset: Literal["quick", "full"] = "quick"
    norm: Literal["linf", "l2"] = AUDIT_DEFAULTS["norm"]
    # radii in [0, 1] pixel space (L∞ 2/255 = 0.00784, 4/255 = 0.0157, 8/255 = 0.0314)
    eps: list[float] = Field(default_factory=lambda: default_eps(AUDIT_DEFAULTS["norm"]))
    steps: Int = Field(PRESETS["quick"]["steps"], ge=1)
    restarts: Int = Field(PRESETS["quick"]["restarts"], ge=1)
    # fixed: step 2.5·ε/steps (the usual PGD); apgd: APGD's step size, halved where it stalls
    schedule: Literal["fixed", "apgd"] = PRESETS["quick"]["schedule"]
    # pgd: one walk per gradient source; ensemble: + the CE-style member; square: black-box
    attack: Literal["pgd", "ensemble", "square"] = PRESETS["quick"]["attack"]
    # the per-image targets (pixel-space target and targeted start) beside the surrogates
    targeted: bool = PRESETS["quick"]["targeted"]
    subset: Int | None = Field(PRESETS["quick"]["subset"], ge=2)  # None = every test image
    targets: list[Literal["normal", "anomaly", "both"]] = Field(
        default_factory=lambda: list(AUDIT_DEFAULTS["targets_list"])
    )
    checks: bool = AUDIT_DEFAULTS["checks"]  # strength checks (about four more attacks)
    square_check: bool = PRESETS["quick"]["square_check"]

    @model_validator(mode="before")
    @classmethod
    def _from_preset(cls, data: Any) -> Any:
        """Keys not given take the preset's values (and eps the norm's radii)."""
        if not isinstance(data, dict) or data.get("preset", "quick") not in PRESETS:
            return data
        preset = PRESETS[data.get("preset", "quick")]
        out = {k: v for k, v in preset.items() if k in cls.model_fields and k not in data}
        if "eps" not in data and data.get("norm") in NORMS:
            out["eps"] = default_eps(data["norm"])
        return {**out, **data}

    @model_validator(mode="after")
    def _checked(self) -> AttackConfig:
        try:
            SweepSpec(
                self.eps, self.norm, self.steps, self.restarts, self.targets,
                schedule=self.schedule, subset=self.subset, checks=self.checks,
                attack=self.attack, square_check=self.square_check,
            )  # fmt: skip
        except ConfigError as err:
            raise ValueError(str(err)) from None
        if not self.targets:
            raise ValueError("name at least one of normal, anomaly, both")
        return self


SECTIONS = (
    "data", "method", "outliers", "model", "augment", "train", "eval", "adversarial", "attack",
)  # fmt: skip


class RunConfig(_Section):
    name: str = "run"
    data: DataConfig = Field(default_factory=DataConfig)
    # the named method's own settings model (firmad.methods.method_section)
    method: SerializeAsAny[MethodSettings] = Field(default_factory=method_section)
    outliers: OutlierConfig = Field(default_factory=OutlierConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)

    @field_validator(*SECTIONS, mode="before")
    @classmethod
    def _empty_section(cls, v: Any) -> Any:
        return {} if v is None else v  # `train:` with nothing under it in YAML

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v: Any) -> MethodSettings:
        return method_section(v)  # a ConfigError naming the method's own keys

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


# --- YAML: firmad.safeyaml reads every recipe, grid and --set value -----------------------------


MAX_RECIPE_BYTES = 1 << 20  # a recipe, grid or run config is a small text file
MAX_BASE_CHAIN = 16  # recipes extending recipes


# --- checks that need the modules owning the names ---------------------------------------------


def _check_values(cfg: RunConfig) -> None:
    """Names from registries and module settings, checked before any work starts."""
    m = cfg.model
    if m.backbone not in BACKBONES:
        raise ConfigError(
            f"model.backbone: unknown backbone {shorten(m.backbone)}; choose from "
            f"{', '.join(BACKBONES)}"
        )
    check_width(m.backbone, m.width)
    check_head_settings(hidden=m.head_hidden, out_dim=m.head_out, depth=m.head_depth)
    o = cfg.outliers
    if o.kinds:
        try:
            parse_outliers(o.kinds)
        except ConfigError as err:
            raise ConfigError(f"outliers.kinds: {err}") from None
    if method_class(cfg.method.name).requires_outliers and not (o.kinds or o.exposure):
        raise ConfigError(f"outliers.kinds: method {shorten(cfg.method.name)} needs outliers")
    check_view_settings(ViewSettings(**cfg.augment.model_dump(exclude={"enabled"})))
    specs = [check_scorer(spec) for spec in cfg.eval.scorers]
    for i, spec in enumerate(specs):
        if spec in specs[:i]:
            first = cfg.eval.scorers[specs.index(spec)]
            raise ConfigError(
                f"eval.scorers: {shorten(first)} and {shorten(cfg.eval.scorers[i])} are the same "
                f"scorer ({spec.label}); list each scorer once"
            )


def check_scorer(spec: str) -> ScorerSpec:
    """The normalised spec of a recipe's scorer: unknown names, parameters and values (out of
    the scorer's range) fail now, before any work."""
    try:
        return ScorerSpec.parse(spec)
    except ConfigError as err:
        raise ConfigError(f"eval.scorers: {err}") from None


# Upper bounds of sizes and counts, far above any real use: a typo (1e9, an extra zero) fails
# before the first step instead of exhausting memory or time after training.
LIMITS = {
    "model.width": 8,
    "model.head_depth": 64,
    "model.head_hidden": 16384,
    "model.head_out": 16384,
    "train.epochs": 1_000_000,
    "train.batch_size": 65536,
    "train.steps_per_epoch": 10_000_000,
    "train.checkpoint_every": 1_000_000,
    "train.threads": 1024,
    "train.seed": 2**32 - 1,
    "eval.batch_size": 65536,
    "eval.resize_ratio": 2,
    "augment.blur_kernel": 255,
    "eval.n_crops": 1000,
    "eval.bank_centroids": 1_000_000,
    "adversarial.steps": 1000,
    "attack.steps": 100_000,
    "attack.restarts": 1000,
}


def _check_limits(cfg: RunConfig) -> None:
    for key, limit in LIMITS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and value > limit:
            raise ConfigError(
                f"{key}: {shorten(value)} is above the limit {limit}; is it a typo? Use a "
                f"value up to {limit}"
            )


# The method keys every saved config held before methods owned their settings, with the
# values earlier versions wrote for a method that did not take them (`config_from_dict`).
FORMER_METHOD_KEYS = {"tau": 0.2, "loss_mode": "pairwise", "symmetric": False}


def _former_method_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A config firmad wrote, less the former method keys its method does not take, where they
    hold the values it wrote for every method; any other value is a ConfigError."""
    section = data.get("method")
    if not isinstance(section, dict):
        return data  # validation says what is wrong
    name = section.get("name", DEFAULT_METHOD)
    try:
        takes = method_class(name).setting_keys()
    except ConfigError:
        return data  # an unknown name: validation says so
    kept = {}
    for key, value in section.items():
        if key in FORMER_METHOD_KEYS and key not in takes:
            former = FORMER_METHOD_KEYS[key]
            if type(value) is type(former) and value == former:
                continue  # written for every method by earlier versions, ignored by this one
            raise ConfigError(
                f"method.{key}: method {name} does not take {key} (its keys: "
                f"{', '.join(('name', *takes))}), but this config gives {shorten(value)}; it had "
                f"no effect on the training. Remove the key, or set it to {former!r}"
            )
        kept[key] = value
    return {**data, "method": kept}


def config_from_dict(data: dict[str, Any], strict: bool = False) -> RunConfig:
    """A validated `RunConfig` from plain data. ``strict`` (recipes and --set, what a user
    wrote): no former method keys (the module docstring); otherwise those that firmad itself
    wrote into saved configs are dropped where the method ignores them."""
    if not strict and isinstance(data, dict):
        data = _former_method_keys(data)
    cfg = validate_as(RunConfig, data, "")
    _check_limits(cfg)
    _check_values(cfg)
    return cfg


def _method_name(section: Any) -> Any:
    return section.get("name", DEFAULT_METHOD) if isinstance(section, dict) else None


def _switch_method(section: Any, name: Any) -> Any:
    """The method section a switch to method `name` starts from: nothing when `name` is
    another method (the keys were the earlier method's), else the section as it is."""
    if isinstance(section, dict) and name != _method_name(section):
        return {}
    return section


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if len(keys) > MAX_YAML_DEPTH:
        raise ConfigError(f"--set {shorten(dotted)}: a key path has a few parts, e.g. train.lr")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` strings (values parsed as YAML) to a recipe dict. A
    ``method.name`` naming another method starts the method section afresh: the recipe's keys
    of the earlier method are dropped, the other ``method.*`` options apply (in any order)."""
    parsed = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {shorten(item)}: write it as section.key=value")
        try:
            parsed.append((key.strip(), parse_yaml(value)))
        except yaml.YAMLError as err:
            raise ConfigError(
                f"--set {shorten(item)}: the value is not valid YAML ({yaml_problem(err)}); close "
                "brackets and quotes, e.g. outliers.kinds=[rot90, rot180]"
            ) from None
    names = [value for key, value in parsed if key == "method.name"]
    if names and "method" in data:
        data["method"] = _switch_method(data["method"], names[-1])
    for key, value in parsed:
        _set_path(data, key, value)
    return data


def recipes_dir() -> Path:
    """Recipes ship inside the package (src/firmad/configs)."""
    return Path(__file__).parent / "configs"


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def read_text_file(path: Path, what: str = "recipe", limit: int = MAX_RECIPE_BYTES) -> str:
    """The text of a small regular file. Devices (/dev/zero), FIFOs and folders are refused
    before any read (opened non-blocking, so a FIFO cannot hang), and so is a file over
    `limit` bytes: a recipe is read whole into memory."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise ConfigError(f"{path}: {kind}; a {what} is a YAML text file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)  # the size may change after fstat: read no more than the cap
    if len(data) > limit:
        raise ConfigError(
            f"{path}: larger than {limit // 1024} KiB; a {what} is a small YAML file "
            "(is it the right file?)"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; a {what} is UTF-8 YAML") from None


def read_yaml_file(path: Path, what: str = "recipe") -> Any:
    """A small YAML file (see `read_text_file`), parsed with `parse_yaml`."""
    text = read_text_file(path, what)
    try:
        return parse_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(err)})") from None


YAML_SUFFIXES = (".yaml", ".yml")


def looks_like_path(text: str) -> bool:
    """A recipe argument names a file only when it looks like one (./x, x.yaml, dir/x): a
    file or folder that happens to be called like a shipped recipe never replaces it."""
    return "/" in text or os.sep in text or text.startswith(".") or text.endswith(YAML_SUFFIXES)


def recipe_path(name_or_path: str, relative_to: Path | None = None) -> Path:
    """The file of a recipe argument: a shipped recipe's name, or a path (relative ones from
    `relative_to`, the folder of the recipe whose ``base:`` this is, else the current one)."""
    text = str(name_or_path)
    if not looks_like_path(text):
        if text in available_recipes():
            return recipes_dir() / f"{text}.yaml"
        raise ConfigError(
            f"recipe {shorten(text)} not found: give one of {', '.join(available_recipes())}, "
            "or a file as a path (./NAME, NAME.yaml or DIR/NAME)"
        )
    path = Path(text).expanduser()
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if not path.exists():
        raise ConfigError(f"recipe file {path} not found; check the path")
    return path


def read_recipe(name_or_path: str, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file path, or the name of a shipped recipe (`fmnist-cpu`); ``base:`` is read
    first (a relative one from this recipe's folder) and this recipe's keys override it."""
    path = recipe_path(name_or_path, _chain[-1].parent if _chain else None)
    if path.resolve() in [p.resolve() for p in _chain]:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"base: recipes extend each other in a cycle ({cycle}); remove one base")
    if len(_chain) >= MAX_BASE_CHAIN:
        raise ConfigError(f"{path}: more than {MAX_BASE_CHAIN} recipes extend each other")
    data = read_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (data, method, train, ...)")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: base: expected a recipe name or path, got {shorten(base)}")
        merged = read_recipe(base, (*_chain, path))
        new_method = data.get("method")
        if "method" in merged and isinstance(new_method, dict) and "name" in new_method:
            merged["method"] = _switch_method(merged["method"], new_method["name"])
        _deep_update(merged, data)
        data = merged
    return data


def read_run_config_file(path: str | Path) -> RunConfig:
    """The resolved config.yaml of a run directory, validated.

    Unlike a recipe, an empty file is an error: a run's config is written in full by
    `save_config`, so an empty or broken one was damaged (e.g. by a full disk) or edited.
    """
    path = Path(path)
    fix = (
        "Restore it from a copy, or train the run again with its recipe and --set options "
        "(firmad train ... --out NEW_FOLDER)."
    )
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; a run directory holds its config.yaml. {fix}")
    try:
        data = read_yaml_file(path, "run config")
    except ConfigError as err:
        raise ConfigError(f"{err}. {fix}") from None
    if data is None:
        raise ConfigError(f"{path}: the run's config file is empty. {fix}")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections (data, method, train, ...), got "
            f"{type(data).__name__}. {fix}"
        )
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}\n{fix}") from None


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


def backbone_overrides(entry: str | None) -> list[str]:
    """The overrides for a backbone written ``name`` or ``name@width`` (grids, studies); none
    for None. Without a width a CIFAR ResNet keeps the recipe's and a fixed-width net takes 1.0
    (recipes that narrow the ResNets would otherwise give it a width it refuses)."""
    if not entry:
        return []
    name, _, width = entry.partition("@")
    if not width and name not in WIDTH_SCALABLE:
        width = "1.0"
    return [f"model.backbone={name}"] + ([f"model.width={width}"] if width else [])


def load_config(recipe: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The config of a recipe (a shipped name or a file) with ``section.key=value`` overrides,
    checked strictly: this is what a user wrote."""
    data = read_recipe(recipe) if recipe else {}
    apply_overrides(data, overrides or [])
    return config_from_dict(data, strict=True)


def save_config(cfg: RunConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
