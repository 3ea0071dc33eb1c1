"""The data stage: dataset files in, uint8 (N, C, H, W) tensors and one-class splits out.

`load_dataset` reads Fashion-MNIST, MNIST, CIFAR-10/100 (official formats), image folders
(``folder:PATH``) and ``.npz`` files (``npz:PATH``); `one_vs_rest` and friends build the
one-class protocols; `locate`, `searched_places`, `prepare` and `describe` back the
``firmad data`` commands.
"""

from firmad.data.protocol import (
    OneClassSplit,
    class_index,
    dataset_vs_dataset,
    describe,
    match_images,
    multi_class_normal,
    one_vs_rest,
)
from firmad.data.sources import (
    DATASETS,
    IMAGE_EXTENSIONS,
    ImageDataset,
    load_dataset,
    locate,
    prepare,
    read_idx,
    searched_places,
    write_idx,
)

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "OneClassSplit",
    "class_index",
    "dataset_vs_dataset",
    "describe",
    "load_dataset",
    "locate",
    "match_images",
    "multi_class_normal",
    "one_vs_rest",
    "prepare",
    "read_idx",
    "searched_places",
    "write_idx",
]
