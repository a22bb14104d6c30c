"""Evaluate a trained FaceCheckNet on one split of a prepared dataset.

    python evaluate.py --split test                     # best run under runs/, on its own data
    python evaluate.py --checkpoint runs/exp-a --robustness --heatmaps 8

Writes metrics.json, predictions.csv, confusion_matrix.png, roc.png, per_source.png,
calibration.png, face_size.png, size_sharpness.png and demographics.png (plus robustness.png /
heatmaps.png when asked) to RUN/eval-<split>/.
"fake" is the positive class. Predictions use the decision threshold stored in the
checkpoint (chosen on validation, never on the split evaluated); accuracy at 0.5 is shown
for reference. The shortcut audits: the per-source table (a model that keys on a source's
framing or codec instead of generator traces shows up as one source far below the others);
real faces called real per demographic group where the file names say who is in the photo
(demographics.py), the gap between the best and the worst group beside the accuracy; and
prob_fake against the face's native size and its sharpness within each class.
Several runs side by side (mean +- std per arm, McNemar, the attention verdict):
experiments/compare.py.
"""

import argparse
import json
import math
import sys
from itertools import zip_longest
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from calibrate import decision
from common import (
    CLASS_NAMES,
    PERTURBATIONS,
    VIEW,
    atomic_write,
    load_split,
    manifest_hash,
    model_view,
    perturb,
    pick_device,
    to_model_input,
    write_csv,
)
from demographics import MIN_GROUP, called_real_by_group
from model import CheckpointError, load_checkpoint, predict


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="a .pt file or a run folder (its best.pt); default: the best.pt under --runs "
        "with the lowest validation loss",
    )
    p.add_argument("--runs", default="runs", help="where to look for that best run (default runs)")
    p.add_argument(
        "--data",
        default=None,
        help="prepared dataset folder (default: the one stored in the checkpoint if it "
        "exists, else data/faces)",
    )
    p.add_argument(
        "--split",
        choices=["train", "val", "test"],
        default="test",
        help="split to evaluate (default test)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default RUN/eval-<split>/)",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="also write the JSON report here")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="default auto: CUDA if present",
    )
    p.add_argument(
        "--batch-size", type=int, default=256, help="images per forward pass (default 256)"
    )
    p.add_argument(
        "--robustness",
        action="store_true",
        help="re-evaluate after JPEG q95/75/50, downscale x0.5 and back, Gaussian blur sigma 1, "
        "zoom x1.2 / x1.5 (centre crop, resized back), and with the face framed 0.8x tighter "
        "and 1.25x wider from its stored crop (robustness.png)",
    )
    p.add_argument(
        "--min-group",
        type=int,
        default=MIN_GROUP,
        metavar="N",
        help=f"faces a demographic group needs to count towards the gap (default {MIN_GROUP})",
    )
    p.add_argument(
        "--heatmaps",
        type=int,
        default=0,
        metavar="N",
        help="grid of N images with Grad-CAM (and attention) overlays (default 0 = none)",
    )
    args = p.parse_args(argv)
    # Checked here, as export.py and infer.py do: a batch of 0 would fail only after the split
    # has loaded.
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size} is not >= 1")
    if args.heatmaps < 0:
        p.error(f"--heatmaps {args.heatmaps} is not >= 0")
    return args


# ---------------------------------------------------------------- metrics
def compute_metrics(labels, prob, threshold):
    """Headline metrics of one set of predictions (fake = 1 is the positive class)."""
    from sklearn import metrics as skm

    labels, prob = np.asarray(labels, dtype=int), np.asarray(prob, dtype=float)
    pred = (prob >= threshold).astype(int)
    p, r, f, support = skm.precision_recall_fscore_support(
        labels, pred, labels=[0, 1], zero_division=0
    )
    mp, mr, mf, _ = skm.precision_recall_fscore_support(
        labels, pred, labels=[0, 1], average="macro", zero_division=0
    )
    out = {
        "n": len(labels),
        "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(labels, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, pred)),
        "accuracy_at_0.5": float(skm.accuracy_score(labels, (prob >= 0.5).astype(int))),
        "per_class": {
            name: dict(
                precision=float(p[i]), recall=float(r[i]), f1=float(f[i]), support=int(support[i])
            )
            for i, name in enumerate(CLASS_NAMES)
        },
        "macro": {"precision": float(mp), "recall": float(mr), "f1": float(mf)},
        "confusion_matrix": {
            "rows": "true",
            "columns": "predicted",
            "labels": list(CLASS_NAMES),
            "matrix": skm.confusion_matrix(labels, pred, labels=[0, 1]).tolist(),
        },
        **dict.fromkeys(["roc_auc", "average_precision", "tpr_at_fpr_1pct", "tpr_at_fpr_5pct"]),
        # Does prob_fake mean what it says? Brier score (0 is perfect, 0.25 a constant 0.5) and
        # the reliability table: per bin of prob_fake, how many images and how many are fake.
        "brier": float(skm.brier_score_loss(labels, prob, labels=[0, 1])),
        "calibration": calibration_bins(labels, prob),
    }
    if len(np.unique(labels)) == 2:  # ranking metrics need both classes
        fpr, tpr, _ = skm.roc_curve(labels, prob, drop_intermediate=False)
        out.update(
            roc_auc=float(skm.roc_auc_score(labels, prob)),
            average_precision=float(skm.average_precision_score(labels, prob)),
            # The best operating point whose false-positive rate stays within the budget.
            tpr_at_fpr_1pct=float(tpr[fpr <= 0.01].max()),
            tpr_at_fpr_5pct=float(tpr[fpr <= 0.05].max()),
        )
    return out


