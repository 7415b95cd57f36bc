"""URIs to filesystems: one place that knows about local paths, file:// and s3:// (and gs:// via pyarrow).

``Store`` is the handle a command builds once from its config: a root URI and its StorageConfig,
picklable (a Ray worker rebuilds the filesystem from those two), with every read, write, listing,
move and delete below that root. One filesystem stack, pyarrow, serves every request, so one retry
policy (``--max-attempts``: pyarrow's standard S3 retry strategy) covers them all; Ray Data and
the image reads use the same ``arrow_filesystem``. pyarrow does not read AWS_ENDPOINT_URL, which
is why the endpoint is always passed on explicitly.

The one other client: s3fs (botocore) for the output lock's conditional writes on S3
(``Store.conditional``, used by ``dataset._ObjectLock``): pyarrow's S3 client cannot send
``If-None-Match``/``If-Match`` (apache/arrow#44281); s3fs passes them to PutObject. The same client
lists an S3 lake page by page (``lake.list_chunks``): pyarrow's recursive listing returns only the
whole list. It is built
from the same StorageConfig and makes the same number of attempts with the same (standard) retry
mode, so that lock requests obey ``--max-attempts`` too.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

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
                                    "internalerror", "http status 5",
                                    "reduce your request rate")):  # s3fs's text for SlowDown
        reason = "store busy or failing (throttled or HTTP 5xx)"
    elif isinstance(exc, FileNotFoundError) or "not found" in lowered or "no such file" in lowered:
        reason = "not found"
    else:
        reason = text.splitlines()[0][:200] if text else type(exc).__name__
    return f"{uri}: {reason}"


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




@dataclass(frozen=True)
class Store:
    """A root URI and its storage settings: every request below the root goes through here.

    Names below the root are given as parts (``store.read("run=x", "_SUCCESS")``); no parts is the
    root itself (a store bound to a file). Pickles as the URI and the settings, so a handle passed
    to a Ray task or actor builds its own filesystem there.

    Errors: ``read``, ``write``, ``read_json``, ``write_json`` and ``require_exists`` raise
    UsageError with one line naming the URI, as a command reports them. The others (``get``,
    ``put``, listing, moves, deletes, streams) raise the filesystem's OSError, for callers such as
    the commit protocol that decide themselves what a failure means.
    """

    root: str
    config: StorageConfig = field(default_factory=StorageConfig)

    def __reduce__(self) -> tuple[Any, ...]:
        return Store, (self.root, self.config)

    @cached_property
    def _fs_root(self) -> tuple[pafs.FileSystem, str]:
        return arrow_filesystem(self.root, self.config)

    @property
    def fs(self) -> pafs.FileSystem:
        """The pyarrow filesystem, for readers and writers that take one (Parquet, Ray Data)."""
        return self._fs_root[0]

    @property
    def remote(self) -> bool:
        return is_remote(self.root)

    def path(self, *parts: str) -> str:
        """The path of ``parts`` inside ``fs``."""
        return "/".join([self._fs_root[1], *parts])

    def uri_of(self, *parts: str) -> str:
        return join(self.root, *parts)

    def uri_for(self, fs_path: str) -> str:
        """A path found by listing ``fs`` as a URI of the same kind as the root."""
        return uri_for(self.root, fs_path)

    def child(self, *parts: str) -> Store:
        """The store bound to ``parts`` below this root, with the same settings."""
        return Store(self.uri_of(*parts), self.config)

    # -- Checks, listing --------------------------------------------------------------------------

    def require_exists(self) -> pafs.FileInfo:
        """The FileInfo of the root; UsageError naming it when it is missing or unreachable. A
        job's first contact with the store: it retries little (3 attempts report an unreachable
        endpoint in about a second)."""
        _require_credentials(self.root, self.config)
        fs, path = _arrow_filesystem(self.root, self.config, min(_CHECK_ATTEMPTS, self.config.max_attempts))
        try:
            info = fs.get_file_info(path)
        except OSError as exc:
            raise UsageError(describe_error(self.root, exc)) from None
        if info.type == pafs.FileType.NotFound:
            if self.remote:
                _require_bucket(fs, self.root, path)
            raise UsageError(f"{self.root}: not found")
        return info

    def info(self, *parts: str) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path(*parts))

    def exists(self, *parts: str) -> bool:
        return self.info(*parts).type != pafs.FileType.NotFound

    def entries(self, *parts: str) -> list[pafs.FileInfo]:
        """What is directly inside ``parts`` (none when it does not exist), sorted by path."""
        selector = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        return sorted(self.fs.get_file_info(selector), key=lambda e: e.path)

    # -- Whole files ------------------------------------------------------------------------------

    def read(self, *parts: str) -> bytes:
        """The whole file; UsageError naming its URI when it cannot be read."""
        try:
            return self.get(*parts)
        except (OSError, ValueError) as exc:
            raise UsageError(describe_error(self.uri_of(*parts), exc)) from None

    def write(self, data: bytes, *parts: str) -> None:
        """Write a whole file (see ``put``); UsageError "cannot write <uri>: ..." when it fails."""
        try:
            self.put(data, *parts)
        except OSError as exc:
            raise UsageError(f"cannot write {describe_error(self.uri_of(*parts), exc)}") from None

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read(*parts))

    def write_json(self, value: Any, *parts: str) -> None:
        self.write(json.dumps(value, indent=2, sort_keys=True).encode(), *parts)

    def get(self, *parts: str) -> bytes:
        with self.open_input(*parts) as stream:
            return stream.read()

    def put(self, data: bytes, *parts: str) -> None:
        """Write a whole file; locally through a temporary name and a rename, so that no reader
        sees half of it (an object store shows an object only once its upload is complete)."""
        if self.remote:
            with self.open_output(*parts) as stream:
                stream.write(data)
            return
        path = self.path(*parts)
        self._make_parent(path)
        temporary = f"{path}.tmp-{secrets.token_hex(4)}"
        try:
            with self.fs.open_output_stream(temporary) as stream:
                stream.write(data)
            self.fs.move(temporary, path)  # a rename: readers see the old file or the new one
        except BaseException:  # a full disk or an interrupt must not leave the temporary file behind
            with contextlib.suppress(OSError):
                self.fs.delete_file(temporary)
            raise

    # -- Streams, moves, deletes ------------------------------------------------------------------

    def open_input(self, *parts: str) -> pafs.NativeFile:
        # A FIFO would block the read for ever and /dev/zero fill memory, whatever the file is called.
        require_regular(self.uri_of(*parts))
        return self.fs.open_input_stream(self.path(*parts))

    def open_output(self, *parts: str) -> pafs.NativeFile:
        """A stream that writes ``parts`` (its folder made first on a local disk)."""
        self._make_parent(self.path(*parts))
        return self.fs.open_output_stream(self.path(*parts))

    def move(self, source: str, target: str) -> None:
        """Rename a file below the root (``a/b`` names below it) to another name below it; on an
        object store a copy, then a delete."""
        self._make_parent(self.path(target))
        self.fs.move(self.path(source), self.path(target))

    def delete(self, *parts: str) -> None:
        """Delete a file, or a folder with everything below it; nothing when it does not exist."""
        info = self.info(*parts)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(info.path)

    def make_dir(self, *parts: str) -> None:
        if not self.remote:  # object stores have no folders to make
            self.fs.create_dir(self.path(*parts), recursive=True)

    def _make_parent(self, path: str) -> None:
        if not self.remote:
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)

    # -- The second client ------------------------------------------------------------------------

    def conditional(self, *parts: str) -> tuple[Any, str]:
        """(s3fs filesystem, its path of ``parts``) for conditional writes on S3, the one thing
        pyarrow cannot send, and paged listings (see the module docstring). Its botocore client makes
        ``--max-attempts`` attempts in standard retry mode, as pyarrow's does; s3fs's own retry
        loop is off so that the attempts do not multiply. (botocore's ``max_attempts`` counts
        retries; ``total_max_attempts`` counts attempts, as pyarrow's ``max_attempts`` does.)"""
        import s3fs

        scheme, path = split_uri(self.uri_of(*parts))
        if scheme not in ("s3", "s3a"):
            raise UsageError(f"{self.uri_of(*parts)}: conditional writes need an s3:// URI")
        fs = s3fs.S3FileSystem(
            anon=self.config.anonymous, endpoint_url=self.config.endpoint_url,
            client_kwargs={"region_name": self.config.region} if self.config.region else {},
            config_kwargs={"retries": {"total_max_attempts": self.config.max_attempts, "mode": "standard"},
                           "connect_timeout": 5, "read_timeout": 60},
            skip_instance_cache=True)
        fs.retries = 1
        return fs, path
