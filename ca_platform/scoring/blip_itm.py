"""The BLIP image-text-matching baseline: keep the pairs BLIP's ITM head finds most likely to match.

Without a user's pretrained BLIP folder, the platform trains a tiny BLIP on the raw pool itself: every pool
pair is a positive, the same image with another in-batch caption a negative.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image
from torch.nn.functional import cross_entropy
from transformers import BlipConfig, BlipForImageTextRetrieval

from ca_platform.models.blip import (
    build_blip_itm,
    image_text_contrastive_loss,
    match_probability,
    shuffled_caption_negatives,
)
from ca_platform.models.checkpoints import save_transformers_model
from ca_platform.models.devices import pick_device
from ca_platform.models.preprocessing import PairPreprocessor, Prepared, to_device
from ca_platform.models.training import TrainedModel, train_on_pairs
from ca_platform.schemas import BLIP_SCORE
from ca_platform.scoring.scorer import ModelPairScorer


class BlipItmScorer(ModelPairScorer):
    """P(match) from BLIP's ITM head."""

    name = BLIP_SCORE
    config_class = BlipConfig
    model_class = BlipForImageTextRetrieval

    @staticmethod
    def build(source: str, image_size: int = 64) -> tuple[BlipForImageTextRetrieval, PairPreprocessor]:
        return build_blip_itm(source, image_size)

    def scores_on_device(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return match_probability(self.model, batch)


def train_blip_itm(
    pairs: Iterable[tuple[Image.Image, str]],
    source: str = "tiny",
    image_size: int = 64,
    epochs: int = 1,
    batch_size: int = 32,
    learning_rate: float = 5e-4,
    seed: int = 0,
    device: str | None = None,
) -> TrainedModel:
    """Train the ITM head and both encoders: cross-entropy on positives and shuffled-caption negatives.

    As in BLIP, an image-text contrastive term on the unimodal embeddings is added: it teaches both encoders
    what a caption says about its image, without which ITM from scratch sits at chance for long. The loss
    curve in the metrics is their sum.
    """
    torch.manual_seed(seed)
    model, preprocessor = build_blip_itm(source, image_size)
    target = pick_device(device)
    shifts = torch.Generator().manual_seed(seed + 1)

    def matching_loss(samples: list[Prepared]) -> torch.Tensor:
        shift = int(torch.randint(1, len(samples), (1,), generator=shifts))
        negatives = shuffled_caption_negatives(samples, shift)
        batch = to_device(preprocessor.collate(samples + negatives), target)
        labels = torch.tensor([1] * len(samples) + [0] * len(negatives), device=target)
        logits = model(**batch, use_itm_head=True).itm_score
        positives = to_device(preprocessor.collate(samples), target)
        return cross_entropy(logits.float(), labels) + image_text_contrastive_loss(model, positives)

    metrics = train_on_pairs(
        model,
        preprocessor,
        pairs,
        matching_loss,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        device=target,
        description="blip_score model: training",
    )
    return TrainedModel(model, preprocessor, {"source": source, **metrics})


def save_blip_itm(trained: TrainedModel, root: Path) -> tuple[str, Path]:
    """`root/<version>` in the one checkpoint format, as a BLIP ITM model."""
    return save_transformers_model(root, trained.model, trained.preprocessor, trained.metrics, BLIP_SCORE)


def load_blip_itm(folder: Path, device: str | None = None) -> BlipItmScorer:
    """A BlipItmScorer from a folder written by `save_blip_itm`."""
    return BlipItmScorer.from_checkpoint(folder, device)
