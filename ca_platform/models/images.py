"""Image preprocessing for the platform's models with PIL and numpy (no torchvision).

Resize the shorter side, centre-crop to a square, scale to [0, 1], normalise per channel: what CLIP and
BLIP image processors do, in a form that is cheap to pickle into DataLoader workers.

torch is imported when an image is transformed, not with the module: `decode_image` is on the path of every
Dagster process that loads the definitions, most of which run no model.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

# The normalisation CLIP and BLIP were trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def decode_image(data: bytes) -> Image.Image:
    """RGB image from encoded bytes."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode == "RGB":  # convert() would copy it
            image.load()
            return image
        return image.convert("RGB")


@dataclass(frozen=True)
class ImageTransform:
    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """A float32 tensor [3, size, size]."""
        import torch

        image = image.convert("RGB")
        width, height = image.size
        scale = self.size / min(width, height)
        resized = image.resize(
            (max(self.size, round(width * scale)), max(self.size, round(height * scale))), Image.Resampling.BICUBIC
        )
        left = (resized.width - self.size) // 2
        top = (resized.height - self.size) // 2
        cropped = resized.crop((left, top, left + self.size, top + self.size))
        array = np.asarray(cropped, dtype=np.float32) / 255.0
        array = (array - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(array.transpose(2, 0, 1).copy())
