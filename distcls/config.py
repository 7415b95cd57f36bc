"""Typed settings for every job: defaults -> YAML file -> CLI flags.

Each job has one pydantic model. Storage settings are a shared base class so that the same
``--endpoint-url`` flag and YAML key work for every job. Unknown fields are errors, and validation
messages name the field and the bad value. Credentials are never fields: they come from the
environment or the standard AWS chain, so no config dump can contain them.
"""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distcls.errors import UsageError


# 256 MiB: the pixels of an 8-bit RGB image at the default max_image_pixels (89,478,485 x 3 bytes,
# one byte under 256 MiB), so any compressed image the pixel limit admits fits, while one actor's
# 8 decode threads hold at most 2 GiB of file bytes at once.
MAX_FILE_BYTES = 256 * 2**20
_MAX_FILE_BYTES_HELP = ("Files larger than this many bytes (or not regular files) become error rows without "
                        "being read; the default, 256 MiB, is an RGB image's pixels at the default max_image_pixels.")
# scheme://user@ or scheme://user:password@, where the password may hold '/' (AWS secret keys do),
# so that s3://bucket/name@x.jpg is a key but s3://KEY:SE/CRET@bucket/x is credentials.
URI_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/@]*@|[^/@:]*:[^@]*@)")

log = logging.getLogger(__name__)


