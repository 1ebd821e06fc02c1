"""CLIP trained on a training-set variant, for retrieval evaluation.

The same recipe runs on every variant (the full pool and each compressed subset) with the same budget, so
differences in retrieval come from the data. The model is the tiny CLIP of the CLIP-score baseline or a
user's local pretrained one, trained with CLIP's symmetric contrastive loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import CLIPConfig, CLIPModel

from ca_platform.models.checkpoints import load_transformers_model, save_transformers_model
from ca_platform.models.clip import build_clip, contrastive_loss
from ca_platform.models.devices import pick_device
from ca_platform.models.preprocessing import PairPreprocessor
from ca_platform.models.training import TrainedModel
from ca_platform.training.tars import TrainingBudget, train_built_model

TRAINED_CLIP = "trained_clip"


def train_clip_on_tars(
    tars: Sequence[Path | str],
    budget: TrainingBudget,
    *,
    pairs: int | None = None,
    source: str = "tiny",
    image_size: int = 64,
    batch_size: int = 32,
    learning_rate: float = 5e-4,
    seed: int = 0,
    device: str | None = None,
    synthetic_caption_probability: float | None = None,
    description: str | None = None,
    excluded_uids: frozenset[str] = frozenset(),
) -> TrainedModel:
    """A CLIP trained on the pairs of the tars (`pairs` of them, if known) until the budget is spent;
    recap_mix_p's `synthetic_caption_probability` as `train_on_tars` says."""
    return train_built_model(
        build_clip,
        contrastive_loss,
        TRAINED_CLIP,
        tars,
        budget,
        pairs=pairs,
        source=source,
        image_size=image_size,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        device=device,
        synthetic_caption_probability=synthetic_caption_probability,
        description=description,
        excluded_uids=excluded_uids,
    )


def save_trained_clip(trained: TrainedModel, root: Path) -> tuple[str, Path]:
    """`root/<version>` in the one checkpoint format, with the training metrics."""
    return save_transformers_model(root, trained.model, trained.preprocessor, trained.metrics, TRAINED_CLIP)


def load_trained_clip(folder: Path, device: str | None = None) -> tuple[CLIPModel, PairPreprocessor]:
    """The model (in eval mode, on `device`) and preprocessor of a folder written by `save_trained_clip`."""
    model, checkpoint = load_transformers_model(folder, TRAINED_CLIP, CLIPConfig, CLIPModel)
    return model.to(pick_device(device)), checkpoint.preprocessor
