"""The model artifact: ``<dir>/model.safetensors`` + ``<dir>/model.json``.

The JSON rebuilds the model (arch, classes in index order) and says how to feed it (image_size,
mean, std), so inference never imports training code or re-types preprocessing. Weights are
safetensors: loading them cannot execute code, unlike a pickle. ``model_id`` is the sha256 of the
weights file and is checked on load, so a labeling run records exactly which weights it used.
"""
from __future__ import annotations

import hashlib
import io
from datetime import datetime, timezone
from typing import Any

import numpy as np
import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from distcls import storage
from distcls.config import StorageConfig
from distcls.errors import UsageError
from distcls.images import normalize
from distcls.models import create_model

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
FORMAT_VERSION = 1


class ModelInfo(BaseModel):
    """Everything needed to rebuild and feed a trained model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = FORMAT_VERSION
    arch: str
    classes: list[str] = Field(min_length=2)
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    model_id: str = ""
    created_at: str = ""
    config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)


def save_model(model: nn.Module, info: ModelInfo, uri: str, storage_config: StorageConfig) -> ModelInfo:
    """Write weights, then model.json (last, so a folder with model.json is complete). Returns the
    info with model_id and created_at filled in."""
    state = {k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()}
    weights = safetensors.torch.save(state)
    info = info.model_copy(update={
        "model_id": hashlib.sha256(weights).hexdigest(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), weights, storage_config)
    storage.write_bytes(storage.join(uri, META_FILE), info.model_dump_json(indent=2).encode(), storage_config)
    return info


def load_model(uri: str, storage_config: StorageConfig | None = None) -> tuple[nn.Module, ModelInfo]:
    """Load an artifact folder. Returns the model in eval mode and its ModelInfo.

    Raises UsageError naming the URI when it is not an artifact, the weights do not match
    model_id, or they are not a safetensors file (a pickle planted there is never unpickled).
    """
    storage_config = storage_config or StorageConfig()
    info = read_info(uri, storage_config)
    weights = storage.read_bytes(storage.join(uri, WEIGHTS_FILE), storage_config)
    if hashlib.sha256(weights).hexdigest() != info.model_id:
        raise UsageError(f"{uri}: weights do not match model_id in {META_FILE} (corrupt or replaced)")
    try:
        state = safetensors.torch.load(weights)
    except Exception as exc:  # safetensors raises its own SafetensorError for any bad header
        raise UsageError(f"{uri}: {WEIGHTS_FILE} is not a safetensors file ({str(exc)[:80]})") from None
    model = create_model(info.arch, num_classes=len(info.classes))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UsageError(f"{uri}: weights do not fit arch {info.arch!r}: {str(exc).splitlines()[0]}") from None
    return model.eval(), info


def read_info(uri: str, storage_config: StorageConfig) -> ModelInfo:
    try:
        raw = storage.read_bytes(storage.join(uri, META_FILE), storage_config)
    except UsageError as exc:
        raise UsageError(f"{uri}: not a distcls model artifact (cannot read {META_FILE}: {exc})") from None
    try:
        return ModelInfo.model_validate_json(raw)
    except ValidationError as exc:
        raise UsageError(f"{uri}: invalid {META_FILE}: {exc.errors()[0]['loc']} {exc.errors()[0]['msg']}") from None


def load_state_dict(uri: str, storage_config: StorageConfig) -> dict[str, torch.Tensor]:
    """Initial weights for training: safetensors, or a torch file loaded with ``weights_only=True``
    (tensors only; a pickle that would run code is refused)."""
    data = storage.read_bytes(uri, storage_config)
    if uri.endswith(".safetensors"):
        try:
            return safetensors.torch.load(data)
        except Exception as exc:
            raise UsageError(f"{uri}: not a safetensors file ({str(exc)[:80]})") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for refused globals, RuntimeError for non-torch files
        raise UsageError(f"{uri}: refused to load weights ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(state, dict):
        raise UsageError(f"{uri}: expected a state dict, got {type(state).__name__}")
    return state


def predict_proba(model: nn.Module, info: ModelInfo, images: np.ndarray | torch.Tensor,
                  device: str = "cpu", amp: bool = False) -> torch.Tensor:
    """Class probabilities (float32, on CPU) for a uint8 NHWC batch of ``info.image_size`` images."""
    batch = torch.as_tensor(images).to(device, non_blocking=True)
    with torch.inference_mode(), torch.autocast(device_type=device, dtype=torch.float16, enabled=amp):
        logits = model(normalize(batch, info.mean, info.std))
    return torch.softmax(logits.float(), dim=1).cpu()


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel, so checkpoints load without DDP."""
    return model.module if hasattr(model, "module") else model
