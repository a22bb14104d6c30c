"""Inference speed on this machine: PyTorch eager vs ONNX Runtime FP32 and INT8 (the CPU model,
and TensorRT's INT8 model run on the CPU for comparison), and TensorRT FP32 / FP16 / INT8 when
tensorrt and a CUDA GPU are present, all in one run.

    python bench/speed.py                                   # models/facecheck.pt
    python bench/speed.py --checkpoint runs/exp-a/best.pt --json bench.json
    python bench/speed.py --random --attention on           # random weights, no checkpoint needed

For each backend: batch-1 latency (median of --runs calls after warm-up) and batch-64 throughput
(images/s from the median of --batch-runs calls). Also the model's FLOPs per image
(model.count_flops: multiplies and adds counted separately, like the 2 n^3 of a matrix product),
its parameters, this machine's float32 torch.matmul GFLOP/s (2048 x 2048) and, per backend, the
GFLOP/s the model reaches at batch 64 as a fraction of that matmul figure. Every backend uses
--threads threads. The backends (and the matmul) take turns in short rounds, so load from other
processes on a shared machine hits them alike; the load average is printed with the results.

The ONNX models are exported into a temporary folder with export.py's own functions (so the
parity check runs); INT8 is calibrated on --calib-data (default: the checkpoint's dataset when
it exists, else uniform noise, which only makes sense for timing).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import backends  # noqa: E402
import export  # noqa: E402
from common import atomic_write, cpu_description  # noqa: E402
from model import (  # noqa: E402
    CheckpointError,
    FaceCheckNet,
    count_flops,
    count_parameters,
    deployment_metadata,
    load_checkpoint,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # fmt: off
    p.add_argument("--checkpoint", default="models/facecheck.pt", help="checkpoint to time (default %(default)s)")
    p.add_argument("--random", action="store_true", help="time a randomly initialised model when the checkpoint is missing")
    p.add_argument("--attention", choices=["on", "off"], default="on", help="variant of the --random model (default on)")
    p.add_argument("--image-size", type=int, default=128, help="input size of the --random model (default 128)")
    p.add_argument("--runs", type=int, default=100, help="timed batch-1 calls per backend (default 100)")
    p.add_argument("--batch", type=int, default=64, help="throughput batch size (default 64)")
    p.add_argument("--batch-runs", type=int, default=10, help="timed large-batch calls per backend (default 10)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for every backend (default: all CPUs)")
    p.add_argument("--calib-data", help="prepared dataset for INT8 calibration (default: the checkpoint's data)")
    p.add_argument("--calib-count", type=int, default=128, help="INT8 calibration images (default 128)")
    p.add_argument("--no-int8", action="store_true", help="skip the INT8 model")
    p.add_argument("--json", help="also write the results to this JSON file")
    # fmt: on
    return p.parse_args(argv)


def median_seconds(backends, x, runs, warmup, chunk):
    """Median seconds per call of each backend on x. The backends take turns, chunk calls
    each, so that a burst of load from another process hits all of them alike."""
    for fn in backends.values():
        for _ in range(warmup):
            fn(x)
    times = {name: [] for name in backends}
    for _ in range(-(-runs // chunk)):
        for name, fn in backends.items():
            for _ in range(chunk):
                start = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def ort_runner(path, threads):
    """The settings that matter on a small CPU: all graph optimisations (Conv+activation
    fusion, constant folding, NCHWc layouts), one sequential executor, threads = cores."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"input": x})


def load_model(args):
    """(model, export metadata, dataset folder or None, description)."""
    if Path(args.checkpoint).is_file():
        try:
            model, ckpt = load_checkpoint(args.checkpoint)
        except CheckpointError as exc:
            raise SystemExit(f"error: {exc}") from None
        return model, deployment_metadata(ckpt), ckpt.get("data"), args.checkpoint
    if not args.random:
        raise SystemExit(f"error: {args.checkpoint} not found; pass --checkpoint PATH, or --random")
    torch.manual_seed(0)
    attention = args.attention == "on"
    model = FaceCheckNet({"image_size": args.image_size, "attention": attention}).eval()
    meta = {"format": "facecheck", "image_size": args.image_size, "class_names": ["real", "fake"],
            "threshold": 0.5, "attention": attention, "manifest_sha256": ""}  # fmt: skip
    return model, meta, None, f"random init (attention {args.attention})"


def calibration_images(args, data, size):
    data = args.calib_data or data
    if data and (Path(data) / "manifest.csv").is_file():
        return export.calibration_images(data, size, args.calib_count), str(data)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (args.calib_count, size, size, 3), dtype=np.uint8), "uniform noise"


