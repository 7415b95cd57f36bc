"""Hostile input: broken, malicious and odd image files mixed with good ones.

Each file of tests/hostile_corpus.py must decode or fail within bounded time and memory (measured
one file per forked process), and one labeling run over all of them, with real CIFAR-10 images
mixed in, must give every file exactly one row: good ones exactly what the model says when called
directly on ``images.decode`` of the same bytes, bad ones an ``error``, with no worker dying on
the way. The milder odd files of tests/oddfiles.py are labelled through S3 in
test_label_inputs.py::test_odd_files_each_make_one_row_in_one_run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import hostile_corpus
from distcls.artifact import load_model, predict_proba
from distcls.config import LabelConfig, StorageConfig
from distcls.images import ImageError, decode, read_batch
from distcls.label import label
from distcls.storage import Store
from hostile_corpus import Expect

REPO = Path(__file__).resolve().parents[1]
# Bounds for any single hostile file: it decodes or fails within these, or the file can stall
# or kill a decode worker that holds a batch of them (8 threads at a time).
MAX_SECONDS = 2.0
MAX_RSS_GROWTH = 500 * 2**20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Expect]]:
    root = tmp_path_factory.mktemp("hostile")
    return root, hostile_corpus.build(root)


def _measure(folder: Path) -> dict[str, dict]:
    """{name: outcome, seconds, rss_growth} from a separate small process that forks per file."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "hostile_corpus.py"), str(folder)], env=env,
                          capture_output=True, text=True, timeout=600, check=True)
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    return {row["name"]: row for row in rows}


def _check_expectation(name: str, expect: Expect, error: str | None, size: tuple[int, int] | None) -> None:
    if expect.kind == "ok":
        assert error is None and size == expect.size, (name, error, size)
    elif expect.kind == "error":
        assert error is not None and expect.text in error, (name, error)


def test_every_hostile_file_decodes_or_fails_fast_in_bounded_memory(corpus) -> None:
    root, expected = corpus
    measured = _measure(root)
    assert sorted(measured) == sorted(expected)
    for name, row in measured.items():
        assert "crash" not in row and "hang" not in row, row  # only ImageError may come out of decode
        assert row["seconds"] < MAX_SECONDS, row
        assert row["rss_growth"] < MAX_RSS_GROWTH, row
        _check_expectation(name, expected[name], row.get("error"), tuple(row["size"]) if "size" in row else None)
    # The bombs are refused from their headers: microseconds and no pixel buffer.
    bombs = [row for name, row in measured.items() if name.startswith("bomb-") and "error" in row]
    assert len(bombs) >= 6 and max(row["rss_growth"] for row in bombs) < 64 * 2**20
    print(f"\n{len(measured)} files: slowest {max(r['seconds'] for r in measured.values()):.3f}s, "
          f"largest RSS growth {max(r['rss_growth'] for r in measured.values()) / 2**20:.0f} MiB")


def test_threaded_batch_decode_agrees_with_one_by_one(corpus) -> None:
    """read_batch decodes in 8 threads (as every decode task does); hostile files in the same
    batch must neither crash it nor change each other's results."""
    root, expected = corpus
    paths = sorted(str(root / name) for name in expected)
    batch = read_batch(paths, StorageConfig(), 32, threads=8)
    for i, path in enumerate(paths):
        try:
            pixels, width, height = decode(Path(path).read_bytes(), 32)
        except ImageError as exc:
            assert batch["error"][i] == str(exc) and not batch["image"][i].any(), path
            continue
        assert batch["error"][i] is None, (path, batch["error"][i])
        assert (batch["width"][i], batch["height"][i]) == (width, height)
        np.testing.assert_array_equal(batch["image"][i], pixels)


# (PNG colour type, bit depth, peak bytes per pixel allowed)
_NEAR_LIMIT = {"rgb": (2, 8, 6), "rgba": (6, 8, 10), "grey-alpha": (4, 8, 10), "grey-16bit": (0, 16, 12)}


