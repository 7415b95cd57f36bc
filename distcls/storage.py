"""URIs to filesystems: one place that knows about local paths, file:// and s3:// (and gs:// via pyarrow).

Ray Data and the labeling pipeline use pyarrow filesystems; fsspec is used where a Python file
object is handier (torch.save / safetensors, small JSON files). Both are built from the same
StorageConfig so the endpoint, region and anonymous flag apply everywhere. pyarrow does not read
AWS_ENDPOINT_URL, which is why the endpoint is always passed on explicitly.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
from typing import Any
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs
# s3fs turns the store's answers into OSError but lets botocore's own errors through, such as
# EndpointConnectionError for an unreachable endpoint.
from botocore.exceptions import BotoCoreError

from distcls.config import StorageConfig
from distcls.errors import UsageError


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def split_uri(uri: str) -> tuple[str, str]:
    """(scheme, path-as-the-filesystem-wants-it) for a URI or a plain local path.

    Local paths are made absolute with ``.``, ``..`` and repeated ``/`` collapsed. An object key is
    a literal name to its store, in which ``a/../b`` and ``a//b`` are keys of their own that
    pyarrow cannot address: a key with ``.``, ``..`` or empty segments is refused (UsageError)
    rather than read as some other object.
    """
    if "://" not in uri:
        return "file", _absolute(os.path.expanduser(uri))
    # Split by hand, not with urlparse: object keys may hold '#' and '?', which a URL parser
    # would take for a fragment or a query and cut off.
    scheme, _, rest = uri.partition("://")
    scheme = scheme.lower()
    if scheme == "file":
        # file:///path, or file://localhost/path (RFC 8089); never a path relative to the working folder.
        host, _, path = rest.partition("/")
        if host.lower() not in ("", "localhost"):
            raise UsageError(f"{uri}: refused: a file URI names a path on this machine (file:///path), not on "
                             "another host")
        return "file", _absolute("/" + path)
    bucket, _, key = rest.rstrip("/").partition("/")
    if not bucket:
        raise UsageError(f"URI {uri!r} has no bucket")
    if key and any(part in ("", ".", "..") for part in key.split("/")):
        raise UsageError(f"{uri}: refused: an object key with '.', '..' or empty segments "
                         "(the store takes keys literally)")
    return scheme, rest.rstrip("/")


def _absolute(path: str) -> str:
    # abspath keeps a leading "//" (POSIX leaves its meaning to the system; on Linux it is "/").
    absolute = os.path.abspath(path)
    return "/" + absolute.lstrip("/") if absolute.startswith("//") else absolute


def normalize(uri: str) -> str:
    """The one spelling of ``uri`` used to compare and de-duplicate: a local path (also from
    ``file://``) absolute with ``.``, ``..`` and ``//`` collapsed, lexically, which is how every
    read of it resolves it; an object-store URI with a lower-case scheme and no trailing ``/``.
    Raises UsageError for an object key with ``.``, ``..`` or empty segments (see split_uri)."""
    scheme, path = split_uri(uri)
    return path if scheme == "file" else f"{scheme}://{path}"


def inside(uri: str, parent: str) -> bool:
    """Whether ``uri`` is ``parent`` or below it, both normalised, local symlinks resolved (a link
    below the root may lead anywhere). An object-store URI that normalize refuses is outside."""
    try:
        path, root = normalize(uri), normalize(parent)
    except UsageError:
        return False
    if not is_remote(path) and not is_remote(root):
        path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def inside_any(uris: list[str], parents: list[str]) -> list[bool]:
    """``any(inside(u, p) for p in parents)`` for each of ``uris``, with each parent resolved once:
    for millions of manifest rows against --allowed-roots."""
    roots = []
    for parent in parents:
        try:
            root = normalize(parent)
        except UsageError:
            continue
        roots.append(root if is_remote(root) else os.path.realpath(root))
    folders: dict[str, tuple[str, bool]] = {}  # folder -> (its realpath, whether it exists)
    found = []
    for uri in uris:
        try:
            path = normalize(uri)
        except UsageError:
            found.append(False)
            continue
        local = not is_remote(path)
        if local:
            path = _realpath(path, folders)
        found.append(any(local != is_remote(root) and (path == root or path.startswith(root.rstrip("/") + "/"))
                         for root in roots))
    return found


def _realpath(path: str, folders: dict[str, tuple[str, bool]]) -> str:
    """``os.path.realpath`` of a normalised local path, resolving each folder once (rows of a
    manifest share folders; realpath costs a system call per segment): then one ``lstat`` per
    path, none when its folder does not exist."""
    folder, name = os.path.split(path)
    if folder not in folders:
        if len(folders) > 100_000:
            folders.clear()
        real = os.path.realpath(folder)
        folders[folder] = real, os.path.isdir(real)
    real, exists = folders[folder]
    joined = os.path.join(real, name)
    return os.path.realpath(joined) if exists and os.path.islink(joined) else joined


# Standard retries (StorageConfig.max_attempts) ride out short outages of the store (throttling, a
# restarted server). The existence check is a job's first contact with the store, so it retries
# little: 3 attempts report an unreachable endpoint in about a second.
_CHECK_ATTEMPTS = 3


def arrow_filesystem(uri: str, storage: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it for ``uri``."""
    return _arrow_filesystem(uri, storage, storage.max_attempts)


def _arrow_filesystem(uri: str, storage: StorageConfig, attempts: int) -> tuple[pafs.FileSystem, str]:
    scheme, path = split_uri(uri)
    if scheme == "file":
        return pafs.LocalFileSystem(), path
    if scheme in ("s3", "s3a"):
        kwargs: dict[str, Any] = {
            "anonymous": storage.anonymous,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
            "connect_timeout": 5,
            "request_timeout": 60,
        }
        if storage.region:
            kwargs["region"] = storage.region
        if storage.endpoint_url:
            endpoint = urlparse(storage.endpoint_url)
            kwargs["endpoint_override"] = endpoint.netloc + endpoint.path.rstrip("/")
            kwargs["scheme"] = endpoint.scheme
            kwargs.setdefault("region", "us-east-1")
        return pafs.S3FileSystem(**kwargs), path
    try:
        fs, fs_path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:
        raise UsageError(f"unsupported URI {uri!r}: {exc}") from None
    return fs, fs_path


def fsspec_filesystem(uri: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the path inside it for ``uri``."""
    scheme, path = split_uri(uri)
    if scheme == "file":
        return fsspec.filesystem("file"), path
    if scheme in ("s3", "s3a"):
        client_kwargs = {"region_name": storage.region} if storage.region else {}
        fs = fsspec.filesystem(
            "s3",
            anon=storage.anonymous,
            endpoint_url=storage.endpoint_url,
            client_kwargs=client_kwargs,
            skip_instance_cache=True,
        )
        return fs, path
    return fsspec.filesystem(scheme), path


def join(uri: str, *parts: str) -> str:
    """Append path parts to a URI or local path."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def uri_for(uri_like: str, fs_path: str) -> str:
    """Turn a filesystem path found by listing back into a URI of the same kind as ``uri_like``."""
    scheme, _ = split_uri(uri_like)
    return fs_path if scheme == "file" else f"{scheme}://{fs_path}"


def describe_error(uri: str, exc: BaseException) -> str:
    """One line naming the URI and what went wrong, without the SDK's multi-line noise."""
    text = str(exc)
    lowered = text.lower()
    if "no_such_bucket" in lowered or "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        reason = "bucket does not exist"
    elif any(k in lowered for k in ("access_denied", "accessdenied", "invalid_access_key", "invalidaccesskeyid",
                                    "signature_does_not_match", "signaturedoesnotmatch", "forbidden",
                                    "no credentials", "unable to locate credentials", "security token",
                                    "expiredtoken", "token has expired", "http status 403")):
        reason = "access denied (check credentials)"
    elif any(k in lowered for k in ("couldn't connect", "could not connect", "connection refused", "curlcode: 7",
                                    "curlcode: 6", "could not resolve", "connect timeout", "timed out",
                                    "name or service not known")):
        reason = "endpoint unreachable"
    # The store answered, then failed this request: worth another try, and no verdict on the object.
    elif "operation too slow" in lowered or "timeout was reached" in lowered:
        reason = "timed out (the store stopped sending)"
    elif "connection reset" in lowered or "curlcode: 56" in lowered or "curlcode: 52" in lowered:
        reason = "connection reset"
    elif any(k in lowered for k in ("slow_down", "slowdown", "throttl", "service_unavailable", "internal_failure",
                                    "internalerror", "http status 5")):
        reason = "store busy or failing (throttled or HTTP 5xx)"
    elif isinstance(exc, FileNotFoundError) or "not found" in lowered or "no such file" in lowered:
        reason = "not found"
    else:
        reason = text.splitlines()[0][:200] if text else type(exc).__name__
    return f"{uri}: {reason}"


def require_exists(uri: str, storage: StorageConfig) -> pafs.FileInfo:
    """The FileInfo of ``uri``; UsageError naming the URI when it is missing or unreachable."""
    _require_credentials(uri, storage)
    fs, path = _arrow_filesystem(uri, storage, min(_CHECK_ATTEMPTS, storage.max_attempts))
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise UsageError(describe_error(uri, exc)) from None
    if info.type == pafs.FileType.NotFound:
        if is_remote(uri):
            _require_bucket(fs, uri, path)
        raise UsageError(f"{uri}: not found")
    return info


def _require_credentials(uri: str, storage: StorageConfig) -> None:
    """Without credentials the AWS SDK silently sends unsigned requests, and stores answer with
    anything from 403 to 500; say what is actually wrong instead. botocore resolves the same
    chain as pyarrow's SDK: environment, profile files, web identity (IRSA), instance role."""
    if split_uri(uri)[0] not in ("s3", "s3a") or storage.anonymous:
        return
    import botocore.session

    if botocore.session.get_session().get_credentials() is None:
        raise UsageError(f"{uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                         "a profile, or an instance role; --anonymous for public buckets)")


def _require_bucket(fs: pafs.FileSystem, uri: str, path: str) -> None:
    bucket = path.split("/", 1)[0]
    try:
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise UsageError(f"{uri}: bucket {bucket!r} does not exist")
    except OSError as exc:
        raise UsageError(describe_error(uri, exc)) from None


def require_regular(uri: str) -> None:
    """UsageError unless a local ``uri`` is a regular file (or missing, which the read reports):
    reading a FIFO blocks for ever and reading /dev/zero fills memory, whatever the file is called.
    Object stores hold only objects."""
    if is_remote(uri):
        return
    try:
        mode = os.stat(split_uri(uri)[1]).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(describe_error(uri, exc)) from None
    if not stat.S_ISREG(mode):
        raise UsageError(f"{uri}: not a regular file; refusing to read it")


def read_bytes(uri: str, storage: StorageConfig) -> bytes:
    fs, path = fsspec_filesystem(uri, storage)
    require_regular(uri)
    try:
        with fs.open(path, "rb") as handle:
            return handle.read()
    except (OSError, ValueError, BotoCoreError) as exc:
        raise UsageError(describe_error(uri, exc)) from None


def write_bytes(uri: str, data: bytes, storage: StorageConfig) -> None:
    """Write a whole object; for local paths via a temp file + rename so readers never see half of it."""
    fs, path = fsspec_filesystem(uri, storage)
    try:
        parent = path.rsplit("/", 1)[0]
        if not is_remote(uri):
            fs.makedirs(parent, exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            try:
                with fs.open(tmp, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, path)
            except BaseException:  # a full disk or an interrupt must not leave the temp file behind
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
        else:
            with fs.open(path, "wb") as handle:
                handle.write(data)
    except (OSError, BotoCoreError) as exc:
        raise UsageError(f"cannot write {describe_error(uri, exc)}") from None


def read_json(uri: str, storage: StorageConfig) -> Any:
    return json.loads(read_bytes(uri, storage))


def write_json(uri: str, value: Any, storage: StorageConfig) -> None:
    write_bytes(uri, json.dumps(value, indent=2, sort_keys=True).encode(), storage)