def build_backends(args, model, meta, data, tmp):
    """Every backend this machine has, built in tmp: {name: run(x)} and the INT8 calibration."""
    size, calibration = meta["image_size"], None

    @torch.inference_mode()
    def eager(x):
        return model(torch.from_numpy(x))

    runners = {"torch_eager": eager}
    fp32 = Path(tmp) / "facecheck.onnx"
    export.export_onnx(model, fp32, meta)
    runners["onnxruntime_fp32"] = ort_runner(fp32, args.threads)
    paths = {"fp32": fp32}
    if not args.no_int8:
        images, calibration = calibration_images(args, data, size)
        export.quantize_int8(fp32, Path(tmp) / "facecheck.int8.onnx", images, target="cpu")
        runners["onnxruntime_int8"] = ort_runner(Path(tmp) / "facecheck.int8.onnx", args.threads)
        # TensorRT's model (INT8 activations, float biases) on this CPU too: the evidence for
        # giving ONNX Runtime a model of its own (export.quantize_int8).
        paths["int8"] = Path(tmp) / "facecheck.int8-trt.onnx"
        export.quantize_int8(fp32, paths["int8"], images, target="tensorrt")
        runners["onnxruntime_int8_tensorrt_model"] = ort_runner(paths["int8"], args.threads)
    if (problem := export.tensorrt_problem()) is None:
        paths["fp16"] = Path(tmp) / "facecheck.fp16.onnx"
        export.save_checked(export.convert_to_fp16(onnx.load(str(fp32))), paths["fp16"])
        for precision in [p for p in ("fp32", "fp16", "int8") if p in paths]:
            engine = Path(tmp) / f"facecheck.{precision}.engine"
            build = export.build_engine(paths, engine, precision, size, args.batch)
            export.write_engine_metadata(engine, build["onnx"], precision, build)
            runners[f"tensorrt_{precision}"] = backends.load_engine(engine)[0]
    else:
        print(f"TensorRT skipped: {problem}", file=sys.stderr)
    return runners, calibration


def time_backends(backends, size, args):
    """{name: {batch1_ms, batchN_img_s}} and the machine's matmul GFLOP/s, timed in the same
    rounds as the batch runs (so a busy machine shows in both)."""
    gen = torch.Generator().manual_seed(0)
    one, many = (torch.rand(n, 3, size, size, generator=gen).numpy() for n in (1, args.batch))
    latency = median_seconds(backends, one, args.runs, warmup=10, chunk=10)
    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    backends = {**backends, "matmul": lambda _: torch.matmul(a, b)}
    batch = median_seconds(backends, many, args.batch_runs, warmup=2, chunk=1)
    matmul_gflops = 2 * 2048**3 / batch.pop("matmul") / 1e9
    timings = {
        name: {"batch1_ms": 1000 * latency[name], f"batch{args.batch}_img_s": args.batch / sec}
        for name, sec in batch.items()
    }
    return timings, matmul_gflops


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, meta, data, source = load_model(args)
    results = {"model": source, "image_size": meta["image_size"],
               "attention": bool(meta["attention"]), "flops_per_image": count_flops(model),
               "params": count_parameters(model), "threads": args.threads}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        runners, calibration = build_backends(args, model, meta, data, tmp)
        timings, results["matmul_gflops"] = time_backends(runners, meta["image_size"], args)
    results.update(timings)
    for name in ("onnxruntime_int8", "onnxruntime_int8_tensorrt_model"):
        if name in results:
            results[name]["calibration"] = calibration
    results["load_average"] = os.getloadavg()[0]
    results["cpu"] = cpu_description()
    report(results, args.batch)
    if args.json:
        text = json.dumps(results, indent=2) + "\n"
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))
    return 0


def report(results, batch):
    """Markdown table plus the three targets, on stdout; adds the fractions to results."""
    key = f"batch{batch}_img_s"
    print(f"\nmodel: {results['model']}, {results['params']:,} parameters, "
          f"{results['flops_per_image'] / 1e6:.1f} MFLOPs/image at {results['image_size']} px; "
          f"{results['cpu']}, matmul {results['matmul_gflops']:.1f} GFLOP/s; {results['threads']} threads; "
          f"load average {results['load_average']:.1f}\n")  # fmt: skip
    print(
        f"| backend | batch-1 latency (ms) | batch-{batch} (img/s) | GFLOP/s at batch {batch} | of matmul |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        if isinstance(r, dict) and key in r:
            r["gflops"] = results["flops_per_image"] * r[key] / 1e9
            r["fraction_of_matmul"] = r["gflops"] / results["matmul_gflops"]
            print(f"| {name} | {r['batch1_ms']:.2f} | {r[key]:.1f} | {r['gflops']:.1f} "
                  f"| {100 * r['fraction_of_matmul']:.0f}% |")  # fmt: skip
    eager, ort = results["torch_eager"], results["onnxruntime_fp32"]
    checks = [
        ("ONNX Runtime FP32 batch-1 latency <= 1/3 of PyTorch eager", ort["batch1_ms"] <= eager["batch1_ms"] / 3,
         f"{ort['batch1_ms']:.2f} vs {eager['batch1_ms']:.2f} ms, {eager['batch1_ms'] / ort['batch1_ms']:.1f}x"),
        (f"ONNX Runtime FP32 batch-{batch} throughput >= PyTorch eager", ort[key] >= eager[key],
         f"{ort[key]:.1f} vs {eager[key]:.1f} img/s"),
        (f"ONNX Runtime FP32 at batch {batch} >= 25% of matmul GFLOP/s", ort["fraction_of_matmul"] >= 0.25,
         f"{ort['gflops']:.1f} of {results['matmul_gflops']:.1f} GFLOP/s"),
    ]  # fmt: skip
    print()
    for text, ok, detail in checks:
        print(f"- [{'x' if ok else ' '}] {text}: {detail}")
    results["targets_met"] = {text: bool(ok) for text, ok, _ in checks}


if __name__ == "__main__":
    sys.exit(main())
