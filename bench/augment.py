"""The training input pipeline's cost: faces per second that one CPU core augments with
train.py's own transform (flip, random framing, down-and-up scaling, blur, JPEG), the number
that bounds training throughput on a GPU (each loader worker is one core).

    python bench/augment.py --data data/faces --n 600 --json results/augment.json

Reads --n validation crops (decoded once, outside the timing), then times train_transform on
them one by one in one thread, --runs times; reports the median faces/s.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import VIEW, atomic_write, load_split  # noqa: E402
from train import parse_args as train_defaults  # noqa: E402
from train import train_transform  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default="data/faces", help="prepared dataset (default data/faces)")
    p.add_argument("--n", type=int, default=600, help="validation crops to time (default 600)")
    p.add_argument("--runs", type=int, default=3, help="timed rounds, median kept (default 3)")
    p.add_argument("--json", default=None, help="also write the result here")
    return p.parse_args(argv)


def faces_per_second(images, transform, runs):
    rates = []
    for _ in range(runs):
        started = time.perf_counter()
        for image in images:
            transform(image)
        rates.append(len(images) / (time.perf_counter() - started))
    return statistics.median(rates)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)  # one loader worker = one core
    torch.manual_seed(0)
    images, _, _ = load_split(Path(args.data), "val", framing=None)
    images = images[: args.n]
    d = train_defaults([])
    size = round(images.shape[-1] * VIEW)  # the model's view of the stored crops (model_view)
    transform = train_transform(size, d.degrade_p, d.jpeg_p, d.min_crop, d.rescale_p)
    rate = faces_per_second(images, transform, args.runs)
    result = {"faces_per_s_one_core": rate, "n": len(images), "stored_side": images.shape[-1]}
    print(f"augmentation: {rate:.0f} faces/s on one core ({len(images)} stored crops of "
          f"{images.shape[-1]} px to {size} px, train.py's defaults)")  # fmt: skip
    if args.json:
        text = json.dumps(result, indent=2) + "\n"
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
