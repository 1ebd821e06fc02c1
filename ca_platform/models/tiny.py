"""The one tiny-model spec: the CLIP, BLIP and reward-model towers built from configs for tests and the demo.

Small enough to train on a CPU in seconds, with BERT's WordPiece vocabulary (available offline) on the text
side. Every model the platform builds from scratch takes its towers from here, so "tiny" means one thing.
"""

from __future__ import annotations

from typing import Any

from transformers import BlipConfig, PreTrainedTokenizerBase

TINY_WIDTH = 64
TINY_LAYERS = 2
TINY_HEADS = 2
TINY_MAX_TOKENS = 64
PATCH_GRID = 8  # tiny vision towers see the image as 8 x 8 patches, whatever its size


def tiny_vision_tower(image_size: int) -> dict[str, Any]:
    """Vision settings of the tiny models."""
    if image_size % PATCH_GRID:
        raise ValueError(f"image_size {image_size} is not a multiple of the {PATCH_GRID} x {PATCH_GRID} patch grid")
    return {
        "hidden_size": TINY_WIDTH,
        "intermediate_size": 2 * TINY_WIDTH,
        "num_hidden_layers": TINY_LAYERS,
        "num_attention_heads": TINY_HEADS,
        "image_size": image_size,
        "patch_size": image_size // PATCH_GRID,
        "initializer_range": 0.02,  # BLIP's default (1e-10) suits loading weights, not training from scratch
    }


def tiny_text_tower(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Text settings of the tiny models, with the BERT tokenizer's vocabulary and ids."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": TINY_WIDTH,
        "intermediate_size": 2 * TINY_WIDTH,
        "num_hidden_layers": TINY_LAYERS,
        "num_attention_heads": TINY_HEADS,
        "max_position_embeddings": TINY_MAX_TOKENS,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.cls_token_id,
        "eos_token_id": tokenizer.sep_token_id,  # CLIP pools the text at the first eos: BERT's [SEP]
    }


def tiny_blip_text_tower(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The tiny text tower as BLIP's text side: cross-attending to the image (BLIP's `is_decoder` switch)."""
    return {
        **tiny_text_tower(tokenizer),
        "sep_token_id": tokenizer.sep_token_id,
        "encoder_hidden_size": TINY_WIDTH,
        "is_decoder": True,
    }


def tiny_blip_config(tokenizer: PreTrainedTokenizerBase, image_size: int) -> BlipConfig:
    """The tiny BLIP (ITM scorer, captioner and reward-model backbone alike), with the BERT tokenizer's ids."""
    return BlipConfig(
        text_config=tiny_blip_text_tower(tokenizer),
        vision_config=tiny_vision_tower(image_size),
        projection_dim=TINY_WIDTH,
        image_text_hidden_size=TINY_WIDTH,
    )
