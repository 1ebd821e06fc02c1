"""Captioning every image of a shard's webdataset tars: decoding in DataLoader workers, generating in the main
process.

Workers stride over the samples (worker k of n takes those whose running index is k mod n), so their batches
interleave. The main process puts the samples back in the tars' order and cuts its own batches of consecutive
samples: the frame comes out in the tars' sample order, and sampled captions (seeded per batch) are the same
whatever the worker count.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ca_platform import schemas
from ca_platform.captioning.captioner import Captioner
from ca_platform.captioning.decoding import DecodingSettings
from ca_platform.ingest.webdataset_io import SampleError, decode_sample, iter_samples_strided
from ca_platform.models.devices import cpu_budget
from ca_platform.progress import Task

Transform = Callable[[Image.Image], torch.Tensor]
PreparedImages = tuple[list[int], list[str], torch.Tensor]  # running indices, uids, pixels [n, ...]


@dataclass(frozen=True)
class CaptionedTars:
    """The candidate captions of every sample of some tars, and what writing them cost."""

    frame: pl.DataFrame  # uid (String), rank (Int32, 0 = best), caption (String); tars' sample order, then rank
    generated_tokens: int
    seconds: float  # wall time of the generation loop


@dataclass(frozen=True)
class _Undecodable:
    """A SampleError's message, carried out of a worker as data (raised there, the DataLoader would wrap it and
    wait seconds for the worker at shutdown)."""

    message: str


class _PreparedTarImages(IterableDataset):
    """(running index, uid, pixels) of worker k of n's samples: those whose running index is k mod n.

    Every worker walks every tar's headers but reads only its own samples' bytes. A sample that does not decode
    ends the worker's stream with an `_Undecodable`.
    """

    def __init__(self, tars: Sequence[Path], transform: Transform) -> None:
        self.tars = list(tars)
        self.transform = transform

    def __iter__(self) -> Iterator[tuple[int, str, torch.Tensor] | _Undecodable]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for position, (tar, sample) in enumerate(iter_samples_strided(self.tars, worker, workers)):
            try:
                uid, image, _ = decode_sample(tar, sample)
            except SampleError as error:
                yield _Undecodable(str(error))
                return
            yield position * workers + worker, uid, self.transform(image)


def _collate_images(items: list[tuple[int, str, torch.Tensor] | _Undecodable]) -> PreparedImages | _Undecodable:
    failed = [item for item in items if isinstance(item, _Undecodable)]
    if failed:
        return failed[0]
    return [index for index, _, _ in items], [uid for _, uid, _ in items], torch.stack([px for _, _, px in items])


def _one_thread_per_worker(worker_id: int) -> None:
    """DataLoader worker init: one torch thread each, so workers and the model do not oversubscribe the cores."""
    torch.set_num_threads(1)


def in_sample_order(batches: Iterable[PreparedImages], batch_size: int) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(uids, pixels) of consecutive samples, `batch_size` at a time, from batches of indexed samples in any order.

    Holds back samples until every earlier one has arrived; the running indices must be 0, 1, 2, ... with no gap.
    """
    waiting: dict[int, tuple[str, torch.Tensor]] = {}
    next_index = 0

    def take(count: int) -> tuple[list[str], torch.Tensor]:
        nonlocal next_index
        ready = [waiting.pop(next_index + offset) for offset in range(count)]
        next_index += count
        return [uid for uid, _ in ready], torch.stack([pixels for _, pixels in ready])

    for indices, uids, pixels in batches:
        waiting.update(zip(indices, zip(uids, pixels)))
        while all(next_index + offset in waiting for offset in range(batch_size)):
            yield take(batch_size)
    if waiting:
        if sorted(waiting) != list(range(next_index, next_index + len(waiting))):
            raise RuntimeError(f"samples {sorted(waiting)[:5]}... arrived without samples before them")
        yield take(len(waiting))


def prepared_images(
    tars: Sequence[Path], transform: Transform, batch_size: int = 32, num_workers: int = 2
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(uids, pixels) of every sample of the tars in their order, `batch_size` consecutive samples a batch,
    decoded and transformed in DataLoader workers.

    A sample whose image does not decode raises SampleError naming the tar and key.

    Each worker hands over `batch_size / num_workers` samples at a time: a batch of consecutive samples needs
    every worker's share of it, so worker batches of the full size would hold the first batch back until each
    worker had decoded a whole batch (num_workers batches in all; on a GPU, the whole of a small shard decoded
    before the model starts).
    """
    loader = DataLoader(
        _PreparedTarImages([Path(t) for t in tars], transform),
        batch_size=-(-batch_size // max(1, num_workers)),
        num_workers=num_workers,
        collate_fn=_collate_images,
        worker_init_fn=_one_thread_per_worker,
        prefetch_factor=4 if num_workers else None,
        generator=torch.Generator(),  # its own seed for the workers, so the caller's random state is left alone
    )

    def checked() -> Iterator[PreparedImages]:
        for item in loader:
            if isinstance(item, _Undecodable):
                raise SampleError(item.message)
            yield item

    yield from in_sample_order(checked(), batch_size)


@contextlib.contextmanager
def _model_threads_within(budget: int) -> Iterator[None]:
    """The model's torch threads: the caller's, at most the CPU budget.

    Unlike scoring, no cores are set aside for the decoding workers: generating a caption costs tens of times
    what decoding its image does (benchmarks/captioning.py), so the workers decode ahead in short bursts and wait
    on the prefetch queue, and a model held to the cores they leave would run idle most of the time.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, budget)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def caption_tars(
    tars: Sequence[Path],
    captioner: Captioner,
    settings: DecodingSettings,
    batch_size: int = 32,
    num_workers: int = 2,
    description: str = "images",
) -> CaptionedTars:
    """Decode and preprocess the tars' images in DataLoader workers (as scoring/streaming.py's prepared_batches
    does: strided by sample with webdataset_io.iter_samples_strided, one torch thread per worker, cpu_budget()
    respected, an undecodable image raises webdataset_io.SampleError naming tar and key), generate in the main
    process. Batch k uses seed_offset=k so sampling is reproducible.

    Batches are cut from consecutive samples in the tars' order whatever the worker count, so the frame follows
    that order and sampled captions are the same with any `num_workers`. Progress is reported as `description`.
    """
    budget = cpu_budget()
    num_workers = min(num_workers, budget)  # a one-CPU Ray actor decodes in one worker, not two
    uids: list[str] = []
    captions: list[str] = []
    tokens = 0
    start = time.perf_counter()
    with _model_threads_within(budget), Task(f"{description}: captioning", unit="image") as task:
        batches = prepared_images(tars, captioner.transform, batch_size, num_workers)
        for index, (batch_uids, pixels) in enumerate(batches):
            batch = captioner.caption_batch(pixels, settings, seed_offset=index)
            uids.extend(batch_uids)
            captions.extend(caption for candidates in batch.captions for caption in candidates)
            tokens += batch.generated_tokens
            task.advance(len(batch_uids))
    seconds = time.perf_counter() - start
    ranks = range(settings.candidates)
    frame = pl.DataFrame(
        {
            schemas.UID: pl.Series([uid for uid in uids for _ in ranks], dtype=pl.String),
            schemas.RANK: pl.Series([rank for _ in uids for rank in ranks], dtype=pl.Int32),
            schemas.CAPTION: pl.Series(captions, dtype=pl.String),
        }
    )
    return CaptionedTars(frame, tokens, seconds)
