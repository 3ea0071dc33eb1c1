"""Typed, validated run configuration (recipes are YAML files of these sections).

A recipe is checked completely before any work starts: unknown keys, wrong types and impossible
values raise ConfigError with the key path and the allowed values.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from firmad.errors import ConfigError

METHODS = ("firm", "ntxent", "rotsupcon", "supcon-binary", "dsvdd", "binary")
CONTRASTIVE_METHODS = ("firm", "ntxent", "rotsupcon", "supcon-binary")


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"
    root: str | None = None
    # One class id/name, or a list of them (multi-class normal).
    normal_class: int | str | list[int | str] = 0
    # Another dataset whose test split is the anomalies (normal dataset vs outlier dataset).
    outlier_dataset: str | None = None
    max_train: int | None = None
    max_test: int | None = None
    size: int = 32  # images are resized once to this size (paper: Fashion-MNIST upsampled to 32)
    channels: int = 3  # grayscale is repeated to 3 channels as in the paper
    download: bool = False


@dataclass
class MethodConfig:
    name: Literal["firm", "ntxent", "rotsupcon", "supcon-binary", "dsvdd", "binary"] = "firm"
    tau: float = 0.2
    loss_mode: Literal["pairwise", "concat"] = "pairwise"
    symmetric: bool = False  # NT-Xent: the paper's one-directional form unless true


@dataclass
class OutlierConfig:
    # Each entry is one outlier kind; "a+b" chains transforms into one kind.
    kinds: list[str] = field(default_factory=lambda: ["rot90", "rot180", "rot270"])
    mode: Literal["frozen", "fresh"] = "frozen"
    # Real outlier exposure: "folder:PATH" / "npz:PATH" / a dataset name; replaces synthetic kinds.
    exposure: str | None = None


@dataclass
class ModelConfig:
    backbone: str = "resnet18_cifar"
    width: float = 1.0
    bn_momentum: float = 0.1  # the paper's code effectively used 0.9 (PyTorch convention)
    head_depth: int = 8
    head_hidden: int = 1024
    head_out: int = 128


@dataclass
class AugmentConfig:
    enabled: bool = True
    scale: list[float] = field(default_factory=lambda: [0.25, 1.0])
    ratio: list[float] = field(default_factory=lambda: [1.0, 1.0])
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.4])
    jitter_p: float = 1.0
    blur_kernel: int = 3
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    blur_p: float = 0.75
    hflip_p: float = 0.0
    grayscale_p: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 2000
    batch_size: int = 32  # samples per step; each gives two views
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 3e-4
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    pct_start: float = 0.01
    seed: int = 0
    device: str = "auto"
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto = on
    compile: bool = False
    steps_per_epoch: int | None = None  # cap, for CPU budgets; None = a full pass over the pool
    checkpoint_every: int = 0  # epochs; 0 = only at the end (and on Ctrl-C)
    eval_every: float = 0  # epochs between learning-curve points (0.25 = 4 an epoch); 0 = none
    threads: int | None = None


@dataclass
class EvalConfig:
    enabled: bool = True
    scorers: list[str] = field(
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
    variants: list[Literal["plain", "angled", "ensemble"]] = field(
        default_factory=lambda: ["plain"]
    )
    batch_size: int = 512
    resize_ratio: float = 1.125  # test transform: resize to 1.125x then centre-crop (36 -> 32)
    bank_size: int | None = None  # random subset of the normal training images as the bank
    bank_centroids: int | None = None  # or k-means centroids of the bank's features
    n_crops: int = 10
    curve_max_test: int = 2000  # test subsample for learning-curve points (diagnostic only)


@dataclass
class RunConfig:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    outliers: OutlierConfig = field(default_factory=OutlierConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- building from dicts, with key paths in every error ---------------------------------------


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not allowed; use {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return _coerce(value, option, path)
            except ConfigError as err:
                errors.append(str(err))
        allowed = " or ".join(_type_name(a) for a in get_args(tp))
        raise ConfigError(f"{path}: {value!r} has the wrong type; expected {allowed}")
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{path}: expected null, got {value!r}")
        return None
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")  # pragma: no cover


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'recipe'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = path or "recipe"
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed keys: {', '.join(names)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(value, hints[key], f"{path}.{key}" if path else key)
    return cls(**kwargs)


def _check_values(cfg: RunConfig) -> None:
    """Impossible values and unknown names, checked before any work starts."""
    from firmad.models import BACKBONES
    from firmad.outliers import parse_outliers
    from firmad.scoring import SCORERS

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    t = cfg.train
    need(t.epochs >= 1, f"train.epochs: must be >= 1, got {t.epochs}")
    need(t.batch_size >= 2, f"train.batch_size: must be >= 2, got {t.batch_size}")
    need(t.lr > 0, f"train.lr: must be > 0, got {t.lr}")
    need(0 <= t.momentum < 1, f"train.momentum: must be in [0, 1), got {t.momentum}")
    need(t.weight_decay >= 0, f"train.weight_decay: must be >= 0, got {t.weight_decay}")
    need(0 < t.pct_start < 1, f"train.pct_start: must be in (0, 1), got {t.pct_start}")
    need(t.steps_per_epoch is None or t.steps_per_epoch >= 1, "train.steps_per_epoch: must be >= 1")
    need(t.checkpoint_every >= 0, "train.checkpoint_every: must be >= 0")
    need(t.eval_every >= 0, "train.eval_every: must be >= 0")
    need(t.seed >= 0, f"train.seed: must be >= 0, got {t.seed}")
    need(
        t.device == "auto" or t.device == "cpu" or t.device.startswith(("cuda", "mps")),
        f"train.device: {t.device!r} is not a device; use auto, cpu, cuda or cuda:N",
    )
    need(cfg.method.tau > 0, f"method.tau: must be > 0, got {cfg.method.tau}")
    d = cfg.data
    need(d.size >= 8, f"data.size: must be >= 8, got {d.size}")
    need(d.channels in (1, 3), f"data.channels: must be 1 or 3, got {d.channels}")
    need(d.max_train is None or d.max_train >= 1, "data.max_train: must be >= 1")
    need(d.max_test is None or d.max_test >= 2, "data.max_test: must be >= 2")
    m = cfg.model
    need(
        m.backbone in BACKBONES,
        f"model.backbone: unknown backbone {m.backbone!r}; choose from {', '.join(BACKBONES)}",
    )
    need(m.width > 0, f"model.width: must be > 0, got {m.width}")
    need(0 <= m.bn_momentum <= 1, "model.bn_momentum: must be in [0, 1]")
    need(m.head_depth >= 0, "model.head_depth: must be >= 0")
    need(m.head_hidden >= 1 and m.head_out >= 1, "model.head_hidden/head_out: must be >= 1")
    o = cfg.outliers
    if o.kinds:
        try:
            parse_outliers(o.kinds)
        except ConfigError as err:
            raise ConfigError(f"outliers.kinds: {err}") from None
    need(
        cfg.method.name not in ("rotsupcon", "supcon-binary", "binary")
        or bool(o.kinds or o.exposure),
        f"outliers.kinds: method {cfg.method.name!r} needs outliers",
    )
    a = cfg.augment
    for key in ("scale", "ratio", "blur_sigma"):
        pair = getattr(a, key)
        need(
            len(pair) == 2 and 0 < pair[0] <= pair[1],
            f"augment.{key}: expected [low, high] with 0 < low <= high, got {pair}",
        )
    need(a.scale[1] <= 1, f"augment.scale: high must be <= 1, got {a.scale}")
    need(len(a.jitter) == 4 and min(a.jitter) >= 0, "augment.jitter: expected 4 values >= 0")
    need(a.jitter[3] <= 0.5, "augment.jitter: hue must be <= 0.5")
    for key in ("jitter_p", "blur_p", "hflip_p", "grayscale_p"):
        need(0 <= getattr(a, key) <= 1, f"augment.{key}: must be a probability in [0, 1]")
    need(a.blur_kernel % 2 == 1, f"augment.blur_kernel: must be odd, got {a.blur_kernel}")
    e = cfg.eval
    for spec in e.scorers:
        name, _ = parse_scorer(spec)
        need(
            name in SCORERS,
            f"eval.scorers: unknown scorer {name!r}; choose from {', '.join(SCORERS)}",
        )
    need(e.resize_ratio >= 1.0, "eval.resize_ratio: must be >= 1")
    need(e.n_crops >= 1, "eval.n_crops: must be >= 1")
    need(e.bank_size is None or e.bank_size >= 1, "eval.bank_size: must be >= 1")
    need(e.bank_centroids is None or e.bank_centroids >= 1, "eval.bank_centroids: must be >= 1")


def parse_scorer(spec: str) -> tuple[str, dict[str, Any]]:
    """'knn_cos:k=5' -> ('knn_cos', {'k': 5})."""
    name, _, rest = spec.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"eval.scorers: {spec!r}: parameters are written name:key=value")
        params[key.strip()] = yaml.safe_load(value)
    return name.strip(), params


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    cfg = _build(RunConfig, data, "")
    _check_values(cfg)
    return cfg


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` strings (values parsed as YAML) to a recipe dict."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write it as section.key=value")
        _set_path(data, key.strip(), yaml.safe_load(value))
    return data


def recipes_dir() -> Path:
    """Recipes ship inside the package (src/firmad/configs)."""
    return Path(__file__).parent / "configs"


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def read_recipe(name_or_path: str) -> dict[str, Any]:
    """A recipe file path, or the name of a shipped recipe (`fmnist-cpu`)."""
    path = Path(name_or_path)
    if not path.exists():
        candidate = recipes_dir() / f"{name_or_path}.yaml"
        if not candidate.exists():
            raise ConfigError(
                f"recipe {name_or_path!r} not found: give a YAML file path or one of "
                f"{', '.join(available_recipes())}"
            )
        path = candidate
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (data, method, train, ...)")
    base = data.pop("base", None)
    if base is not None:
        # A recipe may extend another one; its keys override the base's.
        merged = read_recipe(str(base))
        _deep_update(merged, data)
        data = merged
    return data


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


def load_config(recipe: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    data = read_recipe(recipe) if recipe else {}
    apply_overrides(data, overrides or [])
    return config_from_dict(data)


def save_config(cfg: RunConfig, path: Path) -> None:
    from firmad.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
