"""Loading a facecheck model for inference, whatever the file: one function per backend.

    run, meta = load_model("models/facecheck.onnx")   # .onnx, .engine / .plan or .pt
    logits = run(batch)   # float32 N x 3 x S x S in [0, 1] -> logits N x 2 (real, fake)

.onnx runs in ONNX Runtime (TensorRT, CUDA or CPU provider, the first one available),
.engine / .plan in TensorRT with CUDA buffers from cuda-python, .pt (a train.py checkpoint) in
PyTorch. meta is the model's deployment metadata (model.deployment_metadata: image_size,
threshold, unsure_band, class_names, faces, confident_calls, precision, ...) plus "backend".
An .onnx or .engine model needs numpy and ONNX Runtime or TensorRT + cuda-python, never torch:
nothing here imports torch unless a .pt model is loaded. A missing package is one ModelError
line that names what to install. infer.py, export.py and bench/ load models through here.
"""

import contextlib
import hashlib
import importlib
import io
import json
import os
import sys
import weakref
from pathlib import Path

import numpy as np

from common import CLASS_NAMES


class ModelError(Exception):
    """A model file that cannot be loaded or run here; str(exc) is the one-line reason."""


def need(module, message):
    """import module, or a ModelError with message (what needs it and how to install it)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise ModelError(message) from None
    except (ImportError, OSError) as exc:  # installed, but e.g. a shared library is missing
        raise ModelError(f"{message} ({module} fails to import: {first_line(exc)})") from None


def parse_metadata(props, source):
    """ONNX metadata_props or an engine's .json (all strings) -> the dict that
    model.deployment_metadata made. export.set_metadata writes text as it is and everything
    else as JSON, so each value is read back as JSON where it parses and kept as text where it
    does not (a text entry made only of digits, such as a git hash, comes back as a number;
    nothing reads those). Files from older exports lack some entries: they get the defaults
    that deployment_metadata gives an older checkpoint."""
    if props.get("format") != "facecheck" or "image_size" not in props:
        raise ModelError(
            f"{source}: no facecheck metadata (image_size, threshold); export the model with export.py"
        )
    meta = {}
    for key, text in props.items():
        try:
            meta[key] = json.loads(text)
        except ValueError:
            meta[key] = text
    try:
        meta["image_size"] = int(meta["image_size"])
        meta["threshold"] = float(meta["threshold"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{source}: unreadable facecheck metadata ({exc!r})") from None
    meta.setdefault("class_names", list(CLASS_NAMES))
    meta.setdefault("faces", "whole")
    meta.setdefault("precision", "fp32")
    meta.setdefault("confident_calls", None)
    meta["unsure_band"] = meta.get("unsure_band") or [meta["threshold"]] * 2
    return meta


def onnx_metadata(path):
    """An ONNX file's metadata_props as a dict of strings, read with ONNX Runtime (on the CPU)
    so that neither the onnx package nor torch is needed on a device."""
    ort = need("onnxruntime", f"reading {path} needs ONNX Runtime: pip install onnxruntime")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"{path}: not a usable ONNX model ({first_line(exc)})") from None
    return dict(session.get_modelmeta().custom_metadata_map)


def first_line(exc, limit=200):
    """ONNX Runtime's '... Load model from X failed:/src/model.cc:256 fn(...) reason' -> reason."""
    detail = (str(exc).strip().splitlines() or [""])[0].split("failed:")[-1]
    return (detail.rsplit(") ", 1)[-1] if detail.startswith("/") else detail)[:limit]


# ONNX Runtime


