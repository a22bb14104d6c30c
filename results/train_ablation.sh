#!/usr/bin/env bash
# Ablation: attention off / on, seeds 0-2, same data, split and hyperparameters (train.py defaults).
# Usage: bash results/train_ablation.sh [DATA] [RUNS]   (defaults data/faces runs/ablation)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data/faces}
RUNS=${2:-runs/ablation}
PY=${PY:-.venv/bin/python}
for seed in 0 1 2; do
  for attention in off on; do
    out="$RUNS/attention-$attention-seed$seed"
    if [ -f "$out/best.pt" ] && [ -f "$out/done" ]; then continue; fi
    $PY train.py --data "$DATA" --attention "$attention" --seed "$seed" --out "$out"
    touch "$out/done"
  done
done
