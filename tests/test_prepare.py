"""prepare_data.py and the shared decoding in common.py, on synthetic images only."""

import csv
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from collections import Counter, defaultdict

import numpy as np
import pytest
from conftest import ROOT, synthetic_image, write_source
from PIL import Image

import prepare_data
from common import BadImage, decode_image, find_images, load_image


def read_rows(out):
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def tree_digest(root):
    """sha256 over every file's relative path, bytes and mtime: 'untouched' means equal."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            h.update(os.path.relpath(p, root).encode())
            h.update(str(st.st_mtime_ns).encode())
            if os.path.isfile(p) and not os.path.islink(p):
                h.update(open(p, "rb").read())
    return h.hexdigest()


def png_bomb(path, side=100_000):
    """A tiny PNG whose header claims side x side pixels."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def write_awkward_and_hostile(folder):
    """Good-but-awkward files and hostile files; returns (awkward names, hostile names)."""
    folder.mkdir(parents=True, exist_ok=True)
    # A different picture per file: the same picture twice would be (rightly) deduplicated.
    pictures = (synthetic_image("real", 70 + i, 64) for i in range(20))
    next(pictures).convert("L").save(folder / "gray.png")
    rgba = next(pictures).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    next(pictures).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    gray16 = np.asarray(next(pictures).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(gray16).save(folder / "deep16.png")
    next(pictures).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.gif")
    next(pictures).save(folder / "plain.bmp")
    next(pictures).save(folder / "plain.webp", lossless=True)
    next(pictures).save(folder / "UPPER.JPG", quality=90)
    next(pictures).save(folder / "gesicht_ü_顔.png")
    wide = next(pictures).resize((96, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    wide.save(folder / "rotated.jpg", exif=exif, quality=95)
    awkward = ["gray.png", "rgba.png", "cmyk.jpg", "deep16.png", "palette.gif", "plain.bmp",
               "plain.webp", "UPPER.JPG", "gesicht_ü_顔.png", "rotated.jpg"]  # fmt: skip

    (folder / "empty.jpg").write_bytes(b"")
    good = io.BytesIO()
    next(pictures).save(good, format="JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 3])
    (folder / "page.jpg").write_text("<!DOCTYPE html><html><body>Not Found</body></html>")
    (folder / "notes.png").write_text("just some text, not a picture")
    png_bomb(folder / "bomb.png")
    hostile = ["empty.jpg", "truncated.jpg", "page.jpg", "notes.png", "bomb.png"]
    return awkward, hostile


# --- decoding -------------------------------------------------------------------------


def test_awkward_formats_decode_to_rgb(tmp_path):
    awkward, hostile = write_awkward_and_hostile(tmp_path)
    for name in awkward:
        rgb = decode_image(tmp_path / name)
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3, name
    # EXIF orientation 6 turns the stored 96 x 48 image upright to 48 wide x 96 high.
    assert decode_image(tmp_path / "rotated.jpg").shape[:2] == (96, 48)
    # 16-bit gray is scaled, not clipped to white.
    deep = decode_image(tmp_path / "deep16.png")
    expected = np.asarray(synthetic_image("real", 73, 64).convert("L"))
    assert np.abs(deep[..., 0].astype(int) - expected).max() <= 1
    for name in hostile:
        with pytest.raises(BadImage):
            decode_image(tmp_path / name)


def test_hostile_reasons_are_specific(tmp_path):
    write_awkward_and_hostile(tmp_path)
    reasons = {}
    for name in ["empty.jpg", "truncated.jpg", "page.jpg", "bomb.png"]:
        with pytest.raises(BadImage) as exc:
            decode_image(tmp_path / name)
        reasons[name] = str(exc.value)
    assert "empty" in reasons["empty.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "HTML" in reasons["page.jpg"]
    assert "bomb" in reasons["bomb.png"]


def test_crop_policy_is_centred_square(tmp_path):
    im = Image.new("RGB", (200, 100), (255, 0, 0))
    im.paste((0, 0, 255), (50, 0, 150, 100))  # blue centre square, red side bars
    im.save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", 32)
    assert out.shape == (32, 32, 3)
    assert out[:, :, 2].min() > 200 and out[:, :, 0].max() < 60  # only the blue centre is left


def test_find_images_survives_symlink_loop(tmp_path):
    write_source(tmp_path / "src", "real", 3, 0)
    (tmp_path / "src" / "loop").symlink_to(tmp_path / "src", target_is_directory=True)
    found = find_images(tmp_path / "src")
    assert len(found) == 3


# --- the dataset ----------------------------------------------------------------------


def test_split_shares_balance_and_groups(prepared):
    rows = read_rows(prepared)
    n = len(rows)
    counts = Counter((r["split"], r["label"]) for r in rows)
    for split in ("val", "test"):
        assert counts[(split, "real")] == counts[(split, "fake")] > 0
        share = (counts[(split, "real")] + counts[(split, "fake")]) / n
        assert abs(share - 0.15) <= 0.03
    train_share = (counts[("train", "real")] + counts[("train", "fake")]) / n
    assert abs(train_share - 0.70) <= 0.04
    splits_of_group = defaultdict(set)
    for r in rows:
        splits_of_group[r["group"]].add(r["split"])
        assert (prepared / r["path"]).is_file()
    assert all(len(s) == 1 for s in splits_of_group.values())
    people = {r["group"] for r in rows if r["source"] == "people"}
    assert len(people) == 12  # person folders are the groups of that source


def test_output_images_are_uniform_png(prepared):
    rows = read_rows(prepared)
    for r in rows[:20]:
        with Image.open(prepared / r["path"]) as im:
            assert im.format == "PNG" and im.size == (40, 40) and im.mode == "RGB"


def test_same_seed_same_manifest_bytes(raw_tree, prepared, tmp_path):
    args = ["--real", str(raw_tree / "real" / "camera"), str(raw_tree / "real" / "people"),
            "--fake", str(raw_tree / "fake" / "ganA"), str(raw_tree / "fake" / "ganB"),
            "--size", "32", "--faces", "whole", "--workers", "1"]  # fmt: skip
    prepare_data.main(args + ["--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "manifest.csv").read_bytes() == (
        prepared / "manifest.csv"
    ).read_bytes()
    prepare_data.main(args + ["--out", str(tmp_path / "other"), "--seed", "1"])
    assert (tmp_path / "other" / "manifest.csv").read_bytes() != (
        prepared / "manifest.csv"
    ).read_bytes()


def test_rerun_into_same_folder_is_safe(raw_tree, tmp_path):
    args = ["--real", str(raw_tree / "real" / "camera"), "--fake", str(raw_tree / "fake" / "ganA"),
            "--out", str(tmp_path / "out"), "--size", "32", "--faces", "whole", "--workers", "1"]  # fmt: skip
    prepare_data.main(args)
    first = (tmp_path / "out" / "manifest.csv").read_bytes()
    prepare_data.main(args)
    assert (tmp_path / "out" / "manifest.csv").read_bytes() == first
    files = {
        p.relative_to(tmp_path / "out").as_posix()
        for p in (tmp_path / "out" / "images").rglob("*")
        if p.is_file()
    }
    assert files == {r["path"] for r in read_rows(tmp_path / "out")}


def test_duplicates_across_sources_and_classes(tmp_path):
    raw = tmp_path / "raw"
    originals = write_source(raw / "real" / "orig", "real", 40, 100, size=96)
    write_source(raw / "fake" / "gan", "fake", 40, 500, size=96)
    # Resized + re-encoded copies of 12 originals in another real source, an exact copy of
    # one, and 3 copies in the fake class (a duplicate set with both labels).
    copies = raw / "real" / "copies"
    copies.mkdir(parents=True)
    for i, p in enumerate(originals[:12]):
        Image.open(p).resize((72, 72), Image.Resampling.BILINEAR).save(
            copies / f"c{i}.jpg", quality=70
        )
    (copies / "exact.png").write_bytes(originals[20].read_bytes())
    for i, p in enumerate(originals[30:33]):
        Image.open(p).resize((80, 80)).save(raw / "fake" / "gan" / f"stolen{i}.jpg", quality=80)
    before = tree_digest(raw)
    out = tmp_path / "out"
    prepare_data.main(["--real", str(raw / "real" / "orig"), str(copies), "--fake", str(raw / "fake" / "gan"),
                       "--out", str(out), "--size", "32", "--faces", "whole", "--workers", "2"])  # fmt: skip
    assert tree_digest(raw) == before  # inputs untouched
    rows = read_rows(out)
    kept_copies = [r for r in rows if r["source"] == "copies"]
    assert (
        len(kept_copies) <= 1
    )  # 13 copies: all caught (one may survive if it is the first of its set)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["conflicting_duplicate_sets"]) == 3
    originals_kept = {r["original"] for r in rows}
    for p in originals[30:33]:
        assert str(p) not in originals_kept  # both labels in the set: dropped
    assert not any("stolen" in r["original"] for r in rows)


def test_hostile_and_awkward_sources(tmp_path):
    raw = tmp_path / "raw"
    awkward, hostile = write_awkward_and_hostile(raw / "real" / "mixed")
    write_source(raw / "fake" / "gan", "fake", 30, 900)
    before = tree_digest(raw)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "prepare_data.py"), "--real", str(raw / "real" / "mixed"),
         "--fake", str(raw / "fake" / "gan"), "--out", str(out), "--size", "32", "--faces", "whole", "--workers", "1"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert tree_digest(raw) == before
    with open(out / "skipped.csv", newline="") as f:
        skipped = {os.path.basename(r["original"]): r["reason"] for r in csv.DictReader(f)}
    assert set(skipped) == set(hostile)
    for name in hostile:
        assert name in result.stdout
    kept = {os.path.basename(r["original"]) for r in read_rows(out)}
    assert set(awkward) <= kept


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "does not exist"),
        ("empty_source", "holds no images"),
        ("no_fake", "both --real and --fake"),
        ("out_is_file", "not a folder"),
    ],
)
def test_errors_are_one_line(tmp_path, case, expected):
    real = tmp_path / "real"
    write_source(real, "real", 3, 0)
    fake = tmp_path / "fake"
    write_source(fake, "fake", 3, 50)
    out = tmp_path / "out"
    args = [
        "--real",
        str(real),
        "--fake",
        str(fake),
        "--out",
        str(out),
        "--size",
        "32",
        "--faces",
        "whole",
    ]
    if case == "missing":
        args[3] = str(tmp_path / "nope")
    elif case == "empty_source":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "readme.txt").write_text("no images here")
        args[3] = str(tmp_path / "empty")
    elif case == "no_fake":
        args = ["--real", str(real), "--out", str(out)]
    elif case == "out_is_file":
        out.write_text("I am a file")
    result = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), *args],
                            capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "manifest.csv").exists()


