"""``distcls demo``: the whole product on one machine, offline, in a few minutes.

Makes a labelled lake of drawn shapes (or uses ``--input``), trains with Ray Train, evaluates on
the held-out split, labels an unlabelled lake that includes broken files, and shows the results.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from distcls import synthetic
from distcls.config import DemoConfig, EvaluateConfig, LabelConfig, TrainConfig
from distcls.evaluate import evaluate
from distcls.label import label
from distcls.plots import label_summary
from distcls.runtime import ensure_ray
from distcls.train import train

STEPS = ("lake", "unlabelled", "train", "evaluation", "labels")

log = logging.getLogger(__name__)


def run_demo(config: DemoConfig) -> dict[str, Any]:
    started = time.time()
    out = Path(config.output).resolve()
    for step in STEPS:  # only what the demo itself made: never a user's other files
        shutil.rmtree(out / step, ignore_errors=True)
    storage = config.storage().model_dump()
    data = config.input or _synthetic_lakes(out, config)
    ensure_ray()
    _banner(f"1/3 train {config.arch} on {data}")
    trained = train(TrainConfig(input=data, output=str(out / "train"), epochs=config.epochs, workers=config.workers,
                                arch=config.arch, batch_size=128, **storage))
    _banner("2/3 evaluate on the held-out split")
    scores = evaluate(EvaluateConfig(input=str(out / "train" / "val.parquet"), model=trained["model"],
                                     report=str(out / "evaluation"), **storage))
    if config.input:
        _banner("3/3 label the held-out images (val.parquet as a manifest)")
        to_label = {"manifest": str(out / "train" / "val.parquet")}
    else:
        _banner("3/3 label an unlabelled lake (broken files included)")
        to_label = {"input": str(out / "unlabelled")}
    summary = label(LabelConfig(model=trained["model"], output=str(out / "labels"), overwrite=True, **to_label, **storage))
    rows = pd.read_parquet(out / "labels", dtype_backend="pyarrow")
    _show(rows, out)
    return {"accuracy": scores["accuracy"], "labelled": int(rows["error"].isna().sum()),
            "errors": int(rows["error"].notna().sum()), "seconds": round(time.time() - started, 1),
            "output": str(out), "images_per_s": summary.get("images_per_s")}


def _synthetic_lakes(out: Path, config: DemoConfig) -> str:
    log.info(f"drawing {config.per_class * len(synthetic.CLASSES)} labelled images into {out / 'lake'}")
    synthetic.make_lake(out / "lake", config.per_class, seed=0)
    per_class = max(1, config.unlabelled // len(synthetic.CLASSES))
    synthetic.make_lake(out / "unlabelled", per_class, seed=1, labelled=False)
    broken = out / "unlabelled" / "broken"
    broken.mkdir()
    (broken / "empty.jpg").write_bytes(b"")
    (broken / "notes.jpg").write_text("this is a text file with an image's name")
    good = next((out / "unlabelled").glob("*.jpg")).read_bytes()
    (broken / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return str(out / "lake")


def _show(rows: pd.DataFrame, out: Path) -> None:
    ok = rows[rows["error"].isna()]
    (out / "labels_summary.png").write_bytes(label_summary(ok["score"].to_numpy(np.float32), ok["label"].value_counts().to_dict()))
    with pd.option_context("display.width", 160, "display.max_columns", 8, "display.max_colwidth", 40):
        log.info("\n" + rows[["path", "label", "score", "width", "height", "error"]].head(8).to_string(index=False))
        failed = rows.loc[rows["error"].notna(), ["path", "error"]]
        log.info("rows with an error: " + ("none" if failed.empty else "\n" + failed.to_string(index=False)))
    _banner("outputs")
    for name, what in [("lake", "labelled input lake"), ("unlabelled", "lake that was labelled"),
                       ("train/model", "model artifact (model.safetensors + model.json)"),
                       ("train/curves.png", "loss and accuracy per epoch"), ("train/metrics.jsonl", "one row per epoch"),
                       ("evaluation/confusion.png", "confusion matrix"), ("evaluation/metrics.json", "evaluation metrics"),
                       ("labels", "Parquet predictions + _SUCCESS"), ("labels_summary.png", "score histogram, images per class")]:
        if (out / name).exists():
            log.info(f"  {out / name}  {what}")


def _banner(text: str) -> None:
    log.info(f"=== {text} ===")
