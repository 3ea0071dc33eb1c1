"""The throughput benchmark runs end to end at tiny sizes and prints one complete JSON object.

No timing assertions: the machine is shared, only the shape and sanity of the output are checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from firmad.hardware import resolve_amp

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
TINY = ["--steps", "2", "--repeats", "1", "--warmup", "1", "--data", "random"]
SMALL = ["--backbone", "resnet_small", "--width", "0.25", "--device", "cpu", "--threads", "1"]


def run(*extra: str) -> dict:
    cmd = [sys.executable, str(SCRIPT), *TINY, *SMALL, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)  # stdout holds the JSON object and nothing else


def test_throughput_script_prints_complete_json() -> None:
    out = run("--sync-free", "--models", "2", "--amp", "none", "--channels-last", "off")

    assert out["backbone"] == "resnet_small"
    assert out["device"] == "cpu"
    for key in ("limit", "firmad", "plain", "reference", "firmad_over_limit"):
        assert isinstance(out[key], float) and out[key] > 0, (key, out[key])
    # The ratios are the ratios of the medians printed alongside them.
    assert abs(out["firmad_over_limit"] - out["firmad"] / out["limit"]) < 0.01
    assert abs(out["firmad_over_reference"] - out["firmad"] / out["reference"]) < 0.01
    assert abs(out["firmad_over_plain"] - out["firmad"] / out["plain"]) < 0.01
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


def test_throughput_defaults_are_the_recipes() -> None:
    """No flags: the recipe's precision and layout (auto), with the plain fp32 contiguous step
    timed beside them; the precision is what `train.amp: auto` resolves to on this machine."""
    out = run("--no-reference")
    s = out["settings"]
    assert s["amp_setting"] == "auto"
    assert s["amp"] == resolve_amp("auto", "cpu")[0]
    assert s["amp_reason"].startswith("auto: ")
    assert s["channels_last"] is True
    assert out["reference"] is None and out["plain"] > 0
