"""Does the classifier give the same verdicts when BlazeFace, not MTCNN, finds the faces (or
another copy of the model, e.g. the INT8 one, scores them)?

    python experiments/finder_parity.py --model models/facecheck.onnx --split test \\
        --finder blazeface --json results/finder-parity.json --md results/finder-parity.md
    python experiments/finder_parity.py --finder auto --json results/finder-parity-auto.json \\
        --md results/finder-parity-auto.md
    python experiments/finder_parity.py --finder auto --candidate-model models/facecheck.int8.onnx \\
        --json results/finder-parity-auto-int8.json --md results/finder-parity-auto-int8.md

    python experiments/finder_parity.py --finder mtcnn --candidate-model models/facecheck.int8.onnx \\
        --json results/finder-parity-int8.json --md results/finder-parity-int8.md

The model was trained on crops framed from MTCNN's landmarks. infer.py --finder blazeface lets
BlazeFace propose the faces and MTCNN's last stage (the O-net) give the landmarks, so the
framing should barely move (results/detector-blazeface.md: median framing IoU 0.97). This
measures what that costs the verdicts: every photo of a split of the prepared dataset (its
original under data/raw, as the manifest names it) goes through two pipelines, the reference
(common.face_inputs with FaceDetector(finder="mtcnn"), then --model) and the candidate
(--finder's faces, then --candidate-model, by default --model; --finder mtcnn with another
model compares the models alone, on the very same faces). The largest face of each photo is
classified (backends.load_model: .onnx, .pt), each pipeline at its own model's threshold.
Reported per source and overall: photos with a face, each pipeline's accuracy, labels that
agree, the mean and the largest |prob_fake difference|, and McNemar's exact test on the photos
that one pipeline gets right and the other wrong (scipy.stats.binomtest on the discordant pairs).
"""

import argparse
import json
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compare import mcnemar_exact  # noqa: E402

from backends import load_model  # noqa: E402
from common import (  # noqa: E402
    FINDERS,
    FaceDetector,
    atomic_write,
    decode_image,
    face_inputs,
    read_manifest,
    to_model_array,
)
from infer import fake_probability  # noqa: E402

REFERENCE = "mtcnn"  # the finder that framed the training crops (prepare_data.py)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # fmt: off
    p.add_argument("--model", default="models/facecheck.onnx", help="a .onnx or .pt model (default %(default)s)")
    p.add_argument("--data", default="data/faces", help="prepared dataset whose manifest names the photos (default %(default)s)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split's photos (default test)")
    p.add_argument("--per-source", type=int, default=0, help="at most this many photos a source, 0 = all (default 0)")
    p.add_argument("--finder", default="blazeface", choices=FINDERS, help="the candidate's finder, compared with mtcnn (default %(default)s)")
    p.add_argument("--candidate-model", help="the candidate's model (default: --model)")
    p.add_argument("--workers", type=int, default=2, help="threads that decode and find faces (default 2)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--md", help="write the table here")
    # fmt: on
    args = p.parse_args(argv)
    same_model = args.candidate_model is None or (
        Path(args.candidate_model).resolve() == Path(args.model).resolve()
    )
    if args.finder == REFERENCE and same_model:
        p.error("--finder mtcnn compares the same pipeline with itself: give --candidate-model")
    if same_model:
        args.candidate_model = None
    return args


def largest_face_input(path, size, detectors):
    """The model input of the largest face each finder frames in the photo (None: no face)."""
    rgb = decode_image(path)
    faces = {name: face_inputs(rgb, size, det) for name, det in detectors.items()}
    return {name: (found[0][1] if found else None) for name, found in faces.items()}


