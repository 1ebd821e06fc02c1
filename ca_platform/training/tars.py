"""Training a model on one training-set variant (the full pool or a compressed subset) under a fixed budget.

Compress & Align and DataComp compare variants at equal compute: every variant's model sees the same number
of samples, so a subset keeping 10% of the pool is passed over ten times as often. The pairs are streamed
from the variant's webdataset tars through a bounded shuffle buffer, epoch after epoch, so a subset of any
size trains in bounded memory; the buffer holds encoded samples and images are decoded only when batched.
"""

from __future__ import annotations

import itertools
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedModel

from ca_platform.ingest.webdataset_io import TarSample, iter_samples
from ca_platform.models.checkpoints import CheckpointError, content_version, read_json, read_weights, write_checkpoint
from ca_platform.models.devices import pick_device
from ca_platform.models.images import ImageTransform, decode_image
from ca_platform.scoring.streaming import (
    CONFIG_FILE,
    PREPROCESSING_FILE,
    PairPreprocessor,
    Prepared,
    SampleError,
    to_device,
    tokenizer_files,
    training_step,
)

METRICS_FILE = "metrics.json"
# Wall-clock figures differ from run to run; kept out of the checkpoint so that a seed fixes the version.
UNVERSIONED_METRICS = ("seconds", "samples_per_second")
SHUFFLE_BUFFER = 1000
WARMUP_FRACTION = 0.05


@dataclass(frozen=True)
class TrainingBudget:
    """How much training a model gets: samples seen (DataComp's rule, equal across variants) or epochs."""

    samples_seen: int | None = None
    epochs: int | None = None

    def __post_init__(self) -> None:
        if (self.samples_seen is None) == (self.epochs is None):
            raise ValueError(f"set exactly one of samples_seen and epochs, got {self}")
        value = self.samples_seen if self.samples_seen is not None else self.epochs
        if value is None or value < 1:
            raise ValueError(f"a training budget must be positive, got {self}")

    def total_samples(self, pairs_per_epoch: int) -> int:
        """Samples the budget allows on a training set of `pairs_per_epoch` pairs."""
        if self.samples_seen is not None:
            return self.samples_seen
        assert self.epochs is not None
        return self.epochs * pairs_per_epoch


def describe_source(source: str) -> str:
    """What training started from: the tiny config, or a local pretrained folder named by its content version."""
    return source if source == "tiny" else f"pretrained:{content_version(Path(source))}"


def count_pairs(tars: Sequence[Path]) -> int:
    """Samples in the tars, read without decoding their images."""
    return sum(1 for tar in tars for _ in iter_samples([tar]))


def _shuffled_epoch(tars: Sequence[Path], rng: random.Random, buffer_size: int) -> Iterator[tuple[Path, TarSample]]:
    """Every sample once: tars in a random order, samples through a shuffle buffer of `buffer_size`."""
    order = list(tars)
    rng.shuffle(order)
    buffer: list[tuple[Path, TarSample]] = []
    for tar in order:
        for sample in iter_samples([tar]):
            if len(buffer) < buffer_size:
                buffer.append((tar, sample))
                continue
            index = rng.randrange(buffer_size)
            yield buffer[index]
            buffer[index] = (tar, sample)
    rng.shuffle(buffer)
    yield from buffer


def _prepared(tar: Path, sample: TarSample, prepare: Callable[[Image.Image, str], Prepared]) -> Prepared:
    try:
        image = decode_image(sample.image)
    except Exception as error:  # PIL raises many types on hostile bytes; all mean the same here
        raise SampleError(f"{tar}: sample {sample.key!r}: image does not decode ({error})") from error
    return prepare(image, sample.caption)


