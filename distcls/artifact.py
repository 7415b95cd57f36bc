"""The model artifact: ``<dir>/model.safetensors`` + ``<dir>/model.json``.

The JSON rebuilds the model (arch, classes in index order) and says how to feed it (image_size,
mean, std), so inference never imports training code or re-types preprocessing. Weights are
safetensors: loading them cannot execute code, unlike a pickle.

``model_id`` is the sha256 of everything that decides a prediction: the weights' sha256 (also kept
as ``weights_sha256``) and the fields inference reads (``IDENTITY_FIELDS``). Every load checks
it, so a labeling run records exactly which model it used, and a reordered class list or a changed
mean is refused instead of relabelling under a trusted id. It is a checksum, not a signature:
whoever can write the artifact can make a consistent new one, but it then has another id.
Format 1 (id over the weights alone) is refused: its model.json cannot be verified; ``resave``
upgrades an artifact whose model.json you have checked.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import numpy as np
import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from distcls import storage
from distcls.config import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from distcls.errors import UsageError
from distcls.transforms import normalize
from distcls.models import WithTTA, create_model, list_models

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
FORMAT_VERSION = 2
# The model.json fields that change what a model predicts: model_id covers them with the weights.
IDENTITY_FIELDS = ("arch", "classes", "image_size", "mean", "std")

_Mean = Annotated[float, Field(ge=0, le=1)]  # of pixels scaled to [0, 1]
_Std = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # divided by: 0 or inf make every input the same


class Validation(BaseModel):
    """What the model predicted on its held-out split at the end of training: the reference a
    labeling run's label distribution is compared with (distcls.quality)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    predicted: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        description="Share of the held-out images predicted as each class.")
    mean_top1: float = Field(ge=0, le=1, description="Mean top-1 probability over the held-out images.")
    images: int = Field(ge=1, description="Held-out images.")

    @field_validator("predicted")
    @classmethod
    def _shares_of_all(cls, value: dict[str, float]) -> dict[str, float]:
        # Shares of every held-out image: an empty or partial distribution would be at total
        # variation >= 1/2 from any run, drift on every run (float sums stay well within 1e-3).
        if abs(sum(value.values()) - 1) > 1e-3:
            raise ValueError(f"the shares add up to {sum(value.values()):g}, not 1")
        return value


class ModelInfo(BaseModel):
    """Everything needed to rebuild and feed a trained model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = FORMAT_VERSION
    arch: str
    classes: list[str] = Field(min_length=2)
    image_size: int = Field(ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)
    mean: tuple[_Mean, _Mean, _Mean]
    std: tuple[_Std, _Std, _Std]
    weights_sha256: str = ""
    model_id: str = ""
    created_at: str = ""
    config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    # train --labels: the manifest of human labels and what it did to the lake's labels (not part
    # of model_id: it says where the labels came from, the weights say what was learnt).
    human_labels: dict[str, Any] = Field(default_factory=dict)
    # Test-time augmentation (models.tta_logits): changes predictions, so model_id covers it, but
    # only when it is not "none", which keeps the model_id of artifacts saved before it existed.
    tta: Literal["none", "flip", "flip_translate"] = "none"
    # Not an IDENTITY_FIELD: it describes the model, it does not change a prediction. Artifacts
    # saved before it existed have none.
    validation: Validation | None = None

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        if value not in list_models():
            raise ValueError(f"unknown arch {value!r}; known: {', '.join(list_models())}")
        return value

    @field_validator("classes")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"class names repeat: {', '.join(map(repr, repeated))}")
        return value

    @model_validator(mode="after")
    def _validation_of_own_classes(self) -> ModelInfo:
        if self.validation is not None and not set(self.validation.predicted) <= set(self.classes):
            odd = sorted(set(self.validation.predicted) - set(self.classes))
            raise ValueError(f"validation.predicted names classes the model does not have: {', '.join(map(repr, odd))}")
        return self


def model_id_of(info: ModelInfo) -> str:
    """sha256 over format_version, weights_sha256 and IDENTITY_FIELDS, in a canonical JSON."""
    fields = info.model_dump(mode="json", include={"format_version", "weights_sha256", *IDENTITY_FIELDS})
    if info.tta != "none":
        fields["tta"] = info.tta
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_model(model: nn.Module, info: ModelInfo, store: storage.Store) -> ModelInfo:
    """Write weights, then model.json (last, so a folder with model.json is complete) into the
    artifact folder ``store``. Returns the
    info with weights_sha256, model_id and created_at filled in. Raises UsageError when the
    model's head does not output one score per class."""
    state = {k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()}
    _check_fits(store.root, info, state)
    weights = safetensors.torch.save(state)
    info = _identified(info, weights, datetime.now(timezone.utc).isoformat(timespec="seconds"))
    store.write(weights, WEIGHTS_FILE)
    store.write(info.model_dump_json(indent=2).encode(), META_FILE)
    return info


