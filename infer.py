"""Find every face in every photo and classify each as real or AI-generated.

    python infer.py photos/                         # every face under photos/ -> predictions.csv
    python infer.py a.jpg b.png --csv -             # CSV on stdout
    python infer.py photos/ --model runs/attention-off/best.pt --threshold 0.7

The model decides the backend by its file type: .onnx runs in ONNX Runtime (TensorRT, CUDA or
CPU provider, the first one available), .engine / .plan in TensorRT, .pt (a train.py checkpoint)
in PyTorch. Input size, face framing, decision threshold and class names come from the model
file (ONNX metadata, the engine's .json, the checkpoint), so nothing here has to match by hand.

Preprocessing is training's own, imported from common.py: EXIF orientation applied, any mode
(grayscale, RGBA on white, CMYK, 16-bit, palette) to 8-bit RGB; MTCNN (common.FaceDetector)
finds the faces, and each is framed from its five landmarks exactly as prepare_data.py framed
the training faces (common.face_inputs). A model trained on already-cropped faces (metadata
faces=whole) takes the centred square of each image instead.

Folders are searched recursively for .jpg .jpeg .png .webp .bmp .gif; files named on the
command line are tried whatever their extension. Decoding runs in a pool of --workers
threads, a few images ahead of the face detector and the model.

Output: CSV, one row per face, largest face first (face 0), written atomically to --csv
(default predictions.csv in the current folder; "-" prints it to stdout):
    path, face, x0, y0, x1, y1, prob_fake, label, status
x0..y1 is the face's box in the photo's pixels (after EXIF rotation); label is fake when
prob_fake is at or above the model's unsure band, real below it, unsure inside it (the band
is picked on validation so that the confident calls are right >= 95 % of the time there; with
--threshold the band collapses onto that threshold); status is ok. A photo without a face gets one row with
status no_face and one that cannot be read one row with status unreadable (the reason goes
to stderr); neither gets a guess. A summary goes to stderr. Exit status 0 when at least one
file could be read, 2 when a path does not exist, holds no images, no file could be read,
or the model file is missing or unusable.

    python infer.py photos/ --save annotated/ --json predictions.json

--save writes a copy of every readable photo with each face boxed and labelled (green real,
red fake, amber unsure, with prob_fake); --json writes the rows and the summary as JSON.
Inputs are only read.
"""

import argparse
import csv
import io
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from common import (
    CLASS_NAMES,
    IMAGE_EXTENSIONS,
    BadImage,
    atomic_write,
    decode_image,
    face_inputs,
    find_images,
    to_model_input,
)

DEFAULT_MODEL = "models/facecheck.onnx"


