"""``distcls export``: a model artifact as ONNX, for ONNX Runtime (``--engine onnx``) or any runtime.

Writes ``<model>/model.onnx`` and ``<model>/model.onnx.json`` next to the artifact. The graph takes
what ``artifact.predict_proba`` takes, a uint8 NHWC batch of ``image_size`` images (input
``images``, any batch size), and returns what it returns, class probabilities (output ``probs``):
normalisation and softmax are inside, so a user of the file needs only model.json's class names.
The sidecar records the ``model_id`` the graph was made from and the graph's sha256; both are
checked on load, so a model.onnx left in a folder that a later training run rewrote is never used
for the new weights.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import warnings
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from distcls import storage
from distcls.artifact import ModelInfo, load_model, read_info
from distcls.config import ExportConfig
from distcls.errors import UsageError

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
ONNX_META_FILE = "model.onnx.json"
# Opset 17 (2022) is read by every ONNX Runtime since 1.13 and has every op these CNNs need.
OPSET = 17


def export(config: ExportConfig) -> dict[str, Any]:
    """Export ``config.model`` and write it next to the artifact. Returns the sidecar's fields and paths."""
    artifact = storage.Store(config.model, config.storage())
    model, info = load_model(artifact)
    graph = to_onnx(model, info, config.model)
    meta = {"model_id": info.model_id, "sha256": hashlib.sha256(graph).hexdigest(), "opset": OPSET,
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "input": "images: uint8 [N, image_size, image_size, 3] RGB", "output": "probs: float32 [N, classes]"}
    # The graph first, the sidecar last: a sidecar is only ever next to the graph it describes.
    artifact.write(graph, ONNX_FILE)
    artifact.write(json.dumps(meta, indent=2).encode(), ONNX_META_FILE)
    return {"onnx": artifact.uri_of(ONNX_FILE), "bytes": len(graph), **meta}


def to_onnx(model: nn.Module, info: ModelInfo, uri: str) -> bytes:
    """The serialized ONNX graph of ``model`` (uint8 NHWC -> probabilities), checked to load and run
    in ONNX Runtime. Raises UsageError naming ``uri`` when the architecture cannot be exported."""
    wrapped = _Probabilities(model.eval(), info).eval()
    example = torch.zeros((2, info.image_size, info.image_size, 3), dtype=torch.uint8)
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript-based exporter: the torch.export-based one needs the onnxscript
            # package and handles nothing these CNNs need that this one does not.
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (example,), buffer, dynamo=False, opset_version=OPSET,
                              input_names=["images"], output_names=["probs"],
                              dynamic_axes={"images": {0: "batch"}, "probs": {0: "batch"}})
        graph = buffer.getvalue()
        from distcls.engines import OnnxEngine  # here: engines imports this module

        OnnxEngine(graph, info)(example.numpy())
    except Exception as exc:  # the exporter raises many types (UnsupportedOperatorError, RuntimeError, ...)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UsageError(f"{uri}: architecture {info.arch!r} cannot be exported to ONNX ({reason}); "
                         "use --engine torch") from None
    return graph


def onnx_for(artifact: storage.Store) -> bytes:
    """The ONNX graph of the artifact folder ``artifact``: its model.onnx when that was exported from these
    weights, else one made here (in memory, not written: the artifact's folder may be read-only and
    belongs to the run that trained it). Raises UsageError when a model.onnx does not match its
    sidecar (corrupt or replaced) or the architecture cannot be exported."""
    uri = artifact.root
    info = read_info(artifact)
    graph = _read_onnx(artifact, info)
    if graph is None:
        graph = to_onnx(load_model(artifact)[0], info, uri)
        log.info(f"no {ONNX_FILE} exported from model {info.model_id[:12]} in {uri}: exported one for this "
                 f"run (`distcls export --model {uri}` saves it)")
    return graph


def _read_onnx(artifact: storage.Store, info: ModelInfo) -> bytes | None:
    """model.onnx when its sidecar says it was made from ``info.model_id``; None when absent or stale."""
    uri = artifact.root
    try:
        meta = artifact.read_json(ONNX_META_FILE)
    except UsageError:
        return None
    except ValueError:
        raise UsageError(f"{uri}: {ONNX_META_FILE} is not JSON; rerun distcls export") from None
    if not isinstance(meta, dict) or meta.get("model_id") != info.model_id:
        return None
    graph = artifact.read(ONNX_FILE)
    if hashlib.sha256(graph).hexdigest() != meta.get("sha256"):
        raise UsageError(f"{uri}: {ONNX_FILE} does not match the sha256 in {ONNX_META_FILE} (corrupt or replaced); "
                         "rerun distcls export")
    return graph


class _Probabilities(nn.Module):
    """``model`` with ``predict_proba``'s normalisation and softmax around it, for export."""

    def __init__(self, model: nn.Module, info: ModelInfo) -> None:
        super().__init__()
        self.model = model
        # (x / 255 - mean) / std == (x - 255 mean) / (255 std): one subtract and one divide on uint8 input.
        self.register_buffer("offset", torch.tensor(info.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("scale", torch.tensor(info.std).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.permute(0, 3, 1, 2).float() - self.offset) / self.scale
        return torch.softmax(self.model(x), dim=1)

