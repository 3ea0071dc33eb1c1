#!/usr/bin/env bash
# Attack every finished cell of a robustness grid (or one run directory) again with other
# settings, without retraining:
#   bash benchmarks/reattack.sh GRID_DIR OUT_DIR [firmad attack options...]
# GRID_DIR may also be one recipe's folder of a grid (GRID_DIR/RECIPE) or a single run directory.
# The strongest mode with its checks on (the published protocol of benchmarks/RESULTS.md):
#   bash benchmarks/reattack.sh runs/bench/robust-fmnist-10-cpu runs/bench/robust-fmnist-10-full \
#        --full --eps 0,8 --targets both --subset 200
# Each cell's attack files go to OUT_DIR/<recipe>/<cell>/, so benchmarks/robust_table.py reads
# OUT_DIR like a grid. Cells whose OUT_DIR folder already holds attack.json are skipped; a cell cut
# short continues from its kept attacks (and the finished batches of the attack in progress).
# OUT_DIR/reattack.log gets one line per cell: start and end (UTC), wall seconds, exit status.
set -uo pipefail
grid=$1 out=$2
shift 2
firmad=${FIRMAD:-.venv/bin/firmad}
mkdir -p "$out"
failed=0
for results in $(find "$grid" -maxdepth 3 -name results.json | sort); do
  cell=$(dirname "$results")
  target="$out/$(basename "$(dirname "$cell")")/$(basename "$cell")"
  [ -f "$target/attack.json" ] && continue
  echo "== $cell"
  start=$(date -u +%FT%TZ) t0=$(date +%s)
  "$firmad" -q attack "$cell" --out "$target" "$@" > /dev/null
  rc=$?
  echo "$cell $start $(date -u +%FT%TZ) $(( $(date +%s) - t0 ))s rc=$rc" >> "$out/reattack.log"
  [ $rc -eq 0 ] || { echo "   failed (exit $rc); see above"; failed=1; }
  [ $rc -eq 130 ] && exit 130  # Ctrl-C: stop here; the same command continues
done
exit $failed
