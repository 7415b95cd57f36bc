"""distcls: distributed batch image classification on Ray.

    from distcls import load_model, create_model, list_models, train, evaluate, label
    model, info = load_model("runs/cifar10/model")

``train``, ``evaluate`` and ``label`` here are the job functions; their modules of the same name
are reached with ``importlib.import_module("distcls.label")`` (the function shadows the attribute).
"""
from distcls.artifact import ModelInfo, load_model
from distcls.config import EvaluateConfig, LabelConfig, StorageConfig, TrainConfig
from distcls.evaluate import evaluate
from distcls.label import label
from distcls.models import create_model, list_models
from distcls.train import train

__all__ = [
    "EvaluateConfig", "LabelConfig", "ModelInfo", "StorageConfig", "TrainConfig",
    "create_model", "evaluate", "label", "list_models", "load_model", "train",
]
