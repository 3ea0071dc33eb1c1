"""Training throughput of firmad's step against its own limit and against the papers' pipeline.

Four pipelines, one process, one backbone, one device, one batch (32 samples = 64 views):

- ``limit``: forward + backward + SGD step of the same model and loss on ready-made float views
  already on the device (no sampling, no outliers, no augmentation): what any pipeline could at
  best reach with the run's precision and memory layout.
- ``plain``: the same step in fp32 with contiguous (NCHW) tensors, whatever the run's options:
  the baseline the fast path (channels-last, bf16 autocast) is measured against.
- ``firmad``: the real ``Trainer.train_step()`` of ``firmad train`` (uint8 pool on the device,
  frozen outliers, batched per-sample augmentation, FIRM loss, SGD step).
- ``reference``: the papers' pipeline, written here for comparison only: a Dataset of PIL images
  (normals + frozen rotated copies), torchvision transforms per image, two views per sample,
  a DataLoader with 2 workers, then the same model step.

Precision and layout follow the recipe unless given: ``--amp auto`` (the default: bf16 autocast
where the CPU or GPU computes bf16 natively, see `firmad doctor`), ``--channels-last auto`` (on).
``--amp none --channels-last off`` is the plain fp32 contiguous step.

Options for the fast paths: ``--sync-free`` (the trainer's step without host synchronisation),
``--cuda-graph`` (that step replayed from a CUDA graph, ``train.cuda_graph``; it also times
``limit_graphed``: the bare compute limit, the limit step replayed from a CUDA graph, free of
launch overhead) and ``--models K`` (``firmad_models``: K one-class models in one process, one
step of each in turn on a CUDA stream each, as ``firmad train --classes`` trains them; views/s
of all K together).

The pipelines are timed side by side, interleaved, in ``--repeats`` segments of ``--steps``
steps each after a warm-up. The result is in views per second: 64 views over the median step
time (on the CPU the median over single steps, robust to a shared machine's bursts; on CUDA the
median of the segments' mean step times). One JSON object goes to stdout (progress to stderr).

    python benchmarks/throughput.py --backbone resnet_small --device cpu
    python benchmarks/throughput.py --backbone resnet18_cifar --width 1.0 --head-depth 8 \\
        --device cuda --amp bf16 --channels-last on --data random
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from firmad.config import RunConfig, load_config
from firmad.data import OneClassSplit, one_vs_rest
from firmad.errors import FirmadError
from firmad.factory import build_trainer
from firmad.models import normalisation_for
from firmad.training import Trainer

RECIPE = "fmnist-cpu"
BATCH = 32  # samples per step; two views each


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- data ----------------------------------------------------------------------------------------


def random_split(seed: int = 0, n_train: int = 6000, n_test: int = 10000) -> OneClassSplit:
    """Random uint8 images of Fashion-MNIST's shape (1 x 28 x 28), for machines without it."""
    g = torch.Generator().manual_seed(seed)
    train = torch.randint(0, 256, (n_train, 1, 28, 28), generator=g, dtype=torch.uint8)
    test = torch.randint(0, 256, (n_test, 1, 28, 28), generator=g, dtype=torch.uint8)
    classes = torch.arange(n_test) % 10
    return OneClassSplit(
        train_images=train,
        test_images=test,
        test_labels=(classes != 0).long(),
        test_classes=classes,
        normal_classes=[0],
        classes=[str(i) for i in range(10)],
        dataset="fashion-mnist",
        subsample={
            "max_train": None,
            "max_test": None,
            "seed": seed,
            "n_train": n_train,
            "n_test": n_test,
        },
    )


def load_data(kind: str) -> tuple[OneClassSplit, str]:
    """The real Fashion-MNIST (class 0 normal) when found, else random images of its shape."""
    if kind == "fashion-mnist":
        try:
            return one_vs_rest("fashion-mnist", 0), "fashion-mnist"
        except FirmadError as exc:
            log(f"Fashion-MNIST not available ({exc}); using random images of its shape")
    return random_split(), "random"


