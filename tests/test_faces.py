"""The face front end (common.face_square / stored_crop / model_view / FaceDetector) and what
prepare_data.py and infer.py do with it. Geometry on synthetic landmarks; detection on a few
real faces from ../shared/data/faces (skipped with a reason where that folder is absent)."""

import csv
import random

import numpy as np
import pytest
import torch
from conftest import ROOT, synthetic_image
from PIL import Image

from common import (
    STORE_SCALE,
    VIEW,
    FaceDetector,
    decode_image,
    face_inputs,
    face_square,
    find_images,
    model_view,
    stored_crop,
    stored_size,
)

SHARED = ROOT.parent / "shared" / "data" / "faces"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"{SHARED} is absent: no real faces to detect"
)


def landmarks(eye_y=100.0, left_x=80.0, right_x=120.0, mouth_y=140.0):
    """Five frontal landmarks: eyes, nose, mouth corners (x, y)."""
    cx = (left_x + right_x) / 2
    return np.array([[left_x, eye_y], [right_x, eye_y], [cx, (eye_y + mouth_y) / 2],
                     [cx - 15, mouth_y], [cx + 15, mouth_y]])  # fmt: skip


def test_square_follows_the_landmarks():
    x0, y0, side = face_square(landmarks(), 1000, 1000)
    # eye distance 40, eye-to-mouth 40: side = STORE_SCALE * max(160, 144)
    assert side == pytest.approx(STORE_SCALE * 160)
    # centred on the eye midpoint moved 0.4 of the eye-to-mouth vector toward the mouth
    assert x0 + side / 2 == pytest.approx(100.0)
    assert y0 + side / 2 == pytest.approx(100 + 0.4 * 40)


@pytest.mark.parametrize(
    "pts, width, height",
    [
        (landmarks(eye_y=10, mouth_y=50), 400, 300),  # near the top: shifted down
        (landmarks(left_x=-20, right_x=20), 400, 300),  # off the left edge
        (landmarks(left_x=370, right_x=410, eye_y=280, mouth_y=320), 400, 300),  # bottom right
        (
            landmarks(left_x=0, right_x=300, eye_y=50, mouth_y=250),
            400,
            300,
        ),  # larger than the image
        (landmarks(), 60, 250),  # a narrow image
    ],
)
def test_square_is_clamped_inside_never_padded(pts, width, height):
    x0, y0, side = face_square(pts, width, height)
    assert side <= min(width, height) + 1e-9
    assert -1e-9 <= x0 and x0 + side <= width + 1e-9
    assert -1e-9 <= y0 and y0 + side <= height + 1e-9
    # The crop reads only inside the photo: a photo of one colour gives a crop of that colour.
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 1] = 200
    crop, square = stored_crop(rgb, pts, 40)
    assert crop.shape == (40, 40, 3) and square == (x0, y0, side)
    assert (crop[..., 1] == 200).all() and (crop[..., [0, 2]] == 0).all()


def test_whole_image_mode_is_the_centred_square():
    rgb = np.zeros((100, 200, 3), np.uint8)
    rgb[:, 50:150, 2] = 255  # blue centre square, black side bars
    crop, square = stored_crop(rgb, None, 40)
    assert square == (50.0, 0.0, 100.0) and (crop[:, 1:-1, 2] > 250).all()
    # PIL's filter reads a pixel's worth of the (real, never padded) neighbours at the edges
    assert (crop[:, [0, -1], 2] > 200).all()


def test_model_view_is_the_exact_centre_and_frames_wider_or_tighter():
    stored = np.random.default_rng(0).integers(0, 255, (stored_size(128), stored_size(128), 3))
    stored = stored.astype(np.uint8)
    view = model_view(stored)
    assert stored.shape[0] == 160 and view.shape == (128, 128, 3)
    np.testing.assert_array_equal(view, stored[16:144, 16:144])
    tensor = torch.from_numpy(stored).permute(2, 0, 1)[None]
    np.testing.assert_array_equal(model_view(tensor)[0].permute(1, 2, 0).numpy(), view)
    assert model_view(tensor, 1.25).shape[-2:] == (128, 128)  # the whole stored crop
    assert model_view(tensor, 0.8).shape[-2:] == (128, 128)
    assert round(160 * VIEW) == 128


