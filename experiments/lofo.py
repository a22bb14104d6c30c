"""Leave one source out: how does the detector do on a generator (or a camera) it never saw?

    python experiments/lofo.py --data data/faces --epochs 20 --out results/lofo.json
    python experiments/lofo.py --label real --epochs 20 --out results/lofo-real.json
    python experiments/lofo.py --sources ffhq sd15_portraits --epochs 6 --out results/lofo-v2.json
    python experiments/lofo.py --label real --epochs 6 --out results/lofo-v3.json -- --no-highpass

Flags after `--` go to every train.py run (the recipe to measure, e.g. the Makefile's RECIPE);
they are recorded beside each result, and a run or result made with other flags is not reused.

For each source X of the class --label (fake by default) in the prepared dataset: write a
dataset that is the same manifest without X (images shared through a symlink, nothing
copied), train on it with the given settings (train.py's defaults otherwise), then score every
image of X (all of them unseen) against the test images of the other class.
Reports accuracy on X at the checkpoint's threshold, ROC-AUC of X vs the other class's test
images, the accuracy on those, and the accuracy on the remaining in-distribution test split;
for a real source whose file names say who is in the photo (demographics.py), its faces
called real per group and the gap between the best and the worst group; and evaluate.py's
size-and-sharpness audit on X beside the other class's test images (does prob_fake follow the
face's native size or its sharpness?). A source recorded before that audit existed gets it
from its run's best.pt when the run is still under --runs.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compare import run_facts  # noqa: E402

from common import atomic_write, load_rows, read_manifest, write_csv  # noqa: E402
from demographics import called_real_by_group  # noqa: E402
from evaluate import sharpness, size_and_sharpness  # noqa: E402
from model import load_checkpoint, predict  # noqa: E402
from train import RECIPE_OPTIONS_OFF, saved_train_args  # noqa: E402
from train import parse_args as train_defaults  # noqa: E402


def score(model, rows, with_sharpness=False):
    """prob_fake of each row's model view; with_sharpness: also its sharpness (evaluate.py's)."""
    images = load_rows(rows)
    prob = predict(model, images, torch.device("cpu"))[0].numpy()
    return (prob, sharpness(images)) if with_sharpness else prob


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default="data/faces", help="prepared dataset (default data/faces)")
    p.add_argument("--runs", default="runs/lofo", help="where the runs go (default runs/lofo)")
    p.add_argument("--epochs", type=int, default=6, help="epochs per run (default 6)")
    p.add_argument("--attention", choices=["on", "off"], default="off", help="default off")
    p.add_argument(
        "--attention-stage",
        type=int,
        choices=[1, 2],
        default=None,
        help="with --attention on: after which stage the layer sits (default: train.py's)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=None,
        help="early-stopping patience (default train.py's); = --epochs for no early stop",
    )
    p.add_argument(
        "--label",
        choices=["fake", "real"],
        default="fake",
        help="hold out the sources of this class, one at a time (default fake)",
    )
    p.add_argument(
        "--sources",
        nargs="+",
        default=None,
        help="hold out these sources (either class), in this order, instead of every source of "
        "--label; a source already in --out (same --epochs and --patience) or a run already in "
        "--runs is reused, so a cut-short call resumes",
    )
    p.add_argument("--out", default="results/lofo.json", help="default results/lofo.json")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train.py flags")
    args = p.parse_args(argv)
    args.train_args = [a for a in args.train_args if a != "--"]
    # lofo.py sets these itself (and checks epochs, patience and attention): after --, train.py
    # would take the last of two and the run would not be what the results say.
    own = (
        "--data",
        "--out",
        "--resume",
        "--epochs",
        "--patience",
        "--attention",
        "--attention-stage",
    )
    clash = [a for a in args.train_args if a.split("=")[0] in own]
    if clash:
        p.error(f"{clash[0].split('=')[0]} after --: give it to lofo.py itself, before --")
    return args


def wanted_recipe(args):
    """How every run must have been trained: as asked (with the flags after --), and otherwise
    with today's default recipe (the defaults move when a better recipe is found, and an older
    run must not slip in)."""
    defaults, plain = vars(train_defaults(args.train_args)), vars(train_defaults([]))
    keys = ("degrade_p", "jpeg_p", "min_crop", "rescale_p", "width", "loss")
    keys += tuple(RECIPE_OPTIONS_OFF)
    wanted = {k: defaults[k] for k in keys}
    wanted |= {k: v for k, v in defaults.items() if v != plain[k]}  # every flag after --
    patience = defaults["patience"] if args.patience is None else args.patience
    wanted |= {"epochs": args.epochs, "attention": args.attention, "patience": patience}
    if args.attention == "on":  # off runs carry no placement to check
        wanted["attention_stage"] = args.attention_stage or defaults["attention_stage"]
    return wanted


def write_subset(data, rows, held_out, name=None):
    """The dataset without the held-out source(s): its own manifest, the images shared through
    a symlink. held_out: one source or a list of them; name: the folder's suffix."""
    held_out = {held_out} if isinstance(held_out, str) else set(held_out)
    subset = data.parent / f"{data.name}-{name or 'without-' + '-'.join(sorted(held_out))}"
    subset.mkdir(exist_ok=True)
    if not (subset / "images").exists():
        os.symlink(data / "images", subset / "images")
    fields = [k for k in rows[0] if k != "file"]  # the manifest's own columns
    kept = [{k: r[k] for k in fields} for r in rows if r["source"] not in held_out]
    write_csv(subset / "manifest.csv", kept, fields)
    if (data / "summary.json").is_file():  # how the faces were framed: train.py reads it
        shutil.copyfile(data / "summary.json", subset / "summary.json")
    return subset