# --- the model step shared by `limit` and `reference` --------------------------------------------


def sgd(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The trainer's optimiser: SGD lr 0.01, momentum 0.9, wd 3e-4, fused where available."""
    kw: dict[str, bool] = {"fused": True}
    try:
        torch.optim.SGD([nn.Parameter(torch.zeros(1, device=device))], lr=0.1, **kw)
    except (RuntimeError, TypeError, ValueError):
        kw = {"foreach": True}
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=3e-4, **kw)


class ModelStep:
    """Forward + FIRM loss on the two halves + backward + SGD, as in firmad's step."""

    def __init__(
        self, trainer: Trainer, compile_encoder: bool, normalise: bool = True, plain: bool = False
    ):
        self.model = copy.deepcopy(trainer.model)
        if not normalise:  # the reference normalises in its transforms instead
            self.model.encoder.normalize = nn.Identity()
        self.amp_dtype = trainer.amp_dtype
        self.channels_last = trainer.channels_last
        if plain:  # fp32 and contiguous tensors, whatever the run's options
            self.model = self.model.to(memory_format=torch.contiguous_format)
            self.amp_dtype, self.channels_last = None, False
        self.model.train()
        self.encoder = torch.compile(self.model.encoder) if compile_encoder else self.model.encoder
        self.device = trainer.device
        self.optimizer = sgd(self.model, self.device)
        self.loss_fn = trainer.method.embedding_loss  # the run's method (FIRM)

    def __call__(self, views: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        ):
            z = self.model.head(self.encoder(views)).float()
            loss = self.loss_fn(z, labels)  # the two views' halves, as firmad's step
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


# --- the papers' pipeline ------------------------------------------------------------------------


class PaperDataset(torch.utils.data.Dataset):
    """Normals (label 0) plus one frozen rotated copy per rotation (label -1), as PIL images
    upsampled to 32 px and repeated to RGB; two independently transformed views per item."""

    def __init__(self, images_uint8: torch.Tensor, size: int, transform: Callable):
        from PIL import Image

        self.transform = transform
        self.items: list[tuple[Any, int]] = []
        for img in images_uint8:
            arr = img.permute(1, 2, 0).squeeze(2).numpy()
            pil = Image.fromarray(arr).resize((size, size), Image.BILINEAR).convert("RGB")
            self.items.append((pil, 0))
            for angle in (90, 180, 270):
                self.items.append((pil.rotate(angle), -1))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        img, label = self.items[i]
        return self.transform(img), self.transform(img), label


def reference_loader(images: torch.Tensor, size: int, dataset: str, channels: int, seed: int):
    from torchvision import transforms as T

    mean, std = normalisation_for(dataset, channels)
    transform = T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.25, 1.0), ratio=(1.0, 1.0)),
            T.ColorJitter(0.4, 0.4, 0.4, 0.4),
            T.RandomApply([T.GaussianBlur(3, (0.1, 2.0))], p=0.75),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    ds = PaperDataset(images, size, transform)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=BATCH,
        shuffle=True,
        num_workers=2,
        persistent_workers=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


class ReferenceStep:
    """Next batch from the DataLoader (restarting the epoch when it ends) + the model step."""

    def __init__(self, loader, step: ModelStep):
        self.loader, self.step, self.it = loader, step, iter(loader)
        self.device = step.device

    def next_batch(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)

    def __call__(self) -> torch.Tensor:
        v1, v2, labels = self.next_batch()
        views = torch.cat([v1, v2]).to(self.device, non_blocking=True)
        return self.step(views, labels.to(self.device, non_blocking=True))


# --- timing --------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK = {"wall": time.perf_counter, "cpu": time.thread_time}
clock = CLOCK["wall"]


