"""A reward model as a checkpoint and as a PairScorer: saving, loading, registering, scoring.

The checkpoint is the platform's one format (`ca_platform.models.checkpoints`); its `config.json` holds the
spec and both BLIP configs, so the model is rebuilt from the folder alone (a pretrained backbone folder is
not needed again), and `normalization.json` the reward mean/std that `score_norm` uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import BertTokenizerFast, BlipTextConfig, BlipVisionConfig

from ca_platform.models.checkpoints import CONFIG_FILE, CheckpointError, read_model, register_folder, save_model
from ca_platform.models.devices import inference_autocast, pick_device
from ca_platform.models.preprocessing import PairPreprocessor, to_device
from ca_platform.schemas import REWARD_MODEL
from ca_platform.scoring.reward.model import RewardModel, RewardModelSpec, reward_preprocessor
from ca_platform.scoring.reward.train import TrainedRewardModel

NORMALIZATION_FILE = "normalization.json"
CHECKPOINT_FORMAT = "ca-platform/reward-model/2"


def save_reward_model(trained: TrainedRewardModel, root: Path) -> tuple[str, Path]:
    """Write `root/<version>`: weights, the architecture, preprocessing, normalisation, metrics and tokenizer."""
    config = {
        "format": CHECKPOINT_FORMAT,
        "spec": asdict(trained.spec),
        "vision_config": trained.model.vision.config.to_dict(),
        "text_config": trained.model.text.config.to_dict(),
    }
    return save_model(
        root,
        trained.model,
        kind=REWARD_MODEL,
        config=config,
        preprocessor=reward_preprocessor(trained.spec, trained.tokenizer),
        metrics=trained.metrics,
        documents={NORMALIZATION_FILE: {"mean": trained.metrics["reward_mean"], "std": trained.metrics["reward_std"]}},
    )


@dataclass
class LoadedRewardModel:
    """A checkpoint ready to score: model on its device, preprocessing, normalisation stats and version."""

    model: RewardModel
    preprocessor: PairPreprocessor
    spec: RewardModelSpec
    mean: float
    std: float
    version: str
    metrics: dict[str, Any]
    device: torch.device

    @property
    def tokenizer(self) -> BertTokenizerFast:
        return self.preprocessor.tokenizer


def load_reward_model(folder: Path, device: str | torch.device | None = None) -> LoadedRewardModel:
    """A saved reward model in eval mode on `device` (CUDA when present), from safetensors and local files only."""
    checkpoint = read_model(folder, REWARD_MODEL)
    config = checkpoint.config
    if config.get("format") != CHECKPOINT_FORMAT:
        found = config.get("format")
        raise CheckpointError(f"{folder}: {CONFIG_FILE} is not a {CHECKPOINT_FORMAT} checkpoint ({found!r})")
    spec = RewardModelSpec(**config["spec"])
    model = RewardModel.from_configs(
        BlipVisionConfig.from_dict(config["vision_config"]),
        BlipTextConfig.from_dict(config["text_config"]),
        spec.head_hidden,
    )
    checkpoint.load_into(model)
    normalization = checkpoint.document(NORMALIZATION_FILE)
    target = torch.device(device) if device is not None else pick_device()
    return LoadedRewardModel(
        model=model.to(target),
        preprocessor=checkpoint.preprocessor,
        spec=spec,
        mean=float(normalization["mean"]),
        std=float(normalization["std"]),
        version=checkpoint.version,
        metrics=checkpoint.metrics,
        device=target,
    )


def register_reward_model(source: Path, root: Path) -> tuple[str, Path]:
    """Copy a reward model folder trained elsewhere under `root` as its content version, once it loads."""
    load_reward_model(source, device="cpu")
    return register_folder(source, root)


class RewardScorer:
    """PairScorer for a loaded reward model; raw (unnormalised) rewards, higher is better aligned.

    `prepare` and `collate` are the preprocessor's bound methods, so handing them to DataLoader workers
    pickles the preprocessing alone, never the model.
    """

    name = REWARD_MODEL

    def __init__(self, loaded: LoadedRewardModel) -> None:
        self.loaded = loaded
        self.version = loaded.version
        self.prepare = loaded.preprocessor.prepare
        self.collate = loaded.preprocessor.collate

    @torch.no_grad()
    def score_batch(self, batch: dict[str, Any]) -> torch.Tensor:
        """Rewards [batch], float32 on the CPU; each pair is read against its own image."""
        device = self.loaded.device
        batch = to_device(batch, device)
        with inference_autocast(device):
            rewards = self.loaded.model(
                batch["pixel_values"],
                batch["input_ids"],
                batch["attention_mask"],
                torch.arange(batch["pixel_values"].shape[0], device=device),
            )
        return rewards.float().cpu()

    @torch.no_grad()
    def score_captions(self, image: Image.Image, captions: list[str]) -> list[float]:
        """Rewards of several captions of one image, encoding the image once."""
        device = self.loaded.device
        preprocessor = self.loaded.preprocessor
        encoded = preprocessor.tokenizer(
            captions, padding="longest", truncation=True, max_length=preprocessor.max_length, return_tensors="pt"
        )
        with inference_autocast(device):
            image_embeds = self.loaded.model.encode_images(preprocessor.transform(image)[None].to(device))
            rewards = self.loaded.model.rewards(
                image_embeds,
                torch.zeros(len(captions), dtype=torch.long, device=device),
                encoded["input_ids"].to(device),
                encoded["attention_mask"].to(device),
            )
        return rewards.float().cpu().tolist()
