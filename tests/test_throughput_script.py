"""The throughput benchmark runs end to end at tiny sizes and prints one complete JSON object.

No timing assertions: the machine is shared, only the shape and sanity of the output are checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


def test_throughput_script_prints_complete_json() -> None:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--steps",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--data",
        "random",
        "--backbone",
        "resnet_small",
        "--width",
        "0.25",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--sync-free",
        "--models",
        "2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)  # stdout holds the JSON object and nothing else

    assert out["backbone"] == "resnet_small"
    assert out["device"] == "cpu"
    for key in ("limit", "firmad", "reference", "firmad_over_limit", "firmad_over_reference"):
        assert isinstance(out[key], float) and out[key] > 0, (key, out[key])
    # The ratios are the ratios of the medians printed alongside them.
    assert abs(out["firmad_over_limit"] - out["firmad"] / out["limit"]) < 0.01
    assert abs(out["firmad_over_reference"] - out["firmad"] / out["reference"]) < 0.01
    s = out["settings"]
    assert (s["batch"], s["views_per_step"], s["size"], s["data"]) == (32, 64, 32, "random")
    assert s["threads"] == 1 and s["width"] == 0.25
    assert s["amp"] == "none" and s["channels_last"] is False and s["compile"] is False
    assert isinstance(s["torch"], str) and s["torch"]
    assert all(len(v) == 1 and v[0] > 0 for v in out["segments"].values())
    # The sync-free step and two models in turn (views/s of both together).
    assert s["sync_free"] is True and s["cuda_graph"] is False
    assert out["models"] == 2 and out["firmad_models"] > 0
    assert out["limit_graphed"] is None  # CUDA only
