"""The data stage: dataset files in, uint8 (N, C, H, W) tensors and one-class splits out.

`load_dataset` reads Fashion-MNIST, MNIST, CIFAR-10/100 (official formats), image folders
(``folder:PATH``) and ``.npz`` files (``npz:PATH``); `one_vs_rest` and friends build the
one-class protocols; `locate`, `searched_places`, `prepare` and `describe` back the
``firmad data`` commands.
"""

# Names are imported on first use: `firmad data list` must not wait for torch.
_PROTOCOL = {
    "OneClassSplit", "class_index", "dataset_vs_dataset", "match_images",
    "multi_class_normal", "one_vs_rest",
}  # fmt: skip


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


def __getattr__(name: str):
    if name in __all__:
        import importlib

        module = "protocol" if name in _PROTOCOL else "sources"
        return getattr(importlib.import_module(f"firmad.data.{module}"), name)
    raise AttributeError(f"module 'firmad.data' has no attribute {name!r}")