def decisions(labels, prob, threshold, band):
    """What a user is shown: real, fake or unsure (calibrate.decision with the checkpoint's band,
    picked on validation). The share unsure, how often the confident calls are right, and the
    two confident errors per class (a real face called fake confidently is the one that hurts a
    real person). None without a band (a checkpoint from before bands existed)."""
    if band is None:
        return None
    labels = np.asarray(labels, dtype=int)
    said = np.array([decision(float(p), threshold, band) for p in prob])
    sure = said != "unsure"
    right = said == np.array(CLASS_NAMES)[labels]
    per_class = {
        name: {verdict: float((said[labels == i] == verdict).mean()) if (labels == i).any() else None
               for verdict in ("real", "unsure", "fake")}
        for i, name in enumerate(CLASS_NAMES)
    }  # fmt: skip
    return {
        "band": [float(band[0]), float(band[1])],
        "unsure_share": float(1 - sure.mean()),
        "confident_accuracy": float(right[sure].mean()) if sure.any() else None,
        "real_called_fake_confidently": per_class["real"]["fake"],
        "fake_called_real_confidently": per_class["fake"]["real"],
        "per_class": per_class,
    }


def calibration_bins(labels, prob, n_bins=10):
    """Reliability table over equal-width bins of prob_fake: n, mean prob_fake and the fraction
    that is fake (sklearn's calibration_curve gives the same two curves but drops the counts,
    which say how far to trust each bin); expected calibration error = the n-weighted mean gap."""
    labels, prob = np.asarray(labels, dtype=float), np.asarray(prob, dtype=float)
    which = np.minimum((prob * n_bins).astype(int), n_bins - 1)  # 1.0 joins the last bin
    n = np.bincount(which, minlength=n_bins)
    mean_prob = np.bincount(which, prob, n_bins) / np.maximum(n, 1)
    fraction_fake = np.bincount(which, labels, n_bins) / np.maximum(n, 1)
    bins = [
        dict(low=b / n_bins, high=(b + 1) / n_bins, n=int(n[b]),
             mean_prob_fake=float(mean_prob[b]), fraction_fake=float(fraction_fake[b]))
        for b in np.flatnonzero(n)
    ]  # fmt: skip
    ece = float((n * np.abs(mean_prob - fraction_fake)).sum() / max(len(prob), 1))
    return {"bins": bins, "expected_calibration_error": ece}


def per_source_table(rows, prob, threshold, band=None):
    """n, accuracy and mean prob_fake of every source in rows (one label per source), with a
    band the share unsure and confidently wrong, and for face data the median face size (model
    view side in source pixels) and the Spearman correlation of prob_fake with it inside the
    source."""
    from scipy.stats import spearmanr

    prob = np.asarray(prob, dtype=float)
    sources = np.array([r["source"] for r in rows])
    labels = np.array([CLASS_NAMES.index(r["label"]) for r in rows])
    correct = (prob >= threshold).astype(int) == labels
    label_of = {r["source"]: r["label"] for r in rows}
    table = []
    for source in sorted(label_of, key=lambda s: (CLASS_NAMES.index(label_of[s]), s)):
        m = sources == source
        row = dict(source=source, label=label_of[source], n=int(m.sum()))
        row.update(accuracy=float(correct[m].mean()), mean_prob_fake=float(prob[m].mean()))
        if band is not None:
            d = decisions(labels[m], prob[m], threshold, band)["per_class"][label_of[source]]
            row.update(
                unsure=d["unsure"],
                confidently_wrong=d["fake" if label_of[source] == "real" else "real"],
            )
        if rows[0].get("crop_side"):  # the face's native size, and whether the score follows it
            sides = np.array([VIEW * float(r["crop_side"]) for r in rows])[m]
            row["median_face_px"] = float(np.median(sides))
            varies = m.sum() > 2 and np.ptp(sides) > 0 and np.ptp(prob[m]) > 0
            rho = spearmanr(sides, prob[m]).statistic if varies else None
            row["spearman_prob_vs_face_px"] = None if rho is None else float(rho)
        table.append(row)
    return table


