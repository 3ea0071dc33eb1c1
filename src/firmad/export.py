"""Export a detector to ONNX: one graph from a uint8 image batch to anomaly scores.

The graph holds the whole path: uint8 -> [0, 1] -> resize / channel repeat / test transform ->
rotations (angled variant) -> encoder (normalisation inside) -> scorer, with the feature bank
and fitted statistics as constants (kNN is matmul + top-k; no faiss). Input: ``images``, uint8
(N, C, H, W) at the size the detector was fitted on, any N; output: ``scores`` float32 (N,).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from firmad.errors import ConfigError


class ScoreGraph(nn.Module):
    """The detector's scoring path as one module on uint8 input (float32 throughout)."""

    def __init__(self, detector) -> None:
        super().__init__()
        self.extractor = copy.deepcopy(detector.extractor_).cpu().float().eval()
        self.scorer = copy.deepcopy(detector.scorer_).cpu().float().eval()
        for scorer in self.scorer.per_angle:
            if hasattr(scorer, "knn_backend"):
                scorer.knn_backend = "torch"  # faiss is not part of a graph

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scorer(self.extractor, images.float() / 255.0)


def export_onnx(detector, path: str | Path, opset: int = 18) -> Path:
    """Write ``path`` (an .onnx file, atomically); returns it."""
    from firmad.io import atomic_write_bytes

    detector._check_fitted()
    if detector.scorer_.variant == "ensemble":
        raise ConfigError(
            "the ensemble variant draws random crops at every call and has no fixed graph; "
            "export a detector with variant 'plain' or 'angled'"
        )
    graph = ScoreGraph(detector).eval()
    c, h, w = detector.input_shape_
    example = torch.zeros(2, c, h, w, dtype=torch.uint8)
    try:
        program = torch.onnx.export(
            graph,
            (example,),
            input_names=["images"],
            output_names=["scores"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    except ImportError as err:
        raise ConfigError(
            f"ONNX export needs the onnx and onnxscript packages ({err}); "
            "pip install 'firmad[export]'"
        ) from None
    path = Path(path)
    atomic_write_bytes(path, strip_stack_traces(program.model_proto).SerializeToString())
    return path


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
