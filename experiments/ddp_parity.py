"""Does training under torchrun give what one process gives? The same seed and settings, once
as `python train.py` and once as `torchrun --nproc_per_node N train.py` (gloo on a CPU-only
machine, NCCL on GPUs), then the two histories side by side.

    python experiments/ddp_parity.py --data data/faces --epochs 2 --out results/ddp-parity.md

The global batch is the same (train.py splits --batch-size over the processes), so the
schedule is too; the augmentation streams differ per process, so the numbers agree within
seed noise, not to the digit.
"""

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import atomic_write  # noqa: E402

METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default="data/faces", help="prepared dataset (default data/faces)")
    p.add_argument("--epochs", type=int, default=2, help="default 2")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (default 64)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="default 0")
    p.add_argument("--nproc", type=int, default=2, help="torchrun processes (default 2)")
    p.add_argument("--runs", default="runs/ddp-parity", help="default runs/ddp-parity")
    p.add_argument("--out", default="results/ddp-parity.md", help="default results/ddp-parity.md")
    p.add_argument("--device", default="auto", help="train.py --device (default auto)")
    return p.parse_args(argv)


def train(launcher, run, args, seed, threads):
    """One train.py run; returns its last history row."""
    cmd = [*launcher, str(ROOT / "train.py"), "--data", args.data, "--out", str(run),
           "--epochs", str(args.epochs), "--patience", str(args.epochs), "--seed", str(seed),
           "--batch-size", str(args.batch_size), "--device", args.device,
           "--threads", str(threads), "--workers", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True)
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))[-1]


def main(argv=None):
    args = parse_args(argv)
    runs, cores = Path(args.runs), os.cpu_count() or 2
    launchers = {
        "1 process": ([sys.executable], cores),
        f"torchrun x {args.nproc}": (
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(args.nproc),
            ],
            max(1, cores // args.nproc),
        ),  # fmt: skip
    }
    last = {name: [] for name in launchers}
    for seed in args.seeds:
        for name, (launcher, threads) in launchers.items():
            run = runs / f"{name.split()[0]}-b{args.batch_size}-s{seed}"
            last[name].append(train(launcher, run, args, seed, threads))
            print(f"seed {seed}, {name}: " + ", ".join(f"{m} {last[name][-1][m]}" for m in METRICS))
    lines = [
        f"`train.py` on {args.data}, global batch {args.batch_size}, {args.epochs} epochs, "
        f"seeds {' '.join(map(str, args.seeds))}: the last epoch, mean +- std over seeds "
        f"(`python experiments/ddp_parity.py`).\n",
        "| launch | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for name, rows in last.items():
        cells = []
        for m in METRICS:
            v = np.array([float(r[m]) for r in rows])
            cells.append(f"{v.mean():.3f} +- {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
