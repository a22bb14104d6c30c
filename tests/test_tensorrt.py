"""TensorRT paths without a GPU: export.build_engine and backends.py's engine loading and running
loop driven through a fake `tensorrt` module (tests/fake_tensorrt.py) that mimics the 8.6,
10.x and 11.x Python APIs, and a fake cuda-python runtime whose "GPU buffers" are host memory.
One test (or parametrised group) per defect of issues 17 (part 1) and 31 (item 5); the real-GPU
test at the end runs only where tensorrt, cuda-python and a CUDA GPU are present."""

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fake_tensorrt
import numpy as np
import onnx
import pytest
import torch
from conftest import ROOT
from onnx import TensorProto, helper, numpy_helper

import backends
import export
import infer
from common import to_model_input
from model import FaceCheckNet

SIZE = 32
GPU = {"name": "Orin (nvgpu)", "capability": (8, 7)}
REAL_CUDA_RUNTIME = backends.cuda_runtime


def random_model(attention=True, seed=0):
    torch.manual_seed(seed)
    model = FaceCheckNet({"image_size": SIZE, "attention": attention}).eval()
    if attention:
        model.attention.gamma.data.fill_(1.0)
    for m in model.modules():  # non-trivial batch norms, so that the folded convs have biases
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model


METADATA = {"format": "facecheck", "image_size": SIZE, "class_names": ["real", "fake"],
            "threshold": 0.5, "attention": True, "manifest_sha256": "abc"}  # fmt: skip


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    """fp32, fp16, int8 (TensorRT-ready) and int8-cpu ONNX files of one random model."""
    out = tmp_path_factory.mktemp("trt-onnx")
    model = random_model()
    fp32 = out / "facecheck.onnx"
    export.export_onnx(model, fp32, METADATA)
    fp16 = out / "facecheck.fp16.onnx"
    proto = export.convert_to_fp16(onnx.load(str(fp32)))
    export.set_metadata(proto, {p.key: p.value for p in proto.metadata_props}, "fp16")
    export.save_checked(proto, fp16)
    images = np.random.default_rng(0).integers(0, 256, (32, SIZE, SIZE, 3), dtype=np.uint8)
    paths = {"fp32": fp32, "fp16": fp16, "int8": out / "facecheck.int8-trt.onnx",
             "int8-cpu": out / "facecheck.int8.onnx"}  # fmt: skip
    export.quantize_int8(fp32, paths["int8"], images, target="tensorrt")
    export.quantize_int8(fp32, paths["int8-cpu"], images, target="cpu")
    return {"model": model, "paths": paths, "dir": out}


@pytest.fixture
def cpu_cuda(monkeypatch):
    """cuda-python's runtime as backends.cuda_runtime() finds it: the fake one, with one GPU
    (GPU) whose "device memory" is host memory the fake engine reads and writes."""
    runtime = fake_tensorrt.make_cudart(GPU["name"], GPU["capability"])
    monkeypatch.setattr(backends, "cuda_runtime", lambda: runtime)
    return runtime


@pytest.fixture
def fake_trt(monkeypatch, cpu_cuda):
    """install(version) puts a fake tensorrt of that version into sys.modules."""

    def install(version="10.3.0"):
        module = fake_tensorrt.make_module(version)
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        return module

    return install


def build(paths, tmp_path, precision="fp32", max_batch=8, name=None):
    """export.build_engine + write_engine_metadata, as export.main does. Returns the engine."""
    engine = tmp_path / (name or f"facecheck.{precision}.engine")
    result = export.build_engine(paths, engine, precision, SIZE, max_batch)
    export.write_engine_metadata(engine, result["onnx"], precision, result)
    return engine


def channels_last_batch(n, seed=0):
    """A channels-last view of an N x 3 x S x S float array: the layout an older
    to_model_input handed the engine, and any caller still may (a transposed NHWC array)."""
    images = np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    batch = (images.astype(np.float32) / np.float32(255.0)).transpose(0, 3, 1, 2)
    contiguous = np.ascontiguousarray(batch)
    np.testing.assert_array_equal(contiguous, to_model_input(images).numpy())
    return batch, contiguous


def ort_logits(path, x):
    return export.ort_session(path).run(["logits"], {"input": x})[0]


# Defect 1: the engine reads its input buffer as contiguous NCHW.


