"""Pair scoring: what every image-caption scorer shares.

Streaming a shard's webdataset tars through a `PairScorer` (decoding and preprocessing in DataLoader
workers, the model in the main process), scoring in-memory pairs for evaluation, and the parts the CLIP and
BLIP baselines have in common: the BERT WordPiece tokenizer of from-config models, a picklable preprocessor,
the training loop and versioned checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ca_platform.ingest.webdataset_io import TarSample, iter_samples, iter_samples_strided
from ca_platform.models.checkpoints import CheckpointError, read_json, read_weights, write_checkpoint
from ca_platform.models.devices import inference_autocast, pick_device
from ca_platform.models.images import CLIP_MEAN, CLIP_STD, ImageTransform, decode_image
from ca_platform.scoring.scorer import PairScorer

CONFIG_FILE = "config.json"
PREPROCESSING_FILE = "preprocessing.json"
HF_PREPROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Recorded by transformers when a tokenizer is loaded from a folder, not part of what it does: left out so a
# loaded and re-saved checkpoint keeps its version.
TOKENIZER_LOAD_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash")

Prepared = dict[str, torch.Tensor]

TINY_WIDTH = 64
TINY_LAYERS = 2
TINY_HEADS = 2
TINY_MAX_TOKENS = 64
PATCH_GRID = 8  # tiny vision towers see the image as 8 x 8 patches, whatever its size


class SampleError(ValueError):
    """A tar sample that cannot be scored; the message names the tar and the sample key."""


def _decode_sample(tar: Path, sample: TarSample) -> tuple[str, Image.Image, str]:
    """(uid, image, caption) of a sample, or a SampleError naming the tar and key."""
    uid = sample.meta.get("uid")
    if uid is None:
        raise SampleError(f"{tar}: sample {sample.key!r} has no uid in its json member")
    try:
        image = decode_image(sample.image)
    except Exception as error:  # PIL raises many types on hostile bytes; all mean the same here
        raise SampleError(f"{tar}: sample {sample.key!r}: image does not decode ({error})") from error
    return str(uid), image, sample.caption


def iter_pairs(tars: Iterable[Path | str]) -> Iterator[tuple[str, Image.Image, str]]:
    """(uid, decoded image, caption) of every sample, tar by tar; e.g. to train a baseline on a pool."""
    for tar in tars:
        for sample in iter_samples([tar]):
            yield _decode_sample(Path(tar), sample)


@dataclass(frozen=True)
class _Unscorable:
    """A SampleError's message, carried out of a worker as data.

    Raised in the worker, the DataLoader would wrap the message in its own and, at shutdown, wait seconds
    for that worker before killing it.
    """

    message: str


class _PreparedTarPairs(IterableDataset):
    """(uid, prepared) per sample; worker k of n takes the samples whose running index is k mod n.

    Striding by sample rather than by tar keeps workers evenly loaded whatever the tar count; each worker walks
    every tar's headers but reads only its own samples' bytes. A sample that does not decode ends the worker's
    stream with an `_Unscorable`.
    """

    def __init__(self, tars: Sequence[Path], prepare: Callable[[Image.Image, str], Prepared]) -> None:
        self.tars = list(tars)
        self.prepare = prepare

    def __iter__(self) -> Iterator[tuple[str, Prepared] | _Unscorable]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for tar, sample in iter_samples_strided(self.tars, worker, workers):
            try:
                uid, image, caption = _decode_sample(tar, sample)
            except SampleError as error:
                yield _Unscorable(str(error))
                return
            yield uid, self.prepare(image, caption)


def _one_thread_per_worker(worker_id: int) -> None:
    """DataLoader worker init: one torch thread each, so workers and the model do not oversubscribe the cores."""
    torch.set_num_threads(1)


@dataclass(frozen=True)
class _CollateWithUids:
    """The scorer's collate, with the batch's uids kept alongside (a class, so workers can unpickle it)."""

    collate: Callable[[list[Prepared]], dict[str, Any]]

    def __call__(
        self, items: list[tuple[str, Prepared] | _Unscorable]
    ) -> tuple[list[str], dict[str, Any]] | _Unscorable:
        failed = [item for item in items if isinstance(item, _Unscorable)]
        if failed:
            return failed[0]
        return [uid for uid, _ in items], self.collate([prepared for _, prepared in items])


@contextlib.contextmanager
def _cores_left_to_workers(num_workers: int) -> Iterator[None]:
    """On the CPU, give the model only the cores the decoding workers leave, so they do not fight over them."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - num_workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prepared_batches(
    tars: Sequence[Path], scorer: PairScorer, batch_size: int = 64, num_workers: int = 2
) -> Iterator[tuple[list[str], dict[str, Any]]]:
    """(uids, collated batch) of every sample of the tars, decoded and prepared in DataLoader workers.

    A sample whose image does not decode raises SampleError naming the tar and key.
    """
    loader = DataLoader(
        _PreparedTarPairs([Path(t) for t in tars], scorer.prepare),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_CollateWithUids(scorer.collate),
        worker_init_fn=_one_thread_per_worker,
        prefetch_factor=4 if num_workers else None,
    )
    for item in loader:
        if isinstance(item, _Unscorable):
            raise SampleError(item.message)
        yield item


