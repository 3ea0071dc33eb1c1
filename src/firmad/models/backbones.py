"""Backbones by name: every model is built by :func:`build_backbone` and wrapped in an
:class:`Encoder` whose first layer normalises inputs in [0, 1] with per-channel mean/std buffers.

Registry (``BACKBONES``), all for 32 px inputs (ResNets accept any size >= 8 px):

- ``resnet18_cifar``: the FIRM paper's CIFAR ResNet-18 (3x3 stem, stride 1, no max-pool,
  64-128-256-512, 2 BasicBlocks per stage) -> 512-d.
- ``resnet_small``: the same family with 1 BasicBlock per stage (ResNet-10) at half the width,
  32-64-128-256 -> 256-d at ``width=1.0``. The CPU workhorse.
- ``mobilenetv3_small``, ``shufflenetv2_x0_5``: torchvision's definitions, stem stride 1 (and no
  max-pool for ShuffleNet) for 32 px inputs, classifier removed -> 576-d / 1024-d.
- ``lenet``: the LeNet-type network of Deep SVDD (Ruff et al. 2018), bias-free -> 128-d.

``bn_momentum`` is set on every BatchNorm layer. The default 0.1 is PyTorch's standard; the FIRM
paper's code used ``momentum=0.9`` in PyTorch's convention (new batch statistics weigh 0.9), so
``bn_momentum=0.9`` reproduces it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from firmad.errors import ConfigError, InputError

__all__ = [
    "BACKBONES",
    "NORMALISATION",
    "Encoder",
    "Normalize",
    "build_backbone",
    "normalisation_for",
]

# Per-channel (mean, std) of the training sets, as used by the FIRM paper's code.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "fashion-mnist": ((0.2860,), (0.3204,)),
    "mnist": ((0.1307,), (0.3081,)),
}

_ALIASES = {
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "cifar100-coarse": "cifar100",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
}


def _fit_channels(values: Sequence[float], channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        # RGB statistics for a grayscale input: the channel average is the closest match.
        return (sum(values) / len(values),)
    raise ConfigError(
        f"normalisation has {len(values)} values but the input has {channels} channels"
    )


def normalisation_for(dataset_name: str, channels: int = 3) -> tuple[tuple[float, ...], ...]:
    """(mean, std) tuples of length ``channels`` for a dataset name; 0.5/0.5 for unknown names.

    Grayscale statistics are repeated to 3 channels (Fashion-MNIST is fed to RGB networks as
    3 identical channels).
    """
    key = dataset_name.lower()
    key = _ALIASES.get(key, key)
    mean, std = NORMALISATION.get(key, ((0.5,), (0.5,)))
    return _fit_channels(mean, channels), _fit_channels(std, channels)


class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean/std as buffers (saved in checkpoints)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if any(s <= 0 for s in std):
            raise ConfigError(f"normalisation std must be > 0; got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class Encoder(nn.Module):
    """Normalisation layer + network: ``forward(x01 (B, C, H, W)) -> (B, feature_dim)``."""

    def __init__(
        self,
        net: nn.Module,
        feature_dim: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        name: str = "",
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.feature_dim = int(feature_dim)
        self.in_channels = int(in_channels)
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InputError(
                f"encoder {self.name!r} expects images (B, {self.in_channels}, H, W) in [0, 1]; "
                f"got shape {tuple(x.shape)} (convert with firmad.augment.to_float(..., "
                f"channels={self.in_channels}))"
            )
        return self.net(self.normalize(x))


# ---------------------------------------------------------------- CIFAR ResNets


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (1x1 conv shortcut when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class CifarResNet(nn.Module):
    """ResNet for small images: 3x3 stem, stride 1, no max-pool, 4 stages, global average pool."""

    def __init__(self, in_channels: int, channels: Sequence[int], blocks: Sequence[int]) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            _conv3x3(in_channels, channels[0]), nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True)
        )
        layers: list[nn.Module] = []
        cin = channels[0]
        for i, (cout, n) in enumerate(zip(channels, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            for b in range(n):
                layers.append(BasicBlock(cin, cout, stride if b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.out_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def _scaled(base: Sequence[int], width: float) -> list[int]:
    return [max(8, int(round(c * width))) for c in base]


def _resnet18_cifar(in_channels: int, width: float) -> tuple[nn.Module, int]:
    net = CifarResNet(in_channels, _scaled((64, 128, 256, 512), width), (2, 2, 2, 2))
    return net, net.out_dim


def _resnet_small(in_channels: int, width: float) -> tuple[nn.Module, int]:
    net = CifarResNet(in_channels, _scaled((32, 64, 128, 256), width), (1, 1, 1, 1))
    return net, net.out_dim


# ---------------------------------------------------------------- torchvision nets


def _new_stem_conv(old: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """Same stem conv with stride 1 (32 px inputs) and the requested input channels."""
    conv = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        stride=1,
        padding=old.padding,
        bias=old.bias is not None,
    )
    nn.init.kaiming_normal_(conv.weight, mode="fan_out")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class _PooledFeatures(nn.Module):
    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)


def check_width(name: str, width: float) -> None:
    """Only the CIFAR ResNets scale their channels; the others take width 1.0."""
    if width != 1.0 and name not in WIDTH_SCALABLE:
        raise ConfigError(
            f"backbone {name!r} has a fixed width; width={width} is only supported by "
            f"{' and '.join(WIDTH_SCALABLE)}: set model.width=1.0"
        )


def _mobilenetv3_small(in_channels: int, width: float) -> tuple[nn.Module, int]:
    import torchvision  # imported when used: it takes seconds to import

    check_width("mobilenetv3_small", width)
    tv = torchvision.models.mobilenet_v3_small(weights=None)
    features = tv.features
    features[0][0] = _new_stem_conv(features[0][0], in_channels)
    return _PooledFeatures(features), features[-1][0].out_channels


def _shufflenetv2_x0_5(in_channels: int, width: float) -> tuple[nn.Module, int]:
    import torchvision

    check_width("shufflenetv2_x0_5", width)
    tv = torchvision.models.shufflenet_v2_x0_5(weights=None)
    tv.conv1[0] = _new_stem_conv(tv.conv1[0], in_channels)
    # No max-pool: at 32 px the stem plus three stride-2 stages already give 4x4 maps.
    features = nn.Sequential(tv.conv1, tv.stage2, tv.stage3, tv.stage4, tv.conv5)
    return _PooledFeatures(features), tv.conv5[0].out_channels


# ---------------------------------------------------------------- Deep SVDD LeNet


class LeNetSVDD(nn.Module):
    """Deep SVDD's CIFAR LeNet: 3x (conv5x5 -> BN(affine=False) -> LeakyReLU -> max-pool 2),
    then a linear map to 128-d. No layer has a bias (a bias lets Deep SVDD collapse)."""

    def __init__(self, in_channels: int, rep_dim: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in (32, 64, 128):
            layers += [
                nn.Conv2d(cin, cout, 5, padding=2, bias=False),
                nn.BatchNorm2d(cout, eps=1e-4, affine=False),
                nn.LeakyReLU(0.01),
                nn.MaxPool2d(2),
            ]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(128 * 4 * 4, rep_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (32, 32):
            raise InputError(
                f"lenet needs 32x32 inputs; got {tuple(x.shape[-2:])} "
                "(resize with firmad.augment.to_float(..., size=32))"
            )
        return self.fc(torch.flatten(self.features(x), 1))


def _lenet(in_channels: int, width: float) -> tuple[nn.Module, int]:
    check_width("lenet", width)
    return LeNetSVDD(in_channels), 128


# ---------------------------------------------------------------- registry

# name -> builder(in_channels, width) -> (network, feature_dim)
BACKBONES: dict[str, Callable[[int, float], tuple[nn.Module, int]]] = {
    "resnet18_cifar": _resnet18_cifar,
    "resnet_small": _resnet_small,
    "mobilenetv3_small": _mobilenetv3_small,
    "shufflenetv2_x0_5": _shufflenetv2_x0_5,
    "lenet": _lenet,
}
WIDTH_SCALABLE = ("resnet18_cifar", "resnet_small")


def set_bn_momentum(module: nn.Module, momentum: float) -> None:
    """Set ``momentum`` on every BatchNorm layer of ``module``."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def build_backbone(
    name: str,
    in_channels: int = 3,
    width: float = 1.0,
    bn_momentum: float = 0.1,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
) -> Encoder:
    """Build a registered backbone wrapped in an :class:`Encoder`.

    ``width`` multiplies the channel counts of the ResNets (at least 8 channels per layer);
    the other networks only accept 1.0. ``mean``/``std`` (one value or one per channel; e.g.
    from :func:`normalisation_for`) default to 0.5/0.5. Weights are randomly initialised from
    the global torch RNG (seed it with ``torch.manual_seed`` for reproducible models).
    """
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; use one of {', '.join(BACKBONES)}")
    if in_channels < 1:
        raise ConfigError(f"in_channels must be >= 1; got {in_channels}")
    if not width > 0:
        raise ConfigError(f"width must be > 0; got {width}")
    if not 0.0 <= bn_momentum <= 1.0:
        raise ConfigError(f"bn_momentum must be in [0, 1]; got {bn_momentum}")

    def as_tuple(v, default: float, what: str) -> tuple[float, ...]:
        if v is None:
            v = default
        if isinstance(v, (int, float)):
            v = (v,)
        try:
            return _fit_channels(v, in_channels)
        except ConfigError as exc:
            raise ConfigError(f"{what}: {exc}") from exc

    mean_t = as_tuple(mean, 0.5, "mean")
    std_t = as_tuple(std, 0.5, "std")
    net, feature_dim = BACKBONES[name](in_channels, width)
    set_bn_momentum(net, bn_momentum)
    return Encoder(net, feature_dim, in_channels, mean_t, std_t, name=name)
