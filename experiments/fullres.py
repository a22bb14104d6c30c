"""The whole product on full-resolution real portraits: infer.py as a user runs it, per folder.

    python experiments/fullres.py --model models/facecheck.onnx \\
        --md results/fullres.md --json results/fullres.json

Every photo of each folder (default: the large real portrait sources of data/raw and the real
example photos) goes through `infer.py FOLDER --model MODEL --csv ...` in a subprocess: the
face finder, the framing and the model's own threshold and unsure band, every face of every
photo. All of these photos are real, so the table says how often a real portrait is called
real, left unsure, or called fake, and how many faces fall below the threshold.
"""

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends import load_model  # noqa: E402
from common import atomic_write  # noqa: E402

PORTRAITS = ["studio_canada", "celebahq", "headshots", "dating_photos", "mebeauty", "amfd"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # fmt: off
    p.add_argument("--model", default="models/facecheck.onnx", help="model for infer.py (default %(default)s)")
    p.add_argument("--raw", default="data/raw", help="folder with real/<source>/ (default %(default)s)")
    p.add_argument("--sources", nargs="+", default=PORTRAITS, help="real sources to run (default: the large portrait sets)")
    p.add_argument("--finder", default="mtcnn", help="infer.py --finder (default %(default)s)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--md", help="write the table here")
    # fmt: on
    return p.parse_args(argv)


def run_infer(paths, model, finder, csv_path):
    """infer.py on paths as a user runs it: its face rows (status ok) and its summary line."""
    command = [sys.executable, str(ROOT / "infer.py"), *map(str, paths), "--model", str(model),
               "--csv", str(csv_path), "--quiet", "--finder", finder]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"error: infer.py failed:\n{done.stderr}")
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if r["status"] == "ok"], done.stderr.strip().splitlines()[-1]


def tally(rows, threshold):
    n = len(rows)
    share = lambda cond: round(sum(map(cond, rows)) / n, 3) if n else None  # noqa: E731
    return {
        "faces": n,
        "called_real": share(lambda r: r["label"] == "real"),
        "unsure": share(lambda r: r["label"] == "unsure"),
        "called_fake": share(lambda r: r["label"] == "fake"),
        "below_threshold": share(lambda r: float(r["prob_fake"]) < threshold),
    }


def main(argv=None):
    args = parse_args(argv)
    _, meta = load_model(args.model)
    folders = {s: Path(args.raw) / "real" / s for s in args.sources}
    folders["examples (real)"] = sorted((ROOT / "examples").glob("real_*"))
    results, per_photo = {}, {}
    with tempfile.TemporaryDirectory(prefix="facecheck-fullres-") as tmp:
        for name, paths in folders.items():
            paths = paths if isinstance(paths, list) else [paths]
            if not all(Path(p).exists() for p in paths):
                sys.exit(f"error: {paths[0]} not found")
            rows, summary = run_infer(paths, args.model, args.finder, Path(tmp) / "p.csv")
            results[name] = {**tally(rows, meta["threshold"]), "infer_summary": summary}
            print(name, json.dumps(results[name]), flush=True)
            if name.startswith("examples"):
                per_photo = {Path(r["path"]).stem: [round(float(r["prob_fake"]), 3), r["label"]]
                             for r in rows}  # fmt: skip
    payload = {"model": args.model, "finder": args.finder, "threshold": meta["threshold"],
               "unsure_band": meta["unsure_band"], "sources": results,
               "example_photos": per_photo}  # fmt: skip
    band = meta["unsure_band"]
    lines = [
        "# Full-resolution real portraits through infer.py (experiments/fullres.py)",
        "",
        f"Model {args.model} (threshold {meta['threshold']:.3f}, unsure band {band[0]:.3f}-"
        f"{band[1]:.3f}), finder {args.finder}; every face of every photo; all photos real.",
        "",
        "| source | faces | called real | unsure | called fake | below the threshold |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['faces']} | {r['called_real']} | {r['unsure']} | "
                     f"{r['called_fake']} | {r['below_threshold']} |")  # fmt: skip
    lines += ["", "Example photos (prob_fake, label): "
              + ", ".join(f"{k} {v[0]} {v[1]}" for k, v in per_photo.items())]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if args.json:
        atomic_write(args.json, lambda t: Path(t).write_text(json.dumps(payload, indent=1) + "\n"))
    if args.md:
        atomic_write(args.md, lambda t: Path(t).write_text(text))


if __name__ == "__main__":
    main()
