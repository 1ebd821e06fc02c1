"""The Compress & Align reward model: ImageReward's recipe with the roles swapped.

ImageReward fixes a prompt and ranks generated images; here the image is fixed and people rank several
captions of it. A BLIP vision transformer encodes each image once, a BLIP text encoder reads each caption
while cross-attending to that image's tokens, and an MLP on the caption's first ([CLS]) token gives a
scalar reward. Training minimises the pairwise (Bradley-Terry) loss over the pairs each human ranking
implies, so rewards only carry meaning as differences between captions: a model whose rewards do not
separate captions has learnt nothing and is refused rather than saved (RewardCollapseError).
"""

from __future__ import annotations

import math
import random
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipTextConfig,
    BlipTextModel,
    BlipVisionConfig,
    BlipVisionModel,
)

from ca_platform.models.checkpoints import (
    WEIGHTS_FILE,
    CheckpointError,
    content_version,
    read_json,
    read_weights,
    register_folder,
    write_checkpoint,
)
from ca_platform.models.devices import inference_autocast, pick_device
from ca_platform.models.images import ImageTransform
from ca_platform.models.tokenization import bert_tokenizer, minilm_folder
from ca_platform.preferences.pairs import PreferenceItem, PreferencePair, TiePolicy, pairwise_accuracy, preference_pairs
from ca_platform.schemas import REWARD_MODEL

CONFIG_FILE = "config.json"
NORMALIZATION_FILE = "normalization.json"
METRICS_FILE = "metrics.json"
CHECKPOINT_FORMAT = "ca-platform/reward-model/1"

# Pretrained BLIP classes a backbone folder may hold, and the attribute holding the text encoder whose
# layers cross-attend to the image (BlipModel's text model does too; its pooler is dropped).
BACKBONE_TEXT_ENCODERS = {
    "BlipForImageTextRetrieval": "text_encoder",
    "BlipForQuestionAnswering": "text_encoder",
    "BlipModel": "text_model",
}


@dataclass(frozen=True)
class RewardModelSpec:
    """Architecture of a reward model.

    `backbone` is "tiny" (a BLIP built from config, small enough to train on a CPU in seconds) or the path
    of a local pretrained BLIP folder (save_pretrained of BlipForImageTextRetrieval, BlipForQuestionAnswering
    or BlipModel). `text_init="minilm"` builds the tiny backbone's text encoder in MiniLM's shape (384 wide,
    6 layers, 12 heads) and starts it from MiniLM's weights; its cross-attention starts random.
    """

    backbone: str = "tiny"
    image_size: int = 64
    max_text_length: int = 40
    freeze_fraction: float = 0.0
    head_hidden: int = 128
    text_init: Literal["random", "minilm"] = "random"

    def __post_init__(self) -> None:
        if not 0.0 <= self.freeze_fraction <= 1.0:
            raise ValueError(f"freeze_fraction must be in [0, 1], got {self.freeze_fraction}")
        if self.text_init not in ("random", "minilm"):
            raise ValueError(f"text_init must be 'random' or 'minilm', got {self.text_init!r}")
        if self.text_init == "minilm" and self.backbone != "tiny":
            raise ValueError("text_init='minilm' applies to the from-config backbone 'tiny' only")
        if self.max_text_length < 2 or self.head_hidden < 1 or self.image_size < 1:
            raise ValueError(f"invalid sizes in {self}")


class RewardModel(nn.Module):
    """BLIP vision encoder + image-grounded BLIP text encoder + MLP head: one scalar per (image, caption)."""

    def __init__(self, vision: BlipVisionModel, text: BlipTextModel, head_hidden: int) -> None:
        super().__init__()
        if not text.config.is_decoder:
            raise ValueError("the text encoder has no cross-attention layers (its config says is_decoder=False)")
        if text.config.encoder_hidden_size != vision.config.hidden_size:
            raise ValueError(
                f"text cross-attention expects width {text.config.encoder_hidden_size}, "
                f"the vision encoder gives {vision.config.hidden_size}"
            )
        text.pooler = None
        self.vision = vision
        self.text = text
        self.head = nn.Sequential(nn.Linear(text.config.hidden_size, head_hidden), nn.GELU(), nn.Linear(head_hidden, 1))
        # A zero last layer gives every caption the same reward before training, so any spread between
        # captions is learnt, and a model that learns nothing shows up as constant rewards.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    @classmethod
    def from_configs(
        cls, vision_config: BlipVisionConfig, text_config: BlipTextConfig, head_hidden: int
    ) -> RewardModel:
        """A randomly initialised model of the given architecture (weights are loaded afterwards)."""
        return cls(BlipVisionModel(vision_config), BlipTextModel(text_config, add_pooling_layer=False), head_hidden)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image token embeddings [images, tokens, width]; computed once per image, shared by its captions."""
        return self.vision(pixel_values=pixel_values).last_hidden_state

    def rewards(
        self,
        image_embeds: torch.Tensor,
        image_index: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Reward of each caption [captions]; caption m is read against image `image_index[m]`."""
        image_states = image_embeds[image_index]
        image_mask = torch.ones(image_states.shape[:2], dtype=torch.long, device=image_states.device)
        text_states = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_states,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        return self.head(text_states[:, 0, :]).squeeze(-1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_index: torch.Tensor,
    ) -> torch.Tensor:
        """Rewards [captions] for captions batched with their images; see `rewards`."""
        return self.rewards(self.encode_images(pixel_values), image_index, input_ids, attention_mask)


