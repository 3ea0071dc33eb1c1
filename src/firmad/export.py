"""Export a detector to ONNX: one graph from a uint8 image batch to anomaly scores.

The graph holds the whole path: uint8 -> [0, 1] -> resize / channel repeat / test transform ->
rotations (angled variant) -> encoder (normalisation inside) -> scorer, with the feature bank
and fitted statistics as constants (kNN is matmul + top-k; no faiss). Input: ``images``, uint8
(N, C, H, W) at the size the detector was fitted on, any N; output: ``scores`` float32 (N,).

Everything before the graph is the caller's job and is written down as a contract: in the
model's ``metadata_props`` (key ``firmad.contract``) and in a sidecar JSON next to the model
(``det.onnx.json``): input name, dtype, shape, layout, channel order, how to decode and resize
(Pillow's bilinear filter, as `firmad score` does), the threshold and what the score means.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from firmad.anomaly_model import AnomalyModel
from firmad.errors import ConfigError, InputError
from firmad.outputs import check_file, write_together
from firmad.scoring.scales import score_scale
from firmad.versions import __version__


class ScoreGraph(nn.Module):
    """An AnomalyModel's scoring path as one module on uint8 input (float32 throughout)."""

    def __init__(self, model: AnomalyModel) -> None:
        super().__init__()
        self.extractor = copy.deepcopy(model.extractor).cpu().float().eval()
        self.scorer = copy.deepcopy(model.scorer).cpu().float().eval()
        for scorer in self.scorer.per_angle:
            if hasattr(scorer, "knn_backend"):
                scorer.knn_backend = "torch"  # faiss is not part of a graph

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scorer(self.extractor, images.float() / 255.0)


