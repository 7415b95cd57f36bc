"""A corpus of hostile, broken and merely odd image files, the kind a real lake collects over the
years, for tests/test_hostile.py. Everything is generated here (no downloads), deterministically.

Each file has an expected outcome:

- ``Expect.ok(size)``: decodes; the labeling row must equal calling the model on
  ``images.decode`` of the same bytes, and width/height must be ``size`` (as displayed);
- ``Expect.error(text)``: becomes an error row whose ``error`` contains ``text``;
- ``Expect.either()``: a file that is damaged where decoders legitimately differ (a flipped bit
  in JPEG entropy data is still a picture); the row must be consistent either way.

It extends, not repeats, ``tests/oddfiles.py`` (zero bytes, truncated JPEG, CMYK, 16-bit grey, palette
GIF, animated GIF, EXIF orientation 6, one pixel, 4000x2, the PNG header bomb, odd names), whose
files test_label_inputs.py already labels on S3.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from distcls.synthetic import draw


@dataclass(frozen=True)
class Expect:
    kind: str  # "ok", "error" or "either"
    text: str | None = None  # for errors: a substring of the row's error
    size: tuple[int, int] | None = None  # for ok: displayed (width, height)

    @staticmethod
    def ok(size: tuple[int, int]) -> Expect:
        return Expect("ok", size=size)

    @staticmethod
    def error(text: str) -> Expect:
        return Expect("error", text=text)

    @staticmethod
    def either() -> Expect:
        return Expect("either")


W, H = 64, 48  # the base picture: wider than tall, so a missed rotation shows in width/height


def build(root: Path) -> dict[str, Expect]:
    """Write the corpus into ``root`` (flat); returns {file name: expected outcome}."""
    root.mkdir(parents=True, exist_ok=True)
    files = corpus()
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    return {name: expect for name, (_, expect) in files.items()}


def corpus() -> dict[str, tuple[bytes, Expect]]:
    """{file name: (bytes, expected outcome)}."""
    photo = draw("ring", W, H, np.random.default_rng(11))
    files: dict[str, tuple[bytes, Expect]] = {}
    files.update(_truncated(photo))
    files.update(_corrupt(photo))
    files.update(_bombs())
    files.update(_modes(photo))
    files.update(_animated(photo))
    files.update(_shapes())
    files.update(_orientation(photo))
    files.update(_disguised(photo))
    files.update(_names(photo))
    return files


# ---------------------------------------------------------------------------------------------
# Broken files


def _truncated(photo: Image.Image) -> dict[str, tuple[bytes, Expect]]:
    """Cut off mid-pixel-data: an interrupted upload. Every format must fail, never half-grey."""
    out = {}
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif"), ("TIFF", "tif"), ("BMP", "bmp"), ("WEBP", "webp")):
        data = encode(photo, fmt)
        out[f"truncated-70pct.{ext}"] = (data[: int(len(data) * 0.7)], Expect.error(""))
    data = encode(photo, "PNG")
    out["truncated-signature-only.png"] = (data[:8], Expect.error(""))
    out["truncated-soi-only.jpg"] = (b"\xff\xd8", Expect.error(""))
    out["truncated-header.gif"] = (b"GIF89a\x40\x00", Expect.error(""))
    out["one-byte.png"] = (b"\x89", Expect.error("not an image"))
    return out


def _corrupt(photo: Image.Image) -> dict[str, tuple[bytes, Expect]]:
    """Bit rot and bad writers: wrong checksums, garbled compressed streams, broken headers."""
    png = encode(photo, "PNG")
    idat = png.index(b"IDAT")
    bad_crc = bytearray(png)
    bad_crc[idat - 4 + 8 + 3] ^= 0xFF  # a byte of the IDAT body: its CRC no longer matches
    garbled_zlib = bytearray(png)
    garbled_zlib[idat + 4:idat + 4 + 40] = bytes(40)  # zlib header and first deflate block zeroed
    jpeg = bytearray(encode(photo, "JPEG", quality=90))
    sos = jpeg.index(b"\xff\xda")
    jpeg_noise = bytearray(jpeg)
    for i in range(sos + 20, len(jpeg) - 10, 97):  # flipped bits in the entropy-coded data
        jpeg_noise[i] ^= 0x55
    tiff = bytearray(encode(photo, "TIFF"))
    tiff_bad_ifd = bytes(tiff[:4]) + struct.pack("<I", 0x7FFFFFF0) + bytes(tiff[8:])  # IFD beyond the file
    bmp = bytearray(encode(photo, "BMP"))
    bmp_bad_header = bytes(bmp[:14]) + struct.pack("<I", 7) + bytes(bmp[18:])  # DIB header size 7: no such version
    webp = bytearray(encode(photo, "WEBP", quality=80))
    webp_garbled = bytes(webp[:30]) + bytes(len(webp) - 30)
    gif = bytearray(encode(photo.convert("P"), "GIF"))
    gif_garbled = bytes(gif[:40]) + bytes((b * 7 + 3) % 256 for b in gif[40:])
    return {
        "corrupt-idat-crc.png": (bytes(bad_crc), Expect.error("corrupt image")),
        "corrupt-zlib-stream.png": (bytes(garbled_zlib), Expect.error("corrupt image")),
        "corrupt-entropy-data.jpg": (bytes(jpeg_noise), Expect.either()),
        "corrupt-ifd-offset.tif": (tiff_bad_ifd, Expect.error("")),
        "corrupt-dib-header.bmp": (bmp_bad_header, Expect.error("")),
        "corrupt-vp8-data.webp": (webp_garbled, Expect.either()),  # lossy VP8 has no checksum
        "corrupt-lzw-data.gif": (gif_garbled, Expect.either()),
        "random-bytes.jpg": (np.random.default_rng(3).bytes(5000), Expect.error("not an image")),
    }


def _bombs() -> dict[str, tuple[bytes, Expect]]:
    """Files that claim (or really hold) far more pixels than they weigh: refused from the header."""
    return {
        "bomb-gif-screen-65535x65535.gif": (gif_huge_screen(), Expect.error("too many pixels")),
        "bomb-tiff-100000x100000.tif": (tiff_header_only(100_000, 100_000), Expect.error("too many pixels")),
        "bomb-bmp-60000x60000.bmp": (bmp_header_only(60_000, 60_000), Expect.error("too many pixels")),
        "bomb-jpeg-sof-65500x65500.jpg": (jpeg_huge_sof(65_500, 65_500), Expect.error("too many pixels")),
        "bomb-webp-canvas-16777216x16777216.webp": (webp_huge_canvas(), Expect.error("")),
        "bomb-real-black-20000x20000.png": (real_black_png(20_000, 20_000), Expect.error("too many pixels")),
        "bomb-ztxt-100MB.png": (png_with_chunk(b"zTXt", b"comment\0\0" + zlib.compress(bytes(100 * 2**20), 9)),
                                Expect.either()),
        "bomb-iccp-100MB.png": (png_with_chunk(b"iCCP", b"icc\0\0" + zlib.compress(bytes(100 * 2**20), 9)),
                                Expect.either()),
        "bomb-tiff-ifd-loop.tif": (tiff_ifd_loop(), Expect.either()),
        "bomb-tiff-huge-tag-count.tif": (tiff_huge_tag_count(), Expect.either()),
        "bomb-gif-3000-frames.gif": (gif_many_frames(3000), Expect.ok((16, 16))),
    }


# ---------------------------------------------------------------------------------------------
# Valid but unusual files


def _modes(photo: Image.Image) -> dict[str, tuple[bytes, Expect]]:
    """Pixel formats other than 8-bit RGB; each must come out as 8-bit RGB."""
    rgb16 = np.linspace(0, 65535, W * H * 3).astype(">u2").reshape(H, W, 3)
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    ramp = np.linspace(-1e6, 1e6, W * H, dtype=np.float32).reshape(H, W)
    ramp_nan = ramp.copy()
    ramp_nan[0, :10] = np.nan
    return {
        "mode-rgb-48bit.png": (png_rgb16(rgb16), Expect.ok((W, H))),
        "mode-palette-trns.png": (encode(palette, "PNG", transparency=0), Expect.ok((W, H))),
        "mode-la.png": (encode(photo.convert("LA"), "PNG"), Expect.ok((W, H))),
        "mode-1bit.png": (encode(photo.convert("1"), "PNG"), Expect.ok((W, H))),
        "mode-rgba.webp": (encode(photo.convert("RGBA"), "WEBP", lossless=True), Expect.ok((W, H))),
        "mode-cmyk.tif": (encode(photo.convert("CMYK"), "TIFF"), Expect.ok((W, H))),
        "mode-i32.tif": (encode(Image.fromarray((np.arange(W * H, dtype=np.int32) * 9000).reshape(H, W)), "TIFF"),
                         Expect.ok((W, H))),
        "mode-float.tif": (encode(Image.fromarray(ramp, "F"), "TIFF"), Expect.ok((W, H))),
        "mode-float-nan.tif": (encode(Image.fromarray(ramp_nan, "F"), "TIFF"), Expect.ok((W, H))),
        "mode-grey.bmp": (encode(photo.convert("L"), "BMP"), Expect.ok((W, H))),
        "mode-rle8.bmp": (encode(photo.convert("P"), "BMP"), Expect.ok((W, H))),
        "mode-progressive.jpg": (encode(photo, "JPEG", progressive=True), Expect.ok((W, H))),
        "mode-grey-lzw.tif": (encode(photo.convert("L"), "TIFF", compression="tiff_lzw"), Expect.ok((W, H))),
        "mode-jpeg-in.tif": (encode(photo, "TIFF", compression="jpeg"), Expect.ok((W, H))),
    }


def _animated(photo: Image.Image) -> dict[str, tuple[bytes, Expect]]:
    """Only the first frame is labelled."""
    frames = [photo, photo.rotate(180)]
    return {
        "animated.png": (encode(frames[0], "PNG", save_all=True, append_images=frames[1:]), Expect.ok((W, H))),
        "animated.webp": (encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]), Expect.ok((W, H))),
        "mpo-two-pictures.jpg": (encode(frames[0], "MPO", save_all=True, append_images=frames[1:]), Expect.ok((W, H))),
    }


def _shapes() -> dict[str, tuple[bytes, Expect]]:
    """Tiny images and extreme aspect ratios: the centre crop must still give a full input."""
    return {
        "shape-1x1.jpg": (encode(Image.new("RGB", (1, 1), (250, 0, 0)), "JPEG"), Expect.ok((1, 1))),
        "shape-2x1.gif": (encode(Image.new("P", (2, 1)), "GIF"), Expect.ok((2, 1))),
        "shape-1x1.webp": (encode(Image.new("RGB", (1, 1), (0, 0, 250)), "WEBP"), Expect.ok((1, 1))),
        "shape-60000x1.png": (encode(Image.new("L", (60_000, 1), 128), "PNG"), Expect.ok((60_000, 1))),
        "shape-1x60000.png": (encode(Image.new("L", (1, 60_000), 128), "PNG"), Expect.ok((1, 60_000))),
        "shape-16383x3.jpg": (encode(Image.new("RGB", (16_383, 3), (9, 99, 199)), "JPEG"), Expect.ok((16_383, 3))),
    }


def _orientation(photo: Image.Image) -> dict[str, tuple[bytes, Expect]]:
    """EXIF orientation, valid and invalid; width/height are as displayed."""
    def with_orientation(value: int, fmt: str = "JPEG") -> bytes:
        exif = Image.Exif()
        exif[0x0112] = value
        return encode(photo, fmt, exif=exif.tobytes())

    garbage_exif = encode(photo, "JPEG", exif=b"Exif\x00\x00" + b"MM\x00\x2a\xff\xff\xff\xf0" + bytes(40))
    return {
        "exif-orientation-3.jpg": (with_orientation(3), Expect.ok((W, H))),
        "exif-orientation-8.jpg": (with_orientation(8), Expect.ok((H, W))),
        "exif-orientation-6.png": (with_orientation(6, "PNG"), Expect.ok((H, W))),
        "exif-orientation-6.webp": (with_orientation(6, "WEBP"), Expect.ok((H, W))),
        "exif-orientation-0.jpg": (with_orientation(0), Expect.ok((W, H))),
        "exif-orientation-99.jpg": (with_orientation(99), Expect.ok((W, H))),
        "exif-garbage.jpg": (garbage_exif, Expect.either()),
    }


def _disguised(photo: Image.Image) -> dict[str, tuple[bytes, Expect]]:
    """Wrong extensions (content decides) and things that are not raster images at all."""
    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\n"
           b"/Times-Roman findfont 12 scalefont setfont 10 10 moveto (hello) show showpage\n%%EOF\n")
    svg = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="48">'
           b'<rect width="64" height="48" fill="red"/></svg>')
    return {
        "webp-named.png": (encode(photo, "WEBP"), Expect.ok((W, H))),
        "gif-named.jpg": (encode(photo, "GIF"), Expect.ok((W, H))),
        "bmp-named.webp": (encode(photo, "BMP"), Expect.ok((W, H))),
        "tiff-named.gif": (encode(photo, "TIFF"), Expect.ok((W, H))),
        "jpeg-named.TIFF": (encode(photo, "JPEG"), Expect.ok((W, H))),
        "eps-named.jpg": (eps, Expect.error("not an image")),
        "svg-named.png": (svg, Expect.error("not an image")),
        "pdf-named.jpg": (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", Expect.error("not an image")),
        "zip-named.png": (b"PK\x03\x04" + bytes(60), Expect.error("not an image")),
        "html-named.gif": (b"<!doctype html><html><body>404 Not Found</body></html>", Expect.error("not an image")),
        "ppm-named.jpg": (encode(photo, "PPM"), Expect.error("not an image")),
        "ico-named.png": (encode(photo, "ICO"), Expect.error("not an image")),
        "psd-like-named.tif": (b"8BPS\x00\x01" + bytes(20), Expect.error("not an image")),
    }


def _names(photo: Image.Image) -> dict[str, tuple[bytes, Expect]]:
    """File names that break naive code: quoting, shells, URLs, Unicode normal forms, length."""
    data = encode(photo, "JPEG")
    names = ["-leading-dash.jpg", "quote'single.jpg", 'quote"double.jpg', "semi;colon&amp.jpg", "q?mark.jpg",
             "back\\slash.jpg", "tab\there.jpg", "new\nline.jpg", "caf\u00e9-nfc.jpg", "cafe\u0301-nfd.jpg",
             "emoji-\U0001F408.jpg", "UPPER.JPG", "x" * 200 + ".jpg", "dots...jpg", "$(touch pwned).jpg"]
    return {name: (data, Expect.ok((W, H))) for name in names}


# ---------------------------------------------------------------------------------------------
# Builders for files Pillow will not write


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_chunk(kind: bytes, body: bytes) -> bytes:
    """A valid 16x16 grey PNG with one extra ancillary chunk before the pixels."""
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 0, 0, 0, 0))
    idat = _png_chunk(b"IDAT", zlib.compress(b"".join(b"\0" + bytes(range(0, 256, 16)) for _ in range(16))))
    return b"\x89PNG\r\n\x1a\n" + ihdr + _png_chunk(kind, body) + idat + _png_chunk(b"IEND", b"")


def real_black_png(width: int, height: int) -> bytes:
    """A real, complete greyscale PNG of ``width`` x ``height`` black pixels: every row is
    there, yet it compresses ~1000:1 (20000x20000 is ~400 KB for 400 Mpx)."""
    compressor = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0 + a row of zeros
    parts = [compressor.compress(row) for _ in range(height)]
    body = b"".join(parts) + compressor.flush()
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def png_rgb16(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write these) from big-endian HxWx3 uint16."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\0" + pixels[y].tobytes() for y in range(height))
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")


def gif_huge_screen() -> bytes:
    """A GIF whose logical screen is 65535x65535 around a 1x1 frame."""
    header = b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return header + frame + b"\x3b"


def gif_many_frames(count: int) -> bytes:
    frames = [Image.new("P", (16, 16), i % 256) for i in range(count)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10)


def _tiff(entries: list[tuple[int, int, int, int]], extra: bytes = b"", next_ifd: int = 0) -> bytes:
    """A little-endian TIFF with one IFD at offset 8: entries are (tag, type, count, value)."""
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in sorted(entries):
        ifd += struct.pack("<HHII", tag, kind, count, value)
    ifd += struct.pack("<I", next_ifd)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + extra


def _tiff_image_entries(width: int, height: int, data_offset: int, data_size: int) -> list[tuple[int, int, int, int]]:
    short, long_ = 3, 4
    return [(256, long_, 1, width), (257, long_, 1, height), (258, short, 1, 8), (259, short, 1, 1),
            (262, short, 1, 1), (273, long_, 1, data_offset), (277, short, 1, 1),
            (278, long_, 1, height), (279, long_, 1, data_size)]


def _tiff_after_ifd(entry_count: int) -> int:
    """Offset of the first byte after a one-IFD header with ``entry_count`` entries."""
    return 8 + 2 + 12 * entry_count + 4


def tiff_header_only(width: int, height: int) -> bytes:
    """A greyscale TIFF declaring ``width`` x ``height`` with 16 bytes of pixel data."""
    return _tiff(_tiff_image_entries(width, height, _tiff_after_ifd(9), 16), extra=bytes(16))


def tiff_ifd_loop() -> bytes:
    """A 4x4 TIFF whose next-IFD pointer points back at itself: naive frame counting never ends."""
    return _tiff(_tiff_image_entries(4, 4, _tiff_after_ifd(9), 16), extra=bytes(16), next_ifd=8)


def tiff_huge_tag_count() -> bytes:
    """A 4x4 TIFF with an ImageDescription tag claiming 1 GiB of text stored past the file's end."""
    entries = _tiff_image_entries(4, 4, _tiff_after_ifd(10), 16) + [(270, 2, 2**30, 4096)]
    return _tiff(entries, extra=bytes(16))


