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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedModel

from ca_platform.ingest.webdataset_io import TarSample, decode_sample, iter_samples
from ca_platform.models.checkpoints import content_version
from ca_platform.models.devices import pick_device
from ca_platform.models.preprocessing import PairPreprocessor, Prepared
from ca_platform.models.training import TrainedModel, adamw, collated_loss, train_on_batches
from ca_platform.schemas import SYNTHETIC_CAPTION_META, UID

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


def count_pairs(tars: Sequence[Path], excluded_uids: frozenset[str] = frozenset()) -> int:
    """Samples in the tars (but the `excluded_uids`), read without decoding their images."""
    return sum(1 for tar in tars for sample in iter_samples([tar]) if str(sample.meta.get(UID)) not in excluded_uids)


def caption_texts(tars: Sequence[Path]) -> list[str]:
    """Every caption a sample of the tars can train with: its own and the synthetic one it may carry
    (recap_mix_p), read without decoding images."""
    texts = []
    for sample in iter_samples(tars):
        texts.append(sample.caption)
        if sample.meta.get(SYNTHETIC_CAPTION_META) is not None:
            texts.append(str(sample.meta[SYNTHETIC_CAPTION_META]))
    return texts


def _shuffled_epoch(
    tars: Sequence[Path], rng: random.Random, buffer_size: int, excluded: frozenset[str] = frozenset()
) -> Iterator[tuple[Path, TarSample]]:
    """Every sample once (but those whose uid is `excluded`): tars in a random order, samples through a shuffle
    buffer of `buffer_size`."""
    order = list(tars)
    rng.shuffle(order)
    buffer: list[tuple[Path, TarSample]] = []
    for tar in order:
        for sample in iter_samples([tar]):
            if excluded and str(sample.meta.get(UID)) in excluded:
                continue
            if len(buffer) < buffer_size:
                buffer.append((tar, sample))
                continue
            index = rng.randrange(buffer_size)
            yield buffer[index]
            buffer[index] = (tar, sample)
    rng.shuffle(buffer)
    yield from buffer


# Which caption of a sample training uses (its own, unless a variant mixes in synthetic ones).
CaptionChoice = Callable[[Path, TarSample], str]


def mixed_captions(probability: float, seed: int) -> CaptionChoice:
    """recap_mix_p's draw (Recap-DataComp): a sample's synthetic caption, carried in its json member, with
    `probability`, else its own. Seeded apart from the shuffle, so the same batches draw the same captions."""
    rng = random.Random(f"recap-mix:{seed}")

    def caption_of(tar: Path, sample: TarSample) -> str:
        synthetic = sample.meta.get(SYNTHETIC_CAPTION_META)
        if synthetic is None:
            raise ValueError(f"{tar}: sample {sample.key!r} carries no synthetic caption to mix in")
        return str(synthetic) if rng.random() < probability else sample.caption

    return caption_of


