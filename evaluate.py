"""Evaluate a trained FaceCheckNet on one split of a prepared dataset, or compare runs.

    python evaluate.py --split test                     # best run under runs/, on its own data
    python evaluate.py --checkpoint runs/exp-a --robustness --heatmaps 8
    python evaluate.py --compare runs/                  # ablation table of every run in runs/
    python evaluate.py --compare results/attention-v2/runs.json   # the same from recorded runs

A single evaluation writes metrics.json, predictions.csv, confusion_matrix.png, roc.png,
per_source.png and calibration.png (plus robustness.png / heatmaps.png when asked) to
RUN/eval-<split>/.
"fake" is the positive class. Predictions use the decision threshold stored in the
checkpoint (chosen on validation, never on the split evaluated); accuracy at 0.5 is shown
for reference. The per-source table is the shortcut audit: a model that keys on a source's
framing or codec instead of generator traces shows up as one source far below the others.

--compare evaluates every run on validation and test and writes compare.json and
compare.md: per-run records, mean +- std per arm (attention on / off; overall and each
source's accuracy), McNemar's exact test on the paired validation and test predictions of runs
with the same seed, and the verdict by the README's rule (validation decides; --lofo ON.json
OFF.json adds its leave-one-out part).
"""

import argparse
import csv
import gzip
import hashlib
import json
import math
import sys
from itertools import zip_longest
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

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
from model import CheckpointError, count_flops, count_parameters, load_checkpoint, predict


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
        help="output folder (default RUN/eval-<split>/; with --compare runs/compare/)",
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
        "--heatmaps",
        type=int,
        default=0,
        metavar="N",
        help="grid of N images with attention and Grad-CAM overlays (default 0 = none)",
    )
    p.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="RUN",
        help="compare runs: run folders, .pt files, folders holding run folders, or "
        "experiments/run_record.py's JSON of recorded runs (uses val and test; --split is ignored)",
    )
    p.add_argument(
        "--lofo",
        nargs=2,
        default=None,
        metavar=("ON_JSON", "OFF_JSON"),
        help="with --compare: experiments/lofo.py's results of the attention-on and -off arms, "
        "for the leave-one-out part of the verdict rule",
    )
    return p.parse_args(argv)


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


def per_source_table(rows, prob, threshold):
    """n, accuracy and mean prob_fake of every source in rows (one label per source), and for
    face data the median face size (model view side in source pixels) and the Spearman
    correlation of prob_fake with it inside the source."""
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
        if rows[0].get("crop_side"):  # the face's native size, and whether the score follows it
            sides = np.array([VIEW * float(r["crop_side"]) for r in rows])[m]
            row["median_face_px"] = float(np.median(sides))
            varies = m.sum() > 2 and np.ptp(sides) > 0 and np.ptp(prob[m]) > 0
            rho = spearmanr(sides, prob[m]).statistic if varies else None
            row["spearman_prob_vs_face_px"] = None if rho is None else float(rho)
        table.append(row)
    return table


