"""Streaming a shard's webdataset tars through a `PairScorer`, and scoring in-memory pairs.

Decoding and preprocessing run in DataLoader workers (each sees every tar's headers but reads only its own
samples' bytes), the model in the main process, so a GPU is fed while the CPUs decode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ca_platform.ingest.webdataset_io import SampleError, decode_sample, iter_samples_strided
from ca_platform.models.devices import cpu_budget
from ca_platform.models.preprocessing import Prepared
from ca_platform.scoring.scorer import PairScorer


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
                uid, image, caption = decode_sample(tar, sample)
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
def _cores_left_to_workers(budget: int, num_workers: int) -> Iterator[None]:
    """On the CPU, give the model only the cores of its budget the decoding workers leave, so they do not fight
    over them."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, budget - num_workers))
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
    budget = cpu_budget()
    num_workers = min(num_workers, budget)  # a one-CPU Ray actor decodes in one worker, not two
    with _cores_left_to_workers(budget, num_workers):
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
