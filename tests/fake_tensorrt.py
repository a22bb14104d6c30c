"""Stand-ins for the `tensorrt` and `cuda-python` packages, for tests on machines without a GPU.

make_module(version) returns a module that mimics the parts of the TensorRT 8.6, 10.x and 11.x
Python APIs that export.build_engine and backends.load_engine use, version by version:

    8.6    EXPLICIT_BATCH must be asked for; no STRONGLY_TYPED; weak typing (BuilderFlag.FP16,
           INT8, OBEY_PRECISION_CONSTRAINTS); ParserError has node() but no node_name();
           the parser reads ONNX IR <= 8 and refuses a DequantizeLinear of a 0-D constant.
    10.x   explicit batch implied; STRONGLY_TYPED exists; from 10.12 the weak-typing flags are
           deprecated (logged as such); ParserError.node_name() / node_operator().
    11.x   BuilderFlag.FP16 / INT8 / OBEY_PRECISION_CONSTRAINTS removed; every network is
           strongly typed (the STRONGLY_TYPED flag is accepted and ignored).
    all    the parser refuses a DequantizeLinear with INT32 input (a quantised bias), reporting
           one error per such node.

It records what the code called (network flags, builder flags, profile shapes, layer precisions,
input shapes, tensor addresses) in module.record. The "engine" it serialises is a JSON plan that
names the ONNX file it came from; its execution context reads the input through the address
and shape the code registered, as contiguous NCHW bytes (TensorFormat.LINEAR), computes the
outputs with ONNX Runtime on that ONNX file and writes them to the registered output addresses.

make_cudart(name, capability) returns cuda-python's runtime module (cuda.bindings.runtime) as
far as backends.py uses it: every call returns (cudaError_t, *values) as the real one does;
"device memory" is host memory from ctypes, so the addresses the fake engine reads and writes
are real, and a copy that runs past an allocation is an error instead of a corruption. It
records the calls in module.record; module.faults = {"no_device": True, "malloc": True}.

Faults for tests: module.faults = {"set_input_shape": True, "set_tensor_address": True,
"execute": True, "build_raises": "message", "set_shape_raises": "message",
"deserialize_raises": "message", "profile_refused": True} and engine
overrides at build time, module.engine_overrides = {"input_dtype": "HALF", "min_batch": 4,
"format": "CHW32", "input_name": "images", "image_size": 64}.
"""

import ctypes
import importlib.machinery
import json
import types

import numpy as np
import onnx
from onnx import TensorProto

MAGIC = b"FAKETRT1"


class _Member:
    def __init__(self, owner, name, value):
        self.owner, self.name, self.value = owner, name, value

    def __int__(self):
        return self.value

    def __index__(self):
        return self.value

    def __eq__(self, other):
        return isinstance(other, _Member) and (self.owner, self.name) == (other.owner, other.name)

    def __hash__(self):
        return hash((self.owner, self.name))

    def __repr__(self):
        return f"{self.owner}.{self.name}"


def _enum(owner, *names):
    return types.SimpleNamespace(**{n: _Member(owner, n, i) for i, n in enumerate(names)})


