"""Labeling end to end: an S3 lake on a multi-node cluster, predictions equal to calling the model
directly, and the commit protocol: kills, --resume, interrupted commits, --overwrite, --incremental."""
from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from distcls import engines, inputs, predict, storage
from distcls.cli import main
from distcls.dataset import COMMITTING, STAGING, Dataset
from distcls.artifact import load_model, predict_proba
from distcls.config import LabelConfig, StorageConfig
from distcls.errors import UsageError
from distcls.storage import Store
from distcls.images import decode
from distcls.label import OUTPUT_SCHEMA, label
from distcls.lake import list_files

# By name: the package re-exports a label() function under the same name as this module.
label_module = importlib.import_module("distcls.label")

REPO = Path(__file__).resolve().parents[1]


def _lake(synthetic_lake, tmp_path: Path, per_class: int) -> Path:
    """A private copy of a flat synthetic lake, so tests may add files to it."""
    lake = tmp_path / "lake"
    shutil.copytree(synthetic_lake(per_class, labelled=False), lake)
    return lake


def _assert_exactly_once(output: Path, lake: Path) -> pd.DataFrame:
    """Every image of ``lake`` once in ``output`` as pandas and DuckDB read it; nothing left over."""
    frame = pd.read_parquet(output)
    expected = sorted(str(p) for p in lake.glob("*.jpg"))
    assert sorted(frame["path"]) == expected
    query = f"select count(*), count(distinct path) from read_parquet('{output}/**/*.parquet')"
    assert duckdb.sql(query).fetchall() == [(len(expected), len(expected))]
    assert not (output / STAGING).exists() and not (output / COMMITTING).exists()
    return frame


def test_s3_lake_on_cluster_matches_direct_model_call(ray_cluster, s3_bucket: str, upload_folder, synthetic_lake,
                                                      model_uri: str) -> None:
    # Three one-CPU nodes: the inference actor takes one node's CPU, so decoding runs on the others.
    local = synthetic_lake(5, labelled=False)
    lake = upload_folder(local, f"{s3_bucket}/lake")
    config = LabelConfig(input=lake, model=model_uri, output=f"s3://{s3_bucket}/labels", batch_size=16,
                         rows_per_file=20)
    summary = label(config)

    fs, path = storage.arrow_filesystem(config.output, StorageConfig())
    table = pq.read_table(path, filesystem=fs)
    assert table.schema.remove_metadata() == OUTPUT_SCHEMA
    assert sorted(table["path"].to_pylist()) == sorted(f"{lake}/{p.name}" for p in local.glob("*.jpg"))
    assert len(summary["files"]) <= 3  # rows_per_file=20 for 50 rows: a few files, not one per block

    model, info = load_model(Store(model_uri))
    decoded = [decode(p.read_bytes(), info.image_size) for p in sorted(local.glob("*.jpg"))]
    pixels, sizes = [a for a, _, _ in decoded], [(w, h) for _, w, h in decoded]
    probs = predict_proba(model, info, np.stack(pixels)).numpy()
    rows = table.sort_by("path").to_pylist()
    assert [r["label_id"] for r in rows] == probs.argmax(1).tolist()
    assert [r["label"] for r in rows] == [info.classes[i] for i in probs.argmax(1)]
    np.testing.assert_allclose([r["score"] for r in rows], probs.max(1), atol=1e-5)
    np.testing.assert_allclose([r["topk_scores"] for r in rows], -np.sort(-probs, axis=1)[:, :5], atol=1e-5)
    assert [(r["width"], r["height"]) for r in rows] == list(sizes)

    success = Store(f"{config.output}/_SUCCESS").read()
    assert json.loads(success) == summary and b"testing-secret-canary" not in success
    assert (summary["images"], summary["labelled"], summary["errors"]) == (50, 50, 0)
    assert summary["model_id"] == info.model_id and re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", summary["run_id"])
    assert datetime.fromisoformat(summary["started_at"]) <= datetime.fromisoformat(summary["finished_at"])
    assert summary["images_per_s"] > 0 and summary["config"]["input"] == lake and "endpoint_url" in summary["config"]


def _start_run_in_subprocess(config: LabelConfig, log: Path) -> subprocess.Popen:
    import ray

    code = ("import sys; from distcls.config import LabelConfig; from distcls.label import label; "
            "label(LabelConfig.model_validate_json(sys.argv[1]))")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-c", code, config.model_dump_json()], env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def _wait_for_a_complete_staged_file(process: subprocess.Popen, output: Path, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"run ended before it could be killed:\n{log.read_text()[-3000:]}"
        for file in (output / STAGING).glob("*/*.parquet"):
            try:
                pq.read_metadata(file)
                return
            except (OSError, pa.ArrowInvalid):
                pass  # still being written
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"no staged file after {timeout}s:\n{log.read_text()[-3000:]}")


