"""The Compress & Align reward model: ImageReward's recipe with the roles swapped.

ImageReward fixes a prompt and ranks generated images; here the image is fixed and people rank several
captions of it. A BLIP vision transformer encodes each image once, a BLIP text encoder reads each caption
while cross-attending to that image's tokens, and an MLP on the caption's first ([CLS]) token gives a
scalar reward. Rewards only carry meaning as differences between captions (see `train`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipTextConfig,
    BlipTextModel,
    BlipVisionConfig,
    BlipVisionModel,
)

from ca_platform.models.checkpoints import CONFIG_FILE, WEIGHTS_FILE, read_json
from ca_platform.models.images import ImageTransform
from ca_platform.models.preprocessing import PairPreprocessor
from ca_platform.models.tiny import tiny_blip_text_tower, tiny_vision_tower
from ca_platform.models.tokenization import minilm_folder

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


def reward_preprocessor(spec: RewardModelSpec, tokenizer: BertTokenizerFast) -> PairPreprocessor:
    """How a reward model sees a pair: its image size and caption length."""
    return PairPreprocessor(ImageTransform(spec.image_size), tokenizer, spec.max_text_length)


def _tiny_text_config(spec: RewardModelSpec, tokenizer: BertTokenizerFast) -> BlipTextConfig:
    """The tiny BLIP text tower, or (text_init="minilm") one in MiniLM's shape, cross-attending to the image."""
    tower = tiny_blip_text_tower(tokenizer)
    if spec.text_init != "minilm":
        return BlipTextConfig(**tower)
    minilm = read_json(minilm_folder(), "config.json")
    shape = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings")
    return BlipTextConfig(
        **{**tower, **{name: minilm[name] for name in shape}},
        hidden_act=minilm["hidden_act"],
        layer_norm_eps=minilm["layer_norm_eps"],
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
        vision_config = BlipVisionConfig(**tiny_vision_tower(spec.image_size))
        text_config = _tiny_text_config(spec, tokenizer)
        model = RewardModel.from_configs(vision_config, text_config, spec.head_hidden)
        if spec.text_init == "minilm":
            _copy_minilm_weights(model.text)
    else:
        vision, text = _pretrained_backbone(spec)
        model = RewardModel(vision, text, spec.head_hidden)
    _check_compatible(model, spec, tokenizer)
    freeze_layers(model, spec.freeze_fraction)
    return model