def score_tars(tars: Sequence[Path], scorer: PairScorer, batch_size: int = 64, num_workers: int = 2) -> pl.DataFrame:
    """Score every sample of the tars: one row per sample, columns `uid` (str) and `score` (float64).

    A sample whose image does not decode raises SampleError naming the tar and key, so no sample drops out
    unnoticed; the caller decides what a failed shard means.
    """
    uids: list[str] = []
    scores: list[np.ndarray] = []
    with _cores_left_to_workers(num_workers):
        for batch_uids, batch in prepared_batches(tars, scorer, batch_size, num_workers):
            uids.extend(batch_uids)
            scores.append(scorer.score_batch(batch).float().numpy())
    values = np.concatenate(scores).astype(np.float64) if scores else np.zeros(0)
    return pl.DataFrame({"uid": pl.Series(uids, dtype=pl.String), "score": pl.Series(values, dtype=pl.Float64)})


def score_pairs(
    images: Sequence[Image.Image], captions: Sequence[str], scorer: PairScorer, batch_size: int = 64
) -> np.ndarray:
    """Scores (float64) of in-memory pairs, in order: for evaluations such as preference accuracy."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    scores = [np.zeros(0)]
    for start in range(0, len(images), batch_size):
        end = start + batch_size
        prepared = [scorer.prepare(i, c) for i, c in zip(images[start:end], captions[start:end])]
        scores.append(scorer.score_batch(scorer.collate(prepared)).float().numpy())
    return np.concatenate(scores).astype(np.float64)


def tiny_vision_tower(image_size: int) -> dict[str, Any]:
    """Vision settings of the tiny CLIP and BLIP models built from configs (tests, demo, no local weights)."""
    if image_size % PATCH_GRID:
        raise ValueError(f"image_size {image_size} is not a multiple of the {PATCH_GRID} x {PATCH_GRID} patch grid")
    return {
        "hidden_size": TINY_WIDTH,
        "intermediate_size": 2 * TINY_WIDTH,
        "num_hidden_layers": TINY_LAYERS,
        "num_attention_heads": TINY_HEADS,
        "image_size": image_size,
        "patch_size": image_size // PATCH_GRID,
        "initializer_range": 0.02,
    }


def tiny_text_tower(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Text settings shared by the tiny CLIP and BLIP models, with the BERT tokenizer's vocabulary and ids."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": TINY_WIDTH,
        "intermediate_size": 2 * TINY_WIDTH,
        "num_hidden_layers": TINY_LAYERS,
        "num_attention_heads": TINY_HEADS,
        "max_position_embeddings": TINY_MAX_TOKENS,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.cls_token_id,
        "eos_token_id": tokenizer.sep_token_id,  # CLIP pools the text at the first eos: BERT's [SEP]
    }


@dataclass(frozen=True, eq=False)
class PairPreprocessor:
    """Image transform plus tokenizer: a scorer's `prepare`/`collate` without its model.

    DataLoader workers receive this object, never the model, so it stays small to pickle and CPU-only.
    """

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
        return {
            "image_size": self.transform.size,
            "mean": list(self.transform.mean),
            "std": list(self.transform.std),
            "max_length": self.max_length,
        }


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


def train_pair_model(
    model: torch.nn.Module,
    preprocessor: PairPreprocessor,
    pairs: Iterable[tuple[Image.Image, str]],
    batch_loss: Callable[[list[Prepared]], torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """AdamW over shuffled batches of the pairs; returns metrics with the per-step loss curve.

    Pairs are prepared once (tensors at model resolution), so a one-shot generator such as `iter_pairs`
    can feed several epochs. Batches of one are skipped: in-batch contrast needs two pairs. bf16 autocast
    on CUDA, as for scoring.
    """
    prepared = [preprocessor.prepare(image, caption) for image, caption in pairs]
    if len(prepared) < 2:
        raise ValueError(f"training needs at least 2 pairs, got {len(prepared)}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    losses: list[float] = []
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(prepared), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            if len(indices) < 2:
                continue
            losses.append(training_step(model, optimizer, batch_loss, [prepared[i] for i in indices], device))
    model.eval()
    return {
        "loss": losses,
        "steps": len(losses),
        "pairs": len(prepared),
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "device": str(device),
        "seconds": time.perf_counter() - started,
    }


def training_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_loss: Callable[[list[Prepared]], torch.Tensor],
    batch: list[Prepared],
    device: torch.device,
) -> float:
    """One optimiser step on a batch (bf16 autocast on CUDA, gradients clipped at norm 1); returns its loss.

    A loss that is no longer finite stops training at once rather than training on garbage.
    """
    with inference_autocast(device):
        loss = batch_loss(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    value = float(loss.detach().float().cpu())
    if not math.isfinite(value):
        raise FloatingPointError(f"training loss became {value}")
    return value


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


class ModelPairScorer(ABC):
    """A PairScorer around a transformers model and its PairPreprocessor; subclasses say how a batch scores.

    `prepare` and `collate` are the preprocessor's own bound methods, not the scorer's, so DataLoader
    workers receive the small preprocessor and never the model.
    """

    name: str

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

    def score_batch(self, batch: dict[str, Any]) -> torch.Tensor:
        with torch.inference_mode(), inference_autocast(self.device):
            scores = self.scores_on_device(to_device(batch, self.device))
        return scores.float().cpu()

    @abstractmethod
    def scores_on_device(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores [batch] of a batch already on the scorer's device."""


