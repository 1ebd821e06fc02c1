"""CLIP trained on a training-set variant, and its embeddings for retrieval evaluation.

The same recipe runs on every variant (the full pool and each compressed subset) with the same budget, so
differences in retrieval come from the data. The model is the tiny CLIP of the CLIP-score baseline or a
user's local pretrained one, trained with CLIP's symmetric contrastive loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from ca_platform.models.devices import inference_autocast, pick_device
from ca_platform.scoring.clip_score import TrainedClip, build_clip
from ca_platform.scoring.streaming import PairPreprocessor
from ca_platform.training.tars import (
    TrainingBudget,
    load_trained_model,
    save_trained_model,
    train_built_model,
)

TRAINED_CLIP = "trained_clip"


def train_clip_on_tars(
    tars: Sequence[Path | str],
    budget: TrainingBudget,
    source: str = "tiny",
    image_size: int = 64,
    batch_size: int = 32,
    learning_rate: float = 5e-4,
    seed: int = 0,
    device: str | None = None,
) -> TrainedClip:
    """A CLIP trained on the pairs of the tars until the budget is spent: CLIPModel's own contrastive loss."""
    model, preprocessor, metrics = train_built_model(
        build_clip,
        _contrastive_loss,
        TRAINED_CLIP,
        tars,
        budget,
        source=source,
        image_size=image_size,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        device=device,
    )
    return TrainedClip(model, preprocessor, metrics)


def _contrastive_loss(model: CLIPModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch, return_loss=True).loss


def save_trained_clip(trained: TrainedClip, root: Path) -> tuple[str, Path]:
    """`root/<version>`: safetensors weights, CLIPConfig, preprocessing, tokenizer and `metrics.json`."""
    return save_trained_model(trained.model, trained.preprocessor, trained.metrics, root, TRAINED_CLIP)


def load_trained_clip(folder: Path, device: str | None = None) -> tuple[CLIPModel, PairPreprocessor]:
    """The model (in eval mode, on `device`) and preprocessor of a folder written by `save_trained_clip`."""
    model, preprocessor, _ = load_trained_model(folder, CLIPConfig, CLIPModel, TRAINED_CLIP)
    return model.to(pick_device(device)), preprocessor


def embed_pairs(
    model: CLIPModel,
    preprocessor: PairPreprocessor,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    batch_size: int = 64,
    device: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised float32 CPU embeddings of the images [n_images, d] and of the captions [n_captions, d].

    Images and captions are embedded apart, so an image may have several captions (as in COCO retrieval).
    """
    target = pick_device(device)
    model.to(target).eval()
    width = model.config.projection_dim
    image_parts, text_parts = [torch.zeros(0, width)], [torch.zeros(0, width)]
    with torch.inference_mode(), inference_autocast(target):
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([preprocessor.transform(image) for image in images[start : start + batch_size]])
            features = model.get_image_features(pixel_values=pixels.to(target)).pooler_output
            image_parts.append(features.float().cpu())
        for start in range(0, len(captions), batch_size):
            tokens = preprocessor.tokenizer(
                list(captions[start : start + batch_size]),
                truncation=True,
                max_length=preprocessor.max_length,
                padding=True,
                return_tensors="pt",
            )
            features = model.get_text_features(
                input_ids=tokens["input_ids"].to(target), attention_mask=tokens["attention_mask"].to(target)
            ).pooler_output
            text_parts.append(features.float().cpu())
    normalise = torch.nn.functional.normalize
    return normalise(torch.cat(image_parts), dim=-1), normalise(torch.cat(text_parts), dim=-1)