def sample_faces(count_per_source=2, seed=0):
    rng = random.Random(seed)
    picks = []
    for source in sorted(p for p in SHARED.glob("*/*") if p.is_dir()):
        files = find_images(source)
        picks += [(source.name, f) for f in rng.sample(files, min(count_per_source, len(files)))]
    return picks


@pytest.fixture(scope="module")
def detector():
    return FaceDetector()


@pytest.mark.parametrize("height,width", [(10, 10), (19, 19), (8, 3000), (40, 4000)])
def test_thumbnails_and_thin_panoramas_have_no_face(detector, height, width):
    # MTCNN itself raises on these (no pyramid scale); a folder of photos must go on.
    rgb = np.full((height, width, 3), 128, np.uint8)
    assert detector(rgb) == [] and face_inputs(rgb, 32, detector) == []


@needs_shared
def test_detector_finds_the_face_in_every_source(detector):
    """Aligned 128 px thumbnails, ~105 px crops and 384 px photos alike: one face each, the
    landmarks inside the box, the box inside the photo."""
    missed = []
    for source, path in sample_faces():
        rgb = decode_image(path)
        faces = detector(rgb)
        if not faces:
            missed.append(source)
            continue
        x0, y0, x1, y1 = faces[0]["box"]
        pts = faces[0]["landmarks"]
        assert faces[0]["score"] >= 0.9
        assert (pts[:, 0] > x0 - 2).all() and (pts[:, 0] < x1 + 2).all(), path
        assert (pts[:, 1] > y0 - 2).all() and (pts[:, 1] < y1 + 2).all(), path
    assert not missed, f"no face found in a sample of {missed}"


@needs_shared
def test_no_face_and_several_faces(detector):
    texture = np.asarray(synthetic_image("real", 3, 200))
    assert detector(texture) == [] and face_inputs(texture, 32, detector) == []
    # Two real faces pasted into one photo, one twice the size of the other.
    (_, a), (_, b) = sample_faces(1, seed=3)[:2]
    big, small = Image.open(a).convert("RGB"), Image.open(b).convert("RGB")
    photo = Image.new("RGB", (800, 420), (90, 90, 90))
    photo.paste(big.resize((400, 400)), (10, 10))
    photo.paste(small.resize((200, 200)), (550, 100))
    faces = face_inputs(np.asarray(photo), 32, detector)
    assert len(faces) == 2
    (box0, crop0), (box1, crop1) = faces
    assert box0[2] <= 420 and box1[0] >= 540  # largest first: the big face is face 0
    assert crop0.shape == crop1.shape == (32, 32, 3)


@needs_shared
def test_prepare_records_faces_in_the_manifest(tmp_path):
    """prepare_data.py with MTCNN: box, landmarks, score and crop side per row; a photo with no
    face skipped and counted per source; the stored crop is stored_crop's."""
    import json

    import prepare_data

    picks = sample_faces(3, seed=1)
    real, fake = tmp_path / "real" / "photos", tmp_path / "fake" / "gen"
    for folder in (real, fake):
        folder.mkdir(parents=True)
    for i, (source, path) in enumerate(picks):
        target = real if (SHARED / "real" / source).is_dir() else fake
        (target / f"{source}_{i}{path.suffix}").write_bytes(path.read_bytes())
    synthetic_image("real", 5, 200).save(real / "no_face.png")
    out = tmp_path / "data"
    prepare_data.main(["--real", str(real), "--fake", str(fake), "--out", str(out),
                       "--size", "64", "--workers", "2"])  # fmt: skip
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(picks)  # every face kept, the texture skipped
    summary = json.loads((out / "summary.json").read_text())
    photos = next(s for s in summary["sources"] if s["source"] == "photos")
    assert photos["no_face"] == 1 and summary["faces"] == "mtcnn"
    with open(out / "skipped.csv", newline="") as f:
        assert [r["reason"] for r in csv.DictReader(f)] == ["no face found"]
    for r in rows[:6]:
        pts = np.array(r["landmarks"].split(), dtype=float).reshape(5, 2)
        assert 0.9 <= float(r["face_score"]) <= 1 and int(r["faces"]) >= 1
        assert float(r["face_x0"]) < pts[:, 0].min() and pts[:, 0].max() < float(r["face_x1"])
        rgb = decode_image(r["original"])
        expected, square = stored_crop(rgb, pts, stored_size(64))
        assert float(r["crop_side"]) == pytest.approx(square[2], abs=0.1)
        stored = np.asarray(Image.open(out / r["path"]))
        # The landmarks are stored to 0.01 px: the crop made from them is within a grey level
        assert np.abs(stored.astype(int) - expected).mean() < 3


