"""Reads that fail: every failure is classified (``error_kind``), passing faults of the store are
retried and never recorded as final, and nothing is read that is not a regular file of at most
--max-file-bytes. The store's faults come from a proxy in front of the moto server (faultstore.py)."""
from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from distcls import decode_stage
from distcls.cli import main
from distcls.config import StorageConfig
from distcls.images import FINAL_ERROR_KINDS, read_batch
from faultstore import Fault, FaultStore
from oddfiles import _encode, _png_header_only

GOOD = _encode(Image.new("RGB", (40, 30), (200, 30, 30)), "PNG")


@pytest.fixture()
def special_files(tmp_path: Path) -> Iterator[dict[str, str]]:
    """{path: expected error_kind} of files that must never be read, next to a good one (None)."""
    root = tmp_path / "lake"
    root.mkdir()
    (root / "good.png").write_bytes(GOOD)
    os.mkfifo(root / "fifo.jpg")  # opening it for reading would block until a writer comes
    (root / "folder.jpg").mkdir()
    (root / "zero.jpg").symlink_to("/dev/zero")
    with open(root / "sparse-40GB.jpg", "wb") as handle:  # costs no disk: a hole
        handle.truncate(40 * 2**30)
    (root / "loop-a.jpg").symlink_to(root / "loop-b.jpg")
    (root / "loop-b.jpg").symlink_to(root / "loop-a.jpg")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "socket.jpg"))
    (root / "big.png").write_bytes(GOOD + b"\0" * 4096)  # a valid PNG above the limit the tests use
    yield {str(root / "good.png"): None, str(root / "fifo.jpg"): "not_file", str(root / "folder.jpg"): "not_file",
           str(root / "zero.jpg"): "not_file", "/dev/zero": "not_file", str(root / "sparse-40GB.jpg"): "too_large",
           str(root / "loop-a.jpg"): "not_file", str(root / "socket.jpg"): "not_file",
           str(root / "big.png"): "too_large", str(root / "missing.jpg"): "not_found"}
    listener.close()


# ---------------------------------------------------------------------------------------------
# Bounded reads, local files


@pytest.mark.timeout(120, method="thread")  # a FIFO or /dev/zero that is read hangs or fills memory
def test_special_and_oversized_files_are_error_rows_without_being_read(special_files: dict[str, str]) -> None:
    paths = list(special_files)
    got = read_batch(paths, StorageConfig(), 24, max_file_bytes=len(GOOD) + 100)
    assert dict(zip(paths, got["error_kind"])) == special_files
    errors = dict(zip(paths, got["error"]))
    assert errors[paths[0]] is None and got["width"][0] == 40
    assert errors[paths[1]] == f"{paths[1]}: not a regular file (a FIFO)"
    assert errors["/dev/zero"] == "/dev/zero: not a regular file (a character device)"
    sparse = [p for p in paths if "sparse" in p][0]
    assert errors[sparse] == f"{sparse}: too large: {40 * 2**30} bytes, above --max-file-bytes {len(GOOD) + 100}"


def test_a_listed_size_above_the_limit_is_never_opened(tmp_path: Path) -> None:
    """The listing's size decides before any request: the file is not even looked at (here it no
    longer exists, and the row still says too_large, not not_found)."""
    gone, small = str(tmp_path / "gone.png"), tmp_path / "small.png"
    small.write_bytes(GOOD)
    got = read_batch([gone, str(small)], StorageConfig(), 24, sizes=[10**12, None], max_file_bytes=10**6)
    assert list(got["error_kind"]) == ["too_large", None]


def test_every_content_failure_has_a_final_kind(tmp_path: Path) -> None:
    files = {"truncated.png": (GOOD[:60], "corrupt"), "text.jpg": (b"not an image\n" * 9, "corrupt"),
             "empty.jpg": (b"", "corrupt"), "bomb.png": (_png_header_only(100_000, 100_000), "too_large")}
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    paths = [str(tmp_path / name) for name in files] + ["https://example.com/x.jpg"]
    got = read_batch(paths, StorageConfig(), 24)
    assert list(got["error_kind"]) == [kind for _, kind in files.values()] + ["refused"]
    assert set(got["error_kind"]) <= set(FINAL_ERROR_KINDS)


