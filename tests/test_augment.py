"""Tests for firmad.augment: batched per-sample views and test-time transforms."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from firmad.augment import (
    ViewAugment,
    ViewSettings,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    broadcast_channel,
    color_jitter,
    gaussian_blur,
    random_crops,
    repeat_views,
    rotate90,
    to_float,
)
from firmad.augment import (
    test_transform as centre_transform,
)
from firmad.errors import ConfigError, InputError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(b: int = 8, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    x = torch.rand(b, c, h, w, generator=_gen(seed))
    if c == 3 and b > 1:
        x[0, :, :4, :4] = 0.5  # grey patch: zero saturation, hue undefined
        x[1, 1] = x[1, 0]  # red == green ties
    return x


def test_view_shape_range_dtype() -> None:
    x = _images(6, h=20, w=20)
    out = ViewAugment(size=16)(x, _gen())
    assert out.shape == (6, 3, 16, 16)
    assert out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_view_identity_when_everything_off() -> None:
    x = _images(4)
    aug = ViewAugment(
        size=16, views=ViewSettings(scale=(1.0, 1.0), jitter=(0, 0, 0, 0), blur_p=0.0)
    )
    torch.testing.assert_close(aug(x, _gen()), x, atol=1e-6, rtol=0)


def test_view_deterministic_and_seed_dependent() -> None:
    x = _images(8)
    aug = ViewAugment(size=16)
    a, b = aug(x, _gen(3)), aug(x, _gen(3))
    c = aug(x, _gen(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_view_per_sample_randomness() -> None:
    # The same image repeated must come out different per sample.
    x = _images(1).repeat(8, 1, 1, 1)
    out = ViewAugment(size=16)(x, _gen())
    diffs = (out[1:] - out[:1]).abs().flatten(1).amax(1)
    assert (diffs > 1e-3).all()


def test_view_grayscale_and_one_channel() -> None:
    x = _images(4)
    out = ViewAugment(size=16, views=ViewSettings(grayscale_p=1.0))(x, _gen())
    torch.testing.assert_close(out[:, 0], out[:, 1])
    torch.testing.assert_close(out[:, 1], out[:, 2])
    gray = ViewAugment(size=16)(_images(4, c=1), _gen())
    assert gray.shape == (4, 1, 16, 16)


def test_view_hflip_only() -> None:
    x = _images(4)
    aug = ViewAugment(
        size=16, views=ViewSettings(scale=(1, 1), jitter=(0, 0, 0, 0), blur_p=0.0, hflip_p=1.0)
    )
    torch.testing.assert_close(aug(x, _gen()), x.flip(3), atol=1e-6, rtol=0)


def test_crop_matches_torchvision_resized_crop() -> None:
    from firmad.imageops import crop_resize, rrc_boxes

    x = _images(6, h=32, w=32)
    boxes = rrc_boxes(torch.rand(6, 22, generator=_gen(1)), 32, 32, (0.25, 1.0), (1.0, 1.0))
    assert ((boxes[:, 2] >= 16) & (boxes[:, 2] == boxes[:, 3])).all()  # area >= 25 %, square
    assert (boxes[:, 0] + boxes[:, 2] <= 32).all() and (boxes[:, 1] + boxes[:, 3] <= 32).all()
    out = crop_resize(x, boxes, 32)
    ref = torch.stack(
        [TF.resized_crop(x[i], *[int(v) for v in boxes[i]], [32, 32]) for i in range(6)]
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("ours", "theirs", "lo", "hi"),
    [
        (adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
        (adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
        (adjust_saturation, TF.adjust_saturation, 0.6, 1.4),
        (adjust_hue, TF.adjust_hue, -0.5, 0.5),
    ],
)
def test_color_ops_match_torchvision(ours, theirs, lo, hi) -> None:
    x = _images(8)
    f = lo + (hi - lo) * torch.rand(8, generator=_gen(5))
    out = ours(x, f)
    ref = torch.stack([theirs(x[i], float(f[i])) for i in range(8)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_color_jitter_order_and_identity() -> None:
    x = _images(4)
    ident = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(4, 1)
    torch.testing.assert_close(color_jitter(x, ident), x, atol=1e-5, rtol=0)
    f = torch.tensor([[1.3, 0.7, 1.2, 0.1]]).repeat(4, 1)
    a = color_jitter(x, f, (0, 1, 2, 3))
    ref = TF.adjust_hue(
        TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[2], 1.3), 0.7), 1.2), 0.1
    )
    torch.testing.assert_close(a[2], ref, atol=1e-5, rtol=0)


def test_blur_matches_torchvision() -> None:
    x = _images(6)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.0])
    out = gaussian_blur(x, sigma, 3)
    ref = [TF.gaussian_blur(x[i], [3, 3], [float(sigma[i])] * 2) for i in range(5)]
    torch.testing.assert_close(out[:5], torch.stack(ref), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[5], x[5])  # sigma 0 = untouched


def test_view_config_errors() -> None:
    with pytest.raises(ConfigError, match="scale"):
        ViewAugment(views=ViewSettings(scale=(0.5, 1.5)))
    with pytest.raises(ConfigError, match="blur_kernel"):
        ViewAugment(views=ViewSettings(blur_kernel=4))
    with pytest.raises(ConfigError, match="blur_p"):
        ViewAugment(views=ViewSettings(blur_p=2.0))
    with pytest.raises(InputError):
        ViewAugment()(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), _gen())


def test_to_float_resize_and_channels() -> None:
    u8 = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=_gen())
    x = to_float(u8, size=32)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    torch.testing.assert_close(x[:, 0], x[:, 2])
    same = to_float(u8, channels=1)
    torch.testing.assert_close(same, u8.float() / 255)


def test_test_transform_resize_then_centre_crop() -> None:
    x = _images(2, h=32, w=32)
    out = centre_transform(x, size=32, resize_ratio=1.125)
    ref = TF.center_crop(TF.resize(x, [36, 36], antialias=True), [32, 32])
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_random_crops_per_sample_and_deterministic() -> None:
    x = _images(1, h=32, w=32).repeat(6, 1, 1, 1)
    a = random_crops(x, size=32, gen=_gen(1))
    b = random_crops(x, size=32, gen=_gen(1))
    assert a.shape == (6, 3, 32, 32) and torch.equal(a, b)
    assert ((a[1:] - a[:1]).abs().flatten(1).amax(1) > 1e-3).any()


def test_rotate90() -> None:
    x = _images(2)
    assert torch.equal(rotate90(x, 1), torch.rot90(x, 1, dims=(2, 3)))
    assert torch.equal(rotate90(rotate90(x, 2), 2), x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_matches_eager_and_cpu() -> None:
    x = _images(16, h=32, w=32).cuda()
    graph_aug, eager_aug = ViewAugment(), ViewAugment(cuda_graphs=False)
    for seed in range(6):  # several colour-op orders, replays of the same graph
        a = graph_aug(x, _gen(seed))
        b = eager_aug(x, _gen(seed))
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        c = eager_aug(x.cpu(), _gen(seed))
        torch.testing.assert_close(a.cpu(), c, atol=1e-5, rtol=0)
    first = graph_aug(x, _gen(0))
    graph_aug(x, _gen(1))  # a later replay must not overwrite an earlier result
    torch.testing.assert_close(first, eager_aug(x, _gen(0)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("device_params", [False, True])
def test_grey_batch_is_augmented_once_with_the_same_numbers(seed, device_params) -> None:
    """A grey batch broadcast to 3 channels (what the trainer samples from a grey pool) gets,
    bit for bit, the views of its dense 3-channel copy: same parameters, same maths per channel
    (luma of the three channels, hue a clamp), computed once."""
    uint8 = torch.randint(0, 256, (12, 1, 20, 20), dtype=torch.uint8, generator=_gen(seed))
    grey = repeat_views(to_float(uint8, size=16, channels=3, broadcast=True), 2)
    dense = torch.cat([to_float(uint8, size=16, channels=3)] * 2)
    assert broadcast_channel(grey) is not None and broadcast_channel(dense) is None
    assert torch.equal(grey, dense)
    aug = ViewAugment(
        16,
        ViewSettings(
            scale=(0.3, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), blur_p=0.75, hflip_p=0.5,
            grayscale_p=0.5,
        ),
    )  # fmt: skip
    run = aug.forward_device if device_params else aug
    for _ in range(4):  # several colour-op orders
        state = _gen(seed).get_state()
        got = run(grey, torch.Generator().set_state(state))
        want = run(dense, torch.Generator().set_state(state))
        assert broadcast_channel(got) is not None  # computed on one channel
        assert torch.equal(got, want)
        seed += 10


@pytest.mark.parametrize("op", [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue])
def test_colour_ops_of_a_grey_channel_are_those_of_its_repetition(op) -> None:
    # values a little outside [0, 1] too, as interpolation may leave them
    one = torch.rand(6, 1, 8, 8, generator=_gen(3)) * 1.2 - 0.1
    factor = torch.rand(6, generator=_gen(4)) - 0.5 if op is adjust_hue else torch.rand(6) + 0.5
    want = op(one.expand(-1, 3, -1, -1).contiguous(), factor)
    assert torch.equal(op(one, factor, 3).expand(-1, 3, -1, -1), want)