def sharpness(images, batch_size=256):
    """Variance of the Laplacian of each image's grey version (uint8 N x 3 x H x W; 0-255
    scale, OpenCV's 3x3 kernel): the usual focus measure. A small face upscaled to the input
    scores low, a large sharp one high."""
    kernel = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(images), batch_size):
        grey = (images[i : i + batch_size].float() * luma).sum(1, keepdim=True)
        out.append(F.conv2d(grey, kernel).flatten(1).var(1, correction=0))
    return torch.cat(out).numpy()


def shortcut_check(measure, labels, prob, threshold, n_bins=5):
    """Does a property of the photo (the face's native size, its sharpness) tell the classes
    apart, and does the model follow it? ROC-AUC of the measure alone as a fake score (0.5: no
    signal); the Spearman correlation of prob_fake with it within each class (near 0: the
    score does not follow it); and per bin of the measure (quantiles over both classes, the
    same edges for both) each class's n, mean prob_fake and share called fake."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    measure, labels = np.asarray(measure, dtype=float), np.asarray(labels)
    prob = np.asarray(prob, dtype=float)
    both = len(set(labels.tolist())) > 1
    out = {"alone_roc_auc": float(roc_auc_score(labels, measure)) if both else None}
    out["spearman"] = {}
    for k, name in enumerate(CLASS_NAMES):
        m = labels == k
        varies = m.sum() > 2 and np.ptp(measure[m]) > 0 and np.ptp(prob[m]) > 0
        out["spearman"][name] = float(spearmanr(measure[m], prob[m]).statistic) if varies else None
    edges = np.unique(np.quantile(measure, np.linspace(0, 1, n_bins + 1)))
    which = np.digitize(measure, edges[1:-1])  # a value on an inner edge joins the upper bin
    out["bins"] = []
    for b in range(max(len(edges) - 1, 1)):
        row = {"low": float(edges[b]), "high": float(edges[min(b + 1, len(edges) - 1)])}
        for k, name in enumerate(CLASS_NAMES):
            m = (which == b) & (labels == k)
            row[name] = {"n": int(m.sum()),
                         "mean_prob_fake": float(prob[m].mean()) if m.any() else None,
                         "called_fake": float((prob[m] >= threshold).mean()) if m.any() else None}  # fmt: skip
        out["bins"].append(row)
    return out


def size_and_sharpness(rows, sharp, labels, prob, threshold):
    """shortcut_check on the face's native size (the model's view side in source pixels, from
    the manifest; None for a dataset without face boxes) and on sharp (sharpness of the
    images), for manifest rows with labels (0 real, 1 fake) and prob_fake."""
    sides = [VIEW * float(r["crop_side"]) for r in rows] if rows[0].get("crop_side") else None
    return {
        "face_px": None if sides is None else shortcut_check(sides, labels, prob, threshold),
        "sharpness": shortcut_check(sharp, labels, prob, threshold),
    }


FRAMINGS = (0.8, 1.25)  # the same face framed 0.8x (tighter) and 1.25x (wider) from its crop


def robustness(model, stored, labels, threshold, device, batch_size=256):
    """Accuracy and AUC on the clean split, after each perturbation of the model's view, and
    with the face framed tighter / wider (model_view of the stored crops at FRAMINGS)."""
    images = model_view(stored)
    results = []
    conditions = ["clean", *PERTURBATIONS, *(f"frame{f}" for f in FRAMINGS)]
    for name in tqdm(conditions, desc="robustness", leave=False):
        if name.startswith("frame"):
            x = model_view(stored, float(name[len("frame") :]))
        else:
            x = images if name == "clean" else perturb(images, name, batch_size)
        prob, _ = predict(model, x, device, batch_size)
        m = compute_metrics(labels, prob, threshold)
        results.append({"condition": name, "accuracy": m["accuracy"], "roc_auc": m["roc_auc"]})
    return results


# ---------------------------------------------------------------- heatmaps
def pick_examples(labels, n):
    """n indices, real and fake alternating, evenly spread over each class (deterministic)."""
    labels = np.asarray(labels)
    picks = []
    for k, want in ((0, n - n // 2), (1, n // 2)):
        idx = np.flatnonzero(labels == k)
        m = min(want, len(idx))
        picks.append(idx[np.linspace(0, len(idx) - 1, m).round().astype(int)] if m else [])
    return [int(i) for pair in zip_longest(*picks) for i in pair if i is not None]


def explain(model, images, device):
    """Grad-CAM of the fake logit on the stage-3 features and, when the model has the layer,
    the mean attention each position of the layer's stage receives; upsampled, each scaled
    to [0, 1]."""
    model.eval()
    if model.attention is not None:
        model.attention.keep_map = True
    feats = model.features(to_model_input(images).to(device))
    feats.retain_grad()
    logits = model.head(feats.mean((2, 3)))
    # Eval-mode batch norm keeps images independent, so one backward serves the batch.
    logits[:, 1].sum().backward()
    cam = F.relu((feats.grad.mean((2, 3), keepdim=True) * feats).sum(1, keepdim=True))
    maps = {"Grad-CAM": cam.detach()}
    if model.attention is not None:
        received = model.attention.last_map.mean(1)  # average over queries: n x hw (keys)
        side = math.isqrt(received.shape[1])
        maps["attention"] = received.reshape(-1, 1, side, side)
        model.attention.keep_map, model.attention.last_map = False, None
    model.zero_grad(set_to_none=True)
    scaled = {}
    for name, m in maps.items():
        m = F.interpolate(m, size=images.shape[-2:], mode="bilinear", align_corners=False)
        lo, hi = m.amin((2, 3), keepdim=True), m.amax((2, 3), keepdim=True)
        scaled[name] = ((m - lo) / (hi - lo).clamp_min(1e-12)).squeeze(1).cpu().numpy()
    return logits.detach().softmax(1)[:, 1].cpu(), scaled


# ---------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), suffix=".png")
    _plt().close(fig)


def plot_confusion(metrics, path):
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = _plt().subplots(figsize=(4, 3.6))
    cm = np.array(metrics["confusion_matrix"]["matrix"])
    ConfusionMatrixDisplay(cm, display_labels=CLASS_NAMES).plot(
        ax=ax, colorbar=False, values_format="d"
    )
    ax.set_title(f"threshold {metrics['threshold']:.3f}, accuracy {metrics['accuracy']:.3f}")
    save_figure(fig, path)


def plot_roc(labels, prob, metrics, path):
    from sklearn.metrics import RocCurveDisplay

    fig, ax = _plt().subplots(figsize=(4.5, 4.2))
    RocCurveDisplay.from_predictions(labels, prob, ax=ax, name="FaceCheckNet", pos_label=1)
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]["matrix"]
    ax.plot(fp / (fp + tn), tp / (tp + fn), "ro", label=f"threshold {metrics['threshold']:.3f}")
    ax.set(
        xlabel="false-positive rate (real called fake)", ylabel="true-positive rate (fake caught)"
    )
    ax.legend(loc="lower right")
    save_figure(fig, path)


def plot_calibration(metrics, path):
    bins = metrics["calibration"]["bins"]
    fig, (ax, hist) = _plt().subplots(
        2, 1, figsize=(4.5, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], ":", color="gray", label="perfectly calibrated")
    ax.plot([b["mean_prob_fake"] for b in bins], [b["fraction_fake"] for b in bins], "o-")
    ax.set(
        ylabel="fraction that is fake",
        title=f"Brier {metrics['brier']:.3f}, "
        f"ECE {metrics['calibration']['expected_calibration_error']:.3f}",
    )
    ax.legend(loc="upper left")
    hist.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["n"] for b in bins], width=0.09)
    hist.axvline(metrics["threshold"], color="red", lw=1)
    hist.set(xlim=(0, 1), xlabel="prob_fake (red: threshold)", ylabel="images")
    save_figure(fig, path)


def plot_per_source(table, path):
    fig, ax = _plt().subplots(figsize=(6, 0.45 * len(table) + 1.2))
    colors = ["tab:blue" if t["label"] == "real" else "tab:red" for t in table]
    ax.barh(
        [f"{t['source']} ({t['label']}, n={t['n']})" for t in table],
        [t["accuracy"] for t in table],
        color=colors,
    )
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="accuracy", title="accuracy per source")
    save_figure(fig, path)


def plot_face_size(rows, prob, threshold, path):
    """prob_fake against the face's native size, one colour per source: a model that reads the
    resolution back out of the pixels shows a slope."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    label_of = {r["source"]: r["label"] for r in rows}
    sources = sorted(label_of, key=lambda s: (label_of[s] != "real", s))
    cmap = plt.get_cmap("tab20")
    prob = np.asarray(prob, dtype=float)
    for k, source in enumerate(sources):
        idx = [i for i, r in enumerate(rows) if r["source"] == source]
        px = [VIEW * float(rows[i]["crop_side"]) for i in idx]
        marker = "o" if rows[idx[0]]["label"] == "real" else "^"
        ax.scatter(px, prob[idx], s=6, alpha=0.5, marker=marker, color=cmap(k % 20),
                   label=f"{source} ({rows[idx[0]]['label']})")  # fmt: skip
    ax.axhline(threshold, color="k", lw=0.8, ls="--")
    ax.set(xscale="log", xlabel="face size in the photo (model view side, source pixels)",
           ylabel="prob_fake", title="score against native face size")  # fmt: skip
    ax.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5))
    save_figure(fig, path)