def _tiny_text_config(spec: RewardModelSpec, tokenizer: BertTokenizerFast, encoder_width: int) -> BlipTextConfig:
    common = {
        "vocab_size": len(tokenizer),
        "encoder_hidden_size": encoder_width,
        "pad_token_id": tokenizer.pad_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "bos_token_id": None,
        "is_decoder": True,  # BLIP's switch for the cross-attention layers; masks stay bidirectional
    }
    if spec.text_init == "minilm":
        minilm = read_json(minilm_folder(), "config.json")
        return BlipTextConfig(
            hidden_size=minilm["hidden_size"],
            num_hidden_layers=minilm["num_hidden_layers"],
            num_attention_heads=minilm["num_attention_heads"],
            intermediate_size=minilm["intermediate_size"],
            max_position_embeddings=minilm["max_position_embeddings"],
            hidden_act=minilm["hidden_act"],
            layer_norm_eps=minilm["layer_norm_eps"],
            **common,
        )
    return BlipTextConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=spec.max_text_length,
        **common,
    )


def _copy_minilm_weights(text: BlipTextModel) -> None:
    """Start BLIP's text self-attention, feed-forward and embeddings from MiniLM (cross-attention stays random).

    BERT adds a token-type embedding that BLIP lacks; every caption is token type 0, so that row is folded
    into the position embeddings, which makes the text encoder compute exactly MiniLM's function when no
    image is attended to.
    """
    minilm = load_file(str(minilm_folder() / WEIGHTS_FILE))
    own = text.state_dict()
    copied = {}
    for name, tensor in own.items():
        if ".crossattention." in name:
            continue
        source = minilm[name]
        if name == "embeddings.position_embeddings.weight":
            source = source + minilm["embeddings.token_type_embeddings.weight"][0]
        if source.shape != tensor.shape:
            raise ValueError(f"MiniLM's {name} has shape {tuple(source.shape)}, BLIP's {tuple(tensor.shape)}")
        copied[name] = source
    text.load_state_dict(copied, strict=False)


def _pretrained_backbone(spec: RewardModelSpec) -> tuple[BlipVisionModel, BlipTextModel]:
    folder = Path(spec.backbone)
    if not (folder / CONFIG_FILE).is_file():
        raise ValueError(f"backbone {spec.backbone!r} is neither 'tiny' nor a local folder with {CONFIG_FILE}")
    config = BlipConfig.from_pretrained(folder, local_files_only=True)
    architectures = [name for name in (config.architectures or []) if name in BACKBONE_TEXT_ENCODERS]
    if not architectures:
        raise ValueError(
            f"{folder}: architectures {config.architectures} hold no supported BLIP ({sorted(BACKBONE_TEXT_ENCODERS)})"
        )
    model_class = getattr(transformers, architectures[0])
    pretrained = model_class.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    return pretrained.vision_model, getattr(pretrained, BACKBONE_TEXT_ENCODERS[architectures[0]])


def _check_compatible(model: RewardModel, spec: RewardModelSpec, tokenizer: BertTokenizerFast) -> None:
    vision, text = model.vision.config, model.text.config
    if vision.image_size != spec.image_size:
        raise ValueError(f"the vision encoder takes {vision.image_size}px images, the spec says {spec.image_size}")
    if text.max_position_embeddings < spec.max_text_length:
        raise ValueError(
            f"max_text_length {spec.max_text_length} exceeds the text encoder's {text.max_position_embeddings}"
        )
    if text.vocab_size < len(tokenizer):
        raise ValueError(f"the text encoder knows {text.vocab_size} tokens, the tokenizer has {len(tokenizer)}")


