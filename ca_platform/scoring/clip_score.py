"""The CLIP-score baseline (DataComp): keep the pairs whose CLIP image and text embeddings agree most.

The model is a tiny CLIP built from a config and trained contrastively by the platform on the raw pool (for
tests, the demo and users without weights), or a user's pretrained CLIP from a local folder. Either way it
is scored with the same cosine similarity DataComp filters on.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from ca_platform.models.checkpoints import save_transformers_model
from ca_platform.models.clip import build_clip, clip_similarity, contrastive_loss
from ca_platform.models.devices import pick_device
from ca_platform.models.preprocessing import PairPreprocessor
from ca_platform.models.training import TrainedModel, collated_loss, train_on_pairs
from ca_platform.schemas import CLIP_SCORE
from ca_platform.scoring.scorer import ModelPairScorer


class ClipScorer(ModelPairScorer):
    """Cosine similarity of the normalised image and text embeddings: DataComp's CLIP score."""

    name = CLIP_SCORE
    config_class = CLIPConfig
    model_class = CLIPModel

    @staticmethod
    def build(source: str, image_size: int = 64) -> tuple[CLIPModel, PairPreprocessor]:
        return build_clip(source, image_size)

    def scores_on_device(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return clip_similarity(self.model, batch)


def train_clip(
    pairs: Iterable[tuple[Image.Image, str]],
    source: str = "tiny",
    image_size: int = 64,
    epochs: int = 1,
    batch_size: int = 64,
    learning_rate: float = 5e-4,
    seed: int = 0,
    device: str | None = None,
) -> TrainedModel:
    """Train (or fine-tune) CLIP with its symmetric contrastive loss over in-batch pairs."""
    torch.manual_seed(seed)
    model, preprocessor = build_clip(source, image_size)
    target = pick_device(device)
    loss = collated_loss(model, preprocessor, contrastive_loss, target)
    metrics = train_on_pairs(
        model,
        preprocessor,
        pairs,
        loss,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        device=target,
        description="clip_score model: training",
    )
    return TrainedModel(model, preprocessor, {"source": source, **metrics})


def save_clip(trained: TrainedModel, root: Path) -> tuple[str, Path]:
    """`root/<version>` in the one checkpoint format, as a CLIP-score model."""
    return save_transformers_model(root, trained.model, trained.preprocessor, trained.metrics, CLIP_SCORE)


def load_clip(folder: Path, device: str | None = None) -> ClipScorer:
    """A ClipScorer from a folder written by `save_clip`."""
    return ClipScorer.from_checkpoint(folder, device)
