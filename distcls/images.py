"""Image bytes -> model input. The one preprocessing path shared by training, evaluation and labeling.

``decode`` turns any bytes into (uint8 HxWx3 array of side ``size``, original width, original height),
or raises ImageError with a short reason. Batches stay uint8 until ``normalize`` runs on the
device, which keeps Ray object-store traffic 4x smaller than float32.
"""
from __future__ import annotations

import io
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from distcls import storage
from distcls.config import StorageConfig
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


class ImageError(ValueError):
    """A file that cannot be turned into a model input; the message is the row's ``error``."""


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
            raise ImageError(f"too many pixels: {width}x{height} exceeds limit {max_pixels}")
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
        raise ImageError(f"too many pixels: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error) as exc:
        raise ImageError(f"corrupt image: {str(exc)[:120] or type(exc).__name__}") from None


def read_batch(paths: np.ndarray | list[str], storage_config: StorageConfig, size: int,
               max_pixels: int = 89_478_485, threads: int = 8) -> dict[str, np.ndarray]:
    """Fetch and decode many files: the CPU stage of training, evaluation and labeling alike.

    Returns ``image`` (N x size x size x 3 uint8; zeros where failed), ``width``/``height``
    (int32, -1 where unknown) and ``error`` (None, or a short reason naming no secrets). One bad
    or missing file fails its own row only. Threads overlap object-store latency and decoding,
    both of which release the GIL.
    """
    filesystems = {}

    def one(uri: str) -> tuple[np.ndarray | None, int, int, str | None]:
        try:
            scheme, fs_path = storage.split_uri(uri)
            if scheme not in filesystems:
                # Made on first use, inside the row: a URI no filesystem can serve (https://, s3:///x)
                # is that row's error. Two threads may both make one; either is fine.
                filesystems[scheme] = storage.arrow_filesystem(uri, storage_config)[0]
            with filesystems[scheme].open_input_stream(fs_path) as stream:
                data = stream.read()
            return (*decode(data, size, max_pixels), None)
        except (ImageError, UsageError) as exc:
            return None, -1, -1, str(exc)
        except (OSError, ValueError) as exc:
            reason = storage.describe_error(uri, exc)
            if reason.endswith(": endpoint unreachable"):
                # The store is down (after the SDK's retries), not this file: fail the batch, so
                # the run fails uncommitted instead of committing rows that --incremental never redoes.
                raise JobError(f"{reason} (after retries)") from None
            return None, -1, -1, reason

    with ThreadPoolExecutor(max_workers=min(threads, max(1, len(paths)))) as pool:
        results = list(pool.map(one, list(paths)))
    images = np.zeros((len(results), size, size, 3), dtype=np.uint8)
    for i, (array, _, _, _) in enumerate(results):
        if array is not None:
            images[i] = array
    return {
        "image": images,
        "width": np.array([r[1] for r in results], dtype=np.int32),
        "height": np.array([r[2] for r in results], dtype=np.int32),
        "error": np.array([r[3] for r in results], dtype=object),
    }


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


def normalize(batch: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 NHWC batch -> float32 NCHW (channels-last memory), scaled to [0,1] then standardised."""
    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous(memory_format=torch.channels_last)


def augment(batch: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (reflect-padded by ``pad``) and horizontal flip of a uint8 NHWC batch, per image."""
    n, h, w, _ = batch.shape
    flip = torch.rand(n, generator=generator) < 0.5
    batch = torch.where(flip.view(n, 1, 1, 1), batch.flip(2), batch)
    padded = torch.nn.functional.pad(batch.permute(0, 3, 1, 2).float(), (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, padded.shape[1], h, padded.shape[3])
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, padded.shape[1], h, w)
    return cropped.gather(3, cols).permute(0, 2, 3, 1).to(torch.uint8)
