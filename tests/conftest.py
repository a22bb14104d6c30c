"""Shared fixtures: synthetic images drawn with PIL at test time (no real faces), a tiny
prepared dataset and two tiny trained runs (attention on / off) that later stages reuse."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def synthetic_image(kind, seed, size=64):
    """A random texture with shapes. 'fake' images carry a periodic stripe pattern (a
    stand-in for generator artefacts, coarse enough to survive a 2x downscale), so the
    classes are learnable."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, size=3)
    grad = np.linspace(0, 1, size)[None, :, None] * rng.integers(-40, 40, size=3)
    arr = np.clip(base + grad + rng.normal(0, 6, (size, size, 3)), 0, 255)
    if kind == "fake":
        yy, xx = np.mgrid[0:size, 0:size]
        stripes = np.sin(2 * np.pi * (yy + xx) * size / 64 / 8.0)
        arr = np.clip(arr + 30 * stripes[..., None], 0, 255)
    im = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        x0, y0 = rng.integers(0, size // 2, 2)
        x1, y1 = np.array([x0, y0]) + rng.integers(8, size // 2, 2)
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x1, y1], fill=color)
        else:
            draw.rectangle([x0, y0, x1, y1], fill=color)
    return im


def write_source(folder, kind, count, seed0, size=64, fmt="PNG", people=None):
    """count images of one class into folder; with people=k, into k person sub-folders."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        sub = folder / f"person_{i % people:02d}" if people else folder
        sub.mkdir(parents=True, exist_ok=True)
        ext = "png" if fmt == "PNG" else "jpg"
        path = sub / f"img_{i:03d}.{ext}"
        synthetic_image(kind, seed0 + i, size).save(
            path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {})
        )
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def raw_tree(tmp_path_factory):
    """raw/{real,fake}/<source>/: a flat real source, a person-folder real source (LFW-like)
    and two fake sources. 150 real, 90 fake images."""
    raw = tmp_path_factory.mktemp("raw")
    write_source(raw / "real" / "camera", "real", 90, 1000)
    write_source(raw / "real" / "people", "real", 60, 2000, people=12, fmt="JPEG")
    write_source(raw / "fake" / "ganA", "fake", 50, 3000)
    write_source(raw / "fake" / "ganB", "fake", 40, 4000, fmt="JPEG", size=80)
    return raw


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, raw_tree):
    import prepare_data

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_data.main([
        "--real", str(raw_tree / "real" / "camera"), str(raw_tree / "real" / "people"),
        "--fake", str(raw_tree / "fake" / "ganA"), str(raw_tree / "fake" / "ganB"),
        "--out", str(out), "--size", "32", "--faces", "whole", "--workers", "2",
    ])  # fmt: skip
    return out


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, prepared):
    """Two-epoch runs of both variants on the tiny dataset: {"on": dir, "off": dir}."""
    import train

    runs = {}
    for attention in ("off", "on"):
        out = tmp_path_factory.mktemp("runs") / f"attention-{attention}"
        train.main([
            "--data", str(prepared), "--out", str(out), "--attention", attention,
            "--epochs", "2", "--batch-size", "16", "--workers", "0", "--seed", "0",
        ])  # fmt: skip
        runs[attention] = out
    return runs
