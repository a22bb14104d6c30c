#!/usr/bin/env bash
# Does attention help on data v2? (issue 16 part 1; the README's rule was committed before
# these runs.) Every run of the plan, in order, each one resumable: a finished run (its
# `done` marker) is skipped, a cut one continues from its last.pt, so the same command picks
# up where a session ended:
#   nohup bash experiments/attention_v2.sh > logs/attention-v2.log 2>&1 &
# About 11 hours of a 2-core CPU after the pilot (stage 1 picked); the README has the budget.
# Edit this file only by replacing it (write a copy, then mv): a running bash reads it as it goes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/faces}

# One train.py run: skipped when finished, resumed when cut, started otherwise. Its outcome
# is kept in results/attention-v2/runs.json with its history (runs/ is not committed).
RECORDS=results/attention-v2/runs.json
train() {
  local out=$1
  shift
  if [[ -f $out/done ]]; then
    echo "== $out: finished, reused"
  elif [[ -f $out/last.pt ]]; then
    echo "== $out: resuming from last.pt"
    $PY train.py --resume "$out/last.pt"
    touch "$out/done"
  else
    echo "== $out: starting"
    $PY train.py --data "$DATA" --out "$out" "$@"
    touch "$out/done"
  fi
  $PY experiments/run_record.py "$out" --out "$RECORDS"
}

# 1. Placement pilot: one seed of each placement at the leave-one-out schedule (6 epochs).
#    Its outcome is kept in results/ (runs/ is not committed), so a fresh machine goes on
#    from there instead of training the pilot again.
PILOT=results/attention-v2/pilot.json
if [[ ! -f $PILOT ]]; then
  train runs/att-pilot-s2 --attention on --attention-stage 2 --epochs 6 --patience 6
  train runs/att-pilot-s1 --attention on --attention-stage 1 --epochs 6 --patience 6
  # The rule written before the pilot: the higher validation accuracy at the run's own
  # threshold wins; within 0.5 points, stage 2 (the cheaper one) does.
  # The pilot's outcome, from the two runs' records (train() wrote them).
  $PY - "$PILOT" "$RECORDS" <<'EOF'
import json, sys
from pathlib import Path
from common import atomic_write
records = json.loads(Path(sys.argv[2]).read_text())
runs = {s: records[f"att-pilot-s{s}"] for s in (1, 2)}
acc = {s: r["val_accuracy_at_threshold"] for s, r in runs.items()}
stage = 1 if acc[1] > acc[2] + 0.005 else 2
rule = "higher val accuracy at the run's own threshold; within 0.5 points, stage 2"
result = {"rule": rule, "stage": stage, "runs": {f"stage{s}": r for s, r in runs.items()}}
atomic_write(sys.argv[1], lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
EOF
fi
STAGE=$($PY -c "import json; print(json.load(open('$PILOT'))['stage'])")
echo "== placement: stage $STAGE"

# 2. Three seeds per arm at the shipped schedule (train.py's defaults, 20 epochs), paired
#    in turn so a cut series still has whole pairs. Off seed 0 is the shipped run.
train runs/ship-off-s0 --attention off --seed 0
train runs/att-v2/on-s0 --attention on --attention-stage "$STAGE" --seed 0
for s in 1 2; do
  train runs/att-v2/off-s$s --attention off --seed $s
  train runs/att-v2/on-s$s --attention on --attention-stage "$STAGE" --seed $s
done

# 3. The on arm's leave-one-out on every real source and the diffusion source sd15 (the off
#    arm's is results/lofo-v2.json, same schedule).
$PY experiments/lofo.py --data "$DATA" --attention on --attention-stage "$STAGE" \
  --epochs 6 --patience 6 --runs runs/lofo-v2-on --out results/lofo-v2-on.json \
  --sources ffhq lfw ffhq_128 celeba_crops allagefaces unsplash amfd sd15_portraits

# 4. The cost side: ORT batch-1 / batch-64 latency of each arm, timed with nothing else running
#    (parameters, FLOPs and training time are in the checkpoints; --compare lists them).
mkdir -p results/attention-v2
$PY bench/speed.py --checkpoint runs/ship-off-s0/best.pt --no-int8 \
  --json results/attention-v2/speed-off.json
$PY bench/speed.py --checkpoint runs/att-v2/on-s0/best.pt --no-int8 \
  --json results/attention-v2/speed-on.json

# 5. The verdict, the table and the figure.
$PY evaluate.py --compare runs/ship-off-s0 runs/att-v2/* \
  --lofo results/lofo-v2-on.json results/lofo-v2.json --out results/attention-v2
$PY experiments/attention_figure.py --on runs/att-v2/on-s0 --off runs/ship-off-s0
