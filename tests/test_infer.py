"""infer.py on synthetic folders: awkward formats, hostile files, CSV, exit codes, model files."""

import csv
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import ROOT, synthetic_image, write_source
from onnx import TensorProto, helper
from PIL import Image

import backends
import export
import infer
from model import deployment_metadata, load_checkpoint

AWKWARD = ["gray.png", "rgba.png", "cmyk.jpg", "sixteen_bit.png", "palette.png",
           "exif_rotated.jpg", "wide.jpg", "лицо_é😀.png", "nested/deeper/plain.jpg"]  # fmt: skip
HOSTILE = {"empty.jpg": "empty file", "truncated.jpg": "truncated", "page.jpg": "HTML",
           "notes.png": "not an image", "bomb.png": "pixels"}  # fmt: skip


def png_claiming(width, height):
    """A PNG whose header claims width x height pixels, with almost no data behind it."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    (root / "nested" / "deeper").mkdir(parents=True)
    base = synthetic_image("real", 1, 64)
    base.convert("L").save(root / "gray.png")
    rgba = synthetic_image("fake", 2, 64).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((64, 64)))
    rgba.save(root / "rgba.png")
    synthetic_image("fake", 3, 64).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    sixteen = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(sixteen).save(root / "sixteen_bit.png")
    palette = synthetic_image("real", 4, 64).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    palette.save(root / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    synthetic_image("fake", 5, 64).resize((80, 48)).save(root / "exif_rotated.jpg", exif=exif)
    synthetic_image("real", 6, 64).resize((200, 70)).save(root / "wide.jpg")
    synthetic_image("fake", 7, 64).save(root / "лицо_é😀.png")
    synthetic_image("real", 8, 64).save(root / "nested" / "deeper" / "plain.jpg")

    (root / "empty.jpg").write_bytes(b"")
    jpeg = io.BytesIO()
    synthetic_image("real", 9, 64).save(jpeg, "JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "page.jpg").write_text("<!DOCTYPE html><html><body>not a photo</body></html>")
    (root / "notes.png").write_text("just some text\n")
    (root / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    (root / "readme.txt").write_text("not an image extension: ignored when walking")
    return root


@pytest.fixture(scope="module")
def models(tiny_runs, tmp_path_factory):
    """The tiny attention-on run as .pt and as .onnx."""
    pt = tiny_runs["on"] / "best.pt"
    model, ckpt = load_checkpoint(pt)
    onnx_path = tmp_path_factory.mktemp("models") / "facecheck.onnx"
    export.export_onnx(model, onnx_path, deployment_metadata(ckpt))
    return {
        "pt": pt,
        "onnx": onnx_path,
        "threshold": ckpt["threshold"],
        "band": ckpt["unsure_band"],
    }


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def run(args, capsys):
    rc = infer.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_folder_with_awkward_and_hostile_files(folder, models, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    rc, _, err = run(
        [folder, "--model", models["onnx"], "--csv", out, "--batch", "4", "--workers", "3"], capsys
    )
    assert rc == 0
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before  # inputs untouched
    with open(out, encoding="utf-8") as f:
        assert f.readline().strip() == "path,face,x0,y0,x1,y1,prob_fake,label,status"
    rows = read_csv(out)
    ok = [r for r in rows if r["status"] == "ok"]
    assert sorted(r["path"] for r in ok) == sorted(str(folder / name) for name in AWKWARD)
    for row in ok:  # a model trained on whole images: one "face" per image, face 0
        prob = float(row["prob_fake"])
        assert row["face"] == "0" and float(row["x1"]) > float(row["x0"])
        expected = infer.decision(prob, models["threshold"], models["band"])
        assert 0 <= prob <= 1 and row["label"] == expected
    unreadable = {r["path"]: r for r in rows if r["status"] == "unreadable"}
    assert set(unreadable) == {str(folder / name) for name in HOSTILE}
    assert all(r["prob_fake"] == r["label"] == "" for r in unreadable.values())  # no guess
    for name, reason in HOSTILE.items():
        line = next(
            line for line in err.splitlines() if line.startswith(f"skipped {folder / name}")
        )
        assert reason.lower() in line.lower()
    assert "Traceback" not in err and f"{len(AWKWARD)} faces" in err and "images/s" in err
    assert f"{len(HOSTILE)} unreadable" in err


def test_pt_and_onnx_agree(folder, models, tmp_path, capsys):
    probs = {}
    for kind in ("pt", "onnx"):
        out = tmp_path / f"{kind}.csv"
        assert run([folder, "--model", models[kind], "--csv", out, "--quiet"], capsys)[0] == 0
        probs[kind] = {r["path"]: float(r["prob_fake"]) for r in read_csv(out) if r["prob_fake"]}
    assert probs["pt"].keys() == probs["onnx"].keys() and len(probs["pt"]) == len(AWKWARD)
    assert max(abs(probs["pt"][p] - probs["onnx"][p]) for p in probs["pt"]) <= 1e-4


def test_single_files_to_stdout_with_threshold(folder, models, capsys):
    files = [folder / "wide.jpg", folder / "лицо_é😀.png", folder / "notes.png"]
    rc, out, err = run(
        [*files, "--model", models["onnx"], "--csv", "-", "--threshold", "0", "--quiet"], capsys
    )
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and [r["path"] for r in rows] == [str(f) for f in files]
    assert [r["status"] for r in rows] == ["ok", "ok", "unreadable"]
    assert all(r["label"] == "fake" for r in rows[:2]) and "skipped" in err


def test_decoding_is_training_preprocessing(folder, models, tmp_path):
    """classify() sees exactly the pixels prepare_data.py stores, framed as training frames them:
    the same probabilities as the model on model_view of the stored crops."""
    import prepare_data
    from common import model_view, read_manifest, to_model_input

    run_model, meta = infer.load_model(models["pt"])
    files = [folder / name for name in AWKWARD]
    rows = infer.classify(run_model, files, meta["image_size"], batch=3, workers=2)
    assert [r["path"] for r in rows] == files and {r["status"] for r in rows} == {"ok"}
    # The same files through prepare_data.py (its own stored crops, written as PNG).
    real, fake = tmp_path / "raw" / "real" / "mine", tmp_path / "raw" / "fake" / "other"
    real.mkdir(parents=True)
    for i, f in enumerate(files):
        (real / f"{i:02d}{f.suffix}").write_bytes(f.read_bytes())
    write_source(fake, "fake", 20, 7000)
    prepare_data.main(["--real", str(real), "--fake", str(fake), "--out", str(tmp_path / "d"),
                       "--size", str(meta["image_size"]), "--faces", "whole", "--workers", "1",
                       "--phash-distance", "0"])  # fmt: skip
    stored = {Path(r["original"]).stem: r["file"] for r in read_manifest(tmp_path / "d")}
    pixels = np.stack(
        [model_view(np.asarray(Image.open(stored[f"{i:02d}"]))) for i in range(len(files))]
    )
    model, _ = load_checkpoint(models["pt"])
    with torch.inference_mode():
        expected = torch.softmax(model(to_model_input(pixels)), 1)[:, 1].numpy()
    np.testing.assert_allclose([r["prob_fake"] for r in rows], expected, atol=1e-6)


@pytest.mark.parametrize("case", ["missing", "empty_folder", "only_bad_files"])
def test_no_images_exits_2(case, models, tmp_path, capsys):
    target = tmp_path / "nothing"
    if case != "missing":
        target.mkdir()
    if case == "only_bad_files":
        (target / "empty.jpg").write_bytes(b"")
    rc, _, err = run([target, "--model", models["onnx"], "--csv", tmp_path / "p.csv"], capsys)
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error:")
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("case", ["csv_is_a_folder", "json_under_a_file", "save_is_a_file"])
def test_unwritable_outputs_exit_2_before_any_work(case, folder, models, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    csv_path, extra = tmp_path / "p.csv", []
    if case == "csv_is_a_folder":
        csv_path = tmp_path
    elif case == "json_under_a_file":
        extra = ["--json", tmp_path / "a_file" / "p.json"]
    else:
        extra = ["--save", tmp_path / "a_file"]
    rc, _, err = run([folder, "--model", models["onnx"], "--csv", csv_path, *extra], capsys)
    assert rc == 2 and err.strip().splitlines() == [err.strip()] and err.startswith("error: --")
    assert not (tmp_path / "p.csv").exists()  # refused before the CSV, not after it


def test_a_photo_the_detector_fails_on_is_a_row_not_a_crash(tmp_path):
    for name, colour in (("fails.png", 10), ("fine.png", 200)):
        Image.new("RGB", (64, 64), (colour,) * 3).save(tmp_path / name)

    def detector(rgb):
        if rgb.mean() < 100:
            raise ValueError("no pyramid scale")
        return []

    files = [tmp_path / "fails.png", tmp_path / "fine.png"]
    rows = infer.classify(lambda x: np.zeros((len(x), 2)), files, 32, detector, workers=1)
    assert [r["status"] for r in rows] == ["unreadable", "no_face"]
    assert rows[0]["reason"] == "face detection failed (ValueError: no pyramid scale)"


def test_bad_model_files_exit_2(folder, tmp_path, capsys, monkeypatch):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage that is not a protobuf model" * 10)
    no_meta = tmp_path / "plain.onnx"
    inp, out = (
        helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2]) for n in ("input", "logits")
    )
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["logits"])], "g", [inp], [out]
    )
    plain = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(plain, str(no_meta))  # a valid ONNX model, but not a facecheck one
    engine, other = tmp_path / "m.engine", tmp_path / "m.h5"
    engine.write_bytes(b"not an engine")
    other.write_bytes(b"weights")
    cases = [(corrupt, "not a usable ONNX model"), (no_meta, "no facecheck metadata"),
             (tmp_path / "model.bin", "not found"), (other, "unknown model type")]  # fmt: skip
    if export.tensorrt_problem():  # the usual case: no TensorRT or no GPU here
        cases.append((engine, "TensorRT engines need"))
    for model, message in cases:
        rc, _, err = run([folder / "wide.jpg", "--model", model], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err
    # The default model is the one beside infer.py, whatever the current folder...
    monkeypatch.chdir(tmp_path)
    rc, _, err = run([folder / "wide.jpg", "--csv", tmp_path / "p.csv", "--quiet"], capsys)
    assert rc == 0 and (tmp_path / "p.csv").is_file(), err
    # ...and where it is missing, the message says how to make it.
    monkeypatch.setattr(infer, "DEFAULT_MODEL", str(tmp_path / "models" / "facecheck.onnx"))
    rc, _, err = run([folder / "wide.jpg"], capsys)
    assert rc == 2 and "export.py" in err and len(err.strip().splitlines()) == 1
    # A face finder model missing (or corrupt): one line too, not a traceback.
    import common

    def missing(path, *args, **kwargs):
        raise FileNotFoundError(f"{path} is missing: run `python export.py --detector`")

    monkeypatch.setattr(common, "_session", missing)
    shipped = ROOT / "models" / "facecheck.onnx"
    rc, _, err = run([folder / "wide.jpg", "--model", shipped, "--csv", tmp_path / "p.csv"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "face finder" in err, err


def test_outputs_never_overwrite_the_inputs(tmp_path, capsys, monkeypatch):
    """Inputs are only read: an output that is an input photo, or a boxed copy that would land
    on one or inside an input folder, is refused before any work, the photos untouched."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.jpg", "b.jpg"):
        synthetic_image("real", 0).save(photos / name)
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    synthetic_image("real", 1).save(pngs / "c.png")
    before = {f: f.read_bytes() for f in photos.iterdir()}
    a, b, missing_model = photos / "a.jpg", photos / "b.jpg", tmp_path / "none.onnx"
    cases = [
        (["--csv", a, a, b], "is one of the input photos"),  # infer.py --csv *.jpg
        ([a, b, "--json", b], "is one of the input photos"),
        ([a, "--save", photos], "an input photo"),  # a photo named alone, saved beside itself
        ([photos, "--save", tmp_path], "an input photo"),  # a folder saved into its parent
        ([pngs, "--save", tmp_path], "inside the input folder"),  # c.png.jpg beside c.png
        ([a, "--csv", tmp_path / "x.out", "--json", tmp_path / "x.out"], "name two files"),
    ]
    for args, message in cases:
        rc, _, err = run([*args, "--model", missing_model], capsys)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert {f: f.read_bytes() for f in photos.iterdir()} == before
    assert [f.name for f in pngs.iterdir()] == ["c.png"]
    # "." as the input folder: its copies go under its real name inside --save.
    monkeypatch.chdir(photos)
    names = infer.saved_copy_names([Path("a.jpg")], [Path(".")], tmp_path / "boxed")
    assert names[Path("a.jpg")] == (tmp_path / "boxed" / "photos" / "a.jpg").resolve()
    for bad in (["--threshold", "70"], ["--csv", "-", "--json", "-"]):
        with pytest.raises(SystemExit):
            infer.parse_args(["x.jpg", *bad])


