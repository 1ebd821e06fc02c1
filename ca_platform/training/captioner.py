"""A BLIP captioner trained on a training-set variant, for captioning evaluation.

The same recipe runs on every variant with the same budget, so differences in CIDEr/BLEU come from the data.
The model is the tiny BLIP captioner or a user's local pretrained one, trained with BLIP's language-modelling
loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

from transformers import BlipConfig, BlipForConditionalGeneration

from ca_platform.models.blip import build_blip_captioner, captioning_loss
from ca_platform.models.checkpoints import load_transformers_model, save_transformers_model
from ca_platform.models.devices import pick_device
from ca_platform.models.preprocessing import PairPreprocessor
from ca_platform.models.training import TrainedModel
from ca_platform.training.tars import TrainingBudget, caption_texts, train_built_model

TRAINED_CAPTIONER = "blip_captioner"


def train_blip_captioner_on_tars(
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
    """A BLIP captioner trained on the pairs of the tars (`pairs` of them, if known) until the budget is spent;
    recap_mix_p's `synthetic_caption_probability` as `train_on_tars` says. A tiny one writes the words of the
    captions it can train with (`build_blip_captioner`)."""
    vocabulary = caption_texts([Path(t) for t in tars]) if source == "tiny" else None
    return train_built_model(
        partial(build_blip_captioner, captions=vocabulary),
        captioning_loss,
        TRAINED_CAPTIONER,
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


def save_trained_captioner(trained: TrainedModel, root: Path) -> tuple[str, Path]:
    """`root/<version>` in the one checkpoint format (the tied LM head once), with the training metrics."""
    return save_transformers_model(root, trained.model, trained.preprocessor, trained.metrics, TRAINED_CAPTIONER)


def load_trained_captioner(
    folder: Path, device: str | None = None
) -> tuple[BlipForConditionalGeneration, PairPreprocessor]:
    """The model (in eval mode, on `device`) and preprocessor of a folder written by `save_trained_captioner`."""
    model, checkpoint = load_transformers_model(folder, TRAINED_CAPTIONER, BlipConfig, BlipForConditionalGeneration)
    return model.to(pick_device(device)), checkpoint.preprocessor
