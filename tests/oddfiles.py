"""Test helpers for labeling: a corpus of odd files that a real lake holds sooner or later, and a
tiny trained model artifact. Shared by test_label.py and test_label_inputs.py."""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from distcls.synthetic import CLASSES, draw


@dataclass(frozen=True)
class Expected:
    """What labeling one file must give: an error containing ``error``, or a prediction with the
    original (displayed) ``size``."""

    error: str | None = None
    size: tuple[int, int] | None = None


def odd_files(root: Path) -> dict[str, Expected]:
    """Write the corpus under ``root``; returns {relative name: expected outcome}."""
    rng = np.random.default_rng(7)
    photo = draw("circle", 48, 40, rng)
    files: dict[str, tuple[bytes, Expected]] = {
        "zero-byte.jpg": (b"", Expected(error="empty file")),
        "truncated.jpg": (_encode(photo, "JPEG")[:300], Expected(error="corrupt image")),
        "text-named.jpg": (b"this is not an image, just text\n" * 20, Expected(error="not an image")),
        "png-named.jpg": (_encode(photo, "PNG"), Expected(size=(48, 40))),
        "cmyk.jpg": (_encode(photo.convert("CMYK"), "JPEG"), Expected(size=(48, 40))),
        "grey.jpg": (_encode(photo.convert("L"), "JPEG"), Expected(size=(48, 40))),
        "rgba.png": (_encode(photo.convert("RGBA"), "PNG"), Expected(size=(48, 40))),
        "sixteen-bit.png": (_encode(_grey16(48, 40), "PNG"), Expected(size=(48, 40))),
        "sixteen-bit.tif": (_encode(_grey16(48, 40), "TIFF"), Expected(size=(48, 40))),
        "palette.gif": (_encode(photo.convert("P"), "GIF"), Expected(size=(48, 40))),
        "animated.gif": (_animated_gif(photo), Expected(size=(48, 40))),
        "exif-rotated.jpg": (_exif_rotated(photo), Expected(size=(40, 48))),
        "one-pixel.png": (_encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), Expected(size=(1, 1))),
        "wide-4000x2.png": (_encode(Image.new("RGB", (4000, 2), (10, 200, 10)), "PNG"), Expected(size=(4000, 2))),
        "bomb-100000x100000.png": (_png_header_only(100_000, 100_000), Expected(error="too many pixels")),
        "name with spaces.jpg": (_encode(photo, "JPEG"), Expected(size=(48, 40))),
        "hash#1.jpg": (_encode(photo, "JPEG"), Expected(size=(48, 40))),
        "per%25cent.jpg": (_encode(photo, "JPEG"), Expected(size=(48, 40))),
        "ünïcødé-猫.jpg": (_encode(photo, "JPEG"), Expected(size=(48, 40))),
    }
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    return {name: expected for name, (_, expected) in files.items()}


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _grey16(width: int, height: int) -> Image.Image:
    ramp = np.linspace(0, 65535, width * height, dtype=np.uint16).reshape(height, width)
    return Image.fromarray(ramp)


def _animated_gif(photo: Image.Image) -> bytes:
    frames = [photo.convert("P"), photo.rotate(90).convert("P")]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _exif_rotated(photo: Image.Image) -> bytes:
    """Stored 48x40 with EXIF orientation 6 (rotate 90 degrees): displayed 40x48."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(photo, "JPEG", exif=exif.tobytes())


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring ``width`` x ``height`` RGB pixels, then a tiny IDAT
    and IEND: a few dozen bytes that would decompress to tens of gigabytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def tiny_model(directory: Path) -> str:
    """Train ``simple_cnn`` for a few steps on synthetic shapes and save it as an artifact in
    ``directory`` (once: a directory that already holds one is reused). Trained, so that its
    predictions are confident enough for label comparisons to be meaningful. Returns its URI."""
    import torch

    from distcls.artifact import ModelInfo, save_model
    from distcls.storage import Store
    from distcls.transforms import normalize
    from distcls.models import create_model

    if (directory / "model.json").exists():
        return str(directory)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    info = ModelInfo(arch="simple_cnn", classes=list(CLASSES), image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    labels = np.arange(320) % len(CLASSES)
    pixels = np.stack([np.asarray(draw(CLASSES[c], 32, 32, rng)) for c in labels])
    model = create_model(info.arch, num_classes=len(CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        batch = rng.choice(len(labels), 64, replace=False)
        loss = torch.nn.functional.cross_entropy(
            model(normalize(torch.as_tensor(pixels[batch]), info.mean, info.std)), torch.as_tensor(labels[batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_model(model.eval(), info, Store(str(directory)))
    return str(directory)