class InferError(Exception):
    """A problem with the inputs or the model; str(exc) is the one-line message."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # fmt: off
    p.add_argument("paths", nargs="+", metavar="FOLDER_OR_FILE", help="image files and/or folders (searched recursively)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="a .onnx, .engine/.plan or .pt model (default %(default)s)")
    p.add_argument("--csv", default="predictions.csv", help='CSV to write (default %(default)s in the current folder; "-" for stdout)')
    p.add_argument("--batch", type=int, default=32, help="images per model call (default 32)")
    p.add_argument("--threshold", type=float, help="predict fake when prob_fake >= this, with no unsure band (default: the model's threshold and band, chosen on validation)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding threads (default min(4, CPUs))")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--save", metavar="DIR", help="write a copy of every photo into DIR with each face boxed and labelled (real / fake / unsure and prob_fake); DIR must lie outside the inputs")
    p.add_argument("--json", metavar="PATH", help="also write the rows and the summary as JSON to PATH")
    # fmt: on
    args = p.parse_args(argv)
    if args.batch < 1 or args.workers < 1:
        p.error("--batch and --workers must be >= 1")
    return args


def decision(prob, threshold, band):
    """real / fake / unsure: fake from band[1] up, real below band[0]; the band comes from
    validation (train.unsure_band) and collapses onto a threshold given by hand."""
    low, high = band
    if prob >= max(high, threshold):
        return "fake"
    if prob < min(low, threshold):
        return "real"
    return "unsure"


def parse_metadata(props, source):
    """ONNX metadata_props / engine .json (string values, JSON inside) -> typed dict."""
    if props.get("format") != "facecheck" or "image_size" not in props:
        raise InferError(
            f"{source}: no facecheck metadata (image_size, threshold); export the model with export.py"
        )
    try:
        return {
            "image_size": int(props["image_size"]),
            "threshold": float(props["threshold"]),
            "class_names": json.loads(props.get("class_names", json.dumps(CLASS_NAMES))),
            "precision": props.get("precision", "fp32"),
            "faces": props.get("faces", "whole"),
            "unsure_band": json.loads(props.get("unsure_band", "null"))
            or [float(props["threshold"])] * 2,
            "confident_calls": json.loads(props.get("confident_calls", "null")),
        }
    except (KeyError, ValueError) as exc:
        raise InferError(f"{source}: unreadable facecheck metadata ({exc})") from None


ORT_TRT_MAX_BATCH = 64  # the ONNX Runtime TensorRT EP's profile: batches 1..64, larger ones split


def ort_trt_cache_dir(path):
    """Where the ONNX Runtime TensorRT EP keeps its engine and timing caches for this model:
    $FACECHECK_TRT_CACHE, else <model folder>/.trt-cache (else ~/.cache/facecheck/trt if the
    model folder is read-only)."""
    if os.environ.get("FACECHECK_TRT_CACHE"):
        return Path(os.environ["FACECHECK_TRT_CACHE"])
    here = Path(path).resolve().parent / ".trt-cache"
    try:
        here.mkdir(exist_ok=True)
        return here
    except OSError:
        return Path.home() / ".cache" / "facecheck" / "trt"


def ort_providers(path, available):
    """ONNX Runtime providers for path, best first, with options. The TensorRT EP gets an
    engine cache, a timing cache and a fixed optimisation profile (batches 1..64 at the model's
    input size), so the first run builds an engine and later runs load it instead of rebuilding
    (trt_engine_cache_enable / trt_engine_cache_path / trt_timing_cache_enable /
    trt_profile_{min,opt,max}_shapes: onnxruntime.ai/docs/execution-providers/
    TensorRT-ExecutionProvider.html). Older ONNX Runtime builds refuse options they do not know
    ("Invalid TensorRT EP option", onnxruntime#21484): load_onnx then retries with the engine
    cache alone (ORT_TRT_BASIC_OPTIONS). A
    Q/DQ model asks for INT8 (trt_int8_enable) so that TensorRT 8.6's weakly typed builder
    accepts its Q/DQ nodes; an FP16 ONNX is FP16 by itself, an FP32 one stays FP32."""
    providers = []
    if "TensorrtExecutionProvider" in available:
        import onnx

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise InferError(f"{path}: not a usable ONNX model ({type(exc).__name__})") from None
        meta = parse_metadata({p.key: p.value for p in model.metadata_props}, path)
        cache = ort_trt_cache_dir(path)
        cache.mkdir(parents=True, exist_ok=True)
        size = meta["image_size"]
        dims = lambda n: f"input:{n}x3x{size}x{size}"  # noqa: E731
        providers.append((
            "TensorrtExecutionProvider",
            {
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True,  # kept in trt_engine_cache_path (onnxruntime#17865)
                "trt_profile_min_shapes": dims(1),
                "trt_profile_opt_shapes": dims(min(32, ORT_TRT_MAX_BATCH)),
                "trt_profile_max_shapes": dims(ORT_TRT_MAX_BATCH),
                "trt_int8_enable": meta["precision"] == "int8",
            },
        ))  # fmt: skip
    providers += [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return providers


ORT_TRT_BASIC_OPTIONS = ("trt_engine_cache_enable", "trt_engine_cache_path")


def load_onnx(path):
    import onnxruntime as ort

    providers = ort_providers(path, ort.get_available_providers())
    try:
        try:
            session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:
            if not (isinstance(providers[0], tuple) and "option" in str(exc).lower()):
                raise
            name, options = providers[0]  # an older ONNX Runtime: the engine cache only
            basic = {k: v for k, v in options.items() if k in ORT_TRT_BASIC_OPTIONS}
            session = ort.InferenceSession(str(path), providers=[(name, basic), *providers[1:]])
    except Exception as exc:  # "... Load model from X failed:/src/model.cc:256 fn(...) reason"
        detail = (str(exc).strip().splitlines() or [""])[0].split("failed:")[-1]
        detail = detail.rsplit(") ", 1)[-1] if detail.startswith("/") else detail
        raise InferError(f"{path}: not a usable ONNX model ({detail[:200]})") from None
    meta = parse_metadata(session.get_modelmeta().custom_metadata_map, path)
    meta["backend"] = f"ONNX Runtime {session.get_providers()[0]}"
    chunk = ORT_TRT_MAX_BATCH if session.get_providers()[0] == "TensorrtExecutionProvider" else None

    def run(batch):
        step = chunk or max(len(batch), 1)
        parts = [
            session.run(["logits"], {"input": batch[i : i + step]})[0]
            for i in range(0, len(batch), step)
        ]
        return np.concatenate(parts)

    return run, meta


def cuda_device():
    """{"name", "compute_capability"} of the current CUDA GPU (what a TensorRT engine is tied to:
    the TensorRT version and the GPU's compute capability)."""
    import torch

    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def engine_metadata(path):
    """An engine carries no metadata: read <engine>.json, else the .onnx next to it (an engine
    built with trtexec). Returns (meta, build): build is the sidecar's record of the TensorRT
    version, GPU and engine hash, {} when there is no sidecar."""
    path = Path(path)
    sidecar, onnx_path = Path(f"{path}.json"), path.with_name(path.name.split(".")[0] + ".onnx")
    if sidecar.is_file():
        try:
            props = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InferError(f"{sidecar}: unreadable ({exc})") from None
        keys = ("tensorrt_version", "gpu_name", "gpu_compute_capability", "engine_sha256")
        return parse_metadata(props, sidecar), {k: props[k] for k in keys if props.get(k)}
    if onnx_path.is_file():
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
        meta = parse_metadata({p.key: p.value for p in model.metadata_props}, onnx_path)
        named = path.name.split(".")[-2] if path.name.count(".") >= 2 else ""
        meta["precision"] = named if named in ("fp16", "int8") else meta["precision"]
        return meta, {}
    raise InferError(
        f"{path}: no metadata; expected {sidecar} (written by export.py --tensorrt) or {onnx_path}"
    )


REBUILD = (
    "rebuild it on this device: python export.py --checkpoint models/facecheck.pt --tensorrt "
    "[--fp16 | --int8 --calib-data DATA], or trtexec (README, Edge deployment)"
)


def check_engine_build(path, build, plan, trt_version, device):
    """Refuse an engine whose sidecar says it was built elsewhere: another TensorRT version or
    another GPU family (compute capability), or whose bytes are not the engine the sidecar
    describes. TensorRT engines are not portable across TensorRT versions or GPU models."""
    if build.get("tensorrt_version") and build["tensorrt_version"] != trt_version:
        raise InferError(
            f"{path} was built with TensorRT {build['tensorrt_version']}, this is TensorRT "
            f"{trt_version}: an engine only runs on the TensorRT version that built it; {REBUILD}"
        )
    built_cc = build.get("gpu_compute_capability")
    if built_cc and built_cc != device["compute_capability"]:
        raise InferError(
            f"{path} was built on {build.get('gpu_name', 'a GPU')} (compute capability {built_cc}), "
            f"this is {device['name']} (compute capability {device['compute_capability']}): an "
            f"engine only runs on the GPU family that built it; {REBUILD}"
        )
    if build.get("engine_sha256"):
        import hashlib

        if hashlib.sha256(plan).hexdigest() != build["engine_sha256"]:
            raise InferError(
                f"{path} is not the engine {path}.json describes (a stale engine or sidecar from "
                f"another model or build); {REBUILD}"
            )


def check_engine_io(path, engine, trt, image_size):
    """The engine must take what run() sends: a float32, linear (NCHW) tensor named input with
    a batch range starting at 1 and 3 x S x S images (S from its metadata), and write float
    logits. Returns the largest batch of its optimisation profile."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if inputs != ["input"] or "logits" not in outputs:
        raise InferError(
            f"{path}: inputs {inputs}, outputs {outputs}; a facecheck engine has input 'input' "
            f"and output 'logits' (an engine of another model?); {REBUILD}"
        )
    for name, wanted in (("input", ("FLOAT",)), ("logits", ("FLOAT", "HALF"))):
        dtype = engine.get_tensor_dtype(name)
        if getattr(dtype, "name", str(dtype)).split(".")[-1] not in wanted:
            raise InferError(
                f"{path}: its {name} is {dtype}, infer.py exchanges float32 (an engine built "
                f"with FP16 or INT8 I/O, e.g. trtexec --inputIOFormats); {REBUILD}"
            )
        fmt = engine.get_tensor_format(name)
        if fmt != trt.TensorFormat.LINEAR:
            raise InferError(
                f"{path}: its {name} has format {fmt}, infer.py exchanges linear (NCHW) "
                f"buffers (an engine built with --inputIOFormats=...:hwc/chw32?); {REBUILD}"
            )
    if engine.num_optimization_profiles < 1:
        raise InferError(f"{path}: no optimisation profile; {REBUILD}")
    low, _, high = (tuple(d) for d in engine.get_tensor_profile_shape("input", 0))
    want = (3, image_size, image_size)
    if low[1:] != want or high[1:] != want:
        raise InferError(
            f"{path}: takes images of {low[1:]} to {high[1:]}, its metadata says "
            f"{want} (a stale engine from another model?); {REBUILD}"
        )
    if low[0] != 1 or high[0] < 1:
        raise InferError(
            f"{path}: its batch range is {low[0]}..{high[0]}; infer.py needs batches from 1 "
            f"(the last batch of a folder is smaller); {REBUILD} --max-batch N"
        )
    return int(high[0])


def trt_step(ok, what):
    """TensorRT's set_input_shape / set_tensor_address / execute_async_v3 return False on
    failure (and log why): stop with that instead of reading an output that was never written."""
    if not ok:
        raise InferError(f"TensorRT {what} failed (TensorRT's log above says why)")


def load_engine(path):
    """A serialised TensorRT engine, run on CUDA with torch tensors as device buffers (torch is
    on the device anyway: the preprocessing and the face detector use it; cuda-python would be
    a second CUDA binding for the same four buffers)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise InferError(
            f"{path}: TensorRT engines need the tensorrt package (and a CUDA GPU); use the .onnx model instead"
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise InferError(f"{path}: TensorRT engines need a CUDA GPU; use the .onnx model instead")
    meta, build = engine_metadata(path)
    plan = Path(path).read_bytes()
    check_engine_build(path, build, plan, trt.__version__, cuda_device())
    try:
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise InferError(
            f"{path}: TensorRT {trt.__version__} cannot load it ({first}); {REBUILD}"
        ) from None
    if engine is None:
        raise InferError(
            f"{path}: not an engine for this GPU / TensorRT {trt.__version__}; {REBUILD}"
        )
    max_batch = check_engine_io(path, engine, trt, meta["image_size"])
    context, stream = engine.create_execution_context(), torch.cuda.Stream()
    if context is None:
        raise InferError(f"{path}: TensorRT could not create an execution context (GPU memory?)")
    outputs = [
        name
        for name in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors))
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT
    ]
    dtypes = {
        name: torch.from_numpy(np.empty(0, trt.nptype(engine.get_tensor_dtype(name)))).dtype
        for name in outputs
    }

    def run(batch):
        logits = []
        for start in range(0, len(batch), max_batch):
            # The engine reads the input's bytes as contiguous NCHW float32 (TensorFormat.LINEAR):
            # a channels-last view (what to_model_input's permute gives) must be copied first.
            chunk = np.ascontiguousarray(batch[start : start + max_batch], dtype=np.float32)
            with torch.cuda.stream(stream):
                x = torch.from_numpy(chunk).cuda().contiguous()
                n, c, h, w = x.shape
                if not x.is_contiguous() or tuple(x.stride()) != (c * h * w, h * w, w, 1):
                    raise InferError(f"internal: input buffer is not NCHW ({x.stride()})")
                trt_step(context.set_input_shape("input", tuple(x.shape)),
                         f"set_input_shape(input, {tuple(x.shape)})")  # fmt: skip
                trt_step(context.set_tensor_address("input", x.data_ptr()),
                         "set_tensor_address(input)")  # fmt: skip
                out = {}
                for name in outputs:
                    shape = tuple(context.get_tensor_shape(name))
                    if any(d < 0 for d in shape):
                        raise InferError(f"TensorRT left the shape of {name} open: {shape}")
                    out[name] = torch.empty(shape, dtype=dtypes[name], device="cuda")
                    trt_step(context.set_tensor_address(name, out[name].data_ptr()),
                             f"set_tensor_address({name})")  # fmt: skip
                trt_step(context.execute_async_v3(stream.cuda_stream), "execute_async_v3")
            stream.synchronize()
            logits.append(out["logits"].float().cpu().numpy())
        return np.concatenate(logits)

    # One warm-up image at load time: a context that cannot run fails here, inside the caller's
    # model-loading error handling, and the first real batch does not pay TensorRT's lazy setup.
    run(np.zeros((1, 3, meta["image_size"], meta["image_size"]), np.float32))
    meta["backend"] = f"TensorRT {trt.__version__}"
    return run, meta


def load_torch(path):
    import torch

    from common import pick_device
    from model import CheckpointError, load_checkpoint

    try:
        model, ckpt = load_checkpoint(path)  # weights_only: a pickle payload is refused, not run
    except CheckpointError as exc:
        raise InferError(str(exc)) from None
    device = pick_device("auto")
    model.to(device)

    @torch.inference_mode()
    def run(batch):
        return model(torch.from_numpy(batch).to(device)).float().cpu().numpy()

    meta = {
        "image_size": ckpt["image_size"],
        "faces": ckpt.get("faces", "whole"),
        "threshold": ckpt["threshold"],
        "unsure_band": list(ckpt.get("unsure_band") or [ckpt["threshold"]] * 2),
        "confident_calls": ckpt.get("val_metrics", {}).get("confident_calls"),
        "class_names": list(ckpt.get("class_names", CLASS_NAMES)),
        "precision": "fp32",
        "backend": f"PyTorch {device.type}",
    }
    return run, meta


def load_model(path):
    """(run, meta): run(float32 N x 3 x S x S in [0, 1]) -> logits N x 2; meta from the file."""
    path = Path(path)
    if not path.is_file():
        hint = (
            " (make it with: python export.py --checkpoint runs/<run>/best.pt)"
            if str(path) == DEFAULT_MODEL
            else ""
        )
        raise InferError(f"model {path} not found{hint}")
    loaders = {".onnx": load_onnx, ".engine": load_engine, ".plan": load_engine, ".pt": load_torch}
    if path.suffix.lower() not in loaders:
        raise InferError(f"{path}: unknown model type; expected .onnx, .engine, .plan or .pt")
    return loaders[path.suffix.lower()](path)


def collect_files(paths):
    """Image files under the given folders plus the given files, in order, without repeats,
    and the argument each came from."""
    found = {}
    for arg in paths:
        path = Path(arg)
        if not path.exists():
            raise InferError(f"{arg}: no such file or folder")
        for f in find_images(path) if path.is_dir() else [path]:
            found.setdefault(f, path)
    if not found:
        where = ", ".join(paths)
        raise InferError(
            f"no images found in {where} (looked for {' '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return list(found), list(found.values())


def decode(path):
    """(H x W x 3 uint8, None) or (None, reason): never raises."""
    try:
        return decode_image(path), None
    except BadImage as exc:
        return None, str(exc)
    except Exception as exc:
        return None, f"unreadable ({type(exc).__name__}: {exc})"


def decode_ahead(files, workers, lookahead):
    """Yield (path, rgb, reason) in order while up to lookahead files decode in threads
    (PIL releases the GIL while decoding, so threads overlap with detection and inference)."""
    with ThreadPoolExecutor(workers) as pool:
        queue, todo = deque(), iter(files)
        for path in todo:
            queue.append((path, pool.submit(decode, path)))
            if len(queue) >= lookahead:
                break
        while queue:
            path, future = queue.popleft()
            following = next(todo, None)
            if following is not None:
                queue.append((following, pool.submit(decode, following)))
            yield (path, *future.result())


def fake_probability(logits):
    """softmax(logits)[:, 1], in float64 so every backend rounds the same way."""
    logits = logits.astype(np.float64)
    return 1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))