def train_without(subset, run, recipe, train_args=()):
    """train.py on the subset, as a user would run it. A run counts as finished only once
    train.py returned (run/done); one cut short (a session's end, Ctrl-C) continues from its
    last.pt where it stopped. Returns the best checkpoint, refused if trained otherwise."""
    if not (run / "done").exists():
        if (run / "last.pt").exists():
            cmd = [sys.executable, str(ROOT / "train.py"), "--resume", str(run / "last.pt")]
        else:
            cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(subset), "--out", str(run),
                   "--epochs", str(recipe["epochs"]), "--attention", recipe["attention"],
                   "--patience", str(recipe["patience"])]  # fmt: skip
            if "attention_stage" in recipe:
                cmd += ["--attention-stage", str(recipe["attention_stage"])]
            cmd += train_args
        subprocess.run(cmd, check=True, cwd=ROOT)
        (run / "done").touch()
    return finished_run(run, recipe)


def finished_run(run, recipe):
    """The run's best checkpoint, refused if it was trained otherwise than recipe."""
    model, ckpt = load_checkpoint(run / "best.pt")
    trained = {k: saved_train_args(ckpt).get(k) for k in recipe}
    if trained != recipe:
        sys.exit(f"error: {run} was trained with {trained}; remove it or pass another --runs")
    return model, ckpt


def score_held_out(model, ckpt, rows, held_out, is_fake):
    """Every image of the held-out source (all unseen) against the other class's test images."""
    unseen = [r for r in rows if r["source"] == held_out]
    prob_unseen, sharp_unseen = score(model, unseen, with_sharpness=True)
    # The other class's test images are part of the seen test split: decode and score once.
    seen_test = [r for r in rows if r["split"] == "test" and r["source"] != held_out]
    prob_seen, sharp_seen = score(model, seen_test, with_sharpness=True)
    labels_seen = np.array([r["label"] == "fake" for r in seen_test])
    other = labels_seen != is_fake
    prob_other = prob_seen[other]
    t = ckpt["threshold"]
    # The unseen source beside the other class's test faces (1 = fake): its ROC-AUC, and the
    # shortcut audit there (does a large or sharp face read as fake when its source is new?).
    pool = unseen + [r for r, o in zip(seen_test, other) if o]
    pool_labels = np.r_[np.full(len(unseen), int(is_fake)), np.full(other.sum(), int(not is_fake))]
    pool_prob = np.r_[prob_unseen, prob_other]
    auc = roc_auc_score(pool_labels, pool_prob)
    audit = size_and_sharpness(pool, np.r_[sharp_unseen, sharp_seen[other]], pool_labels,
                               pool_prob, t)  # fmt: skip
    return {
        "held_out": held_out,
        "label": "fake" if is_fake else "real",
        "n_unseen": len(unseen),
        "unseen_accuracy": float(((prob_unseen >= t) == is_fake).mean()),
        "unseen_accuracy_at_0.5": float(((prob_unseen >= 0.5) == is_fake).mean()),
        "unseen_vs_other_class_test_auc": float(auc),
        "other_class_test_accuracy": float(((prob_other >= t) != is_fake).mean()),
        "seen_test_accuracy": float(((prob_seen >= t) == labels_seen).mean()),
        "threshold": t,
        "best_epoch": ckpt["epoch"],
        # Who of the unseen source gets called fake (None for a source without labels).
        "demographics": called_real_by_group(unseen, prob_unseen, t, ckpt.get("unsure_band")),
        "size_and_sharpness": audit,
    }


