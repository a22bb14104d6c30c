#!/usr/bin/env bash
# Rebuild the data-v2 figures in results/ and the shipped models/ from a clean clone plus the
# shared faces (14 sources, faces found by MTCNN):
#   mkdir -p data && ln -s ../../shared/data/faces data/raw && make setup && bash experiments/reproduce.sh
# On a 2-core CPU: 17 min preparing, ~45 min the shipped model, ~13 min per leave-one-out run
# (14 of them). Every step skips what is already there, so a cut-short call resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

# 1. The dataset (the Makefile's preparation).
[ -f data/faces/manifest.csv ] ||
  $PY prepare_data.py --real data/raw/real/* --fake data/raw/fake/* --out data/faces --group 'amfd=-(\d+)'

# 2. The shipped model: train.py's defaults (attention off, 20 epochs), seed 0.
run=runs/ship-off-s0
if [ ! -f $run/done ]; then
  if [ -f $run/last.pt ]; then $PY train.py --resume $run/last.pt; else
    $PY train.py --attention off --data data/faces --out $run --seed 0; fi
  touch $run/done
fi
cp $run/best.pt models/facecheck.pt
cp $run/curves.png results/curves.png

# 3. Test split, once: metrics, per source, robustness, framing, face size check.
$PY evaluate.py --checkpoint models/facecheck.pt --data data/faces --split test --robustness \
  --heatmaps 16 --out results/shipped-test
cp results/shipped-test/metrics.json results/metrics.json
for f in confusion_matrix roc per_source calibration robustness heatmaps; do
  cp results/shipped-test/$f.png results/$f.png
done
$PY experiments/framing.py models/facecheck.pt --data data/faces --split test --out results/framing.md

# 4. Export (FP32, INT8 for ONNX Runtime and for TensorRT) and speed.
$PY export.py --checkpoint models/facecheck.pt --out models/facecheck.onnx --int8 --calib-data data/faces
$PY bench/speed.py --checkpoint models/facecheck.pt --json results/speed.json
$PY bench/detector.py --raw data/raw --json results/detector.json
# infer.py end to end, the FP32 and the INT8 model, three finders each.
$PY bench/pipeline.py --raw data/raw --photos 400 --model models/facecheck.onnx \
  --finders mtcnn blazeface auto --repeats 5 --json results/pipeline.json --md results/pipeline.md
$PY bench/pipeline.py --raw data/raw --photos 400 --model models/facecheck.int8.onnx \
  --finders mtcnn blazeface auto --repeats 5 --json results/pipeline-int8.json \
  --md results/pipeline-int8.md
$PY experiments/finder_parity.py --finder blazeface --json results/finder-parity.json \
  --md results/finder-parity.md
$PY experiments/finder_parity.py --finder auto --json results/finder-parity-auto.json \
  --md results/finder-parity-auto.md
$PY experiments/finder_parity.py --finder mtcnn --candidate-model models/facecheck.int8.onnx \
  --json results/finder-parity-int8.json --md results/finder-parity-int8.md
$PY experiments/finder_parity.py --finder auto --candidate-model models/facecheck.int8.onnx \
  --json results/finder-parity-auto-int8.json --md results/finder-parity-auto-int8.md

# 5. Leave one source out, every source of both classes once, 6 epochs each (stated as such).
$PY experiments/lofo.py --data data/faces --epochs 6 --patience 6 --runs runs/lofo-v2 \
  --out results/lofo-v2.json --sources ffhq sd15_portraits ffhq_128 celeba_crops lfw \
  allagefaces unsplash amfd sd14_portraits tpdne_128 stylegan1_140k tpdne_1024 \
  tpdne_stylegan2 boredhumans
$PY experiments/lofo_table.py results/lofo-v2.json --in-distribution results/metrics.json \
  --out results/lofo-v2.md
$PY bench/augment.py --data data/faces --n 400 --runs 2 --json results/augment.json

# 6. Does attention help? (README: the rule was written before these runs; issue 16.) The
#    placement pilot, 3 seeds per arm at the shipped schedule, the on arm's leave-one-out and
#    the verdict, each run resumable (~11 CPU hours after the pilot):
bash experiments/attention_v2.sh