def epoch_batch_sizes(samples: int, batch_size: int) -> list[int]:
    """`samples` cut into batches of `batch_size`; a last batch of one joins the batch before it.

    In-batch contrast needs two pairs, so a lone last sample would otherwise be dropped or trained alone.
    """
    sizes = [batch_size] * (samples // batch_size) + ([samples % batch_size] if samples % batch_size else [])
    if len(sizes) > 1 and sizes[-1] == 1:
        last = sizes.pop()
        sizes[-1] += last
    return [size for size in sizes if size >= 2]


def training_batches(
    tars: Sequence[Path],
    prepare: Callable[[Image.Image, str], Prepared],
    pairs_per_epoch: int,
    total_samples: int,
    batch_size: int,
    seed: int,
    shuffle_buffer: int = SHUFFLE_BUFFER,
) -> Iterator[list[Prepared]]:
    """Shuffled batches of prepared samples, epoch after epoch, until exactly `total_samples` are handed out.

    A batch never spans two epochs, so no batch holds a sample twice (in-batch negatives stay distinct), and
    the last epoch stops where the budget does. The same seed and tars give the same batches.
    """
    if pairs_per_epoch < 2:
        raise ValueError(
            f"training needs at least 2 pairs, but the tars {[str(t) for t in tars]} hold {pairs_per_epoch}"
        )
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (in-batch contrast), got {batch_size}")
    rng = random.Random(seed)
    remaining = total_samples
    while remaining >= 2:
        samples = _shuffled_epoch(tars, rng, shuffle_buffer)
        for size in epoch_batch_sizes(min(pairs_per_epoch, remaining), batch_size):
            batch = [_prepared(tar, sample, prepare) for tar, sample in itertools.islice(samples, size)]
            if len(batch) < size:
                raise ValueError(f"{[str(t) for t in tars]}: fewer than the {pairs_per_epoch} pairs counted before")
            yield batch
            remaining -= size


def learning_rate_factor(progress: float) -> float:
    """Linear warm-up over the first 5% of the samples, then cosine decay to zero (DataComp's schedule).

    `progress` is the fraction of the budget already seen; the first step trains at a small but nonzero rate.
    """
    if progress < WARMUP_FRACTION:
        return max(progress, 0.1 * WARMUP_FRACTION) / WARMUP_FRACTION
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - WARMUP_FRACTION) / (1.0 - WARMUP_FRACTION))))


def train_on_tars(
    model: torch.nn.Module,
    preprocessor: PairPreprocessor,
    tars: Sequence[Path | str],
    batch_loss: Callable[[list[Prepared]], torch.Tensor],
    budget: TrainingBudget,
    *,
    batch_size: int,
    learning_rate: float,
    seed: int,
    device: torch.device,
    shuffle_buffer: int = SHUFFLE_BUFFER,
) -> dict[str, Any]:
    """AdamW with gradient clipping and a warm-up/cosine schedule over streamed batches, until the budget is spent.

    Returns JSON-ready metrics: the per-step loss curve, steps, samples seen and epochs completed (fractional
    when the budget ends inside an epoch). bf16 autocast on CUDA, float32 on the CPU.
    """
    paths = [Path(t) for t in tars]
    pairs_per_epoch = count_pairs(paths)
    total = budget.total_samples(pairs_per_epoch)
    batches = training_batches(paths, preprocessor.prepare, pairs_per_epoch, total, batch_size, seed, shuffle_buffer)
    torch.manual_seed(seed)
    model.to(device).train()
    # Fused: the optimizer step takes a tenth of the per-tensor loop's time on small models.
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, fused=device.type in ("cpu", "cuda"))
    losses: list[float] = []
    seen = 0
    started = time.perf_counter()
    for batch in batches:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * learning_rate_factor(seen / total)
        try:
            losses.append(training_step(model, optimizer, batch_loss, batch, device))
        except FloatingPointError as error:
            raise FloatingPointError(f"{error} at step {len(losses)} on {[str(p) for p in paths]}") from error
        seen += len(batch)
    seconds = time.perf_counter() - started
    model.eval()
    return {
        "loss": losses,
        "steps": len(losses),
        "samples_seen": seen,
        "pairs_per_epoch": pairs_per_epoch,
        "epochs_completed": seen / pairs_per_epoch,
        "budget": asdict(budget),
        "tars": len(paths),
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "device": str(device),
        "seconds": seconds,
        "samples_per_second": seen / max(seconds, 1e-9),
    }


