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
        fss, fss_path = storage.fsspec_filesystem(uri, StorageConfig())
        assert isinstance(arrow, pafs.LocalFileSystem) and arrow_path == str(tmp_path)
        assert fss.protocol[0] == "file" and fss_path == str(tmp_path)


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

    assert storage.fsspec_filesystem("s3://bucket/prefix", from_env)[0].endpoint_url == "http://env-host:9000"
    fs, path = storage.fsspec_filesystem("s3a://bucket/prefix/", explicit)
    assert fs.endpoint_url == "https://explicit-host:9443/base/" and path == "bucket/prefix"


# ---------------------------------------------------------------------------------------------
# Against the S3 server


def test_bytes_round_trip_between_pyarrow_and_fsspec(s3_bucket: str, s3_endpoint: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # pyarrow does not read AWS_ENDPOINT_URL; with it unset, only the explicit endpoint can reach moto.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    config = StorageConfig(endpoint_url=s3_endpoint)
    payload = bytes(range(256)) * 1000

    arrow, path = storage.arrow_filesystem(f"s3://{s3_bucket}/a/arrow.bin", config)
    with arrow.open_output_stream(path) as stream:
        stream.write(payload)
    assert storage.read_bytes(f"s3://{s3_bucket}/a/arrow.bin", config) == payload

    storage.write_bytes(f"s3://{s3_bucket}/a/fsspec.bin", payload[::-1], config)
    arrow, path = storage.arrow_filesystem(f"s3://{s3_bucket}/a/fsspec.bin", config)
    with arrow.open_input_stream(path) as stream:
        assert stream.read() == payload[::-1]

    storage.write_json(f"s3://{s3_bucket}/a/x.json", {"k": [1, 2]}, config)
    assert storage.read_json(f"s3://{s3_bucket}/a/x.json", config) == {"k": [1, 2]}
    keys = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert sorted(k["Key"] for k in keys) == ["a/arrow.bin", "a/fsspec.bin", "a/x.json"]


def test_require_exists_on_s3(s3_bucket: str) -> None:
    config = StorageConfig()
    storage.write_bytes(f"s3://{s3_bucket}/lake/cat/1.jpg", b"x", config)
    assert storage.require_exists(f"s3://{s3_bucket}/lake", config).type == pafs.FileType.Directory
    assert storage.require_exists(f"s3://{s3_bucket}/lake/cat/1.jpg", config).size == 1

    missing_prefix = f"s3://{s3_bucket}/no-such-prefix"
    assert _usage_error(storage.require_exists, missing_prefix, config) == f"{missing_prefix}: not found"
    bucket = f"nobucket-{uuid.uuid4().hex[:8]}"
    for uri in (f"s3://{bucket}/lake", f"s3://{bucket}"):
        assert _usage_error(storage.require_exists, uri, config) == f"{uri}: bucket {bucket!r} does not exist"


def test_read_bytes_of_a_missing_object_names_the_uri(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/nothing.json"
    assert _usage_error(storage.read_bytes, uri, StorageConfig()) == f"{uri}: not found"


def test_bad_credentials_are_access_denied(s3_bucket: str, s3_auth: dict[str, str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"s3://{s3_bucket}/lake"
    for name, value in s3_auth.items():  # the IAM user's keys work: the server does check
        monkeypatch.setenv(name, value)
    assert storage.require_exists(f"s3://{s3_bucket}", StorageConfig()).type == pafs.FileType.Directory

    for key_id, secret in (("AKIAUNKNOWNKEY000000", CANARY), (s3_auth["AWS_ACCESS_KEY_ID"], CANARY)):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        expected = f"{uri}: access denied (check credentials)"
        assert _usage_error(storage.require_exists, uri, StorageConfig()) == expected
        assert _usage_error(storage.read_bytes, uri, StorageConfig()) == expected


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
    assert _usage_error(storage.require_exists, uri, config) == f"{uri}: endpoint unreachable"
    assert time.monotonic() - started < 10  # the existence check retries little (was ~45 s)

    started = time.monotonic()
    assert _usage_error(storage.read_bytes, f"{uri}/model.json", config) == f"{uri}/model.json: endpoint unreachable"
    assert time.monotonic() - started < 30  # botocore's own retries; an error, not a hang


# ---------------------------------------------------------------------------------------------
# Local writes


def test_local_write_bytes_is_complete_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "new" / "dir" / "model.json"
    storage.write_bytes(str(target), b"first", StorageConfig())
    storage.write_bytes(f"file://{target}", b"second, longer", StorageConfig())
    assert target.read_bytes() == b"second, longer"
    assert os.listdir(target.parent) == ["model.json"]


def test_failed_local_write_keeps_old_content_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model.json"
    target.write_bytes(b"old")

    def fail(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    message = _usage_error(storage.write_bytes, str(target), b"new", StorageConfig())
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
    expected, classes = lake.labelled_images(str(root), StorageConfig())
    assert len(classes) == 10 and expected.num_rows == 10

    for spelling in (root.name, f"./{root.name}/", f"file://{root}"):
        table, found = lake.labelled_images(spelling, StorageConfig())
        assert found == classes and table.equals(expected), spelling
    # A bare relative manifest name: its relative paths resolve against the current folder.
    assert lake.read_manifest("manifest.csv", StorageConfig())["path"].to_pylist() == [str(root / "circle" / "000000.jpg")]
