#!/usr/bin/env bash
# The class-0 robustness table of benchmarks/RESULTS.md from the strongest mode with its checks
# on: for each run directory given, (1) `firmad attack --full` (the ensemble of APGD-100 x 2
# restarts with every check and the Square check), (2) the same ensemble with 1000 steps (the
# PGD-1000 column; its convergence in steps is what the more_steps check of (1) measures), and
# (3) benchmarks/attack_worstcase.py (the ensemble against the per-image worst case over twelve
# independent attacks). L-inf 8/255, both sides, 200 stratified test images.
#
#   bash benchmarks/strongest_class0.sh OUT_DIR RUN_DIR... [-- extra firmad attack options]
#
# The two detectors of the table (as in RESULTS, one thread each):
#   firmad train --config fmnist-cpu --set train.steps_per_epoch=150 --set train.threads=1 \
#     --normal-class 0 --out runs/class0/firm
#   firmad train --config fmnist-cpu-binary-adv --set model.backbone=lenet --set model.width=1.0 \
#     --set train.steps_per_epoch=150 --set train.threads=1 --normal-class 0 --out runs/class0/lenet
# Each step is skipped when its output exists; OUT_DIR/times.log gets the wall time of each.
# A smoke: FIRMAD=... PYTHON=... WORST_ARGS="--steps 2 --subset 40 --queries 20" \
#   bash benchmarks/strongest_class0.sh OUT RUN -- --steps 2 --subset 40
set -uo pipefail
out=$1
shift
runs=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do runs+=("$1"); shift; done
[ $# -gt 0 ] && shift
firmad=${FIRMAD:-.venv/bin/firmad}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
timed() {  # timed NAME COMMAND...: run it unless NAME's output exists, log its wall time
  local name=$1 t0
  shift
  t0=$(date +%s)
  "$@" || { echo "failed: $name (exit $?)"; return 1; }
  echo "$name $(date -u +%FT%TZ) $(( $(date +%s) - t0 ))s" >> "$out/times.log"
}
common=(--eps 0,8 --targets both --subset 200)
for run in "${runs[@]}"; do
  name=$(basename "$run")
  [ -f "$out/$name-full/attack.json" ] || timed "$name-full" \
    "$firmad" -q attack "$run" --full "${common[@]}" --out "$out/$name-full" "$@" > /dev/null
  [ -f "$out/$name-full1000/attack.json" ] || timed "$name-full1000" \
    "$firmad" -q attack "$run" --full --steps 1000 --no-checks "${common[@]}" \
    --out "$out/$name-full1000" "$@" > /dev/null
  [ -f "$out/$name-worstcase.json" ] || timed "$name-worstcase" \
    "$python" benchmarks/attack_worstcase.py "$run" --subset 200 ${WORST_ARGS:-} \
    --out "$out/$name-worstcase.json"
done
for run in "${runs[@]}"; do
  name=$(basename "$run")
  for kind in full full1000; do
    f="$out/$name-$kind/attack.md"
    [ -f "$f" ] && { echo "== $name $kind"; sed -n '/^Robust AUROC/,$p' "$f"; }
  done
done
