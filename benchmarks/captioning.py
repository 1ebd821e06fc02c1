"""Captioning throughput: does recaptioning a shard's tars generate as fast as a bare batched `generate()`?

All in one run, on a webdataset tar of shapes-world images laid out as the platform's downloads are (`jpg`,
`txt`, `json` with the uid), with one captioner loaded once (the tiny BLIP captioner built from config and saved
as a platform checkpoint, or --model, a local pretrained folder):
- B (bare): the model's `generate()` on batches decoded and preprocessed up front, the same decoding settings and
  batch size, under the platform's device policy (bf16 autocast on CUDA): generated tokens/s;
- P (platform): `ca_platform.captioning.streaming.caption_tars` end to end, decoding in DataLoader workers:
  generated tokens/s.
Goal: P / B >= 0.85. Rounds alternate B and P and each figure is the best of --repeats rounds, so a neighbour's
burst on a shared machine does not decide the ratio. D, decoding and preprocessing alone through the same
workers (images/s), is printed to show what the pipeline spends outside the model.

    .venv/bin/python benchmarks/captioning.py [--images 256] [--image-size 64] [--batch-size 32] [--workers 2]
        [--strategy beam] [--candidates 3] [--max-new-tokens 20] [--repeats 3] [--device cuda]
        [--model /path/to/local/pretrained/folder] [--prompt "..."]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from transformers import BlipForConditionalGeneration

from ca_platform.captioning.captioner import Captioner, load_captioner
from ca_platform.captioning.decoding import DecodingSettings
from ca_platform.captioning.streaming import caption_tars, prepared_images
from ca_platform.demo.shapes_world import describe, render_scene, sample_scene
from ca_platform.models.blip import build_blip_captioner
from ca_platform.models.devices import inference_autocast, pick_device
from ca_platform.models.images import decode_image
from ca_platform.models.training import TrainedModel
from ca_platform.training.captioner import save_trained_captioner

BUSY_LOAD = 0.5  # 1-minute load average per core, before the run, above which the machine counts as busy


def write_shard(path: Path, images: int, image_size: int) -> list[bytes]:
    """A tar of `images` shapes-world samples; returns their JPEG bytes in tar order."""
    rng = np.random.default_rng(0)
    encoded = []
    with wds.TarWriter(str(path)) as writer:
        for row in range(images):
            scene = sample_scene(rng)
            buffer = io.BytesIO()
            render_scene(scene, image_size).save(buffer, format="JPEG", quality=95)
            encoded.append(buffer.getvalue())
            writer.write(
                {"__key__": f"{row:09d}", "jpg": buffer.getvalue(), "txt": describe(scene), "json": {"uid": str(row)}}
            )
    return encoded


def tiny_checkpoint(folder: Path, image_size: int) -> Path:
    """The tiny BLIP captioner, saved as the platform saves a trained one (training changes values, not work)."""
    torch.manual_seed(0)
    model, preprocessor = build_blip_captioner("tiny", image_size)
    _, checkpoint = save_trained_captioner(TrainedModel(model.eval(), preprocessor), folder / "checkpoints")
    return checkpoint


class BareGeneration:
    """What a user would write with transformers alone: inputs prepared up front, `generate()` per batch, new tokens
    counted up to each row's eos."""

    def __init__(self, captioner: Captioner, model_folder: str | None, prompt: str | None) -> None:
        self.model = captioner.model
        self.device = captioner.device
        self.blip = isinstance(self.model, BlipForConditionalGeneration)
        self.processor = None
        if model_folder is not None:
            from transformers import AutoProcessor

            self.processor = AutoProcessor.from_pretrained(model_folder, local_files_only=True, backend="pil")
        self.prompt = prompt
        self.transform = captioner.transform
        if self.blip:
            self.eos = {self.model.config.text_config.sep_token_id}
        else:
            eos = self.model.generation_config.eos_token_id
            self.eos = set(eos) if isinstance(eos, list) else {eos}

    def inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        if self.processor is None:  # the platform checkpoint: its own transform, BLIP's default start
            return {"pixel_values": torch.stack([self.transform(image) for image in images])}
        if self.blip and self.prompt is None:
            return dict(self.processor(images=images, return_tensors="pt"))
        return dict(self.processor(images=images, text=[self.prompt or ""] * len(images), return_tensors="pt"))

    def prefix(self, inputs: dict[str, torch.Tensor]) -> int:
        if "input_ids" not in inputs:
            return 1  # bos
        if self.blip:
            return inputs["input_ids"].shape[1] - 1  # BLIP drops the [SEP] its processor appends
        if self.model.config.get_text_config(decoder=True).is_encoder_decoder:
            return 1  # decoder start
        return inputs["input_ids"].shape[1]

    def run(self, batches: list[dict[str, torch.Tensor]], settings: DecodingSettings) -> int:
        tokens = 0
        for index, batch in enumerate(batches):
            on_device = {
                name: value.to(self.device, dtype=self.model.dtype if value.is_floating_point() else value.dtype)
                for name, value in batch.items()
            }
            if settings.sampled:
                torch.manual_seed(settings.seed + index)
            with torch.inference_mode(), inference_autocast(self.device):
                ids = self.model.generate(**on_device, **settings.generate_kwargs())
            for row in ids[:, self.prefix(batch) :].tolist():
                ends = [position for position, token in enumerate(row) if token in self.eos]
                tokens += ends[0] + 1 if ends else len(row)
        return tokens


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, run: Callable[[], int]) -> tuple[int, float]:
    synchronize(device)
    start = time.perf_counter()
    count = run()
    synchronize(device)
    return count, time.perf_counter() - start


