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
The two folds can run side by side, one call each with --folds a / --folds b.
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
from demographics import called_real_by_group  # noqa: E402
from evaluate import decisions  # noqa: E402
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
    """The seen half's test split and every image of the unseen half, at the run's threshold
    (and its unsure band: how many unseen faces land in it, how right the confident calls are)."""
    t = ckpt["threshold"]
    seen_test, unseen = fold_rows(rows, trained_on)
    record = fold_record(rows, trained_on, score(model, seen_test), score(model, unseen), t,
                         ckpt.get("unsure_band") or [t, t])  # fmt: skip
    return {"trained_on": trained_on, "threshold": t, "best_epoch": ckpt["epoch"], **record}


def fold_rows(rows, trained_on):
    """(the seen half's test rows, every row of the unseen half)."""
    seen_test = [r for r in rows if r["split"] == "test" and r["source"] in _sources(trained_on)]
    return seen_test, [r for r in rows if r["source"] in _sources(OTHER[trained_on])]


def fold_record(rows, trained_on, prob_seen, prob, t, band):
    """The yardstick's figures for one fold from any scorer's prob_fake on fold_rows' two row
    lists (the CNN here, experiments/spectrum.py's logistic regression there)."""
    seen_test, unseen = fold_rows(rows, trained_on)
    labels_seen = np.array([r["label"] == "fake" for r in seen_test])
    is_fake = np.array([r["label"] == "fake" for r in unseen])
    per_source = {}
    for source in _sources(OTHER[trained_on]):
        mine = np.array([r["source"] == source for r in unseen])
        if mine.any():
            per_source[source] = {"label": "fake" if is_fake[mine][0] else "real",
                                  "n": int(mine.sum()),
                                  "accuracy": accuracy(prob[mine], is_fake[mine][0], t)}  # fmt: skip
    class_means = [
        np.mean([s["accuracy"] for s in per_source.values() if s["label"] == label])
        for label in ("real", "fake")
    ]
    shown = decisions(is_fake.astype(int), prob, t, band)  # real / fake / unsure, as infer.py says
    groups = called_real_by_group(unseen, prob, t, band)
    return {
        "seen_test_accuracy": accuracy(prob_seen, labels_seen, t),
        "unseen_balanced_accuracy": float(np.mean(class_means)),
        "unseen_real_accuracy": float(class_means[0]),
        "unseen_fake_accuracy": float(class_means[1]),
        "worst_unseen_real": min(
            (s["accuracy"], k) for k, s in per_source.items() if s["label"] == "real"
        ),
        "unseen_auc": float(roc_auc_score(is_fake, prob)),
        "unseen_unsure_share": shown["unsure_share"],
        "unseen_confident_accuracy": shown["confident_accuracy"],
        "unseen_demographic_gap": groups["gap"]["gap"] if groups and groups["gap"] else None,
        "unseen_demographics": groups,
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
        run = Path(args.runs) / args.name / f"train-on-{fold}"
        recorded = result["folds"].get(fold)
        if recorded and "unseen_demographics" not in recorded and (run / "done").exists():
            model, ckpt = load_checkpoint(run / "best.pt")  # recorded before these columns
            result["folds"][fold] = recorded | score_fold(model, ckpt, rows, fold)
            result["folds"][fold]["ort_ms_batch1"] = ort_milliseconds(model)
            save(out, result)
            continue
        if recorded:
            print(f"fold {fold}: recorded in {out}, reused", flush=True)
            continue
        keep = set(_sources(fold))
        others = sorted({r["source"] for r in rows} - keep)
        subset = write_subset(data, rows, others, name=f"fold-{fold}")
        start = time.time()
        model, ckpt = train_fold(subset, run, args.epochs, args.train_args)
        result["folds"][fold] = score_fold(model, ckpt, rows, fold) | {
            "train_minutes": _train_minutes(run, start),
            "params": count_parameters(model),
            "ort_ms_batch1": ort_milliseconds(model),
        }
        print(json.dumps({k: v for k, v in result["folds"][fold].items()
                          if not isinstance(v, dict)}), flush=True)  # fmt: skip
        save(out, result)


def ort_milliseconds(model, runs=200):
    """Median ONNX Runtime CPU time of one face (batch 1), the model as export.py writes it."""
    import onnxruntime as ort

    from export import to_onnx

    size = model.config["image_size"]
    session = ort.InferenceSession(
        to_onnx(model.eval(), size).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"input": x})
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times[20:]))


def save(path, result):
    """After every fold: a cut call keeps what it measured. Folds recorded meanwhile by another
    call (`--folds a` and `--folds b` run side by side) are kept, not overwritten."""
    if path.is_file():
        recorded = json.loads(path.read_text())["folds"]
        result["folds"] = recorded | result["folds"]
    text = json.dumps(result, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


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
    """One row per candidate: the mean of its folds (the worst real source: the worst of both)."""
    rows = []
    for path in sorted(Path(results_dir).glob("*.json")):
        r = json.loads(path.read_text())
        folds = list(r["folds"].values())
        if not folds:
            continue

        def mean(key, folds=folds):
            values = [f[key] for f in folds if f.get(key) is not None]
            return f"{np.mean(values):.3f}" if values else "-"

        worst = min(tuple(f["worst_unseen_real"]) for f in folds)
        ms = folds[0].get("ort_ms_batch1")
        rows.append(
            f"| {r['name']} | `{' '.join(r['train_args']) or '(defaults)'}` | "
            f"{''.join(sorted(r['folds']))} | {r['epochs']} | {folds[0]['params']:,} | "
            f"{'-' if ms is None else f'{ms:.2f}'} | {float(mean('train_minutes')):.0f} | "
            f"{mean('seen_test_accuracy')} | {mean('unseen_balanced_accuracy')} | "
            f"{mean('unseen_real_accuracy')} | {mean('unseen_fake_accuracy')} | "
            f"{worst[0]:.3f} ({worst[1]}) | {mean('unseen_auc')} | "
            f"{mean('unseen_demographic_gap')} | {mean('unseen_unsure_share')} | "
            f"{mean('unseen_confident_accuracy')} |"
        )
    header = (
        "| candidate | train.py flags | folds | epochs | params | ORT ms (batch 1) | train min / fold | "
        "seen test acc | unseen balanced acc | unseen real | unseen fake | worst unseen real | "
        "unseen AUC | unseen demographic gap | unseen unsure | unseen confident right |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    text = (
        "# Yardstick: source-disjoint 2-fold (experiments/two_fold.py)\n\n"
        "Each row: trained on one half of the sources, scored on every image of the other half "
        "(unseen), then swapped; the mean of the two folds at the run's own threshold. Unseen "
        "demographic gap: best minus worst group in real faces called real among the unseen "
        "labelled faces (utkface when fold b trained, allagefaces when fold a did). ORT ms: "
        "timed right after training on the shared 2-core CPU, other runs beside it: a rough "
        "figure, for the real one see bench/speed.py.\n\n"
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