def classify(run, files, size, detector=None, batch=32, workers=2, progress=None):
    """Rows (dicts: path, face, x0, y0, x1, y1, prob_fake, status, reason) for every face of
    every file, in file order, largest face first. detector None: the image is the face."""
    rows, pending, images = [], [], []

    def flush():
        logits = run(to_model_input(np.stack(images)).numpy())
        for row, prob in zip(pending, fake_probability(logits).tolist()):
            row["prob_fake"] = prob
        pending.clear()
        images.clear()

    for path, rgb, reason in decode_ahead(files, workers, lookahead=batch + 2 * workers):
        if progress is not None:
            progress.update()
        if rgb is not None:
            try:
                faces = face_inputs(rgb, size, detector)
            except Exception as exc:  # one photo the detector chokes on must not lose the folder
                rgb, reason = None, f"face detection failed ({type(exc).__name__}: {exc})"
        if rgb is None:
            rows.append({"path": path, "face": "", "status": "unreadable", "reason": reason})
            continue
        if not faces:
            rows.append({"path": path, "face": "", "status": "no_face", "reason": ""})
        for k, (box, image) in enumerate(faces):
            x0, y0, x1, y1 = (round(float(v), 1) for v in box)
            row = {"path": path, "face": k, "x0": x0, "y0": y0, "x1": x1, "y1": y1}
            rows.append({**row, "status": "ok", "reason": ""})
            pending.append(rows[-1])
            images.append(image)
            if len(images) == batch:
                flush()
    if images:
        flush()
    return rows