def test_make_prepare_groups_amfd_only_where_there_is_one(raw_tree, tmp_path):
    # `make all RAW=some/tree` must run on a tree without AMFD: prepare_data.py refuses a
    # --group for a source it was not given.
    def prepare_command(raw):
        out = subprocess.run(["make", "-n", "-s", "prepare", f"RAW={raw}", "PY=python"],
                             capture_output=True, text=True, cwd=ROOT, check=True)  # fmt: skip
        return [ln for ln in out.stdout.splitlines() if "prepare_data.py" in ln][0]

    assert "--group" not in prepare_command(raw_tree)
    (tmp_path / "real" / "amfd").mkdir(parents=True)
    (tmp_path / "fake").mkdir()
    assert "--group 'amfd=-(\\d+)'" in prepare_command(tmp_path)


def test_manifest_hash_follows_the_splits_not_the_face_boxes(tmp_path):
    # The same photos prepared on another CPU: face boxes a fraction of a pixel apart, the same
    # split. The checkpoint's tie to its data must hold there and break when a split moves.
    from common import manifest_hash

    header = "path,label,source,split,group,face_x0,crop_side\n"
    rows = [
        "images/a/1.png,real,a,train,a/1,31.20,232.78",
        "images/b/2.png,fake,b,test,b/2,5.00,90.10",
    ]
    (tmp_path / "manifest.csv").write_text(header + "\n".join(rows) + "\n")
    first = manifest_hash(tmp_path)
    (tmp_path / "manifest.csv").write_text(
        header + rows[0].replace("31.20", "31.21") + "\n" + rows[1] + "\n"
    )
    assert manifest_hash(tmp_path) == first
    (tmp_path / "manifest.csv").write_text(
        header + rows[0].replace("train", "test") + "\n" + rows[1] + "\n"
    )
    assert manifest_hash(tmp_path) != first