def _wait_until_the_dead_jobs_workers_are_gone(timeout: float = 30) -> None:
    """Ray stops a dead driver's tasks and actors asynchronously; a test that reruns at once would
    otherwise race them (the product copes, see _usable_staged, but the assertions would not)."""
    import ray

    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, "the killed run's workers still hold CPUs"
        time.sleep(0.1)


@pytest.mark.parametrize("resume", [False, True], ids=["rerun", "resume"])
def test_killed_run_then_rerun_labels_every_input_exactly_once(ray_local, tmp_path: Path, synthetic_lake,
                                                               model_uri: str, resume: bool) -> None:
    lake = synthetic_lake(30, labelled=False)
    output = tmp_path / "labels"
    config = LabelConfig(input=str(lake), model=model_uri, output=str(output), batch_size=10, rows_per_file=10)
    process = _start_run_in_subprocess(config, tmp_path / "run.log")
    _wait_for_a_complete_staged_file(process, output, tmp_path / "run.log")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    _wait_until_the_dead_jobs_workers_are_gone()
    assert not [p for p in output.iterdir() if not p.name.startswith("_")]  # nothing committed

    summary = label(config.model_copy(update={"resume": resume}))
    frame = _assert_exactly_once(output, lake)
    assert summary["images"] == len(frame) == 300
    if resume:
        assert summary["resumed"] >= 10 and frame["run_id"].nunique() == 1
    else:
        assert summary["resumed"] == 0


def test_resume_reuses_readable_staged_files_and_relabels_the_rest(ray_local, tmp_path: Path, synthetic_lake,
                                                                   model_uri: str) -> None:
    lake = synthetic_lake(2, labelled=False)
    output = tmp_path / "labels"
    config = LabelConfig(input=str(lake), model=model_uri, output=str(output), resume=True)
    rows = _rows_as_a_run_would_stage(config)
    staging = output / STAGING / "20260101T000000Z-abcdef"
    staging.mkdir(parents=True)
    pq.write_table(rows.slice(0, 5), staging / "a-good.parquet")
    pq.write_table(rows.slice(3, 5), staging / "b-repeats-two-rows.parquet")
    (staging / "c-cut.parquet").write_bytes((staging / "a-good.parquet").read_bytes()[:200])
    other = rows.slice(5, 5).set_column(rows.schema.get_field_index("model_id"), "model_id", pa.array(["other"] * 5))
    pq.write_table(other, staging / "d-other-model.parquet")
    (staging / "_settings.json").write_text(json.dumps(label_module._row_settings(config)))

    summary = label(config)
    frame = _assert_exactly_once(output, lake)
    assert summary["resumed"] == 5 and summary["run_id"] == "20260101T000000Z-abcdef"
    reused = frame[frame["path"].isin(rows["path"].to_pylist()[:5])]
    assert (reused["labeled_at"] == rows["labeled_at"][0].as_py()).all()  # kept, not labelled again
    assert (frame["model_id"] == rows["model_id"][0].as_py()).all()


def _rows_as_a_run_would_stage(config: LabelConfig) -> pa.Table:
    """Output rows made by the pipeline's own functions, called in-process without Ray."""
    listing = list_files(Store(config.input))
    found = inputs._input_table(listing["path"], listing["size"], listing["mtime"], pa.nulls(listing.num_rows, pa.string()))
    decoded = predict.read_and_decode(found, StorageConfig(), 32, config.max_image_pixels)
    threads = torch.get_num_threads()  # the predictor pins its process to one thread
    try:
        to_rows = functools.partial(label_module._rows, top_k=5, run_id="20260101T000000Z-abcdef")
        engine = engines.prepare("torch", Store(config.model))
        return predict.Predictor(engine, to_rows, 1, False)(decoded)
    finally:
        torch.set_num_threads(threads)


class _MachineDied(Exception):
    pass


class _DiesAtThirdMove(pafs.LocalFileSystem):
    """The output's filesystem on a machine that dies after two renames: the one that writes
    _COMMITTING and the first staged file's."""

    def __init__(self) -> None:
        super().__init__()
        self.moves = 0

    def move(self, source: str, target: str) -> None:
        self.moves += 1
        if self.moves == 3:
            raise _MachineDied
        super().move(source, target)


