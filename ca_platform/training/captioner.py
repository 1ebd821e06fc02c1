"""A BLIP captioner trained on a training-set variant, and greedy captions for captioning evaluation.

BLIP's decoder reads a caption after a beginning-of-sequence token and cross-attends to the image; at
generation it starts from that token alone and stops at [SEP]. transformers' `generate` replaces the first
input id with `text_config.bos_token_id` but `forward` does not, so training does the same replacement
itself: for the tiny model bos is BERT's [CLS] (what the tokenizer puts first anyway), for a pretrained
Salesforce BLIP it is [DEC].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.nn.functional import cross_entropy
from transformers import BlipConfig, BlipForConditionalGeneration

from ca_platform.models.devices import inference_autocast, pick_device
from ca_platform.models.images import ImageTransform
from ca_platform.models.tokenization import bert_tokenizer
from ca_platform.scoring.blip_itm import tiny_blip_config
from ca_platform.scoring.streaming import (
    TINY_MAX_TOKENS,
    PairPreprocessor,
    local_model_dir,
    pretrained_preprocessor,
)
from ca_platform.training.tars import (
    TrainingBudget,
    load_trained_model,
    save_trained_model,
    train_built_model,
)

TRAINED_CAPTIONER = "blip_captioner"
PRETRAINED_MAX_TOKENS = 64  # BLIP's text tower allows 512; web captions that long are noise


def build_blip_captioner(
    source: str = "tiny", image_size: int = 64
) -> tuple[BlipForConditionalGeneration, PairPreprocessor]:
    """A fresh tiny BLIP captioner (BERT WordPiece text side) or a pretrained one from a local folder.

    The tiny config's text ids follow the BERT tokenizer: bos = [CLS], eos and sep = [SEP], pad = [PAD], so
    generation starts where training does and stops at the [SEP] that ends every training caption.
    `image_size` applies to the tiny model; a pretrained model keeps the resolution it was trained at.
    """
    if source == "tiny":
        tokenizer = bert_tokenizer(TINY_MAX_TOKENS)
        model = BlipForConditionalGeneration(tiny_blip_config(tokenizer, image_size))
        return model, PairPreprocessor(ImageTransform(image_size), tokenizer, TINY_MAX_TOKENS)
    folder = local_model_dir(source)
    model = BlipForConditionalGeneration.from_pretrained(str(folder), use_safetensors=True, dtype=torch.float32)
    max_tokens = min(model.config.text_config.max_position_embeddings, PRETRAINED_MAX_TOKENS)
    return model, pretrained_preprocessor(folder, model.config.vision_config.image_size, max_tokens)


@dataclass
class TrainedCaptioner:
    model: BlipForConditionalGeneration
    preprocessor: PairPreprocessor
    metrics: dict[str, Any] = field(default_factory=dict)


def captioning_loss(model: BlipForConditionalGeneration, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """BLIP's language-modelling loss: next-token cross-entropy of the captions given their images, after bos.

    The same value as `model(..., labels=input_ids with padding at -100).loss`, but the vocabulary-wide
    logits are computed for caption tokens only, not for padding: they dominate the cost of a small model
    (30,522 BERT words per position), and a padded batch of web captions is often half padding.
    """
    input_ids = batch["input_ids"].clone()
    input_ids[:, 0] = model.config.text_config.bos_token_id
    image = model.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
    decoder = model.text_decoder
    hidden = decoder.bert(
        input_ids=input_ids, attention_mask=batch["attention_mask"], encoder_hidden_states=image, is_decoder=True
    ).last_hidden_state
    predicted = batch["attention_mask"][:, 1:].bool()  # each position predicts the next token, if there is one
    logits = decoder.cls(hidden[:, :-1][predicted])
    return cross_entropy(logits.float(), input_ids[:, 1:][predicted], label_smoothing=decoder.label_smoothing)


def train_blip_captioner_on_tars(
    tars: Sequence[Path | str],
    budget: TrainingBudget,
    source: str = "tiny",
    image_size: int = 64,
    batch_size: int = 32,
    learning_rate: float = 5e-4,
    seed: int = 0,
    device: str | None = None,
) -> TrainedCaptioner:
    """A BLIP captioner trained with its language-modelling loss on the pairs of the tars, until the budget is spent."""
    model, preprocessor, metrics = train_built_model(
        build_blip_captioner,
        captioning_loss,
        TRAINED_CAPTIONER,
        tars,
        budget,
        source=source,
        image_size=image_size,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        device=device,
    )
    return TrainedCaptioner(model, preprocessor, metrics)


def save_trained_captioner(trained: TrainedCaptioner, root: Path) -> tuple[str, Path]:
    """`root/<version>`: safetensors weights (the tied LM head once), BlipConfig, preprocessing, tokenizer, metrics."""
    return save_trained_model(trained.model, trained.preprocessor, trained.metrics, root, TRAINED_CAPTIONER)


def load_trained_captioner(
    folder: Path, device: str | None = None
) -> tuple[BlipForConditionalGeneration, PairPreprocessor]:
    """The model (in eval mode, on `device`) and preprocessor of a folder written by `save_trained_captioner`."""
    model, preprocessor, _ = load_trained_model(folder, BlipConfig, BlipForConditionalGeneration, TRAINED_CAPTIONER)
    return model.to(pick_device(device)), preprocessor


def generate_captions(
    model: BlipForConditionalGeneration,
    preprocessor: PairPreprocessor,
    images: Sequence[Image.Image],
    batch_size: int = 32,
    max_new_tokens: int = 20,
    device: str | None = None,
) -> list[str]:
    """One greedy caption per image, in order, without special tokens.

    At most as many new tokens as the decoder has positions left after bos.
    """
    target = pick_device(device)
    model.to(target).eval()
    new_tokens = min(max_new_tokens, model.config.text_config.max_position_embeddings - 1)
    captions: list[str] = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([preprocessor.transform(image) for image in images[start : start + batch_size]])
        with torch.inference_mode(), inference_autocast(target):
            ids = model.generate(
                pixel_values=pixels.to(target), max_new_tokens=new_tokens, do_sample=False, num_beams=1
            )
        captions += [text.strip() for text in preprocessor.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return captions