def test_summary_counts_the_models_own_class_names():
    rows = [{"status": "ok", "label": "human"}, {"status": "ok", "label": "ai"},
            {"status": "ok", "label": "unsure"}, {"status": "no_face", "label": ""}]  # fmt: skip
    summary = infer.summarise(["p1", "p2"], rows, ["human", "ai"])
    assert (summary["real"], summary["fake"], summary["unsure"], summary["no_face"]) == (1, 1, 1, 1)


def test_pickle_payload_checkpoint_is_refused(folder, tmp_path, capsys):
    class Payload:  # unpickling it calls open(target, "w"): a file appears if it ever runs
        def __init__(self, target):
            self.target = str(target)

        def __reduce__(self):
            return (open, (self.target, "w"))

    live = tmp_path / "live.pt"  # first prove the payload is real: plain pickle runs it
    torch.save(Payload(tmp_path / "control"), live)
    torch.load(live, weights_only=False).close()
    assert (tmp_path / "control").exists()

    marker, evil = tmp_path / "payload_ran", tmp_path / "evil.pt"
    torch.save({"format": "facecheck", "model": Payload(marker)}, evil)
    rc, _, err = run([folder / "wide.jpg", "--model", evil], capsys)
    assert rc == 2 and "refused" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_unsure_band_saved_copies_and_json(folder, models, tmp_path, capsys):
    """A band covering everything labels every face unsure; --save writes one annotated JPEG
    per readable photo (outside the inputs, which stay untouched), --json the same rows."""
    import json

    _, ckpt = load_checkpoint(models["pt"])
    ckpt["unsure_band"] = [0.0, 1.01]
    wide = tmp_path / "wide_band.pt"
    torch.save(ckpt, wide)
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    out, js, saved = tmp_path / "p.csv", tmp_path / "p.json", tmp_path / "annotated"
    rc, _, err = run(
        [folder, "--model", wide, "--csv", out, "--json", js, "--save", saved, "--quiet"], capsys
    )
    assert rc == 0, err
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before
    rows = read_csv(out)
    assert {r["label"] for r in rows if r["status"] == "ok"} == {"unsure"}
    assert f"{len(AWKWARD)} unsure" in err and f"{len(HOSTILE)} unreadable" in err
    payload = json.loads(js.read_text())
    assert payload["summary"]["unsure"] == len(AWKWARD) and len(payload["rows"]) == len(rows)
    assert payload["unsure_band"] == [0.0, 1.01]
    assert all((r["face"] is None) == (r["status"] != "ok") for r in payload["rows"])
    rc, printed, _ = run([folder, "--model", wide, "--csv", out, "--json", "-", "--quiet"], capsys)
    assert rc == 0 and json.loads(printed)["rows"] == payload["rows"]  # --json - is stdout
    copies = sorted(saved.rglob("*.jpg"))
    assert len(copies) == len(AWKWARD)
    # photo.jpg is saved as photo.jpg (issue 32), photo.png as photo.png.jpg
    expected = [Path(name + ("" if name.endswith(".jpg") else ".jpg")) for name in AWKWARD]
    assert sorted(p.relative_to(saved / folder.name) for p in copies) == sorted(expected)
    with Image.open(saved / folder.name / "wide.jpg") as im:
        assert im.format == "JPEG" and im.size == (200, 70)  # the photo itself, not the crop
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
    amber = np.abs(pixels - infer.COLOURS["unsure"]).sum(1) < 60
    assert amber.sum() > 50  # the box and label are drawn in the unsure colour
    # The model's own band, picked on validation by train.py: every label follows it.
    _, ckpt = load_checkpoint(models["pt"])
    rc, _, _ = run([folder, "--model", models["pt"], "--csv", out, "--quiet"], capsys)
    for r in read_csv(out):
        if r["status"] == "ok":
            expected = infer.decision(float(r["prob_fake"]), ckpt["threshold"], ckpt["unsure_band"])
            assert r["label"] == expected
    # Copies inside an input folder would be classified next time: refused, one line.
    rc, _, err = run([folder, "--model", models["pt"], "--save", folder / "boxed"], capsys)
    assert rc == 2 and "inside the input folder" in err and len(err.strip().splitlines()) == 1
    assert not (folder / "boxed").exists()