class StorageConfig(BaseModel):
    """Where the object store is. Credentials come from the environment / AWS chain, never from here."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    endpoint_url: str | None = Field(
        default_factory=lambda: os.environ.get("AWS_ENDPOINT_URL") or None, validate_default=True,
        description="S3-compatible endpoint (MinIO, moto, GCS interop); defaults to $AWS_ENDPOINT_URL.",
    )
    region: str | None = Field(
        default_factory=lambda: os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None,
        description="S3 region; defaults to $AWS_REGION / $AWS_DEFAULT_REGION.",
    )
    anonymous: bool = Field(False, description="Access public buckets without credentials.")
    max_attempts: int = Field(
        default_factory=lambda: os.environ.get("AWS_MAX_ATTEMPTS") or 8, ge=1, validate_default=True,
        description="Attempts per object-store request, with back-off (8: an unreachable store fails a read "
                    "after ~45 s); defaults to $AWS_MAX_ATTEMPTS.",
    )

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_has_scheme(cls, value: str | None) -> str | None:
        # The value is never part of the message: it may hold a secret (see _describe).
        source = " ($AWS_ENDPOINT_URL)" if value and value == os.environ.get("AWS_ENDPOINT_URL") else ""
        if value and "@" in value:  # any '@': a secret key may hold '/', which would end the authority early
            raise ValueError(f"endpoint_url{source} must not hold credentials (user:password@host); "
                             "give them as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile")
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"endpoint_url{source} must start with http:// or https://")
        return value

    @field_validator("*")
    @classmethod
    def _no_credentials_in_uris(cls, value: Any) -> Any:
        """Credentials are never fields, so none may ride in a URI (``s3://KEY:SECRET@bucket``) into
        the resolved config that model.json and _SUCCESS keep."""
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and URI_USERINFO.match(text):
                raise ValueError("a URI must not hold credentials (user:password@); give them as "
                                 "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile")
        return value

    # Settings renamed so that one name means one thing in every command (old -> new): the old
    # spelling still works as a flag, YAML key or keyword, with a warning, for now.
    renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _deprecated_names(cls, values: Any) -> Any:
        if not isinstance(values, dict) or not cls.renamed:
            return values
        values = dict(values)
        for old, new in cls.renamed.items():
            if old not in values:
                continue
            if new in values:
                raise UsageError(f"{flag(old)} is the deprecated spelling of {flag(new)}; give only {flag(new)}")
            log.warning(f"{flag(old)} is deprecated, use {flag(new)} (YAML key {new!r} for {old!r})")
            values[new] = values.pop(old)
        return values

    def storage(self) -> StorageConfig:
        """The storage part alone, for code that only talks to the object store."""
        return StorageConfig(endpoint_url=self.endpoint_url, region=self.region, anonymous=self.anonymous,
                             max_attempts=self.max_attempts)


# Model input sides that training accepts and a model artifact may declare (artifact.ModelInfo).
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024


class TrainConfig(StorageConfig):
    """Settings of ``distcls train``."""

    renamed: ClassVar[dict[str, str]] = {"data": "input", "val_data": "val_input", "model": "arch"}

    input: str = Field(..., description="ImageFolder lake (<root>/<class>/<file>) or manifest (.parquet/.csv with path,label).")
    output: str = Field(..., description="Output URI: checkpoints, metrics.jsonl, curves.png and the model/ artifact.")
    val_input: str | None = Field(None, description="Separate validation lake or manifest; default: hold out --val-fraction.")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Stratified, seeded hold-out fraction when no --val-input.")
    arch: str = Field("airbench94", description="Architecture name from the model registry (list them, with their training defaults: distcls models).")
    init_weights: str | None = Field(None, description="URI of a state dict (safetensors or torch weights) to start from.")
    init_weights_partial: bool = Field(
        False, description="Load the --init-weights tensors that fit and re-initialise the rest (e.g. a head for "
                           "another number of classes); without it every tensor must fit exactly.")
    freeze_epochs: int = Field(
        0, ge=0, description="Train only the layers --init-weights did not provide (the new head) for this many "
                             "epochs, then everything.")
    # The defaults of epochs, batch_size, lr, momentum, weight_decay, tta and lookahead are the
    # default arch's recipe (models.Recipe); another --arch
    # brings its own (_arch_recipe). The values are written out, not read from models: importing
    # torch would make every `distcls --help` slow.
    epochs: int = Field(20, ge=1, description="Passes over the training set; default: the --arch's.")
    batch_size: int = Field(1024, ge=1, description="Global batch size, split evenly across workers; default: the --arch's.")
    # allow_inf_nan=False: --lr inf trained a garbage model and exited 0.
    lr: float = Field(1.5, gt=0, allow_inf_nan=False,
                      description="Peak learning rate of the one-cycle schedule (SGD, Nesterov); default: the --arch's.")
    momentum: float = Field(0.85, ge=0, lt=1, description="SGD (Nesterov) momentum; default: the --arch's.")
    weight_decay: float = Field(1.3e-3, ge=0, allow_inf_nan=False,
                                description="SGD weight decay of the weights (not of biases and BatchNorm); default: the --arch's.")
    label_smoothing: float = Field(0.2, ge=0, lt=1, description="Cross-entropy label smoothing.")
    tta: Literal["none", "flip", "flip_translate"] = Field(
        "flip", description="Test-time augmentation, recorded in model.json and used by every labeling and "
                            "evaluation of the model: flip averages the logits of each image and its mirror image "
                            "(twice the inference cost), flip_translate adds two shifted copies of both (six "
                            "times); training evaluates with it after the last epoch, plainly before; default: "
                            "the --arch's.")
    image_size: int = Field(32, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE, description="Side of the square model input in pixels.")
    workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel replicas).")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs reserved per worker; also its torch thread count.")
    gpu: bool = Field(False, description="One GPU per worker, NCCL, mixed precision. Needs GPUs in the cluster or an "
                                         "autoscaler that can add GPU nodes; a worker without a usable CUDA device fails the run.")
    lookahead: bool = Field(
        True, description="Every 5 steps move the weights to a slow average of themselves, pulling harder as "
                          "training ends, and end on the average (airbench's lookahead); default: the --arch's.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Arithmetic of the training steps: bf16 autocasts convolutions and matrix products to "
                            "bfloat16 (weights, BatchNorm and the optimizer stay float32); auto: bf16 on GPUs and "
                            "on CPUs that compute it natively (AVX512-BF16, AMX), else fp32. Inference, and "
                            "training's evaluation of its last epoch, use float32 on CPUs; epochs before the "
                            "last evaluate in the steps' precision.")
    cache: Literal["memory", "none", "auto"] = Field(
        "auto", description="memory: each worker decodes its shard once, on its own CPUs, and keeps it in RAM; none: every epoch "
                            "streams the lake through Ray Data, decoded images held nowhere; auto: memory when the "
                            "decoded lake (images x size^2 x 3 bytes) fits in a quarter of the smallest CPU node's "
                            "Ray memory, else none.")
    decode_cpus: float | None = Field(
        None, gt=0, description="CPUs Ray Data may use to decode a streamed lake (--cache none) while training "
                                "runs; default: the CPUs the training workers leave free, or 0.5 shared with them "
                                "when they leave less than one. A cached lake is decoded by each worker on its own CPUs.")
    seed: int = Field(0, description="Seed for the split, initialisation and augmentation order.")
    max_failures: int = Field(3, ge=-1, description="Worker-group restarts allowed before the run fails (-1: unlimited).")
    name: str = Field("distcls-train", description="Run name; rerunning with the same name and output resumes.")
    labels: str | None = Field(
        None, description="Parquet/CSV of human labels (columns path, label), e.g. a filled-in label --review-below "
                          "file: a row replaces the label of the same path in --data, or adds that image; rows "
                          "with an empty label are skipped.")

    @model_validator(mode="before")
    @classmethod
    def _arch_recipe(cls, values: Any) -> Any:
        """Settings not given come from the chosen architecture's recipe, not the default one's."""
        from distcls.models import list_models, recipe

        if not isinstance(values, dict):
            return values
        arch = values.get("arch", values.get("model", cls.model_fields["arch"].default))
        if arch not in list_models():
            return values  # _known_arch names it
        return {**recipe(arch), **values}

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        from distcls.models import list_models

        if value not in list_models():
            raise ValueError(f"unknown architecture {value!r}; choose one of {', '.join(list_models())}")
        return value


class InferenceConfig(StorageConfig):
    """Settings of the inference stage shared by ``evaluate`` and ``label``: GPUs and the actor pool."""

    gpu: bool = Field(False, description="Run the model on GPUs: --gpus-per-actor each (default 1); CPU tasks decode "
                                         "ahead of them. Needs GPUs in the cluster or an autoscaler that can add GPU nodes.")
    min_actors: int | None = Field(
        None, description="Fewest inference actors. Default: as many as fit the cluster's nodes now (at least 1): a "
                          "fixed cluster is filled from the start; one with no worker nodes yet asks its autoscaler for one.")
    max_actors: int | None = Field(
        None, description="Most inference actors; in between, Ray Data adds actors while batches wait and the autoscaler "
                          "adds nodes for them. Default on a fixed cluster: the minimum; on an autoscaling one (Ray's "
                          "autoscaler with node types: KubeRay, ray up): the most its autoscaler reports it can reach, "
                          "else the larger of what fits now and 64. Never more than there are batches.")
    cpus_per_actor: float | None = Field(
        None, description="CPUs each actor reserves; on CPUs also its torch threads. Default 1 (with --gpu: 0 on a "
                          "cluster of fewer than 2 CPUs, leaving them to the decode tasks).")
    gpus_per_actor: float | None = Field(None, description="GPUs each actor reserves, fractions allowed (needs --gpu). Default 1.")
    memory_per_actor: int | None = Field(
        None, description="Bytes of memory each actor (and with --gpu each decode task) reserves; 0: no reservation. "
                          "Default: ~1 GiB + 4 decoded batches.")
    max_file_bytes: int = Field(MAX_FILE_BYTES, ge=1, description=_MAX_FILE_BYTES_HELP)
    engine: Literal["torch", "onnx"] = Field(
        "torch", description="Inference engine: torch, or onnx (ONNX Runtime, CPUs only; uses model.onnx from "
                             "distcls export, or exports one for the run).")


class EvaluateConfig(InferenceConfig):
    """Settings of ``distcls evaluate``."""

    renamed: ClassVar[dict[str, str]] = {"data": "input"}

    input: str = Field(..., description="Labelled lake or manifest to evaluate on.")
    model: str = Field(..., description="Model artifact URI (the model/ folder written by train).")
    report: str | None = Field(None, description="Folder for metrics.json and confusion.png.")
    batch_size: int = Field(512, ge=1, description="Images per inference batch.")


class LabelConfig(InferenceConfig):
    """Settings of ``distcls label``."""

    input: str | None = Field(None, description="Lake URI to list recursively; this or --manifest is required.")
    manifest: str | None = Field(None, description="Parquet/CSV with a 'path' column (e.g. an S3 Inventory export).")
    model: str = Field(..., description="Model artifact URI (the model/ folder written by train).")
    output: str = Field(..., description="Output dataset URI (Parquet + _SUCCESS).")
    extensions: list[str] = Field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"],
        description="File extensions to label when listing (case-insensitive).",
    )
    allowed_roots: list[str] = Field(
        default_factory=list, description="If set, manifest paths outside these URI prefixes become error rows."
    )
    top_k: int = Field(5, ge=1, description="Classes kept per image in topk_labels/topk_scores.")
    batch_size: int = Field(256, ge=1, description="Images per inference batch.")
    concurrency: int | None = Field(None, ge=1, description="Deprecated: the same as --min-actors N --max-actors N.")
    incremental: bool = Field(False, description="Write a run=<id>/ partition with only images not yet labelled by this model.")
    resume: bool = Field(False, description="Continue an interrupted run on the same output.")
    dry_run: bool = Field(False, description="Say how many images this run would label and how long that would take "
                                             "(from the last run's rate); start and write nothing.")
    overwrite: bool = Field(False, description="Replace an existing non-empty output.")
    max_image_pixels: int = Field(
        89_478_485, ge=1, description="Decompression-bomb limit: images declaring more pixels become error rows."
    )
    rows_per_file: int = Field(100_000, ge=1, description="Target rows per Parquet file.")
    review_below: float | None = Field(
        None, ge=0, le=1, description="Also write the images whose top-1 score is below this (0..1) to "
                                      "_review/run=<id>/ in the output, for people to label (see --review-sample).")
    # le: Arrow counts rows in int64, and a larger N failed the run only after labelling (OverflowError).
    review_sample: int | None = Field(
        None, ge=1, le=2**63 - 1, description="Write at most this many of the least confident images to "
                                              "_review/run=<id>/, least confident first (with --review-below: "
                                              "of those below it).")
    low_confidence: float = Field(
        0.5, ge=0, le=1, allow_inf_nan=False,
        description="The quality report counts images whose top-1 score is below this (0..1).")
    drift_threshold: float = Field(
        0.2, gt=0, le=1, allow_inf_nan=False,
        description="drift is set when the total variation distance between this run's label distribution and "
                    "the model's validation distribution or the earlier runs' exceeds this (0..1).")
    fail_on_drift: bool = Field(False, description="Exit with code 3 when drift is set (the run is still committed).")

    @field_validator("extensions")
    @classmethod
    def _dotted_lowercase(cls, value: list[str]) -> list[str]:
        # "--extensions jpg,png" is two extensions, not the one extension ".jpg,png" that matches nothing.
        names = [name.strip().lower() for item in value for name in item.split(",") if name.strip()]
        if not names:
            raise ValueError("give at least one extension, e.g. .jpg")
        return [name if name.startswith(".") else "." + name for name in names]


class ExportConfig(StorageConfig):
    """Settings of ``distcls export``."""

    model: str = Field(..., description="Model artifact URI; model.onnx and model.onnx.json are written into it.")
    format: Literal["onnx"] = Field("onnx", description="Export format.")


Settings = TypeVar("Settings", bound=BaseModel)


def load_config(cls: type[Settings], path: str | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then ``overrides`` (CLI flags).

    Raises UsageError with one line per problem, naming the field, the bad value and the source.
    """
    values: dict[str, Any] = _read_yaml(path) if path else {}
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    # A flag overrides the file in either spelling: an old YAML key (data:) gives way to the new
    # flag (--input) instead of meeting it as "both spellings given".
    for old, new in getattr(cls, "renamed", {}).items():
        if old in flags or new in flags:
            values.pop(old, None)
            values.pop(new, None)
    values.update(flags)
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        where = f" (config {path})" if path else ""
        raise UsageError(f"invalid {cls.__name__}{where}: " + "; ".join(_describe(e) for e in exc.errors())) from None


def _read_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UsageError(f"config file {path} must hold a mapping of field: value, got {type(loaded).__name__}")
    return loaded


def _describe(error: dict[str, Any]) -> str:
    """One problem, named by the flag users type (``--batch-size``; the YAML key is the same name
    with underscores), with the bad value unless it may hold a credential."""
    loc = [str(part) for part in error["loc"]]
    if error["type"] == "extra_forbidden":  # only YAML can name an unknown setting: argparse refuses flags
        return f"unknown field {'.'.join(loc)!r}"
    name = (flag(loc[0]) + "".join(f"[{part}]" for part in loc[1:])) if loc else "<config>"
    if error["type"] == "missing":
        return f"{name} is required"
    return f"{name}: {error['msg']} {_shown(error.get('input'))}"


def flag(field: str) -> str:
    """The flag of a settings field: ``batch_size`` -> ``--batch-size``."""
    return "--" + field.replace("_", "-")


def _shown(value: Any) -> str:
    """The bad value for the message, unless it may hold a credential: a URL's user:password@
    cannot be cut out reliably (a secret key may hold '/'), so a value with '@' is not shown."""
    text = repr(value)
    if "@" in text:
        return "(value not shown: it may hold credentials)"
    return f"(got {text if len(text) <= 200 else text[:197] + '...'})"


def public_dict(config: BaseModel) -> dict[str, Any]:
    """The resolved config as plain JSON-able data, for model.json and _SUCCESS. Holds no secrets by construction."""
    return config.model_dump(mode="json")




class RunsConfig(StorageConfig):
    """Settings of ``distcls runs``."""

    positional: ClassVar[tuple[str, ...]] = ("output",)

    output: str = Field(..., description="Output dataset URI written by distcls label.")
    # "json" is BaseModel's (deprecated) method name, so the field is as_json, typed as --json.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)
    as_json: bool = Field(False, alias="json", description="One JSON line with every run instead of a table.")


class ModelsConfig(BaseModel):
    """Settings of ``distcls models``: none."""

    model_config = ConfigDict(extra="forbid")


class DemoConfig(StorageConfig):
    """Settings of ``distcls demo``: the whole product on a small lake, end to end."""

    renamed: ClassVar[dict[str, str]] = {"data": "input", "model": "arch"}

    input: str | None = Field(None, description="ImageFolder lake to use instead of the synthetic one (e.g. CIFAR-10).")
    output: str = Field("demo-output", description="Folder for the lake, model, evaluation report and labels.")
    per_class: int = Field(300, ge=10, description="Synthetic images per class (10 classes).")
    unlabelled: int = Field(200, ge=1, description="Images in the unlabelled lake that gets labelled.")
    epochs: int = Field(12, ge=1, description="Training epochs.")
    workers: int = Field(2, ge=1, description="Ray Train workers.")
    arch: str = Field("resnet_small", description="Architecture name from the model registry (list them: distcls models).")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        # Checked here too, so a typo fails before the demo draws its lakes and starts Ray.
        return TrainConfig._known_arch(value)

    @model_validator(mode="after")
    def _workers_fit_the_lake(self) -> DemoConfig:
        # Training's own check would name --val-fraction, which the demo does not take: it holds out
        # the default tenth of each of its 10 classes.
        held = 10 * round(self.per_class * TrainConfig.model_fields["val_fraction"].default)
        if self.input is None and self.workers > held:
            raise UsageError(f"--workers {self.workers} is more than the {held} images the demo holds out "
                             f"(a tenth of --per-class {self.per_class}, per class): give --per-class "
                             f"{10 * math.ceil(self.workers / 10)} or more, or fewer --workers")
        return self