def crop_size_check(rows, prob, labels):
    """Does the face's native size (its crop side in source pixels) tell the classes apart, and
    does the model follow it? ROC-AUC of the side alone as a fake score (0.5: no signal), and
    the Spearman correlation of prob_fake with the side within each class (near 0: the model
    does not score big faces as more fake)."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    if not rows or not rows[0].get("crop_side"):
        return None
    sides = np.array([float(r["crop_side"]) * VIEW for r in rows])
    labels, prob = np.asarray(labels), np.asarray(prob, dtype=float)
    out = {
        "side_alone_roc_auc": float(roc_auc_score(labels, sides)) if len(set(labels)) > 1 else None
    }
    for k, name in enumerate(CLASS_NAMES):
        m = labels == k
        varies = m.sum() > 2 and np.ptp(sides[m]) > 0 and np.ptp(prob[m]) > 0
        rho = spearmanr(sides[m], prob[m]).statistic if varies else float("nan")
        out[f"{name}_spearman_prob_vs_side"] = None if np.isnan(rho) else float(rho)
    return out


def mcnemar_exact(b, c):
    """Exact two-sided McNemar p-value: under H0 the b + c discordant pairs split 50/50."""
    from scipy.stats import binomtest

    return 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)


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


def expand_runs(paths):
    """Run folders, .pt files, folders of run folders and recorded runs' .json files -> a list
    of .pt and .json paths."""
    found = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif (p / "best.pt").is_file():
            found.append(p / "best.pt")
        elif p.is_dir() and list(p.glob("*/best.pt")):
            found += sorted(p.glob("*/best.pt"))
        else:
            sys.exit(f"error: {p}: no best.pt there or in its sub-folders")
    return found


def run_facts(model, ckpt, run_dir):
    """What a run is and what it cost, from its checkpoint and history.csv: the rows of the
    --compare table, and experiments/run_record.py's records."""
    history = Path(run_dir) / "history.csv"
    epochs = list(csv.DictReader(history.read_text().splitlines())) if history.is_file() else None
    attention = bool(ckpt["config"]["attention"])
    return {
        "run": str(run_dir),
        "attention": "on" if attention else "off",
        "attention_stage": ckpt["config"].get("attention_stage", 2) if attention else None,
        "seed": ckpt.get("train_args", {}).get("seed"),
        "params": ckpt.get("params") or count_parameters(model),
        "flops": ckpt.get("flops") or count_flops(model),
        "epochs": len(epochs) if epochs else None,
        "best_epoch": ckpt["epoch"],
        # The cost of the whole schedule (every epoch ran, whichever one was kept): best.pt
        # holds only the time up to its own epoch, kept as seconds_to_best.
        "train_seconds": sum(float(e["seconds"]) for e in epochs) if epochs else None,
        "seconds_to_best": ckpt.get("train_seconds"),
        "threshold": ckpt["threshold"],
    }


def run_outputs(path, data=None, device=None, batch_size=256, cache=None):
    """A run's logits on val and test -> (facts, outputs): what --compare scores, and what
    experiments/run_record.py keeps in results/ so a comparison survives a machine without
    runs/. outputs: {split: {"files", "labels", "logits"}}, files relative to the dataset."""
    device = device or torch.device("cpu")
    cache = {} if cache is None else cache
    model, ckpt, path = open_checkpoint(path)
    data_dir = resolve_data(ckpt, data)
    check_manifest(ckpt, data_dir)
    facts = {**run_facts(model, ckpt, path.parent), "data": str(data_dir)}
    facts |= {"manifest_sha256": manifest_hash(data_dir), "image_size": ckpt["image_size"]}
    outputs = {}
    for split in ("val", "test"):
        key = (facts["manifest_sha256"], split, ckpt["image_size"])
        if key not in cache:
            cache[key] = load_split(data_dir, split, model_size=ckpt["image_size"])
        images, labels, rows = cache[key]
        _, logits = predict(model.to(device), images, device, batch_size)
        files = [r["path"] for r in rows]
        outputs[split] = {"files": files, "labels": labels, "logits": logits}
    return facts, outputs


def save_outputs(path, outputs):
    """run_outputs' logits as a gzipped CSV (split, file, label, logit_real, logit_fake);
    9 significant digits give back the float32 logits exactly."""

    def write(tmp):
        with gzip.open(tmp, "wt", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["split", "file", "label", "logit_real", "logit_fake"])
            for split, o in outputs.items():
                for name, label, (real, fake) in zip(
                    o["files"], o["labels"].tolist(), o["logits"].tolist(), strict=True
                ):
                    w.writerow([split, name, CLASS_NAMES[label], f"{real:.9g}", f"{fake:.9g}"])

    atomic_write(path, write)


def load_outputs(path):
    """save_outputs' file -> outputs as run_outputs returns them."""
    outputs = {}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                o = outputs.setdefault(row["split"], {"files": [], "labels": [], "logits": []})
                o["files"].append(row["file"])
                o["labels"].append(CLASS_NAMES.index(row["label"]))
                o["logits"].append([float(row["logit_real"]), float(row["logit_fake"])])
    except (OSError, EOFError, KeyError, ValueError) as exc:
        sys.exit(f"error: {path}: not a predictions file of experiments/run_record.py ({exc})")
    for o in outputs.values():
        o["labels"] = torch.tensor(o["labels"])
        o["logits"] = torch.tensor(o["logits"], dtype=torch.float32)
    return outputs