def export_onnx(model, path: str | Path, opset: int = 18, threshold: float | None = None) -> Path:
    """Write ``path`` (an .onnx file holding the contract in its metadata) and its sidecar
    contract ``path + ".json"``, both or neither; returns the model's path. ``model``: an
    `AnomalyModel` (with its ``threshold``), or a fitted `OneClassDetector` (its model and
    ``threshold_``). The paths are checked first (`check_export_paths`): a sidecar of the
    user's is never overwritten."""
    check_export_paths(path)
    if not isinstance(model, AnomalyModel):
        threshold = getattr(model, "threshold_", None) if threshold is None else threshold
        model = _model_of(model)
    if model.scorer.variant == "ensemble":
        raise ConfigError(
            "the ensemble variant draws random crops at every call and has no fixed graph; "
            "export a detector with variant 'plain' or 'angled'"
        )
    graph = ScoreGraph(model).eval()
    c, h, w = model.input_shape
    example = torch.zeros(2, c, h, w, dtype=torch.uint8)
    try:
        # fp32 whatever the caller's autocast: the graph computes what score_tensor computes
        with quiet_exporter(), torch.autocast("cpu", enabled=False):
            program = torch.onnx.export(
                graph,
                (example,),
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_shapes={INPUT: {0: torch.export.Dim("batch")}},
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
    except ImportError as err:
        raise ConfigError(
            f"ONNX export needs the onnx and onnxscript packages ({err}); "
            "pip install 'firmad[export]'"
        ) from None
    contract = onnx_contract(model, threshold)
    model = strip_stack_traces(program.model_proto)
    add_contract(model, contract)
    path = Path(path)
    text = json.dumps(contract, indent=2) + "\n"
    check_export_paths(path)  # again: the export took a while
    write_together([(path, model.SerializeToString()), (sidecar_path(path), text.encode("utf-8"))])
    return path


def check_export_paths(path: str | Path) -> None:
    """Both files of an export can be written: regular files or new ones in a writable folder;
    the sidecar, when it exists, is an earlier export's contract (never a file of the user's)."""
    check_file(path, "--out", example="det.onnx")
    side = sidecar_path(path)
    check_file(side, "--out", example="det.onnx")
    if not side.exists():
        return
    try:
        ours = json.loads(side.read_bytes()).get("format") == CONTRACT_FORMAT
    except (OSError, ValueError, AttributeError):  # not JSON, or not an object
        ours = False
    if not ours:
        raise InputError(
            f"{side} exists and is not a firmad export's contract; the export writes its "
            f"contract there: move that file, or choose another --out than {path}"
        )


def _model_of(detector) -> AnomalyModel:
    model = getattr(detector, "anomaly_model_", None)
    if not isinstance(model, AnomalyModel):
        raise InputError(
            "export needs a fitted detector (fit it, or OneClassDetector.load(DIR)) or an "
            "AnomalyModel"
        )
    return model


INPUT, OUTPUT = "images", "scores"
CONTRACT_FORMAT = "firmad-onnx-contract-1"
# Loggers of the exporter's graph optimiser: ~20 INFO lines per export ("Removed 109 unused nodes")
_EXPORT_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx")


@contextlib.contextmanager
def quiet_exporter():
    """Keep the exporter's optimiser at WARNING during an export (unless debugging)."""
    loggers = [logging.getLogger(name) for name in _EXPORT_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            if not lg.isEnabledFor(logging.DEBUG):
                lg.setLevel(logging.WARNING)
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def sidecar_path(path: str | Path) -> Path:
    """The contract JSON beside an exported model: ``det.onnx`` -> ``det.onnx.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def onnx_contract(model: AnomalyModel, threshold: float | None = None) -> dict[str, Any]:
    """What a caller must feed the exported graph and what it returns, as JSON-able data."""
    c, h, w = (int(v) for v in model.input_shape)
    vs = model.scorer
    colour = (
        "RGB: grey images repeat their one channel three times (Pillow convert('RGB')); "
        "alpha is dropped"
        if c == 3
        else "grey: colour images are converted with Pillow convert('L')"
    )
    return {
        "format": CONTRACT_FORMAT,
        "firmad_version": __version__,
        "input": {
            "name": INPUT,
            "dtype": "uint8",
            "shape": ["N", c, h, w],
            "layout": "NCHW",
            "channel_order": "RGB" if c == 3 else "grey",
            "value_range": [0, 255],
        },
        "preprocessing": {
            "decode": "any image Pillow reads; EXIF orientation applied "
            "(ImageOps.exif_transpose); 16-bit grey scaled by 1/257",
            "channels": colour,
            "resize": {
                "height": h,
                "width": w,
                "filter": "bilinear",
                "pillow": f"image.resize(({w}, {h}), Image.Resampling.BILINEAR)",
                "aspect": "squashed to the size, no crop",
            },
            "note": "Pillow's default filter (bicubic) differs from the contract by ~1e-2 in "
            "the score; use bilinear",
        },
        "output": {
            "name": OUTPUT,
            "dtype": "float32",
            "shape": ["N"],
            "meaning": "anomaly score: higher = more anomalous",
            # score_scale reads a detector's fitted parts by their estimator names
            "scale": score_scale(SimpleNamespace(scorer_=vs, n_bank_=model.n_bank)),
        },
        "scorer": {
            "name": vs.name,
            "params": {
                k: v
                for k, v in vs.per_angle[0].get_params().items()
                if _plain(v) and k != "knn_backend"  # the graph always uses torch's top-k
            },
            "variant": vs.variant,
        },
        "threshold": None if threshold is None else float(threshold),
        "decision": "anomaly (1) when score > threshold, else normal (0)",
    }


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def add_contract(model, contract: dict[str, Any]):
    """Write the contract into an ONNX ModelProto's metadata_props (in place; returned): the
    whole JSON under ``firmad.contract`` and the most used fields as their own keys."""
    props = {
        "firmad.contract": json.dumps(contract),
        "firmad.version": contract["firmad_version"],
        "input.layout": contract["input"]["layout"],
        "input.channel_order": contract["input"]["channel_order"],
        "input.resize_filter": contract["preprocessing"]["resize"]["filter"],
        "output.meaning": contract["output"]["meaning"],
        "threshold": json.dumps(contract["threshold"]),
    }
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    c, h, w = contract["input"]["shape"][1:]
    model.doc_string = (
        f"firmad anomaly detector: {INPUT} uint8 (N, {c}, {h}, {w}) {contract['input']['layout']} "
        f"{contract['input']['channel_order']}, resized with a bilinear filter -> {OUTPUT} "
        f"float32 (N,), higher = more anomalous; threshold {contract['threshold']}"
    )
    return model


STACK_TRACE = "pkg.torch.onnx.stack_trace"


def strip_stack_traces(model):
    """Drop the exporter's per-node Python stack traces from an ONNX ModelProto (in place;
    returned): they name absolute source paths of the exporting machine and nothing at run time
    reads them."""

    def clean(nodes) -> None:
        for node in nodes:
            kept = [p for p in node.metadata_props if p.key != STACK_TRACE]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
            for attr in node.attribute:  # control flow keeps its bodies as subgraphs
                for sub in [attr.g, *attr.graphs]:
                    clean(sub.node)

    clean(model.graph.node)
    for function in model.functions:
        clean(function.node)
    return model
