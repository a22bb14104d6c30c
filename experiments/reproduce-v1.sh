#!/usr/bin/env bash
# HISTORY: the data-v1 pipeline (5 sources, whole-image crops). It ran at commit 2fd24e5 and
# needs that commit (prepare_data.py --crop is gone); experiments/reproduce.sh is today's.
# Rebuild everything in results/ and models/ from a clean clone plus the shared faces:
#   mkdir -p data && ln -s ../../shared/data/faces data/raw && make setup && bash experiments/reproduce.sh
# About 7-8 hours on a 2-core CPU (sixteen 10-epoch trainings of 9-13 minutes, four of 45-60
# minutes, five 20-epoch leave-one-source-out ones of 10-17).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

# 1. The dataset (the README's default preparation).
[ -f data/faces/manifest.csv ] ||
  $PY prepare_data.py --real data/raw/real/* --fake data/raw/fake/* --out data/faces --crop lfw=0.62

# 2. The ablation: attention off / on, seeds 0-2, blur/JPEG at 0.3 / 0.3 (train_ablation.sh).
bash experiments/train_ablation.sh data/faces runs/ablation
$PY experiments/compare.py runs/ablation --data data/faces --out runs/ablation/compare
cp runs/ablation/compare/compare.json results/ablation.json
cp runs/ablation/compare/compare.md results/ablation.md

# 2a. The same ablation under train.py's defaults of today (the shipped model's augmentation:
#     blur 0.6, JPEG 0.7, crops of 40-100 %; still 10 epochs).
ABLATION_ARGS= bash experiments/train_ablation.sh data/faces runs/ablation-shipped-aug
$PY experiments/compare.py runs/ablation-shipped-aug --data data/faces --out runs/ablation-shipped-aug/compare
cp runs/ablation-shipped-aug/compare/compare.json results/ablation-shipped-aug.json
cp runs/ablation-shipped-aug/compare/compare.md results/ablation-shipped-aug.md

# 2b. The augmentation recipe, chosen on validation only: the ablation's seed-0 plain run
#     (blur 0.3, JPEG 0.3, crop 0.75) against more JPEG, more blur, and a wider zoom range
#     (crop 0.4: train.py's defaults now), plus one attention-on spot check.
for recipe in "0.3 0.7 0.75 off" "0.6 0.7 0.75 off" "0.6 0.7 0.75 on" "0.6 0.7 0.4 off"; do
  set -- $recipe
  out=runs/recipes/blur$1-jpeg$2
  if [ "$3" != 0.75 ]; then out=$out-crop$3; fi
  if [ "$4" = on ]; then out=$out-attention-on; fi
  if [ ! -f $out/done ]; then
    $PY train.py --data data/faces --attention $4 --degrade-p $1 --jpeg-p $2 --min-crop $3 --out $out
    touch $out/done
  fi
done
RECIPES="runs/ablation/attention-off-seed0 runs/recipes/blur0.3-jpeg0.7 runs/recipes/blur0.6-jpeg0.7
  runs/recipes/blur0.6-jpeg0.7-attention-on runs/recipes/blur0.6-jpeg0.7-crop0.4"
for run in $RECIPES; do
  $PY evaluate.py --checkpoint $run/best.pt --data data/faces --split val --robustness --out $run/eval-val
done
RECIPES="$RECIPES" $PY - <<'EOF'
import json
import os
import torch
from train import saved_train_args
perturbations = ("jpeg75", "jpeg50", "downscale0.5", "blur1", "zoom1.2", "zoom1.5")
rows = ["| run | blur p | JPEG p | crop | val acc | val AUC | FFHQ real | StyleGAN v1 fake | JPEG 75 | "
        "JPEG 50 | downscale x0.5 | blur 1 | zoom 1.2 | zoom 1.5 | worst |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
for run in os.environ["RECIPES"].split():
    m = json.load(open(f"{run}/eval-val/metrics.json"))
    args = saved_train_args(torch.load(f"{run}/best.pt", weights_only=True))
    acc = {r["condition"]: r["accuracy"] for r in m["robustness"]}
    src = {s["source"]: s["accuracy"] for s in m["per_source"]}
    drops = " | ".join(f"{100 * (acc[k] - acc['clean']):+.1f}" for k in perturbations)
    rows.append(f"| {run} | {args['degrade_p']} | {args['jpeg_p']} | {args['min_crop']} | "
                f"{acc['clean']:.3f} | {m['metrics']['roc_auc']:.3f} | {src['ffhq']:.2f} | "
                f"{src['stylegan1_140k']:.2f} | {drops} | {min(acc.values()):.3f} |")
open("results/recipes.md", "w").write(
    "Validation split, 10 epochs, seed 0, attention off unless the name says on; accuracy at "
    "each run's threshold, then points lost under each perturbation; worst = the lowest "
    "accuracy over clean and all perturbations.\n\n" + "\n".join(rows) + "\n")
EOF

# 3. The shipped model: the arm the verdict names, trained with train.py's defaults (the
#    robustness recipe picked on validation, results/recipes.md) for 45 epochs instead of 10.
arm=$($PY - <<'EOF'
import json
print("on" if json.load(open("results/ablation.json"))["verdict"].startswith("attention helps") else "off")
EOF
)
echo "shipping attention $arm"
best=runs/shipped
if [ ! -f $best/done ]; then
  $PY train.py --data data/faces --attention "$arm" --epochs 45 --patience 45 --seed 0 --out $best
  touch $best/done
fi
mkdir -p models
cp "$best/best.pt" models/facecheck.pt
cp "$best/curves.png" results/curves.png
$PY evaluate.py --checkpoint models/facecheck.pt --data data/faces --split test \
  --robustness --heatmaps 16 --out results/shipped-test --json results/metrics.json
cp results/shipped-test/{confusion_matrix,roc,per_source,calibration,robustness,heatmaps}.png results/
$PY export.py --checkpoint models/facecheck.pt --out models/facecheck.onnx --int8 --calib-data data/faces
$PY experiments/thresholds.py --checkpoint models/facecheck.pt --data data/faces --out results/thresholds.md
$PY experiments/framing.py models/facecheck.pt runs/recipes/blur0.6-jpeg0.7/best.pt
# 3b. Attention spot check under the shipped recipe: the same command with the other arm,
#     compared on validation only (one seed: a spot check, not an ablation).
other=$([ "$arm" = on ] && echo off || echo on)
if [ ! -f runs/shipped-attention-$other/done ]; then
  $PY train.py --data data/faces --attention "$other" --epochs 45 --patience 45 --seed 0 \
    --out runs/shipped-attention-$other
  touch runs/shipped-attention-$other/done
fi
for run in runs/shipped runs/shipped-attention-$other; do
  $PY evaluate.py --checkpoint $run/best.pt --data data/faces --split val --robustness --out $run/eval-val
done
# 3c. A second seed of both arms at the shipped budget, so that the 45-epoch comparison has a
#     seed spread (results/ablation-e45.*); seed 0 stays the shipped model whatever seed 1 scores.
for a in off on; do
  out=runs/shipped45-attention-$a-seed1
  if [ ! -f $out/done ]; then
    $PY train.py --data data/faces --attention $a --epochs 45 --patience 45 --seed 1 --out $out
    touch $out/done
  fi
  $PY evaluate.py --checkpoint $out/best.pt --data data/faces --split val --robustness --out $out/eval-val
done
$PY experiments/compare.py runs/shipped runs/shipped-attention-$other runs/shipped45-attention-{off,on}-seed1 \
  --data data/faces --out runs/compare-e45
cp runs/compare-e45/compare.json results/ablation-e45.json
cp runs/compare-e45/compare.md results/ablation-e45.md

# 4. Heatmaps of an attention-on run (where its attention looks).
$PY evaluate.py --checkpoint runs/ablation/attention-on-seed0/best.pt --data data/faces --split test \
  --heatmaps 16 --out runs/ablation/attention-on-seed0/eval-heatmaps
cp runs/ablation/attention-on-seed0/eval-heatmaps/heatmaps.png results/heatmaps-attention-on.png

# 5. Generalisation to an unseen generator (and an unseen real source), and speed.
$PY experiments/lofo.py --data data/faces --epochs 20 --runs runs/lofo-e20 --out results/lofo.json
# Real sources: no early stop (with patience 5 the run without LFW stopped at epoch 6, at the
# one-cycle schedule's peak learning rate, before it had learned anything).
$PY experiments/lofo.py --data data/faces --epochs 20 --patience 20 --label real \
  --runs runs/lofo-real-p20 --out results/lofo-real.json
$PY bench/speed.py --checkpoint models/facecheck.pt --calib-data data/faces --json results/speed.json

# 6. Keep the committed figures small: the heatmap grids as 900 px wide, 128-colour PNGs.
$PY - <<'EOF2'
from PIL import Image
for name in ("heatmaps", "heatmaps-attention-on"):
    im = Image.open(f"results/{name}.png").convert("RGB")
    im = im.resize((900, round(im.height * 900 / im.width)), Image.LANCZOS)
    im.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(f"results/{name}.png", optimize=True)
EOF2