def recorded_runs(path):
    """experiments/run_record.py's JSON of runs -> [(facts, outputs)]: each record with its
    predictions file, which lies beside the JSON."""
    try:
        records = json.loads(Path(path).read_text())
        missing = [name for name, r in records.items() if "predictions" not in r]
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        sys.exit(f"error: {path}: not a JSON of experiments/run_record.py records ({exc})")
    if missing:
        sys.exit(f"error: {path}: {', '.join(missing)} recorded without predictions; "
                 "record them again from their run folders (experiments/run_record.py)")  # fmt: skip
    return [(r, load_outputs(Path(path).parent / r["predictions"])) for r in records.values()]


def score_run(facts, outputs):
    """One run's figures on each split and, for McNemar, which images it got right."""
    record, right = dict(facts), {}
    for split, o in outputs.items():
        labels, logits = o["labels"], o["logits"]
        prob = logits.softmax(1)[:, 1]
        m = compute_metrics(labels, prob, facts["threshold"])
        record[f"{split}_loss"] = F.cross_entropy(logits, labels).item()
        record[f"{split}_accuracy"] = m["accuracy"]
        record[f"{split}_f1"] = m["macro"]["f1"]
        record[f"{split}_auc"] = m["roc_auc"]
        # The shortcut audit of evaluate_split, per run: prepare_data.py stores each crop as
        # images/<source>/<sha>.png, so a recorded run (names and logits) still has its sources.
        rows = [{"source": Path(f).parent.name, "label": CLASS_NAMES[y]}
                for f, y in zip(o["files"], labels.tolist(), strict=True)]  # fmt: skip
        sources = per_source_table(rows, prob, facts["threshold"])
        record[f"{split}_per_source"] = {s.pop("source"): s for s in sources}
        # The images' identity: the same faces (the stored crops are named by their original's
        # hash) in the same order, at the same input size, pair two runs. Not the manifest's
        # hash: a dataset prepared again on another machine has the same faces and splits but
        # another one (MTCNN's last digits), and each session may start on a fresh machine.
        faces = hashlib.sha256("\n".join(o["files"]).encode()).hexdigest()
        key = (faces, split, facts["image_size"])
        right[split] = (key, ((prob >= facts["threshold"]).long() == labels).numpy())
    return record, right


def mean_std(values):
    """{"mean", "std"}: the sample std (ddof 1); none from a single run."""
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None}


def compare_runs(paths, data=None, device=None, batch_size=256, lofo=None):
    """Evaluate runs on val and test -> {"runs", "arms", "mcnemar": {"val", "test"}, "verdict"};
    paths: run folders, .pt files, folders of run folders, or run_record.py's JSON files;
    lofo: {"on": [...], "off": [...]}, experiments/lofo.py's runs of each arm, for the rule."""
    cache, scored = {}, []
    for path in tqdm(expand_runs(paths), desc="runs", leave=False):
        if path.suffix == ".json":
            scored += [score_run(f, o) for f, o in recorded_runs(path)]
        else:
            scored.append(score_run(*run_outputs(path, data, device, batch_size, cache)))
    records, correct = [r for r, _ in scored], [c for _, c in scored]

    arms = {}
    for arm in ("off", "on"):
        rs = [r for r in records if r["attention"] == arm]
        if not rs:
            continue
        arms[arm] = {"n_runs": len(rs), "seeds": [r["seed"] for r in rs]}
        arms[arm].update(params=rs[0]["params"], flops=rs[0]["flops"])
        for k in ("val_loss", "val_accuracy", "val_f1", "test_accuracy", "test_f1", "test_auc"):
            v = np.array([r[k] for r in rs if r[k] is not None], dtype=float)
            if len(v):
                arms[arm][k] = mean_std(v)
        # The shortcut audit across seeds: each source's accuracy, mean +- std over the runs
        # (the sources every run of the arm was scored on).
        for split in ("val", "test"):
            per_run = [r[f"{split}_per_source"] for r in rs]
            arms[arm][f"{split}_per_source"] = {
                name: {"label": s["label"], "n": s["n"],
                       **mean_std([p[name]["accuracy"] for p in per_run])}
                for name, s in per_run[0].items() if all(name in p for p in per_run)
            }  # fmt: skip

    # Pair each "on" run with an unused "off" run of the same seed and the same images.
    matched, free = [], [j for j, r in enumerate(records) if r["attention"] == "off"]
    for i, on in enumerate(records):
        same = [j for j in free if records[j]["seed"] == on["seed"] and
                all(correct[j][s][0] == correct[i][s][0] for s in ("val", "test"))]  # fmt: skip
        if on["attention"] == "on" and same:
            free.remove(same[0])
            matched.append((i, same[0]))
    mcnemar = {
        "test": "exact two-sided McNemar: scipy.stats.binomtest(b, b + c, 0.5); b = images only "
        "the attention-on run gets right, c = only the attention-off run; the rule reads val",
    }
    for split in ("val", "test"):
        pairs = []
        for i, j in matched:
            a, o = correct[i][split][1], correct[j][split][1]
            b, c = int((a & ~o).sum()), int((~a & o).sum())
            pairs.append({"seed": records[i]["seed"], "on": records[i]["run"],
                          "off": records[j]["run"], "n": len(a), "b": b, "c": c,
                          "p_value": mcnemar_exact(b, c)})  # fmt: skip
        b, c = sum(p["b"] for p in pairs), sum(p["c"] for p in pairs)
        # The pooled count reuses the same images for every seed: not independent trials,
        # so its p-value is indicative only.
        pooled = {"b": b, "c": c, "p_value": mcnemar_exact(b, c)} if pairs else None
        mcnemar[split] = {"pairs": pairs, "pooled": pooled}
    result = {"runs": records, "arms": arms, "mcnemar": mcnemar}
    if lofo:
        result["lofo"] = lofo_comparison(lofo["on"], lofo["off"])
    return {**result, "verdict": verdict(result)}


