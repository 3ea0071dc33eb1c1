"""Build the committed Fashion-MNIST test fixture from the real dataset files.

Picks 100 training and 50 test images per class with a fixed seed and writes them as gzipped
IDX files with the official names under tests/fixtures/fashion-mnist/, so that
``load_dataset("fashion-mnist", root="tests/fixtures/fashion-mnist")`` reads them. The output is
byte-for-byte reproducible (fixed seed, no time stamp in the gzip header).

Usage: python scripts/make_fixtures.py [--source DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from firmad.data import load_dataset, write_idx

PER_CLASS = {"train": 100, "test": 50}
PREFIX = {"train": "train", "test": "t10k"}
SEED = 0


def pick(labels: torch.Tensor, per_class: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted indices of per_class random examples of each class."""
    chosen = []
    for c in range(int(labels.max()) + 1):
        members = torch.nonzero(labels == c).flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    return torch.cat(chosen).sort().values


def main() -> None:
    repo = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=None, help="folder of the real files")
    parser.add_argument("--out", default=str(repo / "tests" / "fixtures" / "fashion-mnist"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED)
    for split, per_class in PER_CLASS.items():
        data = load_dataset("fashion-mnist", split, root=args.source)
        keep = pick(data.labels, per_class, gen)
        images = data.images[keep, 0].numpy()
        labels = data.labels[keep].numpy().astype("uint8")
        write_idx(out / f"{PREFIX[split]}-images-idx3-ubyte.gz", images)
        write_idx(out / f"{PREFIX[split]}-labels-idx1-ubyte.gz", labels)
        print(f"{split}: {len(keep)} images from {data.source} -> {out}")


if __name__ == "__main__":
    main()