@needs_shared
def test_infer_rows_per_face_and_no_face(tmp_path, tiny_runs, capsys):
    """A model trained on MTCNN-framed faces: infer.py writes one row per face (largest first),
    a no_face row for a photo without one, an unreadable row for a corrupt file, exit 0."""
    import infer
    from model import load_checkpoint

    _, ckpt = load_checkpoint(tiny_runs["off"] / "best.pt")
    ckpt["faces"] = "mtcnn"
    model_path = tmp_path / "faces.pt"
    torch.save(ckpt, model_path)
    (_, a), (_, b) = sample_faces(1, seed=3)[:2]
    photos = tmp_path / "photos"
    photos.mkdir()
    group = Image.new("RGB", (800, 420), (90, 90, 90))
    group.paste(Image.open(a).convert("RGB").resize((400, 400)), (10, 10))
    group.paste(Image.open(b).convert("RGB").resize((200, 200)), (550, 100))
    group.save(photos / "two.jpg", quality=92)
    synthetic_image("real", 4, 300).save(photos / "landscape.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    huge = Image.new("RGB", (6000, 4000), (120, 110, 100))  # 24 MP, one face in it
    huge.paste(Image.open(a).convert("RGB").resize((1200, 1200)), (3000, 1500))
    huge.save(photos / "huge.jpg", quality=85)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in photos.iterdir()}
    out, saved = tmp_path / "p.csv", tmp_path / "boxed"
    rc = infer.main([str(photos), "--model", str(model_path), "--csv", str(out), "--quiet",
                     "--save", str(saved), "--json", str(tmp_path / "p.json")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in photos.iterdir()} == before
    assert sorted(p.name for p in (saved / "photos").iterdir()) == [
        "huge.jpg.jpg", "landscape.png.jpg", "two.jpg.jpg"
    ]  # fmt: skip
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    by_status = {}
    for r in rows:
        by_status.setdefault(r["status"], []).append(r)
    assert [r["path"] for r in by_status["unreadable"]] == [str(photos / "broken.jpg")]
    assert [r["path"] for r in by_status["no_face"]] == [str(photos / "landscape.png")]
    assert by_status["no_face"][0]["prob_fake"] == "" and by_status["no_face"][0]["label"] == ""
    faces = [r for r in by_status["ok"] if r["path"] == str(photos / "two.jpg")]
    assert [r["face"] for r in faces] == ["0", "1"]
    area = [(float(r["x1"]) - float(r["x0"])) * (float(r["y1"]) - float(r["y0"])) for r in faces]
    assert area[0] > area[1] and all(r["label"] in ("real", "fake", "unsure") for r in faces)
    (big,) = [r for r in by_status["ok"] if r["path"] == str(photos / "huge.jpg")]
    assert 2900 < float(big["x0"]) < float(big["x1"]) < 4300  # found at full-photo coordinates
    assert "3 faces" in err and "1 without a face" in err and "1 unreadable" in err