def lofo_comparison(on_runs, off_runs):
    """Leave-one-source-out accuracy of both arms on the sources both held out."""
    on = {r["held_out"]: r for r in on_runs}
    off = {r["held_out"]: r for r in off_runs}
    common = sorted(set(on) & set(off))
    if not common:
        return None
    real = [s for s in common if off[s]["label"] == "real"]
    acc = lambda runs, names: [runs[s]["unseen_accuracy"] for s in names]  # noqa: E731
    return {
        "sources": {
            s: {
                "on": on[s]["unseen_accuracy"],
                "off": off[s]["unseen_accuracy"],
                "label": off[s]["label"],
            }
            for s in common
        },  # fmt: skip
        "mean_on": float(np.mean(acc(on, common))),
        "mean_off": float(np.mean(acc(off, common))),
        "worst_real_on": min(acc(on, real)) if real else None,
        "worst_real_off": min(acc(off, real)) if real else None,
    }


def verdict(result):
    """The attention question's answer by the rule written in the README before the data-v2
    runs. Attention ships only if (A) its mean validation accuracy is >= 1.0 point above the
    plain model's, it is ahead in at least two thirds of the seed pairs, and the pooled exact
    McNemar test on validation gives p < 0.05 in its favour; or (B) the validation gap is within
    +-0.5 points and its mean leave-one-source-out accuracy is >= 5 points higher; and in both
    cases (C) leave-one-out does not get worse: mean held-out accuracy and worst held-out real
    source each within 2 points of the plain model's or better. Anything less: attention off."""
    arms, mc, lofo = result["arms"], result["mcnemar"]["val"], result.get("lofo")
    if "on" not in arms or "off" not in arms or not mc["pooled"]:
        return "undecided: needs runs of both arms with matching seeds"
    gap = arms["on"]["val_accuracy"]["mean"] - arms["off"]["val_accuracy"]["mean"]
    ahead = sum(p["b"] > p["c"] for p in mc["pairs"])
    pooled = mc["pooled"]
    facts = (
        f"mean val accuracy on {arms['on']['val_accuracy']['mean']:.4f} vs off "
        f"{arms['off']['val_accuracy']['mean']:.4f} (gap {100 * gap:+.2f} points, on ahead in "
        f"{ahead} of {len(mc['pairs'])} seed pairs); pooled val McNemar b={pooled['b']} "
        f"c={pooled['c']} p={pooled['p_value']:.3g}"
    )
    route_a = (
        gap >= 0.01
        and ahead >= 2 * len(mc["pairs"]) / 3
        and pooled["p_value"] < 0.05
        and pooled["b"] > pooled["c"]
    )
    if lofo is None:
        if route_a:
            return f"undecided: attention leads on validation ({facts}); needs leave-one-out (C)"
        return (
            f"no measurable gain from attention on validation: {facts}; the simpler model "
            "(attention off) ships unless leave-one-out shows route B"
        )
    lofo_gain = lofo["mean_on"] - lofo["mean_off"]
    worst_ok = lofo["worst_real_on"] is None or (
        lofo["worst_real_on"] >= lofo["worst_real_off"] - 0.02
    )
    no_worse = lofo_gain >= -0.02 and worst_ok
    route_b = abs(gap) <= 0.005 and lofo_gain >= 0.05
    facts += (
        f"; leave-one-out mean on {lofo['mean_on']:.3f} vs off {lofo['mean_off']:.3f} over "
        f"{len(lofo['sources'])} sources"
    )
    if lofo["worst_real_on"] is not None:
        facts += f", worst real on {lofo['worst_real_on']:.3f} vs off {lofo['worst_real_off']:.3f}"
    if (route_a or route_b) and no_worse:
        return f"attention helps: {facts}; the attention model ships"
    return f"no gain that pays for the layer: {facts}; the simpler model (attention off) ships"