def plot_demographics(d, path):
    """Share of real faces called real per group; groups too small for the gap drawn pale."""
    from matplotlib.colors import to_rgba

    groups = d["groups"]
    fig, ax = _plt().subplots(figsize=(6, 0.4 * len(groups) + 1.4))
    colors = {"race": "tab:purple", "gender": "tab:green", "age": "tab:orange"}
    shares = np.array([g["called_real"] for g in groups])
    bounds = np.array([g.get("called_real_95", [s, s]) for g, s in zip(groups, shares)])
    ax.barh([f"{g['attribute']} {g['group']} (n={g['n']})" for g in groups], shares,
            xerr=[shares - bounds[:, 0], bounds[:, 1] - shares], ecolor="0.3", capsize=2,
            color=[to_rgba(colors[g["attribute"]], 1.0 if g["n"] >= d["min_n"] else 0.35)
                   for g in groups])  # fmt: skip
    ax.invert_yaxis()
    gap = "n/a" if d["gap"] is None else f"{100 * d['gap']['gap']:.1f} points"
    gap += f" over groups of >= {d['min_n']}"
    if d["gap"] and d["gap"].get("by_chance"):
        gap += f"\n(chance alone, these groups: median {100 * d['gap']['by_chance']['median']:.1f})"
    ax.set(xlim=(0, 1), xlabel="real faces called real (at the threshold; bars: 95 % interval)",
           title=f"real faces called real per group\ngap {gap}")  # fmt: skip
    save_figure(fig, path)


