"""Keep a finished run's outcome in results/: runs/ is not committed, and a session may start
on a fresh machine. Adds (or replaces) the run's record in a JSON file (validation figures of
its best epoch, cost, settings), copies its history.csv beside it, and writes its logits on
val and test to predictions/<run>.csv.gz there, which is all experiments/compare.py needs:

    python experiments/run_record.py runs/att-v2/on-s0 --out results/attention-v2/runs.json
    python experiments/compare.py results/attention-v2/runs.json

The record itself quotes validation only. The test logits are written here, unread: the test
split is summed up once, by experiments/compare.py, after the choice.
"""

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compare import run_outputs, save_outputs, score_run  # noqa: E402

from common import atomic_write  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", help="finished run folders (each with best.pt)")
    p.add_argument("--out", required=True, help="the JSON file of records to add them to")
    p.add_argument("--data", default=None, help="prepared dataset (default: each run's own)")
    return p.parse_args(argv)


def record(run, predictions, data=None):
    """A run's outcome from its best.pt (what the README's status line and tables quote), its
    logits written to predictions (a .csv.gz)."""
    facts, outputs = run_outputs(run / "best.pt", data)
    ckpt = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    # The same split must be scored as in training. prepare_data.py run again on another
    # machine writes the same faces and splits, but its MTCNN box and landmark figures can
    # differ in the last digit; checkpoints from before common.manifest_hash covered only the
    # splits carry a hash of the whole file, so the validation loss tells: it must come out as
    # training measured it.
    val_loss = score_run(facts, outputs)[0]["val_loss"]
    if facts["manifest_sha256"] != ckpt.get("manifest_sha256") and not math.isclose(
        val_loss, ckpt["val_metrics"]["loss"], rel_tol=1e-4
    ):
        sys.exit(f"error: {run}: {facts['data']} is not the dataset it was trained on (another "
                 f"manifest, and val loss {val_loss:.5f}, not {ckpt['val_metrics']['loss']:.5f})")  # fmt: skip
    save_outputs(predictions, outputs)
    return {
        **facts,
        "trained_manifest_sha256": ckpt.get("manifest_sha256"),
        "val_loss": ckpt["val_metrics"]["loss"],
        "val_accuracy_at_threshold": ckpt["val_metrics"]["accuracy_at_threshold"],
        "git_commit": ckpt.get("git_commit"),
        "predictions": str(predictions.relative_to(predictions.parent.parent)),
    }


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.is_file() else {}
    for run in map(Path, args.runs):
        records[run.name] = record(
            run, out.parent / "predictions" / f"{run.name}.csv.gz", args.data
        )
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