def test_saved_copy_names_keep_jpeg_names_and_never_collide(tmp_path):
    folder = tmp_path / "in"
    files = [folder / "a.jpg", folder / "a.JPEG", folder / "a.png", folder / "sub" / "b.jpg",
             tmp_path / "single.jpg", tmp_path / "other" / "single.jpg"]  # fmt: skip
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"")
    roots = [folder] * 4 + [files[4], files[5]]
    names = infer.saved_copy_names(files, roots, tmp_path / "out")
    out = (tmp_path / "out").resolve()
    assert [names[f].relative_to(out).as_posix() for f in files] == [
        "in/a.jpg", "in/a.JPEG", "in/a.png.jpg", "in/sub/b.jpg", "single.jpg", "single.1.jpg"
    ]  # fmt: skip


def test_inference_modules_import_no_torch_and_no_onnx():
    """infer.py, backends.py and export.py (and what they import at module level) load without
    torch or the onnx package: a device runs .onnx / .engine models with numpy, pillow and ONNX
    Runtime or TensorRT alone (requirements-infer.txt)."""
    code = (
        "import sys, infer, backends, export; print(sorted({'torch', 'onnx'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-1000:]


def test_metadata_round_trip_is_the_checkpoint_deployment_metadata(models):
    """The .onnx model's metadata, read back by backends.py, is model.deployment_metadata of
    its checkpoint (one definition, written once, parsed without a second list of fields), and
    the .pt model gives the same."""
    _, ckpt = load_checkpoint(models["pt"])
    made = deployment_metadata(ckpt)
    _, from_onnx = backends.load_model(models["onnx"])
    _, from_pt = backends.load_model(models["pt"])
    for meta in (from_onnx, from_pt):
        assert {k: meta[k] for k in made} == made
    assert from_onnx["backend"].startswith("ONNX Runtime") and from_pt["backend"].startswith(
        "PyTorch"
    )


def test_blazeface_finder_frames_the_example_photos_like_mtcnn(tmp_path, capsys):
    """--finder blazeface on the shipped example photos: the same faces as MTCNN (box IoU),
    --finder auto each photo's faces from one of the two, the finder named in the JSON
    summary, and a clear error for an unknown finder."""
    examples, model = ROOT / "examples", ROOT / "models" / "facecheck.onnx"
    rows = {}
    for finder in ("mtcnn", "blazeface", "auto"):
        out = tmp_path / f"{finder}.json"
        args = [examples, "--model", model, "--finder", finder, "--csv", tmp_path / "p.csv"]
        rc, _, err = run([*args, "--json", out, "--quiet"], capsys)
        assert rc == 0, err
        report = json.loads(out.read_text())
        assert report["summary"]["faces_found_by"] == finder
        rows[finder] = [r for r in report["rows"] if r["status"] == "ok"]
    assert len(rows["mtcnn"]) == len(rows["blazeface"]) >= 12
    for a, b in zip(rows["mtcnn"], rows["blazeface"]):
        ax, bx = [a[k] for k in ("x0", "y0", "x1", "y1")], [b[k] for k in ("x0", "y0", "x1", "y1")]
        w = max(0.0, min(ax[2], bx[2]) - max(ax[0], bx[0]))
        h = max(0.0, min(ax[3], bx[3]) - max(ax[1], bx[1]))
        area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
        assert w * h / (area(ax) + area(bx) - w * h) > 0.8, (a, b)
    # A different finder really ran: its boxes are close to MTCNN's, not the same.
    assert any(a["x0"] != b["x0"] for a, b in zip(rows["mtcnn"], rows["blazeface"]))

    # auto: BlazeFace's faces on a portrait, the cascade's on any other photo, never a mix.
    def photos(face_rows):
        by_path = {}
        for r in face_rows:
            by_path.setdefault(r["path"], []).append(r)
        return by_path

    mtcnn, blaze = photos(rows["mtcnn"]), photos(rows["blazeface"])
    for path, faces in photos(rows["auto"]).items():
        assert faces in (mtcnn[path], blaze[path]), path
    assert any(photos(rows["auto"])[p] == blaze[p] != mtcnn[p] for p in blaze)
    assert any(photos(rows["auto"])[p] == mtcnn[p] != blaze[p] for p in mtcnn)  # not a portrait
    with pytest.raises(SystemExit):
        infer.parse_args([str(examples), "--finder", "yunet"])
    assert "invalid choice: 'yunet'" in capsys.readouterr().err
