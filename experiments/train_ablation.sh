#!/usr/bin/env bash
# Ablation: attention off / on, seeds 0-2, same data, split and hyperparameters: train.py defaults
# except ABLATION_ARGS, by default blur/JPEG at 0.3 / 0.3 and crop 0.75, the defaults when the
# first recorded ablation ran. ABLATION_ARGS= (empty) runs train.py's defaults of today, the
# shipped model's augmentation (results/ablation-shipped-aug.*).
# Usage: bash experiments/train_ablation.sh [DATA] [RUNS]   (defaults data/faces runs/ablation)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data/faces}
RUNS=${2:-runs/ablation}
PY=${PY:-.venv/bin/python}
ABLATION_ARGS=${ABLATION_ARGS---degrade-p 0.3 --jpeg-p 0.3 --min-crop 0.75}
for seed in 0 1 2; do
  for attention in off on; do
    out="$RUNS/attention-$attention-seed$seed"
    if [ -f "$out/best.pt" ] && [ -f "$out/done" ]; then continue; fi
    $PY train.py --data "$DATA" --attention "$attention" --seed "$seed" --out "$out" $ABLATION_ARGS
    touch "$out/done"
  done
done