def load_model(store: storage.Store | str) -> tuple[nn.Module, ModelInfo]:
    """Load the artifact folder ``store`` (a URI alone: with the default storage settings, from
    the environment). Returns the model in eval mode and its verified ModelInfo.

    Raises UsageError naming the URI (and the model.json field) when it is not an artifact, a
    field is out of bounds, the weights or the fields do not match model_id, the weights are not a
    safetensors file (a pickle planted there is never unpickled), or they do not fit arch and classes.
    """
    info, state = _verified(store if isinstance(store, storage.Store) else storage.Store(store))
    model = create_model(info.arch, num_classes=len(info.classes))
    model.load_state_dict(state, strict=True)  # keys and shapes were checked by _verified
    return (WithTTA(model, info.tta) if info.tta != "none" else model).eval(), info


def read_info(store: storage.Store) -> ModelInfo:
    """The ModelInfo of an artifact, verified as load_model does (the weights are read and hashed),
    so that a job refuses a bad artifact before it starts any Ray work."""
    return _verified(store)[0]


def resave(store: storage.Store) -> ModelInfo:
    """Rewrite a format-1 artifact's model.json in the current format, in place; returns the new
    info. Format 1's model_id covered only the weights, so nothing vouches for its classes,
    image_size, mean and std: check them first, since the new model_id will."""
    uri = store.root
    meta = _read_json(store)
    if meta.get("format_version") != 1:
        raise UsageError(f"{uri}: not a format-1 artifact (format_version {meta.get('format_version')!r})")
    weights = store.read(WEIGHTS_FILE)
    if hashlib.sha256(weights).hexdigest() != meta.get("model_id"):
        raise UsageError(f"{uri}: weights do not match model_id in {META_FILE} (corrupt or replaced)")
    info = _validated(uri, {**meta, "format_version": FORMAT_VERSION})
    _check_fits(uri, info, _safetensors(uri, weights))
    info = _identified(info, weights, info.created_at)
    store.write(info.model_dump_json(indent=2).encode(), META_FILE)
    return info


def _identified(info: ModelInfo, weights: bytes, created_at: str) -> ModelInfo:
    info = info.model_copy(update={"format_version": FORMAT_VERSION, "created_at": created_at,
                                   "weights_sha256": hashlib.sha256(weights).hexdigest()})
    return info.model_copy(update={"model_id": model_id_of(info)})


def _verified(store: storage.Store) -> tuple[ModelInfo, dict[str, torch.Tensor]]:
    """(info, weights) after every check load_model promises, cheapest first."""
    uri = store.root
    meta = _read_json(store)
    version = meta.get("format_version")
    if version == 1:
        raise UsageError(f"{uri}: {META_FILE} is format 1, whose model_id covers the weights but not classes, "
                         "image_size, mean or std; retrain, or check model.json and run distcls.artifact.resave")
    if version != FORMAT_VERSION:
        raise UsageError(f"{uri}: {META_FILE} has format_version {version!r}; this distcls reads {FORMAT_VERSION}")
    info = _validated(uri, meta)
    weights = store.read(WEIGHTS_FILE)
    if hashlib.sha256(weights).hexdigest() != info.weights_sha256:
        raise UsageError(f"{uri}: weights do not match weights_sha256 in {META_FILE} (corrupt or replaced)")
    if model_id_of(info) != info.model_id:
        raise UsageError(f"{uri}: {META_FILE} does not match its model_id: {', '.join(IDENTITY_FIELDS)} or tta were "
                         "changed after it was saved; retrain, or re-save it")
    state = _safetensors(uri, weights)
    _check_fits(uri, info, state)
    return info, state


def _read_json(store: storage.Store) -> dict[str, Any]:
    uri = store.root
    try:
        raw = store.read(META_FILE)
    except UsageError as exc:
        raise UsageError(f"{uri}: not a distcls model artifact (cannot read {META_FILE}: {exc})") from None
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise UsageError(f"{uri}: invalid {META_FILE}: not a JSON object")
    return meta


def _validated(uri: str, meta: dict[str, Any]) -> ModelInfo:
    try:
        return ModelInfo.model_validate(meta)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        got = repr(error.get("input"))
        raise UsageError(f"{uri}: invalid {META_FILE}: field {field!r}: {error['msg']} "
                         f"(got {got if len(got) <= 80 else got[:77] + '...'})") from None


def _safetensors(uri: str, weights: bytes) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(weights)
    except Exception as exc:  # safetensors raises its own SafetensorError for any bad header
        raise UsageError(f"{uri}: {WEIGHTS_FILE} is not a safetensors file ({str(exc)[:80]})") from None


