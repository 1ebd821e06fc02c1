"""BLIP through transformers: the ITM model and the captioner, built tiny or from a local folder, their losses.

ITM cross-attends from the caption to the image, so it can judge details that a CLIP embedding averages
away; the captioner's decoder reads a caption after a beginning-of-sequence token and cross-attends to the
image. transformers' `generate` replaces the first input id with `text_config.bos_token_id` but `forward`
does not, so the captioning loss does the same replacement itself: for the tiny model bos is BERT's [CLS]
(what the tokenizer puts first anyway), for a pretrained Salesforce BLIP it is [DEC].
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

import torch
from PIL import Image
from torch.nn.functional import cross_entropy
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, PreTrainedModel

from ca_platform.models.devices import inference_autocast, pick_device
from ca_platform.models.images import ImageTransform
from ca_platform.models.preprocessing import PairPreprocessor, Prepared, local_model_dir, pretrained_preprocessor
from ca_platform.models.tiny import TINY_MAX_TOKENS, tiny_blip_config
from ca_platform.models.tokenization import bert_tokenizer, caption_vocabulary_tokenizer

CONTRASTIVE_TEMPERATURE = 0.07  # BLIP's initial ITC temperature
PRETRAINED_MAX_TOKENS = 64  # BLIP's text tower allows 512; web captions that long are noise

Model = TypeVar("Model", bound=PreTrainedModel)


def _build_blip(
    model_class: type[Model], source: str, image_size: int, captions: Iterable[str] | None = None
) -> tuple[Model, PairPreprocessor]:
    """A fresh tiny BLIP of `model_class` (BERT WordPiece text side) or a pretrained one from a local folder.

    The tiny config's text ids follow the BERT tokenizer: bos = [CLS], eos and sep = [SEP], pad = [PAD]; with
    `captions` (what it will train on), its vocabulary is cut down to theirs (`caption_vocabulary_tokenizer`).
    `image_size` applies to the tiny model; a pretrained model keeps the resolution and vocabulary it has.
    """
    if source == "tiny":
        tokenizer = (
            bert_tokenizer(TINY_MAX_TOKENS)
            if captions is None
            else caption_vocabulary_tokenizer(captions, TINY_MAX_TOKENS)
        )
        model = model_class(tiny_blip_config(tokenizer, image_size))
        return model, PairPreprocessor(ImageTransform(image_size), tokenizer, TINY_MAX_TOKENS)
    folder = local_model_dir(source)
    model = model_class.from_pretrained(str(folder), use_safetensors=True, dtype=torch.float32)
    max_tokens = min(model.config.text_config.max_position_embeddings, PRETRAINED_MAX_TOKENS)
    return model, pretrained_preprocessor(folder, model.config.vision_config.image_size, max_tokens)


def build_blip_itm(source: str = "tiny", image_size: int = 64) -> tuple[BlipForImageTextRetrieval, PairPreprocessor]:
    """A BLIP image-text matching model: tiny from config or a local pretrained folder."""
    return _build_blip(BlipForImageTextRetrieval, source, image_size)


def build_blip_captioner(
    source: str = "tiny", image_size: int = 64, captions: Iterable[str] | None = None
) -> tuple[BlipForConditionalGeneration, PairPreprocessor]:
    """A BLIP captioner: tiny from config (generation stops at the [SEP] ending every training caption; with
    `captions`, writing only their words, which makes its training steps several times faster) or a local
    pretrained folder."""
    return _build_blip(BlipForConditionalGeneration, source, image_size, captions)


def match_probability(model: BlipForImageTextRetrieval, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """P(match) from BLIP's ITM head: softmax over its two logits, the "match" one."""
    return model(**batch, use_itm_head=True).itm_score.float().softmax(dim=-1)[:, 1]


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
