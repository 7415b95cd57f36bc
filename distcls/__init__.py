"""distcls: distributed batch image classification on Ray.

    from distcls import load_model, create_model, list_models, train, evaluate, label
    model, info = load_model("runs/cifar10/model")

Everything here is imported on first use, so that an inference actor that imports
``distcls.predict`` pays for torch and the model code, not for Ray Train and the training loop.
``train``, ``evaluate`` and ``label`` here are the job functions; their modules of the same name
are reached with ``importlib.import_module("distcls.label")`` (the function shadows the attribute).
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_JOBS = ("train", "evaluate", "label")
_HOMES = {
    "ModelInfo": "distcls.artifact", "load_model": "distcls.artifact",
    "create_model": "distcls.models", "list_models": "distcls.models",
    "EvaluateConfig": "distcls.config", "LabelConfig": "distcls.config", "StorageConfig": "distcls.config",
    "TrainConfig": "distcls.config", "Store": "distcls.storage",
}

__all__ = sorted([*_JOBS, *_HOMES])


def __getattr__(name: str) -> Any:
    if name in _JOBS:
        importlib.import_module(f"distcls.{name}")  # binds the function through _Package.__setattr__
        return globals()[name]
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'distcls' has no attribute {name!r}")


class _Package(types.ModuleType):
    """The import system binds each submodule to the package attribute of the same name once it is
    loaded; for the three job modules that attribute is their job function instead, as it was when
    this file imported them eagerly."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _JOBS and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