def recorded_results(path):
    """The results --out already holds: runs/ is not committed and a session may start on a
    fresh machine, so a source measured at the same schedule is never trained again, and one
    not asked for this time is kept."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text())["runs"]
    except (ValueError, KeyError, TypeError) as exc:
        sys.exit(f"error: {path}: not experiments/lofo.py results ({exc}); move it aside")


def save_results(path, results):
    text = json.dumps({"runs": results}, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def demographic_gap(result):
    """The held-out source's gap between its best and worst group, as a table cell."""
    gap = (result.get("demographics") or {}).get("gap")
    return (
        "-"
        if gap is None
        else f"{100 * gap['gap']:.1f} ({gap['worst']} {gap['worst_called_real']:.2f})"
    )


def print_table(results):
    print("| held-out source | class | n | accuracy on it | AUC vs other class test "
          "| other class test acc | seen test acc | threshold | demographic gap, points (worst) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['held_out']} | {r['label']} | {r['n_unseen']} | {r['unseen_accuracy']:.3f} | "
            f"{r['unseen_vs_other_class_test_auc']:.3f} | {r['other_class_test_accuracy']:.3f} "
            f"| {r['seen_test_accuracy']:.3f} | {r['threshold']:.3f} | {demographic_gap(r)} |"
        )


def hold_out(data, rows, held_out, label_of, recipe, args):
    """Train without one source, then score it: one row of the results."""
    subset = write_subset(data, rows, held_out)
    run = Path(args.runs) / f"without-{held_out}"
    model, ckpt = train_without(subset, run, recipe, args.train_args)
    result = score_held_out(model, ckpt, rows, held_out, label_of[held_out] == "fake")
    facts = run_facts(model, ckpt, run)  # training time: every epoch, and to the kept one
    times = {k: facts[k] for k in ("train_seconds", "seconds_to_best")}
    return result | {"epochs": args.epochs, "patience": recipe["patience"],
                     "train_args": args.train_args, **times}  # fmt: skip


def add_audit(result, run, rows, recipe):
    """A result recorded before the size-and-sharpness audit existed gets it from its run's
    best.pt, where that run is still on this machine; the accuracy must come out as recorded."""
    model, ckpt = finished_run(run, recipe)
    again = score_held_out(model, ckpt, rows, result["held_out"], result["label"] == "fake")
    if not np.isclose(again["unseen_accuracy"], result["unseen_accuracy"]):
        sys.exit(f"error: {run}/best.pt gives {again['unseen_accuracy']:.4f} on "
                 f"{result['held_out']}, recorded {result['unseen_accuracy']:.4f}")  # fmt: skip
    print(f"{result['held_out']}: size and sharpness audit added from {run}/best.pt", flush=True)
    return result | {"size_and_sharpness": again["size_and_sharpness"]}


def main(argv=None):
    args = parse_args(argv)
    data = Path(args.data).resolve()
    rows = read_manifest(data)
    label_of = {r["source"]: r["label"] for r in rows}
    held_out_sources = args.sources or sorted(s for s in label_of if label_of[s] == args.label)
    unknown = [s for s in held_out_sources if s not in label_of]
    if unknown:
        sys.exit(
            f"error: no source {unknown[0]!r} in {data} (sources: {', '.join(sorted(label_of))})"
        )
    recipe = wanted_recipe(args)
    before = recorded_results(args.out)
    recorded = {r["held_out"]: r for r in before
                if (r.get("epochs"), r.get("patience"), r.get("train_args", []))
                == (args.epochs, recipe["patience"], args.train_args)}  # fmt: skip
    kept = [r for r in before if r["held_out"] not in held_out_sources]
    results = []
    for held_out in held_out_sources:
        if held_out in recorded:  # measured in an earlier session, maybe on another machine
            print(f"{held_out}: recorded in {args.out}, reused", flush=True)
            result, run = recorded[held_out], Path(args.runs) / f"without-{held_out}"
            if "size_and_sharpness" not in result and (run / "done").exists():
                result = add_audit(result, run, rows, recipe)
            results.append(result)
        else:
            results.append(hold_out(data, rows, held_out, label_of, recipe, args))
            print(json.dumps(results[-1]), flush=True)
        save_results(args.out, results + kept)  # after every run: a cut call keeps what it measured
    print_table(results)


if __name__ == "__main__":
    main()
