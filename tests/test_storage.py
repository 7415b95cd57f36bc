"""URIs to filesystems, against a real S3 server (moto on 127.0.0.1), and the errors a user sees."""
from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator

import boto3
import numpy as np
import pyarrow.fs as pafs
import pytest

from distcls import images, storage
from distcls.config import StorageConfig
from distcls.errors import UsageError
from distcls.storage import Store
from faultstore import Fault, FaultStore

CANARY = "testing-secret-canary-7f3a9"


def _usage_error(fn, *args) -> str:
    with pytest.raises(UsageError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message and CANARY not in message
    return message


# ---------------------------------------------------------------------------------------------
# URIs


def test_split_uri_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage.split_uri("lake/a.jpg") == ("file", str(tmp_path / "lake" / "a.jpg"))
    assert storage.split_uri("~/x") == ("file", os.path.expanduser("~/x"))
    assert storage.split_uri("file:///data/lake/") == ("file", "/data/lake")
    assert storage.split_uri("file:///data/../lake") == ("file", "/lake")


def test_split_uri_object_store_keeps_odd_key_characters() -> None:
    assert storage.split_uri("s3://bucket/prefix/") == ("s3", "bucket/prefix")
    assert storage.split_uri("S3://bucket/a b/#1?v=2.jpg") == ("s3", "bucket/a b/#1?v=2.jpg")
    assert storage.split_uri("gs://bucket") == ("gs", "bucket")


@pytest.mark.parametrize("uri", ["s3://", "s3:///key.jpg"])
def test_uri_without_bucket_is_a_usage_error(uri: str) -> None:
    assert repr(uri) in _usage_error(storage.split_uri, uri)


def test_join_and_uri_for_round_trip() -> None:
    assert storage.join("s3://b/runs/", "/model/", "model.json") == "s3://b/runs/model/model.json"
    assert storage.uri_for("s3://b/lake", "b/lake/cat/1.jpg") == "s3://b/lake/cat/1.jpg"
    assert storage.uri_for("file:///lake", "/lake/cat/1.jpg") == "/lake/cat/1.jpg"
    assert storage.is_remote("s3://b/x") and not storage.is_remote("file:///x") and not storage.is_remote("x")


def test_local_filesystems(tmp_path: Path) -> None:
    for uri in (str(tmp_path), f"file://{tmp_path}"):
        arrow, arrow_path = storage.arrow_filesystem(uri, StorageConfig())
        assert isinstance(arrow, pafs.LocalFileSystem) and arrow_path == str(tmp_path)
        assert isinstance(Store(uri).fs, pafs.LocalFileSystem) and Store(uri).path("a") == f"{tmp_path}/a"


def _arrow_options(fs: pafs.FileSystem) -> dict:
    return fs.__reduce__()[1][0]  # the S3Options pyarrow would rebuild the filesystem from


def test_s3_endpoint_from_environment_and_explicit_config_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env-host:9000")
    from_env = StorageConfig()
    explicit = StorageConfig(endpoint_url="https://explicit-host:9443/base/")

    options = _arrow_options(storage.arrow_filesystem("s3://bucket/prefix", from_env)[0])
    assert (options["endpoint_override"], options["scheme"]) == ("env-host:9000", "http")
    options = _arrow_options(storage.arrow_filesystem("s3://bucket/prefix", explicit)[0])
    assert (options["endpoint_override"], options["scheme"]) == ("explicit-host:9443/base", "https")

    # The lock's s3fs client: the same endpoint, and the same attempts as pyarrow's (its own loop off).
    assert Store("s3://bucket/prefix", from_env).conditional()[0].endpoint_url == "http://env-host:9000"
    fs, path = Store("s3a://bucket/prefix/", explicit.model_copy(update={"max_attempts": 4})).conditional("_LOCK")
    assert fs.endpoint_url == "https://explicit-host:9443/base/" and path == "bucket/prefix/_LOCK"
    assert fs.config_kwargs["retries"] == {"total_max_attempts": 4, "mode": "standard"} and fs.retries == 1


# ---------------------------------------------------------------------------------------------
# Against the S3 server


def test_bytes_round_trip_between_pyarrow_and_the_store(s3_bucket: str, s3_endpoint: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # pyarrow does not read AWS_ENDPOINT_URL; with it unset, only the explicit endpoint can reach moto.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    config = StorageConfig(endpoint_url=s3_endpoint)
    payload = bytes(range(256)) * 1000

    arrow, path = storage.arrow_filesystem(f"s3://{s3_bucket}/a/arrow.bin", config)
    with arrow.open_output_stream(path) as stream:
        stream.write(payload)
    assert Store(f"s3://{s3_bucket}/a/arrow.bin", config).read() == payload

    folder = Store(f"s3://{s3_bucket}/a", config)
    folder.write(payload[::-1], "store.bin")
    arrow, path = storage.arrow_filesystem(f"s3://{s3_bucket}/a/store.bin", config)
    with arrow.open_input_stream(path) as stream:
        assert stream.read() == payload[::-1]

    folder.write_json({"k": [1, 2]}, "x.json")
    assert folder.read_json("x.json") == {"k": [1, 2]}
    keys = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert sorted(k["Key"] for k in keys) == ["a/arrow.bin", "a/store.bin", "a/x.json"]
    assert [e.base_name for e in folder.entries()] == ["arrow.bin", "store.bin", "x.json"]

    folder.move("x.json", "sub/y.json")
    assert not folder.exists("x.json") and folder.child("sub").read_json("y.json") == {"k": [1, 2]}
    folder.delete("sub")
    folder.delete("arrow.bin")
    folder.delete("no-such-object")  # nothing to delete is not an error
    assert [e.base_name for e in folder.entries()] == ["store.bin"]


def test_require_exists_on_s3(s3_bucket: str) -> None:
    config = StorageConfig()
    Store(f"s3://{s3_bucket}/lake/cat/1.jpg", config).write(b"x")
    assert Store(f"s3://{s3_bucket}/lake", config).require_exists().type == pafs.FileType.Directory
    assert Store(f"s3://{s3_bucket}/lake/cat/1.jpg", config).require_exists().size == 1

    missing_prefix = f"s3://{s3_bucket}/no-such-prefix"
    assert _usage_error(Store(missing_prefix, config).require_exists) == f"{missing_prefix}: not found"
    bucket = f"nobucket-{uuid.uuid4().hex[:8]}"
    for uri in (f"s3://{bucket}/lake", f"s3://{bucket}"):
        assert _usage_error(Store(uri, config).require_exists) == f"{uri}: bucket {bucket!r} does not exist"


def test_reading_a_missing_object_names_the_uri(s3_bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{s3_bucket}/nothing.json"
    assert _usage_error(Store(uri).read) == f"{uri}: not found"
    assert _usage_error(Store(f"s3://{s3_bucket}").read_json, "nothing.json") == f"{uri}: not found"
    assert _usage_error(Store(str(tmp_path)).read, "nothing.json") == f"{tmp_path}/nothing.json: not found"


def test_bad_credentials_are_access_denied(s3_bucket: str, s3_auth: dict[str, str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"s3://{s3_bucket}/lake"
    for name, value in s3_auth.items():  # the IAM user's keys work: the server does check
        monkeypatch.setenv(name, value)
    assert Store(f"s3://{s3_bucket}").require_exists().type == pafs.FileType.Directory

    for key_id, secret in (("AKIAUNKNOWNKEY000000", CANARY), (s3_auth["AWS_ACCESS_KEY_ID"], CANARY)):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        expected = f"{uri}: access denied (check credentials)"
        assert _usage_error(Store(uri).require_exists) == expected
        assert _usage_error(Store(uri).read) == expected


@pytest.mark.parametrize("message, reason", [
    ("When getting information for bucket 'b': AWS Error NO_SUCH_BUCKET during HeadBucket operation: "
     "The specified bucket does not exist", "bucket does not exist"),
    ("When getting information for key 'k' in bucket 'b': AWS Error ACCESS_DENIED during HeadObject "
     "operation: No response body.", "access denied (check credentials)"),
    ("An error occurred (InvalidAccessKeyId) when calling the GetObject operation: The AWS Access Key Id "
     "you provided does not exist in our records.", "access denied (check credentials)"),
    ("An error occurred (SignatureDoesNotMatch) when calling the ListObjectsV2 operation", "access denied (check credentials)"),
    ("Unable to locate credentials", "access denied (check credentials)"),
    ("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Couldn't connect to server",
     "endpoint unreachable"),
    ('Could not connect to the endpoint URL: "http://127.0.0.1:1/b/k"', "endpoint unreachable"),
    ("curlCode: 6, Could not resolve hostname", "endpoint unreachable"),
    ("first line of something new\nsecond line", "first line of something new"),
])
def test_describe_error_is_one_line_with_the_uri(message: str, reason: str) -> None:
    assert storage.describe_error("s3://b/k", OSError(message)) == f"s3://b/k: {reason}"
    assert storage.describe_error("x", FileNotFoundError(2, "gone")) == "x: not found"


@pytest.fixture()
def dead_endpoint() -> Iterator[str]:
    """An http:// endpoint on 127.0.0.1 that refuses connections: the port stays bound (so no
    other process can take it) but nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_unreachable_endpoint_fails_fast_naming_the_uri(dead_endpoint: str) -> None:
    config = StorageConfig(endpoint_url=dead_endpoint)
    uri = "s3://bucket/lake"
    started = time.monotonic()
    assert _usage_error(Store(uri, config).require_exists) == f"{uri}: endpoint unreachable"
    assert time.monotonic() - started < 10  # the existence check retries little (was ~45 s)

    # A read makes --max-attempts attempts, as every request does (the default 8 take ~45 s).
    few = config.model_copy(update={"max_attempts": 3})
    started = time.monotonic()
    assert _usage_error(Store(uri, few).read, "model.json") == f"{uri}/model.json: endpoint unreachable"
    assert time.monotonic() - started < 30  # an error, not a hang


# ---------------------------------------------------------------------------------------------
# Local writes


def test_local_write_is_complete_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "new" / "dir" / "model.json"
    Store(str(target)).write(b"first")
    Store(f"file://{target}").write(b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert os.listdir(target.parent) == ["model.json"]


def test_failed_local_write_keeps_old_content_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model.json"
    target.write_bytes(b"old")

    class DiskFull(pafs.LocalFileSystem):
        def move(self, src: str, dst: str) -> None:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage, "arrow_filesystem", lambda uri, config: (DiskFull(), storage.split_uri(uri)[1]))
    message = _usage_error(Store(str(target)).write, b"new")
    assert message.startswith(f"cannot write {target}: ") and "No space left" in message
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.json"]


# ---------------------------------------------------------------------------------------------
# Ray and the S3 lake


@pytest.fixture()
def s3_lake(s3_bucket: str, synthetic_lake, upload_folder) -> tuple[Path, str]:
    root = synthetic_lake(2)
    return root, upload_folder(root, f"{s3_bucket}/lake")


def test_ray_data_reads_every_file_of_an_s3_lake(ray_local, s3_lake: tuple[Path, str]) -> None:
    import ray

    local, uri = s3_lake
    fs, path = storage.arrow_filesystem(uri, StorageConfig())
    rows = ray.data.read_binary_files(path, filesystem=fs, include_paths=True).take_all()

    expected = {f.relative_to(local).as_posix(): f.read_bytes() for f in local.rglob("*.jpg")}
    got = {row["path"][len(path) + 1:]: row["bytes"] for row in rows}
    assert len(expected) == 20 and got == expected


def test_read_batch_in_a_ray_task_decodes_an_s3_lake(ray_local, s3_lake: tuple[Path, str]) -> None:
    import ray

    local, uri = s3_lake
    files = sorted(local.rglob("*.jpg"))
    uris = [storage.join(uri, f.relative_to(local).as_posix()) for f in files]
    config = StorageConfig()  # endpoint resolved here, from the driver's AWS_ENDPOINT_URL

    got = ray.get(ray.remote(images.read_batch).remote(uris + [f"{uri}/missing.jpg"], config, 32))

    assert list(got["error"][:-1]) == [None] * len(files)
    assert got["error"][-1] == f"{uri}/missing.jpg: not found"
    expected = np.stack([images.decode(f.read_bytes(), 32)[0] for f in files])
    np.testing.assert_array_equal(got["image"][:-1], expected)


# ---------------------------------------------------------------------------------------------
# Every spelling of a local URI resolves to the same files


def test_local_lake_spellings_agree(tmp_path: Path, synthetic_lake, monkeypatch: pytest.MonkeyPatch) -> None:
    from distcls import lake

    root = synthetic_lake(1)
    monkeypatch.chdir(root.parent)
    (root.parent / "manifest.csv").write_text(f"path,label\n{root.name}/circle/000000.jpg,circle\n")
    expected, classes = lake.labelled_images(Store(str(root)))
    assert len(classes) == 10 and expected.num_rows == 10

    for spelling in (root.name, f"./{root.name}/", f"file://{root}"):
        table, found = lake.labelled_images(Store(spelling))
        assert found == classes and table.equals(expected), spelling
    # A bare relative manifest name: its relative paths resolve against the current folder.
    assert lake.read_manifest(Store("manifest.csv"))["path"].to_pylist() == [str(root / "circle" / "000000.jpg")]


# ---------------------------------------------------------------------------------------------
# One retry policy: --max-attempts reaches every request, through the fault proxy (faultstore.py)


def _through(fault_store: FaultStore, attempts: int) -> StorageConfig:
    return StorageConfig(endpoint_url=fault_store.endpoint, max_attempts=attempts)


def test_a_throttled_model_json_is_retried_within_max_attempts(fault_store: FaultStore, s3_bucket: str,
                                                                upload_folder, tiny_model: Path, capsys) -> None:
    """A 503 on the first GET of model.json: `distcls export` rides it out with --max-attempts 2,
    and with --max-attempts 1 fails (exit 2) naming the artifact, the file and the store's answer."""
    from distcls.cli import main

    model = upload_folder(tiny_model, f"{s3_bucket}/model")
    meta = f"/{s3_bucket}/model/model.json"
    fault_store.faults = [Fault(meta, "slowdown", times=1, method="GET")]
    code = main(["export", "--model", model, "--endpoint-url", fault_store.endpoint, "--max-attempts", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err == (f"distcls export: error: {model}: not a distcls model artifact (cannot read model.json: "
                   f"{model}/model.json: store busy or failing (throttled or HTTP 5xx))")
    assert not Store(model).exists("model.onnx")

    fault_store.faults = [Fault(meta, "slowdown", times=1, method="GET")]
    fault_store.served.clear()
    code = main(["export", "--model", model, "--endpoint-url", fault_store.endpoint, "--max-attempts", "2"])
    assert code == 0, capsys.readouterr().err
    assert fault_store.faulted() == [meta]  # the fault was met, then the second attempt read the file
    assert [method for method, path, what in fault_store.served if path == meta and what == "forwarded"] != []
    assert Store(model).read_json("model.onnx.json")["model_id"] == Store(model).read_json("model.json")["model_id"]


def test_json_reads_and_writes_obey_max_attempts(fault_store: FaultStore, s3_bucket: str) -> None:
    folder = f"s3://{s3_bucket}/runs"
    Store(folder).write_json({"a": 1}, "x.json")
    fault_store.faults = [Fault(f"/{s3_bucket}/runs/", "internal", times=2)]  # per path: each request's first two
    assert Store(folder, _through(fault_store, 3)).read_json("x.json") == {"a": 1}
    Store(folder, _through(fault_store, 3)).write_json({"b": 2}, "y.json")
    assert Store(folder).read_json("y.json") == {"b": 2}

    fault_store.faults = [Fault(f"/{s3_bucket}/runs/", "internal", times=2)]
    assert _usage_error(Store(folder, _through(fault_store, 2)).read_json, "x.json") == \
        f"{folder}/x.json: store busy or failing (throttled or HTTP 5xx)"


def test_the_lock_client_obeys_max_attempts(fault_store: FaultStore, s3_bucket: str) -> None:
    """The one s3fs use, the lock's conditional PUT, makes --max-attempts attempts as pyarrow does."""
    from distcls.dataset import LOCK, Dataset

    output = f"s3://{s3_bucket}/labels"
    lock = f"/{s3_bucket}/labels/{LOCK}"
    fault_store.faults = [Fault(lock, "slowdown", times=1, method="PUT")]
    message = _usage_error(Dataset(Store(output, _through(fault_store, 1))).lock)
    assert message == f"cannot write {output}/{LOCK}: store busy or failing (throttled or HTTP 5xx)"
    assert not Store(output).exists(LOCK)

    fault_store.faults = [Fault(lock, "slowdown", times=1, method="PUT")]
    with Dataset(Store(output, _through(fault_store, 2))).lock():
        assert Store(output).exists(LOCK)
    assert fault_store.faulted() == [lock, lock] and not Store(output).exists(LOCK)


# ---------------------------------------------------------------------------------------------
# The handle travels


def test_a_store_pickles_and_works_in_a_ray_task(ray_local, s3_bucket: str) -> None:
    import pickle

    import ray

    store = Store(f"s3://{s3_bucket}/shared", StorageConfig(max_attempts=2))  # endpoint from the driver's env
    store.write_json({"from": "driver"}, "in.json")
    assert pickle.loads(pickle.dumps(store)) == store  # its filesystem (built above) is not pickled

    @ray.remote
    def copy(handle: Store) -> str:
        handle.write_json({**handle.read_json("in.json"), "via": "task"}, "out", "result.json")
        return handle.child("out").uri_of("result.json")

    uri = ray.get(copy.remote(store))
    assert uri == f"s3://{s3_bucket}/shared/out/result.json"
    assert store.read_json("out", "result.json") == {"from": "driver", "via": "task"}
