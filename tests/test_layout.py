"""What the package layout promises: inference code imports no training code."""
from __future__ import annotations

import subprocess
import sys


def test_inference_modules_import_no_training_code() -> None:
    probe = ("import sys, distcls.label, distcls.artifact; "
             "print(sorted(m for m in ('ray.train', 'distcls.train', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_job_functions_keep_their_names_after_their_modules_load() -> None:
    import importlib

    import distcls

    module = importlib.import_module("distcls.label")
    assert callable(distcls.label) and distcls.label is module.label
    from distcls import evaluate, train

    assert evaluate.__module__ == "distcls.evaluate" and train.__module__ == "distcls.train"