def freeze_layers(model: RewardModel, fraction: float) -> None:
    """Freeze embeddings plus the first `fraction` of vision and text layers (ImageReward's fix_rate)."""
    if fraction <= 0:
        return
    for embeddings in (model.vision.embeddings, model.text.embeddings):
        embeddings.requires_grad_(False)
    for layers in (model.vision.encoder.layers, model.text.encoder.layer):
        for layer in layers[: int(fraction * len(layers))]:
            layer.requires_grad_(False)


def build_reward_model(spec: RewardModelSpec, tokenizer: BertTokenizerFast) -> RewardModel:
    """A reward model ready to train: backbone from config or a local pretrained BLIP, layers frozen per spec."""
    if spec.backbone == "tiny":
        if spec.image_size % 16:
            raise ValueError(f"the tiny backbone takes 16px patches; image_size {spec.image_size} is not a multiple")
        vision_config = BlipVisionConfig(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=spec.image_size,
            patch_size=16,
            initializer_range=0.02,  # BLIP's default (1e-10) suits loading weights, not training from scratch
        )
        text_config = _tiny_text_config(spec, tokenizer, vision_config.hidden_size)
        model = RewardModel.from_configs(vision_config, text_config, spec.head_hidden)
        if spec.text_init == "minilm":
            _copy_minilm_weights(model.text)
    else:
        vision, text = _pretrained_backbone(spec)
        model = RewardModel(vision, text, spec.head_hidden)
    _check_compatible(model, spec, tokenizer)
    freeze_layers(model, spec.freeze_fraction)
    return model


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

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.images_per_batch < 1:
            raise ValueError(f"epochs and images_per_batch must be positive: {self}")
        if self.tie_policy not in ("skip", "soft"):
            raise ValueError(f"tie_policy must be 'skip' or 'soft', got {self.tie_policy!r}")


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
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    loss_curve = []
    for _ in range(config.epochs):
        model.train()
        order = torch.randperm(len(trainable), generator=generator).tolist()
        epoch_loss, epoch_pairs = 0.0, 0
        for start in range(0, len(order), config.images_per_batch):
            batch = [trainable[k] for k in order[start : start + config.images_per_batch]]
            items = [item for item, _ in batch]
            pairs, offset = [], 0
            for item, item_pairs in batch:
                pairs += [PreferencePair(p.better + offset, p.worse + offset, p.target) for p in item_pairs]
                offset += len(item.captions)
            input_ids, attention_mask, image_index = _caption_batch(items, tokenizer, spec.max_text_length, device)
            with inference_autocast(device):  # the same bf16-on-CUDA policy as scoring
                rewards = model(_load_pixels(items, transform).to(device), input_ids, attention_mask, image_index)
            loss = pairwise_loss(rewards, pairs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            epoch_loss += loss.item() * len(pairs)
            epoch_pairs += len(pairs)
        loss_curve.append(epoch_loss / epoch_pairs)

    batch_size = config.images_per_batch
    heldout_scores = _score_items(model, tokenizer, transform, heldout_items, spec.max_text_length, batch_size, device)
    accuracy, heldout_pairs = pairwise_accuracy(heldout_items, heldout_scores)
    if heldout_items:
        reference = [reward for scores in heldout_scores for reward in scores]
    else:
        train_scores = _score_items(model, tokenizer, transform, train_items, spec.max_text_length, batch_size, device)
        reference = [reward for scores in train_scores for reward in scores]
    metrics: dict[str, Any] = {
        "heldout_accuracy": None if math.isnan(accuracy) else accuracy,
        "heldout_pairs": heldout_pairs,
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


def save_reward_model(trained: TrainedRewardModel, root: Path) -> tuple[str, Path]:
    """Write `root/<version>`: safetensors weights, the architecture, normalisation, metrics and tokenizer.

    config.json holds the spec and both BLIP configs, so the model is rebuilt from the folder alone (a
    pretrained backbone folder is not needed again).
    """
    documents = {
        CONFIG_FILE: {
            "format": CHECKPOINT_FORMAT,
            "spec": asdict(trained.spec),
            "vision_config": trained.model.vision.config.to_dict(),
            "text_config": trained.model.text.config.to_dict(),
        },
        NORMALIZATION_FILE: {"mean": trained.metrics["reward_mean"], "std": trained.metrics["reward_std"]},
        METRICS_FILE: trained.metrics,
    }
    with tempfile.TemporaryDirectory() as staging:
        trained.tokenizer.save_pretrained(staging)
        extra = {path.name: path for path in Path(staging).iterdir() if path.is_file()}
        clashes = sorted(set(extra) & (set(documents) | {WEIGHTS_FILE}))
        if clashes:
            raise CheckpointError(f"tokenizer files {clashes} would overwrite the checkpoint's own")
        return write_checkpoint(root, trained.model.state_dict(), documents, extra)


@dataclass
class LoadedRewardModel:
    """A checkpoint ready to score: model on its device, preprocessing, normalisation stats and version."""

    model: RewardModel
    tokenizer: BertTokenizerFast
    spec: RewardModelSpec
    transform: ImageTransform
    mean: float
    std: float
    version: str
    metrics: dict[str, Any]
    device: torch.device


def load_reward_model(folder: Path, device: str | torch.device | None = None) -> LoadedRewardModel:
    """A saved reward model in eval mode on `device` (CUDA when present), from safetensors and local files only."""
    weights = read_weights(folder)
    config = read_json(folder, CONFIG_FILE)
    if config.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{folder}: {CONFIG_FILE} is not a reward model checkpoint ({config.get('format')!r})")
    spec = RewardModelSpec(**config["spec"])
    model = RewardModel.from_configs(
        BlipVisionConfig.from_dict(config["vision_config"]),
        BlipTextConfig.from_dict(config["text_config"]),
        spec.head_hidden,
    )
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{folder}: weights do not fit the architecture in {CONFIG_FILE}: {error}") from error
    normalization = read_json(folder, NORMALIZATION_FILE)
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder}: missing tokenizer.json")
    tokenizer = BertTokenizerFast.from_pretrained(folder, local_files_only=True)
    target = torch.device(device) if device is not None else pick_device()
    model.to(target).eval()
    return LoadedRewardModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        transform=ImageTransform(spec.image_size),
        mean=float(normalization["mean"]),
        std=float(normalization["std"]),
        version=content_version(folder),
        metrics=read_json(folder, METRICS_FILE),
        device=target,
    )


