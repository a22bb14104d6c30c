"""Find every face in every photo and classify each as real or AI-generated.

    python infer.py photos/                         # every face under photos/ -> predictions.csv
    python infer.py a.jpg b.png --csv -             # CSV on stdout
    python infer.py photos/ --model runs/attention-off/best.pt --threshold 0.7

The model decides the backend by its file type (backends.py): .onnx runs in ONNX Runtime
(TensorRT, CUDA or CPU provider, the first one available), .engine / .plan in TensorRT, .pt (a
train.py checkpoint) in PyTorch. Input size, face framing, decision threshold and class names
come from the model file (ONNX metadata, the engine's .json, the checkpoint), so nothing here
has to match by hand.

Preprocessing is training's own, imported from common.py: EXIF orientation applied, any mode
(grayscale, RGBA on white, CMYK, 16-bit, palette) to 8-bit RGB; common.FaceDetector finds the
faces, and each is framed from its five landmarks (MTCNN's last stage, the O-net) exactly as
prepare_data.py framed the training faces (common.face_inputs). --finder: mtcnn (default)
runs MTCNN's whole cascade on every photo, as prepare_data.py does; auto lets BlazeFace propose
the faces in one pass and runs the cascade only on photos that are not a one-face portrait (a
group, a scene, no face found): about 4x faster on portraits, the same faces in scenes, but
beside a face of a third of the photo or more, a second face under about a sixth of it goes
unseen (results/detector-auto.md); blazeface never runs the cascade and misses faces under
about a sixth of the photo wherever they are (results/detector-blazeface.md). A model trained
on already-cropped faces (metadata faces=whole) takes the centred square of each image instead.

Folders are searched recursively for .jpg .jpeg .png .webp .bmp .gif; files named on the
command line are tried whatever their extension. Decoding, face finding and framing run in a
pool of --workers threads, a few images ahead of the model.

Output: CSV, one row per face, largest face first (face 0), written atomically to --csv
(default predictions.csv in the current folder; "-" prints it to stdout):
    path, face, x0, y0, x1, y1, prob_fake, label, status
x0..y1 is the face's box in the photo's pixels (after EXIF rotation); label is fake when
prob_fake is at or above the model's unsure band, real below it, unsure inside it (the band
is picked on validation so that the confident calls are right >= 95 % of the time there; with
--threshold the band collapses onto that threshold); status is ok. A photo without a face gets one row with
status no_face and one that cannot be read one row with status unreadable (the reason goes
to stderr); neither gets a guess. A summary goes to stderr. Exit status 0 when at least one
file could be read; 2 when a path does not exist, none of the paths holds an image (an empty
folder beside a full one is not an error), no file could be read, the model file or the face
finder's is missing or unusable, an output would overwrite an input, or writing the results
failed.

    python infer.py photos/ --save annotated/ --json predictions.json

--save writes a copy of every readable photo with each face boxed and labelled (green real,
red fake, amber unsure, with prob_fake); --json writes the rows and the summary as JSON.
Inputs are only read.
"""

import argparse
import csv
import io
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from backends import ModelError, load_model
from calibrate import decision
from common import (
    FINDERS,
    IMAGE_EXTENSIONS,
    BadImage,
    atomic_write,
    decode_image,
    face_inputs,
    find_images,
    to_model_array,
)

# Beside this file, not in the current folder: infer.py run from anywhere finds the shipped model.
DEFAULT_MODEL = str(Path(__file__).resolve().parent / "models" / "facecheck.onnx")