def test_engine_gets_a_contiguous_nchw_buffer(onnx_models, fake_trt, tmp_path):
    trt = fake_trt("10.3.0")
    engine = build(onnx_models["paths"], tmp_path, max_batch=4)
    run, meta = backends.load_model(engine)
    batch, contiguous = channels_last_batch(10)
    assert not batch.flags["C_CONTIGUOUS"]  # the layout that went wrong
    logits = run(batch)  # 10 images through a max-batch-4 engine: chunks 4, 4, 2
    seen = trt.record["inputs"][1:]  # the bytes behind each registered address, read as NCHW
    assert [len(x) for x in seen] == [4, 4, 2]  # (after load's one-image warm-up)
    np.testing.assert_array_equal(np.concatenate(seen), contiguous)
    np.testing.assert_allclose(
        logits, ort_logits(onnx_models["paths"]["fp32"], contiguous), atol=1e-5
    )
    assert meta["backend"] == "TensorRT 10.3.0" and meta["precision"] == "fp32"


def test_engine_folder_run_matches_onnx(onnx_models, fake_trt, tmp_path, capsys):
    """infer.main on a folder: classify -> engine loop, same probabilities as the .onnx model."""
    from conftest import synthetic_image

    fake_trt("10.3.0")
    engine = build(onnx_models["paths"], tmp_path, max_batch=4)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        synthetic_image("fake" if i % 2 else "real", i, 48).save(photos / f"{i}.png")
    probs = {}
    for name, model in (("engine", engine), ("onnx", onnx_models["paths"]["fp32"])):
        csv = tmp_path / f"{name}.csv"
        assert (
            infer.main(
                [str(photos), "--model", str(model), "--csv", str(csv), "--quiet", "--batch", "5"]
            )
            == 0
        )
        probs[name] = [line.split(",")[6] for line in csv.read_text().splitlines()[1:]]
    assert probs["engine"] == probs["onnx"]
    assert "TensorRT 10.3.0" in capsys.readouterr().err


# Defect 2: TensorRT-ready Q/DQ (float biases, per-channel weights, no 0-D Q/DQ) apart from
# the ONNX Runtime CPU model.


def qdq_facts(path):
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    weight_dq = [
        n for n in dq if n.input[0] in inits and inits[n.input[0]].data_type == TensorProto.INT8
    ]
    return model, inits, dq, q, weight_dq


def test_tensorrt_int8_model_keeps_biases_float(onnx_models):
    model, inits, dq, q, weight_dq = qdq_facts(onnx_models["paths"]["int8"])
    assert q and weight_dq
    assert not [
        n.name
        for n in dq
        if n.input[0] in inits and inits[n.input[0]].data_type == TensorProto.INT32
    ]
    produced = {o: n for n in model.graph.node for o in n.output}
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2]
    assert len([n for n in layers if not export.is_attention(n)]) >= 8  # all but attention's
    for conv in (n for n in layers if not export.is_attention(n)):
        bias = conv.input[2]  # a float initializer, not the output of a DequantizeLinear
        assert bias in inits and inits[bias].data_type == TensorProto.FLOAT, conv.name
        assert produced.get(bias) is None
        weight = produced[conv.input[1]]  # per-channel INT8 weights: one scale per output channel
        assert weight.op_type == "DequantizeLinear"
        scale = inits[weight.input[1]]
        assert len(scale.dims) == 1 and scale.dims[0] == inits[weight.input[0]].dims[0]
        assert next((a.i for a in weight.attribute if a.name == "axis"), 1) == 0
    for node in [
        *q,
        *dq,
    ]:  # scalar (0-D) activation scales, zero points of 0, no 0-D quantized data
        if node in weight_dq:
            continue
        assert not inits[node.input[1]].dims, node.name
        assert not np.any(onnx.numpy_helper.to_array(inits[node.input[2]])), node.name
    assert not [n.name for n in dq if n.input[0] in inits and not inits[n.input[0]].dims]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["precision"] == "int8" and meta["quantized_for"] == "tensorrt"


