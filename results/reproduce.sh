#!/usr/bin/env bash
# Rebuild everything in results/ and models/ from a clean clone plus the shared faces:
#   mkdir -p data && ln -s ../../shared/data/faces data/raw && make setup && bash results/reproduce.sh
# About 80 minutes on a 2-core CPU (six ~9-minute trainings, three shorter LOFO ones).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

# 1. The dataset (the README's default preparation).
[ -f data/faces/manifest.csv ] ||
  $PY prepare_data.py --real data/raw/real/* --fake data/raw/fake/* --out data/faces --crop lfw=0.62

# 2. The ablation: attention off / on, seeds 0-2, train.py defaults.
bash results/train_ablation.sh data/faces runs/ablation
$PY evaluate.py --compare runs/ablation --data data/faces --out runs/ablation/compare
cp runs/ablation/compare/compare.json results/ablation.json
cp runs/ablation/compare/compare.md results/ablation.md

# 3. The shipped model: the arm the verdict names, the seed with the lowest validation loss.
best=$($PY - <<'EOF'
import json
result = json.load(open("results/ablation.json"))
arm = "on" if result["verdict"].startswith("attention helps") else "off"
runs = [r for r in result["runs"] if r["attention"] == arm]
print(min(runs, key=lambda r: r["val_loss"])["run"])
EOF
)
echo "shipping $best"
mkdir -p models
cp "$best/best.pt" models/facecheck.pt
cp "$best/curves.png" results/curves.png
$PY evaluate.py --checkpoint models/facecheck.pt --data data/faces --split test \
  --robustness --heatmaps 16 --out results/shipped-test --json results/metrics.json
cp results/shipped-test/{confusion_matrix,roc,per_source,robustness,heatmaps}.png results/
$PY export.py --checkpoint models/facecheck.pt --out models/facecheck.onnx --int8 --calib-data data/faces

# 4. Heatmaps of an attention-on run (where its attention looks).
$PY evaluate.py --checkpoint runs/ablation/attention-on-seed0/best.pt --data data/faces --split test \
  --heatmaps 16 --out runs/ablation/attention-on-seed0/eval-heatmaps
cp runs/ablation/attention-on-seed0/eval-heatmaps/heatmaps.png results/heatmaps-attention-on.png

# 5. Generalisation to an unseen generator, and speed.
$PY results/lofo.py --data data/faces --epochs 5 --out results/lofo.json
$PY bench/speed.py --checkpoint models/facecheck.pt --calib-data data/faces --json results/speed.json

# 6. Keep the committed figures small: the heatmap grids as 900 px wide, 128-colour PNGs.
$PY - <<'EOF2'
from PIL import Image
for name in ("heatmaps", "heatmaps-attention-on"):
    im = Image.open(f"results/{name}.png").convert("RGB")
    im = im.resize((900, round(im.height * 900 / im.width)), Image.LANCZOS)
    im.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(f"results/{name}.png", optimize=True)
EOF2