def _check_fits(uri: str, info: ModelInfo, state: dict[str, torch.Tensor]) -> None:
    """UsageError unless ``state`` has exactly the tensors of ``info.arch`` with one output per
    class. The head is found by building the model (on the meta device: shapes only, no memory)
    for n and n+1 classes and seeing which tensors change."""
    n = len(info.classes)
    with torch.device("meta"):
        expected = create_model(info.arch, num_classes=n).state_dict()
        wider = create_model(info.arch, num_classes=n + 1).state_dict()
    if expected.keys() != state.keys():
        odd = sorted(expected.keys() ^ state.keys())
        raise UsageError(f"{uri}: weights do not fit arch {info.arch!r}: {len(odd)} tensors missing or unexpected "
                         f"({', '.join(odd[:3])}{', ...' if len(odd) > 3 else ''})")
    for name, tensor in expected.items():
        got, shape = tuple(state[name].shape), tuple(tensor.shape)
        if got == shape:
            continue
        head_dim = next((i for i, (e, w) in enumerate(zip(shape, wider[name].shape)) if e != w), None)
        if head_dim is not None and len(got) == len(shape) and got[head_dim] != n:
            raise UsageError(f"{uri}: {META_FILE} field 'classes' lists {n} classes but the weights' head "
                             f"outputs {got[head_dim]}")
        raise UsageError(f"{uri}: weights do not fit arch {info.arch!r}: {name} is {list(got)}, "
                         f"expected {list(shape)}")


def load_state_dict(file: storage.Store) -> dict[str, torch.Tensor]:
    """Initial weights for training from the file ``file``: safetensors, or a torch file loaded
    with ``weights_only=True`` (tensors only; a pickle that would run code is refused)."""
    uri = file.root
    data = file.read()
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
    # Training scripts often save {"state_dict": ...} or {"model": ...}, and DDP prefixes "module.".
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {key.removeprefix("module."): value for key, value in state.items() if isinstance(value, torch.Tensor)}


@dataclass(frozen=True)
class InitMatch:
    """How a state dict fits a model: ``loaded`` keys fit exactly; ``skipped`` are in both with
    another shape (a classifier head for another number of classes); ``new`` only in the model
    (they keep their fresh initialisation); ``unused`` only in the file."""

    loaded: dict[str, torch.Tensor]
    skipped: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    new: list[str]
    unused: list[str]

    def describe(self, uri: str) -> str:
        modules = sorted({key.split(".")[0] for key in self.loaded})
        skipped = [f"{k} {list(file)} -> {list(model)}" for k, (file, model) in self.skipped.items()]
        return (f"init weights {uri}: loaded {len(self.loaded)} tensors ({', '.join(modules)}); "
                f"skipped (shape differs): {', '.join(skipped) or 'none'}; "
                f"new (re-initialised): {', '.join(self.new) or 'none'}; unused: {', '.join(self.unused) or 'none'}")


def match_state_dict(model: nn.Module, state: dict[str, torch.Tensor], uri: str, partial: bool) -> InitMatch:
    """Which tensors of ``state`` fit ``model``. Raises UsageError naming ``uri`` when nothing fits,
    or, unless ``partial``, when anything does not fit exactly (strict, like ``load_state_dict``)."""
    own = model.state_dict()
    loaded = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    skipped = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
               if k in own and k not in loaded}
    match = InitMatch(loaded, skipped, [k for k in own if k not in state], [k for k in state if k not in own])
    if not loaded:
        raise UsageError(f"{uri}: no tensor fits the model ({len(state)} in the file, {len(own)} in the model; "
                         f"e.g. {next(iter(state), 'none')!r} vs {next(iter(own))!r}): a checkpoint of another architecture?")
    if not partial and (skipped or match.new or match.unused):
        first = next(iter(skipped), None) or (match.new or match.unused)[0]
        raise UsageError(f"{uri}: does not fit the model exactly ({len(skipped)} tensors of another shape, "
                         f"{len(match.new)} missing, {len(match.unused)} unused, e.g. {first!r}); "
                         "pass --init-weights-partial to load the tensors that fit and re-initialise the rest")
    return match


def predict_proba(model: nn.Module, info: ModelInfo, images: np.ndarray | torch.Tensor,
                  device: str = "cpu", amp: bool = False) -> torch.Tensor:
    """Class probabilities (float32, on CPU) for a uint8 NHWC batch of ``info.image_size`` images."""
    batch = torch.as_tensor(images).to(device, non_blocking=True)
    with torch.inference_mode(), torch.autocast(device_type=device, dtype=torch.float16, enabled=amp):
        logits = model(normalize(batch, info.mean, info.std))
    return torch.softmax(logits.float(), dim=1).cpu()


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel or WithTTA, so checkpoints load without either."""
    model = model.module if hasattr(model, "module") else model
    return model.model if isinstance(model, WithTTA) else model
