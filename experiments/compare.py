"""Compare training runs: each run's figures on validation and test, mean +- std per arm
(attention on / off; overall and each source's accuracy), McNemar's exact test on the paired
validation and test predictions of runs with the same seed, and the verdict by the README's
rule (validation decides; --lofo ON.json OFF.json adds its leave-one-out part).

    python experiments/compare.py runs/                  # every run in runs/
    python experiments/compare.py results/attention-v2/runs.json \\
        --lofo results/lofo-v2-on.json results/lofo-v2.json --out results/attention-v2

A run is a run folder, a .pt file, a folder of run folders, or experiments/run_record.py's
JSON of recorded runs (their logits, kept in results/: no checkpoint or data needed).
Writes compare.json and compare.md to --out. evaluate.py scores one checkpoint on one split.
"""

import argparse
import csv
import gzip
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import CLASS_NAMES, atomic_write, load_split, manifest_hash, pick_device  # noqa: E402
from evaluate import (  # noqa: E402
    check_manifest,
    compute_metrics,
    fmt,
    open_checkpoint,
    per_source_table,
    resolve_data,
    table,
    write_json,
)
from model import count_flops, count_parameters, predict  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run folders, .pt files, folders holding run folders, or experiments/run_record.py's "
        "JSON of recorded runs",
    )
    p.add_argument(
        "--data",
        default=None,
        help="prepared dataset for the checkpoints (default: each run's own, else data/faces)",
    )
    p.add_argument(
        "--lofo",
        nargs=2,
        default=None,
        metavar=("ON_JSON", "OFF_JSON"),
        help="experiments/lofo.py's results of the attention-on and -off arms, for the "
        "leave-one-out part of the verdict rule",
    )
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write compare.json here")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="default auto: CUDA if present",
    )
    p.add_argument(
        "--batch-size", type=int, default=256, help="images per forward pass (default 256)"
    )
    return p.parse_args(argv)


def mcnemar_exact(b, c):
    """Exact two-sided McNemar p-value: under H0 the b + c discordant pairs split 50/50."""
    from scipy.stats import binomtest

    return 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)


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
    comparison table, experiments/run_record.py's records and experiments/lofo.py's costs."""
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
    """A run's logits on val and test -> (facts, outputs): what compare_runs scores, and what
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
        # The shortcut audit of evaluate.py, per run: prepare_data.py stores each crop as
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
        rows.append(cells + [fmt(r[k]) for k in keys])
    text = table(header, rows)
    if any(a["n_runs"] > 1 for a in result["arms"].values()):
        keys = ("val_loss", "val_accuracy", "test_accuracy", "test_f1", "test_auc")
        rows = [
            [arm, a["n_runs"]]
            + [f"{fmt(a[k]['mean'])} ± {fmt(a[k]['std'])}" if k in a else "n/a" for k in keys]
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
            rows = [[name, s["label"], s["n"], fmt(off[name]["mean"], 3), fmt(s["mean"], 3),
                     f"{100 * (s['mean'] - off[name]['mean']):+.1f}"]
                    for name, s in on.items() if name in off]  # fmt: skip
            text += f"\n\nAccuracy per source, {split} split, mean over each arm's runs\n\n"
            text += table(["source", "class", "n", "off", "on", "on - off (points)"], rows)
    if lofo := result.get("lofo"):
        rows = [[s, v["label"], fmt(v["off"], 3), fmt(v["on"], 3), f"{100 * (v['on'] - v['off']):+.1f}"]
                for s, v in lofo["sources"].items()]  # fmt: skip
        rows.append(["mean", "", fmt(lofo["mean_off"], 3), fmt(lofo["mean_on"], 3),
                     f"{100 * (lofo['mean_on'] - lofo['mean_off']):+.1f}"])  # fmt: skip
        text += "\n\nLeave one source out, accuracy on the held-out source\n\n"
        text += table(["held-out source", "class", "off", "on", "on - off (points)"], rows)
    return text


def read_lofo(files):
    """--lofo ON.json OFF.json -> {"on": runs, "off": runs}, or a one-line error."""
    try:
        on, off = (json.loads(Path(f).read_text())["runs"] for f in files)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        sys.exit(f"error: --lofo {' '.join(files)}: not experiments/lofo.py results ({exc})")
    return {"on": on, "off": off}


def main(argv=None):
    args = parse_args(argv)
    lofo = read_lofo(args.lofo) if args.lofo else None
    device = pick_device(args.device)
    result = compare_runs(args.runs, args.data, device, args.batch_size, lofo)
    out = Path(args.out)
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