def timed(fn: Callable[[], Any], steps: int, device: torch.device) -> list[float]:
    """Seconds per step for ``steps`` calls of ``fn``, device work included.

    On the CPU every step is timed on its own: the median over single steps shrugs off the
    bursts of a shared machine. On CUDA steps overlap (the host runs ahead of the device), so
    the segment is timed as a whole and its mean step time returned. ``--clock cpu`` times the
    CPU seconds of the main thread instead (one thread only): a step's own work, without the
    time other jobs of a crowded machine held the core.
    """
    if device.type == "cuda":
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        return [(time.perf_counter() - t0) / steps]
    times = []
    for _ in range(steps):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return times


class GraphedLimit:
    """The limit step (same model, loss and SGD as ``ModelStep``) captured once in a CUDA graph
    and replayed: forward + backward + SGD with nothing but the kernels -- the bare compute
    limit of a step on this device. SGD runs as foreach ops (the trainer's sync-free update)."""

    def __init__(self, step: ModelStep, views: torch.Tensor, labels: torch.Tensor):
        self.step, self.views, self.labels = step, views, labels
        self.params = [p for p in step.model.parameters() if p.requires_grad]
        self.bufs = [torch.zeros_like(p) for p in self.params]
        self.graph = None

    def body(self) -> torch.Tensor:
        s = self.step
        views = self.views
        if s.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        for p in self.params:
            p.grad = None
        with torch.autocast(
            s.device.type,
            dtype=s.amp_dtype or torch.float32,
            enabled=s.amp_dtype is not None,
            cache_enabled=False,
        ):
            z = s.model.head(s.encoder(views)).float()
            z1, z2 = z.chunk(2)
            loss = s.loss_fn(z1, z2, self.labels)
        loss.backward()
        with torch.no_grad():
            grads = torch._foreach_add([p.grad for p in self.params], self.params, alpha=3e-4)
            torch._foreach_mul_(self.bufs, 0.9)
            torch._foreach_add_(self.bufs, grads)
            torch._foreach_add_(self.params, self.bufs, alpha=-0.01)
        return loss.detach()

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.body()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss = self.body()
        self.graph.replay()
        return self.loss


class Together:
    """One step of each of K trainers, each queued on a CUDA stream of its own (on the CPU one
    after the other): `firmad.training.fit_together`'s loop without its bookkeeping."""

    def __init__(self, trainers: list[Trainer]):
        self.trainers = trainers
        cuda = trainers[0].device.type == "cuda"
        self.streams = [torch.cuda.Stream() if cuda else None for _ in trainers]
        for stream in self.streams:
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream())

    def __call__(self) -> None:
        for trainer, stream in zip(self.trainers, self.streams, strict=True):
            if stream is None:
                trainer.train_step()
            else:
                with torch.cuda.stream(stream):
                    trainer.train_step()
        for stream in self.streams:
            if stream is not None:
                torch.cuda.current_stream().wait_stream(stream)


def run_config(args) -> RunConfig:
    overrides = [
        f"model.backbone={args.backbone}",
        f"train.device={args.device}",
        f"train.amp={args.amp}",
        f"train.channels_last='{args.channels_last}'",
        f"train.compile={'true' if args.compile else 'false'}",
        f"train.batch_size={BATCH}",
        "train.epochs=1000",  # the one-cycle schedule must outlast all timed steps
    ]
    if args.width is not None:
        overrides.append(f"model.width={args.width}")
    if args.head_depth is not None:
        overrides.append(f"model.head_depth={args.head_depth}")
    if args.head_hidden is not None:
        overrides.append(f"model.head_hidden={args.head_hidden}")
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    if args.cuda_graph:
        overrides.append("train.cuda_graph=true")
    return load_config(RECIPE, overrides)


def make_trainer(args, cfg: RunConfig, split: OneClassSplit) -> Trainer:
    trainer = build_trainer(cfg, split=split)
    if args.sync_free and not trainer.sync_free:
        trainer.enable_sync_free()
    return trainer


