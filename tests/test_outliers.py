"""Tests for firmad.outliers: batched synthetic outliers, registry, frozen and fresh modes."""

from __future__ import annotations

import pytest
import torch

from firmad.errors import ConfigError, InputError
from firmad.outliers import (
    OUTLIER_NAMES,
    OUTLIERS,
    OutlierKind,
    apply_kinds,
    cutpaste,
    make_frozen_outliers,
    mixup,
    parse_outliers,
    scramble,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(b: int = 8, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    # Strictly distinct-ish continuous values so moved pixels can be traced.
    return torch.rand(b, c, h, w, generator=_gen(seed))


@pytest.mark.parametrize("name", OUTLIER_NAMES)
def test_shape_dtype_range(name: str) -> None:
    x = _images(6)
    y = OUTLIERS[name](x, _gen())
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= 0 and y.max() <= 1
    assert not torch.equal(y, x)


@pytest.mark.parametrize("name", ["mixup", "scramble", "cutpaste", "cutpaste-scar"])
def test_random_ones_are_deterministic_and_seeded(name: str) -> None:
    x = _images(8)
    a, b = OUTLIERS[name](x, _gen(1)), OUTLIERS[name](x, _gen(1))
    c = OUTLIERS[name](x, _gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", ["scramble", "cutpaste", "cutpaste-scar"])
def test_per_sample_randomness(name: str) -> None:
    x = _images(1).repeat(8, 1, 1, 1)
    y = OUTLIERS[name](x, _gen())
    changed = (y != x).any(1).flatten(1)  # (B, H*W) where each sample changed
    assert len({tuple(row.tolist()) for row in changed}) > 1


def test_rotations_and_flip_exact() -> None:
    x = _images(3)
    for k, name in ((1, "rot90"), (2, "rot180"), (3, "rot270")):
        assert torch.equal(OUTLIERS[name](x, _gen()), torch.rot90(x, k, dims=(2, 3)))
    assert torch.equal(OUTLIERS["hflip"](x, _gen()), x.flip(3))
    with pytest.raises(InputError, match="square"):
        OUTLIERS["rot90"](_images(2, h=8, w=12), _gen())


def test_cutpaste_region_and_content() -> None:
    H = W = 64
    x = _images(16, h=H, w=W)
    y = cutpaste(x, _gen(3))
    for i in range(16):
        changed = (y[i] != x[i]).any(0)
        rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
        if rows.numel() == 0:  # source and destination happened to coincide
            continue
        top, bottom = int(rows.min()), int(rows.max()) + 1
        left, right = int(cols.min()), int(cols.max()) + 1
        area = (bottom - top) * (right - left) / (H * W)
        assert area <= 0.16  # the changed pixels lie within one patch of at most ~15 %
        # Outside the patch the image is untouched.
        outside = torch.ones(H, W, dtype=torch.bool)
        outside[top:bottom, left:right] = False
        assert torch.equal(y[i][:, outside], x[i][:, outside])
        # The changed block's content exists somewhere in the original image (the source).
        patch = y[i][:, top:bottom, left:right]
        h, w = patch.shape[1:]
        windows = x[i].unfold(1, h, 1).unfold(2, w, 1)  # (C, H-h+1, W-w+1, h, w)
        hit = (windows == patch[:, None, None]).flatten(3).all(3).all(0)
        assert hit.any()
    # Patch areas over a big batch cover the 2-15 % range.
    x = _images(256, h=H, w=W, seed=1)
    y = cutpaste(x, _gen(4))
    frac = (y != x).any(1).flatten(1).float().mean(1)
    assert frac.max() <= 0.16 and frac.max() > 0.08


def test_scramble_permutes_pixels_only() -> None:
    x = _images(8)
    y = scramble(x, _gen(5))
    # Each channel of each image keeps the same multiset of values.
    torch.testing.assert_close(y.flatten(2).sort(2).values, x.flatten(2).sort(2).values)
    assert (y != x).flatten(1).float().mean() > 0.5


def test_scramble_keeps_margin_when_not_divisible() -> None:
    x = _images(4, h=18, w=18)
    y = scramble(x, _gen())
    assert torch.equal(y[:, :, 16:, :], x[:, :, 16:, :])
    assert torch.equal(y[:, :, :, 16:], x[:, :, :, 16:])
    torch.testing.assert_close(
        y[:, :, :16, :16].flatten(2).sort(2).values, x[:, :, :16, :16].flatten(2).sort(2).values
    )


def test_scramble_cells_are_moved_whole() -> None:
    # 8x8 image, 2x2 cells: every output cell is some input cell, rotated or flipped.
    x = _images(4, h=8, w=8)
    y = scramble(x, _gen(1))
    cells_x = x.unfold(2, 2, 2).unfold(3, 2, 2).reshape(4, 3, 16, 4)
    cells_y = y.unfold(2, 2, 2).unfold(3, 2, 2).reshape(4, 3, 16, 4)
    # Every output cell's sorted content equals some input cell's sorted content.
    sx = cells_x.sort(3).values.permute(0, 2, 1, 3).flatten(2)
    sy = cells_y.sort(3).values.permute(0, 2, 1, 3).flatten(2)
    for b in range(4):
        for j in range(16):
            assert (sx[b] == sy[b, j]).all(1).any()


def test_mixup_is_convex_combination_of_two_images() -> None:
    x = _images(8)
    y = mixup(x, _gen(2))
    assert y.min() >= 0 and y.max() <= 1
    flat_x, flat_y = x.flatten(1), y.flatten(1)
    for i in range(8):
        # y_i = lam * x_i + (1 - lam) * x_j for some j != i and lam in [0, 1]
        best = None
        for j in range(8):
            if j == i:
                continue
            d = flat_x[i] - flat_x[j]
            lam = float(((flat_y[i] - flat_x[j]) @ d) / (d @ d))
            err = float((lam * flat_x[i] + (1 - lam) * flat_x[j] - flat_y[i]).abs().max())
            if best is None or err < best[0]:
                best = (err, lam)
        assert best[0] < 1e-5 and -1e-6 <= best[1] <= 1 + 1e-6


def test_mixup_lambda_distribution() -> None:
    from firmad.outliers import _beta_same

    lam = _beta_same(_gen(), 20000, 0.4, torch.device("cpu"))
    assert lam.min() >= 0 and lam.max() <= 1
    assert abs(float(lam.mean()) - 0.5) < 0.02
    assert abs(float(lam.var()) - 1 / (4 * 1.8)) < 0.01  # Beta(a, a) variance 1/(4(2a+1))


def test_parse_outliers() -> None:
    kinds = parse_outliers("rot90, rot180,rot270")
    assert [k.name for k in kinds] == ["rot90", "rot180", "rot270"]
    kinds = parse_outliers(["rot90", "rot90+cutpaste"])
    assert kinds[1].parts == ("rot90", "cutpaste")
    assert parse_outliers("") == []
    with pytest.raises(ConfigError) as err:
        parse_outliers("rot90,twirl")
    for name in OUTLIER_NAMES:
        assert name in str(err.value)


def test_chained_kind_applies_in_order() -> None:
    x = _images(4)
    kind = OutlierKind("rot90+hflip", ("rot90", "hflip"))
    assert torch.equal(kind.apply(x, _gen()), torch.rot90(x, 1, dims=(2, 3)).flip(3))


def test_make_frozen_outliers() -> None:
    u8 = (torch.rand(5, 3, 16, 16, generator=_gen()) * 255).to(torch.uint8)
    kinds = parse_outliers("rot90,rot180,cutpaste")
    images, ids = make_frozen_outliers(u8, kinds, _gen(), batch_size=2)
    assert images.shape == (15, 3, 16, 16) and images.dtype == torch.uint8
    assert ids.tolist() == [1] * 5 + [2] * 5 + [3] * 5
    assert torch.equal(images[:5], torch.rot90(u8, 1, dims=(2, 3)))
    assert torch.equal(images[5:10], torch.rot90(u8, 2, dims=(2, 3)))
    again, _ = make_frozen_outliers(u8, kinds, _gen(), batch_size=2)
    assert torch.equal(images, again)
    with pytest.raises(InputError):
        make_frozen_outliers(u8.float(), kinds, _gen())


def test_apply_kinds() -> None:
    x = _images(6)
    kinds = parse_outliers("rot90,hflip")
    ids = torch.tensor([0, 1, 2, 1, 0, 2])
    y = apply_kinds(x, ids, kinds, _gen())
    assert torch.equal(y[[0, 4]], x[[0, 4]])
    assert torch.equal(y[[1, 3]], torch.rot90(x[[1, 3]], 1, dims=(2, 3)))
    assert torch.equal(y[[2, 5]], x[[2, 5]].flip(3))
    with pytest.raises(InputError):
        apply_kinds(x, torch.tensor([0, 1, 3, 0, 0, 0]), kinds, _gen())