def make_module(version="10.3.0"):
    major, minor = (int(p) for p in version.split(".")[:2])
    trt = types.ModuleType("tensorrt")
    # torch._dynamo looks up the spec of every module named like a backend it knows
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = version
    trt.record = {"logs": [], "deprecated": [], "errors": []}
    trt.faults = {}
    trt.engine_overrides = {}

    DataType = _enum("DataType", "FLOAT", "HALF", "INT8", "INT32", "BOOL")
    trt.DataType = DataType
    trt.float32, trt.float16, trt.int8, trt.int32 = (
        DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32,
    )  # fmt: skip
    numpy_types = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32}
    trt.nptype = lambda dtype: numpy_types[dtype.name]
    trt.TensorIOMode = _enum("TensorIOMode", "NONE", "INPUT", "OUTPUT")
    trt.TensorFormat = _enum("TensorFormat", "LINEAR", "CHW2", "HWC8", "CHW4", "CHW16", "CHW32")
    trt.MemoryPoolType = _enum("MemoryPoolType", "WORKSPACE", "DLA_MANAGED_SRAM")
    flags = ["EXPLICIT_BATCH"] if major < 11 else []
    flags += ["STRONGLY_TYPED"] if major >= 10 else []
    trt.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", *flags)
    builder_flags = ["DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32"]
    weak = ["FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"]
    trt.BuilderFlag = _enum("BuilderFlag", *builder_flags, *(weak if major < 11 else []))
    deprecated_weak = (major, minor) >= (10, 12)
    max_ir, max_opset = (8, 17) if major < 10 else (10, 22) if major < 11 else (11, 24)

    def log(message):
        trt.record["logs"].append(message)

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, severity=2):
            self.severity = severity

    trt.Logger = Logger

    class Tensor:
        def __init__(self, name, dtype, shape):
            self.name, self.dtype, self.shape = name, dtype, shape

    class Layer:
        def __init__(self, node, strong):
            self.name, self.type, self._strong = node.name, node.op_type, strong
            self._outputs = [Tensor(o, DataType.FLOAT, None) for o in node.output]
            self._precision = DataType.FLOAT

        num_outputs = property(lambda self: len(self._outputs))

        def get_output(self, j):
            return self._outputs[j]

        @property
        def precision(self):
            return self._precision

        @precision.setter
        def precision(self, value):
            if self._strong:
                trt.record["errors"].append(
                    f"{self.name}: precision set on a strongly typed network"
                )
            self._precision = value
            trt.record.setdefault("layer_precision", {})[self.name] = value

        def set_output_type(self, j, dtype):
            if self._strong:
                trt.record["errors"].append(
                    f"{self.name}: output type set on a strongly typed network"
                )
            self._outputs[j].dtype = dtype
            trt.record.setdefault("layer_output_type", {})[self.name] = dtype

    class Network:
        def __init__(self, flags):
            self.flags = flags
            names = [
                m.name
                for m in vars(trt.NetworkDefinitionCreationFlag).values()
                if flags >> m.value & 1
            ]
            self.explicit_batch = major >= 10 or "EXPLICIT_BATCH" in names
            self.strongly_typed = major >= 11 or "STRONGLY_TYPED" in names
            self.layers, self.inputs, self.onnx_path = [], [], None
            trt.record["network_flags"] = names
            trt.record["strongly_typed"] = self.strongly_typed

        num_layers = property(lambda self: len(self.layers))
        num_inputs = property(lambda self: len(self.inputs))

        def get_layer(self, i):
            return self.layers[i]

        def get_input(self, i):
            return self.inputs[i]

    class ParserError:
        def __init__(self, node_index, node, message):
            self._node, self._node_obj, self._desc = node_index, node, message

        def desc(self):
            return self._desc

        def code(self):
            return 8  # ErrorCode.UNSUPPORTED_NODE

        def node(self):
            return self._node

        def file(self):
            return "ModelImporter.cpp"

        def func(self):
            return "parseNode"

        def line(self):
            return 0

    if major >= 10:

        def node_name(self):
            return self._node_obj.name if self._node_obj is not None else ""

        def node_operator(self):
            return self._node_obj.op_type if self._node_obj is not None else ""

        ParserError.node_name, ParserError.node_operator = node_name, node_operator

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, i):
            return self.errors[i]

        def clear_errors(self):
            self.errors = []

        def parse_from_file(self, path):
            trt.record["parsed"] = str(path)
            model = onnx.load(str(path))
            err = self.errors.append
            if not self.network.explicit_batch:
                err(ParserError(-1, None, "The network must be created with EXPLICIT_BATCH"))
            if model.ir_version > max_ir:
                err(ParserError(-1, None, f"Unsupported model IR version: {model.ir_version}, "
                                          f"max supported IR version: {max_ir}"))  # fmt: skip
            opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
            if opset > max_opset:
                err(ParserError(-1, None, f"Unsupported opset {opset} (max {max_opset})"))
            inits = {t.name: t for t in model.graph.initializer}
            for i, node in enumerate(model.graph.node):
                if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
                    continue
                data = inits[node.input[0]]
                if data.data_type == TensorProto.INT32:
                    err(
                        ParserError(
                            i,
                            node,
                            f"{node.name}: only activation types allowed as input to this layer.",
                        )
                    )
                elif major < 10 and not data.dims:
                    err(
                        ParserError(
                            i,
                            node,
                            f"{node.name}: Assertion failed: quantized input must have rank >= 1",
                        )
                    )
            if self.errors:
                return False
            self.network.onnx_path = str(path)
            self.network.model = model
            inp = model.graph.input[0]
            dims = tuple(d.dim_value or -1 for d in inp.type.tensor_type.shape.dim)
            self.network.inputs = [Tensor(inp.name, DataType.FLOAT, dims)]
            self.network.layers = [Layer(n, self.network.strongly_typed) for n in model.graph.node]
            return True

    trt.OnnxParser = OnnxParser

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            if trt.faults.get("set_shape_raises"):
                raise TypeError(trt.faults["set_shape_raises"])
            low, opt, high = tuple(low), tuple(opt), tuple(high)
            trt.record["profile"] = {"name": name, "min": low, "opt": opt, "max": high}
            if not all(0 < a <= b <= c for a, b, c in zip(low, opt, high)):
                trt.record["errors"].append(f"invalid profile {low} {opt} {high}")
            self.shapes[name] = (low, opt, high)

    class Config:
        def __init__(self):
            self.flags, self.profiles = set(), []
            trt.record["builder_flags"] = self.flags

        def set_memory_pool_limit(self, pool, size):
            trt.record["workspace"] = size

        def set_flag(self, flag):
            if deprecated_weak and flag.name in weak:
                trt.record["deprecated"].append(flag.name)
                log(f"[W] BuilderFlag::k{flag.name} is deprecated (weak typing, TensorRT 10.12)")
            self.flags.add(flag.name)

        def get_flag(self, flag):
            return flag.name in self.flags

        def add_optimization_profile(self, profile):
            # "Returns the index of the optimization profile (starting from 0) if the input is
            # valid, or -1 if the input is not valid" (IBuilderConfig.add_optimization_profile)
            if trt.faults.get("profile_refused") or "input" not in profile.shapes:
                log("[E] addOptimizationProfile: invalid profile")
                return -1
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            if trt.faults.get("build_raises"):
                raise RuntimeError(trt.faults["build_raises"])
            if trt.record["errors"] or not config.profiles or network.onnx_path is None:
                return None
            model = network.model
            quantized = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
            halves = any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
            if network.strongly_typed:
                precision = "int8" if quantized else "fp16" if halves else "fp32"
            elif quantized:
                precision = "int8" if "INT8" in config.flags else None
            else:
                precision = "fp16" if "FP16" in config.flags else "fp32"
            if precision is None:
                log("[E] Q/DQ network without the INT8 flag")
                return None
            low, opt, high = config.profiles[0].shapes["input"]
            plan = {"version": version, "onnx": network.onnx_path, "precision": precision,
                    "min": low, "opt": opt, "max": high, "input_name": "input",
                    "input_dtype": "FLOAT", "format": "LINEAR", **trt.engine_overrides}  # fmt: skip
            if "min_batch" in plan:
                plan["min"] = (plan.pop("min_batch"), *plan["min"][1:])
            if "image_size" in plan:
                s = plan.pop("image_size")
                plan["min"], plan["opt"], plan["max"] = (
                    (p[0], 3, s, s) for p in (plan["min"], plan["opt"], plan["max"])
                )
            trt.record["engine_precision"] = precision
            return MAGIC + json.dumps(plan).encode()

    trt.Builder = Builder

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}
            trt.record["set_input_shape"], trt.record["addresses"] = [], []

        def set_input_shape(self, name, shape):
            shape = tuple(shape)
            trt.record["set_input_shape"].append((name, shape))
            low, high = self.engine.plan["min"], self.engine.plan["max"]
            if trt.faults.get("set_input_shape") or name != self.engine.input_name:
                return False
            if len(shape) != 4 or not all(a <= s <= b for a, s, b in zip(low, shape, high)):
                log(f"[E] setInputShape: {shape} outside the profile {low}..{high}")
                return False
            self.shapes[name] = shape
            return True

        def get_tensor_shape(self, name):
            n = self.shapes.get(self.engine.input_name, (-1,))[0]
            return {"logits": (n, 2), "prob_fake": (n,)}.get(
                name, self.shapes.get(name, (-1, 3, -1, -1))
            )

        def get_tensor_strides(self, name):
            shape = self.get_tensor_shape(name)
            return tuple(int(np.prod(shape[i + 1 :])) for i in range(len(shape)))

        def set_tensor_address(self, name, address):
            trt.record["addresses"].append((name, address))
            if trt.faults.get("set_tensor_address") or not address:
                return False
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream_handle):
            trt.record.setdefault("executed", []).append(stream_handle)
            if trt.faults.get("execute"):
                return False
            if set(self.addresses) != {self.engine.input_name, "logits", "prob_fake"}:
                log("[E] enqueueV3: not every I/O tensor has an address")
                return False
            shape = self.shapes[self.engine.input_name]
            dtype = numpy_types[self.engine.plan["input_dtype"]]
            count = int(np.prod(shape))
            raw = (ctypes.c_char * (count * np.dtype(dtype).itemsize)).from_address(
                self.addresses[self.engine.input_name]
            )
            x = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape).astype(np.float32)
            trt.record.setdefault("inputs", []).append(x.copy())  # what the engine "saw"
            logits, prob = self.engine.session().run(None, {"input": x})
            for name, value in (("logits", logits), ("prob_fake", prob)):
                value = np.ascontiguousarray(value, dtype=numpy_types[self.engine.output_dtype])
                ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
            return True

    class Engine:
        def __init__(self, plan):
            self.plan = plan
            self.input_name = plan["input_name"]
            self.output_dtype = "FLOAT"
            self._session = None
            self.names = [self.input_name, "logits", "prob_fake"]

        num_io_tensors = property(lambda self: len(self.names))
        num_optimization_profiles = 1

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == self.input_name else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return getattr(
                DataType, self.plan["input_dtype"] if name == self.input_name else self.output_dtype
            )

        def get_tensor_format(self, name):
            return getattr(
                trt.TensorFormat, self.plan["format"] if name == self.input_name else "LINEAR"
            )

        def get_tensor_shape(self, name):
            return {"logits": (-1, 2), "prob_fake": (-1,)}.get(name, (-1, *self.plan["max"][1:]))

        def get_tensor_profile_shape(self, name, index):
            return [self.plan["min"], self.plan["opt"], self.plan["max"]]

        def create_execution_context(self):
            return Context(self)

        def session(self):
            if self._session is None:
                import onnxruntime as ort

                self._session = ort.InferenceSession(
                    self.plan["onnx"], providers=["CPUExecutionProvider"]
                )
            return self._session

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            if trt.faults.get("deserialize_raises"):
                raise RuntimeError(trt.faults["deserialize_raises"])
            data = bytes(data)
            if not data.startswith(MAGIC):
                log("[E] deserializeCudaEngine: not a serialized engine")
                return None
            plan = json.loads(data[len(MAGIC) :])
            if plan["version"] != version:
                log(f"[E] serialized with TensorRT {plan['version']}, this is {version}")
                return None
            return Engine(plan)

    trt.Runtime = Runtime
    return trt


