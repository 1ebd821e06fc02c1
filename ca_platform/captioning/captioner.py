"""An image-to-text model loaded from a folder, captioning batches of prepared images with `generate()`.

Two kinds of folder: a platform checkpoint of a BLIP captioner (`training.captioner.save_trained_captioner`),
and a user's local pretrained transformers folder (BLIP, BLIP-2, LLaVA-style models with their processor).
DataLoader workers get the captioner's `transform`, a small picklable object, and never the model.

Captions are the generated tokens only: a prompt ("a picture of", LLaVA's instruction) is left out, as BLIP's
CapFilt strips its prompt from the captions it writes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import BlipForConditionalGeneration, PreTrainedModel, PreTrainedTokenizerBase

from ca_platform.captioning.decoding import DecodingSettings
from ca_platform.models.checkpoints import PREPROCESSING_FILE, content_version
from ca_platform.models.devices import inference_autocast, pick_device
from ca_platform.models.preprocessing import local_model_dir
from ca_platform.training.captioner import load_trained_captioner

# What a processor may return for one image besides its pixels, for the prompt's ids to be reused for every image.
# Anything else (image_sizes, image_grid_thw, ...) means the text depends on each image's size: not supported.
PROMPT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class CaptionBatch:
    """Captions of a batch of images and the tokens it took to write them."""

    captions: list[list[str]]  # per image, `settings.candidates` captions, best first (beam) or in sampled order
    generated_tokens: int  # new tokens, up to and including each caption's eos; no prompt, bos or padding


@dataclass(frozen=True)
class ProcessorImageTransform:
    """A pretrained folder's own image processor as a transform: one image to a [3, H, W] float tensor."""

    image_processor: Any

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]


@dataclass(frozen=True)
class GenerationInputs:
    """What every `generate()` call gets besides the pixels, and where its output's new tokens start."""

    prompt: dict[str, torch.Tensor]  # one row each (input_ids, ...), repeated for every image; empty: the model's start
    output_prefix: int  # leading ids of each output row that are not generated: prompt, bos or decoder start
    eos_token_ids: tuple[int, ...]
    max_new_tokens: int | None  # what the model's positions leave after the prompt, when they are limited
    extra: dict[str, Any]  # further generate() arguments the model needs (e.g. a pad id it lacks)

    def for_batch(self, images: int, device: torch.device) -> dict[str, Any]:
        # A copy per call (`repeat`, not `expand`): BLIP's generate writes bos into its input ids in place.
        return {**{name: ids.repeat(images, 1).to(device) for name, ids in self.prompt.items()}, **self.extra}


