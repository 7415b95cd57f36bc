"""The one preprocessing path: any image bytes -> size x size x 3 uint8, or a short ImageError."""
from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from distcls.config import StorageConfig
from distcls.images import ImageError, decode, read_batch
from distcls.transforms import crop, mirror, normalize

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _close(pixel: np.ndarray, colour: tuple[int, int, int], tolerance: int = 12) -> bool:
    return bool(np.abs(pixel.astype(int) - colour).max() <= tolerance)


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring ``width`` x ``height`` RGB, then a token IDAT: the
    shape of a decompression bomb, in under 100 bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------
# decode: formats and modes


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "WEBP", "GIF", "TIFF"])
def test_plain_rgb_formats(fmt: str) -> None:
    array, width, height = decode(_encode(Image.new("RGB", (50, 40), BLUE), fmt), 32)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8
    assert (width, height) == (50, 40)
    assert _close(array.reshape(-1, 3).mean(0), BLUE)


def test_grayscale_becomes_three_equal_channels() -> None:
    array, _, _ = decode(_encode(Image.new("L", (40, 40), 90), "PNG"), 16)
    assert array.shape == (16, 16, 3) and (array == 90).all()


def test_rgba_transparent_pixels_become_white() -> None:
    image = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red
    image.paste((0, 0, 255, 255), (0, 20, 40, 40))  # opaque blue bottom half
    array, _, _ = decode(_encode(image, "PNG"), 32)
    assert _close(array[2, 16], WHITE, 0) and _close(array[29, 16], BLUE, 0)


