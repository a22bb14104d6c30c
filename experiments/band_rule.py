"""Which unsure band? calibrate.unsure_band's rules on validation, judged on the test split.

    for split in val test; do
      python evaluate.py --checkpoint models/facecheck.pt --split $split --out runs/band-rule/v3-$split
      python evaluate.py --checkpoint runs/v3-long32/best.pt --split $split \
          --out runs/band-rule/long32-$split
    done
    python experiments/band_rule.py --model v3 runs/band-rule/v3-val runs/band-rule/v3-test \
        --model long32 runs/band-rule/long32-val runs/band-rule/long32-test

Each --model is a name and two folders that `evaluate.py --split val|test --out DIR` wrote
(predictions.csv and metrics.json: the probabilities and the model's threshold; the band that
evaluate.py applied is not used). For every rule
the band is set on validation, as calibrate.finish_best does, and then applied to the test
split: the share of faces left unsure, how often the confident calls are right, and the worst
error, real faces called fake confidently, overall and in the real source where it is highest.
Rules: confident calls right 95 % of the time on each side (the rule until 2026-12-08), and the
same with at most 2 % or 1 % of the real validation faces above the band (calibrate.py's rule
since: REAL_CALLED_FAKE_MAX).
"""

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from calibrate import unsure_band  # noqa: E402
from common import atomic_write  # noqa: E402
from evaluate import decisions  # noqa: E402

RULES = {"95 % right each side": None, "+ <= 2 % of reals": 0.02, "+ <= 1 % of reals": 0.01}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", nargs=3, action="append", required=True,
                   metavar=("NAME", "VAL_DIR", "TEST_DIR"), help="evaluate.py outputs")  # fmt: skip
    p.add_argument("--out", default="results/band-rule.md", help="default results/band-rule.md")
    return p.parse_args(argv)


def read_predictions(folder):
    """(prob_fake, label 1 = fake, source) arrays and the threshold of an evaluate.py folder."""
    with open(Path(folder) / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    threshold = json.loads((Path(folder) / "metrics.json").read_text())["metrics"]["threshold"]
    prob = np.array([float(r["prob_fake"]) for r in rows])
    labels = np.array([r["label"] == "fake" for r in rows], dtype=int)
    return prob, labels, np.array([r["source"] for r in rows]), threshold


def outcome(prob, labels, sources, threshold, band):
    """The test split under a band, as evaluate.py reports it (evaluate.decisions): unsure share,
    confident calls right, reals called fake confidently, and the real source worst at that."""
    d = decisions(labels, prob, threshold, band)
    real = labels == 0
    per_source = {}
    for source in np.unique(sources[real]):
        m = real & (sources == source)
        per_source[source] = decisions(labels[m], prob[m], threshold, band)["per_class"]["real"][
            "fake"
        ]
    worst = max(per_source, key=per_source.get)
    return {"unsure": d["unsure_share"], "right": d["confident_accuracy"],
            "real_called_fake": d["real_called_fake_confidently"],
            "worst_source": f"{worst} {per_source[worst]:.3f}"}  # fmt: skip


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    lines = ["Unsure band rules: set on validation (calibrate.unsure_band), applied to the test "
             "split (the evaluate.py runs that make the folders: experiments/band_rule.py). "
             "`python experiments/band_rule.py " + " ".join(argv) + "`", "",
             "| model | rule | band | val unsure | val reals called fake | test unsure | "
             "test confident calls right | test reals called fake confidently | worst real "
             "source |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, val_dir, test_dir in args.model:
        val_prob, val_labels, _, threshold = read_predictions(val_dir)
        test = read_predictions(test_dir)[:3]  # the same model: the threshold is the val's
        for rule, cap in RULES.items():
            low, high, stats = unsure_band(val_prob, val_labels, threshold,
                                           max_real_called_fake=cap)  # fmt: skip
            o = outcome(*test, threshold, (low, high))
            lines.append(f"| {name} | {rule} | {low:.3f}-{high:.3f} | {stats['unsure_share']:.3f} "
                         f"| {stats['real_called_fake']:.3f} | {o['unsure']:.3f} | "
                         f"{o['right']:.3f} | {o['real_called_fake']:.3f} | {o['worst_source']} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    print(text, end="")


if __name__ == "__main__":
    main()
