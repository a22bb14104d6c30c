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
    """decode_image + crop_and_resize: file -> size x size x 3 uint8. Used by
    prepare_data.py to build the dataset and by infer.py on a user's photos."""
    return crop_and_resize(decode_image(path), size, crop)


def to_model_input(images_uint8):
    """uint8 N x H x W x 3 (numpy) or N x 3 x H x W (torch) -> float32 N x 3 x H x W in [0, 1].
    Mean/std normalisation lives inside the model (and so inside the ONNX graph)."""
    import torch

    if isinstance(images_uint8, np.ndarray):
        images_uint8 = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2)
    return images_uint8.float().div_(255.0)


def pick_device(name="auto"):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA device is available")
    return torch.device(name)


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


def manifest_hash(data_dir):
    """sha256 of manifest.csv: ties a checkpoint to the exact dataset it saw."""
    return hashlib.sha256((Path(data_dir) / "manifest.csv").read_bytes()).hexdigest()


def load_rows(rows, size, crop=1.0, progress=False, desc="load"):
    """Decode manifest rows (each with a 'file') into uint8 N x 3 x size x size, by load_image."""
    import torch
    from tqdm import tqdm

    images = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    for i, row in enumerate(tqdm(rows, desc=desc, disable=not progress, leave=False)):
        try:
            images[i] = load_image(row["file"], size, crop)
        except BadImage as exc:
            raise SystemExit(f"error: {row['file']}: {exc}") from None
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def load_split(data_dir, split, size=None, crop=1.0, progress=False):
    """Decode one split of a prepared dataset into memory: (uint8 N x 3 x H x W, labels, rows)."""
    import torch

    rows = read_manifest(data_dir, split)
    if not rows:
        raise SystemExit(f"error: split '{split}' of {data_dir} holds no images")
    if size is None:
        try:
            size = decode_image(rows[0]["file"]).shape[0]
        except BadImage as exc:
            raise SystemExit(f"error: {rows[0]['file']}: {exc}") from None
    images = load_rows(rows, size, crop, progress, desc=f"load {split}")
    labels = torch.tensor([CLASS_NAMES.index(r["label"]) for r in rows])
    return images, labels, rows


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
