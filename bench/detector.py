"""Face finders on this machine, per source and on several-face photos: common.FaceDetector
(MTCNN's nets in ONNX Runtime, the cascade in numpy; or BlazeFace + MTCNN's O-net) against a
reference, by default the MTCNN ONNX finder prepare_data.py and infer.py run (torch: facenet-
pytorch's MTCNN in PyTorch, what common.FaceDetector ran before; a development dependency).

    python bench/detector.py --raw data/raw --per-source 40 --detectors onnx blaze blaze-full \\
        --candidates blaze blaze-full --json results/detector-blazeface.json \\
        --md results/detector-blazeface.md
    python bench/detector.py --raw data/raw --per-source 100 --detectors torch onnx-exact onnx \\
        --reference torch --json results/detector.json --md results/detector-onnx.md

For each source folder under RAW/{real,fake}/: --per-source images (a fixed random sample,
--seed), decoded once. Each detector finds the faces of every image one by one; reported are
the photos with a face (score >= common.FACE_MIN_SCORE, as prepare_data.py and infer.py keep
them), the faces found, the median and 10th percentile IoU of the framing square
(common.face_square from the largest face's landmarks: the crop every stage makes) against
--reference's, and the time a photo takes: wall clock and CPU time (time.process_time: the CPU
this process used, less swayed than the wall clock when other work shares the cores).
Several-face photos: --scenes canvases of 1280 x 960 with 2-4 of the sampled photos pasted at
160-400 px; a face counts as found when its box centre lies in a pasted photo (each photo
once). --candidates: each judged by adoption() (issue 31's rule for a new default finder), the
verdict at the top of --md. Detectors:
  torch        facenet-pytorch MTCNN as common.FaceDetector ran it before
  onnx-exact   common.FaceDetector(min_face_share=0): every pyramid scale, as facenet-pytorch
  onnx         common.FaceDetector() as prepare_data.py and infer.py run it (default settings)
  blaze        common.FaceDetector(finder="blazeface"): BlazeFace short range (128 px), O-net
  blaze-full   the same with BlazeFace full range (192 px)
  auto         common.FaceDetector(finder="auto"): blaze on one-face portraits, onnx on the rest
--threads sets both torch's and ONNX Runtime's threads (default 1: the numbers then say what
one core does, and hold up when other work shares the machine).
"""

import argparse
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    DETECT_MAX_SIDE,
    FACE_MIN_SCORE,
    FaceDetector,
    atomic_write,
    decode_image,
    face_square,
    find_images,
)


class TorchMTCNN:
    """facenet-pytorch's MTCNN exactly as common.FaceDetector ran it before the ONNX port
    (same max_side downscale, score cut, clipping and order)."""

    def __init__(self, threads, min_score=FACE_MIN_SCORE, max_side=DETECT_MAX_SIDE):
        import torch
        from facenet_pytorch import MTCNN

        torch.set_num_threads(threads)
        self.mtcnn = MTCNN(keep_all=True, select_largest=True, device="cpu")
        self.min_score, self.max_side = min_score, max_side

    def __call__(self, rgb):
        h, w = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        size = (round(w * scale), round(h * scale))
        if min(size) < self.mtcnn.min_face_size:
            return []
        if scale < 1:
            rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
        boxes, scores, points = self.mtcnn.detect(rgb, landmarks=True)
        if boxes is None:
            return []
        faces = [{"box": np.clip(b / scale, 0, [w, h, w, h]), "landmarks": p / scale,
                  "score": float(s)} for b, s, p in zip(boxes, scores, points)
                 if s >= self.min_score]  # fmt: skip
        area = lambda f: (f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1])  # noqa: E731
        return sorted(faces, key=lambda f: -area(f))


