"""The inference engines alone, without decoding or Ray: where the ONNX Runtime engine's time goes.

    python bench/bench_engines.py                         # resnet_small, 32x32, batch 256
    python bench/bench_engines.py --arch simple_cnn --rounds 10
    python bench/bench_engines.py --arch airbench94 --tta flip   # the default recipe's model
    python bench/bench_engines.py --photos 2000        # + decoding the photo lake, as a labeling actor does

One thread each, as in a labeling actor: ``engines.TorchEngine`` (PyTorch eager, channels-last)
and ``engines.OnnxEngine`` (the graph of ``export.to_onnx`` in ONNX Runtime) on the same seeded
random-weight model and uint8 batch, alternating, ``--rounds`` times. Reported: CPU ms per image
(CPU time of this process, so that other processes on a shared machine do not count), median and
all rounds; then each engine's time per operator from its own profiler. With ``--photos N``, also
the CPU time of ``images.read_batch`` (8 threads, as an actor reads) on bench_label.py's photo lake,
and so what one actor's steady state would be with each engine: decode + inference per image.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_label's photo lake

from distcls.artifact import ModelInfo
from distcls.engines import OnnxEngine, TorchEngine
from distcls.export import to_onnx
from distcls.models import TTAS, WithTTA, create_model


def cpu_ms_per_image(engine, batch: np.ndarray) -> float:
    started = time.process_time()
    engine(batch)
    return (time.process_time() - started) / len(batch) * 1000


def onnx_profile(graph: bytes, batch: np.ndarray) -> dict[str, float]:
    """Share of ONNX Runtime's kernel time per operator type."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, {"images": batch})
    with open(session.end_profiling()) as file:
        events = json.load(file)
    spent = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            spent[event["args"]["op_name"]] += event["dur"]
    return {op: us / sum(spent.values()) for op, us in spent.most_common(6)}


def torch_profile(engine: TorchEngine, batch: np.ndarray) -> dict[str, float]:
    """Share of PyTorch's self CPU time per aten operator."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            engine(batch)
    spent = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(spent.values())
    return {op: us / total for op, us in sorted(spent.items(), key=lambda kv: -kv[1])[:6]}


def decode_ms_per_image(count: int, size: int) -> float:
    """CPU ms per image of reading + decoding the photo lake the way a labeling actor does."""
    from pathlib import Path

    from bench_label import make_lake

    from distcls.config import StorageConfig
    from distcls.images import read_batch

    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        paths = sorted(str(p) for p in make_lake(Path(tmp), count, (640, 480)).rglob("*.jpg"))
        started = time.process_time()
        for start in range(0, len(paths), 256):
            read_batch(paths[start:start + 256], StorageConfig(), size, threads=8)
        return (time.process_time() - started) / len(paths) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet_small")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--photos", type=int, default=0, help="also time decoding this many photos")
    parser.add_argument("--tta", default="none", choices=TTAS, help="test-time augmentation, as model.json says")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model(args.arch, num_classes=10).eval()
    if args.tta != "none":  # what load_model returns for such an artifact
        model = WithTTA(model, args.tta).eval()
    info = ModelInfo(arch=args.arch, classes=[str(i) for i in range(10)], image_size=args.image_size,
                     mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), tta=args.tta)
    graph = to_onnx(model, info, args.arch)
    engines = {"torch": TorchEngine(model, info), "onnx": OnnxEngine(graph, info)}
    batch = np.random.default_rng(0).integers(0, 256, (args.batch, args.image_size, args.image_size, 3), dtype=np.uint8)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for name, engine in engines.items():
        engine(batch)  # warm-up: allocations, ONNX Runtime's first-run kernel choices
    for _ in range(args.rounds):
        for name, engine in engines.items():
            times[name].append(cpu_ms_per_image(engine, batch))
    import onnxruntime

    print(f"machine: {platform.node()}, os.cpu_count()={os.cpu_count()}, load average {os.getloadavg()[0]:.1f} "
          f"(shared), torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    print(f"command: python bench/bench_engines.py {' '.join(sys.argv[1:])}")
    print(f"model: {args.arch}, {args.image_size}x{args.image_size}, batch {args.batch}, one thread, "
          f"{args.rounds} alternating rounds; CPU ms per image, median [rounds]")
    for name, values in times.items():
        print(f"  {name:6s} {np.median(values):.3f}  [{', '.join(f'{v:.3f}' for v in values)}]")
    print(f"  torch/onnx {np.median(times['torch']) / np.median(times['onnx']):.2f}x")
    if args.photos:
        decode = decode_ms_per_image(args.photos, args.image_size)
        per_image = {name: decode + float(np.median(values)) for name, values in times.items()}
        print(f"  decode (images.read_batch, {args.photos} photos 640x480 q90) {decode:.3f}; decode + inference: "
              f"torch {per_image['torch']:.3f}, onnx {per_image['onnx']:.3f} -> one actor's steady state "
              f"onnx/torch {per_image['torch'] / per_image['onnx']:.2f}x")
    for name, shares in (("onnx", onnx_profile(graph, batch)), ("torch", torch_profile(engines["torch"], batch))):
        print(f"  {name} time by operator: " + ", ".join(f"{op} {share * 100:.0f}%" for op, share in shares.items()))


if __name__ == "__main__":
    main()