def test_cpu_int8_model_is_separate_and_both_run(onnx_models):
    """(Kept, not a defect.) The ONNX Runtime CPU model keeps INT32 biases and per-channel
    weights; both INT8 models run in ONNX Runtime close to FP32."""
    _, inits, dq, _, weight_dq = qdq_facts(onnx_models["paths"]["int8-cpu"])
    weights = [n for n in weight_dq if len(inits[n.input[0]].dims) >= 2]  # not the 0-D x4
    assert weights and all(len(inits[n.input[1]].dims) == 1 for n in weights)
    assert [
        n
        for n in dq
        if inits.get(n.input[0]) is not None and inits[n.input[0]].data_type == TensorProto.INT32
    ]

    # The CPU model's activations are UINT8 with a zero point (U8S8: ONNX Runtime's fast kind on
    # x86, where the TensorRT-style S8S8 copy ran slower than FP32) and its weights 7-bit
    # (reduce_range: no 16-bit saturation without VNNI); the TensorRT model's take the full
    # INT8 range, activations with zero point 0.
    def activations_and_widest_weight(key):
        _, inits, _, q, weight_dq = qdq_facts(onnx_models["paths"][key])
        points = [numpy_helper.to_array(inits[n.input[2]]) for n in q]
        widest = max(np.abs(numpy_helper.to_array(inits[n.input[0]])).max() for n in weight_dq)
        return {p.dtype.type for p in points}, {int(v) for p in points for v in p.ravel()}, widest

    types, points, widest = activations_and_widest_weight("int8-cpu")
    assert types == {np.uint8} and points - {0} and widest <= 64
    types, points, widest = activations_and_widest_weight("int8")
    assert types == {np.int8} and points == {0} and widest > 64
    _, contiguous = channels_last_batch(8)
    reference = ort_logits(onnx_models["paths"]["fp32"], contiguous)
    for key in ("int8", "int8-cpu"):
        assert np.abs(ort_logits(onnx_models["paths"][key], contiguous) - reference).max() < 0.5


@pytest.mark.parametrize("version", ["8.6.1", "10.3.0"])
def test_tensorrt_parses_the_tensorrt_int8_model(onnx_models, fake_trt, tmp_path, version):
    trt = fake_trt(version)
    engine = build(onnx_models["paths"], tmp_path, "int8")
    assert trt.record["parsed"] == str(onnx_models["paths"]["int8"])
    assert trt.record["engine_precision"] == "int8"
    assert json.loads(engine.with_name(engine.name + ".json").read_text())["precision"] == "int8"


# Defect 3: set_input_shape / set_tensor_address / execute_async_v3 results are checked.


@pytest.mark.parametrize("fault, call", [("set_input_shape", "set_input_shape"),
                                         ("set_tensor_address", "set_tensor_address"),
                                         ("execute", "execute_async_v3")])  # fmt: skip
def test_tensorrt_call_failures_stop_with_a_message(onnx_models, fake_trt, tmp_path, fault, call):
    trt = fake_trt("10.3.0")
    run, _ = backends.load_model(build(onnx_models["paths"], tmp_path))
    trt.faults[fault] = True
    with pytest.raises(backends.ModelError, match=call):
        run(channels_last_batch(2)[0])