def plot_size_sharpness(checks, threshold, path):
    """Mean prob_fake per bin of the face's native size and of its sharpness, each class: a
    model that reads the resolution or the sharpness back out of the pixels shows a slope."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    panels = [(name, c) for name, c in checks.items() if c is not None]
    fig, axes = _plt().subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (name, c) in zip(axes[0], panels):
        centre = [np.sqrt(max(b["low"], 1e-6) * max(b["high"], 1e-6)) for b in c["bins"]]
        for k, color in zip(CLASS_NAMES, ("tab:blue", "tab:red")):
            pts = [(x, b[k]["mean_prob_fake"]) for x, b in zip(centre, c["bins"]) if b[k]["n"]]
            if pts:
                ax.plot(*zip(*pts), "o-", color=color,
                        label=f"{k} (Spearman {fmt(c['spearman'][k], 2)})")  # fmt: skip
        ax.axhline(threshold, color="k", lw=0.8, ls="--")
        xlabel = "face size (model view side, source px)" if name == "face_px" else (
            "sharpness (variance of the Laplacian)")  # fmt: skip
        # Sharpness spans two decades; face sizes of a split, well under one.
        ax.set(xscale="log" if name == "sharpness" else "linear", ylim=(0, 1), xlabel=xlabel,
               ylabel="mean prob_fake per bin",
               title=f"alone: ROC-AUC {fmt(c['alone_roc_auc'], 2)}")  # fmt: skip
        if name == "sharpness":
            ax.xaxis.set_major_formatter(ScalarFormatter())  # plain numbers on the log axis
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_robustness(results, path):
    fig, ax = _plt().subplots(figsize=(7, 3.5))
    x = np.arange(len(results))
    ax.bar(x - 0.2, [r["accuracy"] for r in results], 0.4, label="accuracy")
    ax.bar(x + 0.2, [r["roc_auc"] or 0 for r in results], 0.4, label="ROC-AUC")
    ax.set_xticks(x, [r["condition"] for r in results])
    ax.set(ylim=(0, 1.15), title="robustness (same images, both classes perturbed)")
    ax.legend(loc="upper center", ncols=2)
    save_figure(fig, path)


def plot_heatmaps(images, labels, prob, maps, threshold, path):
    n, names = len(images), ["image", *maps]
    cols = min(n, 8)
    blocks = math.ceil(n / cols)
    plt = _plt()
    fig, axes = plt.subplots(
        blocks * len(names), cols, figsize=(1.9 * cols, 2.0 * blocks * len(names)), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        img = images[i].permute(1, 2, 0).numpy()
        for j, name in enumerate(names):
            ax = axes[(i // cols) * len(names) + j, i % cols]
            ax.imshow(img)
            if name == "image":
                right = (prob[i] >= threshold) == (labels[i] == 1)
                ax.set_title(
                    f"{CLASS_NAMES[labels[i]]}, p(fake)={prob[i]:.2f}",
                    fontsize=8,
                    color="green" if right else "red",
                )
            else:
                ax.imshow(maps[name][i], cmap="jet", alpha=0.45)
                ax.set_title(name, fontsize=8)
    save_figure(fig, path)


# ---------------------------------------------------------------- runs and data
def open_checkpoint(path):
    """A .pt file or a run folder (its best.pt) -> (model, ckpt, .pt path); errors in one line."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    try:
        model, ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        sys.exit(f"error: {exc}")
    return model, ckpt, path