def register_reward_model(source: Path, root: Path) -> tuple[str, Path]:
    """Copy a reward model folder trained elsewhere under `root` as its content version, once it loads."""
    load_reward_model(source, device="cpu")
    return register_folder(source, root)


@dataclass(frozen=True)
class RewardPreprocessor:
    """Image transform + tokenizer, without the model: what DataLoader workers receive when pickled."""

    transform: ImageTransform
    tokenizer: BertTokenizerFast
    max_length: int

    def __call__(self, image: Image.Image, caption: str) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            caption, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {
            "pixel_values": self.transform(image),
            "input_ids": encoded["input_ids"][0],
            "attention_mask": encoded["attention_mask"][0],
        }


def collate_reward_samples(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack prepared samples (all padded to the same length) into a batch."""
    return {key: torch.stack([sample[key] for sample in samples]) for key in samples[0]}


class RewardScorer:
    """PairScorer for a loaded reward model; raw (unnormalised) rewards, higher is better aligned.

    `prepare` and `collate` are attributes holding a RewardPreprocessor and a module-level function rather
    than methods, so handing them to DataLoader workers pickles the preprocessing alone, never the model.
    """

    name = REWARD_MODEL

    def __init__(self, loaded: LoadedRewardModel) -> None:
        self.loaded = loaded
        self.version = loaded.version
        self.prepare = RewardPreprocessor(loaded.transform, loaded.tokenizer, loaded.spec.max_text_length)
        self.collate = collate_reward_samples

    @torch.no_grad()
    def score_batch(self, batch: dict[str, Any]) -> torch.Tensor:
        """Rewards [batch], float32 on the CPU; each pair is read against its own image."""
        device = self.loaded.device
        pixel_values = batch["pixel_values"].to(device)
        with inference_autocast(device):
            rewards = self.loaded.model(
                pixel_values,
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                torch.arange(pixel_values.shape[0], device=device),
            )
        return rewards.float().cpu()

    @torch.no_grad()
    def score_captions(self, image: Image.Image, captions: list[str]) -> list[float]:
        """Rewards of several captions of one image, encoding the image once."""
        device = self.loaded.device
        encoded = self.loaded.tokenizer(
            captions,
            padding="longest",
            truncation=True,
            max_length=self.loaded.spec.max_text_length,
            return_tensors="pt",
        )
        with inference_autocast(device):
            image_embeds = self.loaded.model.encode_images(self.loaded.transform(image)[None].to(device))
            rewards = self.loaded.model.rewards(
                image_embeds,
                torch.zeros(len(captions), dtype=torch.long, device=device),
                encoded["input_ids"].to(device),
                encoded["attention_mask"].to(device),
            )
        return rewards.float().cpu().tolist()
