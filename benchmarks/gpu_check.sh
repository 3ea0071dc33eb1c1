#!/usr/bin/env bash
# Training throughput on one NVIDIA GPU, in one short run (< 5 minutes on an H200):
# benchmarks/throughput.py for the paper's model (resnet18_cifar, width 1, head depth 8, batch
# 32 = 64 views, bf16 autocast, channels_last) as
#   - eager:    firmad's step, the eager limit, the papers' DataLoader pipeline, 4 models in turn;
#   - graphed:  train.cuda_graph (the sync-free step replayed from a CUDA graph) against the bare
#               compute limit (the limit step replayed from a CUDA graph), and 4 one-class models
#               in one process (as firmad train --classes trains them), each replaying its own
#               graph on its own stream;
#   - compiled: torch.compile on the encoder;
# after the tests that need CUDA (the graphed step equals the eager sync-free step).
#
#   bash benchmarks/gpu_check.sh            # from the repository root or anywhere
#
# Environment: a venv (FIRMAD_GPU_VENV, default /tmp/firmad-gpu-venv) that sees the system's
# packages; torch==2.14.1 / torchvision==0.29.1 and the package are pip-installed into it when
# an index is reachable. Without one (offline GPU machines) the system's torch is used and
# firmad is imported from src/ (also with FIRMAD_GPU_NO_INSTALL=1).
# Targets: graphed firmad / bare compute limit >= 0.9; 4 models together above one model.
# Each section has a timeout, the whole script GPU_CHECK_SECONDS (290); a failing section
# does not stop the others. With $OUT set, everything printed also goes to "$OUT/gpu_check.log"
# and each measurement's JSON to "$OUT/<section>.json"; a summary table ends the log.

set -u
cd "$(dirname "$0")/.." || exit 1
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi
export PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_SECONDS:-290}))  # whole script, installs included
FAILED=()

section() { echo; echo "=== $* (t+$(($(date +%s) - START)) s, $(date -u +%H:%M:%SZ))"; }

# run NAME SECONDS COMMAND... : a section that may fail or time out without stopping the script.
run() {
    local name=$1 limit=$2 left
    shift 2
    section "$name"
    left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 30 ]; then
        echo "!!! section '$name' skipped: the script's time is used up"
        FAILED+=("$name")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "+ $* (timeout ${limit}s)"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "!!! section '$name' failed (exit $rc; 124 = timed out after ${limit}s)"
        FAILED+=("$name")
    fi
}

section "machine"
nvidia-smi || echo "nvidia-smi failed"
python3 --version
date -u

section "environment"
VENV=${FIRMAD_GPU_VENV:-/tmp/firmad-gpu-venv}
PY=python3
if [ -n "${FIRMAD_GPU_NO_INSTALL:-}" ]; then
    echo "FIRMAD_GPU_NO_INSTALL set: using the system's python3, firmad from src/"
elif python3 -m venv --system-site-packages "$VENV"; then
    PY="$VENV/bin/python"
    PIP=("$PY" -m pip install -q --disable-pip-version-check --retries 0 --timeout 15)
    if timeout 150 "${PIP[@]}" torch==2.14.1 torchvision==0.29.1 &&
        timeout 60 "${PIP[@]}" -e .; then
        echo "installed torch 2.14.1, torchvision 0.29.1 and firmad into $VENV"
    else
        echo "pip install failed (no package index?): using the system's torch, firmad from src/"
    fi
else
    echo "python3 -m venv failed: using the system's python3, firmad from src/"
fi
# A venv made from a python3 that is itself a venv does not see that venv's packages.
if [ "$PY" != python3 ] && ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
    echo "no torch in $VENV: using the system's python3 ($(command -v python3))"
    PY=python3
fi
# src/ first, so this checkout's firmad is the one imported either way.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF' || { echo "torch/firmad import failed: nothing to measure"; exit 1; }
import sys

import torch
import torchvision

import firmad

print("python", sys.version.split()[0], "| torch", torch.__version__, "| torchvision",
      torchvision.__version__, "| cuda", torch.version.cuda, "| cudnn",
      torch.backends.cudnn.version())
print("gpu:", torch.cuda.is_available() and torch.cuda.get_device_name(0), "| firmad from",
      firmad.__file__)
EOF

# The real Fashion-MNIST if this machine has it, else random images of its shape.
DATA=random
if "$PY" -c "from firmad.data import one_vs_rest; one_vs_rest('fashion-mnist', 0)" 2>/dev/null
then DATA=fashion-mnist; fi
echo "data: $DATA"

JSON_DIR=${OUT:-$(mktemp -d)}
mkdir -p "$JSON_DIR"
BENCH=("$PY" benchmarks/throughput.py --device cuda --data "$DATA" --amp bf16 --channels-last)
PAPER=(--backbone resnet18_cifar --width 1.0 --head-depth 8)

# measure NAME SECONDS ARGS...: a throughput section; its JSON goes to $JSON_DIR/NAME.json.
measure() {
    local name=$1 limit=$2
    shift 2
    run "$name" "$limit" bash -c '"$@" > "$0"' "$JSON_DIR/$name.json" \
        "${BENCH[@]}" "${PAPER[@]}" "$@"
    if [ -s "$JSON_DIR/$name.json" ]; then cat "$JSON_DIR/$name.json"; fi
}

if "$PY" -c "import pytest" 2>/dev/null; then
    run "tests that need CUDA (graphed step == eager sync-free step)" 90 \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_sync_free.py tests/test_augment.py -k cuda
else
    section "tests that need CUDA: skipped (no pytest here)"
fi
# The reference pipeline (PIL + DataLoader, 2 workers) is CPU-bound: a few steps suffice.
measure eager 75 --steps 30 --repeats 3 --ref-steps 10 --models 4
measure graphed 75 --cuda-graph --steps 50 --repeats 3 --models 4 --no-reference
# Compilation of forward and backward takes a minute or two; skipped if it does not fit.
measure compiled 120 --compile --steps 50 --repeats 3 --no-reference

section "summary (views/s; a model step is batch 32 = 64 views)"
"$PY" benchmarks/throughput.py --summary "$JSON_DIR" eager graphed compiled

section "done"
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "failed sections: ${FAILED[*]}"
    exit 1
fi
echo "all sections passed"