def find_best_run(runs_dir, data=None):
    """The best.pt under runs_dir with the lowest validation loss, among the runs trained on
    data's manifest when data is given. Losses on different validation sets do not compare:
    runs of several datasets, with no data to choose by, are refused."""
    want = manifest_hash(data) if data and (Path(data) / "manifest.csv").is_file() else None
    candidates = []
    for path in sorted(Path(runs_dir).glob("*/best.pt")):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            loss = float(ckpt["val_metrics"]["loss"])
        except Exception:
            continue  # an unreadable or foreign file is not a candidate
        if want is None or ckpt.get("manifest_sha256") == want:
            candidates.append((loss, path, ckpt.get("manifest_sha256")))
    if not candidates:
        trained_on = f" trained on {data}" if want else ""
        sys.exit(
            f"error: no run{trained_on} with a best.pt under {runs_dir}/; train one or pass --checkpoint"
        )
    if len({m for _, _, m in candidates}) > 1:
        sys.exit(f"error: the runs under {runs_dir}/ were trained on different datasets, whose "
                 "validation losses do not compare: pass --data or --checkpoint")  # fmt: skip
    return min(candidates, key=lambda c: c[0])[1]


def resolve_data(ckpt, data):
    """--data, else the folder the checkpoint was trained on, else data/faces."""
    if data is None:
        stored = ckpt.get("data")
        data = stored if stored and (Path(stored) / "manifest.csv").is_file() else "data/faces"
    if not (Path(data) / "manifest.csv").is_file():
        sys.exit(f"error: no prepared dataset at {data} (manifest.csv missing); pass --data")
    return Path(data)


def check_manifest(ckpt, data_dir):
    if ckpt.get("manifest_sha256") not in (None, manifest_hash(data_dir)):
        print(
            f"warning: {data_dir}/manifest.csv is not the one this model was trained with "
            "(manifest_sha256 differs): its splits may overlap the training images",
            file=sys.stderr,
        )
        return False
    return True


def fmt(x, digits=4):
    return "n/a" if x is None else f"{x:.{digits}f}"


def interval(bounds):
    """' (low-high)' for a 95 % interval, '' where none was measured."""
    return "" if bounds is None else f" ({bounds[0]:.2f}-{bounds[1]:.2f})"


