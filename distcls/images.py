"""Image bytes -> model input. The one preprocessing path shared by training, evaluation and labeling.

``decode`` turns any bytes into (uint8 HxWx3 array of side ``size``, original width, original height),
or raises ImageError with a short reason. ``read_batch`` fetches and decodes many files, each read
bounded in size and classified when it fails (``ERROR_KINDS``). Batches stay uint8 until
``transforms.normalize`` runs on the device, which keeps Ray object-store traffic 4x smaller than
float32. No torch here (see decode_stage.py).
"""
from __future__ import annotations

import errno
import io
import os
import random
import stat
import struct
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from distcls import storage
from distcls.config import MAX_FILE_BYTES, StorageConfig
from distcls.errors import JobError, UsageError

# Truncated files must fail, not come back half grey (Pillow's default, stated here because
# another library in the same process may have flipped it).
ImageFile.LOAD_TRUNCATED_IMAGES = False

_ROTATING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
# The formats of the default extensions, and only those: Pillow would otherwise also open EPS (by
# running Ghostscript on the file) and some 35 rarely used decoders, whatever a file is named.
# (Multi-picture camera JPEGs open through JPEG: Pillow has no separate MPO opener.)
_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
_EXIF_ORIENTATION_TAG = 0x0112

# Why a file has no prediction (the ``error_kind`` column). The content kinds are final for a file
# version; ``not_found`` and ``transient`` say nothing about the file and are worth reading again.
ERROR_KINDS = ("corrupt", "too_large", "not_file", "not_found", "refused", "transient")
FINAL_ERROR_KINDS = ("corrupt", "too_large", "not_file", "refused")
# Reads of one file that failed for a passing reason, after the SDK's own retries (which cover
# throttling and 5xx but not a 403 from credentials being refreshed, nor a response that stalls past
# the request timeout): 3 attempts, 1 s then 2 s apart (jittered, so that threads do not retry in step).
_READ_ATTEMPTS = 3
_READ_BACKOFF_S = 1.0
_UNREACHABLE = ": endpoint unreachable"


class ImageError(ValueError):
    """A file that cannot be turned into a model input: the message is the row's ``error`` and
    ``kind`` its ``error_kind`` (one of ERROR_KINDS)."""

    def __init__(self, reason: str, kind: str = "corrupt") -> None:
        super().__init__(reason)
        self.kind = kind


def decode(data: bytes, size: int, max_pixels: int = 89_478_485) -> tuple[np.ndarray, int, int]:
    """Decode ``data`` to a ``size`` x ``size`` x 3 uint8 RGB array: EXIF-oriented, shorter side resized
    to ``size`` and centre-cropped. Returns the array and the original (displayed) width and height.

    The pixel count is checked from the header before any pixels are decoded, so a decompression
    bomb costs microseconds. JPEGs are decoded at a reduced scale (``draft``) when that still leaves
    at least ``size`` pixels on the shorter side: a 640x480 photo for a 32-pixel model decodes at 1/8.
    """
    if not data:
        raise ImageError("empty file")
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        # Pillow refuses anything above its own process-wide limit inside Image.open, before the
        # check below runs, so a max_pixels above Pillow's default would otherwise have no effect.
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"too many pixels: {width}x{height} exceeds limit {max_pixels}", "too_large")
        if image.getexif().get(_EXIF_ORIENTATION_TAG) in _ROTATING_ORIENTATIONS:
            width, height = height, width
        if image.format == "JPEG":
            scale = min(image.size) / size
            image.draft("RGB", (max(1, int(image.size[0] / scale)), max(1, int(image.size[1] / scale))))
        ImageOps.exif_transpose(image, in_place=True)  # not a copy: that would double peak memory
        image = _to_rgb(image)
        image = ImageOps.fit(image, (size, size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8), width, height
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"too many pixels: {exc}", "too_large") from None
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error) as exc:
        raise ImageError(f"corrupt image: {str(exc)[:120] or type(exc).__name__}") from None


