"""The CLIP-score baseline (DataComp): keep the pairs whose CLIP image and text embeddings agree most.

The model is a tiny CLIP built from a config and trained contrastively by the platform (for tests, the demo
and users without weights), or a user's pretrained CLIP from a local folder. Either way it is scored with
the same cosine similarity DataComp filters on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from ca_platform.models.checkpoints import content_version
from ca_platform.models.devices import pick_device
from ca_platform.models.images import ImageTransform
from ca_platform.models.tokenization import bert_tokenizer
from ca_platform.schemas import CLIP_SCORE
from ca_platform.scoring.streaming import (
    TINY_MAX_TOKENS,
    TINY_WIDTH,
    ModelPairScorer,
    PairPreprocessor,
    Prepared,
    load_pair_model,
    local_model_dir,
    pretrained_preprocessor,
    save_pair_model,
    tiny_text_tower,
    tiny_vision_tower,
    to_device,
    train_pair_model,
)


def build_clip(source: str = "tiny", image_size: int = 64) -> tuple[CLIPModel, PairPreprocessor]:
    """A fresh tiny CLIP (BERT WordPiece text side) or a pretrained one from a local folder, with its preprocessor.

    `image_size` applies to the tiny model; a pretrained model keeps the resolution it was trained at.
    """
    if source == "tiny":
        tokenizer = bert_tokenizer(TINY_MAX_TOKENS)
        config = CLIPConfig(
            text_config=tiny_text_tower(tokenizer),
            vision_config=tiny_vision_tower(image_size),
            projection_dim=TINY_WIDTH,
        )
        return CLIPModel(config), PairPreprocessor(ImageTransform(image_size), tokenizer, TINY_MAX_TOKENS)
    folder = local_model_dir(source)
    model = CLIPModel.from_pretrained(str(folder), use_safetensors=True, dtype=torch.float32)
    preprocessor = pretrained_preprocessor(
        folder, model.config.vision_config.image_size, model.config.text_config.max_position_embeddings
    )
    return model, preprocessor


@dataclass
class TrainedClip:
    model: CLIPModel
    preprocessor: PairPreprocessor
    metrics: dict[str, Any] = field(default_factory=dict)


def train_clip(
    pairs: Iterable[tuple[Image.Image, str]],
    source: str = "tiny",
    image_size: int = 64,
    epochs: int = 1,
    batch_size: int = 64,
    learning_rate: float = 5e-4,
    seed: int = 0,
    device: str | None = None,
) -> TrainedClip:
    """Train (or fine-tune) CLIP with the symmetric InfoNCE loss over in-batch pairs, scaled by its logit scale."""
    torch.manual_seed(seed)
    model, preprocessor = build_clip(source, image_size)
    target = pick_device(device)

    def contrastive_loss(samples: list[Prepared]) -> torch.Tensor:
        return model(**to_device(preprocessor.collate(samples), target), return_loss=True).loss

    metrics = train_pair_model(
        model,
        preprocessor,
        pairs,
        contrastive_loss,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        device=target,
    )
    return TrainedClip(model, preprocessor, {"source": source, **metrics})


def save_clip(trained: TrainedClip, root: Path) -> tuple[str, Path]:
    """`root/<version>`: safetensors weights, CLIPConfig, preprocessing and tokenizer files."""
    return save_pair_model(trained.model, trained.preprocessor, root, CLIP_SCORE)


def load_clip(folder: Path, device: str | None = None) -> ClipScorer:
    """A ClipScorer from a folder written by `save_clip`; its version is the folder's content hash."""
    model, preprocessor = load_pair_model(folder, CLIPConfig, CLIPModel, CLIP_SCORE)
    return ClipScorer(model, preprocessor, content_version(folder), device)


class ClipScorer(ModelPairScorer):
    """Cosine similarity of the normalised image and text embeddings: DataComp's CLIP score."""

    name = CLIP_SCORE

    @classmethod
    def from_pretrained_dir(cls, path: Path | str, device: str | None = None) -> ClipScorer:
        """A user's local pretrained CLIP (CLIPModel.save_pretrained plus its tokenizer's save_pretrained)."""
        model, preprocessor = build_clip(str(path))
        return cls(model, preprocessor, content_version(Path(path)), device)

    def scores_on_device(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        image = self.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        text = self.model.get_text_features(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).pooler_output
        return torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1)
