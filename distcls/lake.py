"""Finding the images: listing a lake, reading a manifest, labelled ImageFolder layouts, splits.

Listings are Arrow tables (``path``, ``size``, ``mtime``), never lists of Python objects: a million
paths cost tens of MB, and the table is handed to Ray Data in slices without another copy.
"""
from __future__ import annotations

import calendar
import itertools
import os
import posixpath
import re
import stat
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from botocore.exceptions import BotoCoreError

from distcls import storage
from distcls.config import URI_USERINFO
from distcls.errors import UsageError

if TYPE_CHECKING:
    import s3fs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp")
LISTING_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("mtime", pa.int64())])
# Manifest rows read and normalised at a time: a few MB, whatever the manifest's size.
MANIFEST_CHUNK_ROWS = 65_536
# Keys per page of an S3 listing: the most ListObjectsV2 returns.
LIST_PAGE_KEYS = 1000


def list_files(lake: storage.Store, extensions: tuple[str, ...] | list[str] = IMAGE_EXTENSIONS) -> pa.Table:
    """Every file below ``lake``'s root whose extension is in ``extensions``, as URIs of the same
    kind as the root, sorted; see list_chunks."""
    chunks = list(list_chunks(lake, extensions))
    return (pa.concat_tables(chunks) if chunks else LISTING_SCHEMA.empty_table()).sort_by("path")


def list_chunks(lake: storage.Store, extensions: tuple[str, ...] | list[str] = IMAGE_EXTENSIONS,
                chunk_rows: int = MANIFEST_CHUNK_ROWS) -> Iterator[pa.Table]:
    """Every file below ``lake``'s root whose extension is in ``extensions``, as tables of at most
    ``chunk_rows`` rows in listing order: URIs of the same kind as the root, ``size``, and ``mtime``
    in nanoseconds since the epoch (0 when the store gives none). A local lake streams folder by
    folder, an S3 prefix page by page (``_s3_files``): memory stays that of one chunk and one page
    however large the lake. Hidden names (``.x``, ``_x``) are skipped, as Hadoop-style tools do.
    On a local disk, folders reached through a symlink are not listed (each real folder once); see
    ``_local_files``."""
    check_lake(lake)
    fs, root = lake.fs, lake.path()
    suffixes = tuple(e.lower() for e in extensions)
    if isinstance(fs, pafs.LocalFileSystem):
        files = _local_files(root, suffixes)
    elif storage.split_uri(lake.root)[0] in ("s3", "s3a"):
        files = _s3_files(lake.conditional()[0], root, suffixes)  # s3fs: pyarrow lists a prefix only whole
    else:
        files = _store_files(fs, root, suffixes)
    try:
        while chunk := list(itertools.islice(files, chunk_rows)):
            paths, sizes, mtimes = zip(*chunk)
            yield pa.table([[lake.uri_for(p) for p in paths], sizes, mtimes], schema=LISTING_SCHEMA)
    except (OSError, BotoCoreError) as exc:
        raise UsageError(storage.describe_error(lake.root, exc)) from None


def check_lake(lake: storage.Store) -> None:
    """UsageError unless ``lake``'s root is a folder or prefix that exists."""
    if lake.require_exists().type == pafs.FileType.File and not _s3_keys_below(lake):
        raise UsageError(f"{lake.root}: is a file; expected a folder/prefix of images (use --manifest for a list)")


def _s3_keys_below(lake: storage.Store) -> bool:
    """Whether an S3 root that is an object also has keys below it (``p`` beside ``p/x.jpg``):
    then it is a prefix too, and listed as one."""
    if storage.split_uri(lake.root)[0] not in ("s3", "s3a"):
        return False
    bucket, _, key = lake.path().partition("/")
    return bool(key) and bool(next(_s3_pages(lake.conditional()[0], bucket, f"{key}/", 1)))


def _s3_files(fs: s3fs.S3FileSystem, root: str, suffixes: tuple[str, ...]) -> Iterator[tuple[str, int, int]]:
    """(bucket/key, size, mtime_ns) of the objects below ``root`` (bucket or bucket/prefix), one
    ListObjectsV2 page at a time, without a delimiter: the whole tree below the prefix in key
    order, a page ending anywhere, inside a folder too. Keys ending in ``/`` are folder markers."""
    bucket, _, key = root.partition("/")
    prefix = f"{key}/" if key else ""
    for page in _s3_pages(fs, bucket, prefix, LIST_PAGE_KEYS):
        for entry in page:
            relative = entry["Key"][len(prefix):]
            if relative.lower().endswith(suffixes) and not _hidden(relative):
                modified = entry["LastModified"]  # whole milliseconds at most, as pyarrow reads them
                mtime_ns = calendar.timegm(modified.utctimetuple()) * 10**9 + modified.microsecond * 1000
                yield f"{bucket}/{entry['Key']}", entry["Size"], mtime_ns