class InferError(Exception):
    """A problem with the inputs or the model; str(exc) is the one-line message."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # fmt: off
    p.add_argument("paths", nargs="+", metavar="FOLDER_OR_FILE", help="image files and/or folders (searched recursively)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="a .onnx, .engine/.plan or .pt model (default models/facecheck.onnx beside infer.py; models/facecheck.int8.onnx is faster on a CPU)")
    p.add_argument("--csv", default="predictions.csv", help='CSV to write (default %(default)s in the current folder; "-" for stdout)')
    p.add_argument("--batch", type=int, default=32, help="faces per model call (default 32)")
    p.add_argument("--threshold", type=float, help="predict fake when prob_fake >= this, with no unsure band (default: the model's threshold and band, chosen on validation)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="threads that decode, find and frame faces (default min(4, CPUs))")
    p.add_argument("--finder", choices=FINDERS, default="mtcnn", help="face finder: mtcnn = the full cascade, faces down to 7%% of the short side (default); auto = blazeface on one-face portraits (~4x faster), mtcnn elsewhere; blazeface = fastest, misses faces under ~1/6 of the photo")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--save", metavar="DIR", help="write a copy of every photo into DIR with each face boxed and labelled (real / fake / unsure and prob_fake); DIR must lie outside the inputs")
    p.add_argument("--json", metavar="PATH", help='also write the rows and the summary as JSON to PATH ("-" for stdout)')
    # fmt: on
    args = p.parse_args(argv)
    if args.batch < 1 or args.workers < 1:
        p.error("--batch and --workers must be >= 1")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        p.error(f"--threshold {args.threshold}: a probability, between 0 and 1")
    if args.csv == "-" and args.json == "-":
        p.error("--csv - and --json - both print to stdout: send one of them to a file")
    return args


def collect_files(paths):
    """Image files under the given folders plus the given files, in order, without repeats,
    and the argument each came from."""
    found = {}
    for arg in paths:
        path = Path(arg)
        if not path.exists():
            raise InferError(f"{arg}: no such file or folder")
        for f in find_images(path) if path.is_dir() else [path]:
            found.setdefault(f, path)
    if not found:
        where = ", ".join(paths)
        raise InferError(
            f"no images found in {where} (looked for {' '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return list(found), list(found.values())


def decode(path):
    """(H x W x 3 uint8, None) or (None, reason): never raises."""
    try:
        return decode_image(path), None
    except BadImage as exc:
        return None, str(exc)
    except Exception as exc:
        return None, f"unreadable ({type(exc).__name__}: {exc})"


def decode_ahead(files, workers, lookahead, work=decode):
    """Yield (path, *work(path)) in order while up to lookahead files are worked on in threads
    (PIL's decoding, numpy and ONNX Runtime release the GIL, so the threads use every core)."""
    with ThreadPoolExecutor(workers) as pool:
        queue, todo = deque(), iter(files)
        for path in todo:
            queue.append((path, pool.submit(work, path)))
            if len(queue) >= lookahead:
                break
        while queue:
            path, future = queue.popleft()
            following = next(todo, None)
            if following is not None:
                queue.append((following, pool.submit(work, following)))
            yield (path, *future.result())


def fake_probability(logits):
    """softmax(logits)[:, 1], in float64 so every backend rounds the same way."""
    logits = logits.astype(np.float64)
    return 1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))


def classify(run, files, size, detector=None, batch=32, workers=2, progress=None):
    """Rows (dicts: path, face, x0, y0, x1, y1, prob_fake, status, reason) for every face of
    every file, in file order, largest face first. detector None: the image is the face.
    Decoding, face finding and framing run in the worker threads, the model on full batches."""
    rows, pending, images = [], [], []

    def flush():
        logits = run(to_model_array(np.stack(images)))
        for row, prob in zip(pending, fake_probability(logits).tolist()):
            row["prob_fake"] = prob
        pending.clear()
        images.clear()

    def faces_of(path):
        rgb, reason = decode(path)
        if rgb is None:
            return None, reason
        try:
            return face_inputs(rgb, size, detector), None
        except Exception as exc:  # one photo the detector chokes on must not lose the folder
            return None, f"face detection failed ({type(exc).__name__}: {exc})"

    for path, faces, reason in decode_ahead(files, workers, batch + 2 * workers, faces_of):
        if progress is not None:
            progress.update()
        if faces is None:
            rows.append({"path": path, "face": "", "status": "unreadable", "reason": reason})
            continue
        if not faces:
            rows.append({"path": path, "face": "", "status": "no_face", "reason": ""})
        for k, (box, image) in enumerate(faces):
            x0, y0, x1, y1 = (round(float(v), 1) for v in box)
            row = {"path": path, "face": k, "x0": x0, "y0": y0, "x1": x1, "y1": y1}
            rows.append({**row, "status": "ok", "reason": ""})
            pending.append(rows[-1])
            images.append(image)
            if len(images) == batch:
                flush()
    if images:
        flush()
    return rows


