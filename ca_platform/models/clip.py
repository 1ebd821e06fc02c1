"""CLIP through transformers' `CLIPModel`: built tiny or from a local folder, its loss, and its embeddings.

The CLIP-score baseline and the CLIPs trained on each training-set variant are this one model; they differ
only in what they are trained on and how they are used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from ca_platform.models.devices import inference_autocast, pick_device
from ca_platform.models.images import ImageTransform
from ca_platform.models.preprocessing import PairPreprocessor, local_model_dir, pretrained_preprocessor
from ca_platform.models.tiny import TINY_MAX_TOKENS, TINY_WIDTH, tiny_text_tower, tiny_vision_tower
from ca_platform.models.tokenization import bert_tokenizer

CONFIG_CLASS, MODEL_CLASS = CLIPConfig, CLIPModel


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


def contrastive_loss(model: CLIPModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over in-batch pairs, scaled by its logit scale."""
    return model(**batch, return_loss=True).loss


def clip_similarity(model: CLIPModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cosine similarity of each pair's normalised image and text embeddings: DataComp's CLIP score."""
    image = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    text = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
    return torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1)


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
