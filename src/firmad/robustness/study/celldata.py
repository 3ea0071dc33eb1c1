"""The images of one study cell: its normals (train and held out), test split and attack
subset, and the other classes' images the inversions start from. Apart from `cell`, so the
branches (`binary`, `one_class`) that `Cell.run` calls can read them without a cycle."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from firmad.robustness.study.config import StudyConfig


@dataclass(frozen=True)
class CellData:
    """The images of a cell (uint8, at the training size). ``train_u8``: the normal training
    images every source model trains on; ``holdout_u8``: ``holdout_n`` more that no model sees
    (the robust reference's accuracy is read on them); the full test split; the stratified
    attack subset (float)."""

    train_u8: torch.Tensor
    holdout_u8: torch.Tensor
    test_u8: torch.Tensor
    test_y: torch.Tensor
    attack_x: torch.Tensor
    attack_y: torch.Tensor
    attack_classes: torch.Tensor


def load_cell_data(cfg: StudyConfig, normal_class: int, seed: int) -> CellData:
    from firmad.config import load_config
    from firmad.data.pool import prepare_images
    from firmad.factory import build_split
    from firmad.robustness.evaluate import stratified_subset

    base = load_config(cfg.recipe, cfg.set)
    base = base.model_copy(
        update={"data": base.data.model_copy(update={"normal_class": normal_class})}
    )
    split = build_split(base)
    normals = prepare_images(split.train_images, base.data.size)
    gen = torch.Generator().manual_seed(seed * 1009 + 3)
    order = torch.randperm(len(normals), generator=gen)
    n_held = min(cfg.holdout_n, len(normals) // 4)
    test_u8 = prepare_images(split.test_images, base.data.size)
    idx = stratified_subset(split.test_labels, cfg.attack_subset, seed)
    return CellData(
        train_u8=normals[order[n_held:].sort().values],
        holdout_u8=normals[order[:n_held].sort().values],
        test_u8=test_u8,
        test_y=split.test_labels,
        attack_x=test_u8[idx].float() / 255,
        attack_y=split.test_labels[idx],
        attack_classes=split.test_classes[idx],
    )


def other_class_images(cfg: StudyConfig, normal_class: int, n: int, gen) -> torch.Tensor:
    """``n`` training images of the other classes (uint8, at the training size, with the
    normals' channels): the starts of Ilyas et al.'s inversions."""
    from firmad.config import load_config
    from firmad.data import load_dataset
    from firmad.data.pool import match_channels, prepare_images

    d = load_config(cfg.recipe, cfg.set).data
    full = load_dataset(d.dataset, "train", d.root)
    pool = full.images[full.labels != normal_class]
    pick = torch.randperm(len(pool), generator=gen)[:n]
    images = prepare_images(pool[pick], d.size)
    return match_channels(images, 1) if d.channels == 1 else images