ORT_TRT_MAX_BATCH = 64  # the ONNX Runtime TensorRT EP's profile: batches 1..64, larger ones split
ORT_TRT_BASIC_OPTIONS = ("trt_engine_cache_enable", "trt_engine_cache_path")


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
    cache alone (ORT_TRT_BASIC_OPTIONS). A Q/DQ model asks for INT8 (trt_int8_enable) so that
    TensorRT 8.6's weakly typed builder accepts its Q/DQ nodes; an FP16 ONNX is FP16 by itself,
    an FP32 one stays FP32."""
    providers = []
    if "TensorrtExecutionProvider" in available:
        meta = parse_metadata(onnx_metadata(path), path)
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


def ort_session(ort, path, providers):
    """(InferenceSession, the fallback banner ONNX Runtime printed, "" if none). When a provider
    fails to start, ONNX Runtime's Python wrapper prints "EP Error ... Falling back to [...]" on
    stdout and quietly starts the session on its fallback providers instead of raising.
    enable_fallback=0 switches that off where ONNX Runtime knows the switch; older releases
    ignore it and fall back anyway, so their banner is caught here rather than let onto stdout,
    where `infer.py --csv -` writes the CSV."""
    banner = io.StringIO()
    with contextlib.redirect_stdout(banner):
        options = ort.SessionOptions()
        # Idle threads sleep instead of spinning: the CPU they would burn is the face finder's
        # (about 13 % of the classifier's CPU time, measured with bench/pipeline.py).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=providers, enable_fallback=0
        )
    return session, " ".join(banner.getvalue().replace("*", " ").split())


def load_onnx(path):
    ort = need("onnxruntime", f"{path}: .onnx models need ONNX Runtime: pip install onnxruntime")
    providers = ort_providers(path, ort.get_available_providers())
    name = lambda p: p[0] if isinstance(p, tuple) else p  # noqa: E731
    # Each try in turn while the session does not start on its first provider: all of them;
    # the TensorRT EP with the engine cache alone (only where an option was refused); then
    # ONNX Runtime's own fallback order (without TensorRT, then without CUDA), said on stderr.
    attempts = [(providers, False)]
    if isinstance(providers[0], tuple):
        basic = {k: v for k, v in providers[0][1].items() if k in ORT_TRT_BASIC_OPTIONS}
        attempts.append(([(name(providers[0]), basic), *providers[1:]], True))
    attempts += [(providers[i:], False) for i in range(1, len(providers))]
    problems, session = [], None
    for attempt, for_refused_options in attempts:
        if for_refused_options and "option" not in " ".join(problems).lower():
            continue
        try:
            session, fell_back = ort_session(ort, path, attempt)
        except Exception as exc:
            problems.append(first_line(exc))
            continue
        problems += [fell_back] if fell_back else []
        if session.get_providers()[0] == name(attempt[0]):
            break
    if session is None:
        raise ModelError(f"{path}: not a usable ONNX model ({problems[0]})")
    provider = session.get_providers()[0]
    if problems and provider != name(providers[0]):
        print(f"warning: ONNX Runtime could not start {name(providers[0])} "
              f"({problems[0][:300]}); running on {provider}", file=sys.stderr)  # fmt: skip
    elif problems:
        print(f"warning: this ONNX Runtime refused TensorRT EP options ({problems[0][:300]}); "
              "running with the engine cache alone", file=sys.stderr)  # fmt: skip
    meta = parse_metadata(session.get_modelmeta().custom_metadata_map, path)
    meta["backend"] = f"ONNX Runtime {provider}"
    step = ORT_TRT_MAX_BATCH if provider == "TensorrtExecutionProvider" else None

    def run(batch):
        try:  # an older ONNX Runtime's run-time fallback banner goes to stderr, not the CSV
            with contextlib.redirect_stdout(sys.stderr):
                n = step or max(len(batch), 1)
                parts = [
                    session.run(["logits"], {"input": batch[i : i + n]})[0]
                    for i in range(0, len(batch), n)
                ]
        except Exception as exc:
            raise ModelError(
                f"{path}: ONNX Runtime {provider} failed ({first_line(exc)})"
            ) from None
        return np.concatenate(parts)

    return run, meta


# TensorRT, with CUDA buffers from cuda-python


def cuda_runtime():
    """cuda-python's CUDA runtime module: cuda.bindings.runtime (cuda-python 12.6 on), or
    cuda.cudart (older releases)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise ModelError(
                "TensorRT engines need cuda-python for their GPU buffers: pip install "
                "cuda-python (the release whose major version is this device's CUDA's)"
            ) from None
    return runtime


