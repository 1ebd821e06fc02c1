"""Photo-like test images made on the spot: smooth colour fields with a few shapes, and their web copies.

Photos keep energy in every low frequency, which is what makes a pHash stable; a symmetric drawing on a flat
background would not be a fair test of it. Each image is a sum of random colour grids upsampled at four
scales (a 1/f-like spectrum) with one to three filled ellipses or rectangles on top.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw


def photo(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    field = np.zeros((size, size, 3), dtype=np.float32)
    for cells, amplitude in ((2, 1.0), (4, 0.6), (8, 0.35), (16, 0.2)):
        grid = rng.uniform(-1, 1, (cells, cells, 3)).astype(np.float32)
        channels = [Image.fromarray(grid[..., c]).resize((size, size), Image.Resampling.BICUBIC) for c in range(3)]
        field += amplitude * np.stack([np.asarray(channel) for channel in channels], axis=-1)
    image = Image.fromarray(np.clip(128 + 60 * field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        left, top = rng.uniform(0, size * 0.7, 2)
        width, height = rng.uniform(size * 0.15, size * 0.5, 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([left, top, left + width, top + height], fill=colour)
    return image


def encoded(image: Image.Image, image_format: str = "PNG", quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    if image_format == "JPEG":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format=image_format)
    return buffer.getvalue()


def reencoded(image: Image.Image, image_format: str = "PNG", quality: int = 95) -> Image.Image:
    """The image as a site would serve it again: encoded and decoded."""
    with Image.open(io.BytesIO(encoded(image, image_format, quality))) as copy:
        return copy.convert("RGB")


def resized(image: Image.Image, size: int) -> Image.Image:
    return image.resize((size, size), Image.Resampling.BICUBIC)


def write_shard_tar(path: Path, samples: list[tuple[str, str, bytes, str]]) -> Path:
    """A tar laid out as downloads write it: `<key>.<ext>`, `.txt` and `.json` (with the uid) per (key, uid,
    encoded image, extension)."""
    with wds.TarWriter(str(path)) as writer:
        for key, uid, image, extension in samples:
            writer.write(
                {"__key__": key, extension: image, "txt": f"a photo {uid}", "json": json.dumps({"uid": uid}).encode()}
            )
    return path
