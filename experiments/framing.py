"""Does the detector depend on how the face is framed?

    python experiments/framing.py models/facecheck.pt --split test --out results/framing.md

For each image of the split this re-makes the model input from the ORIGINAL photo, from the
landmarks prepare_data.py recorded, with the face square scaled by each of FRAMINGS (0.8 =
framed tighter, 1.25 = wider: more hair and background; clamped inside the photo like every
crop), resized straight to the model's input, and reports accuracy per source and overall at
each checkpoint's own threshold, next to the change from framing 1.0. Needs the originals
(data/raw) where the manifest says they are.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import (  # noqa: E402
    CLASS_NAMES,
    STORE_SCALE,
    VIEW,
    atomic_write,
    crop_square,
    decode_image,
    face_square,
    read_manifest,
    whole_square,
)
from model import load_checkpoint, predict  # noqa: E402

FRAMINGS = (0.8, 0.9, 1.0, 1.1, 1.25)


def framed_inputs(rows, originals, size, framing):
    """The model input of every row from its original photo, the face square scaled by framing."""
    images = []
    for row, rgb in zip(rows, originals):
        h, w = rgb.shape[:2]
        if row.get("landmarks"):
            pts = np.array(row["landmarks"].split(), dtype=float)
            square = face_square(pts, w, h, scale=STORE_SCALE * VIEW * framing)
        else:  # a whole-image dataset: the centred square, scaled
            x0, y0, side = whole_square(w, h)
            side = min(side * VIEW * framing, w, h)
            square = ((w - side) / 2, (h - side) / 2, side)
        images.append(crop_square(rgb, square, size))
    return np.stack(images)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoints", nargs="+", help="checkpoints to compare")
    p.add_argument("--data", default="data/faces", help="prepared dataset (default data/faces)")
    p.add_argument("--split", default="test", help="default test")
    p.add_argument("--out", default="results/framing.md", help="default results/framing.md")
    return p.parse_args(argv)


def decode_originals(rows):
    originals = []
    for row in rows:
        original = Path(row["original"])
        original = original if original.is_absolute() else ROOT / original
        if not original.is_file():
            sys.exit(f"error: {original} not found; this check needs the original photos")
        originals.append(decode_image(original))
    return originals


def accuracy_per_framing(path, rows, originals, labels, sources, names):
    """{(source or "all", framing): accuracy} of one checkpoint at its own threshold."""
    model, ckpt = load_checkpoint(path)
    acc = {}
    for framing in FRAMINGS:
        images = framed_inputs(rows, originals, ckpt["image_size"], framing)
        prob, _ = predict(model, images, torch.device("cpu"))  # N x H x W x 3 is accepted
        correct = (prob.numpy() >= ckpt["threshold"]) == (labels == 1)
        for name in names:
            acc[name, framing] = correct[(sources == name) | (name == "all")].mean()
    return acc


def table_rows(path, acc, sources, names):
    lines = []
    for name in names:
        cells = [
            f"{acc[name, f]:.3f}"
            + ("" if f == 1.0 else f" ({100 * (acc[name, f] - acc[name, 1.0]):+.1f})")
            for f in FRAMINGS
        ]
        n = int(((sources == name) | (name == "all")).sum())
        lines.append(f"| {path} | {name} | {n} | {' | '.join(cells)} |")
    return lines


def main(argv=None):
    args = parse_args(argv)
    rows = read_manifest(args.data, args.split)
    originals = decode_originals(rows)
    labels = np.array([CLASS_NAMES.index(r["label"]) for r in rows])
    sources = np.array([r["source"] for r in rows])
    names = ["all", *sorted(np.unique(sources), key=lambda s: (labels[sources == s][0], s))]
    lines = [
        f"Accuracy on the {args.split} split when the face is framed tighter (0.8x) or wider "
        "(1.25x) than the model's view, re-cropped from the original photo with the recorded "
        "landmarks and resized straight to the model's input, at each checkpoint's own "
        "threshold. In brackets: the change from framing 1.0, in points.\n",
        "| checkpoint | source | n | " + " | ".join(f"framing {f}" for f in FRAMINGS) + " |",
        "|---|---|---|" + "---|" * len(FRAMINGS),
    ]
    for path in args.checkpoints:
        acc = accuracy_per_framing(path, rows, originals, labels, sources, names)
        lines += table_rows(path, acc, sources, names)
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
