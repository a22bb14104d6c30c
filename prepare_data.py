"""Build a clean, leak-free, balanced dataset from several downloaded face sources.

    python prepare_data.py --real data/raw/real/* --fake data/raw/fake/* --out data/faces

Each --real / --fake DIR is one source, named by its folder name. The script
  1. finds images recursively and decodes them robustly (EXIF, any mode -> RGB);
     unusable files are listed with a reason in OUT/skipped.csv;
  2. drops duplicates across ALL sources and both classes: exact (sha256 of the bytes)
     and near (perceptual hash within a Hamming distance), keeping one image per set and
     dropping a set that carries both labels;
  3. groups images (a person folder such as LFW's <source>/<person>/<file>, else the file;
     near-duplicate sets join their groups) and splits groups 70/15/15 so that no group
     straddles two splits, with validation and test exactly balanced real/fake;
  4. writes every kept image as a size x size PNG (centred square crop, optional tighter
     per-source crop, antialiased bicubic resize) so no codec difference survives, then
     writes OUT/manifest.csv last: an interrupted run never leaves a manifest that points
     at missing files. Input folders are only read.
"""

import argparse
import json
import random
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
    BadImage,
    atomic_write,
    crop_and_resize,
    decode_image,
    find_images,
    write_csv,
)

MANIFEST_FIELDS = ["path", "label", "source", "split", "group", "original"]
# A 16x16 DCT perceptual hash (256 bits). The common 8x8 one is too coarse for aligned faces:
# on the shared data, 304 pairs of *different* faces lie within 8 of its 64 bits, while with
# 256 bits distinct faces stay >= 30 apart and resized + re-encoded copies within 8.
PHASH_SIDE = 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--real", nargs="+", metavar="DIR", help="one folder per real-face source")
    p.add_argument("--fake", nargs="+", metavar="DIR", help="one folder per generated-face source")
    p.add_argument("--out", required=True, help="output folder (manifest.csv, images/, ...)")
    p.add_argument("--size", type=int, default=128, help="output side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument(
        "--crop",
        action="append",
        default=[],
        metavar="SOURCE=FRACTION",
        help="keep only the centred FRACTION of the short side for SOURCE before resizing, "
        "e.g. lfw=0.62 removes LFW's loose framing and black borders (repeatable; default 1.0)",
    )
    p.add_argument("--val", type=float, default=0.15, help="validation share (default 0.15)")
    p.add_argument("--test", type=float, default=0.15, help="test share (default 0.15)")
    p.add_argument(
        "--phash-distance",
        type=int,
        default=16,
        help="max Hamming distance between 256-bit perceptual hashes for two images to count "
        "as near-duplicates (default 16; 0 turns near-duplicate removal off)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decoding processes (default: all cores)",
    )
    args = p.parse_args(argv)
    if not args.real or not args.fake:
        p.error("both --real and --fake need at least one source folder")
    if not 0 < args.val < 0.5 or not 0 < args.test < 0.5 or args.val + args.test >= 1:
        p.error("--val and --test must be in (0, 0.5) and leave room for training")
    return args


def parse_crops(specs, sources):
    crops = {}
    for spec in specs:
        name, _, value = spec.partition("=")
        try:
            fraction = float(value)
        except ValueError:
            sys.exit(f"error: --crop {spec!r}: expected SOURCE=FRACTION, e.g. lfw=0.62")
        if name not in sources:
            sys.exit(
                f"error: --crop {spec!r}: no source named {name!r} (sources: {', '.join(sources)})"
            )
        if not 0.1 <= fraction <= 1.0:
            sys.exit(f"error: --crop {spec!r}: fraction must be in [0.1, 1]")
        crops[name] = fraction
    return crops