class Captioner:
    """A loaded image-to-text model, ready to caption batches; `version` is its content hash."""

    def __init__(
        self,
        model: PreTrainedModel,
        transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: PreTrainedTokenizerBase,
        version: str,
        inputs: GenerationInputs,
        device: str | torch.device | None = None,
    ) -> None:
        self.device = pick_device(str(device) if device is not None else None)
        self.model = model.to(self.device).eval()
        self.transform = transform
        self.tokenizer = tokenizer
        self.version = version
        self.inputs = inputs

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """One image as the model's CPU pixel tensor (what `transform` does; workers get `transform` alone)."""
        return self.transform(image)

    def caption_batch(
        self, pixel_values: torch.Tensor, settings: DecodingSettings, seed_offset: int = 0
    ) -> CaptionBatch:
        """`settings.candidates` captions per image of a batch of prepared images, in one batched `generate()`.

        Sampling is seeded with `settings.seed + seed_offset` right before generating, so a batch's captions do
        not depend on what ran before it (the caller's random state is left as it was).
        """
        kwargs = settings.generate_kwargs()
        if self.inputs.max_new_tokens is not None:
            kwargs["max_new_tokens"] = min(kwargs["max_new_tokens"], self.inputs.max_new_tokens)
        images = len(pixel_values)
        pixels = pixel_values.to(self.device, dtype=self.model.dtype, non_blocking=True)
        seed = settings.seed + seed_offset if settings.sampled else None
        with torch.inference_mode(), inference_autocast(self.device), _seeded(seed, self.device):
            ids = self.model.generate(pixel_values=pixels, **self.inputs.for_batch(images, self.device), **kwargs)
        new = ids[:, self.inputs.output_prefix :].cpu()
        lengths = _generated_lengths(new, self.inputs.eos_token_ids)
        texts = self.tokenizer.batch_decode(
            [row[:length].tolist() for row, length in zip(new, lengths.tolist())], skip_special_tokens=True
        )
        per_image = settings.candidates
        captions = [[text.strip() for text in texts[i * per_image : (i + 1) * per_image]] for i in range(images)]
        return CaptionBatch(captions, int(lengths.sum()))


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run with the global RNG seeded (CPU, and the device's on CUDA), restored afterwards; `None`: untouched.

    transformers' `generate` draws from the global RNG and takes no generator of its own.
    """
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield


def _generated_lengths(new: torch.Tensor, eos_token_ids: tuple[int, ...]) -> torch.Tensor:
    """Per output row, the generated tokens up to and including its first eos (all of them if it has none)."""
    if not eos_token_ids or new.shape[1] == 0:
        return torch.full((len(new),), new.shape[1], dtype=torch.long)
    is_eos = torch.isin(new, torch.tensor(eos_token_ids, dtype=new.dtype))
    first = is_eos.int().argmax(dim=1)
    return torch.where(is_eos.any(dim=1), first + 1, torch.full_like(first, new.shape[1]))


def load_captioner(folder: Path, device: str | None = None, prompt: str | None = None) -> Captioner:
    """A platform checkpoint (written by ca_platform.training.captioner.save_trained_captioner; it has the
    platform's preprocessing.json) or a user's local pretrained transformers folder (save_pretrained of an
    image-to-text model + its processor): BLIP (BlipForConditionalGeneration), BLIP-2, or LLaVA-style models
    through AutoModelForImageTextToText + AutoProcessor, loaded with from_pretrained(path) only (local_files_only).
    `prompt`: the text prompt for models that need one (LLaVA-style), None for BLIP. Version =
    ca_platform.models.checkpoints.content_version(folder).

    A pretrained folder loads from safetensors only (pickled weights are refused, as for platform checkpoints),
    in bf16 on CUDA (a 7B LLaVA would need 28 GB in float32) and float32 on the CPU; its images are prepared by
    its own image processor, so captions see what the model was trained on.
    """
    folder = local_model_dir(str(folder))
    target = pick_device(device)
    version = content_version(folder)
    if (folder / PREPROCESSING_FILE).is_file():
        model, preprocessor = load_trained_captioner(folder, device=str(target))
        inputs = _blip_inputs(model, preprocessor.tokenizer, prompt)
        return Captioner(model, preprocessor.transform, preprocessor.tokenizer, version, inputs, target)
    return _load_pretrained(folder, target, prompt, version)


def _load_pretrained(folder: Path, target: torch.device, prompt: str | None, version: str) -> Captioner:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(
        str(folder), local_files_only=True, use_safetensors=True, dtype=dtype
    )
    # The platform has no torchvision, so image processors run on PIL and numpy.
    processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True, backend="pil")
    tokenizer = getattr(processor, "tokenizer", None)
    image_processor = getattr(processor, "image_processor", None)
    if tokenizer is None or image_processor is None:
        raise ValueError(
            f"{folder}: needs a processor with an image processor and a tokenizer (save_pretrained of the model's "
            f"processor), found {type(processor).__name__}"
        )
    transform = ProcessorImageTransform(image_processor)
    if isinstance(model, BlipForConditionalGeneration):
        inputs = _blip_inputs(model, tokenizer, prompt)
    else:
        inputs = _prompted_inputs(folder, model, processor, transform, prompt)
    return Captioner(model, transform, tokenizer, version, inputs, target)


def _blip_inputs(
    model: BlipForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, prompt: str | None
) -> GenerationInputs:
    """BLIP's decoder starts from bos, then the prompt's words if there is one.

    BLIP's `generate` drops the last input id (the [SEP] its processor appends) and writes bos over the first, so
    a prompt goes in as [bos] + words + [sep]. The decoder has `max_position_embeddings` positions in all.
    """
    text = model.config.text_config
    words = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    prompt_ids = {}
    if words:
        ids = torch.tensor([[text.bos_token_id, *words, text.sep_token_id]])
        prompt_ids = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    prefix = 1 + len(words)
    room = text.max_position_embeddings - prefix
    if room < 1:
        raise ValueError(f"prompt {prompt!r} fills all {text.max_position_embeddings} positions of BLIP's decoder")
    return GenerationInputs(prompt_ids, prefix, (text.sep_token_id,), room, {})


def _prompted_inputs(
    folder: Path, model: PreTrainedModel, processor: Any, transform: ProcessorImageTransform, prompt: str | None
) -> GenerationInputs:
    """The processor's text inputs for the prompt (image placeholder tokens included), computed once.

    They depend on the image only through its size, which the image processor fixes: so one call on a blank
    image at the model's resolution gives the ids every image of a batch uses.
    """
    height, width = transform(Image.new("RGB", (64, 64))).shape[-2:]
    blank = Image.new("RGB", (width, height))
    try:
        sample = processor(images=blank, text=prompt or "", return_tensors="pt")
    except ValueError as error:
        raise ValueError(
            f"{folder}: the processor refuses the prompt {prompt!r} ({error}); LLaVA-style models need a "
            "prompt with the image token"
        ) from error
    per_image = sorted(set(sample) - {"pixel_values", *PROMPT_INPUTS})
    if per_image:
        raise ValueError(
            f"{folder}: {type(model).__name__} takes per-image inputs {per_image}: captioning needs a model whose "
            "prompt is the same for every image (BLIP, BLIP-2, LLaVA-1.5 style)"
        )
    prompt_ids = {name: sample[name] for name in PROMPT_INPUTS if name in sample}
    encoder_decoder = bool(getattr(model.config.get_text_config(decoder=True), "is_encoder_decoder", False))
    # A decoder-only LM returns its prompt before the new tokens; an encoder-decoder one starts from its decoder
    # start token.
    prefix = 1 if encoder_decoder else prompt_ids["input_ids"].shape[1]
    eos = model.generation_config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (eos,))
    extra = {}
    if model.generation_config.pad_token_id is None and processor.tokenizer.pad_token_id is not None:
        extra["pad_token_id"] = processor.tokenizer.pad_token_id
    return GenerationInputs(prompt_ids, prefix, eos_ids, None, extra)
