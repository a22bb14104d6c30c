#!/usr/bin/env bash
# The torch-free inference path (issue 31): a fresh virtual environment from requirements-infer.txt
# alone (Python 3.10, JetPack 6's, where this machine has it; else python3), then infer.py with
# the shipped models/facecheck.onnx on generated photos: example faces pasted into 1280 x 960
# scenes, a scene without a face and a corrupt file, the CSV on stdout. Checked: torch is absent,
# stdout is the CSV and nothing else, every photo has its rows (ok / no_face / unreadable) with
# boxes inside the photo and labels that follow prob_fake, and, where the development venv
# (.venv) exists, the same rows as infer.py there (prob_fake within 1e-4).
#   bash tests/infer_smoke.sh      (.ci/run runs it after the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."

python=""
for candidate in python3.10 /usr/bin/python3.10 "$HOME"/.pyenv/versions/3.10.*/bin/python3.10; do
  if [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "3.10" ]; then
    python=$candidate
    break
  fi
done
python=${python:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "infer_smoke: fresh venv from requirements-infer.txt with $python ($("$python" --version 2>&1))"
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements-infer.txt
if "$work/venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "infer_smoke: FAILED: torch is importable in the requirements-infer.txt venv"
  exit 1
fi

faces=examples
[ -n "$(ls "$faces"/*.jpg 2>/dev/null)" ] || faces=../shared/examples
"$work/venv/bin/python" - "$work/photos" "$faces" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

out, faces = Path(sys.argv[1]), sorted(Path(sys.argv[2]).glob("*.jpg"))[::3][:3]
out.mkdir()
rng = np.random.default_rng(0)
for i, face in enumerate(faces):  # each face at another place and size in a textured scene
    scene = Image.fromarray(rng.integers(60, 200, (960, 1280, 3), dtype=np.uint8)).convert("RGB")
    with Image.open(face) as im:
        im = im.convert("RGB")
        side = 360 + 120 * i
        im.thumbnail((side, side))
        scene.paste(im, (100 + 300 * i, 80 + 100 * i))
    scene.save(out / f"scene_{i}.jpg", quality=92)
Image.new("RGB", (640, 480), (90, 140, 200)).save(out / "sky.png")
(out / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
print(f"infer_smoke: {len(faces)} scenes with a face from {sys.argv[2]}, one without, one corrupt")
EOF

"$work/venv/bin/python" infer.py "$work/photos" --csv - --quiet >"$work/rows.csv" 2>"$work/stderr.txt" || {
  cat "$work/stderr.txt"
  echo "infer_smoke: FAILED: infer.py exited non-zero in the requirements-infer.txt venv"
  exit 1
}
reference=""
if [ -x .venv/bin/python ]; then
  .venv/bin/python infer.py "$work/photos" --csv "$work/reference.csv" --quiet 2>/dev/null
  reference="$work/reference.csv"
fi

"$work/venv/bin/python" - "$work/rows.csv" "$work/photos" "$reference" <<'EOF'
import csv
import sys
from pathlib import Path

from PIL import Image

rows_path, photos, reference = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
text = Path(rows_path).read_text(encoding="utf-8")
lines = text.splitlines()
assert lines and lines[0] == "path,face,x0,y0,x1,y1,prob_fake,label,status", lines[:3]
rows = list(csv.DictReader(text.splitlines()))
assert all(len(r) == 9 and None not in r.values() for r in rows), "stdout is not only the CSV"
by_file = {}
for r in rows:
    by_file.setdefault(Path(r["path"]).name, []).append(r)
assert set(by_file) == {p.name for p in photos.iterdir()}, sorted(by_file)
assert [r["status"] for r in by_file["broken.jpg"]] == ["unreadable"]
scenes = [name for name in by_file if name.startswith("scene_")]
assert scenes, "no example faces to place in scenes"
found = 0
for name, file_rows in by_file.items():
    if name == "broken.jpg":
        continue
    width, height = Image.open(photos / name).size
    for r in file_rows:
        assert r["status"] in ("ok", "no_face"), r
        if r["status"] == "no_face":
            assert len(file_rows) == 1 and r["prob_fake"] == r["label"] == "", r
            continue
        found += name in scenes
        x0, y0, x1, y1, prob = (float(r[k]) for k in ("x0", "y0", "x1", "y1", "prob_fake"))
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, r
        assert 0 <= prob <= 1 and r["label"] in ("real", "fake", "unsure"), r
assert found >= len(scenes), f"faces found in {found} of {len(scenes)} scenes"
summary = f"{len(rows)} rows, {found} faces in {len(scenes)} scenes"
if reference:
    expected = list(csv.DictReader(open(reference, encoding="utf-8")))
    assert [(r["path"], r["face"], r["status"]) for r in rows] == [
        (r["path"], r["face"], r["status"]) for r in expected
    ], "rows differ from the development venv's"
    for got, want in zip(rows, expected):
        for key in ("x0", "y0", "x1", "y1"):
            assert got[key] == want[key] or abs(float(got[key]) - float(want[key])) <= 0.2, (got, want)
        if want["prob_fake"]:
            assert abs(float(got["prob_fake"]) - float(want["prob_fake"])) <= 1e-4, (got, want)
    summary += ", the same as the development venv's (prob_fake within 1e-4)"
print(f"infer_smoke: ok: {summary}")
EOF