def _f(x, digits=4):
    return "n/a" if x is None else f"{x:.{digits}f}"


def table(header, rows):
    """A markdown table: readable in a terminal, pastes into the README as is."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def compare_markdown(result):
    header = ["run", "attention", "seed", "params", "MFLOPs", "epochs (best)", "train min"]
    header += ["val loss", "val acc", "test acc", "test F1", "test AUC"]
    rows = []
    for r in result["runs"]:
        minutes = "n/a" if r["train_seconds"] is None else f"{r['train_seconds'] / 60:.0f}"
        arm = "off" if r["attention"] == "off" else f"on (stage {r['attention_stage']})"
        cells = [Path(r["run"]).name, arm, r["seed"], f"{r['params']:,}"]
        cells += [f"{r['flops'] / 1e6:.0f}", f"{r['epochs']} ({r['best_epoch']})", minutes]
        keys = ("val_loss", "val_accuracy", "test_accuracy", "test_f1", "test_auc")
        rows.append(cells + [_f(r[k]) for k in keys])
    text = table(header, rows)
    if any(a["n_runs"] > 1 for a in result["arms"].values()):
        keys = ("val_loss", "val_accuracy", "test_accuracy", "test_f1", "test_auc")
        rows = [
            [arm, a["n_runs"]]
            + [f"{_f(a[k]['mean'])} ± {_f(a[k]['std'])}" if k in a else "n/a" for k in keys]
            for arm, a in result["arms"].items()
        ]
        text += "\n\nmean ± std per arm\n\n" + table(["attention", "runs", *keys], rows)
    for split in ("val", "test"):
        mc = result["mcnemar"][split]
        if not mc["pairs"]:
            continue
        rows = [[p["seed"], p["n"], p["b"], p["c"], f"{p['p_value']:.4g}"] for p in mc["pairs"]]
        rows.append(
            ["pooled", "", mc["pooled"]["b"], mc["pooled"]["c"], f"{mc['pooled']['p_value']:.4g}"]
        )
        text += f"\n\nMcNemar exact test, {split} split (b: only attention on right, c: only off)"
        text += "\n\n" + table(["seed", "n", "b", "c", "p"], rows)
    if {"on", "off"} <= set(result["arms"]):
        for split in ("val", "test"):
            on, off = (result["arms"][a][f"{split}_per_source"] for a in ("on", "off"))
            rows = [[name, s["label"], s["n"], _f(off[name]["mean"], 3), _f(s["mean"], 3),
                     f"{100 * (s['mean'] - off[name]['mean']):+.1f}"]
                    for name, s in on.items() if name in off]  # fmt: skip
            text += f"\n\nAccuracy per source, {split} split, mean over each arm's runs\n\n"
            text += table(["source", "class", "n", "off", "on", "on - off (points)"], rows)
    if lofo := result.get("lofo"):
        rows = [[s, v["label"], _f(v["off"], 3), _f(v["on"], 3), f"{100 * (v['on'] - v['off']):+.1f}"]
                for s, v in lofo["sources"].items()]  # fmt: skip
        rows.append(["mean", "", _f(lofo["mean_off"], 3), _f(lofo["mean_on"], 3),
                     f"{100 * (lofo['mean_on'] - lofo['mean_off']):+.1f}"])  # fmt: skip
        text += "\n\nLeave one source out, accuracy on the held-out source\n\n"
        text += table(["held-out source", "class", "off", "on", "on - off (points)"], rows)
    return text


def write_json(path, obj):
    text = json.dumps(obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))


# ---------------------------------------------------------------- main
def print_report(m, sources):
    print(
        f"threshold {m['threshold']:.4f} (stored in the checkpoint; train.py picks it on validation); "
        f"fake is the positive class\naccuracy {m['accuracy']:.4f} (at 0.5: {m['accuracy_at_0.5']:.4f}), "
        f"balanced accuracy {m['balanced_accuracy']:.4f}, ROC-AUC {_f(m['roc_auc'])}, "
        f"average precision {_f(m['average_precision'])}\nTPR at 1% FPR {_f(m['tpr_at_fpr_1pct'])}, "
        f"at 5% FPR {_f(m['tpr_at_fpr_5pct'])}\nBrier score {m['brier']:.4f}, expected "
        f"calibration error {m['calibration']['expected_calibration_error']:.4f} (calibration.png)\n"
    )
    classes = [*m["per_class"].items(), ("macro", {**m["macro"], "support": m["n"]})]
    rows = [
        [n, *(_f(c[k]) for k in ("precision", "recall", "f1")), c["support"]] for n, c in classes
    ]
    print(table(["class", "precision", "recall", "F1", "support"], rows) + "\n")
    cm = m["confusion_matrix"]["matrix"]
    rows = [[f"true {n}", *row] for n, row in zip(CLASS_NAMES, cm)]
    print(table(["", *(f"predicted {n}" for n in CLASS_NAMES)], rows) + "\n")
    rows = [
        [s["source"], s["label"], s["n"], _f(s["accuracy"]), _f(s["mean_prob_fake"]),
         _f(s.get("median_face_px"), 0), _f(s.get("spearman_prob_vs_face_px"), 2)]
        for s in sources
    ]  # fmt: skip
    header = ["source", "label", "n", "accuracy", "mean prob_fake", "face px", "Spearman vs px"]
    print("per source (shortcut audit)\n\n" + table(header, rows))
    if c := m.get("crop_size_shortcut"):
        print(
            f"\nface size shortcut: the crop side alone separates the classes with ROC-AUC "
            f"{_f(c['side_alone_roc_auc'])}; Spearman of prob_fake with the side: real "
            f"{_f(c['real_spearman_prob_vs_side'])}, fake {_f(c['fake_spearman_prob_vs_side'])}"
        )


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
    metrics = compute_metrics(labels, prob, threshold)
    sources = per_source_table(rows, prob, threshold)
    metrics["crop_size_shortcut"] = crop_size_check(rows, prob, labels)
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
    if args.robustness:
        report["robustness"] = robustness(model, stored, labels, threshold, device, args.batch_size)
        cells = [
            [r["condition"], _f(r["accuracy"]), _f(r["roc_auc"])] for r in report["robustness"]
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
    device = pick_device(args.device)
    if not args.compare:
        if args.lofo:
            sys.exit(
                "error: --lofo goes with --compare (the two arms' leave-one-out, side by side)"
            )
        return evaluate_split(args, device)
    lofo = None
    if args.lofo:
        try:
            on, off = (json.loads(Path(f).read_text())["runs"] for f in args.lofo)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            sys.exit(
                f"error: --lofo {' '.join(args.lofo)}: not experiments/lofo.py results ({exc})"
            )
        lofo = {"on": on, "off": off}
    result = compare_runs(args.compare, args.data, device, args.batch_size, lofo)
    out = Path(args.out or "runs/compare")
    text = compare_markdown(result)
    print(text)
    write_json(out / "compare.json", result)
    atomic_write(out / "compare.md", lambda tmp: Path(tmp).write_text(text + "\n"))
    if args.json:
        write_json(args.json, result)
    print(f"\nverdict: {result['verdict']}")
    print(f"saved {out / 'compare.json'} and {out / 'compare.md'}")
    return result


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C while loading: stop quietly, nothing half-written
        sys.exit("\ninterrupted")
