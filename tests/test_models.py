"""Tests for firmad.models: registry, shapes, normalisation layer, head, initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from firmad.errors import ConfigError, InputError
from firmad.models import (
    BACKBONES,
    NORMALISATION,
    Encoder,
    build_backbone,
    build_head,
    normalisation_for,
)

FEATURE_DIMS = {
    "resnet18_cifar": 512,
    "resnet_small": 256,
    "mobilenetv3_small": 576,
    "shufflenetv2_x0_5": 1024,
    "lenet": 128,
}
RESNETS = ["resnet18_cifar", "resnet_small"]


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_names():
    assert set(BACKBONES) == set(FEATURE_DIMS)


@pytest.mark.parametrize("name", list(FEATURE_DIMS))
def test_output_shape_32px(name):
    torch.manual_seed(0)
    enc = build_backbone(name)
    assert isinstance(enc, Encoder)
    assert enc.feature_dim == FEATURE_DIMS[name]
    out = enc(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, FEATURE_DIMS[name])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", RESNETS)
def test_resnets_accept_28px_and_one_channel(name):
    enc = build_backbone(name, in_channels=1, width=0.25).eval()
    with torch.no_grad():
        out = enc(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, enc.feature_dim)


@pytest.mark.parametrize("name", ["mobilenetv3_small", "shufflenetv2_x0_5", "lenet"])
def test_fixed_width_nets_in_channels(name):
    enc = build_backbone(name, in_channels=1).eval()
    with torch.no_grad():
        assert enc(torch.rand(2, 1, 32, 32)).shape == (2, FEATURE_DIMS[name])
    with pytest.raises(ConfigError, match="width"):
        build_backbone(name, width=0.5)


def test_resnet_width_scales_channels_with_floor():
    assert build_backbone("resnet_small", width=0.5).feature_dim == 128
    assert build_backbone("resnet18_cifar", width=0.5).feature_dim == 256
    tiny = build_backbone("resnet_small", width=0.01)
    convs = [m for m in tiny.modules() if isinstance(m, nn.Conv2d)]
    assert min(c.out_channels for c in convs) == 8


def test_resnet18_cifar_architecture():
    enc = build_backbone("resnet18_cifar")
    # The standard CIFAR ResNet-18 without its classifier: 11,168,832 parameters.
    assert _n_params(enc) == 11_168_832
    stem = enc.net.stem[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in enc.modules())
    assert len(enc.net.layers) == 8
    # Kaiming-normal fan_out: std = sqrt(2 / (out_channels * k * k)).
    w = enc.net.layers[7].conv2.weight
    assert w.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.05)
    bn = enc.net.layers[0].bn1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_resnet_small_is_resnet10():
    enc = build_backbone("resnet_small")
    assert len(enc.net.layers) == 4
    assert [b.conv1.out_channels for b in enc.net.layers] == [32, 64, 128, 256]


def test_lenet_has_no_bias():
    enc = build_backbone("lenet")
    params = dict(enc.named_parameters())
    assert not any(name.endswith("bias") for name in params)
    # BN layers without affine parameters: only the 3 convs and the linear layer are learnable.
    assert len(params) == 4
    with pytest.raises(InputError, match="32x32"):
        enc(torch.rand(2, 3, 28, 28))


@pytest.mark.parametrize("name", list(FEATURE_DIMS))
def test_bn_momentum_set_everywhere(name):
    enc = build_backbone(name, bn_momentum=0.9)
    bns = [m for m in enc.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.momentum == 0.9 for m in bns)


def test_normalisation_buffers_applied():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    enc = build_backbone("resnet_small", width=0.25, mean=mean, std=std)
    buffers = dict(enc.named_buffers())
    assert torch.allclose(buffers["normalize.mean"].flatten(), torch.tensor(mean))
    assert torch.allclose(buffers["normalize.std"].flatten(), torch.tensor(std))
    x = torch.rand(2, 3, 8, 8)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(enc.normalize(x), expected)
    # The network sees the normalised input.
    enc.eval()
    with torch.no_grad():
        assert torch.allclose(enc(x), enc.net(expected), atol=1e-6)


def test_normalisation_defaults_and_scalars():
    enc = build_backbone("lenet")
    assert torch.allclose(enc.normalize.mean.flatten(), torch.full((3,), 0.5))
    enc = build_backbone("lenet", mean=0.2860, std=0.3204)
    assert torch.allclose(enc.normalize.std.flatten(), torch.full((3,), 0.3204))
    with pytest.raises(ConfigError, match="mean"):
        build_backbone("lenet", mean=(0.1, 0.2))


def test_normalisation_table():
    assert NORMALISATION["cifar10"] == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    assert NORMALISATION["cifar100"] == ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
    assert normalisation_for("fashion-mnist", 3) == ((0.2860,) * 3, (0.3204,) * 3)
    assert normalisation_for("mnist", 1) == ((0.1307,), (0.3081,))
    assert normalisation_for("cifar100-coarse", 3) == NORMALISATION["cifar100"]
    assert normalisation_for("folder:/some/images", 3) == ((0.5,) * 3, (0.5,) * 3)


def test_unknown_backbone_lists_names():
    with pytest.raises(ConfigError) as info:
        build_backbone("vit_huge")
    for name in BACKBONES:
        assert name in str(info.value)


def test_wrong_input_channels_is_input_error():
    enc = build_backbone("resnet_small", width=0.25)
    with pytest.raises(InputError, match="channels"):
        enc(torch.rand(2, 1, 32, 32))


def test_determinism_with_manual_seed():
    x = torch.rand(2, 3, 32, 32)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        enc = build_backbone("resnet_small", width=0.25)
        head = build_head(enc.feature_dim, hidden=16, out_dim=8, depth=3)
        outs.append(head(enc(x)))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(124)
    other = build_backbone("resnet_small", width=0.25)
    torch.manual_seed(123)
    same = build_backbone("resnet_small", width=0.25)
    assert not torch.equal(other(x), same(x))


def test_head_paper_structure():
    head = build_head(512)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == (
        [(512, 1024)] + [(1024, 1024)] * 6 + [(1024, 128)]
    )
    assert all(m.bias is None for m in linears)
    bns = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(bns) == 8 and bns[-1].num_features == 128 and not bns[-1].affine
    assert all(m.affine for m in bns[:-1])
    assert sum(isinstance(m, nn.ReLU) for m in head.modules()) == 7


@pytest.mark.parametrize("depth", [0, 1, 2, 4])
def test_head_output_unit_norm(depth):
    head = build_head(32, hidden=16, out_dim=8, depth=depth)
    out = head(torch.randn(5, 32))
    assert out.shape == (5, 32 if depth == 0 else 8)
    assert head.out_dim == out.shape[1]
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-5)
    if depth == 1:
        assert sum(isinstance(m, nn.Linear) for m in head.modules()) == 1


def test_head_invalid_depth():
    with pytest.raises(ConfigError, match="depth"):
        build_head(32, depth=-1)


def test_encoder_and_head_train_step_backprop():
    torch.manual_seed(0)
    enc = build_backbone("resnet_small", width=0.25)
    head = build_head(enc.feature_dim, hidden=32, out_dim=16, depth=2)
    z = head(enc(torch.rand(4, 3, 32, 32)))
    z.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
