"""A labelled lake drawn from nothing: ten classes of shapes and textures, for the offline demo
and for tests that must not depend on downloaded data.

Each class is a distinct pattern drawn with random colour, position, scale and background noise,
on images of varied sizes and aspect ratios, so a small CNN can learn it but not trivially.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "cross", "hstripes", "vstripes", "checker", "ring", "diamond", "dots")


def draw(cls: str, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """One image of class ``cls``."""
    background = tuple(int(v) for v in rng.integers(0, 120, 3))
    colour = tuple(int(v) for v in rng.integers(130, 256, 3))
    image = Image.new("RGB", (width, height), background)
    pen = ImageDraw.Draw(image)
    side = min(width, height)
    r = side * rng.uniform(0.25, 0.42)
    cx = width / 2 + rng.uniform(-0.1, 0.1) * width
    cy = height / 2 + rng.uniform(-0.1, 0.1) * height
    box = (cx - r, cy - r, cx + r, cy + r)
    step = max(2, int(side * rng.uniform(0.08, 0.16)))
    line = max(1, int(side / 12))
    if cls == "circle":
        pen.ellipse(box, fill=colour)
    elif cls == "square":
        pen.rectangle(box, fill=colour)
    elif cls == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif cls == "cross":
        pen.line([(cx - r, cy), (cx + r, cy)], fill=colour, width=line * 2)
        pen.line([(cx, cy - r), (cx, cy + r)], fill=colour, width=line * 2)
    elif cls == "hstripes":
        for y in range(0, height, step * 2):
            pen.rectangle((0, y, width, y + step - 1), fill=colour)
    elif cls == "vstripes":
        for x in range(0, width, step * 2):
            pen.rectangle((x, 0, x + step - 1, height), fill=colour)
    elif cls == "checker":
        for y in range(0, height, step):
            for x in range((y // step) % 2 * step, width, step * 2):
                pen.rectangle((x, y, x + step - 1, y + step - 1), fill=colour)
    elif cls == "ring":
        pen.ellipse(box, outline=colour, width=line * 2)
    elif cls == "diamond":
        pen.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    elif cls == "dots":
        for _ in range(int(rng.integers(5, 12))):
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            d = side * 0.06
            pen.ellipse((x - d, y - d, x + d, y + d), fill=colour)
    else:
        raise ValueError(f"unknown synthetic class {cls!r}")
    noise = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def make_lake(root: str | Path, per_class: int, seed: int = 0, min_side: int = 32, max_side: int = 96,
              labelled: bool = True) -> list[Path]:
    """Write ``per_class`` JPEGs of every class under ``root``: ``<root>/<class>/<n>.jpg`` when
    ``labelled``, else a flat ``<root>/img-<n>.jpg``. Returns the written paths."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    written = []
    for index in range(per_class * len(CLASSES)):
        cls = CLASSES[index % len(CLASSES)]
        width, height = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        target = root / cls / f"{index:06d}.jpg" if labelled else root / f"img-{index:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        draw(cls, width, height, rng).save(target, quality=90)
        written.append(target)
    return written