def test_an_engine_that_cannot_run_fails_at_load_in_one_line(
    onnx_models, fake_trt, tmp_path, capsys
):
    from conftest import synthetic_image

    trt = fake_trt("10.3.0")
    engine = build(onnx_models["paths"], tmp_path)
    trt.faults["execute"] = True
    synthetic_image("real", 0, 40).save(tmp_path / "a.png")
    assert infer.main([str(tmp_path / "a.png"), "--model", str(engine), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "execute_async_v3 failed" in err


def test_batches_are_split_at_the_engine_max(onnx_models, fake_trt, tmp_path):
    """(Not a defect: kept working.) Batches larger than the profile's max are split, so
    set_input_shape only ever sees shapes inside the profile."""
    trt = fake_trt("10.3.0")
    run, _ = backends.load_model(build(onnx_models["paths"], tmp_path, max_batch=2))
    assert run(channels_last_batch(5)[0]).shape == (5, 2)
    assert [shape[0] for _, shape in trt.record["set_input_shape"]] == [1, 2, 2, 1]  # warm-up first


# Defect 4: the engine's input name, dtype, format and shape range are checked at load time;
# export.py's --max-batch and friends are validated.


@pytest.mark.parametrize("override, message", [
    ({"input_dtype": "HALF"}, "float32"),
    ({"min_batch": 4}, "batch range is 4"),
    ({"image_size": 64}, "stale engine"),
    ({"input_name": "images"}, "input 'input'"),
    ({"format": "CHW32"}, "linear"),
])  # fmt: skip
def test_engine_interface_is_checked_when_loaded(
    onnx_models, fake_trt, tmp_path, override, message
):
    trt = fake_trt("10.3.0")
    trt.engine_overrides.update(override)
    engine = build(onnx_models["paths"], tmp_path)
    with pytest.raises(backends.ModelError, match=message) as exc:
        backends.load_model(engine)
    assert "rebuild" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("args", [["--max-batch", "0"], ["--max-batch", "-3"], ["--max-batch", "100000"],
                                  ["--calib-count", "0"], ["--int8-max-drop", "-1"],
                                  ["--int8-max-drop", "nan"], ["--tensorrt", "--engine", "m.onnx"],
                                  ["--engine", "m.engine"]])  # fmt: skip
def test_engine_flags_are_validated(args, capsys):
    with pytest.raises(SystemExit) as exc:
        export.parse_args(["--checkpoint", "x.pt", *args])
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err


# Defect 5: the sidecar records the engine's precision, TensorRT version and GPU; a mismatch is
# refused with a message that says to rebuild.


@pytest.fixture
def checkpoint(tmp_path):
    model = random_model()
    path = tmp_path / "best.pt"
    torch.save({"format": "facecheck", "model": model.state_dict(), "config": model.config,
                "image_size": SIZE, "threshold": 0.5}, path)  # fmt: skip
    return path


def export_main(monkeypatch, args):
    """export.main with TensorRT taken as present (tensorrt_problem asks the real packages)."""
    with monkeypatch.context() as m:
        m.setattr(export, "tensorrt_problem", lambda: None)
        return export.main(args)


def test_sidecar_records_precision_version_and_gpu(
    checkpoint, fake_trt, tmp_path, capsys, monkeypatch
):
    fake_trt("10.3.0")
    out = tmp_path / "facecheck.onnx"
    rc = export_main(monkeypatch, ["--checkpoint", str(checkpoint), "--out", str(out), "--tensorrt",
                                   "--fp16", "--max-batch", "16"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    engine = tmp_path / "facecheck.fp16.engine"
    sidecar = json.loads((tmp_path / "facecheck.fp16.engine.json").read_text())
    assert sidecar["precision"] == "fp16" and sidecar["tensorrt_version"] == "10.3.0"
    assert sidecar["gpu_name"] == GPU["name"] and sidecar["gpu_compute_capability"] == "8.7"
    assert sidecar["max_batch"] == "16" and sidecar["threshold"] == "0.5"
    run, meta = backends.load_model(engine)
    assert meta["precision"] == "fp16"


@pytest.mark.parametrize("change, message", [("version", "TensorRT 10.3.0, this is TensorRT 10.4.0"),
                                             ("gpu", "compute capability 8.7"),
                                             ("gpu_name", "built on Orin \\(nvgpu\\)"),
                                             ("engine", "not the engine")])  # fmt: skip
def test_engine_from_elsewhere_is_refused(
    onnx_models, fake_trt, tmp_path, monkeypatch, change, message
):
    """Issue 31: every Orin module is compute capability 8.7, so the GPU's name is checked too
    ("gpu_name": same capability, another module); the hint rebuilds from the ONNX next to the
    engine with export.py --tensorrt --from-onnx (no checkpoint, no PyTorch on the device)."""
    fake_trt("10.3.0")
    engine = build(onnx_models["paths"], tmp_path)
    if change == "version":
        fake_trt("10.4.0")
    elif change in ("gpu", "gpu_name"):
        other = ("Orin (nvgpu)", (9, 0)) if change == "gpu" else ("NVIDIA Jetson Orin NX", (8, 7))
        runtime = fake_tensorrt.make_cudart(*other)
        monkeypatch.setattr(backends, "cuda_runtime", lambda: runtime)
    else:
        engine.write_bytes(engine.read_bytes().replace(b'"max": [8', b'"max": [9'))
    with pytest.raises(backends.ModelError, match=message) as exc:
        backends.load_model(engine)
    text = str(exc.value)
    assert "rebuild it on this device" in text and "\n" not in text
    onnx_path = tmp_path / "facecheck.onnx"
    assert f"python export.py --tensorrt --from-onnx --out {onnx_path} --engine {engine}" in text
    assert "--checkpoint" not in text


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engine_from_exported_onnx_on_the_device(
    onnx_models, fake_trt, tmp_path, monkeypatch, precision
):
    """The Jetson route without trtexec: export.py --tensorrt --from-onnx, no checkpoint."""
    fake_trt("8.6.1")
    engine = tmp_path / f"facecheck.{precision}.engine"
    out = onnx_models["paths"]["fp32"]
    monkeypatch.setattr(export, "tensorrt_problem", lambda: None)
    args = [
        "--from-onnx",
        "--out",
        str(out),
        "--tensorrt",
        f"--{precision}",
        "--engine",
        str(engine),
    ]
    assert export.main(args) == 0
    run, meta = backends.load_model(engine)
    assert meta["precision"] == precision and run(channels_last_batch(3)[0]).shape == (3, 2)


# Defect 6: FP16 / INT8 through the strongly typed network where weak typing is deprecated
# (10.12) or gone (11.x); the weak path on 8.6 / 10.x.


@pytest.mark.parametrize("version", ["8.6.1", "10.3.0", "10.12.0", "11.4.0"])
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_precision_path_per_tensorrt_version(onnx_models, fake_trt, tmp_path, version, precision):
    trt = fake_trt(version)
    paths = onnx_models["paths"]
    engine = build(paths, tmp_path, precision)
    strong = version in ("10.12.0", "11.4.0")
    assert trt.record["strongly_typed"] == strong
    assert trt.record["deprecated"] == [] and trt.record["errors"] == []
    assert trt.record["engine_precision"] == precision
    assert ("EXPLICIT_BATCH" in trt.record["network_flags"]) == version.startswith("8.")
    if strong:
        assert trt.record["parsed"] == str(paths[precision])
        assert not trt.record["builder_flags"] & {"FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"}
    else:
        assert trt.record["parsed"] == str(paths["fp32" if precision == "fp16" else "int8"])
        assert trt.record["builder_flags"] >= {precision.upper(), "OBEY_PRECISION_CONSTRAINTS"}
        if precision == "fp16":  # the attention block pinned to FP32
            assert trt.record["layer_precision"] and all(
                "attention" in name for name in trt.record["layer_precision"]
            )
    run, meta = backends.load_model(engine)
    batch, contiguous = channels_last_batch(3)
    reference = ort_logits(trt.record["parsed"], contiguous)
    np.testing.assert_allclose(run(batch), reference, atol=1e-4)
    assert meta["precision"] == precision


# Defect 7: ONNX files at the lowest IR version opset 17 allows (IR 8).


def test_onnx_files_use_ir_8(onnx_models, fake_trt, tmp_path):
    for key, path in onnx_models["paths"].items():
        model = onnx.load(str(path))
        assert model.ir_version == 8 == helper.find_min_ir_version_for(list(model.opset_import)), (
            key
        )
        onnx.checker.check_model(model, full_check=True)
        export.ort_session(path)
    trt = fake_trt("8.6.1")  # its parser reads IR <= 8
    build(onnx_models["paths"], tmp_path)
    assert trt.record["parsed"] == str(onnx_models["paths"]["fp32"])


# Defect 8: every parser error is shown; other TensorRT exceptions are one readable line.


def test_all_parser_errors_are_shown(onnx_models, fake_trt, tmp_path):
    fake_trt("10.3.0")
    paths = {**onnx_models["paths"], "int8": onnx_models["paths"]["int8-cpu"]}  # INT32 biases
    biases = [n.name for n in onnx.load(str(paths["int8"])).graph.node
              if n.op_type == "DequantizeLinear" and "bias" in n.name]  # fmt: skip
    assert len(biases) >= 3
    with pytest.raises(export.ExportError) as exc:
        export.build_engine(paths, tmp_path / "m.engine", "int8", SIZE)
    text = str(exc.value)
    assert f"({len(biases)} errors)" in text and all(name in text for name in biases)


def test_tensorrt_exceptions_are_one_line(checkpoint, fake_trt, tmp_path, capsys, monkeypatch):
    trt = fake_trt("10.3.0")
    trt.faults["build_raises"] = "CUDA initialization failure with error: 35\nat builder.cpp:12"
    out = tmp_path / "m.onnx"
    assert (
        export_main(monkeypatch, ["--checkpoint", str(checkpoint), "--out", str(out), "--tensorrt"])
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "RuntimeError: CUDA initialization failure with error: 35" in err


def test_any_tensorrt_exception_in_the_build_is_one_line(onnx_models, fake_trt, tmp_path):
    trt = fake_trt("8.6.1")
    trt.faults["set_shape_raises"] = (
        "set_shape(): incompatible function arguments.\nInvoked with: ..."
    )
    with pytest.raises(export.ExportError) as exc:
        export.build_engine(onnx_models["paths"], tmp_path / "m.engine", "fp32", SIZE)
    assert (
        str(exc.value) == "TensorRT 8.6.1: TypeError: set_shape(): incompatible function arguments."
    )


def test_engine_load_exceptions_are_one_line(onnx_models, fake_trt, tmp_path, capsys):
    trt = fake_trt("10.3.0")
    engine = build(onnx_models["paths"], tmp_path)
    trt.faults["deserialize_raises"] = "std::bad_alloc"
    photo = tmp_path / "a.png"
    from conftest import synthetic_image

    synthetic_image("real", 0, 40).save(photo)
    assert infer.main([str(photo), "--model", str(engine), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "std::bad_alloc" in err and "rebuild" in err


# Defect 9: the ONNX Runtime TensorRT EP gets an engine cache and a profile.


def test_onnxruntime_tensorrt_ep_options(onnx_models, monkeypatch, tmp_path):
    import onnxruntime as ort

    seen, real = [], ort.InferenceSession

    class Session:  # records the providers, runs on the CPU
        def __init__(self, path, providers, **kwargs):
            seen.append(providers)
            self.inner = real(path, providers=["CPUExecutionProvider"])
            self.names = [p if isinstance(p, str) else p[0] for p in providers]

        def get_providers(self):
            return self.names

        def __getattr__(self, name):
            return getattr(self.inner, name)

    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    monkeypatch.setattr(ort, "InferenceSession", Session)
    monkeypatch.setenv("FACECHECK_TRT_CACHE", str(tmp_path / "cache"))
    for _ in range(2):  # the second load finds the same cache
        run, meta = backends.load_model(onnx_models["paths"]["int8"])
    seen = [p for p in seen if p != ["CPUExecutionProvider"]]  # not the metadata reads
    assert seen[0] == seen[1]
    name, options = seen[0][0]
    assert name == "TensorrtExecutionProvider" and [p for p in seen[0][1:]] == available[1:]
    assert options["trt_engine_cache_enable"] and options["trt_timing_cache_enable"]
    assert (
        options["trt_engine_cache_path"] == str(tmp_path / "cache")
        and (tmp_path / "cache").is_dir()
    )
    assert options["trt_profile_min_shapes"] == f"input:1x3x{SIZE}x{SIZE}"
    assert options["trt_profile_max_shapes"] == f"input:64x3x{SIZE}x{SIZE}"
    assert (
        options["trt_int8_enable"] and meta["backend"] == "ONNX Runtime TensorrtExecutionProvider"
    )
    assert (
        "trt_timing_cache_path" not in options
    )  # unknown to older ORT; the engine cache path serves
    batch, contiguous = channels_last_batch(70)  # split at the profile's 64
    np.testing.assert_allclose(
        run(contiguous), ort_logits(onnx_models["paths"]["int8"], contiguous), atol=1e-6
    )


def test_older_onnxruntime_gets_the_engine_cache_alone(onnx_models, monkeypatch, tmp_path):
    import onnxruntime as ort

    seen, real = [], ort.InferenceSession

    def session(path, providers, **kwargs):
        seen.append(providers)
        if "trt_profile_min_shapes" in providers[0][1]:  # what ONNX Runtime 1.14 says
            raise RuntimeError("Invalid TensorRT EP option: trt_profile_min_shapes")
        return real(path, providers=["CPUExecutionProvider"])

    available = ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setenv("FACECHECK_TRT_CACHE", str(tmp_path / "cache"))
    backends.load_model(onnx_models["paths"]["fp32"])
    seen = [p for p in seen if p != ["CPUExecutionProvider"]]  # not the metadata read
    assert seen[1][0] == (
        "TensorrtExecutionProvider",
        {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(tmp_path / "cache")},
    )


# Issue 31, item 5: ONNX Runtime's own fallback, the optimisation profile's return value, the
# rebuild hint (above, with the GPU name), CUDA buffers from cuda-python, no torch on the device.


@pytest.mark.parametrize("old_release", [False, True])
def test_tensorrt_ep_refusing_options_is_retried_off_stdout(
    onnx_models, monkeypatch, tmp_path, capfd, old_release
):
    """ONNX Runtime's own InferenceSession, with only the provider start faked: a TensorRT EP
    that refuses the profile options (as ONNX Runtime <= 1.14 does). ONNX Runtime's wrapper
    catches that itself, prints "EP Error ... Falling back" on stdout and starts on its fallback
    providers, so a retry that waits for an exception never runs. With enable_fallback=0 it
    raises instead; a release that does not know that switch (old_release) still falls back.
    Either way stdout stays clean (infer.py --csv - writes the CSV there) and the session is
    retried with the engine cache alone."""
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_inference_collection as collection

    real_create, seen = collection.InferenceSession._create_inference_session, []

    def create(self, providers, provider_options, disabled_optimizers=None):
        seen.append(providers)
        self._fallback_providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        tensorrt = [p for p in providers if p[0] == "TensorrtExecutionProvider"]
        if tensorrt and "trt_profile_min_shapes" in tensorrt[0][1]:
            raise RuntimeError("Invalid TensorRT EP option: trt_profile_min_shapes")
        real_create(self, ["CPUExecutionProvider"], None, disabled_optimizers)
        self._providers = [p if isinstance(p, str) else p[0] for p in providers]  # all started

    monkeypatch.setattr(collection.InferenceSession, "_create_inference_session", create)
    if old_release:
        real_init = collection.InferenceSession.__init__

        def init(self, path, sess_options=None, providers=None, provider_options=None, **kw):
            kw.pop("enable_fallback", None)
            real_init(self, path, sess_options, providers, provider_options, **kw)

        monkeypatch.setattr(collection.InferenceSession, "__init__", init)
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    monkeypatch.setenv("FACECHECK_TRT_CACHE", str(tmp_path / "cache"))
    run, meta = backends.load_model(onnx_models["paths"]["fp32"])
    out, err = capfd.readouterr()
    assert out == ""
    assert meta["backend"] == "ONNX Runtime TensorrtExecutionProvider"
    basic = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(tmp_path / "cache")}
    assert seen[-1][0] == ("TensorrtExecutionProvider", basic)
    assert len(err.strip().splitlines()) == 1 and "trt_profile_min_shapes" in err
    assert run(channels_last_batch(3)[1]).shape == (3, 2)


def test_a_refused_optimisation_profile_stops_the_build(onnx_models, fake_trt, tmp_path):
    trt = fake_trt("10.3.0")
    trt.faults["profile_refused"] = True  # add_optimization_profile returns -1
    with pytest.raises(export.ExportError, match="refused the optimisation profile"):
        export.build_engine(onnx_models["paths"], tmp_path / "m.engine", "fp32", SIZE, 8)
    assert not (tmp_path / "m.engine").exists()


def test_engine_buffers_come_from_cuda_python(onnx_models, fake_trt, cpu_cuda, tmp_path):
    """One device buffer per input and output, sized for the profile's largest batch, allocated
    once and freed with the runner; the stream handed to TensorRT is cuda-python's."""
    import gc

    trt = fake_trt("10.3.0")
    run, _ = backends.load_model(build(onnx_models["paths"], tmp_path, max_batch=4))
    run(channels_last_batch(9)[0])
    calls = [name for name, _ in cpu_cuda.record["calls"]]
    assert calls.count("cudaMalloc") == 3 and calls.count("cudaStreamCreate") == 1
    sizes = sorted(cpu_cuda.record["allocations"].values())
    assert sizes == sorted([4 * 3 * SIZE * SIZE * 4, 4 * 2 * 4, 4 * 4])  # input, logits, prob
    assert set(trt.record["executed"]) == {7}
    del run
    gc.collect()
    assert sorted(cpu_cuda.record["freed"]) == sorted(cpu_cuda.record["allocations"])


@pytest.mark.parametrize("missing", ["cuda-python", "gpu"])
def test_engine_without_cuda_python_or_gpu_is_one_line(
    onnx_models, fake_trt, cpu_cuda, tmp_path, monkeypatch, capsys, missing
):
    from conftest import synthetic_image

    fake_trt("10.3.0")
    engine = build(onnx_models["paths"], tmp_path)
    if missing == "gpu":
        cpu_cuda.faults["no_device"] = True
    else:
        for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
            monkeypatch.setitem(sys.modules, name, None)  # `import cuda...` fails
        monkeypatch.setattr(backends, "cuda_runtime", REAL_CUDA_RUNTIME)
    synthetic_image("real", 0, 40).save(tmp_path / "a.png")
    assert infer.main([str(tmp_path / "a.png"), "--model", str(engine), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert ("pip install cuda-python" if missing == "cuda-python" else "need a CUDA GPU") in err


def test_fake_cuda_runtime_has_the_real_call_shapes(cpu_cuda):
    """Where cuda-python is installed (torch's CUDA wheels bring it), every call the fake
    implements takes the same arguments and returns the same (cudaError_t, *values) tuple as the
    real one, with or without a GPU (without one each returns an error code)."""
    try:
        from cuda.bindings import runtime as real
    except ImportError:
        pytest.skip("cuda-python is not installed here")
    host = np.zeros(4, np.float32)
    for rt in (cpu_cuda, real):
        shapes = {}
        error, stream = rt.cudaStreamCreate()
        stream = stream if error == rt.cudaError_t.cudaSuccess else rt.cudaStream_t(0)
        error, pointer = rt.cudaMalloc(16)
        pointer = pointer if error == rt.cudaError_t.cudaSuccess else 0
        kinds = rt.cudaMemcpyKind
        calls = {
            "cudaGetDeviceCount": (), "cudaGetDevice": (), "cudaGetDeviceProperties": (0,),
            "cudaMemcpyAsync": (pointer, host.ctypes.data, 0, kinds.cudaMemcpyHostToDevice, stream),
            "cudaStreamSynchronize": (stream,), "cudaFree": (pointer,),
        }  # fmt: skip
        for name, args in calls.items():
            result = getattr(rt, name)(*args)
            assert isinstance(result, tuple) and isinstance(result[0], rt.cudaError_t), name
            shapes[name] = len(result)
        assert int(stream) >= 0 and int(rt.cudaError_t.cudaSuccess) == 0
        if rt is cpu_cuda:
            fake_shapes = shapes
    assert shapes == fake_shapes


def test_engine_from_onnx_needs_no_torch(onnx_models, tmp_path):
    """export.py --tensorrt --from-onnx and infer.py with the engine, in a Python where torch
    cannot be imported (the fakes stand in for TensorRT and cuda-python)."""
    from conftest import synthetic_image

    shutil.copy(onnx_models["paths"]["fp32"], tmp_path / "facecheck.onnx")
    shutil.copy(onnx_models["paths"]["fp16"], tmp_path / "facecheck.fp16.onnx")
    synthetic_image("fake", 1, 40).save(tmp_path / "a.png")
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    (poisoned / "torch.py").write_text("raise ImportError('torch was imported')\n")
    out, engine = tmp_path / "facecheck.onnx", tmp_path / "facecheck.fp16.engine"
    driver = "\n".join([
        "import sys",
        f"sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT)!r}]",
        "import fake_tensorrt, backends, export, infer",
        "sys.modules['tensorrt'] = fake_tensorrt.make_module('10.3.0')",
        "runtime = fake_tensorrt.make_cudart()",
        "backends.cuda_runtime = lambda: runtime",
        f"assert export.main(['--tensorrt', '--from-onnx', '--fp16', '--out', {str(out)!r}]) == 0",
        f"assert infer.main([{str(tmp_path / 'a.png')!r}, '--model', {str(engine)!r}, "
        f"'--csv', {str(tmp_path / 'p.csv')!r}, '--quiet']) == 0",
        "assert 'torch' not in sys.modules",
    ])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(poisoned)}
    result = subprocess.run([sys.executable, "-c", driver], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].endswith(",ok")


# Part 3: the inference path must run on a Jetson's Python (3.10 on JetPack 6, 3.8 on JetPack 5).

INFERENCE_FILES = ["infer.py", "backends.py", "calibrate.py", "common.py", "model.py"]


def test_inference_path_lints_for_python_38():
    """ruff (pinned in requirements.txt, so CI always has it) with Python 3.8 as the target:
    syntax newer than 3.8 (E9) and PEP 585/604 annotations that 3.8 would evaluate (FA102)."""
    beside = Path(sys.executable).parent / "ruff"  # the virtual environment's
    ruff = str(beside) if beside.is_file() else shutil.which("ruff")
    result = subprocess.run([ruff, "check", "--no-cache", "--target-version", "py38",
                             "--select", "E9,F,UP,FA", *INFERENCE_FILES],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:]


def interpreter(version):
    """A working python<version> (a pyenv shim that is not activated does not count), or None."""
    candidates = [shutil.which(f"python{version}"), f"/usr/bin/python{version}",
                  *sorted(glob.glob(str(Path.home() / f".pyenv/versions/{version}.*/bin/python")))]  # fmt: skip
    for candidate in filter(None, candidates):
        try:
            result = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                    capture_output=True, text=True, timeout=30)  # fmt: skip
        except OSError:
            continue
        if result.returncode == 0 and result.stdout.strip() == version:
            return candidate
    return None


@pytest.mark.parametrize("version", ["3.10", "3.8"])
def test_inference_path_compiles_on_jetson_python(version):
    python = interpreter(version)
    if python is None:
        pytest.skip(f"no python{version} interpreter here (the ruff py38 check above still runs)")
    code = "import sys\nfor f in sys.argv[1:]:\n    compile(open(f, encoding='utf-8').read(), f, 'exec')"
    result = subprocess.run([python, "-c", code, *INFERENCE_FILES], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]


# Real hardware: only where tensorrt imports and a CUDA GPU is visible.


@pytest.mark.gpu
@pytest.mark.skipif(
    export.tensorrt_problem() is not None, reason="needs tensorrt, cuda-python and a CUDA GPU"
)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_real_engine_parity(onnx_models, tmp_path, precision):
    engine = build(onnx_models["paths"], tmp_path, precision, max_batch=16)
    run, meta = backends.load_model(engine)
    batch, contiguous = channels_last_batch(20)
    reference = ort_logits(onnx_models["paths"]["fp32"], contiguous)
    limit = {"fp32": 1e-3, "fp16": 5e-2, "int8": 0.5}[precision]
    assert np.abs(run(batch) - reference).max() < limit and meta["precision"] == precision