def scene(photos, rng, size=(1280, 960), sides=(160, 400)):
    """A size canvas (a smooth random background with noise, no face) with each photo pasted
    once, resized to a random side in sides, without overlap: (uint8 array, pasted boxes)."""
    w, h = size
    grad = np.linspace(0, 1, w)[None, :, None] * rng.integers(-60, 60, 3) + rng.integers(60, 190, 3)
    noise = rng.normal(0, 12, (h // 8, w // 8, 3))
    background = np.clip(grad + np.kron(noise, np.ones((8, 8, 1))), 0, 255).astype(np.uint8)
    canvas = Image.fromarray(background).filter(ImageFilter.GaussianBlur(3))
    boxes = []
    for photo in photos:
        for _ in range(100):  # a free spot; small enough canvases always have one
            side = int(rng.integers(*sides))
            x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
            if all(x + side <= b[0] or b[2] <= x or y + side <= b[1] or b[3] <= y for b in boxes):
                break
        else:
            continue
        ph, pw = photo.shape[:2]
        scale = side / max(ph, pw)
        im = Image.fromarray(photo).resize((round(pw * scale), round(ph * scale)), Image.BICUBIC)
        canvas.paste(im, (x, y))
        boxes.append((x, y, x + im.width, y + im.height))
    return np.asarray(canvas), boxes


def square_iou(a, b):
    (ax, ay, s), (bx, by, t) = a, b
    w = max(0.0, min(ax + s, bx + t) - max(ax, bx))
    h = max(0.0, min(ay + s, by + t) - max(ay, by))
    return w * h / (s * s + t * t - w * h)


DETECTORS = {  # name: how to make it, given the threads
    "torch": lambda threads: TorchMTCNN(threads),
    "onnx-exact": lambda threads: FaceDetector(threads=threads, min_face_share=0.0),
    "onnx": lambda threads: FaceDetector(threads=threads),
    "blaze": lambda threads: FaceDetector(threads=threads, finder="blazeface"),
    "blaze-full": lambda threads: FaceDetector(
        threads=threads, finder="blazeface", blazeface="face_detection_full_range"
    ),
    "auto": lambda threads: FaceDetector(threads=threads, finder="auto"),
}


def run_all(detector, images):
    """(faces of every image, {"wall": s, "cpu": s} for them all)."""
    wall, cpu = time.perf_counter(), time.process_time()
    found = [detector(im) for im in images]
    return found, {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def timing(seconds, n):
    return {"photos_per_s": round(n / seconds["wall"], 1),
            "ms_wall": round(1e3 * seconds["wall"] / n, 2),
            "ms_cpu": round(1e3 * seconds["cpu"] / n, 2)}  # fmt: skip


def compare(images, results, reference):
    """Per detector: photos with a face, faces, framing IoU against the reference, time a photo;
    and the IoUs themselves."""
    row, all_ious = {}, {}
    for name, (found, seconds) in results.items():
        ious = [
            square_iou(face_square(a[0]["landmarks"], im.shape[1], im.shape[0]),
                       face_square(b[0]["landmarks"], im.shape[1], im.shape[0]))
            for im, a, b in zip(images, results[reference][0], found) if a and b
        ] if reference in results else []  # fmt: skip
        row[name] = {
            "with_face": sum(bool(f) for f in found),
            "faces": sum(len(f) for f in found),
            "iou_median": round(float(np.median(ious)), 4) if ious else None,
            "iou_p10": round(float(np.percentile(ious, 10)), 4) if ious else None,
            **timing(seconds, len(images)),
        }
        all_ious[name] = ious
    return row, all_ious


def pasted_found(faces, boxes):
    """How many pasted photos hold the centre of a found face (each photo counted once)."""
    hit = set()
    for f in faces:
        cx, cy = (f["box"][0] + f["box"][2]) / 2, (f["box"][1] + f["box"][3]) / 2
        hit.update(k for k, b in enumerate(boxes) if b[0] <= cx <= b[2] and b[1] <= cy <= b[3])
    return len(hit)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--raw", default="data/raw", help="folder with real/ and fake/ sources")
    p.add_argument("--per-source", type=int, default=100, help="images per source (default 100)")
    p.add_argument("--scenes", type=int, default=60, help="several-face photos (default 60)")
    p.add_argument("--seed", type=int, default=0, help="sample and scene seed (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads (1)")
    p.add_argument(
        "--detectors",
        nargs="+",
        choices=list(DETECTORS),
        default=["onnx", "blaze"],
        help="finders to run (default: onnx blaze)",
    )
    p.add_argument(
        "--reference",
        default=None,
        help="the finder IoUs are measured against (default: the first of --detectors)",
    )
    p.add_argument(
        "--candidates",
        nargs="*",
        default=[],
        help="finders to judge by the adoption rule against --reference (adoption())",
    )
    p.add_argument("--note", default="", help="a line for the top of --md (e.g. what else ran)")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--md", default=None, help="write the tables as Markdown here")
    args = p.parse_args(argv)
    args.detectors = list(dict.fromkeys(args.detectors))
    args.reference = args.reference or args.detectors[0]
    if args.reference not in args.detectors:
        p.error(f"--reference {args.reference} is not one of --detectors")
    if not set(args.candidates) <= set(args.detectors) - {args.reference}:
        p.error("--candidates must be among --detectors, other than --reference")
    return args


def adoption(payload, candidate):
    """The rule a finder must pass to replace the reference as the default (issue 31): on every
    source photos with a face >= the reference's minus 1 point and median framing IoU >= 0.95;
    on the several-face photos at least the reference's faces; >= 3x faster (CPU time a photo
    over all sources: the wall clock is reported too). {criterion: {"pass": bool, "detail"}}."""
    ref, verdict = payload["reference"], {}
    short = []
    for r in payload["sources"]:
        c, b = r["detectors"][candidate], r["detectors"][ref]
        points = 100 * (c["with_face"] - b["with_face"]) / r["n"]
        if points < -1 or (c["iou_median"] or 0) < 0.95:
            short.append(f"{r['source']} ({c['with_face']} vs {b['with_face']} of {r['n']}, "
                         f"{points:+.1f} points; IoU {c['iou_median']})")  # fmt: skip
    worst = min(100 * (r["detectors"][candidate]["with_face"] - r["detectors"][ref]["with_face"])
                / r["n"] for r in payload["sources"])  # fmt: skip
    lowest = min(r["detectors"][candidate]["iou_median"] or 0 for r in payload["sources"])
    verdict["per source"] = {
        "pass": not short,
        "detail": f"worst photos-with-a-face difference {worst:+.1f} points, lowest median IoU "
        f"{lowest}" + ("; short on: " + "; ".join(short) if short else ""),
    }
    s = payload["scenes"]["detectors"]
    verdict["several faces"] = {
        "pass": s[candidate]["found"] >= s[ref]["found"],
        "detail": f"{s[candidate]['found']} vs {s[ref]['found']} of {payload['scenes']['pasted']}",
    }
    a, b = payload["all"]["detectors"][candidate], payload["all"]["detectors"][ref]
    speedup = b["ms_cpu"] / a["ms_cpu"]
    verdict["3x faster"] = {
        "pass": speedup >= 3,
        "detail": f"{speedup:.1f}x by CPU time ({a['ms_cpu']} vs {b['ms_cpu']} ms a photo), "
        f"{b['ms_wall'] / a['ms_wall']:.1f}x by wall clock ({a['ms_wall']} vs {b['ms_wall']} ms)",
    }
    return verdict


def markdown(payload):
    ref = payload["reference"]
    names = [ref, *(n for n in payload["sources"][0]["detectors"] if n != ref)]
    head = " | ".join(f"{n} with face / faces" for n in names)
    lines = [payload["note"], ""] if payload.get("note") else []
    for candidate, verdict in payload.get("adoption", {}).items():
        passed = all(v["pass"] for v in verdict.values())
        lines += [
            f"Adoption rule for {candidate} as the default instead of {ref}: "
            + ("PASSES" if passed else "FAILS"),
            "",
        ]
        lines += [
            f"- {k}: {'pass' if v['pass'] else 'FAIL'}: {v['detail']}" for k, v in verdict.items()
        ]
        lines.append("")  # fmt: skip
    lines += [f"| source | n | {head} | IoU median (p10) vs {ref}: " + ", ".join(names[1:])
             + " | ms a photo, wall / CPU: " + ", ".join(names) + " |",
             "|---|---|" + "---|" * len(names) + "---|---|"]  # fmt: skip
    for r in [*payload["sources"], payload["all"]]:
        d = r["detectors"]
        cells = " | ".join(f"{d[n]['with_face']} / {d[n]['faces']}" for n in names)
        ious = ", ".join(f"{d[n]['iou_median']} ({d[n]['iou_p10']})" for n in names[1:])
        ms = ", ".join(f"{d[n]['ms_wall']} / {d[n]['ms_cpu']}" for n in names)
        lines.append(f"| {r['source']} | {r['n']} | {cells} | {ious} | {ms} |")
    s = payload["scenes"]
    lines += ["", f"Several-face photos: {s['n']} canvases of 1280 x 960, {s['pasted']} photos "
              "pasted (2-4 each, 160-400 px); faces found in them / extra faces elsewhere:", ""]  # fmt: skip
    lines += [f"- {n}: {v['found']} / {s['pasted']} found, {v['extra']} extra, "
              f"{v['ms_wall']} ms wall / {v['ms_cpu']} ms CPU a photo" for n, v in s["detectors"].items()]  # fmt: skip
    lines += ["", "Photos per second over all sources (one by one, "
              f"{payload['threads']} thread(s), load average {payload['load_average']} on "
              f"{payload.get('cores')} cores): "
              + ", ".join(f"{n} {payload['all']['detectors'][n]['photos_per_s']}" for n in names)]  # fmt: skip
    if payload.get("command"):
        lines += ["", f"Made by `{payload['command']}`."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    sources = sorted(d for d in Path(args.raw).glob("*/*") if d.is_dir())
    if not sources:
        sys.exit(f"error: no source folders under {args.raw}/real and {args.raw}/fake")
    detectors = {name: DETECTORS[name](args.threads) for name in args.detectors}
    for detector in detectors.values():
        detector(np.zeros((64, 64, 3), np.uint8))  # warm-up
    rng = random.Random(args.seed)
    table, pool, ious = [], [], {name: [] for name in detectors}
    for source in sources:
        files = find_images(source)
        images = [decode_image(f) for f in rng.sample(files, min(args.per_source, len(files)))]
        results = {n: run_all(d, images) for n, d in detectors.items()}
        row, source_ious = compare(images, results, args.reference)
        table.append({"source": f"{source.parent.name}/{source.name}", "n": len(images),
                      "detectors": row})  # fmt: skip
        for name in detectors:
            ious[name] += source_ious[name]
        print(json.dumps(table[-1]), flush=True)
        pool += images
    totals, n_all = {}, sum(r["n"] for r in table)
    for name in detectors:
        rows = [r["detectors"][name] for r in table]
        seconds = {k: sum(r["n"] * d[f"ms_{k}"] / 1e3 for r, d in zip(table, rows))
                   for k in ("wall", "cpu")}  # fmt: skip
        totals[name] = {
            "with_face": sum(d["with_face"] for d in rows),
            "faces": sum(d["faces"] for d in rows),
            "iou_median": round(float(np.median(ious[name])), 4) if ious[name] else None,
            "iou_p10": round(float(np.percentile(ious[name], 10)), 4) if ious[name] else None,
            **timing(seconds, n_all),
        }  # fmt: skip
    scene_rng = np.random.default_rng(args.seed)
    canvases, pasted = [], []
    for _ in range(args.scenes):
        picks = scene_rng.choice(len(pool), int(scene_rng.integers(2, 5)), replace=False)
        canvas, boxes = scene([pool[k] for k in picks], scene_rng)
        canvases.append(canvas)
        pasted.append(boxes)
    scenes = {"n": len(canvases), "pasted": sum(map(len, pasted)), "detectors": {}}
    for name, detector in detectors.items():
        found, seconds = run_all(detector, canvases)
        hits = [pasted_found(f, b) for f, b in zip(found, pasted)]
        scenes["detectors"][name] = {
            "found": sum(hits), "extra": sum(len(f) for f in found) - sum(hits),
            **timing(seconds, len(canvases)),
        }  # fmt: skip
    print(json.dumps(scenes), flush=True)
    payload = {
        "sources": table, "all": {"source": "all", "n": len(pool), "detectors": totals},
        "scenes": scenes, "seed": args.seed, "threads": args.threads,
        "reference": args.reference, "per_source": args.per_source, "note": args.note,
        "command": shlex.join(["python", "bench/detector.py", *(argv or sys.argv[1:])]),
        "cores": os.cpu_count(),
        "settings": {name: {k: getattr(d, k, None) for k in ("finder", "min_face_share", "max_side",
                                                             "blazeface_size")}
                     for name, d in detectors.items() if isinstance(d, FaceDetector)},
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }  # fmt: skip
    payload["adoption"] = {name: adoption(payload, name) for name in args.candidates}
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
