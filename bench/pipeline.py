"""infer.py's speed end to end on this machine, with a per-stage breakdown.

    python bench/pipeline.py --raw data/raw --photos 400 --json results/pipeline.json \\
        --md results/pipeline.md

Two sets of photos: (a) --photos shared photos as they are (a fixed random sample, spread
evenly over the sources under RAW/{real,fake}/), and (b) the same photos each pasted into a
1280 x 960 scene (a smooth random background, the photo at 240-480 px in a random spot; JPEG
quality 90, written to a temporary folder outside the project). For each set:
  stages     each stage alone over every photo, one after the other, in ms per photo of wall
             and of CPU time: decode (common.decode_image), find (common.FaceDetector), frame
             (common.stored_crop + model_view for every face), classify (the model on
             batches of --batch faces: to_model_array + the backend's run), write (labels +
             the CSV). CPU time is what the machine spends on a photo; the CPUs divided by
             its sum is the ceiling of a perfectly overlapped run on an idle machine.
  infer.py   `python infer.py PHOTOS... --model MODEL --csv TMP --quiet` in a subprocess, as a
             user runs it: the photos/s it reports (decoding, finding, framing and classifying
             overlapped in --workers threads) and the wall time with start-up and model loading.
Each finder of --finders (common.FaceDetector's finder; infer.py --finder) gets both sets;
for auto, the photos it sent through MTCNN's whole cascade are counted.
The machine's load average is recorded with the numbers: other work on it slows them down.
"""

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends import load_model  # noqa: E402
from common import (  # noqa: E402
    FINDERS,
    FaceDetector,
    atomic_write,
    cpu_description,
    decode_image,
    find_images,
    model_view,
    stored_crop,
    stored_size,
    to_model_array,
)
from infer import label_rows, write_predictions  # noqa: E402