def train_built_model(
    build: Callable[[str, int], tuple[PreTrainedModel, PairPreprocessor]],
    batch_loss: Callable[[PreTrainedModel, dict[str, torch.Tensor]], torch.Tensor],
    kind: str,
    tars: Sequence[Path | str],
    budget: TrainingBudget,
    *,
    source: str,
    image_size: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    device: str | None,
) -> tuple[PreTrainedModel, PairPreprocessor, dict[str, Any]]:
    """A model built by `build(source, image_size)` (seeded first, so its initial weights repeat) and trained
    with `batch_loss(model, batch on the device)` on the tars until the budget is spent; metrics name `kind`
    and the source."""
    torch.manual_seed(seed)
    model, preprocessor = build(source, image_size)
    target = pick_device(device)

    def loss(samples: list[Prepared]) -> torch.Tensor:
        return batch_loss(model, to_device(preprocessor.collate(samples), target))

    metrics = train_on_tars(
        model,
        preprocessor,
        tars,
        loss,
        budget,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        device=target,
    )
    return model, preprocessor, {"model": kind, "source": describe_source(source), **metrics}


def _aliases(state_dict: Mapping[str, torch.Tensor]) -> set[str]:
    """Names of tensors that share memory with an earlier one: tied weights, e.g. a decoder tied to embeddings."""
    first: dict[tuple[Any, ...], str] = {}
    aliases = set()
    for name, tensor in state_dict.items():
        place = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if place in first:
            aliases.add(name)
        else:
            first[place] = name
    return aliases


def save_trained_model(
    model: PreTrainedModel,
    preprocessor: PairPreprocessor,
    metrics: Mapping[str, Any],
    root: Path,
    kind: str,
) -> tuple[str, Path]:
    """`root/<version>`: safetensors weights (tied copies once), config, preprocessing, tokenizer and metrics.

    The version hashes everything but the run's wall-clock figures, so the same seed on the same tars gives
    the same version.
    """
    state = model.state_dict()
    aliases = _aliases(state)
    weights = {name: tensor for name, tensor in state.items() if name not in aliases}
    config = model.config.to_dict()
    config.pop("transformers_version", None)
    documents = {
        CONFIG_FILE: config,
        PREPROCESSING_FILE: {"model": kind, **preprocessor.settings()},
        METRICS_FILE: {k: v for k, v in metrics.items() if k not in UNVERSIONED_METRICS},
    }
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        return write_checkpoint(root, weights, documents, tokenizer_files(preprocessor.tokenizer, Path(tokenizer_dir)))


def load_trained_model(
    folder: Path, config_class: type[PretrainedConfig], model_class: type[PreTrainedModel], kind: str
) -> tuple[PreTrainedModel, PairPreprocessor, dict[str, Any]]:
    """Model (in eval mode), preprocessor and metrics from a folder written by `save_trained_model` for `kind`."""
    preprocessing = read_json(folder, PREPROCESSING_FILE)
    if preprocessing.get("model") != kind:
        raise CheckpointError(f"{folder}: holds a {preprocessing.get('model')!r} model, not {kind!r}")
    weights = read_weights(folder)
    model = model_class(config_class.from_dict(read_json(folder, CONFIG_FILE)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    untied = sorted(set(missing) - _aliases(model.state_dict()))
    if untied or unexpected:
        raise CheckpointError(f"{folder}: weights do not fit the config (missing {untied}, unexpected {unexpected})")
    transform = ImageTransform(preprocessing["image_size"], tuple(preprocessing["mean"]), tuple(preprocessing["std"]))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    metrics = read_json(folder, METRICS_FILE) if (folder / METRICS_FILE).is_file() else {}
    return model.eval(), PairPreprocessor(transform, tokenizer, preprocessing["max_length"]), metrics