def scoring_time(trainer: Trainer, cfg: RunConfig, split: OneClassSplit) -> dict[str, float]:
    """Features of bank and test set + kNN (k = 5, knn_cos): seconds, from the model as is."""
    from firmad.scoring import ExtractOptions, build_scorer, extract_features

    enc = trainer.model.encoder
    dev = trainer.device
    opts = ExtractOptions(cfg.data.size, channels=cfg.data.channels, device=dev)
    # Warm-up on a few images (first-call allocations, cuDNN autotuning).
    extract_features(enc, split.train_images[:256], opts)
    sync(dev)
    t0 = time.perf_counter()
    bank = extract_features(enc, split.train_images, opts)
    test = extract_features(enc, split.test_images, opts)
    t1 = time.perf_counter()
    scores = build_scorer("knn_cos", k=5).fit(bank).score(test)
    t2 = time.perf_counter()
    assert len(scores) == len(split.test_images)
    return {
        "scoring_s": t2 - t0,
        "scoring_features_s": t1 - t0,
        "scoring_knn_s": t2 - t1,
        "scoring_bank": len(split.train_images),
        "scoring_test": len(split.test_images),
    }


def profile_firmad(trainer: Trainer, steps: int, rows: int = 15) -> None:
    """torch.profiler table of ``steps`` firmad steps (top ops by self time) on stderr."""
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            trainer.train_step()
        sync(trainer.device)
    for key in (
        ("self_cpu_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
    ):
        log(f"profile of {steps} firmad steps, by {key}:")
        log(prof.key_averages().table(sort_by=key, row_limit=rows))


def summary(folder: str, names: list[str]) -> list[str]:
    """One line per measurement JSON (``folder/NAME.json``, as gpu_check.sh writes them)."""
    lines = []
    for name in names:
        try:
            r = json.loads(Path(folder, f"{name}.json").read_text())
        except (OSError, ValueError):
            lines.append(f"{name:9s} no result")
            continue
        line = f"{name:9s} firmad {r['firmad']:7.0f} = x{r['firmad_over_limit']} of the limit"
        line += f" ({r['limit']:.0f})"
        if r.get("limit_graphed"):
            line += (
                f", x{r['firmad_over_limit_graphed']} of the bare compute limit "
                f"({r['limit_graphed']:.0f})"
            )
        if r.get("firmad_models"):
            line += (
                f"; {r['models']} models together {r['firmad_models']:.0f} "
                f"(x{r['firmad_models_over_firmad']} of one)"
            )
        if r.get("plain"):
            line += f"; x{r['firmad_over_plain']} of plain fp32 ({r['plain']:.0f})"
        if r.get("reference"):
            line += f"; papers' pipeline {r['reference']:.0f}"
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--summary"]:  # --summary DIR NAME...: the table that ends gpu_check.sh
        print("\n".join(summary(argv[1], argv[2:])))
        return {}
    try:
        return _main(argv)
    except FirmadError as exc:
        raise SystemExit(f"error: {exc}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet_small")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=None, help="steps per timed segment")
    p.add_argument(
        "--ref-steps",
        type=int,
        default=None,
        help="steps per reference segment (default: --steps; at most 20 on cuda)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed segments per pipeline")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per pipeline")
    p.add_argument("--data", default="fashion-mnist", choices=["fashion-mnist", "random"])
    p.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "bf16", "fp16", "none"],
        help="autocast precision (default auto: the recipe's; bf16 where native, else fp32)",
    )
    p.add_argument(
        "--channels-last",
        nargs="?",
        const="on",
        default="auto",
        choices=["auto", "on", "off"],
        help="memory layout (default auto: the recipe's, on; a bare --channels-last: on)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument("--width", type=float, default=None, help="backbone width (recipe: 0.5)")
    p.add_argument("--head-depth", type=int, default=None, help="head layers (recipe: 2)")
    p.add_argument("--head-hidden", type=int, default=None, help="head width (recipe: 256)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--no-reference", action="store_true", help="skip the papers' pipeline")
    p.add_argument(
        "--clock",
        default="wall",
        choices=sorted(CLOCK),
        help="wall seconds, or cpu: CPU seconds of the one thread (needs --threads 1 and "
        "--no-reference; for a crowded machine)",
    )
    p.add_argument("--sync-free", action="store_true", help="the step without host syncs")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay firmad's step from a CUDA graph (train.cuda_graph); also time limit_graphed",
    )
    p.add_argument(
        "--models", type=int, default=1, help="also time K models trained in turn (K > 1)"
    )
    p.add_argument("--scoring", action="store_true", help="also time features + kNN scoring")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="print a torch.profiler table of N firmad steps to stderr",
    )
    args = p.parse_args(argv)
    if args.head_depth is not None and args.head_hidden is None and args.head_depth == 8:
        args.head_hidden = 1024  # the paper's head
    cuda = args.device == "cuda"
    if args.cuda_graph and not cuda:
        raise SystemExit("error: --cuda-graph needs --device cuda")
    if args.clock == "cpu" and (cuda or args.threads != 1 or not args.no_reference):
        raise SystemExit("error: --clock cpu needs --device cpu --threads 1 --no-reference")
    return args


