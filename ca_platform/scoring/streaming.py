"""Streaming a shard's webdataset tars through a `PairScorer`, and scoring in-memory pairs.

Decoding and preprocessing run in DataLoader workers (each sees every tar's headers but reads only its own
samples' bytes), the model in the main process, so a GPU is fed while the CPUs decode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ca_platform import schemas
from ca_platform.ingest.webdataset_io import SampleError, decode_sample, iter_samples_strided
from ca_platform.models.devices import cpu_budget
from ca_platform.models.preprocessing import Prepared
from ca_platform.progress import Task
from ca_platform.scoring.scorer import PairScorer


@dataclass(frozen=True)
class _Unscorable:
    """A SampleError's message, carried out of a worker as data.

    Raised in the worker, the DataLoader would wrap the message in its own and, at shutdown, wait seconds
    for that worker before killing it.
    """

    message: str


# Candidate captions to score instead of the tars' own: uid -> (caption rank, caption) of each candidate.
Candidates = Mapping[str, Sequence[tuple[int, str]]]
PairId = tuple[str, int | None]  # (uid, caption rank); the rank is None for the tar's own caption


class _PreparedTarPairs(IterableDataset):
    """(pair id, prepared) per pair; worker k of n takes the samples whose running index is k mod n.

    A pair is a sample's image with its own caption, or, given `candidates`, with each of its candidate
    captions (the image decoded once for all of them). Striding by sample rather than by tar keeps workers
    evenly loaded whatever the tar count; each worker walks every tar's headers but reads only its own
    samples' bytes. A sample that does not decode ends the worker's stream with an `_Unscorable`.
    """

    def __init__(
        self,
        tars: Sequence[Path],
        prepare: Callable[[Image.Image, str], Prepared],
        candidates: Candidates | None = None,
    ) -> None:
        self.tars = list(tars)
        self.prepare = prepare
        self.candidates = candidates

    def __iter__(self) -> Iterator[tuple[PairId, Prepared] | _Unscorable]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for tar, sample in iter_samples_strided(self.tars, worker, workers):
            try:
                uid, image, caption = decode_sample(tar, sample)
            except SampleError as error:
                yield _Unscorable(str(error))
                return
            if self.candidates is None:
                yield (uid, None), self.prepare(image, caption)
                continue
            for rank, candidate in self.candidates.get(uid, ()):
                yield (uid, rank), self.prepare(image, candidate)


def _one_thread_per_worker(worker_id: int) -> None:
    """DataLoader worker init: one torch thread each, so workers and the model do not oversubscribe the cores."""
    torch.set_num_threads(1)


@dataclass(frozen=True)
class _CollateWithUids:
    """The scorer's collate, with the batch's uids kept alongside (a class, so workers can unpickle it)."""

    collate: Callable[[list[Prepared]], dict[str, Any]]

    def __call__(
        self, items: list[tuple[PairId, Prepared] | _Unscorable]
    ) -> tuple[list[PairId], dict[str, Any]] | _Unscorable:
        failed = [item for item in items if isinstance(item, _Unscorable)]
        if failed:
            return failed[0]
        return [pair for pair, _ in items], self.collate([prepared for _, prepared in items])


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
    tars: Sequence[Path],
    scorer: PairScorer,
    batch_size: int = 64,
    num_workers: int = 2,
    candidates: Candidates | None = None,
) -> Iterator[tuple[list[PairId], dict[str, Any]]]:
    """(pair ids, collated batch) of every pair of the tars (see `_PreparedTarPairs`), decoded and prepared in
    DataLoader workers.

    A sample whose image does not decode raises SampleError naming the tar and key.
    """
    loader = DataLoader(
        _PreparedTarPairs([Path(t) for t in tars], scorer.prepare, candidates),
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


def score_tars(
    tars: Sequence[Path],
    scorer: PairScorer,
    batch_size: int = 64,
    num_workers: int = 2,
    candidates: Candidates | None = None,
    description: str = "pairs",
) -> pl.DataFrame:
    """Score every pair of the tars: each sample with its own caption, or with each of its `candidates`; one
    row per pair, columns `uid` (str), `caption_rank` (int32, null for the sample's own caption) and `score`
    (float64).

    A sample whose image does not decode raises SampleError naming the tar and key, so no sample drops out
    unnoticed; the caller decides what a failed shard means. Progress is reported as `description`.
    """
    pairs: list[PairId] = []
    scores: list[np.ndarray] = []
    budget = cpu_budget()
    num_workers = min(num_workers, budget)  # a one-CPU Ray actor decodes in one worker, not two
    with _cores_left_to_workers(budget, num_workers), Task(f"{description}: scoring", unit="pair") as task:
        for batch_pairs, batch in prepared_batches(tars, scorer, batch_size, num_workers, candidates):
            pairs.extend(batch_pairs)
            scores.append(scorer.score_batch(batch).float().numpy())
            task.advance(len(batch_pairs))
    values = np.concatenate(scores).astype(np.float64) if scores else np.zeros(0)
    return pl.DataFrame(
        {
            schemas.UID: pl.Series([uid for uid, _ in pairs], dtype=pl.String),
            schemas.CAPTION_RANK: pl.Series([rank for _, rank in pairs], dtype=pl.Int32),
            "score": pl.Series(values, dtype=pl.Float64),
        }
    )


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