def test_real_images_just_under_the_pixel_limit_stay_within_a_per_pixel_memory_bound(tmp_path: Path) -> None:
    """Files up to the limit (89.5 Mpx by default) are decoded in full; a few hundred KB of
    zeros that inflate to 81 Mpx show what one decode costs at most. Measured here: RGB 311 MiB,
    RGBA and grey+alpha 619 MiB, 16-bit grey 779 MiB (RGBA took 1.86 GB before images.py stopped
    copying the image for EXIF and compositing in RGBA)."""
    side = 9000
    for name, (color_type, depth, _) in _NEAR_LIMIT.items():
        (tmp_path / f"{name}.png").write_bytes(hostile_corpus.near_limit_png(side, color_type, depth))
    measured = _measure(tmp_path)
    for name, (_, _, bytes_per_pixel) in _NEAR_LIMIT.items():
        row = measured[f"{name}.png"]
        print(f"\n{side}x{side} {name}: {row['seconds']:.2f}s, RSS +{row['rss_growth'] / 2**20:.0f} MiB")
        assert row["size"] == [side, side]
        assert row["rss_growth"] < bytes_per_pixel * side * side, row


def _lake_with_cifar(root: Path, cifar_root) -> Path:
    """The hostile corpus plus one real CIFAR-10 image per class, in one flat lake."""
    lake = root.parent / "hostile-lake"
    if not lake.exists():
        shutil.copytree(root, lake)
        for image in sorted(cifar_root(1).glob("*/*.jpg")):
            shutil.copy(image, lake / f"cifar-{image.parent.name}-{image.name}")
    return lake


def test_one_run_labels_every_hostile_file_once_and_good_ones_as_the_model_does(
        ray_local, corpus, cifar_root, model_uri: str, tmp_path: Path) -> None:
    root, expected = corpus
    lake = _lake_with_cifar(root, cifar_root)
    files = sorted(lake.iterdir())
    before = _ray_health()
    summary = label(LabelConfig(input=str(lake), model=model_uri, output=str(tmp_path / "out"), batch_size=16))
    table = pq.read_table(tmp_path / "out")
    rows = {row["path"]: row for row in table.to_pylist()}
    assert table.num_rows == len(rows) == len(files) == summary["images"]  # every file, once
    assert sorted(rows) == sorted(str(f) for f in files)

    model, info = load_model(Store(model_uri))
    good_paths, good_pixels = [], []
    for file in files:
        row = rows[str(file)]
        try:
            pixels, width, height = decode(file.read_bytes(), info.image_size)
        except ImageError as exc:
            assert row["error"] == str(exc) and row["label"] is None and row["topk_labels"] is None, file.name
            continue
        assert row["error"] is None and (row["width"], row["height"]) == (width, height), (file.name, row["error"])
        good_paths.append(str(file))
        good_pixels.append(pixels)
        if file.name in expected:
            _check_expectation(file.name, expected[file.name], row["error"], (row["width"], row["height"]))
    probs = predict_proba(model, info, np.stack(good_pixels)).numpy()
    got = [rows[p] for p in good_paths]
    assert [r["label_id"] for r in got] == probs.argmax(1).tolist()
    assert [r["label"] for r in got] == [info.classes[i] for i in probs.argmax(1)]
    np.testing.assert_allclose([r["score"] for r in got], probs.max(1), atol=1e-5)
    assert sum(1 for p in good_paths if "cifar-" in p) == 10
    assert summary["errors"] == len(files) - len(good_paths) and summary["labelled"] == len(good_paths)

    # No worker died on the way: no inference actor restarted, no task needed a second attempt.
    after = _ray_health()
    actors = {k: v for k, v in after["actors"].items() if k not in before["actors"]}
    assert actors and all(restarts == 0 for restarts in actors.values()), actors
    assert after["retried_tasks"] == before["retried_tasks"]


def _ray_health() -> dict:
    """Restart counts of the Ray Data actors, and the ids of tasks that ran more than once, from
    the GCS (no dashboard needed). The session's Ray is shared by tests, so callers compare."""
    from ray._private import state

    actors = {k: a["NumRestarts"] for k, a in state.actors().items() if "MapWorker" in a["ActorClassName"]}
    retried = {e.task_id for e in state.state._get_all_task_events() if e.attempt_number > 0}
    return {"actors": actors, "retried_tasks": retried}