def table(header, rows):
    """A markdown table: readable in a terminal, pastes into the README as is."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def write_json(path, obj):
    text = json.dumps(obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))


# ---------------------------------------------------------------- main
def print_report(m, sources):
    print(
        f"threshold {m['threshold']:.4f} (stored in the checkpoint; train.py picks it on validation); "
        f"fake is the positive class\naccuracy {m['accuracy']:.4f} (at 0.5: {m['accuracy_at_0.5']:.4f}), "
        f"balanced accuracy {m['balanced_accuracy']:.4f}, ROC-AUC {fmt(m['roc_auc'])}, "
        f"average precision {fmt(m['average_precision'])}\nTPR at 1% FPR {fmt(m['tpr_at_fpr_1pct'])}, "
        f"at 5% FPR {fmt(m['tpr_at_fpr_5pct'])}\nBrier score {m['brier']:.4f}, expected "
        f"calibration error {m['calibration']['expected_calibration_error']:.4f} (calibration.png)"
    )
    if d := m.get("decisions"):
        print(f"unsure band prob_fake {d['band'][0]:.3f}-{d['band'][1]:.3f} (from validation): "
              f"unsure {fmt(d['unsure_share'], 3)}, confident calls right "
              f"{fmt(d['confident_accuracy'], 3)}; real faces called fake confidently "
              f"{fmt(d['real_called_fake_confidently'], 3)}, fakes called real confidently "
              f"{fmt(d['fake_called_real_confidently'], 3)}")  # fmt: skip
    print(demographic_headline(m["demographics"]) + "\n")
    classes = [*m["per_class"].items(), ("macro", {**m["macro"], "support": m["n"]})]
    rows = [
        [n, *(fmt(c[k]) for k in ("precision", "recall", "f1")), c["support"]] for n, c in classes
    ]
    print(table(["class", "precision", "recall", "F1", "support"], rows) + "\n")
    cm = m["confusion_matrix"]["matrix"]
    rows = [[f"true {n}", *row] for n, row in zip(CLASS_NAMES, cm)]
    print(table(["", *(f"predicted {n}" for n in CLASS_NAMES)], rows) + "\n")
    rows = [
        [s["source"], s["label"], s["n"], fmt(s["accuracy"]), fmt(s.get("unsure"), 3),
         fmt(s.get("confidently_wrong"), 3), fmt(s["mean_prob_fake"]),
         fmt(s.get("median_face_px"), 0), fmt(s.get("spearman_prob_vs_face_px"), 2)]
        for s in sources
    ]  # fmt: skip
    header = ["source", "label", "n", "accuracy", "unsure", "confidently wrong",
              "mean prob_fake", "face px", "Spearman vs px"]  # fmt: skip
    print("per source (shortcut audit)\n\n" + table(header, rows))
    print_audits(m)


def demographic_headline(d):
    """The demographic audit in one line, for beside the accuracy."""
    if d is None:
        return "demographic gap: n/a (no real face of this split is labelled with who it shows)"
    if d["gap"] is None:
        return (f"demographic gap: n/a (fewer than two groups of >= {d['min_n']} labelled real "
                f"faces; {d['n_labelled']} labelled)")  # fmt: skip
    g = d["gap"]
    chance = g.get("by_chance")  # absent from reports written before it was measured
    chance = "" if chance is None else (
        f"; chance alone, with these groups: median {100 * chance['median']:.1f}, 95th "
        f"percentile {100 * chance['p95']:.1f} points, p = {chance['p']:.3g}")  # fmt: skip
    return (f"demographic gap {100 * g['gap']:.1f} points in real faces called real: "
            f"{g['best']} {g['best_called_real']:.3f}, {g['worst']} {g['worst_called_real']:.3f} "
            f"(over {len(g['over'])} groups of >= {d['min_n']} faces{chance}; demographics.png)")  # fmt: skip


def print_audits(m):
    """Who gets called fake, and whether the score follows the face's size or sharpness."""
    if d := m["demographics"]:
        confident = d["unsure_band"] is not None
        header = ["attribute", "group", "n", "sources", "called real (95 % interval)"]
        header += ["called fake confidently"] if confident else []
        rows = []
        for g in d["groups"]:
            small = "" if g["n"] >= d["min_n"] else " (few)"
            cells = [g["attribute"], g["group"], f"{g['n']}{small}",
                     ", ".join(f"{k} {v}" for k, v in g["sources"].items()),
                     fmt(g["called_real"], 3) + interval(g.get("called_real_95"))]  # fmt: skip
            rows.append(cells + ([fmt(g["called_fake_confidently"], 3)] if confident else []))
        print(f"\nreal faces called real per group ({d['n_labelled']} labelled real faces; "
              f"groups of < {d['min_n']} faces are marked (few) and left out of the gap)\n")  # fmt: skip
        print(table(header, rows))
        print(demographic_headline(d))
    for name, c in m["size_and_sharpness"].items():
        if c is None:
            continue
        unit = "face px" if name == "face_px" else "sharpness"
        header = [f"{unit} bin"] + [f"{k} {col}" for k in CLASS_NAMES
                                    for col in ("n", "mean prob_fake", "called fake")]  # fmt: skip
        rows = [[f"{b['low']:.0f}-{b['high']:.0f}"] +
                [x for k in CLASS_NAMES for x in (b[k]["n"], fmt(b[k]["mean_prob_fake"], 3),
                                                  fmt(b[k]["called_fake"], 3))]
                for b in c["bins"]]  # fmt: skip
        what = ("the face's native size (model view side in source pixels)" if name == "face_px"
                else "sharpness (variance of the Laplacian of the grey model input)")  # fmt: skip
        print(f"\nprob_fake against {what} (size_sharpness.png)\n\n" + table(header, rows))
        rho = c["spearman"]
        print(f"Spearman of prob_fake with {unit}: real {fmt(rho['real'], 3)}, fake "
              f"{fmt(rho['fake'], 3)}; {unit} alone separates the classes with ROC-AUC "
              f"{fmt(c['alone_roc_auc'], 3)}")  # fmt: skip