def cuda_call(runtime, result, what):
    """cuda-python calls return (error, *values): the value(s), or a ModelError naming the call."""
    error, *values = result
    if error != runtime.cudaError_t.cudaSuccess:
        raise ModelError(f"CUDA {what} failed: {getattr(error, 'name', error)}")
    return values[0] if len(values) == 1 else values


def cuda_device(runtime=None):
    """{"name", "compute_capability"} of the current CUDA GPU: what a TensorRT engine is tied to,
    with the TensorRT version that built it."""
    rt = runtime or cuda_runtime()
    try:
        error, count = rt.cudaGetDeviceCount()
    except RuntimeError as exc:  # cuda-python without a driver: "Failed to dlopen libcuda.so.1"
        raise ModelError(f"no CUDA driver is usable ({str(exc).splitlines()[0][:120]})") from None
    if error != rt.cudaError_t.cudaSuccess or count < 1:
        raise ModelError(f"no CUDA GPU is visible ({getattr(error, 'name', error)})")
    index = cuda_call(rt, rt.cudaGetDevice(), "cudaGetDevice")
    prop = cuda_call(rt, rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = prop.name
    if isinstance(name, (bytes, bytearray)):  # char[256]: cut at the first NUL
        name = bytes(name).split(b"\0")[0].decode("utf-8", "replace")
    return {"name": str(name).strip(), "compute_capability": f"{prop.major}.{prop.minor}"}


ENGINE_BUILD_KEYS = ("tensorrt_version", "gpu_name", "gpu_compute_capability", "engine_sha256")


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
            raise ModelError(f"{sidecar}: unreadable ({exc})") from None
        build = {k: props.pop(k) for k in ENGINE_BUILD_KEYS if k in props}
        return parse_metadata(props, sidecar), {k: v for k, v in build.items() if v}
    if onnx_path.is_file():
        meta = parse_metadata(onnx_metadata(onnx_path), onnx_path)
        named = path.name.split(".")[-2] if path.name.count(".") >= 2 else ""
        meta["precision"] = named if named in ("fp16", "int8") else meta["precision"]
        return meta, {}
    raise ModelError(
        f"{path}: no metadata; expected {sidecar} (written by export.py --tensorrt) or {onnx_path}"
    )


def rebuild_hint(path):
    """How to rebuild engine path on this device from the ONNX file(s) next to it: export.py
    --tensorrt --from-onnx needs TensorRT and cuda-python, no checkpoint and no PyTorch."""
    path = Path(path)
    onnx_path = path.with_name(path.name.split(".")[0] + ".onnx")
    precision = path.name.split(".")[-2] if path.name.count(".") >= 2 else ""
    flag = {"fp16": " --fp16", "int8": " --int8"}.get(precision, "")
    return (
        f"rebuild it on this device: python export.py --tensorrt --from-onnx --out {onnx_path}"
        f"{flag} --engine {path} (or trtexec: python export.py --help)"
    )


def check_engine_build(path, build, plan, trt_version, device):
    """Refuse an engine whose sidecar says it was built elsewhere: another TensorRT version,
    another GPU model (name) or family (compute capability), or whose bytes are not the engine
    the sidecar describes. TensorRT engines are not portable across TensorRT versions or GPU
    models, and every Jetson Orin module is compute capability 8.7: the name tells them apart."""
    if build.get("tensorrt_version") and build["tensorrt_version"] != trt_version:
        raise ModelError(
            f"{path} was built with TensorRT {build['tensorrt_version']}, this is TensorRT "
            f"{trt_version}: an engine only runs on the TensorRT version that built it; "
            f"{rebuild_hint(path)}"
        )
    built_cc, built_name = build.get("gpu_compute_capability"), build.get("gpu_name")
    if (built_cc and built_cc != device["compute_capability"]) or (
        built_name and built_name != device["name"]
    ):
        raise ModelError(
            f"{path} was built on {built_name or 'a GPU'} (compute capability {built_cc or '?'}), "
            f"this is {device['name']} (compute capability {device['compute_capability']}): an "
            f"engine only runs on the GPU model that built it; {rebuild_hint(path)}"
        )
    if build.get("engine_sha256") and hashlib.sha256(plan).hexdigest() != build["engine_sha256"]:
        raise ModelError(
            f"{path} is not the engine {path}.json describes (a stale engine or sidecar from "
            f"another model or build); {rebuild_hint(path)}"
        )


def check_engine_io(path, engine, trt, image_size):
    """The engine must take what run() sends: a float32, linear (NCHW) tensor named input with
    a batch range starting at 1 and 3 x S x S images (S from its metadata), and write float
    logits. Returns the largest batch of its optimisation profile."""
    rebuild = rebuild_hint(path)
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if inputs != ["input"] or "logits" not in outputs:
        raise ModelError(
            f"{path}: inputs {inputs}, outputs {outputs}; a facecheck engine has input 'input' "
            f"and output 'logits' (an engine of another model?); {rebuild}"
        )
    for name, wanted in (("input", ("FLOAT",)), ("logits", ("FLOAT", "HALF"))):
        dtype = engine.get_tensor_dtype(name)
        if getattr(dtype, "name", str(dtype)).split(".")[-1] not in wanted:
            raise ModelError(
                f"{path}: its {name} is {dtype}, infer.py exchanges float32 (an engine built "
                f"with FP16 or INT8 I/O, e.g. trtexec --inputIOFormats); {rebuild}"
            )
        fmt = engine.get_tensor_format(name)
        if fmt != trt.TensorFormat.LINEAR:
            raise ModelError(
                f"{path}: its {name} has format {fmt}, infer.py exchanges linear (NCHW) "
                f"buffers (an engine built with --inputIOFormats=...:hwc/chw32?); {rebuild}"
            )
    if engine.num_optimization_profiles < 1:
        raise ModelError(f"{path}: no optimisation profile; {rebuild}")
    low, _, high = (tuple(d) for d in engine.get_tensor_profile_shape("input", 0))
    want = (3, image_size, image_size)
    if low[1:] != want or high[1:] != want:
        raise ModelError(
            f"{path}: takes images of {low[1:]} to {high[1:]}, its metadata says "
            f"{want} (a stale engine from another model?); {rebuild}"
        )
    if low[0] != 1 or high[0] < 1:
        raise ModelError(
            f"{path}: its batch range is {low[0]}..{high[0]}; infer.py needs batches from 1 "
            f"(the last batch of a folder is smaller); {rebuild} --max-batch N"
        )
    return int(high[0])


def trt_step(ok, what):
    """TensorRT's set_input_shape / set_tensor_address / execute_async_v3 return False on
    failure (and log why): stop with that instead of reading an output that was never written."""
    if not ok:
        raise ModelError(f"TensorRT {what} failed (TensorRT's log above says why)")


def load_engine(path):
    """A serialised TensorRT engine, run on the GPU with one device buffer per input and output,
    sized for the profile's largest batch and allocated once with cuda-python."""
    trt = need("tensorrt", f"{path}: TensorRT engines need the tensorrt package (on a Jetson "
                           "JetPack's python3-libnvinfer, elsewhere pip install tensorrt) and a "
                           "CUDA GPU; or use the .onnx model")  # fmt: skip
    rt = cuda_runtime()
    try:
        device = cuda_device(rt)
    except ModelError as exc:
        raise ModelError(f"{path}: TensorRT engines need a CUDA GPU: {exc}; use the .onnx model instead") from None  # fmt: skip
    meta, build = engine_metadata(path)
    plan = Path(path).read_bytes()
    check_engine_build(path, build, plan, trt.__version__, device)
    try:
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelError(
            f"{path}: TensorRT {trt.__version__} cannot load it ({first}); {rebuild_hint(path)}"
        ) from None
    if engine is None:
        raise ModelError(
            f"{path}: not an engine for this GPU / TensorRT {trt.__version__}; {rebuild_hint(path)}"
        )
    max_batch = check_engine_io(path, engine, trt, meta["image_size"])
    context = engine.create_execution_context()
    if context is None:
        raise ModelError(f"{path}: TensorRT could not create an execution context (GPU memory?)")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
    per_image = {"input": 3 * meta["image_size"] ** 2}
    for name in outputs:  # N x ... with the batch open: the rest is fixed
        dims = tuple(engine.get_tensor_shape(name))[1:]
        if any(d < 0 for d in dims):
            raise ModelError(f"{path}: output {name} has open dimensions {dims}; {rebuild_hint(path)}")  # fmt: skip
        per_image[name] = int(np.prod(dims, dtype=np.int64))
    stream = cuda_call(rt, rt.cudaStreamCreate(), "cudaStreamCreate")
    buffers = {}
    for name, count in per_image.items():
        nbytes = max_batch * count * dtypes[name].itemsize
        buffers[name] = cuda_call(rt, rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes})")
    to_gpu, to_host = (rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost)  # fmt: skip

    def run(batch):
        logits = []
        for start in range(0, len(batch), max_batch):
            # The engine reads the input's bytes as contiguous NCHW float32 (TensorFormat.LINEAR):
            # a channels-last view (what to_model_input's permute gives) must be copied first.
            chunk = np.ascontiguousarray(batch[start : start + max_batch], dtype=np.float32)
            trt_step(context.set_input_shape("input", chunk.shape),
                     f"set_input_shape(input, {chunk.shape})")  # fmt: skip
            cuda_call(rt, rt.cudaMemcpyAsync(buffers["input"], chunk.ctypes.data, chunk.nbytes,
                                             to_gpu, stream), "copying the input to the GPU")  # fmt: skip
            trt_step(context.set_tensor_address("input", buffers["input"]),
                     "set_tensor_address(input)")  # fmt: skip
            out = {}
            for name in outputs:
                shape = tuple(context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise ModelError(f"TensorRT left the shape of {name} open: {shape}")
                out[name] = np.empty(shape, dtypes[name])
                trt_step(context.set_tensor_address(name, buffers[name]),
                         f"set_tensor_address({name})")  # fmt: skip
            trt_step(context.execute_async_v3(int(stream)), "execute_async_v3")
            for name in outputs:
                cuda_call(rt, rt.cudaMemcpyAsync(out[name].ctypes.data, buffers[name],
                                                 out[name].nbytes, to_host, stream),
                          f"copying {name} from the GPU")  # fmt: skip
            cuda_call(rt, rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            logits.append(out["logits"].astype(np.float32))
        return np.concatenate(logits)

    def release(buffers=buffers, stream=stream):  # when run is dropped (or at exit)
        for pointer in buffers.values():
            rt.cudaFree(pointer)
        rt.cudaStreamDestroy(stream)

    weakref.finalize(run, release)
    # One warm-up image at load time: a context that cannot run fails here, inside the caller's
    # model-loading error handling, and the first real batch does not pay TensorRT's lazy setup.
    run(np.zeros((1, 3, meta["image_size"], meta["image_size"]), np.float32))
    meta["backend"] = f"TensorRT {trt.__version__}"
    return run, meta


# PyTorch (development): torch is imported here only


def load_torch(path):
    torch = need("torch", f"{path}: .pt checkpoints need PyTorch (requirements.txt); on a device "
                          "use the exported .onnx model")  # fmt: skip
    from common import pick_device
    from model import CheckpointError, deployment_metadata, load_checkpoint

    try:
        model, ckpt = load_checkpoint(path)  # weights_only: a pickle payload is refused, not run
    except CheckpointError as exc:
        raise ModelError(str(exc)) from None
    device = pick_device("auto")
    model.to(device)

    @torch.inference_mode()
    def run(batch):
        return model(torch.from_numpy(batch).to(device)).float().cpu().numpy()

    return run, {**deployment_metadata(ckpt), "backend": f"PyTorch {device.type}"}


LOADERS = {".onnx": load_onnx, ".engine": load_engine, ".plan": load_engine, ".pt": load_torch}


def load_model(path):
    """(run, meta): run(float32 N x 3 x S x S in [0, 1]) -> logits N x 2; meta from the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model {path} not found")
    if path.suffix.lower() not in LOADERS:
        raise ModelError(f"{path}: unknown model type; expected .onnx, .engine, .plan or .pt")
    return LOADERS[path.suffix.lower()](path)
