#!/usr/bin/env bash
# Attack every finished cell of a robustness grid again with other settings, without retraining:
#   bash benchmarks/reattack.sh GRID_DIR OUT_DIR [firmad attack options...]
# GRID_DIR may also be one recipe's folder of a grid (GRID_DIR/RECIPE) to re-attack only its cells.
# e.g. bash benchmarks/reattack.sh runs/bench/robust-fmnist-10-cpu runs/bench/robust-fmnist-10-apgd \
#        --eps 0,8 --steps 100 --targets both --subset 200 --no-checks --schedule apgd
# Each cell's attack files go to OUT_DIR/<recipe>/<cell>/, so benchmarks/robust_table.py reads
# OUT_DIR like a grid. Cells whose OUT_DIR folder already holds attack.json are skipped.
set -euo pipefail
grid=$1 out=$2
shift 2
firmad=${FIRMAD:-.venv/bin/firmad}
for results in $(find "$grid" -maxdepth 3 -name results.json | sort); do
  cell=$(dirname "$results")
  target="$out/$(basename "$(dirname "$cell")")/$(basename "$cell")"
  [ -f "$target/attack.json" ] && continue
  echo "== $cell"
  "$firmad" -q attack "$cell" --out "$target" "$@" > /dev/null
done
