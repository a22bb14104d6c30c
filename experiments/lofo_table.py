"""The README's leave-one-source-out table: experiments/lofo.py's JSON next to the shipped
model's in-distribution accuracy on the same source (evaluate.py's metrics.json), and, for the
held-out sources whose file names say who is in the photo, their faces called real per group.

    python experiments/lofo_table.py results/lofo-v2.json --in-distribution results/metrics.json \\
        --out results/lofo-v2.md
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import atomic_write  # noqa: E402

HEADER = (
    "| held-out source | class | n (all unseen) | accuracy on it | at 0.5 | threshold used "
    "| AUC vs other class (test) | other class test acc | seen test acc "
    "| same source in distribution (shipped model, test) |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("lofo", help="experiments/lofo.py's --out JSON")
    p.add_argument(
        "--in-distribution",
        default="results/metrics.json",
        help="evaluate.py's metrics.json of the shipped model (default results/metrics.json)",
    )
    p.add_argument("--out", default=None, help="also write the table here (markdown)")
    return p.parse_args(argv)


def table(runs, in_distribution):
    lines = [HEADER]
    for r in sorted(runs, key=lambda r: (r["label"] != "real", r["unseen_accuracy"])):
        seen = in_distribution.get(r["held_out"])
        lines.append(
            f"| {r['held_out']} | {r['label']} | {r['n_unseen']} | **{r['unseen_accuracy']:.3f}** "
            f"| {r['unseen_accuracy_at_0.5']:.3f} | {r['threshold']:.3f} "
            f"| {r['unseen_vs_other_class_test_auc']:.3f} | {r['other_class_test_accuracy']:.3f} "
            f"| {r['seen_test_accuracy']:.3f} | {'-' if seen is None else f'{seen:.3f}'} |"
        )
    return "\n".join(lines + group_table(runs)) + "\n"


def group_table(runs):
    """Per held-out labelled source: n and share called real per group (demographics.py)."""
    labelled = [r for r in runs if r.get("demographics")]
    if not labelled:
        return []
    lines = ["", "Real faces called real per group, held-out source unseen in training", "",
             "| held-out source | attribute | group | n | called real |", "|---|---|---|---|---|"]  # fmt: skip
    for r in labelled:
        d = r["demographics"]
        for g in d["groups"]:
            few = "" if g["n"] >= d["min_n"] else " (few)"
            lines.append(f"| {r['held_out']} | {g['attribute']} | {g['group']} | {g['n']}{few} "
                         f"| {g['called_real']:.3f} |")  # fmt: skip
        if gap := d["gap"]:
            lines.append(f"| {r['held_out']} | gap, groups of >= {d['min_n']} | {gap['best']} - "
                         f"{gap['worst']} | | {gap['gap']:.3f} |")  # fmt: skip
    return lines


def main(argv=None):
    args = parse_args(argv)
    runs = json.loads(Path(args.lofo).read_text())["runs"]
    per_source = json.loads(Path(args.in_distribution).read_text())["per_source"]
    text = table(runs, {s["source"]: s["accuracy"] for s in per_source})
    print(text, end="")
    if args.out:
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
