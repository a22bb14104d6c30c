"""Where do the two arms look? One figure, the same faces: the attention-off model's Grad-CAM
saliency next to the attention-on model's attention map (the mean attention each position
receives) and its Grad-CAM, one face per source of the split.

    python experiments/attention_figure.py --on runs/on-s0 --off runs/off-s0 \\
        --split val --out results/attention-vs-saliency.png

Both arms are scored on one dataset (--data, else the runs' own, which must be the same);
a run trained on another manifest of it is drawn with a warning.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import CLASS_NAMES, load_rows, read_manifest  # noqa: E402
from evaluate import (  # noqa: E402
    _plt,
    check_manifest,
    explain,
    open_checkpoint,
    resolve_data,
    save_figure,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--on", required=True, help="attention-on run folder or .pt")
    p.add_argument("--off", required=True, help="attention-off run folder or .pt")
    p.add_argument("--data", default=None, help="prepared dataset (default: the runs' own)")
    p.add_argument("--split", default="val", help="default val")
    p.add_argument("--per-source", type=int, default=1, help="faces per source (default 1)")
    p.add_argument(
        "--out",
        default="results/attention-vs-saliency.png",
        help="default results/attention-vs-saliency.png",
    )
    return p.parse_args(argv)


def faces_per_source(rows, per_source):
    """The first per_source faces of every source, reals first (deterministic)."""
    picks, seen = [], {}
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["label"] != "real", rows[i]["source"]))
    for i in order:
        source = rows[i]["source"]
        if seen.get(source, 0) < per_source:
            seen[source] = seen.get(source, 0) + 1
            picks.append(i)
    return picks


def plot(images, rows, off, on, path):
    """Rows: faces; columns: the face, off's Grad-CAM, on's attention, on's Grad-CAM."""
    columns = [("face", None, None), ("off: Grad-CAM", off, "Grad-CAM"),
               ("on: attention", on, "attention"), ("on: Grad-CAM", on, "Grad-CAM")]  # fmt: skip
    plt = _plt()
    fig, axes = plt.subplots(len(images), 4, figsize=(7.2, 1.9 * len(images)), squeeze=False)
    for i, image in enumerate(images):
        img = image.permute(1, 2, 0).numpy()
        for j, (title, arm, key) in enumerate(columns):
            ax = axes[i, j]
            ax.axis("off")
            ax.imshow(img)
            if arm is None:
                ax.set_title(f"{rows[i]['source']} ({rows[i]['label']})", fontsize=7)
                continue
            ax.imshow(arm["maps"][key][i], cmap="jet", alpha=0.45)
            ax.set_title(f"{title}, p(fake) {arm['prob'][i]:.2f}", fontsize=7)
    save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cpu")
    arms = {}
    for name in ("off", "on"):
        model, ckpt, _ = open_checkpoint(getattr(args, name))
        if ckpt["config"]["attention"] != (name == "on"):
            sys.exit(f"error: --{name} {getattr(args, name)} is not an attention-{name} model")
        data_dir = resolve_data(ckpt, args.data)
        check_manifest(ckpt, data_dir)
        arms[name] = {"model": model, "data": data_dir, "ckpt": ckpt}
    # Both arms are shown the same faces, so they must be scored on one dataset. Whether each
    # was trained on it is check_manifest's warning, as in experiments/compare.py: a dataset
    # prepared again on another machine has the same faces under another manifest hash.
    if arms["on"]["data"].resolve() != arms["off"]["data"].resolve():
        sys.exit("error: --on and --off would be scored on different datasets; pass --data")
    # Only the faces shown are decoded, not the whole split.
    rows = read_manifest(arms["off"]["data"], args.split)
    if not rows:
        sys.exit(f"error: the {args.split} split of {arms['off']['data']} is empty")
    rows = [rows[i] for i in faces_per_source(rows, args.per_source)]
    images = load_rows(rows)
    if images.shape[-1] != arms["off"]["ckpt"]["image_size"]:
        sys.exit(f"error: {arms['off']['data']} was prepared for another input size")
    for arm in arms.values():
        prob, maps = explain(arm["model"].to(device), images, device)
        arm.update(prob=prob.numpy(), maps=maps)
    plot(images, rows, arms["off"], arms["on"], args.out)
    labels = np.array([r["label"] == "fake" for r in rows])
    # Each model at its own threshold (the one evaluate.py and infer.py use), not at 0.5.
    right = {n: np.mean((a["prob"] >= a["ckpt"]["threshold"]) == labels) for n, a in arms.items()}
    print(f"saved {args.out}: {len(rows)} faces ({', '.join(CLASS_NAMES)}), at its own "
          f"threshold off got {right['off']:.2f} and on {right['on']:.2f} of them right")  # fmt: skip


if __name__ == "__main__":
    main()