def _prepared(
    tar: Path, sample: TarSample, prepare: Callable[[Image.Image, str], Prepared], caption_of: CaptionChoice | None
) -> Prepared:
    _, image, caption = decode_sample(tar, sample)
    return prepare(image, caption_of(tar, sample) if caption_of else caption)


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
    caption_of: CaptionChoice | None = None,
    excluded_uids: frozenset[str] = frozenset(),
) -> Iterator[list[Prepared]]:
    """Shuffled batches of prepared samples, epoch after epoch, until exactly `total_samples` are handed out;
    each sample with its own caption, or the one `caption_of` chooses.

    A batch never spans two epochs, so no batch holds a sample twice (in-batch negatives stay distinct), and
    the last epoch stops where the budget does. The same seed and tars give the same batches (tars are read in
    canonical order, whatever order their samples were written in).
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
        samples = _shuffled_epoch(tars, rng, shuffle_buffer, excluded_uids)
        for size in epoch_batch_sizes(min(pairs_per_epoch, remaining), batch_size):
            batch = [_prepared(tar, sample, prepare, caption_of) for tar, sample in itertools.islice(samples, size)]
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
    loss: Callable[[list[Prepared]], torch.Tensor],
    budget: TrainingBudget,
    *,
    pairs: int | None = None,
    batch_size: int,
    learning_rate: float,
    seed: int,
    device: torch.device,
    shuffle_buffer: int = SHUFFLE_BUFFER,
    synthetic_caption_probability: float | None = None,
    description: str = "training",
    excluded_uids: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """AdamW with gradient clipping and a warm-up/cosine schedule over streamed batches, until the budget is spent.

    `pairs` is the number of samples in the tars when the caller knows it (the training set counted them);
    otherwise the tars are walked once to count. Samples whose uid is in `excluded_uids` (what dedup removed from
    the full pool) are skipped, and not counted in `pairs`. With `synthetic_caption_probability` (recap_mix_p), each
    sample's synthetic caption is drawn with that probability (`mixed_captions`). Returns JSON-ready metrics:
    the per-step loss curve, steps, samples seen and epochs completed (fractional when the budget ends inside an
    epoch).
    """
    paths = [Path(t) for t in tars]
    pairs_per_epoch = count_pairs(paths, excluded_uids) if pairs is None else pairs
    total = budget.total_samples(pairs_per_epoch)
    caption_of = (
        mixed_captions(synthetic_caption_probability, seed) if synthetic_caption_probability is not None else None
    )
    batches = training_batches(
        paths, preprocessor.prepare, pairs_per_epoch, total, batch_size, seed, shuffle_buffer, caption_of, excluded_uids
    )
    torch.manual_seed(seed)
    optimizer = adamw(model.parameters(), learning_rate)
    started = time.perf_counter()
    try:
        log = train_on_batches(
            model,
            optimizer,
            batches,
            loss,
            device,
            learning_rate_at=lambda seen: learning_rate * learning_rate_factor(seen / total),
            description=description,
            total_samples=total,
        )
    except FloatingPointError as error:
        raise FloatingPointError(f"{error} on {[str(p) for p in paths]}") from error
    seconds = time.perf_counter() - started
    seen = log.samples_seen
    return {
        "loss": log.losses,
        "steps": len(log.losses),
        "samples_seen": seen,
        "pairs_per_epoch": pairs_per_epoch,
        "epochs_completed": seen / pairs_per_epoch,
        "budget": asdict(budget),
        "tars": len(paths),
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "synthetic_caption_probability": synthetic_caption_probability,
        "device": str(device),
        "seconds": seconds,
        "samples_per_second": seen / max(seconds, 1e-9),
    }


def train_built_model(
    build: Callable[[str, int], tuple[PreTrainedModel, PairPreprocessor]],
    batch_loss: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor],
    kind: str,
    tars: Sequence[Path | str],
    budget: TrainingBudget,
    *,
    pairs: int | None = None,
    source: str,
    image_size: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    device: str | None,
    synthetic_caption_probability: float | None = None,
    description: str | None = None,
    excluded_uids: frozenset[str] = frozenset(),
) -> TrainedModel:
    """A model built by `build(source, image_size)` (seeded first, so its initial weights repeat) and trained
    with `batch_loss(model, batch on the device)` on the tars until the budget is spent (captions mixed as
    `train_on_tars` says); metrics name `kind` and the source."""
    torch.manual_seed(seed)
    model, preprocessor = build(source, image_size)
    target = pick_device(device)
    metrics = train_on_tars(
        model,
        preprocessor,
        tars,
        collated_loss(model, preprocessor, batch_loss, target),
        budget,
        pairs=pairs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        device=target,
        synthetic_caption_probability=synthetic_caption_probability,
        description=description or f"{kind}: training",
        excluded_uids=excluded_uids,
    )
    return TrainedModel(model, preprocessor, {"model": kind, "source": describe_source(source), **metrics})