def read_batch(paths: Sequence[str] | np.ndarray, storage_config: StorageConfig, size: int,
               max_pixels: int = 89_478_485, threads: int = 8, sizes: Sequence[int | None] | None = None,
               max_file_bytes: int = MAX_FILE_BYTES,
               before_read: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """Fetch and decode many files: the CPU stage of training, evaluation and labeling alike.

    Returns ``image`` (N x size x size x 3 uint8; zeros where failed), ``width``/``height``
    (int32, -1 where unknown), ``error`` (None, or a short reason naming no secrets) and
    ``error_kind`` (None, or one of ERROR_KINDS). One bad or missing file fails its own row only.
    ``sizes`` (bytes, None where unknown) are what a listing said: a file known to exceed
    ``max_file_bytes`` is not even opened; every other one is measured before it is read (stat,
    or the HEAD that opening an object makes), and anything but a regular file is never read.
    Passing faults are retried per file; a store that stays unreachable raises JobError, since
    that is no file's fault. Threads overlap object-store latency and decoding, both of which
    release the GIL. ``before_read(uri)``, if given, is called in the reading thread before each
    file is read (crashes.py notes which file is in flight).
    """
    filesystems: dict[str, pafs.FileSystem] = {}

    def one(uri: str, known_size: int | None) -> tuple[np.ndarray | None, int, int, str | None, str | None]:
        if before_read is not None:
            before_read(uri)
        try:
            data = _fetch(uri, known_size, max_file_bytes, storage_config, filesystems)
            return (*decode(data, size, max_pixels), None, None)
        except ImageError as exc:
            return None, -1, -1, str(exc), exc.kind

    known = [None] * len(paths) if sizes is None else list(sizes)
    with ThreadPoolExecutor(max_workers=min(threads, max(1, len(paths)))) as pool:
        results = list(pool.map(one, list(paths), known))
    images = np.zeros((len(results), size, size, 3), dtype=np.uint8)
    for i, (array, *_) in enumerate(results):
        if array is not None:
            images[i] = array
    return {
        "image": images,
        "width": np.array([r[1] for r in results], dtype=np.int32),
        "height": np.array([r[2] for r in results], dtype=np.int32),
        "error": np.array([r[3] for r in results], dtype=object),
        "error_kind": np.array([r[4] for r in results], dtype=object),
    }


def _fetch(uri: str, known_size: int | None, limit: int, storage_config: StorageConfig,
           filesystems: dict[str, pafs.FileSystem]) -> bytes:
    """The bytes of ``uri``, retrying passing faults; ImageError (with its kind) when there are none
    to decode, JobError when the store stays unreachable."""
    if known_size is not None and known_size > limit:
        raise ImageError(_too_large(uri, known_size, limit), "too_large")
    try:
        scheme, fs_path = storage.split_uri(uri)
        if scheme not in filesystems:
            # Made on first use, inside the row: a URI no filesystem can serve (https://, s3:///x)
            # is that row's error. Two threads may both make one; either is fine.
            filesystems[scheme] = storage.arrow_filesystem(uri, storage_config)[0]
    except UsageError as exc:
        raise ImageError(str(exc), "refused") from None
    read = _read_local if scheme == "file" else _read_remote
    attempt = 1
    while True:
        try:
            return read(uri, filesystems[scheme], fs_path, limit)
        except ImageError as exc:
            if str(exc).endswith(_UNREACHABLE):
                # The store is down (after the SDK's retries, ~45 s by default), not this file: fail
                # the batch, so that the run fails uncommitted instead of committing a lake of error rows.
                raise JobError(f"{exc} (after retries)") from None
            if exc.kind != "transient" or attempt == _READ_ATTEMPTS:
                raise
        time.sleep(_READ_BACKOFF_S * 2 ** (attempt - 1) * random.uniform(0.5, 1.0))
        attempt += 1


def _read_local(uri: str, fs: pafs.FileSystem, path: str, limit: int) -> bytes:
    """A local file, read only when it is a regular file of at most ``limit`` bytes. The path is
    stat'ed before it is opened (opening a FIFO blocks, opening a device may do anything), then the
    open descriptor is checked again, since the path may have been replaced in between."""
    try:
        _require_regular(uri, os.stat(path), limit)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb", buffering=0) as handle:
            measured = os.fstat(fd)
            _require_regular(uri, measured, limit)
            return _read_at_most(handle.read, measured.st_size, uri, limit)
    except (FileNotFoundError, NotADirectoryError):
        raise ImageError(f"{uri}: not found", "not_found") from None
    except IsADirectoryError:
        raise ImageError(f"{uri}: not a regular file (a folder)", "not_file") from None
    except ImageError:
        raise  # a ValueError too: the reason the checks above gave, kept as it is
    except ValueError as exc:  # a path no file can have, such as one with a NUL byte (a manifest row)
        raise ImageError(f"{uri}: {exc}", "refused") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a symlink loop; a socket
            raise ImageError(f"{uri}: not a regular file ({exc.strerror})", "not_file") from None
        # Permission denied, EIO, a stale NFS handle: nothing known about the file itself.
        raise ImageError(storage.describe_error(uri, exc), "transient") from None


def _require_regular(uri: str, measured: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(measured.st_mode):
        raise ImageError(f"{uri}: not a regular file ({_file_type(measured.st_mode)})", "not_file")
    if measured.st_size > limit:
        raise ImageError(_too_large(uri, measured.st_size, limit), "too_large")


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


def _read_remote(uri: str, fs: pafs.FileSystem, path: str, limit: int) -> bytes:
    """An object, read only when it is at most ``limit`` bytes: opening it makes a HEAD request
    (pyarrow's S3 input file), which gives its size before any byte of it is fetched."""
    try:
        with fs.open_input_file(path) as handle:
            length = handle.size()
            if length > limit:
                raise ImageError(_too_large(uri, length, limit), "too_large")
            return _read_at_most(handle.read, length, uri, limit)
    except ImageError:
        raise
    except FileNotFoundError:
        # A prefix with objects below it ("x.jpg/...") does not open either; tell it from a missing one.
        kind = _info_type(fs, path)
        if kind == pafs.FileType.Directory:
            raise ImageError(f"{uri}: not a regular file (a folder)", "not_file") from None
        raise ImageError(f"{uri}: not found", "not_found") from None
    except ValueError as exc:  # a path the filesystem cannot serve, such as a bucket without a key
        raise ImageError(storage.describe_error(uri, exc), "refused") from None
    except OSError as exc:
        reason = storage.describe_error(uri, exc)
        kind = "not_found" if reason.endswith((": not found", ": bucket does not exist")) else "transient"
        raise ImageError(reason, kind) from None


def _info_type(fs: pafs.FileSystem, path: str) -> pafs.FileType:
    try:
        return fs.get_file_info(path).type
    except OSError:
        return pafs.FileType.NotFound


def _read_at_most(read, expected: int, uri: str, limit: int) -> bytes:
    """``read(n)`` until the end of the file, never more than ``limit`` + 1 bytes in all: a file
    may have grown since it was measured. ``expected`` (its measured size) sizes the first read,
    so that a file of usual size takes one read and one buffer."""
    chunks: list[bytes] = []
    total, want = 0, expected + 1
    while total <= limit:
        chunk = read(min(want, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        want = 2**20
    if total > limit:
        raise ImageError(_too_large(uri, f"more than {limit}", limit), "too_large")
    return b"".join(chunks)


def _too_large(uri: str, size: int | str, limit: int) -> str:
    return f"{uri}: too large: {size} bytes, above --max-file-bytes {limit}"


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB. Transparent pixels become white, 16/32-bit greys are rescaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        depth = 65535.0 if image.mode.startswith("I;16") or np.asarray(image).max() > 255 else 255.0
        grey = np.clip(np.asarray(image, dtype=np.float32) * (255.0 / depth), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "F":
        grey = np.nan_to_num(np.asarray(image, dtype=np.float32))
        span = float(grey.max() - grey.min()) or 1.0
        return Image.fromarray(((grey - grey.min()) * (255.0 / span)).astype(np.uint8), "L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        # Pasted through its own alpha onto white: the same pixels as alpha_composite over white,
        # without three more full-size RGBA copies (an 81 Mpx RGBA PNG peaked at 1.5 GB that way).
        rgba = image if image.mode in ("RGBA", "LA") else image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba)
        return white
    return image if image.mode == "RGB" else image.convert("RGB")
