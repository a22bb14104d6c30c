"""Keep a finished run's outcome in results/: runs/ is not committed, and a session may start
on a fresh machine. Adds (or replaces) the run's record in a JSON file (validation figures of
its best epoch, cost, settings) and copies its history.csv beside it.

    python experiments/run_record.py runs/att-v2/on-s0 --out results/attention-v2/runs.json

Validation only: the test split is read once, by evaluate.py --compare, after the choice.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import atomic_write  # noqa: E402
from evaluate import run_facts  # noqa: E402
from model import CheckpointError, load_checkpoint  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", help="finished run folders (each with best.pt)")
    p.add_argument("--out", required=True, help="the JSON file of records to add them to")
    return p.parse_args(argv)


def record(run):
    """A run's outcome from its best.pt: what the README's status line and tables quote."""
    try:
        model, ckpt = load_checkpoint(run / "best.pt")
    except CheckpointError as exc:
        sys.exit(f"error: {exc}")
    return {
        **run_facts(model, ckpt, run),
        "val_loss": ckpt["val_metrics"]["loss"],
        "val_accuracy_at_threshold": ckpt["val_metrics"]["accuracy_at_threshold"],
        "manifest_sha256": ckpt.get("manifest_sha256"),
        "git_commit": ckpt.get("git_commit"),
    }


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.is_file() else {}
    for run in map(Path, args.runs):
        records[run.name] = record(run)
        if (history := run / "history.csv").is_file():
            copy = out.parent / f"{run.name}-history.csv"
            atomic_write(copy, lambda tmp, src=history: shutil.copyfile(src, tmp))
        r = records[run.name]
        print(f"{run.name}: best epoch {r['best_epoch']} of {r['epochs']}, val loss "
              f"{r['val_loss']:.4f}, val acc {r['val_accuracy_at_threshold']:.4f}")  # fmt: skip
    text = json.dumps(dict(sorted(records.items())), indent=2) + "\n"
    atomic_write(out, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