def process_one(job):
    """Worker: hash, decode, perceptual-hash, crop/resize and write one image."""
    index, path, out_file, size, crop = job
    try:
        import hashlib

        content = Path(path).read_bytes()
        sha = hashlib.sha256(content).hexdigest()
        rgb = decode_image(path)
        bits = imagehash.phash(Image.fromarray(rgb), hash_size=PHASH_SIDE).hash
        phash = np.packbits(bits.flatten()).view(np.uint64)
        small = crop_and_resize(rgb, size, crop)
        out_file = Path(str(out_file).format(sha=sha[:20]))
        atomic_write(out_file, lambda tmp: Image.fromarray(small).save(tmp, format="PNG"))
        return index, sha, phash, str(out_file), None
    except BadImage as exc:
        return index, None, None, None, str(exc)
    except Exception as exc:  # a worker must never take the whole run down
        return index, None, None, None, f"unreadable ({type(exc).__name__}: {exc})"


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


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        sys.exit(f"error: --out {out} exists and is not a folder")

    # 1. Sources and their files.
    sources = []  # (name, label, dir)
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
    crops = parse_crops(args.crop, names)

    files = []  # dicts: source, label, original, group
    for name, label, d in sources:
        found = find_images(d)
        if not found:
            sys.exit(
                f"error: source {name} ({d}) holds no images (looked for jpg/jpeg/png/webp/bmp/gif)"
            )
        for f in found:
            rel = f.relative_to(d)
            # <source>/<person>/<file> -> the person is the group (LFW); else the file is.
            group = f"{name}/{rel.parts[0]}" if len(rel.parts) > 1 else f"{name}/{rel}"
            files.append({"source": name, "label": label, "original": str(f), "group": group})

    # 2. Decode, hash and write in a process pool.
    images_dir = out / "images"
    jobs = [
        (
            i,
            f["original"],
            images_dir / f["source"] / "{sha}.png",
            args.size,
            crops.get(f["source"], 1.0),
        )
        for i, f in enumerate(files)
    ]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(
            tqdm(
                pool.map(process_one, jobs, chunksize=16),
                total=len(jobs),
                desc="decode",
                unit="img",
            )
        )
    skipped = []
    for index, sha, phash, out_file, reason in results:
        files[index].update(sha=sha, phash=phash, out_file=out_file, reason=reason)
        if reason:
            skipped.append(
                {
                    "original": files[index]["original"],
                    "source": files[index]["source"],
                    "label": files[index]["label"],
                    "reason": reason,
                }
            )
    good = [f for f in files if not f["reason"]]

    # 3. Duplicate sets: exact (same bytes) and near (perceptual hash), across everything.
    dup_sets = UnionFind()
    first_with_sha = {}
    for i, f in enumerate(good):
        dup_sets.find(i)
        if f["sha"] in first_with_sha:
            dup_sets.union(first_with_sha[f["sha"]], i)
        else:
            first_with_sha[f["sha"]] = i
    if args.phash_distance > 0:
        for i, j in near_duplicate_pairs([f["phash"] for f in good], args.phash_distance):
            dup_sets.union(i, j)
    members = defaultdict(list)
    for i in range(len(good)):
        members[dup_sets.find(i)].append(i)

    groups = UnionFind()  # over group keys; duplicate sets merge the groups they touch
    kept, conflicts = [], []
    for root in sorted(members):
        idx = members[root]
        labels = {good[i]["label"] for i in idx}
        for i in idx[1:]:
            good[i]["duplicate_of"] = good[idx[0]]["original"]
        if len(labels) > 1:
            conflicts.append([good[i]["original"] for i in idx])
            for i in idx:
                good[i]["dropped"] = "duplicate set carries both labels"
            continue
        for i in idx:
            groups.union(good[idx[0]]["group"], good[i]["group"])
        kept.append(good[idx[0]])  # the first in sorted source/file order
        for i in idx[1:]:
            good[i]["dropped"] = f"duplicate of {good[idx[0]]['original']}"

    # 4. Split by group, val and test exactly balanced.
    for f in kept:
        f["group"] = groups.find(f["group"])
    assignment = split_groups(
        [(f["group"], f["label"]) for f in kept], args.val, args.test, args.seed
    )
    rows = sorted(
        (
            {
                "path": Path(f["out_file"]).relative_to(out).as_posix(),
                "label": f["label"],
                "source": f["source"],
                "split": assignment[f["group"]],
                "group": f["group"],
                "original": f["original"],
            }
            for f in kept
        ),
        key=lambda r: r["path"],
    )

    # 5. Reports, stale-file cleanup, then the manifest last.
    duplicates = [
        {
            "original": f["original"],
            "source": f["source"],
            "label": f["label"],
            "reason": f["dropped"],
        }
        for f in good
        if f.get("dropped")
    ]
    write_csv(out / "skipped.csv", skipped, ["original", "source", "label", "reason"])
    write_csv(out / "duplicates.csv", duplicates, ["original", "source", "label", "reason"])
    per_source = []
    for name, label, _ in sources:
        per_source.append(
            {
                "source": name,
                "label": label,
                "found": sum(f["source"] == name for f in files),
                "unreadable": sum(s["source"] == name for s in skipped),
                "duplicates": sum(d["source"] == name for d in duplicates),
                "kept": sum(r["source"] == name for r in rows),
                "crop": crops.get(name, 1.0),
            }
        )
    per_split = {
        s: {c: sum(r["split"] == s and r["label"] == c for r in rows) for c in ("real", "fake")}
        for s in ("train", "val", "test")
    }
    summary = {
        "size": args.size,
        "seed": args.seed,
        "phash_distance": args.phash_distance,
        "sources": per_source,
        "splits": per_split,
        "total_kept": len(rows),
        "unreadable": len(skipped),
        "duplicates_dropped": len(duplicates),
        "conflicting_duplicate_sets": conflicts,
    }
    atomic_write(
        out / "summary.json",
        lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"),
    )
    wanted = {out / r["path"] for r in rows}
    for stale in images_dir.rglob("*"):
        if stale.is_file() and stale not in wanted:
            stale.unlink()
    write_csv(out / "manifest.csv", rows, MANIFEST_FIELDS)

    print_table(
        "per source",
        ["source", "class", "found", "unreadable", "duplicates", "kept"],
        [
            [
                s["source"],
                s["label"],
                s["found"],
                s["unreadable"],
                s["duplicates"],
                s["kept"],
            ]
            for s in per_source
        ],
    )
    print_table(
        "per split",
        ["split", "real", "fake", "total", "share"],
        [
            [
                s,
                c["real"],
                c["fake"],
                c["real"] + c["fake"],
                f"{(c['real'] + c['fake']) / max(1, len(rows)):.3f}",
            ]
            for s, c in per_split.items()
        ],
    )
    if conflicts:
        print(
            f"\n{len(conflicts)} duplicate set(s) carried both labels and were dropped (see summary.json)"
        )
    for s in skipped:
        print(f"skipped {s['original']}: {s['reason']}")
    print(f"\nwrote {out / 'manifest.csv'} ({len(rows)} images) in {time.time() - started:.1f} s")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C while loading: stop quietly, nothing half-written
        sys.exit("\ninterrupted")
