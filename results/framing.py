"""Does the detector depend on how the face is framed?

    python results/framing.py models/facecheck.pt runs/recipes/blur0.6-jpeg0.7/best.pt

Every fake in the shared faces is FFHQ-aligned (eyes at the same place, same scale), real
photos are not all, so "exactly this framing" is a shortcut a detector can learn; cropping a
fake tighter would then be enough to pass it off as real. For each validation image this
re-makes the model input from the ORIGINAL file (no upsampling: the 256-512 px originals are
still downscaled to 128 px) with the centred square of side crop * min(H, W), crop 1.0 to
0.62, on top of the source's own preparation crop (LFW's 0.62), and reports the accuracy per
source at each checkpoint's own threshold. Needs data/raw (the originals) next to data/faces.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import (  # noqa: E402
    CLASS_NAMES,
    atomic_write,
    crop_and_resize,
    decode_image,
    read_manifest,
)
from model import load_checkpoint, predict  # noqa: E402

CROPS = (1.0, 0.9, 0.8, 0.7, 0.62)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoints", nargs="+", help="checkpoints to compare")
    p.add_argument("--data", default="data/faces", help="prepared dataset (default data/faces)")
    p.add_argument("--split", default="val", help="default val")
    p.add_argument("--out", default="results/framing.md", help="default results/framing.md")
    args = p.parse_args(argv)

    rows = read_manifest(args.data, args.split)
    summary = json.loads((Path(args.data) / "summary.json").read_text())
    prep_crop = {s["source"]: s["crop"] for s in summary["sources"]}  # prepare_data.py's --crop
    originals = []
    for row in rows:
        original = ROOT / row["original"]
        if not original.is_file():
            sys.exit(f"error: {original} not found; this check needs the originals in data/raw")
        originals.append(decode_image(original))
    labels = np.array([CLASS_NAMES.index(r["label"]) for r in rows])
    sources = np.array([r["source"] for r in rows])
    lines = [
        f"Accuracy per {args.split} source when the face is framed tighter (centre crop of the "
        "original on top of the source's preparation crop, then the usual resize to the "
        "model's input), at each checkpoint's own threshold.\n",
        "| checkpoint | source | " + " | ".join(f"crop {c}" for c in CROPS) + " |",
        "|---|---|" + "---|" * len(CROPS),
    ]
    for path in args.checkpoints:
        model, ckpt = load_checkpoint(path)
        size, threshold = ckpt["image_size"], ckpt["threshold"]
        acc = {}
        for crop in CROPS:
            images = np.stack(
                [
                    crop_and_resize(rgb, size, crop * prep_crop[row["source"]])
                    for row, rgb in zip(rows, originals)
                ]
            )
            prob, _ = predict(model, images, torch.device("cpu"))  # N x H x W x 3 is accepted
            correct = (prob.numpy() >= threshold) == (labels == 1)
            for source in np.unique(sources):
                acc[source, crop] = correct[sources == source].mean()
        for source in np.unique(sources):
            cells = " | ".join(f"{acc[source, c]:.2f}" for c in CROPS)
            lines.append(f"| {path} | {source} | {cells} |")
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