def save_pair_model(
    model: PreTrainedModel, preprocessor: PairPreprocessor, root: Path, scorer_name: str
) -> tuple[str, Path]:
    """Weights, model config, preprocessing and tokenizer files as one self-contained versioned folder."""
    config = model.config.to_dict()
    config.pop("transformers_version", None)  # the version hashes weights and settings, not the library
    preprocessing = {"scorer": scorer_name, **preprocessor.settings()}
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        extra = tokenizer_files(preprocessor.tokenizer, Path(tokenizer_dir))
        return write_checkpoint(
            root, model.state_dict(), {CONFIG_FILE: config, PREPROCESSING_FILE: preprocessing}, extra
        )


def tokenizer_files(tokenizer: PreTrainedTokenizerBase, folder: Path) -> dict[str, Path]:
    """The tokenizer saved into `folder` as a checkpoint carries it: name -> file, free of per-call state, so
    a checkpoint's version does not depend on how the tokenizer was last used."""
    files = _canonical_tokenizer(tokenizer).save_pretrained(str(folder))
    _drop_load_keys(folder / TOKENIZER_CONFIG_FILE)
    return {Path(f).name: Path(f) for f in files if Path(f).is_file()}


def _canonical_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A copy without the truncation/padding state that the last call left in the Rust backend.

    That state is saved into tokenizer.json and would make the version depend on whether the tokenizer had
    been used; every call sets it afresh anyway.
    """
    tokenizer = copy.deepcopy(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()
    return tokenizer


def _drop_load_keys(tokenizer_config: Path) -> None:
    if tokenizer_config.is_file():
        settings = json.loads(tokenizer_config.read_text())
        kept = {key: value for key, value in settings.items() if key not in TOKENIZER_LOAD_KEYS}
        tokenizer_config.write_text(json.dumps(kept, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def load_pair_model(
    folder: Path, config_class: type[PretrainedConfig], model_class: type[PreTrainedModel], scorer_name: str
) -> tuple[PreTrainedModel, PairPreprocessor]:
    """A model and preprocessor from a folder written by `save_pair_model` for `scorer_name`."""
    preprocessing = read_json(folder, PREPROCESSING_FILE)
    if preprocessing.get("scorer") != scorer_name:
        raise CheckpointError(f"{folder}: holds a {preprocessing.get('scorer')!r} model, not {scorer_name!r}")
    weights = read_weights(folder)
    model = model_class(config_class.from_dict(read_json(folder, CONFIG_FILE)))
    model.load_state_dict(weights, strict=True)
    transform = ImageTransform(preprocessing["image_size"], tuple(preprocessing["mean"]), tuple(preprocessing["std"]))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model.eval(), PairPreprocessor(transform, tokenizer, preprocessing["max_length"])
