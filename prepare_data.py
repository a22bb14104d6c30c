"""Build a clean, leak-free, balanced dataset of face crops from several downloaded sources.

    python prepare_data.py --real data/raw/real/* --fake data/raw/fake/* --out data/faces

Each --real / --fake DIR is one source, named by its folder name. The script
  1. finds images recursively and decodes them robustly (EXIF, any mode -> RGB);
     unusable files are listed with a reason in OUT/skipped.csv;
  2. finds the faces once (MTCNN in ONNX Runtime, common.FaceDetector) and keeps the
     largest face of each image; an image without a face is skipped and counted per source.
     --faces whole treats every image as one face already framed (the centred square);
  3. drops duplicates across ALL sources and both classes: exact (sha256 of the bytes) and
     near (a candidate from any of three perceptual hashes, confirmed by the correlation of
     32 px grey thumbnails), keeping one image per set and dropping a set that carries both
     labels;
  4. groups images (a person folder such as LFW's <source>/<person>/<file>, a person id read
     from the file name with --group SOURCE=REGEX, else the file; near-duplicate sets join
     their groups) and splits groups 70/15/15 so that no group straddles two splits, with
     validation and test exactly balanced real/fake;
  5. writes every face as common.stored_crop makes it (a square from the five landmarks,
     clamped inside the photo, never padded; PNG, so no codec difference survives) and
     OUT/manifest.csv last, with the box, landmarks, detector score and the crop's side in
     source pixels: an interrupted run never leaves a manifest that points at missing files.
     Input folders are only read.
"""

import argparse
import json
import random
import re
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image
from tqdm import tqdm

from common import (
    VIEW,
    BadImage,
    FaceDetector,
    atomic_write,
    decode_image,
    find_images,
    stored_crop,
    stored_size,
    write_csv,
)

