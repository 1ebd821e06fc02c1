"""The interface every image-caption scorer implements: the reward model and the CLIP/BLIP baselines.

Preparation (decode, preprocess, tokenize) runs in DataLoader worker processes, so `prepare` and `collate`
must be picklable and CPU-only; `score_batch` runs in the main process on the scorer's device.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from PIL import Image


class PairScorer(Protocol):
    name: str  # "reward_model", "clip_score", "blip_score"
    version: str  # content hash of the weights: scores of different versions live side by side

    def prepare(self, image: Image.Image, caption: str) -> dict[str, torch.Tensor]:
        """One pair as tensors (CPU), ready for `collate`."""
        ...

    def collate(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """A batch from prepared samples (CPU)."""
        ...

    def score_batch(self, batch: dict[str, Any]) -> torch.Tensor:
        """Scores of a batch, float32 on the CPU, shape [batch]; higher means better aligned."""
        ...
