"""distcls: distributed batch image classification on Ray.

    from distcls import load_model, create_model, list_models, train, evaluate, label
    model, info = load_model("runs/cifar10/model")
"""
from distcls.artifact import ModelInfo, load_model
from distcls.config import EvaluateConfig, LabelConfig, StorageConfig, TrainConfig
from distcls.models import create_model, list_models

__all__ = [
    "EvaluateConfig", "LabelConfig", "ModelInfo", "StorageConfig", "TrainConfig",
    "create_model", "evaluate", "label", "list_models", "load_model", "train",
]


def train(config: TrainConfig) -> dict:
    """Train on Ray (see ``distcls.train.train``); imported lazily because it pulls in Ray Train."""
    from distcls.train import train as _train

    return _train(config)


def evaluate(config: EvaluateConfig) -> dict:
    """Evaluate an artifact on a labelled lake (see ``distcls.evaluate.evaluate``)."""
    from distcls.evaluate import evaluate as _evaluate

    return _evaluate(config)


def label(config: LabelConfig) -> dict:
    """Label a lake into Parquet (see ``distcls.label.label``)."""
    from distcls.label import label as _label

    return _label(config)