def compare(rows, probs, thresholds):
    """Per source and overall: the counts and accuracies of the two pipelines (probs' keys, the
    reference first; each scored at its own model's threshold) on rows."""
    a, b = probs
    groups = defaultdict(list)
    for k, row in enumerate(rows):
        groups[row["source"]].append(k)
        groups["all"].append(k)
    table = {}
    for source, index in sorted(groups.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        both = [k for k in index if all(probs[f][k] is not None for f in probs)]
        truth = np.array([rows[k]["label"] == "fake" for k in both])
        p = {f: np.array([probs[f][k] for k in both]) for f in probs}
        right = {f: (p[f] >= thresholds[f]) == truth for f in probs}
        only_a = int((right[a] & ~right[b]).sum())
        only_b = int((right[b] & ~right[a]).sum())
        diff = np.abs(p[a] - p[b]) if both else np.zeros(1)
        table[source] = {
            "label": rows[index[0]]["label"] if source != "all" else "",
            "photos": len(index),
            **{f"with_face_{f}": sum(probs[f][k] is not None for k in index) for f in probs},
            "both": len(both),
            **{f"accuracy_{f}": float(right[f].mean()) if both else None for f in probs},
            "labels_agree": float(((p[a] >= thresholds[a]) == (p[b] >= thresholds[b])).mean())
            if both
            else None,
            "mean_abs_prob_difference": float(diff.mean()),
            "max_abs_prob_difference": float(diff.max()),
            f"only_{a}_right": only_a,
            f"only_{b}_right": only_b,
            "mcnemar_p": mcnemar_exact(only_a, only_b),
        }
    return table


def pipeline_names(finder, model, candidate_model):
    """The two pipelines' names: the finders, with the model files' names (their paths where
    the names are alike) when a candidate model is given."""
    if candidate_model is None:
        return REFERENCE, finder
    a, b = Path(model).name, Path(candidate_model).name
    if a == b:
        a, b = str(model), str(candidate_model)
    return f"{REFERENCE}+{a}", f"{finder}+{b}"


def markdown(result):
    a, b = result["pipelines"]
    thresholds = result["thresholds"]
    models = (
        f"{result['model']} (threshold {thresholds[a]:.4f})"
        if not result["candidate_model"]
        else f"{result['model']} (threshold {thresholds[a]:.4f}), candidate "
        f"{result['candidate_model']} (threshold {thresholds[b]:.4f})"
    )
    lines = [
        f"# The classifier's verdicts: {b} against {a} (experiments/finder_parity.py)",
        "",
        f"Model {models}, the {result['split']} "
        f"split of {result['data']}: every photo's original through common.face_inputs with "
        "each pipeline's finder, the largest face classified by its model. Accuracy on the "
        "photos where both found a face; McNemar: exact binomial test on the photos only one "
        "pipeline gets right.",
        "",
        f"| source | class | photos | with a face: {a} / {b} | accuracy {a} | accuracy {b} | "
        f"labels agree | mean / max abs prob diff | only {a} right / only {b} right | McNemar p |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for source, r in result["per_source"].items():
        name = f"**{source}**" if source == "all" else source
        lines.append(
            f"| {name} | {r['label']} | {r['photos']} | {r[f'with_face_{a}']} / "
            f"{r[f'with_face_{b}']} | {r[f'accuracy_{a}']:.3f} | "
            f"{r[f'accuracy_{b}']:.3f} | {r['labels_agree']:.3f} | "
            f"{r['mean_abs_prob_difference']:.3f} / {r['max_abs_prob_difference']:.3f} | "
            f"{r[f'only_{a}_right']} / {r[f'only_{b}_right']} | {r['mcnemar_p']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    a, b = pipeline_names(args.finder, args.model, args.candidate_model)
    finder = {a: REFERENCE, b: args.finder}
    models = {a: load_model(args.model), b: load_model(args.candidate_model or args.model)}
    for name, (_, meta) in models.items():
        if meta.get("faces") != "mtcnn":
            sys.exit(
                f"error: {name}'s model was trained on whole images (faces={meta.get('faces')})"
            )
    size = models[a][1]["image_size"]
    if models[b][1]["image_size"] != size:
        sys.exit(
            f"error: the models take different sizes ({size}, {models[b][1]['image_size']} px)"
        )
    rows = read_manifest(args.data, args.split)
    if args.per_source:
        by_source = defaultdict(list)
        for r in rows:
            by_source[r["source"]].append(r)
        rows = [r for group in by_source.values() for r in group[: args.per_source]]
    if not rows:
        sys.exit(f"error: no {args.split} rows in {args.data}/manifest.csv")
    detectors = {f: FaceDetector(finder=f) for f in dict.fromkeys(finder.values())}
    with ThreadPoolExecutor(args.workers) as pool:
        inputs = list(
            tqdm(
                pool.map(lambda r: largest_face_input(ROOT / r["original"], size, detectors), rows),
                total=len(rows),
                desc="find faces",
            )
        )
    probs = {}
    for name, (run, _) in models.items():
        f = finder[name]
        index = [k for k, x in enumerate(inputs) if x[f] is not None]
        p = [None] * len(rows)
        for start in range(0, len(index), 64):
            chunk = index[start : start + 64]
            logits = run(to_model_array(np.stack([inputs[k][f] for k in chunk])))
            for k, prob in zip(chunk, fake_probability(logits)):  # infer.py's own softmax
                p[k] = float(prob)
        probs[name] = p
    thresholds = {name: meta["threshold"] for name, (_, meta) in models.items()}
    result = {
        "model": args.model,
        "candidate_model": args.candidate_model,
        "thresholds": thresholds,
        "data": args.data,
        "split": args.split,
        "finder": args.finder,
        "pipelines": [a, b],
        "per_source": compare(rows, probs, thresholds),
    }
    text = markdown(result)
    print(text)
    if args.json:
        atomic_write(args.json, lambda t: Path(t).write_text(json.dumps(result, indent=1) + "\n"))
    if args.md:
        atomic_write(args.md, lambda t: Path(t).write_text(text))


if __name__ == "__main__":
    main()