MANIFEST_FIELDS = [
    "path", "label", "source", "split", "group", "original", "width", "height", "faces",
    "face_score", "face_x0", "face_y0", "face_x1", "face_y1", "landmarks",
    "crop_x0", "crop_y0", "crop_side",
]  # fmt: skip
# Near-duplicate candidates: a 16x16 DCT hash (256 bits) within 16 bits catches resized and
# re-encoded copies; a 64-bit difference hash within 6 catches slightly shifted copies that
# the DCT hash misses (the StyleGAN-140k pair 1DKCGEETES / 0YYEKMF3GY: pHash-256 30 bits
# apart, dHash 2). On aligned faces those hashes also pair different people with the same
# framing, so a candidate counts only when its 32 px grey thumbnails correlate >= 0.98.
PHASH_SIDE = 16
DHASH_DISTANCE = 6
THUMB_SIDE = 32
_detector = None  # one MTCNN per worker process, made on first use


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--real", nargs="+", metavar="DIR", help="one folder per real-face source")
    p.add_argument("--fake", nargs="+", metavar="DIR", help="one folder per generated-face source")
    p.add_argument("--out", required=True, help="output folder (manifest.csv, images/, ...)")
    p.add_argument(
        "--size",
        type=int,
        default=128,
        help="the model's input side in pixels (default 128); crops are stored at size / "
        f"{VIEW} so that training can frame the face wider or tighter",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument(
        "--faces",
        choices=["mtcnn", "whole"],
        default="mtcnn",
        help="mtcnn: find the face and frame it from its landmarks (default); whole: every "
        "image is already one framed face, use its centred square",
    )
    p.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="SOURCE=REGEX",
        help="the person of a file of SOURCE is REGEX's first group in the file name, e.g. "
        "amfd='-(\\d+)' (repeatable); person folders are used without it",
    )
    p.add_argument("--val", type=float, default=0.15, help="validation share (default 0.15)")
    p.add_argument("--test", type=float, default=0.15, help="test share (default 0.15)")
    p.add_argument(
        "--phash-distance",
        type=int,
        default=16,
        help="max Hamming distance between 256-bit perceptual hashes for a near-duplicate "
        "candidate (default 16; 0 turns near-duplicate removal off)",
    )
    p.add_argument(
        "--min-correlation",
        type=float,
        default=0.98,
        help="a candidate pair is a near-duplicate when its 32 px grey thumbnails correlate "
        "at least this much (default 0.98: different people in one studio setting (amfd) reach 0.96, a shifted copy 0.99)",
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = p.parse_args(argv)
    if not args.real or not args.fake:
        p.error("both --real and --fake need at least one source folder")
    if not 0 < args.val < 0.5 or not 0 < args.test < 0.5 or args.val + args.test >= 1:
        p.error("--val and --test must be in (0, 0.5) and leave room for training")
    return args


def parse_group_rules(specs, sources):
    rules = {}
    for spec in specs:
        name, _, pattern = spec.partition("=")
        if name not in sources:
            sys.exit(
                f"error: --group {spec!r}: no source named {name!r} (sources: {', '.join(sources)})"
            )
        try:
            rules[name] = re.compile(pattern)
        except re.error as exc:
            sys.exit(f"error: --group {spec!r}: not a regular expression ({exc})")
        if rules[name].groups < 1:
            sys.exit(f"error: --group {spec!r}: the pattern needs a (group) for the person")
    return rules


def group_of(source, rel, rules):
    """The split group of a file: a person folder, a person id in the name, else the file."""
    if len(rel.parts) > 1:
        return f"{source}/{rel.parts[0]}"
    if source in rules and (m := rules[source].search(rel.stem)):
        return f"{source}/{m.group(1)}"
    return f"{source}/{rel}"


def image_hashes(rgb):
    """(256-bit DCT hash, 64-bit difference hash, 32 px grey thumbnail) of a decoded image."""
    im = Image.fromarray(rgb)
    phash = np.packbits(imagehash.phash(im, hash_size=PHASH_SIDE).hash.flatten()).view(np.uint64)
    dhash = np.packbits(imagehash.dhash(im).hash.flatten()).view(np.uint64)
    thumb = np.asarray(im.convert("L").resize((THUMB_SIDE, THUMB_SIDE), Image.BILINEAR))
    return phash, dhash, thumb.astype(np.uint8).ravel()


def process_one(job):
    """Worker: hash, decode, find the face, crop and write one image. Never raises."""
    global _detector
    index, path, out_file, size, faces_mode = job
    try:
        import hashlib

        sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        rgb = decode_image(path)
        info = {"sha": sha, "width": rgb.shape[1], "height": rgb.shape[0], "faces": 1}
        info["phash"], info["dhash"], info["thumb"] = image_hashes(rgb)
        landmarks, seconds = None, 0.0
        if faces_mode == "mtcnn":
            if _detector is None:
                # One thread per process: the pool of processes is the parallelism.
                _detector = FaceDetector(threads=1)
            started = time.perf_counter()
            faces = _detector(rgb)
            seconds = time.perf_counter() - started
            info["faces"] = len(faces)
            if not faces:
                return index, {**info, "reason": "no face found", "detect_seconds": seconds}
            face = faces[0]  # the largest
            landmarks = face["landmarks"]
            info.update(
                face_score=round(face["score"], 4),
                box=[round(float(v), 1) for v in face["box"]],
                landmarks=" ".join(f"{v:.2f}" for v in landmarks.ravel()),
            )
        crop, square = stored_crop(rgb, landmarks, size)
        out_file = Path(str(out_file).format(sha=sha[:20]))
        atomic_write(out_file, lambda tmp: Image.fromarray(crop).save(tmp, format="PNG"))
        info.update(out_file=str(out_file), square=[round(v, 2) for v in square])
        return index, {**info, "reason": None, "detect_seconds": seconds}
    except BadImage as exc:
        return index, {"reason": str(exc)}
    except Exception as exc:  # a worker must never take the whole run down
        return index, {"reason": f"unreadable ({type(exc).__name__}: {exc})"}


class UnionFind:
    def __init__(self):
        self.parent = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # smallest key represents: deterministic


def near_duplicate_pairs(hashes, max_distance):
    """Pairs (i, j), i < j, whose hashes differ in at most max_distance bits.
    Brute force in numpy: 7k images is 25M comparisons, a few seconds."""
    h = np.stack(hashes)  # N x words, uint64
    pairs = []
    for start in range(0, len(h), 256):
        block = h[start : start + 256, None, :] ^ h[None, :, :]
        dist = np.bitwise_count(block).sum(axis=2, dtype=np.int32)
        for a, b in zip(*np.nonzero(dist <= max_distance)):
            i, j = start + int(a), int(b)
            if i < j:
                pairs.append((i, j))
    return pairs


def pick_groups(groups, target, rng):
    """Greedy exact fill: walk shuffled groups, take each that still fits under target."""
    order = sorted(groups)
    rng.shuffle(order)
    chosen, total = [], 0
    for key in order:
        if total + groups[key] <= target:
            chosen.append(key)
            total += groups[key]
        if total == target:
            break
    return chosen, total


def split_groups(items, val_share, test_share, seed):
    """items: list of (group, label). Returns {group: split}. Validation and test get
    exactly n per class; every remaining group (the surplus of the majority class too)
    goes to train."""
    sizes = {"real": Counter(), "fake": Counter()}
    for group, label in items:
        sizes[label][group] += 1
    total = len(items)
    assignment = {}
    for split, share in (("test", test_share), ("val", val_share)):
        per_class = min(round(share * total / 2), *(sum(s.values()) for s in sizes.values()))
        # Groups may be too large to hit the target exactly; lower it until both classes can.
        while per_class > 0:
            picks = {}
            for label in ("real", "fake"):
                rng = random.Random(f"{seed}-{split}-{label}")
                picks[label] = pick_groups(sizes[label], per_class, rng)
            reached = min(total_ for _, total_ in picks.values())
            if reached == per_class:
                break
            per_class = reached
        for label in ("real", "fake"):
            for group in picks[label][0]:
                assignment[group] = split
                del sizes[label][group]
    for label in ("real", "fake"):
        for group in sizes[label]:
            assignment[group] = "train"
    return assignment


def print_table(title, header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    for row in [header, *rows]:
        print(
            "  "
            + "  ".join(
                str(x).rjust(w) if i else str(x).ljust(w)
                for i, (x, w) in enumerate(zip(row, widths))
            )
        )


def find_sources(args):
    """[(name, label, dir)] from --real / --fake, checked, and the files of each."""
    sources = []
    for label, dirs in (("real", args.real), ("fake", args.fake)):
        for d in dirs:
            d = Path(d)
            if not d.is_dir():
                sys.exit(f"error: {label} source folder {d} does not exist")
            sources.append((d.name, label, d))
    names = [name for name, _, _ in sources]
    dup_names = sorted({n for n in names if names.count(n) > 1})
    if dup_names:
        sys.exit(f"error: two sources share the folder name {dup_names[0]!r}; rename one")
    rules = parse_group_rules(args.group, names)
    files = []  # dicts: source, label, original, group
    for name, label, d in sources:
        found = find_images(d)
        if not found:
            sys.exit(
                f"error: source {name} ({d}) holds no images (looked for jpg/jpeg/png/webp/bmp/gif)"
            )
        for f in found:
            group = group_of(name, f.relative_to(d), rules)
            files.append({"source": name, "label": label, "original": str(f), "group": group})
    return sources, files


def decode_and_crop(files, out, args):
    """Run process_one over every file in a process pool; each file dict gains its results."""
    jobs = [
        (i, f["original"], out / "images" / f["source"] / "{sha}.png",
         stored_size(args.size), args.faces)
        for i, f in enumerate(files)
    ]  # fmt: skip
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = pool.map(process_one, jobs, chunksize=8)
        desc = "find faces" if args.faces == "mtcnn" else "decode"
        for index, info in tqdm(results, total=len(jobs), desc=desc, unit="img"):
            files[index].update(info)


def duplicate_sets(good, args):
    """Union-find over good files: exact copies (sha256) and confirmed near copies.
    Returns (sets as lists of indices, near-duplicate statistics)."""
    dup_sets = UnionFind()
    first_with_sha = {}
    for i, f in enumerate(good):
        dup_sets.find(i)
        if f["sha"] in first_with_sha:
            dup_sets.union(first_with_sha[f["sha"]], i)
        else:
            first_with_sha[f["sha"]] = i
    stats = {"candidates": 0, "confirmed": 0}
    if args.phash_distance > 0 and len(good) > 1:
        candidates = set(near_duplicate_pairs([f["phash"] for f in good], args.phash_distance))
        candidates |= set(near_duplicate_pairs([f["dhash"] for f in good], DHASH_DISTANCE))
        thumbs = np.stack([f["thumb"] for f in good]).astype(np.float32)
        thumbs -= thumbs.mean(axis=1, keepdims=True)
        thumbs /= np.linalg.norm(thumbs, axis=1, keepdims=True) + 1e-6
        stats["candidates"] = len(candidates)
        for i, j in sorted(candidates):
            if float(thumbs[i] @ thumbs[j]) >= args.min_correlation:
                dup_sets.union(i, j)
                stats["confirmed"] += 1
    members = defaultdict(list)
    for i in range(len(good)):
        members[dup_sets.find(i)].append(i)
    return [members[root] for root in sorted(members)], stats


def keep_one_per_set(good, sets):
    """One image per duplicate set (the first in source/file order); a set carrying both
    labels is dropped whole. Groups touched by one set are merged. Returns (kept, conflicts)."""
    groups = UnionFind()
    kept, conflicts = [], []
    for idx in sets:
        if len({good[i]["label"] for i in idx}) > 1:
            conflicts.append([good[i]["original"] for i in idx])
            for i in idx:
                good[i]["dropped"] = "duplicate set carries both labels"
            continue
        for i in idx:
            groups.union(good[idx[0]]["group"], good[i]["group"])
        kept.append(good[idx[0]])
        for i in idx[1:]:
            good[i]["dropped"] = f"duplicate of {good[idx[0]]['original']}"
    for f in kept:
        f["group"] = groups.find(f["group"])
    return kept, conflicts


def manifest_rows(kept, assignment, out):
    def row(f):
        box = f.get("box", [""] * 4)
        x0, y0, side = f["square"]
        return {
            "path": Path(f["out_file"]).relative_to(out).as_posix(),
            "label": f["label"], "source": f["source"], "split": assignment[f["group"]],
            "group": f["group"], "original": f["original"], "width": f["width"],
            "height": f["height"], "faces": f["faces"], "face_score": f.get("face_score", ""),
            "face_x0": box[0], "face_y0": box[1], "face_x1": box[2], "face_y1": box[3],
            "landmarks": f.get("landmarks", ""), "crop_x0": x0, "crop_y0": y0, "crop_side": side,
        }  # fmt: skip

    return sorted((row(f) for f in kept), key=lambda r: r["path"])


def crop_size_shortcut(rows):
    """How well the face's side in source pixels alone tells the classes apart over all rows
    (ROC-AUC; 0.5 = not at all; the per-source medians are in the summary too). The model sees
    every crop at one size; training's random down-and-up scaling is what keeps it from reading
    the native resolution back out of the pixels, and evaluate.py checks that it does not."""
    from sklearn.metrics import roc_auc_score

    labels = [r["label"] == "fake" for r in rows]
    sides = [VIEW * float(r["crop_side"]) for r in rows]
    auc = roc_auc_score(labels, sides) if 0 < sum(labels) < len(labels) else float("nan")
    return round(float(auc), 4)


def write_reports(out, args, sources, files, good, rows, conflicts, near_stats):
    skipped = [
        {k: f[k] for k in ("original", "source", "label", "reason")} for f in files if f["reason"]
    ]
    duplicates = [
        {**{k: f[k] for k in ("original", "source", "label")}, "reason": f["dropped"]}
        for f in good
        if f.get("dropped")
    ]
    write_csv(out / "skipped.csv", skipped, ["original", "source", "label", "reason"])
    write_csv(out / "duplicates.csv", duplicates, ["original", "source", "label", "reason"])
    per_source = []
    for name, label, _ in sources:
        mine = [f for f in files if f["source"] == name]
        decoded = [f for f in mine if "sha" in f]
        no_face = sum(f["reason"] == "no face found" for f in mine)
        kept = [r for r in rows if r["source"] == name]
        seconds = [f["detect_seconds"] for f in decoded]
        per_source.append({
            "source": name, "label": label, "found": len(mine),
            "unreadable": len(mine) - len(decoded), "no_face": no_face,
            "face_rate": round((len(decoded) - no_face) / max(1, len(decoded)), 4),
            "duplicates": sum(d["source"] == name for d in duplicates), "kept": len(kept),
            "median_view_side_px": round(VIEW * float(np.median([float(r["crop_side"]) for r in kept])), 1) if kept else None,
            "detect_ms_per_image": round(1000 * float(np.mean(seconds)), 1) if seconds else None,
        })  # fmt: skip
    per_split = {
        s: {c: sum(r["split"] == s and r["label"] == c for r in rows) for c in ("real", "fake")}
        for s in ("train", "val", "test")
    }
    summary = {
        "size": args.size, "stored_size": stored_size(args.size), "faces": args.faces,
        "seed": args.seed, "phash_distance": args.phash_distance,
        "dhash_distance": DHASH_DISTANCE, "min_correlation": args.min_correlation,
        "near_duplicates": near_stats, "sources": per_source, "splits": per_split,
        "total_kept": len(rows), "unreadable": sum(s["reason"] != "no face found" for s in skipped),
        "no_face": sum(s["reason"] == "no face found" for s in skipped),
        "duplicates_dropped": len(duplicates),
        "crop_side_auc": crop_size_shortcut(rows) if rows else None,
        "conflicting_duplicate_sets": conflicts,
    }  # fmt: skip
    atomic_write(
        out / "summary.json",
        lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"),
    )
    return summary, skipped


def print_summary(summary, skipped, rows, out, seconds):
    print_table(
        "per source",
        ["source", "class", "found", "unreadable", "no face", "duplicates", "kept", "view px", "ms/img"],
        [[s["source"], s["label"], s["found"], s["unreadable"], s["no_face"], s["duplicates"],
          s["kept"], s["median_view_side_px"], s["detect_ms_per_image"]] for s in summary["sources"]],
    )  # fmt: skip
    print_table(
        "per split",
        ["split", "real", "fake", "total", "share"],
        [[s, c["real"], c["fake"], c["real"] + c["fake"],
          f"{(c['real'] + c['fake']) / max(1, len(rows)):.3f}"] for s, c in summary["splits"].items()],
    )  # fmt: skip
    near = summary["near_duplicates"]
    print(f"\nnear-duplicate candidates {near['candidates']}, confirmed {near['confirmed']}; "
          f"crop side alone tells the classes apart with ROC-AUC {summary['crop_side_auc']}")  # fmt: skip
    if summary["conflicting_duplicate_sets"]:
        print(f"{len(summary['conflicting_duplicate_sets'])} duplicate set(s) carried both labels "
              "and were dropped (see summary.json)")  # fmt: skip
    for s in skipped:
        if s["reason"] != "no face found":
            print(f"skipped {s['original']}: {s['reason']}")
    if summary["no_face"]:
        print(f"{summary['no_face']} image(s) without a face skipped (listed in skipped.csv)")
    print(f"\nwrote {out / 'manifest.csv'} ({len(rows)} images) in {seconds:.1f} s")


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        sys.exit(f"error: --out {out} exists and is not a folder")
    sources, files = find_sources(args)
    decode_and_crop(files, out, args)
    good = [f for f in files if not f["reason"]]
    sets, near_stats = duplicate_sets(good, args)
    kept, conflicts = keep_one_per_set(good, sets)
    assignment = split_groups(
        [(f["group"], f["label"]) for f in kept], args.val, args.test, args.seed
    )
    rows = manifest_rows(kept, assignment, out)
    summary, skipped = write_reports(out, args, sources, files, good, rows, conflicts, near_stats)
    remove_stale_images(out, rows)
    write_csv(out / "manifest.csv", rows, MANIFEST_FIELDS)  # last: it points at written files
    print_summary(summary, skipped, rows, out, time.time() - started)


def remove_stale_images(out, rows):
    wanted = {out / r["path"] for r in rows}
    for stale in (out / "images").rglob("*"):
        if stale.is_file() and stale not in wanted:
            stale.unlink()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C while loading: stop quietly, nothing half-written
        sys.exit("\ninterrupted")