def _s3_pages(fs: s3fs.S3FileSystem, bucket: str, prefix: str, page_keys: int) -> Iterator[list[dict[str, Any]]]:
    """The ``Contents`` of each ListObjectsV2 page of at most ``page_keys`` keys. Through s3fs's
    ``call_s3``, which retries each page on its own (pyarrow's recursive listing returns only the
    whole list, and botocore's paginator retries nothing)."""
    request: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_keys}
    while True:
        page = fs.call_s3("list_objects_v2", **request)
        yield page.get("Contents", [])
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _store_files(fs: pafs.FileSystem, root: str, suffixes: tuple[str, ...]) -> Iterator[tuple[str, int, int]]:
    """Other object stores (gs://): pyarrow's recursive listing, which comes as one list."""
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        rel = entry.path[len(root):].lstrip("/")
        if entry.type == pafs.FileType.File and not _hidden(rel) and entry.path.lower().endswith(suffixes):
            yield entry.path, entry.size or 0, entry.mtime_ns or 0


def _local_files(root: str, suffixes: tuple[str, ...]) -> Iterator[tuple[str, int, int]]:
    """(path, size, mtime_ns) of the regular files below ``root``. Not pyarrow's recursive
    listing: it stats every entry through its symlinks and so descends into linked folders, a
    link to a parent 40 levels deep (until ELOOP) and two such links exponentially. Here, as with
    ``find`` and ``os.walk``, a symlinked folder is never entered; a symlink to a regular file is
    listed under its own name (a lake may be links into a shared pool); dangling links, link
    loops and links to anything but a regular file are skipped."""
    def fail(exc: OSError) -> None:  # os.walk would skip an unreadable folder in silence
        raise exc

    for folder, folders, names in os.walk(root, onerror=fail):  # followlinks=False
        folders[:] = [name for name in folders if not name.startswith((".", "_"))]
        for name in names:
            if name.startswith((".", "_")) or not name.lower().endswith(suffixes):
                continue
            path = os.path.join(folder, name)
            try:
                found = os.stat(path)
            except OSError:  # a dangling link or a link loop: names of no file
                continue
            if stat.S_ISREG(found.st_mode):
                yield path, found.st_size, found.st_mtime_ns


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def read_manifest(manifest: storage.Store) -> pa.Table:
    """A Parquet or CSV manifest (the file ``manifest``) with at least a ``path`` column, as one
    table (see manifest_chunks)."""
    chunks = list(manifest_chunks(manifest))
    return pa.concat_tables(chunks) if chunks else pa.table({"path": pa.array([], pa.string())})


def manifest_chunks(manifest: storage.Store, chunk_rows: int = MANIFEST_CHUNK_ROWS) -> Iterator[pa.Table]:
    """A Parquet or CSV manifest (the file ``manifest``) with at least a ``path`` column, as tables of at most ``chunk_rows``
    rows, read and normalised one at a time. Relative paths are taken relative to the manifest's
    folder; rows without a path are dropped; columns other than path/label are dropped."""
    uri, fs, path = manifest.root, manifest.fs, manifest.path()
    manifest.require_exists()
    storage.require_regular(uri)
    # From the resolved path, not the URI text: a bare "manifest.csv" has no "/" to split at.
    base = storage.uri_for(uri, posixpath.dirname(path))
    try:
        with fs.open_input_file(path) as file:
            reader = _csv_batches(file) if uri.lower().endswith(".csv") else _parquet_batches(file, chunk_rows)
            schema = next(reader)
            if "path" not in schema.names:
                raise UsageError(f"{uri}: manifest has no 'path' column (columns: {', '.join(schema.names)})")
            kind = schema.field("path").type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
                raise UsageError(f"{uri}: manifest's 'path' column is {kind}, not text")
            keep = [c for c in ("path", "label") if c in schema.names]
            row = 0
            for batch in reader:
                for start in range(0, batch.num_rows, chunk_rows):
                    table = pa.Table.from_batches([batch.slice(start, chunk_rows)]).select(keep)
                    _refuse_credentials(uri, table["path"], row)
                    row += table.num_rows
                    table = table.filter(pc.is_valid(table["path"]))
                    paths = [_manifest_path(base, p) for p in table["path"].to_pylist()]
                    yield table.set_column(0, "path", pa.array(paths, pa.string()))
    except (OSError, pa.ArrowInvalid) as exc:
        raise UsageError(f"{uri}: cannot read manifest ({_unquoted(str(exc).splitlines()[0])[:160]})") from None


