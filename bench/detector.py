"""The face detector's cost on this machine: MTCNN (common.FaceDetector) per image, one at a
time and batched (facenet-pytorch batches only images of one size), per source.

    python bench/detector.py --raw data/raw --per-source 24 --json results/detector.json

For each source folder under RAW/{real,fake}/: --per-source images (a fixed random sample),
decoded once; then the median over --runs rounds of (a) one detect() call per image and
(b) one call per batch of same-size images, in ms per image, and the share of images with a
face. --threads sets torch's CPU threads (default: torch's own choice).
"""

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import FaceDetector, atomic_write, decode_image, find_images  # noqa: E402


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--raw", default="data/raw", help="folder with real/ and fake/ sources")
    p.add_argument("--per-source", type=int, default=24, help="images per source (default 24)")
    p.add_argument("--runs", type=int, default=3, help="rounds per measurement (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write the table as JSON here")
    return p.parse_args(argv)


def measure_source(detector, source, args):
    """ms per image one by one and batched (same-size images together), and the face rate."""
    files = find_images(source)
    files = random.Random(0).sample(files, min(args.per_source, len(files)))
    images = [decode_image(f) for f in files]
    single, batched, found = [], [], None
    by_size = defaultdict(list)
    for im in images:
        by_size[im.shape].append(im)
    groups = [np.stack(g) for g in by_size.values()]
    for _ in range(args.runs):
        seconds, faces = timed(lambda: [detector(im) for im in images])  # noqa: B023
        single.append(seconds / len(images))
        found = sum(bool(f) for f in faces) / len(images)
        seconds, _ = timed(lambda: [detector.batch(g) for g in groups])  # noqa: B023
        batched.append(seconds / len(images))
    return {
        "source": f"{source.parent.name}/{source.name}",
        "n": len(images),
        "median_side_px": int(np.median([max(im.shape[:2]) for im in images])),
        "ms_per_image_single": round(1000 * statistics.median(single), 1),
        "ms_per_image_batched": round(1000 * statistics.median(batched), 1),
        "face_found": round(found, 3),
    }


def print_table(table):
    print("\n| source | n | side px | ms/image one by one | ms/image batched | face found |")
    print("|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['source']} | {r['n']} | {r['median_side_px']} | {r['ms_per_image_single']} | "
              f"{r['ms_per_image_batched']} | {r['face_found']:.2f} |")  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sources = sorted(d for d in Path(args.raw).glob("*/*") if d.is_dir())
    if not sources:
        sys.exit(f"error: no source folders under {args.raw}/real and {args.raw}/fake")
    detector = FaceDetector()
    detector(np.zeros((64, 64, 3), np.uint8))  # warm-up
    table = []
    for source in sources:
        table.append(measure_source(detector, source, args))
        print(json.dumps(table[-1]), flush=True)
    info = {"threads": torch.get_num_threads(), "load_average": list(map(float, os.getloadavg()))}
    print_table(table)
    print(f"\n{info}")
    if args.json:
        payload = json.dumps({"sources": table, **info}, indent=1) + "\n"
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(payload))


if __name__ == "__main__":
    main()