def printable(path):
    """A path as text that any UTF-8 stream accepts (undecodable bytes become \\x escapes)."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


CSV_FIELDS = ["path", "face", "x0", "y0", "x1", "y1", "prob_fake", "label", "status"]


def label_rows(rows, threshold, band, class_names):
    """Each face row gains its label (real / fake / unsure, in the model's class names)."""
    names = {"real": class_names[0], "fake": class_names[1], "unsure": "unsure"}
    for r in rows:
        r["label"] = (
            "" if r.get("prob_fake") is None else names[decision(r["prob_fake"], threshold, band)]
        )


def write_predictions(destination, rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for r in rows:
        prob = r.get("prob_fake")
        box = [r.get(k, "") for k in ("x0", "y0", "x1", "y1")]
        prob_text = "" if prob is None else f"{prob:.6f}"
        writer.writerow([printable(r["path"]), r["face"], *box, prob_text, r["label"], r["status"]])
    text = buffer.getvalue()
    if destination == "-":
        sys.stdout.write(text)
    else:
        atomic_write(destination, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def summarise(files, rows):
    faces = [r for r in rows if r["status"] == "ok"]
    count = lambda key, value: sum(r[key] == value for r in rows)  # noqa: E731
    return {
        "images": len(files), "faces": len(faces), "real": sum(r["label"] == "real" for r in faces),
        "fake": sum(r["label"] == "fake" for r in faces), "unsure": count("label", "unsure"),
        "unreadable": count("status", "unreadable"), "no_face": count("status", "no_face"),
    }  # fmt: skip


def write_json(path, rows, summary, meta, threshold, band):
    keys = ["face", "x0", "y0", "x1", "y1", "prob_fake", "label", "status", "reason"]
    payload = {
        "summary": summary,
        "model": {k: meta.get(k) for k in ("backend", "precision", "image_size", "faces")},
        "threshold": threshold, "unsure_band": list(band),
        "confident_calls_on_validation": meta.get("confident_calls"),
        "rows": [{"path": printable(r["path"]), **{k: r.get(k) for k in keys}} for r in rows],
    }  # fmt: skip
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1) + "\n"))