def bmp_header_only(width: int, height: int) -> bytes:
    """A 24-bit BMP declaring ``width`` x ``height`` followed by 64 bytes of pixels."""
    dib = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    pixels = bytes(64)
    return b"BM" + struct.pack("<IHHI", 14 + len(dib) + len(pixels), 0, 0, 14 + len(dib)) + dib + pixels


def jpeg_huge_sof(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF0 frame header is rewritten to claim ``width`` x ``height``."""
    data = bytearray(encode(Image.new("RGB", (8, 8), (120, 30, 200)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_huge_canvas() -> bytes:
    """An extended (VP8X) WebP declaring the largest canvas the format allows, 2^24 x 2^24,
    around a real 1x1 image."""
    small = encode(Image.new("RGB", (1, 1)), "WEBP", lossless=True)
    inner = small[12:]  # the VP8L chunk after "RIFF....WEBP"
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (2**24 - 1).to_bytes(3, "little") * 2
    body = b"WEBP" + vp8x + inner
    return b"RIFF" + struct.pack("<I", len(body)) + body


def near_limit_png(side: int, color_type: int, depth: int = 8) -> bytes:
    """A complete, valid, all-zero PNG of ``side`` x ``side`` pixels (colour type 0 grey, 2 RGB,
    4 grey+alpha, 6 RGBA), written row by row so that making it needs no full-size buffer."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    compressor = zlib.compressobj(6)
    row = bytes(side * channels * depth // 8 + 1)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, depth, color_type, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------
# Measuring: `python tests/hostile_corpus.py FOLDER` decodes every file of FOLDER in a fresh fork
# of one small process and prints a JSON line per file: outcome, seconds, peak RSS growth.


def _measure_one(path: Path, size: int) -> dict[str, object]:
    import resource
    import time

    import psutil

    from distcls.images import ImageError, decode

    data = path.read_bytes()
    base = psutil.Process().memory_info().rss
    started = time.perf_counter()
    try:
        _, width, height = decode(data, size)
        outcome: dict[str, object] = {"size": [width, height]}
    except ImageError as exc:
        outcome = {"error": str(exc)}
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"name": path.name, **outcome, "seconds": seconds, "rss_growth": max(0, peak - base)}


def _measure(folder: Path, size: int = 32, timeout: float = 60.0) -> None:
    """A fork per file, so that each file's peak memory is its own; a child that does not
    finish within ``timeout`` is killed and reported as hanging."""
    import json
    import os
    import signal
    import time

    from PIL import Image

    import distcls.images  # noqa: F401  (imported once, before forking)

    Image.init()  # every plugin loaded once, not again in each child

    for path in sorted(folder.iterdir()):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                line = json.dumps(_measure_one(path, size))
            except BaseException as exc:  # anything but ImageError is a finding, not a crash of the harness
                line = json.dumps({"name": path.name, "crash": f"{type(exc).__name__}: {exc}"})
            os.write(write, line.encode())
            os._exit(0)
        os.close(write)
        deadline = time.monotonic() + timeout
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.005)
        with os.fdopen(read, "rb") as pipe:
            raw = pipe.read()
        print(raw.decode() if raw else json.dumps({"name": path.name, "hang": timeout}), flush=True)


if __name__ == "__main__":
    import sys

    _measure(Path(sys.argv[1]))
