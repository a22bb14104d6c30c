#!/usr/bin/env bash
# Does attention help on data v2? (issue 16 part 1; the README's rule was committed before
# these runs.) Every run of the plan, in order, each one resumable: a finished run (its
# `done` marker) is skipped, a cut one continues from its last.pt, so the same command picks
# up where a session ended:
#   nohup bash experiments/attention_v2.sh > logs/attention-v2.log 2>&1 &
#   DEADLINE=08:05 nohup bash experiments/attention_v2.sh ...   # start only what ends by then
# A run cut by a session's end is lost with the machine, so with DEADLINE (anything `date -d`
# reads) a run is started only if its usual time on this CPU fits before it; the next one that
# fits is tried instead.
# About 11 hours of a 2-core CPU after the pilot (stage 1 picked); the README has the budget.
# A fresh machine first needs the venv and data/faces (make setup prepare, 20 minutes).
# Edit this file only by replacing it (write a copy, then mv): a running bash reads it as it goes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/faces}

# Does a run of about $1 minutes end before DEADLINE? (Always, without one.) $2 names it.
fits() {
  [[ -z ${DEADLINE:-} ]] && return 0
  local left=$((($(date -d "$DEADLINE" +%s) - $(date +%s)) / 60))
  ((left >= $1)) && return 0
  echo "== $2: needs ~$1 min, $left left before $DEADLINE: not started"
  return 1
}

# One train.py run of about $1 minutes: skipped when recorded, resumed when cut, started
# otherwise. runs/ is not committed and a session may start on a fresh machine, so a finished
# run is kept in results/: its record in runs.json, its history, and its val/test logits in
# predictions/, which is all step 6 reads.
RECORDS=results/attention-v2/runs.json
train() {
  local minutes=$1 out=$2
  shift 2
  if [[ -f results/attention-v2/predictions/$(basename "$out").csv.gz ]]; then
    echo "== $out: recorded, reused"
    return
  elif [[ -f $out/done ]]; then
    echo "== $out: finished, recording it"
  elif [[ -f $out/last.pt ]]; then
    echo "== $out: resuming from last.pt"
    $PY train.py --resume "$out/last.pt"
    touch "$out/done"
  else
    fits "$minutes" "$out" || return 0
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
  train 25 runs/att-pilot-s2 --attention on --attention-stage 2 --epochs 6 --patience 6
  train 45 runs/att-pilot-s1 --attention on --attention-stage 1 --epochs 6 --patience 6
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
#    in turn so a cut series still has whole pairs. Off seed 0 is the shipped run
#    (models/facecheck.pt is its best.pt).
train 55 runs/ship-off-s0 --attention off --seed 0
train 120 runs/att-v2/on-s0 --attention on --attention-stage "$STAGE" --seed 0

# 3. While both seed-0 checkpoints are on this machine: the cost side (ORT batch-1 / batch-64
#    latency of each arm, timed with nothing else running; parameters, FLOPs and training time
#    are in the records) and the figure. The on arm's best.pt is kept in results/: if the rule
#    picks attention, it is the model that ships.
SEED0=(runs/ship-off-s0/best.pt runs/att-v2/on-s0/best.pt)
if [[ ! -f results/attention-v2/speed-on.json && -f ${SEED0[0]} && -f ${SEED0[1]} ]]; then
  $PY bench/speed.py --checkpoint runs/ship-off-s0/best.pt --no-int8 \
    --json results/attention-v2/speed-off.json
  $PY bench/speed.py --checkpoint runs/att-v2/on-s0/best.pt --no-int8 \
    --json results/attention-v2/speed-on.json
fi
if [[ ! -f results/attention-v2/attention-vs-saliency.png && -f ${SEED0[0]} && -f ${SEED0[1]} ]]; then
  $PY experiments/attention_figure.py --on runs/att-v2/on-s0 --off runs/ship-off-s0 \
    --out results/attention-v2/attention-vs-saliency.png
fi
KEPT=results/attention-v2/on-s0-best.pt
[[ -f $KEPT || ! -f ${SEED0[1]} ]] || { cp runs/att-v2/on-s0/best.pt "$KEPT.tmp" && mv "$KEPT.tmp" "$KEPT"; }

# 4. Seeds 1 and 2 of both arms, the two off runs first: with DEADLINE, each session
#    takes what fits in this order: the two 55-minute off runs share a session (with room
#    left for leave-one-out runs), a 2-hour on run takes one of its own. The order of the
#    pairs does not matter to the verdict, which waits for all six.
for s in 1 2; do train 55 runs/att-v2/off-s$s --attention off --seed $s; done
for s in 1 2; do
  train 120 runs/att-v2/on-s$s --attention on --attention-stage "$STAGE" --seed $s
done

# 5. The on arm's leave-one-out on every real source and the diffusion source sd15 (the off
#    arm's is results/lofo-v2.json, same schedule); sources already in the results are reused.
#    After the seeds: its 35-minute runs fill the end of a session a seed run cannot.
LOFO=results/lofo-v2-on.json
LOFO_SOURCES=(ffhq lfw ffhq_128 celeba_crops allagefaces unsplash amfd sd15_portraits)
# Is source $1 in the on arm's leave-one-out results?
lofo_recorded() {
  $PY -c "import json, sys; sys.exit(not any(r['held_out'] == sys.argv[1] for r in \
    json.load(open(sys.argv[2]))['runs']))" "$1" "$LOFO"
}
for source in "${LOFO_SOURCES[@]}"; do
  lofo_recorded "$source" && continue
  [[ -f runs/lofo-v2-on/without-$source/last.pt ]] || fits 35 "without $source" || continue
  $PY experiments/lofo.py --data "$DATA" --attention on --attention-stage "$STAGE" \
    --epochs 6 --patience 6 --runs runs/lofo-v2-on --out "$LOFO" --sources "$source"
done

# 6. The verdict and the table, from the recorded runs (the test split is summed up here, once),
#    when all six are recorded and the on arm's leave-one-out has every source (rule C reads it).
missing=()
for run in ship-off-s0 on-s0 off-s1 on-s1 off-s2 on-s2; do
  [[ -f results/attention-v2/predictions/$run.csv.gz ]] || missing+=("$run")
done
for source in "${LOFO_SOURCES[@]}"; do
  lofo_recorded "$source" || missing+=("without-$source")
done
if ((${#missing[@]} == 0)); then
  $PY experiments/compare.py "$RECORDS" \
    --lofo results/lofo-v2-on.json results/lofo-v2.json --out results/attention-v2
else
  echo "== verdict: waits for the records of ${missing[*]}"
fi
