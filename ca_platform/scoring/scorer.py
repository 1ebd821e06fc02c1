"""The interface every image-caption scorer implements: the reward model and the CLIP/BLIP baselines.

Preparation (decode, preprocess, tokenize) runs in DataLoader worker processes, so `prepare` and `collate`
must be picklable and CPU-only; `score_batch` runs in the main process on the scorer's device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self

import torch
from PIL import Image
from transformers import PretrainedConfig, PreTrainedModel

from ca_platform.models.checkpoints import content_version, load_transformers_model
from ca_platform.models.devices import inference_autocast, pick_device
from ca_platform.models.preprocessing import PairPreprocessor, to_device


class PairScorer(Protocol):
    name: str  # one of schemas.SCORERS
    version: str  # content hash of the weights: scores of different versions live side by side

    def prepare(self, image: Image.Image, caption: str) -> dict[str, torch.Tensor]:
        """One pair as tensors (CPU), ready for `collate`."""
        ...

    def collate(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """A batch from prepared samples (CPU)."""
        ...

    def score_batch(self, batch: dict[str, Any]) -> torch.Tensor:
        """Scores of a batch, float32 on the CPU, shape [batch]; higher means better aligned."""
        ...


class ModelPairScorer(ABC):
    """A PairScorer around a transformers model and its PairPreprocessor; subclasses say which model it is
    and how a batch scores.

    `prepare` and `collate` are the preprocessor's own bound methods, not the scorer's, so DataLoader
    workers receive the small preprocessor and never the model.
    """

    name: ClassVar[str]  # the kind of checkpoint it loads, and its scores' `scorer`
    config_class: ClassVar[type[PretrainedConfig]]
    model_class: ClassVar[type[PreTrainedModel]]

    def __init__(
        self,
        model: PreTrainedModel,
        preprocessor: PairPreprocessor,
        version: str,
        device: str | torch.device | None = None,
    ) -> None:
        self.device = pick_device(str(device) if device is not None else None)
        self.model = model.to(self.device).eval()
        self.preprocessor = preprocessor
        self.version = version
        self.prepare = preprocessor.prepare
        self.collate = preprocessor.collate

    @staticmethod
    @abstractmethod
    def build(source: str, image_size: int = 64) -> tuple[PreTrainedModel, PairPreprocessor]:
        """A fresh tiny model, or a user's pretrained one from a local folder, with its preprocessor."""

    @abstractmethod
    def scores_on_device(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores [batch] of a batch already on the scorer's device."""

    @classmethod
    def from_pretrained_dir(cls, path: Path | str, device: str | None = None) -> Self:
        """A user's local pretrained model (save_pretrained of the model and its tokenizer), by content hash."""
        model, preprocessor = cls.build(str(path))
        return cls(model, preprocessor, content_version(Path(path)), device)

    @classmethod
    def from_checkpoint(cls, folder: Path, device: str | None = None) -> Self:
        """A platform checkpoint of this kind; its version is the folder's content hash."""
        model, checkpoint = load_transformers_model(folder, cls.name, cls.config_class, cls.model_class)
        return cls(model, checkpoint.preprocessor, checkpoint.version, device)

    def score_batch(self, batch: dict[str, Any]) -> torch.Tensor:
        with torch.inference_mode(), inference_autocast(self.device):
            scores = self.scores_on_device(to_device(batch, self.device))
        return scores.float().cpu()
