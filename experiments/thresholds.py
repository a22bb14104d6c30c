"""Which decision threshold? The shipped rule against the one it replaced, on validation only.

    python experiments/thresholds.py --checkpoint models/facecheck.pt --out results/thresholds.md

Both rules sweep the threshold over the validation images clean and after each of
common.THRESHOLD_PERTURBATIONS (what calibrate.robust_threshold does at the end of training):
- per source: the mean accuracy over every (source, condition), the rule used until the shipped
  model; with three fake sources and two real ones the fakes outvote the reals;
- per class (calibrate.choose_threshold, the rule now): the two classes alike, each the mean of its
  (source, condition) groups.
Also the plain 0.5 for reference. Reports accuracy, per-source accuracy and the worst condition.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from calibrate import scores_for_threshold, threshold_over_conditions  # noqa: E402
from common import THRESHOLD_PERTURBATIONS, atomic_write, load_split  # noqa: E402
from model import load_checkpoint  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint", default="models/facecheck.pt", help="default models/facecheck.pt"
    )
    p.add_argument("--data", default="data/faces", help="prepared dataset (default data/faces)")
    p.add_argument("--out", default="results/thresholds.md", help="default results/thresholds.md")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model, ckpt = load_checkpoint(args.checkpoint)
    images, labels, rows = load_split(
        args.data, "val", model_size=ckpt["image_size"], progress=True
    )
    labels = labels.numpy()
    sources = np.array([r["source"] for r in rows])
    probs = scores_for_threshold(model, images, torch.device("cpu"))
    rules = {
        "per source (replaced)": threshold_over_conditions(probs, labels, sources, per_class=False),
        "per class, sources within (train.py now)": threshold_over_conditions(
            probs, labels, sources
        ),
        "0.5": 0.5,
    }
    names = sorted(set(sources))
    lines = [
        f"Validation split of {args.data}, {args.checkpoint}; thresholds swept over clean + "
        + " + ".join(THRESHOLD_PERTURBATIONS)
        + "; accuracy on clean images, worst = lowest accuracy over those conditions.",
        "",
        "| rule | threshold | accuracy | " + " | ".join(names) + " | worst |",
        "|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for rule, t in rules.items():
        right = {c: (p >= t) == (labels == 1) for c, p in probs.items()}
        per = " | ".join(f"{right['clean'][sources == s].mean():.3f}" for s in names)
        worst = min(r.mean() for r in right.values())
        lines.append(f"| {rule} | {t:.3f} | {right['clean'].mean():.3f} | {per} | {worst:.3f} |")
    text = "\n".join(lines) + "\n"
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    print(text)


if __name__ == "__main__":
    main()