def test_interrupted_commit_is_rolled_forward_not_redone(ray_local, tmp_path: Path, synthetic_lake, model_uri: str,
                                                         monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """The rerun finishes the interrupted commit, says so, and goes on with its own input: here a
    plain run into an output that now holds a dataset, which it refuses (exit 2) - never the old
    run's summary as its own."""
    caplog.set_level(logging.INFO, logger="distcls")
    lake = synthetic_lake(3, labelled=False)
    output = tmp_path / "labels"
    config = LabelConfig(input=str(lake), model=model_uri, output=str(output), batch_size=8, rows_per_file=8)
    real = storage.arrow_filesystem
    monkeypatch.setattr(storage, "arrow_filesystem", lambda uri, s: (
        (_DiesAtThirdMove(), real(uri, s)[1]) if uri == str(output) else real(uri, s)))
    with pytest.raises(_MachineDied):
        label(config)
    monkeypatch.undo()
    assert (output / COMMITTING).exists() and not (output / "_SUCCESS").exists()
    assert len(list(output.glob("part-*.parquet"))) == 1 and len(list(output.glob("_staging/*/*.parquet"))) >= 1

    monkeypatch.setattr(label_module, "_run_pipeline", lambda *a: pytest.fail("labelled again"))
    with pytest.raises(UsageError, match="already holds a dataset"):
        label(config)
    assert "finished the interrupted commit of run" in caplog.text
    _assert_exactly_once(output, lake)
    summary = json.loads((output / "_SUCCESS").read_text())
    assert sorted(p.name for p in output.glob("part-*.parquet")) == summary["files"]


def test_overwrite_replaces_the_dataset_only_at_commit(ray_local, tmp_path: Path, synthetic_lake, model_uri: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    old_lake, lake = synthetic_lake(1, labelled=False), synthetic_lake(2, labelled=False, seed=1)
    output = tmp_path / "labels"
    first = label(LabelConfig(input=str(old_lake), model=model_uri, output=str(output)))
    config = LabelConfig(input=str(lake), model=model_uri, output=str(output), overwrite=True)

    def fail(*args):
        raise RuntimeError("cluster lost")

    monkeypatch.setattr(label_module, "_run_pipeline", fail)
    with pytest.raises(RuntimeError):
        label(config)
    assert sorted(pd.read_parquet(output)["path"]) == sorted(str(p) for p in old_lake.glob("*.jpg"))
    assert json.loads((output / "_SUCCESS").read_text())["run_id"] == first["run_id"]

    monkeypatch.undo()
    second = label(config)
    _assert_exactly_once(output, lake)
    assert sorted(p.name for p in output.glob("part-*.parquet")) == second["files"]


def test_incremental_labels_only_new_files_and_runs_lists_them(ray_local, tmp_path: Path, synthetic_lake,
                                                                model_uri: str, capsys) -> None:
    lake = _lake(synthetic_lake, tmp_path, 2)
    output = tmp_path / "labels"
    config = LabelConfig(input=str(lake), model=model_uri, output=str(output), incremental=True)
    first = label(config)
    for name in ("new-1.jpg", "new-2.jpg", "new-3.jpg"):
        shutil.copy(lake / "img-000000.jpg", lake / name)
    (lake / "new-4.jpg").write_bytes(b"not a jpeg")
    unfinished = output / "run=20260101T000000Z-abcdef"  # a killed run's partition: no _SUCCESS
    unfinished.mkdir()
    (unfinished / "part-00000.parquet").write_bytes(b"half")

    second = label(config)
    new = pd.read_parquet(output / f"run={second['run_id']}")
    assert sorted(Path(p).name for p in new["path"]) == ["new-1.jpg", "new-2.jpg", "new-3.jpg", "new-4.jpg"]
    assert not unfinished.exists()
    frame = _assert_exactly_once(output, lake)
    assert sorted(frame["run"].unique()) == sorted([first["run_id"], second["run_id"]])

    third = label(config)
    assert third["skipped"] == "nothing new" and len(list(output.glob("run=*"))) == 2

    capsys.readouterr()
    assert main(["runs", str(output), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
    assert [r["run_id"] for r in listed] == [second["run_id"], first["run_id"]]  # newest first
    assert [(r["images"], r["errors"], r["errors_by_kind"]) for r in listed] == [
        (4, 1, {"corrupt": 1}), (first["images"], 0, {})]
    assert main(["runs", str(output)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["run_id", "started_at", "images"]
    assert table[1].startswith(second["run_id"]) and "1 (corrupt 1)" in table[1]


def test_runs_on_a_path_that_is_no_output_is_a_usage_error(tmp_path: Path, capsys) -> None:
    for path in (tmp_path, tmp_path / "missing"):
        assert main(["runs", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err


def test_no_input_block_or_output_row_goes_through_the_driver(ray_local, tmp_path: Path, synthetic_lake,
                                                             model_uri: str, monkeypatch: pytest.MonkeyPatch,
                                                             capsys) -> None:
    """A worker (the inputs' reader) puts the input blocks into the object store, never this (the
    driver) process; the workers write the staged files: writing from the driver fails, and what
    the driver iterates over holds file names and row counts only: enough for its progress line.
    stdout is the JSON summary alone."""
    import ray
    import ray.data

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Dataset.write_staged called in the driver")

    seen: list[list[str]] = []
    iter_batches = ray.data.Dataset.iter_batches

    def recording(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            seen.append(batch.column_names)
            yield batch

    put, tables_put = ray.put, []

    def recording_put(value, *args, **kwargs):
        tables_put.append(isinstance(value, pa.Table))
        return put(value, *args, **kwargs)

    monkeypatch.setattr(Dataset, "write_staged", refuse)
    monkeypatch.setattr(ray.data.Dataset, "iter_batches", recording)
    monkeypatch.setattr(ray, "put", recording_put)
    lake = _lake(synthetic_lake, tmp_path, 3)
    output = tmp_path / "labels"
    assert main(["label", "--input", str(lake), "--model", model_uri, "--output", str(output),
                 "--rows-per-file", "4"]) == 0
    assert seen and all(columns == ["file", "rows"] for columns in seen)
    assert not any(tables_put)
    _assert_exactly_once(output, lake)
    out, err = capsys.readouterr()
    images = json.loads(out)["images"]
    assert re.search(rf"^distcls: {images}/{images} images \(100%\) +\S+ images/s .* ETA 0s$", err, re.MULTILINE), err


@pytest.mark.gpu
def test_gpu_labels_agree_with_cpu(ray_local, tmp_path: Path, synthetic_lake, model_uri: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    lake = synthetic_lake(2, labelled=False)
    cpu = label(LabelConfig(input=str(lake), model=model_uri, output=str(tmp_path / "cpu")))
    gpu = label(LabelConfig(input=str(lake), model=model_uri, output=str(tmp_path / "gpu"), gpu=True))
    assert cpu["images"] == gpu["images"] == 20
    on_cpu = pd.read_parquet(tmp_path / "cpu").sort_values("path").reset_index(drop=True)
    on_gpu = pd.read_parquet(tmp_path / "gpu").sort_values("path").reset_index(drop=True)
    # fp16 autocast moves scores by ~1e-3; labels agree wherever the top score is not a near-tie.
    np.testing.assert_allclose(on_gpu["score"], on_cpu["score"], atol=1e-2)
    clear = on_cpu["topk_scores"].map(lambda s: s[0] - s[1] > 0.05)
    assert (on_gpu["label"][clear] == on_cpu["label"][clear]).all()


def test_dry_run_says_what_a_run_would_label_and_changes_nothing(ray_local, tmp_path: Path, synthetic_lake,
                                                                 model_uri: str, capsys) -> None:
    lake = _lake(synthetic_lake, tmp_path, 2)
    output = tmp_path / "labels"
    images = len(list(lake.iterdir()))
    argv = ["label", "--input", str(lake), "--model", model_uri, "--output", str(output), "--incremental", "--dry-run"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (plan["inputs"], plan["pending"], plan["estimated_seconds"]) == (images, images, None)
    assert not output.exists()

    first = label(LabelConfig(input=str(lake), model=model_uri, output=str(output), incremental=True))
    for name in ("new-1.jpg", "new-2.jpg"):
        shutil.copy(lake / "img-000000.jpg", lake / name)
    before = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in output.rglob("*"))
    capsys.readouterr()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    plan = json.loads(out.strip().splitlines()[-1])
    assert (plan["pending"], plan["already_labelled"], plan["rate_of_run"]) == (2, images, first["run_id"])
    assert plan["estimated_seconds"] == pytest.approx(2 / first["images_per_s"], abs=0.1)
    assert "2 of" in err and "nothing was started or written" in err
    assert sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in output.rglob("*")) == before