def sample_photos(raw, count, seed):
    """count files spread evenly over the source folders (a fixed random sample)."""
    sources = sorted(d for d in Path(raw).glob("*/*") if d.is_dir())
    if not sources:
        sys.exit(f"error: no source folders under {raw}/real and {raw}/fake")
    rng = random.Random(seed)
    per_source = -(-count // len(sources))
    picks = [f for s in sources for f in rng.sample(find_images(s), per_source)]
    return sorted(rng.sample(picks, count))


def write_scenes(files, folder, seed, size=(1280, 960), sides=(240, 480)):
    """Each photo pasted once into its own size scene, as JPEG files in folder."""
    rng = np.random.default_rng(seed)
    w, h = size
    out = []
    for k, f in enumerate(files):
        grad = np.linspace(0, 1, w)[None, :, None] * rng.integers(-60, 60, 3)
        noise = np.kron(rng.normal(0, 12, (h // 8, w // 8, 3)), np.ones((8, 8, 1)))
        canvas = Image.fromarray(
            np.clip(grad + rng.integers(60, 190, 3) + noise, 0, 255).astype(np.uint8)
        )
        photo = Image.fromarray(decode_image(f))
        side = int(rng.integers(*sides))
        scale = side / max(photo.size)
        photo = photo.resize(
            (round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC
        )
        canvas.paste(
            photo, (int(rng.integers(0, w - photo.width)), int(rng.integers(0, h - photo.height)))
        )
        out.append(Path(folder) / f"scene_{k:04d}.jpg")
        canvas.save(out[-1], quality=90)
    return out


def stages(files, run, meta, detector, batch, csv_path):
    """Each stage run alone over every photo, serially: ms per photo of wall time and of CPU time
    (the process's, all threads): decode, find, frame, classify, write."""
    size = meta["image_size"]
    wall, cpu = {}, {}

    def timed(name, fn):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall[name] = 1000 * (time.perf_counter() - started) / len(files)
        cpu[name] = 1000 * (time.process_time() - started_cpu) / len(files)
        return result

    images = timed("decode", lambda: [decode_image(f) for f in files])
    faces = timed("find", lambda: [detector(im) for im in images])
    crops = timed("frame", lambda: [
        model_view(stored_crop(im, face["landmarks"], stored_size(size))[0])
        for im, found in zip(images, faces) for face in found
    ])  # fmt: skip
    timed("classify", lambda: [run(to_model_array(np.stack(crops[i : i + batch])))
                               for i in range(0, len(crops), batch)])  # fmt: skip
    rows = [{"path": f, "face": k, "x0": 0, "y0": 0, "x1": 1, "y1": 1, "prob_fake": 0.5,
             "status": "ok"} for f, found in zip(files, faces) for k in range(len(found))]  # fmt: skip
    timed("write", lambda: (label_rows(rows, meta["threshold"], meta["unsure_band"],
                                       meta["class_names"]), write_predictions(csv_path, rows)))  # fmt: skip
    wall["sum"], cpu["sum"] = sum(wall.values()), sum(cpu.values())
    rounded = lambda d: {k: round(v, 2) for k, v in d.items()}  # noqa: E731
    return rounded(wall), rounded(cpu), sum(map(len, faces)), sum(bool(f) for f in faces)


def infer_run(files, model, csv_path, workers, finder):
    """infer.py in a subprocess: (the photos/s it reports, wall seconds with start-up)."""
    command = [sys.executable, str(ROOT / "infer.py"), *map(str, files), "--model", str(model),
               "--csv", str(csv_path), "--quiet", "--finder", finder] + (
                   ["--workers", str(workers)] if workers else [])  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"error: infer.py failed:\n{done.stderr}")
    reported = re.search(r"([\d.]+) images/s", done.stderr)
    return float(reported.group(1)) if reported else None, round(wall, 2), done.stderr.strip()


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--raw", default="data/raw", help="folder with real/ and fake/ sources")
    p.add_argument("--photos", type=int, default=400, help="photos per set (default 400)")
    p.add_argument("--model", default="models/facecheck.onnx", help="model (default %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="faces per model call (default 32)")
    p.add_argument("--workers", type=int, default=None, help="infer.py --workers (its default)")
    p.add_argument("--seed", type=int, default=0, help="sample and scene seed (default 0)")
    p.add_argument(
        "--finders",
        nargs="+",
        choices=FINDERS,
        default=["mtcnn"],
        help="face finders to time, each on both sets (default mtcnn)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="then run infer.py N more times a finder on the photos as they are, finders interleaved (default 0)",
    )
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--md", default=None, help="write the table as Markdown here")
    args = p.parse_args(argv)
    if args.repeats < 0:
        p.error("--repeats must be >= 0")
    return args


def markdown(payload):
    names = ["decode", "find", "frame", "classify", "write", "sum"]
    lines = ["| set | finder | photos | faces | " + " | ".join(f"{n} ms" for n in names)
             + " | ceiling photos/s | infer.py photos/s | infer.py wall s |",
             "|---|---|---|---|" + "---|" * (len(names) + 3)]  # fmt: skip
    for r in payload["sets"]:
        wall, cpu = r["stages_ms_per_photo"], r["stages_cpu_ms_per_photo"]
        lines.append(f"| {r['set']} | {r['finder']} | {r['photos']} | {r['faces']} | "
                     + " | ".join(f"{wall[n]} ({cpu[n]})" for n in names)
                     + f" | {r['cpu_bound_photos_per_s']} | {r['infer_photos_per_s']} | {r['infer_wall_s']} |")  # fmt: skip
    lines += ["", "Stages: ms per photo, each stage alone on one thread: wall time (CPU time "
              "of the process in brackets; wall time grows with other work on the machine, CPU "
              "time much less). Ceiling: the CPUs divided by the CPU time of all stages, the "
              "photos/s of a perfectly overlapped run on an otherwise idle machine. infer.py: "
              "the photos/s it reports itself (decoding, finding and framing in its worker "
              "threads, the model on batches, overlapped), and its wall time with start-up and "
              f"model loading. Model {payload['model']}, {payload['cpu']}, load average "
              f"before / after {payload['load_average_before']} / {payload['load_average_after']}."]  # fmt: skip
    if payload.get("repeats"):
        repeats = payload["repeats"]
        runs = [f"{finder} {', '.join(map(str, v))} (median {statistics.median(v)})"
                for finder, v in repeats.items()]  # fmt: skip
        count = len(next(iter(repeats.values())))
        lines += ["", f"infer.py again on the photos as they are, {count} runs a finder, the "
                  f"finders interleaved: photos/s {'; '.join(runs)}."]  # fmt: skip
    cascaded = [f"{r['cascaded']} of {r['photos']} {r['set']}" for r in payload["sets"]
                if r.get("cascaded") is not None]  # fmt: skip
    if cascaded:
        lines += ["", "Photos finder auto sent through MTCNN's whole cascade (not a one-face "
                  f"portrait): {'; '.join(cascaded)}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    run, meta = load_model(args.model)
    if meta.get("faces") != "mtcnn":
        sys.exit(f"error: {args.model} takes whole images (faces: {meta.get('faces')}); "
                 "this bench times the face finder too")  # fmt: skip
    files = sample_photos(args.raw, args.photos, args.seed)
    load_before = [round(v, 2) for v in os.getloadavg()]
    sets = []
    with tempfile.TemporaryDirectory(prefix="facecheck-pipeline-") as tmp:
        scene_dir = Path(tmp) / "scenes"
        scene_dir.mkdir()
        scenes = write_scenes(files, scene_dir, args.seed)
        for finder in args.finders:
            detector = FaceDetector(finder=finder)
            detector(np.zeros((64, 64, 3), np.uint8))  # warm-up
            for name, photos in [("photos as they are", files), ("in 1280x960 scenes", scenes)]:
                detector.cascaded = 0
                wall, cpu, faces, with_face = stages(photos, run, meta, detector, args.batch,
                                                     Path(tmp) / "stages.csv")  # fmt: skip
                cascaded = detector.cascaded if finder == "auto" else None
                per_s, seconds, summary = infer_run(
                    photos, args.model, Path(tmp) / "p.csv", args.workers, finder
                )
                sets.append({"set": name, "finder": finder, "photos": len(photos), "faces": faces,
                             "with_face": with_face, "cascaded": cascaded,
                             "stages_ms_per_photo": wall,
                             "stages_cpu_ms_per_photo": cpu,
                             "cpu_bound_photos_per_s": round(1000 * os.cpu_count() / cpu["sum"], 1),
                             "infer_photos_per_s": per_s,
                             "infer_wall_s": seconds, "infer_summary": summary})  # fmt: skip
                print(json.dumps(sets[-1]), flush=True)
        # The machine's speed wanders by 10-20 % within minutes: repeated, interleaved runs
        # give infer.py's photos/s a spread and a median.
        repeats = {finder: [] for finder in args.finders}
        for _ in range(args.repeats):
            for finder in args.finders:
                per_s = infer_run(files, args.model, Path(tmp) / "p.csv", args.workers, finder)[0]
                repeats[finder].append(per_s)
    payload = {
        "sets": sets, "model": args.model, "seed": args.seed, "cpus": os.cpu_count(),
        "cpu": cpu_description(), "repeats": repeats if args.repeats else None,
        "load_average_before": load_before,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }  # fmt: skip
    text = markdown(payload)
    print("\n" + text)
    if args.json:
        atomic_write(
            args.json, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1) + "\n")
        )
    if args.md:
        atomic_write(args.md, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