def check_destinations(args):
    """Refuse output paths that cannot be written before the work, not after it: a --json
    that fails once every photo is classified would leave the run half-written."""
    files = [("--csv", args.csv)] if args.csv != "-" else []
    files += [("--json", args.json)] if args.json else []
    folders = [(flag, Path(path).parent) for flag, path in files]
    folders += [("--save", Path(args.save))] if args.save else []
    for flag, path in files:
        if Path(path).is_dir():
            raise InferError(f"{flag} {path} is a folder: name a file")
    for flag, folder in folders:
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir():
            raise InferError(f"{flag}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise InferError(f"{flag}: cannot write into {existing}")


def saved_copy_names(files, roots, save_dir):
    """Where each photo's annotated copy goes: SAVE/<input folder name>/<path inside it>.jpg, or
    SAVE/<file name>.jpg for files named alone; never an input file, never inside an input
    folder (the next run would classify the copies)."""
    save_dir = Path(save_dir).resolve()
    for root in roots:
        if root.is_dir() and (save_dir == root.resolve() or root.resolve() in save_dir.parents):
            raise InferError(f"--save {save_dir} lies inside the input folder {root}: pick another")
    names, taken = {}, set()
    for path, root in zip(files, roots):
        rel = Path(root.name) / path.relative_to(root) if root.is_dir() else Path(path.name)
        target = save_dir / rel.with_name(rel.name + ".jpg")
        k = 1
        while target in taken:
            target = save_dir / rel.with_name(f"{rel.name}.{k}.jpg")
            k += 1
        taken.add(target)
        names[path] = target
    return names


COLOURS = {"real": (40, 180, 70), "fake": (220, 40, 40), "unsure": (240, 170, 0)}


def annotate(rgb, face_rows, class_names):
    """The photo with every face boxed and labelled; a banner when it has no face."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.fromarray(rgb)
    draw = ImageDraw.Draw(im)
    side = max(im.size)
    font = ImageFont.load_default(size=max(12, side // 45))
    width = max(2, side // 300)
    kind = {class_names[0]: "real", class_names[1]: "fake", "unsure": "unsure"}
    for r in face_rows:
        if r["status"] != "ok":
            draw.text(
                (8, 8),
                "no face found",
                fill=(255, 255, 255),
                font=font,
                stroke_width=2,
                stroke_fill=(0, 0, 0),
            )
            continue
        colour = COLOURS[kind[r["label"]]]
        box = [r["x0"], r["y0"], r["x1"], r["y1"]]
        draw.rectangle(box, outline=colour, width=width)
        text = f"{r['label']} {r['prob_fake']:.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), text, font=font)
        y = box[1] - (bottom - top) - 2 * width if box[1] > bottom - top + 2 * width else box[3]
        draw.rectangle(
            [box[0], y, box[0] + right - left + 2 * width, y + bottom - top + 2 * width],
            fill=colour,
        )
        draw.text(
            (box[0] + width, y + width - (top - box[1])), text, fill=(255, 255, 255), font=font
        )
    return im


def save_annotated(rows, names, class_names, workers):
    """Decode each readable photo again (in threads) and write its annotated copy atomically."""
    by_path = {}
    for r in rows:
        if r["status"] != "unreadable":
            by_path.setdefault(r["path"], []).append(r)

    def one(path):
        rgb, _ = decode(path)
        if rgb is not None:
            im = annotate(rgb, by_path[path], class_names)
            atomic_write(names[path], lambda tmp: im.save(tmp, format="JPEG", quality=90))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, by_path))


def make_detector(meta):
    """The face detector the model's training data was framed with (None: whole images)."""
    if meta.get("faces", "whole") != "mtcnn":
        return None
    from common import FaceDetector, pick_device

    return FaceDetector(device=pick_device("auto"))


def classify_all(run, files, meta, args):
    """Every file through the detector and the model, with a progress bar: (rows, seconds)."""
    from tqdm import tqdm

    detector = make_detector(meta)
    start = time.perf_counter()
    with tqdm(
        total=len(files), unit="img", disable=args.quiet, file=sys.stderr, leave=False
    ) as bar:
        rows = classify(run, files, meta["image_size"], detector, args.batch, args.workers, bar)
    return rows, time.perf_counter() - start


def print_summary(args, summary, meta, threshold, band, images_per_s):
    wrote = [p for p in (None if args.csv == "-" else args.csv, args.json, args.save) if p]
    print(f"{summary['images']} images, {summary['faces']} faces: {summary['real']} real, "
          f"{summary['fake']} fake, {summary['unsure']} unsure (prob_fake {band[0]:.3f}-{band[1]:.3f}); "
          f"{summary['no_face']} without a face, {summary['unreadable']} unreadable. "
          f"{images_per_s:.1f} images/s ({meta['backend']}, {meta['precision']}, "
          f"threshold {threshold:.4f}, faces: {meta.get('faces', 'whole')})"
          + (f"; wrote {', '.join(map(str, wrote))}" if wrote else ""), file=sys.stderr)  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    try:
        check_destinations(args)
        files, roots = collect_files(args.paths)
        names = saved_copy_names(files, roots, args.save) if args.save else None
        run, meta = load_model(args.model)
        # An engine that fails mid-folder is an InferError too: one line, no traceback.
        rows, seconds = classify_all(run, files, meta, args)
    except InferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    threshold = meta["threshold"] if args.threshold is None else args.threshold
    band = meta["unsure_band"] if args.threshold is None else [threshold, threshold]
    for r in rows:
        if r["status"] == "unreadable":
            print(f"skipped {printable(r['path'])}: {r['reason']}", file=sys.stderr)
    if sum(r["status"] == "unreadable" for r in rows) == len(files):
        print(f"error: none of the {len(files)} files could be read as an image", file=sys.stderr)
        return 2
    label_rows(rows, threshold, band, meta["class_names"])
    summary = summarise(files, rows)
    try:
        write_predictions(args.csv, rows)
        if args.json:
            write_json(args.json, rows, summary, meta, threshold, band)
        if names:
            save_annotated(rows, names, meta["class_names"], args.workers)
    except OSError as exc:  # a disk that filled up, a folder removed meanwhile
        print(f"error: writing the results failed: {exc}", file=sys.stderr)
        return 2
    print_summary(args, summary, meta, threshold, band, len(files) / seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