def fmt(rates: list[float]) -> str:
    return ", ".join(f"{rate:.0f}" for rate in rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64, help="jpeg size, and the tiny model's resolution")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--strategy", default="beam", help="greedy, beam, nucleus or top_k")
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of B and P; the best of each is kept")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1; default: CUDA when present")
    parser.add_argument("--model", default=None, help="a local pretrained image-to-text folder (default: tiny BLIP)")
    parser.add_argument("--prompt", default=None, help="the text prompt, for models that need one (LLaVA-style)")
    args = parser.parse_args()
    device = pick_device(args.device)
    settings = DecodingSettings(
        args.strategy,
        candidates=args.candidates,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
    )
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="ca-bench-captioning-") as scratch:
        folder = Path(scratch)
        tar = folder / "00000.tar"
        encoded = write_shard(tar, args.images, args.image_size)
        model_folder = Path(args.model) if args.model else tiny_checkpoint(folder, args.image_size)
        captioner = load_captioner(model_folder, device=str(device), prompt=args.prompt)
        bare = BareGeneration(captioner, args.model, args.prompt)
        images = [decode_image(data) for data in encoded]
        batches = [bare.inputs(images[i : i + args.batch_size]) for i in range(0, len(images), args.batch_size)]
        del images
        bare.run(batches[:1], settings)  # warm-up: first-call allocations, lazy imports

        bare_rates: list[float] = []
        platform_rates: list[float] = []
        decode_rates: list[float] = []
        counts: dict[str, Any] = {}
        for _ in range(args.repeats):
            tokens, seconds = timed(device, lambda: bare.run(batches, settings))
            bare_rates.append(tokens / seconds)
            counts["bare"] = tokens
            captioned = None

            def platform() -> int:
                nonlocal captioned
                captioned = caption_tars([tar], captioner, settings, args.batch_size, args.workers)
                return captioned.generated_tokens

            tokens, seconds = timed(device, platform)
            platform_rates.append(tokens / seconds)
            counts["platform"] = tokens
            decoded, seconds = timed(
                device,
                lambda: sum(
                    len(uids) for uids, _ in prepared_images([tar], captioner.transform, args.batch_size, args.workers)
                ),
            )
            decode_rates.append(decoded / seconds)

    bare_rate, platform_rate, decode_rate = max(bare_rates), max(platform_rates), max(decode_rates)
    ratio = platform_rate / bare_rate
    print(
        f"device {device}, {args.images} images ({args.image_size} px jpeg) in one tar, model "
        f"{args.model or 'tiny BLIP captioner'}, {settings.strategy} x {settings.candidates} candidates, "
        f"{settings.max_new_tokens} new tokens at most, batch {args.batch_size}, {args.workers} workers, torch "
        f"threads {torch.get_num_threads()} of {os.cpu_count()} cores, best of {args.repeats}"
    )
    print(f"load average before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    if load_before > BUSY_LOAD * (os.cpu_count() or 1):
        print("warning: the cores were busy before the run started; B and P may be unreliable, run again when idle")
    print(f"generated tokens per run: bare {counts['bare']}, platform {counts['platform']}")
    print(f"B  bare generate() on prepared batches: {bare_rate:9.1f} tokens/s   (rounds: {fmt(bare_rates)})")
    print(f"P  caption_tars end to end:             {platform_rate:9.1f} tokens/s   (rounds: {fmt(platform_rates)})")
    print(f"D  decode + preprocess alone:           {decode_rate:9.1f} images/s   (rounds: {fmt(decode_rates)})")
    print(f"P / B: {ratio:.2f}   (goal >= 0.85: {'met' if ratio >= 0.85 else 'NOT met'})")


if __name__ == "__main__":
    main()
