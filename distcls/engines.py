"""Inference engines: a uint8 NHWC batch of ``info.image_size`` images -> class probabilities
(float32, on the CPU, one row per image), the contract of ``artifact.predict_proba``.

``torch`` (the default, and the only engine for GPUs) runs the model in PyTorch eager mode.
``onnx`` runs the artifact's ONNX graph (``distcls export``) with ONNX Runtime on CPUs, which fuses
convolution, BatchNorm and activation into one kernel each and skips PyTorch's per-op dispatch.

On the driver, ``prepare`` checks the choice and returns what the actors need; each actor then
calls ``create_engine(**prepared)`` once and the engine for every batch.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import ray
import torch

from distcls.artifact import ModelInfo, load_model, predict_proba, read_info
from distcls.storage import Store
from distcls.errors import UsageError
from distcls.export import onnx_for

ENGINES = ("torch", "onnx")
Engine = Callable[[np.ndarray | torch.Tensor], torch.Tensor]


class TorchEngine:
    """The model in eager PyTorch, channels-last, on ``device`` (float16 autocast on CUDA)."""

    def __init__(self, model: torch.nn.Module, info: ModelInfo, device: str = "cpu") -> None:
        self.model = model.to(device, memory_format=torch.channels_last)
        self.info = info
        self.device = device

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        return predict_proba(self.model, self.info, images, self.device, amp=self.device == "cuda")


class OnnxEngine:
    """A graph made by ``export.to_onnx`` in an ONNX Runtime CPU session on ``threads`` threads and
    no more: like torch in the actors, one thread per reserved CPU, the other cores belong to the
    other actors."""

    def __init__(self, graph: bytes, info: ModelInfo, threads: int = 1) -> None:
        import onnxruntime  # here: only this engine pays for importing it

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only
        self.session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.info = info

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        pixels = np.ascontiguousarray(torch.as_tensor(images).numpy(), dtype=np.uint8)
        return torch.from_numpy(self.session.run(None, {"images": pixels})[0])


def prepare(engine: str, model: Store, gpu: bool = False) -> dict[str, Any]:
    """On the driver, before any actor starts: UsageError for an engine that cannot serve this
    model, else the keyword arguments of ``create_engine``. For ``onnx`` the graph (the artifact's
    model.onnx, or one exported here) goes to the object store once for all actors."""
    if engine not in ENGINES:
        raise UsageError(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if engine == "onnx" and gpu:
        raise UsageError("--engine onnx runs on CPUs only; drop --gpu, or use --engine torch for GPUs")
    prepared: dict[str, Any] = {"engine": engine, "model": model}
    if engine == "onnx":
        prepared["onnx"] = ray.put(onnx_for(model))
    return prepared


def create_engine(engine: str, model: Store, device: str = "cpu",
                  threads: int = 1, onnx: ray.ObjectRef | None = None) -> tuple[Engine, ModelInfo]:
    """The engine for the artifact folder ``model`` and its ModelInfo. ``threads``: the ONNX
    engine's (the caller sets torch's, a process-wide setting). ``onnx``: the graph from
    ``prepare``; without it the ONNX engine reads (or makes) the graph itself."""
    if engine == "torch":
        module, info = load_model(model)
        return TorchEngine(module, info, device), info
    info = read_info(model)
    graph = ray.get(onnx) if onnx is not None else onnx_for(model)
    return OnnxEngine(graph, info, threads), info
