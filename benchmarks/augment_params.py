"""Does the NumPy copy of the view-parameter maths pay? Old (NumPy) vs current (torch) side by
side in one process, interleaved: median ms per `ViewAugment.sample_params` call and per whole
`ViewAugment` forward at 1 thread, CPU generator.

    python benchmarks/augment_params.py --old-rev 4e74cce
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from firmad import augment as current


def load_old(rev: str):
    """firmad/augment.py of git revision ``rev`` as a module of its own."""
    src = subprocess.run(["git", "show", f"{rev}:src/firmad/augment.py"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "augment_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("augment_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["augment_old"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-rev", required=True)
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    impls = {"numpy (old)": load_old(args.old_rev).ViewAugment(size=32),
             "torch (current)": current.ViewAugment(size=32)}  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for batch in (64, 512):
        x = torch.rand(batch, 3, 32, 32)
        times = {(name, what): [] for name in impls for what in ("params", "forward")}
        for i in range(args.repeats):
            for name, aug in impls.items():  # interleaved: both see the same machine load
                tic = time.perf_counter()
                aug.sample_params(tuple(x.shape), gen)
                times[name, "params"].append(time.perf_counter() - tic)
                if i % 5 == 0:
                    tic = time.perf_counter()
                    aug(x, gen)
                    times[name, "forward"].append(time.perf_counter() - tic)
        for (name, what), t in times.items():
            print(f"batch {batch:4d}  {name:16s} {what:8s} {statistics.median(t) * 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
