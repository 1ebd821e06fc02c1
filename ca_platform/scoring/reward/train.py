"""Training the reward model on human caption rankings, and refusing a model that learnt nothing.

Training minimises the pairwise (Bradley-Terry) loss over the pairs each human ranking implies, through the
platform's one training loop. That loss compares captions of one image only, so it leaves every image a free
offset: adding a constant to all rewards of one image changes nothing. A top-k cut over a pool compares
rewards across images, where those offsets decide what is kept, so the default recipe ("cross_image") also
pins the offsets (see `calibration_loss`). A model whose rewards do not separate captions has learnt nothing
and is refused rather than saved (RewardCollapseError).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch
from PIL import Image
from torch.nn import functional
from transformers import BertTokenizerFast

from ca_platform.models.devices import inference_autocast, pick_device
from ca_platform.models.images import ImageTransform
from ca_platform.models.tokenization import bert_tokenizer
from ca_platform.models.training import adamw, shuffled_index_batches, train_on_batches
from ca_platform.preferences.pairs import (
    PreferenceItem,
    PreferencePair,
    TiePolicy,
    cross_image_accuracy,
    pairwise_accuracy,
    preference_pairs,
    top_and_bottom,
)
from ca_platform.scoring.reward.model import RewardModel, RewardModelSpec, build_reward_model


def pairwise_loss(rewards: torch.Tensor, pairs: Sequence[PreferencePair]) -> torch.Tensor:
    """Mean Bradley-Terry loss -(t log σ(d) + (1-t) log σ(-d)), d = r_better - r_worse (t=1: -log σ(d)).

    Pair indices point into `rewards`. Equal rewards cost ln 2 whatever the target.
    """
    if not pairs:
        raise ValueError("no preference pairs to compute a loss over")
    device = rewards.device
    better = torch.tensor([pair.better for pair in pairs], device=device)
    worse = torch.tensor([pair.worse for pair in pairs], device=device)
    target = torch.tensor([pair.target for pair in pairs], dtype=torch.float32, device=device)
    difference = rewards.float()[better] - rewards.float()[worse]
    return -(target * functional.logsigmoid(difference) + (1 - target) * functional.logsigmoid(-difference)).mean()


Calibration = Literal["within_image", "cross_image"]


def cross_image_pairs(rankings: Sequence[Sequence[int]]) -> list[PreferencePair]:
    """(top-ranked caption of image A) over (bottom-ranked caption of image B) for every two images A != B.

    Indices point into the captions of all images laid end to end. The order is what the data implies across
    images wherever an image's best caption is better than any other image's worst one, which holds when every
    ranked set spans good and bad captions (as Compress & Align's do: each image's captions come from several
    sources). Tied tops or bottoms all take part.
    """
    tops, bottoms, offset = [], [], 0
    for ranking in rankings:
        top, bottom = top_and_bottom(ranking)
        tops.append([offset + i for i in top])
        bottoms.append([offset + i for i in bottom])
        offset += len(ranking)
    return [
        PreferencePair(top, bottom, 1.0)
        for a, image_tops in enumerate(tops)
        for b, image_bottoms in enumerate(bottoms)
        if a != b
        for top in image_tops
        for bottom in image_bottoms
    ]


def image_mean_anchor(rewards: torch.Tensor, image_index: torch.Tensor, images: int) -> torch.Tensor:
    """Mean over images of (the image's mean reward)^2: pulls every image's offset to one shared zero."""
    sums = torch.zeros(images, device=rewards.device).index_add(0, image_index, rewards.float())
    counts = torch.bincount(image_index, minlength=images).clamp(min=1)
    return ((sums / counts) ** 2).mean()


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings and the thresholds below which a trained model counts as collapsed."""

    epochs: int = 5
    learning_rate: float = 1e-4
    images_per_batch: int = 8
    tie_policy: TiePolicy = "skip"
    seed: int = 0
    device: str | None = None
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0  # clip gradients: pairwise losses spike when a new feature kicks in
    collapse_loss_tolerance: float = 0.01  # final epoch's loss this close to ln 2 (skip policy): nothing learnt
    collapse_min_reward_std: float = 1e-4  # rewards spread less than this across captions: constant reward
    # "cross_image" (default): rewards comparable across images, for a cut over a pool (`calibration_loss`);
    # "within_image": the pairwise loss alone, as ImageReward trains (rewards compare captions of one image).
    calibration: Calibration = "cross_image"
    anchor_weight: float = 0.1  # weight of image_mean_anchor
    cross_image_weight: float = 0.3  # weight of the loss over cross_image_pairs

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.images_per_batch < 1:
            raise ValueError(f"epochs and images_per_batch must be positive: {self}")
        if self.tie_policy not in ("skip", "soft"):
            raise ValueError(f"tie_policy must be 'skip' or 'soft', got {self.tie_policy!r}")
        if self.calibration not in get_args(Calibration):
            raise ValueError(f"calibration must be one of {get_args(Calibration)}, got {self.calibration!r}")
        if self.anchor_weight < 0 or self.cross_image_weight < 0:
            raise ValueError(f"calibration weights must be non-negative: {self}")


def calibration_loss(
    rewards: torch.Tensor, rankings: Sequence[Sequence[int]], image_index: torch.Tensor, config: TrainConfig
) -> torch.Tensor:
    """What "cross_image" adds to the pairwise loss of a batch: the image-mean anchor (no image gets an offset
    of its own) plus the Bradley-Terry loss over cross_image_pairs (an image's best caption outranks another
    image's worst). Zero for "within_image"."""
    if config.calibration == "within_image":
        return rewards.new_zeros(())
    total = config.anchor_weight * image_mean_anchor(rewards, image_index, len(rankings))
    pairs = cross_image_pairs(rankings)
    if pairs and config.cross_image_weight > 0:
        total = total + config.cross_image_weight * pairwise_loss(rewards, pairs)
    return total


class RewardCollapseError(RuntimeError):
    """Training ended with a model that does not separate captions; `metrics` says how it ended."""

    def __init__(self, message: str, metrics: dict[str, Any]) -> None:
        super().__init__(message)
        self.metrics = metrics


@dataclass
class TrainedRewardModel:
    """What training hands to save_reward_model: the model in eval mode, its tokenizer, spec and metrics."""

    model: RewardModel
    tokenizer: BertTokenizerFast
    spec: RewardModelSpec
    metrics: dict[str, Any] = field(default_factory=dict)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load_pixels(items: Sequence[PreferenceItem], transform: ImageTransform) -> torch.Tensor:
    tensors = []
    for item in items:
        with Image.open(item.image) as image:
            tensors.append(transform(image))
    return torch.stack(tensors)


def _caption_batch(
    items: Sequence[PreferenceItem], tokenizer: BertTokenizerFast, max_length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All captions of the items, padded to the longest, with the index of each caption's image."""
    captions = [caption for item in items for caption in item.captions]
    encoded = tokenizer(captions, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    image_index = torch.tensor([k for k, item in enumerate(items) for _ in item.captions], device=device)
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device), image_index


@torch.no_grad()
def _score_items(
    model: RewardModel,
    tokenizer: BertTokenizerFast,
    transform: ImageTransform,
    items: Sequence[PreferenceItem],
    max_length: int,
    batch_size: int,
    device: torch.device,
) -> list[list[float]]:
    """Rewards of every caption of every item, one list per item."""
    model.eval()
    scores: list[list[float]] = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        input_ids, attention_mask, image_index = _caption_batch(batch, tokenizer, max_length, device)
        with inference_autocast(device):
            rewards = model(_load_pixels(batch, transform).to(device), input_ids, attention_mask, image_index)
        flat = rewards.float().cpu().tolist()
        for item in batch:
            scores.append(flat[: len(item.captions)])
            flat = flat[len(item.captions) :]
    return scores


def offset_spread(scores: Sequence[Sequence[float]]) -> dict[str, float | None]:
    """How far images' offsets spread next to captions within an image: the standard deviation of the per-image
    mean reward, and the root mean within-image variance. An offset spread above the caption spread means a
    cut across images is decided by which image a caption belongs to more than by the caption."""
    rows = [np.asarray(row, dtype=np.float64) for row in scores if len(row)]
    if len(rows) < 2:
        return {"image_offset_std": None, "within_image_std": None}
    return {
        "image_offset_std": float(np.std([row.mean() for row in rows])),
        "within_image_std": float(np.sqrt(np.mean([row.var() for row in rows]))),
    }


def _collapse_reasons(metrics: dict[str, Any], config: TrainConfig) -> list[str]:
    reasons = []
    if metrics["reward_std"] < config.collapse_min_reward_std:
        reasons.append(f"rewards are constant across captions (std {metrics['reward_std']:.3g})")
    if config.tie_policy == "skip" and abs(metrics["loss_last"] - math.log(2)) <= config.collapse_loss_tolerance:
        reasons.append(
            f"final training loss {metrics['loss_last']:.4f} is ln 2 = {math.log(2):.4f}, no preference learnt"
        )
    return reasons


def train_reward_model(
    train_items: Sequence[PreferenceItem],
    heldout_items: Sequence[PreferenceItem],
    spec: RewardModelSpec,
    config: TrainConfig,
) -> TrainedRewardModel:
    """Fit a reward model to human caption rankings; measure it on held-out images; refuse a collapsed one.

    Items' `image` fields are local image files. Each batch encodes its images once and reads all their
    captions against them. Metrics: held-out pairwise accuracy (human ties excluded), the reward mean/std
    over held-out captions (train captions when none are held out) for normalising scores later, and the
    per-epoch mean loss curve. Raises RewardCollapseError when the model did not learn to separate captions.
    """
    device = pick_device(config.device)
    _seed_everything(config.seed)
    tokenizer = bert_tokenizer()
    model = build_reward_model(spec, tokenizer).to(device)
    transform = ImageTransform(spec.image_size)

    trainable = [(item, preference_pairs(item.ranking, config.tie_policy)) for item in train_items]
    trainable = [(item, pairs) for item, pairs in trainable if pairs]
    if not trainable:
        raise ValueError(f"no preference pairs to train on under tie_policy={config.tie_policy!r}")
    optimizer = adamw(model.parameters(), config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    batches = (
        [trainable[k] for k in indices]
        for indices in shuffled_index_batches(len(trainable), config.epochs, config.images_per_batch, generator)
    )
    pairs_per_step: list[int] = []
    pairwise_losses: list[float] = []  # the within-image loss of each step: the loss curve and the collapse test

    def loss(batch: list[tuple[PreferenceItem, list[PreferencePair]]]) -> torch.Tensor:
        items = [item for item, _ in batch]
        pairs, offset = [], 0
        for item, item_pairs in batch:
            pairs += [PreferencePair(p.better + offset, p.worse + offset, p.target) for p in item_pairs]
            offset += len(item.captions)
        pairs_per_step.append(len(pairs))
        input_ids, attention_mask, image_index = _caption_batch(items, tokenizer, spec.max_text_length, device)
        rewards = model(_load_pixels(items, transform).to(device), input_ids, attention_mask, image_index)
        within = pairwise_loss(rewards, pairs)
        pairwise_losses.append(float(within.detach()))
        return within + calibration_loss(rewards, [item.ranking for item in items], image_index, config)

    train_on_batches(
        model,
        optimizer,
        batches,
        loss,
        device,
        max_grad_norm=config.max_grad_norm,
        description="reward model: training on preferences",
        total_samples=config.epochs * len(trainable),
    )
    losses = pairwise_losses
    per_epoch = math.ceil(len(trainable) / config.images_per_batch)  # steps; no batch is skipped
    loss_curve = [  # the mean loss per preference pair of each epoch
        sum(step * pairs for step, pairs in zip(losses[s : s + per_epoch], pairs_per_step[s : s + per_epoch]))
        / sum(pairs_per_step[s : s + per_epoch])
        for s in range(0, len(losses), per_epoch)
    ]

    batch_size = config.images_per_batch
    heldout_scores = _score_items(model, tokenizer, transform, heldout_items, spec.max_text_length, batch_size, device)
    accuracy, heldout_pairs = pairwise_accuracy(heldout_items, heldout_scores)
    across, _ = cross_image_accuracy(heldout_items, heldout_scores)
    if heldout_items:
        reference = [reward for scores in heldout_scores for reward in scores]
    else:
        train_scores = _score_items(model, tokenizer, transform, train_items, spec.max_text_length, batch_size, device)
        reference = [reward for scores in train_scores for reward in scores]
    metrics: dict[str, Any] = {
        "heldout_accuracy": None if math.isnan(accuracy) else accuracy,
        "heldout_pairs": heldout_pairs,
        "heldout_cross_image_accuracy": None if math.isnan(across) else across,
        **offset_spread(heldout_scores),
        "calibration": config.calibration,
        "heldout_images": len(heldout_items),
        "train_images": len(trainable),
        "train_pairs": sum(len(pairs) for _, pairs in trainable),
        "epochs": config.epochs,
        "loss_curve": loss_curve,
        "loss_first": loss_curve[0],
        "loss_last": loss_curve[-1],
        "reward_mean": statistics.fmean(reference),
        "reward_std": statistics.pstdev(reference),
        "normalization_source": "heldout" if heldout_items else "train",
        "train_config": asdict(config),
    }
    reasons = _collapse_reasons(metrics, config)
    if reasons:
        raise RewardCollapseError(f"reward model collapsed: {'; '.join(reasons)}", metrics)
    model.eval()
    return TrainedRewardModel(model=model, tokenizer=tokenizer, spec=spec, metrics=metrics)
