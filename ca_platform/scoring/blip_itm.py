"""The BLIP image-text-matching baseline: keep the pairs BLIP's ITM head finds most likely to match.

ITM cross-attends from the caption to the image, so it can judge details that a CLIP embedding averages
away. Without a user's pretrained BLIP folder, the platform trains a tiny BLIP on the raw pool itself:
every pool pair is a positive, the same image with another in-batch caption a negative.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.nn.functional import cross_entropy
from transformers import BlipConfig, BlipForImageTextRetrieval, PreTrainedTokenizerBase

from ca_platform.models.checkpoints import content_version
from ca_platform.models.devices import pick_device
from ca_platform.models.images import ImageTransform
from ca_platform.models.tokenization import bert_tokenizer
from ca_platform.schemas import BLIP_SCORE
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

CONTRASTIVE_TEMPERATURE = 0.07  # BLIP's initial ITC temperature
PRETRAINED_MAX_TOKENS = 64  # BLIP's text tower allows 512; web captions that long are noise


def tiny_blip_config(tokenizer: PreTrainedTokenizerBase, image_size: int) -> BlipConfig:
    """The tiny BLIP of tests and the demo (ITM scorer and captioner alike), with the BERT tokenizer's ids."""
    return BlipConfig(
        text_config={**tiny_text_tower(tokenizer), "sep_token_id": tokenizer.sep_token_id},
        vision_config=tiny_vision_tower(image_size),
        projection_dim=TINY_WIDTH,
        image_text_hidden_size=TINY_WIDTH,
    )


def build_blip_itm(source: str = "tiny", image_size: int = 64) -> tuple[BlipForImageTextRetrieval, PairPreprocessor]:
    """A fresh tiny BLIP ITM model (BERT WordPiece text side) or a pretrained one from a local folder.

    `image_size` applies to the tiny model; a pretrained model keeps the resolution it was trained at.
    """
    if source == "tiny":
        tokenizer = bert_tokenizer(TINY_MAX_TOKENS)
        model = BlipForImageTextRetrieval(tiny_blip_config(tokenizer, image_size))
        return model, PairPreprocessor(ImageTransform(image_size), tokenizer, TINY_MAX_TOKENS)
    folder = local_model_dir(source)
    model = BlipForImageTextRetrieval.from_pretrained(str(folder), use_safetensors=True, dtype=torch.float32)
    max_tokens = min(model.config.text_config.max_position_embeddings, PRETRAINED_MAX_TOKENS)
    return model, pretrained_preprocessor(folder, model.config.vision_config.image_size, max_tokens)


@dataclass
class TrainedBlipItm:
    model: BlipForImageTextRetrieval
    preprocessor: PairPreprocessor
    metrics: dict[str, Any] = field(default_factory=dict)


def shuffled_caption_negatives(samples: list[Prepared], shift: int) -> list[Prepared]:
    """Each image with the caption `shift` places along the batch, skipping captions identical to its own."""
    negatives = []
    for index, sample in enumerate(samples):
        other = samples[(index + shift) % len(samples)]
        if not torch.equal(other["input_ids"], sample["input_ids"]):
            negatives.append({**sample, "input_ids": other["input_ids"], "attention_mask": other["attention_mask"]})
    return negatives


def image_text_contrastive_loss(model: BlipForImageTextRetrieval, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """BLIP's ITC: symmetric InfoNCE over the batch; pairs with identical captions count as positives."""
    similarity = model(**batch, use_itm_head=False).itm_score.float() / CONTRASTIVE_TEMPERATURE
    ids = batch["input_ids"]
    same_caption = (ids.unsqueeze(0) == ids.unsqueeze(1)).all(dim=-1).float()
    targets = same_caption / same_caption.sum(dim=1, keepdim=True)
    return (cross_entropy(similarity, targets) + cross_entropy(similarity.t(), targets)) / 2


def train_blip_itm(
    pairs: Iterable[tuple[Image.Image, str]],
    source: str = "tiny",
    image_size: int = 64,
    epochs: int = 1,
    batch_size: int = 32,
    learning_rate: float = 5e-4,
    seed: int = 0,
    device: str | None = None,
) -> TrainedBlipItm:
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

    metrics = train_pair_model(
        model,
        preprocessor,
        pairs,
        matching_loss,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        device=target,
    )
    return TrainedBlipItm(model, preprocessor, {"source": source, **metrics})


def save_blip_itm(trained: TrainedBlipItm, root: Path) -> tuple[str, Path]:
    """`root/<version>`: safetensors weights, BlipConfig, preprocessing and tokenizer files."""
    return save_pair_model(trained.model, trained.preprocessor, root, BLIP_SCORE)


def load_blip_itm(folder: Path, device: str | None = None) -> BlipItmScorer:
    """A BlipItmScorer from a folder written by `save_blip_itm`; its version is the folder's content hash."""
    model, preprocessor = load_pair_model(folder, BlipConfig, BlipForImageTextRetrieval, BLIP_SCORE)
    return BlipItmScorer(model, preprocessor, content_version(folder), device)


class BlipItmScorer(ModelPairScorer):
    """P(match) from BLIP's ITM head: softmax over its two logits, the "match" one."""

    name = BLIP_SCORE

    @classmethod
    def from_pretrained_dir(cls, path: Path | str, device: str | None = None) -> BlipItmScorer:
        """A user's local pretrained BLIP ITM model (save_pretrained of the model and its tokenizer)."""
        model, preprocessor = build_blip_itm(str(path))
        return cls(model, preprocessor, content_version(Path(path)), device)

    def scores_on_device(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.model(**batch, use_itm_head=True).itm_score
        return logits.float().softmax(dim=-1)[:, 1]