def _unquoted(message: str) -> str:
    """An Arrow CSV error without the row or value it quotes: that text may hold a credential
    (``_refuse_credentials`` only sees rows that parsed)."""
    message = re.sub(r"(Expected \d+ columns, got \d+): .*", r"\1", message)
    return re.sub(r"invalid value '.*'", "invalid value (not shown)", message)


def _refuse_credentials(uri: str, paths: pa.ChunkedArray, first_row: int) -> None:
    """A row's path is copied into the output's path and error columns: no credential may ride in it."""
    secret = pc.match_substring_regex(pc.cast(paths, pa.string()), URI_USERINFO.pattern)
    if pc.any(secret).as_py():
        raise UsageError(f"{uri}: data row {first_row + pc.index(secret, True).as_py() + 1} holds a URI with credentials "
                         "(user:password@; not shown): give them as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                         "or a profile")


def _parquet_batches(file: pa.NativeFile, chunk_rows: int) -> Iterator[pa.Schema | pa.RecordBatch]:
    """The schema, then the record batches (columns path and label only) of a Parquet file."""
    parquet = pq.ParquetFile(file)
    schema = parquet.schema_arrow
    yield schema
    columns = [c for c in ("path", "label") if c in schema.names]
    yield from parquet.iter_batches(batch_size=chunk_rows, columns=columns)


def _csv_batches(file: pa.NativeFile) -> Iterator[pa.Schema | pa.RecordBatch]:
    """The schema, then the record batches of a CSV file; ``path`` and ``label`` read as text
    whatever they look like: the reader infers a type from the first block only, and a labels
    manifest whose first rows are not labelled yet would make ``label`` the null type, refusing
    the first label further down."""
    types = pacsv.ConvertOptions(column_types={"path": pa.string(), "label": pa.string()})
    reader = pacsv.open_csv(file, convert_options=types)
    yield reader.schema
    yield from reader


def _manifest_path(base: str, entry: str) -> str:
    """A manifest entry as a normalised URI, so that ``a.jpg``, ``./a.jpg`` and ``x/../a.jpg`` name
    one input. A relative entry is a reference to resolve against the manifest's folder, as a
    URL's is, but never out of its bucket. An object-store URI that storage.normalize refuses
    stays as written: its row names it, and reading it is refused."""
    if "://" not in entry and not entry.startswith("/"):
        scheme, folder = storage.split_uri(base)
        joined = posixpath.normpath(posixpath.join(folder, entry))
        if scheme != "file" and not joined.startswith(folder.split("/", 1)[0] + "/"):
            return f"{base}/{entry}"
        entry = storage.uri_for(base, joined)
    try:
        return storage.normalize(entry)
    except UsageError:
        return entry


def labelled_images(lake: storage.Store, classes: list[str] | None = None) -> tuple[pa.Table, list[str]]:
    """(table of ``path``, ``label`` (int32 class index), class names) for an ImageFolder lake
    (class = first folder below ``lake``'s root) or a manifest file with a ``label`` column of class names.

    With ``classes`` given (evaluation, a separate validation lake), indices follow that order and
    unknown class names are an error; otherwise classes are the sorted names found.
    """
    uri = lake.root
    if uri.lower().endswith((".parquet", ".csv")):
        table = read_manifest(lake)
        if "label" not in table.column_names:
            raise UsageError(f"{uri}: a training manifest needs a 'label' column")
        paths = table["path"]
        names = pc.cast(table["label"], pa.string())
    else:
        listing = list_files(lake)
        # The listing holds resolved paths ("lake" and "file:///x/lake" list as absolute paths),
        # so the prefix to cut must be resolved the same way.
        root = storage.uri_for(uri, storage.split_uri(uri)[1]).rstrip("/") + "/"
        relative = pc.utf8_slice_codeunits(listing["path"], len(root))
        nested = pc.match_substring(relative, "/")
        paths = listing["path"].filter(nested)
        names = pc.list_element(pc.split_pattern(relative.filter(nested), "/"), 0)
    found = sorted(set(names.to_pylist()))
    if not found:
        raise UsageError(f"{uri}: no labelled images found (expected <root>/<class>/<image> with extensions {', '.join(IMAGE_EXTENSIONS)})")
    if classes is None:
        if len(found) < 2:
            raise UsageError(f"{uri}: only one class ({found[0]!r}) found; need at least 2 class folders")
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UsageError(f"{uri}: classes {unknown} are not among the model's classes {classes}")
    index = pc.index_in(names, value_set=pa.array(classes))
    return pa.table({"path": paths, "label": pc.cast(index, pa.int32())}), classes


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): ``fraction`` of each class, chosen by ``seed``, held out. Deterministic:
    the same labels and seed give the same split on every machine."""
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        rng.shuffle(members)
        val.append(members[: int(round(len(members) * fraction))])
    val_idx = np.sort(np.concatenate(val)) if val else np.array([], dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx
