"""The yardstick of unseen sources: a source-disjoint 2-fold, cheap enough to compare recipes.

    python experiments/two_fold.py --name baseline
    python experiments/two_fold.py --name no-highpass -- --no-highpass
    python experiments/two_fold.py --table            # results/yardstick.md from every candidate

Each class's sources are split into two halves (FOLDS) that each mix face sizes, photo kinds
and generator families. A candidate (train.py's flags after --) is trained on the sources of
one half (their own train/val split), then every image of the other half's sources, all
unseen, is scored at the checkpoint's own threshold; then the halves swap. Every candidate
gets the same budget (--epochs, no early stop). A candidate's figures are the mean of its two
folds: accuracy on the seen half's test split, balanced accuracy on the unseen half (mean of
the real sources' and of the fake sources' accuracies), the worst unseen real source, ROC-AUC
over the unseen images, and the demographic gap among unseen labelled real faces.

Runs go to runs/yardstick/<name>/; results to results/yardstick/<name>.json after each fold
(a cut call resumes: a finished fold is not trained again, a cut one resumes from last.pt).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from lofo import score, write_subset  # noqa: E402

from common import atomic_write, read_manifest  # noqa: E402
from model import count_parameters, load_checkpoint  # noqa: E402

# Each half: a small FFHQ-like real set against a StyleGAN2 set of the same look, web photos,
# large studio / stock portraits, a demographically labelled real set (utkface / allagefaces)
# and one Stable Diffusion version, so that neither half is "small = real, large = fake".
FOLDS = {
    "a": {
        "real": ["ffhq_128", "utkface", "mebeauty", "headshots", "amfd", "celebahq"],
        "fake": ["tpdne_128", "sd15_portraits", "boredhumans"],
    },
    "b": {
        "real": [
            "ffhq",
            "lfw",
            "celeba_crops",
            "allagefaces",
            "dating_photos",
            "unsplash",
            "studio_canada",
        ],  # fmt: skip
        "fake": ["stylegan1_140k", "tpdne_1024", "tpdne_stylegan2", "sd14_portraits"],
    },
}
OTHER = {"a": "b", "b": "a"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--name", help="the candidate's name (runs/yardstick/NAME, results/...)")
    p.add_argument("--data", default="data/faces", help="prepared dataset (default data/faces)")
    p.add_argument("--epochs", type=int, default=8, help="epochs per fold (default 8)")
    p.add_argument("--folds", nargs="+", choices=["a", "b"], default=["a", "b"],
                   help="train on these halves (default both)")  # fmt: skip
    p.add_argument("--runs", default="runs/yardstick", help="default runs/yardstick")
    p.add_argument("--results", default="results/yardstick", help="default results/yardstick")
    p.add_argument("--table", action="store_true", help="only write RESULTS.md from the results")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train.py flags")
    args = p.parse_args(argv)
    args.train_args = [a for a in args.train_args if a != "--"]
    if not args.table and not args.name:
        p.error("--name is needed unless --table")
    return args


def train_fold(subset, run, epochs, train_args):
    """train.py on one half, as a user would run it; resumed from last.pt when cut short."""
    if not (run / "done").exists():
        if (run / "last.pt").exists():
            cmd = [sys.executable, str(ROOT / "train.py"), "--resume", str(run / "last.pt")]
        else:
            cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(subset), "--out", str(run),
                   "--epochs", str(epochs), "--patience", str(epochs), *train_args]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=ROOT)
        (run / "done").touch()
    return load_checkpoint(run / "best.pt")


def accuracy(prob, is_fake, threshold):
    return float(((np.asarray(prob) >= threshold) == is_fake).mean())


def score_fold(model, ckpt, rows, trained_on):
    """The seen half's test split and every image of the unseen half, at the run's threshold."""
    t = ckpt["threshold"]
    unseen_sources = FOLDS[OTHER[trained_on]]
    seen_test = [r for r in rows if r["split"] == "test" and r["source"] in _sources(trained_on)]
    prob_seen = score(model, seen_test)
    labels_seen = np.array([r["label"] == "fake" for r in seen_test])
    per_source, probs, labels = {}, [], []
    for label in ("real", "fake"):
        for source in unseen_sources[label]:
            unseen = [r for r in rows if r["source"] == source]
            if not unseen:
                continue
            prob = score(model, unseen)
            per_source[source] = {"label": label, "n": len(unseen),
                                  "accuracy": accuracy(prob, label == "fake", t)}  # fmt: skip
            probs.append(prob)
            labels.append(np.full(len(prob), label == "fake"))
    class_means = [
        np.mean([s["accuracy"] for s in per_source.values() if s["label"] == label])
        for label in ("real", "fake")
    ]
    return {
        "trained_on": trained_on,
        "threshold": t,
        "best_epoch": ckpt["epoch"],
        "seen_test_accuracy": accuracy(prob_seen, labels_seen, t),
        "unseen_balanced_accuracy": float(np.mean(class_means)),
        "unseen_real_accuracy": float(class_means[0]),
        "unseen_fake_accuracy": float(class_means[1]),
        "worst_unseen_real": min(
            (s["accuracy"], k) for k, s in per_source.items() if s["label"] == "real"
        ),
        "unseen_auc": float(roc_auc_score(np.concatenate(labels), np.concatenate(probs))),
        "unseen_per_source": per_source,
    }


def _sources(fold):
    return FOLDS[fold]["real"] + FOLDS[fold]["fake"]


def run_candidate(args):
    data = Path(args.data).resolve()
    rows = read_manifest(data)
    out = Path(args.results) / f"{args.name}.json"
    result = json.loads(out.read_text()) if out.is_file() else {"folds": {}}
    if (
        result.get("train_args", args.train_args) != args.train_args
        or result.get("epochs", args.epochs) != args.epochs
    ):
        sys.exit(f"error: {out} was measured with other flags; pick another --name")
    result |= {"name": args.name, "train_args": args.train_args, "epochs": args.epochs}
    for fold in args.folds:
        if fold in result["folds"]:
            print(f"fold {fold}: recorded in {out}, reused", flush=True)
            continue
        keep = set(_sources(fold))
        others = sorted({r["source"] for r in rows} - keep)
        subset = write_subset(data, rows, others, name=f"fold-{fold}")
        run = Path(args.runs) / args.name / f"train-on-{fold}"
        start = time.time()
        model, ckpt = train_fold(subset, run, args.epochs, args.train_args)
        result["folds"][fold] = score_fold(model, ckpt, rows, fold) | {
            "train_minutes": _train_minutes(run, start),
            "params": count_parameters(model),
        }
        print(json.dumps(result["folds"][fold]), flush=True)
        text = json.dumps(result, indent=2) + "\n"
        atomic_write(out, lambda tmp, text=text: Path(tmp).write_text(text))


def _train_minutes(run, start):
    """Training time from the run's history (it survives a resume); wall time otherwise."""
    history = run / "history.csv"
    if history.is_file():
        import csv

        with open(history, newline="") as f:
            seconds = [float(r["seconds"]) for r in csv.DictReader(f) if r.get("seconds")]
        if seconds:
            return sum(seconds) / 60
    return (time.time() - start) / 60


def write_table(results_dir):
    """One row per candidate: the mean of its folds."""
    rows = []
    for path in sorted(Path(results_dir).glob("*.json")):
        r = json.loads(path.read_text())
        folds = list(r["folds"].values())
        if not folds:
            continue

        def mean(key, folds=folds):
            return np.mean([f[key] for f in folds])

        worst = min(f["worst_unseen_real"] for f in folds)
        rows.append(
            f"| {r['name']} | `{' '.join(r['train_args']) or '(defaults)'}` | "
            f"{''.join(sorted(r['folds']))} | {folds[0]['params']:,} | "
            f"{mean('train_minutes'):.0f} | {mean('seen_test_accuracy'):.3f} | "
            f"{mean('unseen_balanced_accuracy'):.3f} | {mean('unseen_real_accuracy'):.3f} | "
            f"{mean('unseen_fake_accuracy'):.3f} | {worst[0]:.3f} ({worst[1]}) | "
            f"{mean('unseen_auc'):.3f} |"
        )
    header = (
        "| candidate | train.py flags | folds | params | train min / fold | seen test acc | "
        "unseen balanced acc | unseen real | unseen fake | worst unseen real | unseen AUC |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    text = (
        "# Yardstick: source-disjoint 2-fold (experiments/two_fold.py)\n\n"
        f"Fold a: {FOLDS['a']}\n\nFold b: {FOLDS['b']}\n\n" + header + "\n".join(rows) + "\n"
    )
    atomic_write(Path(results_dir).with_suffix(".md"), lambda tmp: Path(tmp).write_text(text))
    print(text)


def main(argv=None):
    args = parse_args(argv)
    if not args.table:
        run_candidate(args)
    write_table(args.results)


if __name__ == "__main__":
    main()
