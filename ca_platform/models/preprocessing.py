"""What a model sees of a pair: the image transform and tokenizer, apart from the model itself.

DataLoader workers receive a `PairPreprocessor`, never the model, so it stays small to pickle and CPU-only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ca_platform.models.images import CLIP_MEAN, CLIP_STD, ImageTransform

HF_PREPROCESSOR_FILE = "preprocessor_config.json"

Prepared = dict[str, torch.Tensor]


@dataclass(frozen=True, eq=False)
class PairPreprocessor:
    """Image transform plus tokenizer: a model's `prepare`/`collate` without the model."""

    transform: ImageTransform
    tokenizer: PreTrainedTokenizerBase
    max_length: int

    def prepare(self, image: Image.Image, caption: str) -> Prepared:
        tokens = self.tokenizer(caption, truncation=True, max_length=self.max_length)
        return {
            "pixel_values": self.transform(image),
            "input_ids": torch.tensor(tokens["input_ids"], dtype=torch.long),
            "attention_mask": torch.tensor(tokens["attention_mask"], dtype=torch.long),
        }

    def collate(self, samples: list[Prepared]) -> dict[str, torch.Tensor]:
        """Stacked images and right-padded token ids (padding masked out)."""
        length = max(s["input_ids"].numel() for s in samples)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, sample in enumerate(samples):
            size = sample["input_ids"].numel()
            input_ids[row, :size] = sample["input_ids"]
            attention_mask[row, :size] = sample["attention_mask"]
        return {
            "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
        }

    def settings(self) -> dict[str, Any]:
        """What a checkpoint records to rebuild the preprocessing (the tokenizer travels as its own files)."""
        return {
            "image_size": self.transform.size,
            "mean": list(self.transform.mean),
            "std": list(self.transform.std),
            "max_length": self.max_length,
        }

    @classmethod
    def from_settings(cls, settings: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> PairPreprocessor:
        transform = ImageTransform(settings["image_size"], tuple(settings["mean"]), tuple(settings["std"]))
        return cls(transform, tokenizer, settings["max_length"])


def pretrained_preprocessor(folder: Path, image_size: int, max_length: int) -> PairPreprocessor:
    """The preprocessor of a local pretrained model folder: its tokenizer, and its image mean/std if it has them."""
    mean, std = CLIP_MEAN, CLIP_STD
    if (folder / HF_PREPROCESSOR_FILE).is_file():
        settings = json.loads((folder / HF_PREPROCESSOR_FILE).read_text())
        mean = tuple(settings.get("image_mean", mean))
        std = tuple(settings.get("image_std", std))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return PairPreprocessor(ImageTransform(image_size, mean, std), tokenizer, max_length)


def local_model_dir(source: str) -> Path:
    """`source` as an existing local folder; hub names are refused because nothing is downloaded."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise ValueError(f"model source {source!r} is neither 'tiny' nor a local folder (nothing is downloaded)")
    return folder


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
