#!/usr/bin/env bash
# Short runs of the paper's model (CIFAR ResNet-18, 8-layer head, the paper's recipe) on one GPU:
# FIRM and NT-Xent on Fashion-MNIST class 0 for a few epochs, learning curve twice an epoch,
# scored with kNN-cosine (k=5) and Mahalanobis, plain and angled. A first look at the GPU
# recipe, not a reproduction of the paper's 2000 epochs.
#
#   EPOCHS=4 bash benchmarks/gpu_firm_short.sh       # FIRMAD_DATA must hold fashion-mnist/
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
EPOCHS=${EPOCHS:-4}
DEST=${OUT:-runs/gpu-short}
mkdir -p "$DEST"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for recipe in fmnist-firm fmnist-ntxent; do
    echo "=== $recipe, $EPOCHS epochs ($(date -u +%H:%M:%SZ))"
    timeout --kill-after=5 "${RUN_SECONDS:-110}" "$PY" -m firmad.cli -q train --config "$recipe" \
        --epochs "$EPOCHS" --device cuda --out "/tmp/gpu-short/$recipe" \
        --set train.eval_every=0.5 --set "eval.scorers=[knn_cos:k=5, mahalanobis]" \
        --set "eval.variants=[plain, angled]" || echo "!!! $recipe failed or timed out"
    cp "/tmp/gpu-short/$recipe/results.json" "$DEST/$recipe-results.json" 2>/dev/null
    tail -n 3 "/tmp/gpu-short/$recipe/metrics.jsonl" 2>/dev/null
done