@pytest.mark.timeout(300, method="thread")
def test_label_cli_gives_special_files_in_a_manifest_their_error_rows(ray_local, special_files: dict[str, str],
                                                                     tiny_model: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path\n" + "".join(f"{p}\n" for p in special_files))
    output = tmp_path / "out"
    code = main(["label", "--manifest", str(manifest), "--model", str(tiny_model), "--output", str(output),
                 "--max-file-bytes", str(len(GOOD) + 100)])
    assert code == 0
    rows = {r["path"]: r for r in pq.read_table(output).to_pylist()}
    assert {p: r["error_kind"] for p, r in rows.items()} == special_files
    assert rows[str(tmp_path / "lake" / "good.png")]["label"] is not None
    assert all((r["error"] is None) == (r["error_kind"] is None) for r in rows.values())


# ---------------------------------------------------------------------------------------------
# Passing faults of the object store


@pytest.fixture()
def s3_lake(s3_bucket: str, upload_folder, synthetic_lake) -> tuple[str, list[str]]:
    """(lake URI, its 10 image URIs) on the moto server."""
    local = synthetic_lake(1, labelled=False)
    lake = upload_folder(local, f"{s3_bucket}/lake")
    return lake, sorted(f"{lake}/{p.name}" for p in local.glob("*.jpg"))


def _label_through(store: FaultStore, lake: str, model: Path, output: Path) -> tuple[int, pa.Table | None]:
    # --max-attempts 1: no SDK retries, so that every fault reaches distcls's own per-file retries.
    code = main(["label", "--input", lake, "--model", str(model), "--output", str(output),
                 "--endpoint-url", store.endpoint, "--max-attempts", "1", "--batch-size", "5"])
    return code, pq.read_table(output) if (output / "_SUCCESS").exists() else None


def _key(uri: str) -> str:
    return "/" + uri.removeprefix("s3://")


def test_faults_that_heal_within_the_retries_leave_no_error_rows(ray_local, fault_store: FaultStore,
                                                                s3_lake: tuple[str, list[str]], tiny_model: Path,
                                                                tmp_path: Path) -> None:
    """Throttling, a 500 and an access denied (which the SDK never retries) each answer the first
    two requests for their image, then the store recovers: the third attempt reads it."""
    lake, uris = s3_lake
    fault_store.faults = [Fault(_key(uris[0]), "slowdown", times=2), Fault(_key(uris[1]), "internal", times=2),
                          Fault(_key(uris[2]), "denied", times=2), Fault(_key(uris[3]), "expired", times=2)]
    code, table = _label_through(fault_store, lake, tiny_model, tmp_path / "out")
    assert code == 0 and table is not None
    assert sorted(table["path"].to_pylist()) == uris
    assert table["error"].null_count == table["error_kind"].null_count == len(uris)
    assert sorted(set(fault_store.faulted())) == sorted(_key(u) for u in uris[:4])
    assert len(fault_store.faulted()) == 8


def test_faults_that_outlast_the_retries_are_transient_rows_and_the_run_commits(
        ray_local, fault_store: FaultStore, s3_lake: tuple[str, list[str]], tiny_model: Path, tmp_path: Path) -> None:
    """Three images keep failing (throttled, HTTP 500, an expired token's 403) for the whole run:
    their rows say transient, whatever their content, and the rest is labelled and committed.
    Once the store recovers, the same objects read fine: the fault was never the file's."""
    lake, uris = s3_lake
    failing = {uris[0]: "slowdown", uris[1]: "internal", uris[2]: "expired"}
    fault_store.faults = [Fault(_key(uri), kind) for uri, kind in failing.items()]
    code, table = _label_through(fault_store, lake, tiny_model, tmp_path / "out")
    assert code == 0 and table is not None
    rows = {r["path"]: r for r in table.to_pylist()}
    assert sorted(rows) == uris
    assert {p: r["error_kind"] for p, r in rows.items() if r["error_kind"]} == dict.fromkeys(failing, "transient")
    assert rows[uris[2]]["error"] == f"{uris[2]}: access denied (check credentials)"
    assert rows[uris[0]]["error"] == f"{uris[0]}: store busy or failing (throttled or HTTP 5xx)"
    assert all(rows[u]["label"] is not None for u in uris[3:])
    assert len(fault_store.faulted(failing[uris[0]])) == 3  # three attempts, then given up

    fault_store.faults = []
    again = read_batch(list(failing), StorageConfig(endpoint_url=fault_store.endpoint, max_attempts=1), 32)
    assert list(again["error"]) == [None] * 3


def test_a_denied_object_is_transient_not_a_content_error(fault_store: FaultStore, s3_lake: tuple[str, list[str]]) -> None:
    """A 403 for one key (a policy or token problem, not the image): transient while it lasts, and
    the image reads again once it heals; the other images are unaffected."""
    _, uris = s3_lake
    config = StorageConfig(endpoint_url=fault_store.endpoint, max_attempts=1)
    fault_store.faults = [Fault(_key(uris[4]), "denied")]
    denied = read_batch(uris[3:6], config, 32)
    assert list(denied["error_kind"]) == [None, "transient", None]
    assert denied["error"][1] == f"{uris[4]}: access denied (check credentials)"
    fault_store.faults = []
    healed = read_batch(uris[3:6], config, 32)
    assert list(healed["error_kind"]) == [None, None, None]


def test_a_stalled_response_is_retried_then_transient(fault_store: FaultStore, s3_lake: tuple[str, list[str]],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The store accepts the request and sends nothing (past the client's request timeout, cut to
    1 s here): one stall is ridden out by the next attempt, a stall on every attempt is transient."""
    _, uris = s3_lake
    real = pafs.S3FileSystem
    monkeypatch.setattr(pafs, "S3FileSystem", lambda **kwargs: real(**{**kwargs, "request_timeout": 1}))
    fault_store.faults = [Fault(_key(uris[0]), "stall", times=1), Fault(_key(uris[1]), "stall")]
    got = read_batch(uris[:3], StorageConfig(endpoint_url=fault_store.endpoint, max_attempts=1), 32)
    assert list(got["error_kind"]) == [None, "transient", None]
    assert got["error"][1] == f"{uris[1]}: timed out (the store stopped sending)"


def test_an_object_store_folder_named_like_an_image_is_not_a_file(s3_bucket: str, s3_endpoint: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.put_object(Bucket=s3_bucket, Key="lake/x.jpg/inner.png", Body=GOOD)
    client.put_object(Bucket=s3_bucket, Key="lake/big.png", Body=GOOD + b"\0" * 4096)
    uris = [f"s3://{s3_bucket}/lake/{k}" for k in ("x.jpg", "x.jpg/inner.png", "big.png", "missing.jpg")]
    got = read_batch(uris, StorageConfig(), 24, max_file_bytes=len(GOOD) + 100)
    assert list(got["error_kind"]) == ["not_file", None, "too_large", "not_found"]


# ---------------------------------------------------------------------------------------------
# A file that kills its decoder


def _decoder_that_dies_on_poison() -> None:
    """worker_process_setup_hook: in every Ray worker, decoding bytes that start with POISON kills
    the process, as a segfaulting decoder would."""
    import os

    from distcls import images

    real = images.decode

    def decode(data: bytes, *args, **kwargs):
        if data.startswith(b"POISON"):
            if os.environ.get("DEATHS_FILE"):  # a line per death, for tests that count them
                with open(os.environ["DEATHS_FILE"], "a") as deaths:
                    deaths.write(f"{os.getpid()}\n")
            os._exit(1)
        return real(data, *args, **kwargs)

    images.decode = decode


@pytest.mark.slow  # a Ray of its own (the crash is injected at worker start) and two actor restarts: 1-2 min here
@pytest.mark.timeout(600, method="thread")  # without the guard, Ray retries the batch forever
def test_a_file_that_kills_its_decoder_becomes_an_error_row_not_an_endless_retry(
        no_ray, tmp_path: Path, synthetic_lake, tiny_model: Path) -> None:
    """Its batch is retried once as is, once carefully (a file at a time, noting each), and the
    third attempt gives the file that was in flight its row instead of reading it again."""
    import ray
    import ray.cloudpickle
    from ray._private import state

    lake = tmp_path / "lake"
    shutil.copytree(synthetic_lake(1, labelled=False), lake)
    poison = lake / "img-000003-poison.jpg"
    poison.write_bytes(b"POISON" + GOOD)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 runtime_env={"worker_process_setup_hook": _decoder_that_dies_on_poison})
        code = main(["label", "--input", str(lake), "--model", str(tiny_model), "--output", str(tmp_path / "out"),
                     "--batch-size", "4", "--concurrency", "1"])
        restarts = sum(a["NumRestarts"] for a in state.actors().values() if "(Predictor)" in a["ActorClassName"])
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert code == 0
    rows = {r["path"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert sorted(rows) == sorted(str(p) for p in lake.glob("*.jpg"))
    assert (rows[str(poison)]["error"], rows[str(poison)]["error_kind"]) == (f"{poison}: crashed the decoder", "corrupt")
    assert all(r["label"] is not None for p, r in rows.items() if p != str(poison))
    assert restarts == 2


@pytest.mark.slow
@pytest.mark.timeout(600, method="thread")  # without the registry, Ray Data retries the block forever
@pytest.mark.parametrize("cache, workers", [("none", 1), ("memory", 2)])
def test_a_file_that_kills_its_decoder_is_skipped_by_training(no_ray, tmp_path: Path, synthetic_lake,
                                                               capsys: pytest.CaptureFixture, cache: str,
                                                               workers: int) -> None:
    """One among the training images, one among the held-out ones. Each is read first by the check
    before the run (a task: there, on the driver, it killed the driver), the stats sample (tasks),
    the decode actors of the first streamed epoch or the cache's decode tasks, which the workers
    send; wherever that is, it kills two attempts and is never read again: 4 deaths in all, and
    the run trains and evaluates on every other image (cached, the workers' shards then differ by
    an image: each still takes as many steps, else DDP would wait for one the other never takes), and
    says, without --verbose, that it left each out once (not once per epoch)."""
    import json

    import ray
    import ray.cloudpickle

    lake, held = tmp_path / "lake", tmp_path / "held"
    shutil.copytree(synthetic_lake(4), lake)
    shutil.copytree(synthetic_lake(2, seed=1), held)
    for root in (lake, held):
        next(p for p in sorted(root.iterdir()) if p.is_dir()).joinpath("poison.jpg").write_bytes(b"POISON" + GOOD)
    output = tmp_path / "out"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 runtime_env={"worker_process_setup_hook": _decoder_that_dies_on_poison,
                              "env_vars": {"DEATHS_FILE": str(tmp_path / "deaths")}})
        code = main(["train", "--input", str(lake), "--val-input", str(held), "--output", str(output),
                     "--arch", "simple_cnn", "--epochs", "2", "--workers", str(workers), "--batch-size", "8",
                     "--cache", cache])
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert code == 0 and (output / "model" / "model.json").exists()
    history = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    good_held = len([p for p in held.rglob("*.jpg") if p.name != "poison.jpg"])
    # Every held-out image that decodes is evaluated, however the workers' shards differ.
    assert [row["val_images"] for row in history] == [good_held, good_held]
    assert len((tmp_path / "deaths").read_text().splitlines()) == 4
    out, err = capsys.readouterr()
    # The JSON line, then what ray.shutdown() above printed (outside the command, so on stdout).
    assert json.loads(out.splitlines()[0])["unreadable_images"] == {"train": 1, "val": 1}
    for root, what in ((lake, "training"), (held, "held-out")):
        images = len(list(root.rglob("*.jpg")))
        poison = next(root.rglob("poison.jpg"))
        assert (f"distcls: warning: 1 of the {images} {what} images failed to decode at least once and were left "
                f"out (first: {poison}: crashed the decoder; the decode workers' logs name each)") in err.splitlines()


def test_the_files_training_leaves_out_are_counted_once_each(ray_local, tmp_path: Path) -> None:
    """A file is noted by every epoch that decodes it (streamed), and by the stats sample too: the
    run's count is of files. The decode stage notes what it drops, reads that fail and crashes alike."""
    import ray

    from distcls import crashes

    registry = crashes.start_registry()
    assert ray.get(registry.unreadable.remote(["train"])) == (None, False, None)  # nothing decoded: unknown
    ray.get(registry.begin.remote("a-batch", "train"))
    assert ray.get(registry.unreadable.remote(["train"])) == (0, False, None)
    ray.get(registry.left_out.remote("train", [("s3://lake/b.jpg", "not an image"), ("s3://lake/a.jpg", "truncated")]))
    ray.get(registry.left_out.remote("train", [("s3://lake/b.jpg", "not an image")]))  # the next epoch
    ray.get(registry.left_out.remote("stats", [("s3://lake/a.jpg", "truncated")]))
    assert ray.get(registry.unreadable.remote(["train", "stats"])) == (2, False, "s3://lake/a.jpg: truncated")
    assert ray.get(registry.unreadable.remote(["val"])) == (None, False, None)
    (tmp_path / "good.jpg").write_bytes(GOOD)
    (tmp_path / "empty.jpg").write_bytes(b"")
    paths = np.array([str(tmp_path / "good.jpg"), str(tmp_path / "empty.jpg")])
    decoded = decode_stage.decode_rows({"path": paths, "label": np.array([0, 1])}, StorageConfig(), 16, registry, "val")
    assert decoded["label"].tolist() == [0]
    count, more, first = ray.get(registry.unreadable.remote(["val"]))
    assert count == 1 and not more and first.startswith(f"{tmp_path / 'empty.jpg'}: ") and not first.endswith(": ")
    # A lake of mostly broken files: the registry keeps MAX_NOTED of them, and says there were more.
    ray.get(registry.left_out.remote("val", [(f"s3://lake/{i:07d}.jpg", "empty") for i in range(crashes.MAX_NOTED)]))
    count, more, _ = ray.get(registry.unreadable.remote(["val"]))
    assert count == crashes.MAX_NOTED and more
    assert ray.get(registry.unreadable.remote(["train"]))[:2] == (2, False)


def test_a_file_that_killed_one_batch_is_skipped_by_every_batch_after_it(ray_local) -> None:
    """Training cuts its batches anew each epoch (a split's short last block joins the one drawn after
    it): a file's record must not depend on the batch it was in. And an attempt that finds its batch
    finished and forgotten by an overlapping one must not fail."""
    import ray

    from distcls import crashes

    registry = crashes.start_registry()
    assert ray.get(registry.begin.remote("epoch1-batch"))["crashed"] == []
    ray.get(registry.begin.remote("epoch1-batch"))  # the first attempt died: careful now
    ray.get(registry.note.remote("epoch1-batch", "s3://lake/poison.jpg"))
    third = ray.get(registry.begin.remote("epoch1-batch"))  # the careful one died reading it
    assert third == {"careful": True, "crashed": ["s3://lake/poison.jpg"], "give_up": False}
    ray.get(registry.done.remote("epoch1-batch"))
    assert ray.get(registry.begin.remote("epoch2-other-cut"))["crashed"] == ["s3://lake/poison.jpg"]
    ray.get(registry.done.remote("epoch2-other-cut"))
    ray.get(registry.note.remote("epoch2-other-cut", "s3://lake/a.jpg"))  # late, overlapping: no error
    ray.get(registry.done.remote("epoch2-other-cut"))