def test_palette_with_transparency_becomes_white() -> None:
    image = Image.new("P", (40, 40), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black (transparent), 1 red
    image.paste(1, (20, 0, 40, 40))
    array, _, _ = decode(_encode(image, "PNG", transparency=0), 32)
    assert _close(array[16, 2], WHITE, 0) and _close(array[16, 29], RED, 0)


def test_cmyk_jpeg_becomes_rgb() -> None:
    array, _, _ = decode(_encode(Image.new("CMYK", (48, 48), (0, 255, 255, 0)), "JPEG", quality=95), 32)
    assert _close(array[16, 16], RED, 20)


def test_16_bit_png_is_rescaled_not_clipped() -> None:
    values = np.zeros((40, 40), dtype=np.uint16)
    values[:, 20:] = 65535
    values[:20, :20] = 32896  # 128.5 * 256: mid grey
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    data = _encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")  # what a 16-bit PNG opens as
    array, _, _ = decode(data, 32)
    assert (array[:, 28:] == 255).all() and (array[28:, :4] == 0).all()
    assert abs(int(array[4, 4, 0]) - 128) <= 1


def test_exif_orientation_6_swaps_size_and_rotates_pixels() -> None:
    raw = Image.new("RGB", (60, 30), RED)
    raw.paste(BLUE, (0, 0, 30, 30))  # left half blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": the stored left edge becomes the top
    array, width, height = decode(_encode(raw, "JPEG", exif=exif, quality=95), 32)
    assert (width, height) == (30, 60)
    assert _close(array[2, 2], BLUE, 30) and _close(array[2, 29], BLUE, 30)  # top row blue
    assert _close(array[29, 2], RED, 30) and _close(array[29, 29], RED, 30)  # bottom row red


@pytest.mark.parametrize("width, height", [(1, 1), (4000, 2), (2, 4000)])
def test_extreme_shapes(width: int, height: int) -> None:
    array, w, h = decode(_encode(Image.new("RGB", (width, height), RED), "PNG"), 32)
    assert array.shape == (32, 32, 3) and (w, h) == (width, height)
    assert (array == RED).all()


def test_jpeg_draft_decodes_small_and_matches_a_full_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    y, x = np.mgrid[0:480, 0:640]
    smooth = np.stack([x * 255 // 640, y * 255 // 480, (x + y) * 255 // 1120], axis=-1).astype(np.uint8)
    image = Image.fromarray(smooth)
    image.paste(BLUE, (200, 150, 440, 330))
    drafts: list[tuple[int, int]] = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original_draft(self, mode, size)
        drafts.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    fast, width, height = decode(_encode(image, "JPEG", quality=95), 32)
    full, _, _ = decode(_encode(image, "PNG"), 32)

    assert drafts == [(80, 60)]  # decoded at 1/8 scale: still >= 32 on the short side
    assert fast.shape == full.shape == (32, 32, 3) and (width, height) == (640, 480)
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 4


# ---------------------------------------------------------------------------------------------
# decode: failures


def test_decompression_bomb_header_is_refused_quickly() -> None:
    data = _png_header_only(100_000, 100_000)
    assert len(data) < 100
    started = time.perf_counter()
    with pytest.raises(ImageError, match="^too many pixels"):
        decode(data, 32)
    assert time.perf_counter() - started < 0.5


def test_max_pixels_is_the_limit_in_both_directions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # decode may raise it; restore after
    with pytest.raises(ImageError, match="^too many pixels: 100x100 exceeds limit 9999"):
        decode(_encode(Image.new("RGB", (100, 100)), "PNG"), 32, max_pixels=9_999)
    # 100 Mpx is above Pillow's own default limit but below ours: it gets as far as decoding
    # (and fails there, this file being a bare header), instead of being called a bomb.
    with pytest.raises(ImageError, match="^corrupt image"):
        decode(_png_header_only(10_000, 10_000), 32, max_pixels=200_000_000)


def test_truncated_jpeg_is_an_error_not_grey() -> None:
    data = _encode(Image.new("RGB", (64, 64), RED), "JPEG")
    with pytest.raises(ImageError, match="^corrupt image"):
        decode(data[: len(data) // 2], 32)


@pytest.mark.parametrize("data, reason", [
    (b"name,label\nx.jpg,cat\n", "not an image"),
    (b"", "empty file"),
])
def test_not_an_image(data: bytes, reason: str) -> None:
    with pytest.raises(ImageError, match=f"^{reason}"):
        decode(data, 32)


# ---------------------------------------------------------------------------------------------
# read_batch


def test_read_batch_gives_per_row_errors_in_order(tmp_path: Path) -> None:
    good_a, good_b = tmp_path / "a.png", tmp_path / "b.jpg"
    good_a.write_bytes(_encode(Image.new("RGB", (40, 30), RED), "PNG"))
    good_b.write_bytes(_encode(Image.new("RGB", (20, 50), BLUE), "JPEG", quality=95))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.jpg"
    paths = [str(good_a), str(missing), str(broken), f"file://{good_b}", str(empty), "https://example.com/x.jpg"]

    got = read_batch(paths, StorageConfig(), 24, threads=3)

    assert got["image"].shape == (6, 24, 24, 3) and got["image"].dtype == np.uint8
    errors = list(got["error"])
    assert errors[0] is None and errors[3] is None
    assert errors[1] == f"{missing}: not found"
    assert errors[2].startswith(("corrupt image", "not an image"))
    assert errors[4] == "empty file"
    assert errors[5].startswith("unsupported URI 'https://example.com/x.jpg'")  # its row only, not the batch
    assert list(got["width"]) == [40, -1, -1, 20, -1, -1] and list(got["height"]) == [30, -1, -1, 50, -1, -1]
    assert (got["image"][0] == RED).all() and _close(got["image"][3, 12, 12], BLUE, 3)
    assert not got["image"][[1, 2, 4, 5]].any()


# ---------------------------------------------------------------------------------------------
# normalize, crop and mirror


def test_normalize_layout_dtype_and_values() -> None:
    batch = torch.zeros(2, 4, 5, 3, dtype=torch.uint8)
    batch[..., 0] = 255
    batch[1, ..., 1] = 51
    out = normalize(batch, (0.5, 0.2, 0.0), (0.5, 0.1, 1.0))
    assert out.shape == (2, 3, 4, 5) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out[:, 0], torch.ones(2, 4, 5))  # (1 - 0.5) / 0.5
    assert torch.allclose(out[0, 1], torch.full((4, 5), -2.0)) and torch.allclose(out[1, 1], torch.zeros(4, 5))
    assert torch.allclose(out[:, 2], torch.zeros(2, 4, 5))


def _numbered_batch(n: int = 16, side: int = 8) -> torch.Tensor:
    return torch.arange(n * side * side * 3, dtype=torch.int64).remainder(251).to(torch.uint8).view(n, side, side, 3)


def test_crop_keeps_shape_dtype_and_pixel_values() -> None:
    batch = _numbered_batch()
    out = crop(batch, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert not torch.equal(out, batch)
    # A reflect-padded crop only moves pixels: every output value exists in its source image.
    for source, result in zip(batch, out):
        assert set(result.unique().tolist()) <= set(source.unique().tolist())
    assert torch.equal(out, crop(batch, torch.Generator().manual_seed(0), pad=2))  # the generator alone decides
    assert torch.equal(crop(batch, torch.Generator().manual_seed(0), pad=0), batch)


def test_mirror_flips_exactly_the_marked_images() -> None:
    batch = _numbered_batch()
    mask = torch.tensor([True, False] * (len(batch) // 2) + [True] * (len(batch) % 2))
    out = mirror(batch, mask)
    for o, b, flipped in zip(out, batch, mask):
        assert torch.equal(o, b.flip(1) if flipped else b)