def _main(argv: list[str] | None = None) -> dict[str, Any]:
    global clock
    args = parse_args(argv)
    clock = CLOCK[args.clock]
    cuda = args.device == "cuda"
    steps = args.steps or (50 if cuda else 20)
    ref_steps = args.ref_steps or (min(steps, 20) if cuda else steps)
    warmup = (
        args.warmup if args.warmup is not None else ((30 if args.compile else 10) if cuda else 3)
    )

    split, data = load_data(args.data)
    cfg = run_config(args)
    trainer = make_trainer(args, cfg, split)
    trainer.model.train()
    device = trainer.device
    views_per_step = BATCH * 2

    # Limit: ready-made views on the device with the label mix of the pool (1 in 4 inliers).
    limit_step = ModelStep(trainer, compile_encoder=args.compile)
    g = torch.Generator().manual_seed(1)
    channels, size = cfg.data.channels, cfg.data.size
    views = torch.rand((views_per_step, channels, size, size), generator=g).to(device)
    labels = torch.where(torch.arange(BATCH) % 4 == 0, 0, -1).to(device)

    plain_step = ModelStep(trainer, compile_encoder=args.compile, plain=True)

    def limit() -> torch.Tensor:
        return limit_step(views, labels)

    def plain() -> torch.Tensor:
        return plain_step(views, labels)

    # Each pipeline is (name, step function, steps per segment).
    pipelines: list[tuple[str, Callable[[], Any], int]] = [
        ("limit", limit, steps),
        ("firmad", trainer.train_step, steps),
        ("plain", plain, steps),
    ]
    ref = None
    views_of = {name: views_per_step for name, _, _ in pipelines}
    if args.cuda_graph:
        graphed = GraphedLimit(ModelStep(trainer, compile_encoder=False), views, labels)
        pipelines.insert(1, ("limit_graphed", graphed, steps))
        views_of["limit_graphed"] = views_per_step
    if args.models > 1:
        others = [make_trainer(args, cfg, split) for _ in range(args.models - 1)]
        pipelines.append(("firmad_models", Together([trainer, *others]), steps))
        views_of["firmad_models"] = views_per_step * args.models
    if not args.no_reference:
        log("building the reference dataset (PIL images) ...")
        loader = reference_loader(split.train_images, size, cfg.data.dataset, channels, seed=0)
        ref = ReferenceStep(loader, ModelStep(trainer, args.compile, normalise=False))
        pipelines.append(("reference", ref, ref_steps))
        views_of["reference"] = views_per_step

    for name, fn, _ in pipelines:
        log(f"warm-up {name} ({warmup} steps)")
        timed(fn, warmup, device)
    step_times: dict[str, list[float]] = {name: [] for name, _, _ in pipelines}
    segments: dict[str, list[float]] = {name: [] for name, _, _ in pipelines}  # views/s
    for r in range(args.repeats):
        # Rotate the order each repeat so slow drifts of a shared machine hit all pipelines.
        order = pipelines[r % len(pipelines) :] + pipelines[: r % len(pipelines)]
        for name, fn, n in order:
            if name == "reference":
                # Drain what the workers prefetched while the others ran: time steady state.
                for _ in range(2 * 2):
                    ref.next_batch()
            times = timed(fn, n, device)
            step_times[name] += times
            segments[name].append(views_of[name] / statistics.fmean(times))
            if name == "reference":
                # Let the workers refill their queue now rather than during the next pipeline.
                time.sleep(min(5.0, 4 * statistics.fmean(times)))
        log(
            f"repeat {r + 1}/{args.repeats}: "
            + ", ".join(f"{k} {v[-1]:.0f}" for k, v in segments.items() if v)
            + " views/s"
        )

    med = {name: views_of[name] / statistics.median(v) for name, v in step_times.items()}
    out: dict[str, Any] = {
        "backbone": args.backbone,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else None,
        "limit": round(med["limit"], 1),
        "firmad": round(med["firmad"], 1),
        "reference": round(med["reference"], 1) if "reference" in med else None,
        "plain": round(med["plain"], 1),
        "firmad_over_limit": round(med["firmad"] / med["limit"], 3),
        "firmad_over_plain": round(med["firmad"] / med["plain"], 3),
        "limit_over_plain": round(med["limit"] / med["plain"], 3),
        "firmad_over_reference": (
            round(med["firmad"] / med["reference"], 3) if "reference" in med else None
        ),
        "limit_graphed": round(med["limit_graphed"], 1) if "limit_graphed" in med else None,
        "firmad_over_limit_graphed": (
            round(med["firmad"] / med["limit_graphed"], 3) if "limit_graphed" in med else None
        ),
        "models": args.models,
        "firmad_models": round(med["firmad_models"], 1) if "firmad_models" in med else None,
        "firmad_models_over_firmad": (
            round(med["firmad_models"] / med["firmad"], 3) if "firmad_models" in med else None
        ),
        "units": "views/s: 64 views / median step time (cpu: over single steps; cuda: over "
        "the mean step times of the segments)",
        "segments": {k: [round(x, 1) for x in v] for k, v in segments.items()},
        "settings": {
            "batch": BATCH,
            "views_per_step": views_per_step,
            "size": size,
            "channels": channels,
            "width": cfg.model.width,
            "head_depth": cfg.model.head_depth,
            "head_hidden": cfg.model.head_hidden,
            "data": data,
            "steps": steps,
            "ref_steps": ref_steps if ref is not None else None,
            "repeats": args.repeats,
            "warmup": warmup,
            "threads": torch.get_num_threads(),
            "clock": args.clock,
            "torch": torch.__version__,
            "amp_setting": args.amp,
            "amp": trainer.settings.amp,
            "amp_reason": trainer.settings.checkpoint_meta.get("numerics", {}).get("amp_reason"),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "channels_last": bool(trainer.channels_last),
            "compile": bool(args.compile),
            "sync_free": bool(trainer.sync_free),
            "cuda_graph": bool(args.cuda_graph),
            "params": sum(p.numel() for p in trainer.model.parameters()),
        },
    }
    if ref is not None:
        ref.it = None  # stop the persistent workers before scoring
        del ref, loader
    if args.profile:
        profile_firmad(trainer, args.profile)
    if args.scoring:
        log("timing scoring (features + kNN) ...")
        out.update(
            {
                k: round(v, 3) if isinstance(v, float) else v
                for k, v in scoring_time(trainer, cfg, split).items()
            }
        )
    for k, v in out.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise SystemExit(f"non-finite {k}: {v}")
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