def printable(path):
    """A path as text that any UTF-8 stream accepts (undecodable bytes become \\x escapes)."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


CSV_FIELDS = ["path", "face", "x0", "y0", "x1", "y1", "prob_fake", "label", "status"]


def label_rows(rows, threshold, band, class_names):
    """Each face row gains its label (real / fake / unsure, in the model's class names)."""
    names = {"real": class_names[0], "fake": class_names[1], "unsure": "unsure"}
    for r in rows:
        r["label"] = (
            "" if r.get("prob_fake") is None else names[decision(r["prob_fake"], threshold, band)]
        )


def write_predictions(destination, rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for r in rows:
        prob = r.get("prob_fake")
        box = [r.get(k, "") for k in ("x0", "y0", "x1", "y1")]
        prob_text = "" if prob is None else f"{prob:.6f}"
        writer.writerow([printable(r["path"]), r["face"], *box, prob_text, r["label"], r["status"]])
    text = buffer.getvalue()
    if destination == "-":
        sys.stdout.write(text)
    else:
        atomic_write(destination, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def summarise(files, rows, class_names):
    faces = [r for r in rows if r["status"] == "ok"]
    count = lambda key, value: sum(r[key] == value for r in rows)  # noqa: E731
    real, fake = class_names  # the labels label_rows gave, in the model's class names
    return {
        "images": len(files), "faces": len(faces), "real": sum(r["label"] == real for r in faces),
        "fake": sum(r["label"] == fake for r in faces), "unsure": count("label", "unsure"),
        "unreadable": count("status", "unreadable"), "no_face": count("status", "no_face"),
    }  # fmt: skip


def write_json(path, rows, summary, meta, threshold, band):
    keys = ["face", "x0", "y0", "x1", "y1", "prob_fake", "label", "status", "reason"]
    payload = {
        "summary": summary,
        "model": {k: meta.get(k) for k in ("backend", "precision", "image_size", "faces")},
        "threshold": threshold, "unsure_band": list(band),
        "confident_calls_on_validation": meta.get("confident_calls"),
        # A photo without a face (or unreadable) has face null, as it has no box.
        "rows": [{"path": printable(r["path"]), **{k: r.get(k) for k in keys},
                  "face": None if r["face"] == "" else r["face"]} for r in rows],
    }  # fmt: skip
    text = json.dumps(payload, indent=1) + "\n"
    if path == "-":
        sys.stdout.write(text)
    else:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def check_destinations(args):
    """Refuse output paths that cannot be written before the work, not after it: a --json
    that fails once every photo is classified would leave the run half-written."""
    files = [("--csv", args.csv)] if args.csv != "-" else []
    files += [("--json", args.json)] if args.json and args.json != "-" else []
    if len(files) == 2 and Path(args.csv).resolve() == Path(args.json).resolve():
        raise InferError(f"--csv and --json both name {args.csv}: name two files")
    folders = [(flag, Path(path).parent) for flag, path in files]
    folders += [("--save", Path(args.save))] if args.save else []
    for flag, path in files:
        if Path(path).is_dir():
            raise InferError(f"{flag} {path} is a folder: name a file")
    for flag, folder in folders:
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir():
            raise InferError(f"{flag}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise InferError(f"{flag}: cannot write into {existing}")


def saved_copy_names(files, roots, save_dir):
    """Where each photo's annotated copy (a JPEG) goes: SAVE/<input folder name>/<path inside
    it>, or SAVE/<file name> for files named alone; a photo.jpg keeps its name, a photo.png
    becomes photo.png.jpg. Never an input file, never inside an input folder (the next run
    would classify the copies)."""
    save_dir = Path(save_dir).resolve()
    names, taken = {}, set()
    for path, root in zip(files, roots):
        # root.resolve().name: "." or ".." as the input folder gets its real name, inside SAVE
        rel = (
            Path(root.resolve().name) / path.relative_to(root) if root.is_dir() else Path(path.name)
        )
        jpeg = rel.suffix.lower() in (".jpg", ".jpeg")
        stem, suffix = (rel.stem, rel.suffix) if jpeg else (rel.name, ".jpg")
        target = save_dir / rel.with_name(stem + suffix)
        k = 1
        while target in taken:
            target = save_dir / rel.with_name(f"{stem}.{k}{suffix}")
            k += 1
        taken.add(target)
        names[path] = target
    return names


def refuse_overwriting_inputs(args, files, roots, names):
    """Inputs are only read: no output may be an input photo (`--csv *.jpg` would turn the first
    photo into CSV), and no boxed copy may land on a photo or inside an input folder (a photo
    named alone and saved into its own folder, a folder saved into its parent)."""
    inputs = {f.resolve() for f in files}
    folders = [r.resolve() for r in roots if r.is_dir()]
    for flag, out in (("--csv", args.csv), ("--json", args.json)):
        if out and out != "-" and Path(out).resolve() in inputs:
            raise InferError(f"{flag} {out} is one of the input photos: name another file")
    for path, copy in (names or {}).items():
        copy = copy.resolve()
        inside = next((folder for folder in folders if folder in copy.parents), None)
        if copy in inputs or inside:
            where = "an input photo" if copy in inputs else f"inside the input folder {inside}"
            raise InferError(f"--save {args.save}: the boxed copy of {path} would be written to "
                             f"{copy}, {where}: pick another folder")  # fmt: skip


COLOURS = {"real": (40, 180, 70), "fake": (220, 40, 40), "unsure": (240, 170, 0)}


def annotate(rgb, face_rows, class_names):
    """The photo with every face boxed and labelled; a banner when it has no face."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.fromarray(rgb)
    draw = ImageDraw.Draw(im)
    side = max(im.size)
    font = ImageFont.load_default(size=max(12, side // 45))
    width = max(2, side // 300)
    kind = {class_names[0]: "real", class_names[1]: "fake", "unsure": "unsure"}
    for r in face_rows:
        if r["status"] != "ok":
            draw.text(
                (8, 8),
                "no face found",
                fill=(255, 255, 255),
                font=font,
                stroke_width=2,
                stroke_fill=(0, 0, 0),
            )
            continue
        colour = COLOURS[kind[r["label"]]]
        box = [r["x0"], r["y0"], r["x1"], r["y1"]]
        draw.rectangle(box, outline=colour, width=width)
        text = f"{r['label']} {r['prob_fake']:.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), text, font=font)
        y = box[1] - (bottom - top) - 2 * width if box[1] > bottom - top + 2 * width else box[3]
        draw.rectangle(
            [box[0], y, box[0] + right - left + 2 * width, y + bottom - top + 2 * width],
            fill=colour,
        )
        draw.text(
            (box[0] + width, y + width - (top - box[1])), text, fill=(255, 255, 255), font=font
        )
    return im


def save_annotated(rows, names, class_names, workers):
    """Decode each readable photo again (in threads) and write its annotated copy atomically."""
    by_path = {}
    for r in rows:
        if r["status"] != "unreadable":
            by_path.setdefault(r["path"], []).append(r)

    def one(path):
        rgb, _ = decode(path)
        if rgb is not None:
            im = annotate(rgb, by_path[path], class_names)
            im.thumbnail((65_500, 65_500))  # JPEG stores sides up to 65,535 px: a panorama too
            atomic_write(names[path], lambda tmp: im.save(tmp, format="JPEG", quality=90))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, by_path))


def make_detector(meta, finder="mtcnn"):
    """The face detector the model's training data was framed with (None: whole images).
    finder "blazeface" proposes the faces in one pass, "auto" too on one-face portraits; MTCNN's
    own last stage still gives the landmarks that frame them (results/detector-auto.md,
    results/finder-parity-auto.md)."""
    if meta.get("faces", "whole") != "mtcnn":
        return None
    from common import FaceDetector

    try:  # ONNX Runtime's CUDA provider where it has one, else CPU
        return FaceDetector(device="cuda", finder=finder)
    except Exception as exc:  # a face finder model missing or corrupt: one line, no traceback
        raise ModelError(f"face finder: {exc}") from None


def classify_all(run, files, meta, args):
    """Every file through the detector and the model, with a progress bar: (rows, seconds)."""
    from tqdm import tqdm

    detector = make_detector(meta, args.finder)
    start = time.perf_counter()
    with tqdm(
        total=len(files), unit="img", disable=args.quiet, file=sys.stderr, leave=False
    ) as bar:
        rows = classify(run, files, meta["image_size"], detector, args.batch, args.workers, bar)
    return rows, time.perf_counter() - start


def print_summary(args, summary, meta, threshold, band, images_per_s):
    wrote = [p for p in (args.csv, args.json, args.save) if p and p != "-"]
    print(f"{summary['images']} images, {summary['faces']} faces: {summary['real']} real, "
          f"{summary['fake']} fake, {summary['unsure']} unsure (prob_fake {band[0]:.3f}-{band[1]:.3f}); "
          f"{summary['no_face']} without a face, {summary['unreadable']} unreadable. "
          f"{images_per_s:.1f} images/s ({meta['backend']}, {meta['precision']}, "
          f"threshold {threshold:.4f}, faces: {summary['faces_found_by']})"
          + (f"; wrote {', '.join(map(str, wrote))}" if wrote else ""), file=sys.stderr)  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    try:
        check_destinations(args)
        files, roots = collect_files(args.paths)
        names = saved_copy_names(files, roots, args.save) if args.save else None
        refuse_overwriting_inputs(args, files, roots, names)
        if args.model == DEFAULT_MODEL and not Path(args.model).is_file():
            raise InferError(f"model {args.model} not found (make it with: python export.py "
                             "--checkpoint runs/<run>/best.pt)")  # fmt: skip
        run, meta = load_model(args.model)
        # A model that fails mid-folder is a ModelError too: one line, no traceback.
        rows, seconds = classify_all(run, files, meta, args)
    except (InferError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    threshold = meta["threshold"] if args.threshold is None else args.threshold
    band = meta["unsure_band"] if args.threshold is None else [threshold, threshold]
    for r in rows:
        if r["status"] == "unreadable":
            print(f"skipped {printable(r['path'])}: {r['reason']}", file=sys.stderr)
    if sum(r["status"] == "unreadable" for r in rows) == len(files):
        print(f"error: none of the {len(files)} files could be read as an image", file=sys.stderr)
        return 2
    label_rows(rows, threshold, band, meta["class_names"])
    summary = summarise(files, rows, meta["class_names"])
    summary["faces_found_by"] = args.finder if meta.get("faces") == "mtcnn" else "whole image"
    try:
        write_predictions(args.csv, rows)
        if args.json:
            write_json(args.json, rows, summary, meta, threshold, band)
        if names:
            save_annotated(rows, names, meta["class_names"], args.workers)
    except OSError as exc:  # a disk that filled up, a folder removed meanwhile
        print(f"error: writing the results failed: {exc}", file=sys.stderr)
        return 2
    print_summary(args, summary, meta, threshold, band, len(files) / seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