def make_cudart(name="Orin (nvgpu)", capability=(8, 7)):
    """A fake cuda.bindings.runtime with one GPU of that name and compute capability."""
    import enum

    rt = types.ModuleType("cuda.bindings.runtime")
    rt.record = {"calls": [], "allocations": {}, "freed": []}
    rt.faults = {}

    class cudaError_t(enum.IntEnum):  # noqa: N801 (cuda-python's names)
        cudaSuccess = 0
        cudaErrorInvalidValue = 1
        cudaErrorMemoryAllocation = 2
        cudaErrorNoDevice = 100

    class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
        cudaMemcpyHostToHost = 0
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaStream_t:  # noqa: N801
        def __init__(self, handle):
            self.handle = handle

        def __int__(self):
            return self.handle

    rt.cudaError_t, rt.cudaMemcpyKind, rt.cudaStream_t = cudaError_t, cudaMemcpyKind, cudaStream_t
    ok = cudaError_t.cudaSuccess
    keep = {}  # address -> ctypes buffer: the "device" memory, alive until cudaFree

    def call(fn):
        def wrapped(*args):
            rt.record["calls"].append((fn.__name__, args))
            return fn(*args)

        setattr(rt, fn.__name__, wrapped)
        return wrapped

    @call
    def cudaGetDeviceCount():  # noqa: N802
        return (cudaError_t.cudaErrorNoDevice, 0) if rt.faults.get("no_device") else (ok, 1)

    @call
    def cudaGetDevice():  # noqa: N802
        return ok, 0

    @call
    def cudaGetDeviceProperties(device):  # noqa: N802
        if device != 0:
            return cudaError_t.cudaErrorInvalidValue, None
        # cuda-python gives char[256] fields as bytes
        prop = types.SimpleNamespace(name=name.encode(), major=capability[0], minor=capability[1])
        return ok, prop

    @call
    def cudaStreamCreate():  # noqa: N802
        return ok, cudaStream_t(7)

    @call
    def cudaStreamSynchronize(stream):  # noqa: N802
        return (ok,) if isinstance(stream, cudaStream_t) else (cudaError_t.cudaErrorInvalidValue,)

    @call
    def cudaStreamDestroy(stream):  # noqa: N802
        return (ok,)

    @call
    def cudaMalloc(nbytes):  # noqa: N802
        if rt.faults.get("malloc"):
            return cudaError_t.cudaErrorMemoryAllocation, 0
        buffer = ctypes.create_string_buffer(int(nbytes))
        address = ctypes.addressof(buffer)
        keep[address] = buffer
        rt.record["allocations"][address] = int(nbytes)
        return ok, address

    @call
    def cudaFree(address):  # noqa: N802
        if keep.pop(int(address), None) is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        rt.record["freed"].append(int(address))
        return (ok,)

    def inside_allocation(address, nbytes):
        return any(
            start <= address and address + nbytes <= start + size
            for start, size in rt.record["allocations"].items()
            if start in keep
        )

    @call
    def cudaMemcpyAsync(dst, src, nbytes, kind, stream):  # noqa: N802
        if not isinstance(stream, cudaStream_t) or kind not in (
            cudaMemcpyKind.cudaMemcpyHostToDevice,
            cudaMemcpyKind.cudaMemcpyDeviceToHost,
        ):
            return (cudaError_t.cudaErrorInvalidValue,)
        device = int(dst) if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else int(src)
        if not inside_allocation(device, int(nbytes)):
            return (cudaError_t.cudaErrorInvalidValue,)
        ctypes.memmove(int(dst), int(src), int(nbytes))
        return (ok,)

    return rt