def evaluate_split(args, device):
    model, ckpt, ckpt_path = open_checkpoint(args.checkpoint or find_best_run(args.runs, args.data))
    if args.checkpoint is None:
        print(f"checkpoint: {ckpt_path} (lowest validation loss under {args.runs}/)")
    data_dir = resolve_data(ckpt, args.data)
    manifest_ok = check_manifest(ckpt, data_dir)
    stored, labels, rows = load_split(
        data_dir, args.split, framing=None, progress=True, model_size=ckpt["image_size"]
    )
    images = model_view(stored)
    threshold = float(ckpt["threshold"])
    prob, _ = predict(model.to(device), images, device, args.batch_size)
    band = ckpt.get("unsure_band")
    metrics = compute_metrics(labels, prob, threshold)
    metrics["decisions"] = decisions(labels, prob.numpy(), threshold, band)
    sources = per_source_table(rows, prob, threshold, band)
    # The audits that show a shortcut: who gets called fake, and whether large and sharp does.
    groups = called_real_by_group(rows, prob.numpy(), threshold, band, args.min_group)
    metrics["demographic_gap"] = groups["gap"]["gap"] if groups and groups["gap"] else None
    metrics["demographics"] = groups
    metrics["size_and_sharpness"] = size_and_sharpness(
        rows, sharpness(images), labels, prob, threshold
    )
    attention = "on" if ckpt["config"]["attention"] else "off"
    print(
        f"{ckpt_path} (attention {attention}, epoch {ckpt['epoch']}) on {data_dir} {args.split}: "
        f"{len(rows)} images ({int((labels == 0).sum())} real, {int((labels == 1).sum())} fake)"
    )
    print_report(metrics, sources)

    out = Path(args.out or ckpt_path.parent / f"eval-{args.split}")
    report = {"checkpoint": str(ckpt_path), "data": str(data_dir), "split": args.split}
    report.update(attention=attention, epoch=ckpt["epoch"], manifest_matches=manifest_ok)
    report.update(metrics=metrics, per_source=sources)
    preds = [
        {
            "path": r["path"],
            "source": r["source"],
            "label": r["label"],
            "prob_fake": f"{p:.6f}",
            "pred": CLASS_NAMES[int(p >= threshold)],
        }
        for r, p in zip(rows, prob.tolist())
    ]
    write_csv(out / "predictions.csv", preds, ["path", "source", "label", "prob_fake", "pred"])
    plot_confusion(metrics, out / "confusion_matrix.png")
    if metrics["roc_auc"] is not None:
        plot_roc(labels.numpy(), prob.numpy(), metrics, out / "roc.png")
    else:
        print("warning: the split holds one class only: no ROC-AUC, AP or roc.png", file=sys.stderr)
    plot_per_source(sources, out / "per_source.png")
    if rows[0].get("crop_side"):
        plot_face_size(rows, prob.numpy(), threshold, out / "face_size.png")
    plot_calibration(metrics, out / "calibration.png")
    if metrics["demographics"]:
        plot_demographics(metrics["demographics"], out / "demographics.png")
    plot_size_sharpness(metrics["size_and_sharpness"], threshold, out / "size_sharpness.png")
    if args.robustness:
        report["robustness"] = robustness(model, stored, labels, threshold, device, args.batch_size)
        cells = [
            [r["condition"], fmt(r["accuracy"]), fmt(r["roc_auc"])] for r in report["robustness"]
        ]
        print("\nrobustness\n\n" + table(["condition", "accuracy", "ROC-AUC"], cells))
        plot_robustness(report["robustness"], out / "robustness.png")
    if args.heatmaps > 0:
        idx = pick_examples(labels, args.heatmaps)
        hm_prob, maps = explain(model, images[idx], device)
        hm_labels = labels[idx].tolist()
        plot_heatmaps(
            images[idx], hm_labels, hm_prob.tolist(), maps, threshold, out / "heatmaps.png"
        )
        report["heatmaps"] = [rows[i]["path"] for i in idx]
    write_json(out / "metrics.json", report)
    if args.json:
        write_json(args.json, report)
    print(f"\nsaved metrics.json, predictions.csv and plots to {out}/")
    return report


def main(argv=None):
    args = parse_args(argv)
    return evaluate_split(args, pick_device(args.device))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C while loading: stop quietly, nothing half-written
        sys.exit("\ninterrupted")
