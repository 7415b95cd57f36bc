"""JPEG decoding for labeling: Pillow with ``draft`` (``images.decode``) against libjpeg-turbo's scaled
decode through simplejpeg, on the photo lake of bench_label.py (CIFAR-10 JPEGs upscaled to 640x480, q90).

    pip install simplejpeg               # not a distcls dependency: only this measurement needs it
    python bench/bench_decode.py                     # 1,000 images, 32-pixel model input, 3 rounds
    python bench/bench_decode.py --images 2000 --size 64 --rounds 5

For each image, on one thread: (1) ``images.decode(data, size)``, everything labeling does per image
(Pillow: header, EXIF check, ``draft`` scaled decode, resize + centre crop); (2) what a simplejpeg
path would do: Pillow's header and EXIF parse (the pixel-limit and orientation checks need them),
``decode_jpeg(min_width=, min_height=)`` at the scale ``draft`` picks (1/8 for 640x480 -> 32), then
the same ``ImageOps.fit``. Times are the median of ``--rounds`` passes over the lake (ms per image),
alternating the two so that load on a shared machine hits both; CPU time of the process, so other
processes taking the core do not count. Pixels: mean and max absolute
difference between (1) and (2), over all images, in 0-255 units.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_label import make_lake  # noqa: E402  the photo lake, made the same way

from distcls.images import decode  # noqa: E402


def pillow(data: bytes, size: int) -> np.ndarray:
    return decode(data, size)[0]


def turbo(data: bytes, size: int) -> np.ndarray:
    import simplejpeg

    image = Image.open(io.BytesIO(data))
    image.getexif()
    scale = min(image.size) / size
    image.draft("RGB", (max(1, int(image.size[0] / scale)), max(1, int(image.size[1] / scale))))  # reads no pixels
    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=image.size[0], min_height=image.size[1])
    return np.asarray(ImageOps.fit(Image.fromarray(pixels), (size, size), Image.Resampling.BILINEAR))


def timed(fn, files: list[bytes], size: int) -> tuple[float, list[np.ndarray]]:
    """(CPU ms per image, outputs). CPU time of this process, not wall time: on a shared machine
    other processes then lengthen it only through caches and memory bandwidth, not by taking the core."""
    started = time.process_time()
    out = [fn(data, size) for data in files]
    return (time.process_time() - started) / len(files) * 1000, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=32, help="model input side (bench_label's model: 32)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import simplejpeg

    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        lake = make_lake(Path(tmp), args.images, (640, 480))
        files = [p.read_bytes() for p in sorted(lake.rglob("*.jpg"))]
    times: dict[str, list[float]] = {"pillow": [], "turbo": []}
    for _ in range(args.rounds):
        times["pillow"].append(timed(pillow, files, args.size)[0])
        times["turbo"].append(timed(turbo, files, args.size)[0])
    _, a = timed(pillow, files, args.size)
    _, b = timed(turbo, files, args.size)
    diff = np.abs(np.stack(a).astype(np.int16) - np.stack(b).astype(np.int16))
    per_image = diff.reshape(len(files), -1).mean(1)
    print(f"machine: {platform.node()}, os.cpu_count()={os.cpu_count()}, load average {os.getloadavg()[0]:.1f} "
          f"(shared), python {platform.python_version()}, Pillow {Image.__version__}, simplejpeg {simplejpeg.__version__}")
    print(f"command: python bench/bench_decode.py {' '.join(sys.argv[1:])}")
    print(f"input: {len(files)} CIFAR-10 JPEGs upscaled to 640x480 q90, {sum(map(len, files)) / len(files) / 1024:.0f} KiB "
          f"each on average; output {args.size}x{args.size} RGB; one thread; {args.rounds} rounds, medians")
    for name, label in (("pillow", "Pillow draft (images.decode)"), ("turbo", "simplejpeg scaled decode + fit")):
        print(f"  {label:32s} {np.median(times[name]):6.3f} CPU ms/image  (rounds: "
              f"{', '.join(f'{t:.3f}' for t in times[name])})")
    print(f"  speed-up {np.median(times['pillow']) / np.median(times['turbo']):.2f}x")
    print(f"pixels, |pillow - simplejpeg| in 0-255: mean {diff.mean():.3f}, max {diff.max()}, "
          f"worst image mean {per_image.max():.3f}, pixels differing by > 8: {np.mean(diff > 8) * 100:.3f}%")


if __name__ == "__main__":
    main()
