"""Scoring shards: every downloaded pair of a shard by the current version of a scorer, published as one
parquet file per shard and version, beside older versions' files.

Scores of one checkpoint on one image never change, so a shard already scored by a version is not scored again.

The scorers (torch, transformers) are imported where a shard is scored, not with the module: every Dagster
process loads the definitions, and most score nothing.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from ca_platform import layout, schemas
from ca_platform.audit import StagedOutput, audit_and_publish, failed_shards_error
from ca_platform.captioning.shards import read_synthetic_captions
from ca_platform.ingest.download import downloaded_rows, fetch_downloaded_tars, read_download_ledger
from ca_platform.ingest.quality import (
    SCORE_CHECKS,
    SYNTHETIC_SCORE_CHECKS,
    CheckOutcome,
    check_scores,
    check_synthetic_scores,
)
from ca_platform.scoring.registry import current_model, load_scorer
from ca_platform.storage import DataStore, fetch_to_local

if TYPE_CHECKING:
    from ca_platform.scoring.scorer import PairScorer


@dataclass(frozen=True)
class ShardScores:
    shard: str
    scores: pl.DataFrame  # schemas.SCORES
    coverage: CheckOutcome  # the scored uids against the shard's ledger
    reused: bool  # an existing file of this version covered the shard's downloads
    key: str  # the score file


@dataclass(frozen=True)
class ScoringRun:
    kind: str
    model_version: str
    shards: list[ShardScores]

    def coverage(self) -> CheckOutcome:
        """One uid-coverage outcome for all the run's shards: passed when every shard's did."""
        outcomes = [s.coverage for s in self.shards]
        return CheckOutcome(
            outcomes[0].name, all(o.passed for o in outcomes), {s.shard: s.coverage.metadata for s in self.shards}
        )


def score_normalisation(scorer: PairScorer) -> pl.Expr:
    """`score_norm`: the reward model's (score - mean) / std over its training preferences; null for scorers
    with no normalisation statistics of their own (CLIP's cosine, BLIP's match probability)."""
    from ca_platform.scoring.reward.scorer import RewardScorer

    if isinstance(scorer, RewardScorer):
        return (pl.col("score") - scorer.loaded.mean) / scorer.loaded.std
    return pl.lit(None, dtype=pl.Float64)


@dataclass(frozen=True)
class _ShardPairs:
    """What scoring one shard covers: its images with their own captions, or with a captioner's candidates."""

    key: str  # the score file
    step: str  # the step name its staging, lock and quarantine entries carry
    expected: pl.DataFrame  # uid and caption_rank of every pair to score
    candidates: dict[str, list[tuple[int, str]]] | None  # uid -> (rank, caption), for synthetic captions
    captioner_version: str | None
    audit: Callable[[pl.DataFrame], list[CheckOutcome]]


def _shard_pairs(
    store: DataStore, kind: str, version: str, shard: str, ledger: pl.DataFrame, captioner: str | None, scratch: Path
) -> _ShardPairs:
    if captioner is None:
        expected = downloaded_rows(ledger).select(schemas.UID, pl.lit(None, pl.Int32).alias(schemas.CAPTION_RANK))
        return _ShardPairs(
            layout.scores_key(kind, version, shard),
            layout.scores_step(kind),
            expected,
            None,
            None,
            lambda frame: check_scores(frame, ledger),
        )
    captions = read_synthetic_captions(store, captioner, shard, scratch)
    candidates: dict[str, list[tuple[int, str]]] = {}
    for uid, rank, caption in captions.select(schemas.UID, schemas.RANK, schemas.CAPTION).iter_rows():
        candidates.setdefault(uid, []).append((rank, caption))
    return _ShardPairs(
        layout.synthetic_scores_key(kind, version, captioner, shard),
        layout.synthetic_scores_step(kind),
        captions.select(schemas.UID, pl.col(schemas.RANK).alias(schemas.CAPTION_RANK)),
        candidates,
        captioner,
        lambda frame: check_synthetic_scores(frame, captions),
    )


def score_shard(
    store: DataStore,
    scorer: PairScorer,
    kind: str,
    shard: str,
    run_id: str,
    scratch: Path,
    batch_size: int,
    num_workers: int,
    captioner_version: str | None = None,
) -> ShardScores:
    """Score one shard's downloaded pairs (with `captioner_version`: its images with each synthetic caption of
    that captioner instead), audit them against the ledger (the captions table) and publish the scores parquet
    if they pass (AuditFailed otherwise, the attempt kept under rejected/); a file of this version that already
    covers exactly the same pairs is reused instead."""
    from ca_platform.scoring.streaming import score_tars

    ledger = read_download_ledger(store, shard, scratch / "ledger")
    pairs = _shard_pairs(store, kind, scorer.version, shard, ledger, captioner_version, scratch / "captions")
    pair_key = [schemas.UID, schemas.CAPTION_RANK]
    if store.exists(pairs.key):
        existing = pl.read_parquet(fetch_to_local(store, pairs.key, scratch / "existing"))
        if existing.select(pair_key).sort(pair_key).equals(pairs.expected.select(pair_key).sort(pair_key)):
            return ShardScores(shard, existing, pairs.audit(existing)[0], reused=True, key=pairs.key)
    tars = fetch_downloaded_tars(store, shard, ledger, scratch / "in")
    what = f"{kind} {shard}" + (f" synthetic captions {captioner_version}" if captioner_version else "")
    scored = score_tars(
        tars, scorer, batch_size=batch_size, num_workers=num_workers, candidates=pairs.candidates, description=what
    )
    frame = scored.with_columns(
        pl.lit(shard).alias(schemas.SHARD),
        pl.lit(kind).alias("scorer"),
        pl.lit(scorer.version).alias("model_version"),
        score_normalisation(scorer).alias("score_norm"),
        pl.lit(schemas.SYNTHETIC_CAPTION if captioner_version else schemas.RAW_CAPTION).alias("caption_source"),
        pl.lit(captioner_version, dtype=pl.String).alias(schemas.CAPTIONER_VERSION),
    )
    frame = schemas.conform(frame, schemas.SCORES)
    local = scratch / "scores.parquet"
    frame.write_parquet(local)
    outcomes = pairs.audit(frame)
    audit_and_publish(store, StagedOutput(pairs.step, shard, run_id, {}, pairs.key, local), outcomes)
    return ShardScores(shard, frame, outcomes[0], reused=False, key=pairs.key)


def score_shards(
    store: DataStore,
    kind: str,
    shards: Sequence[str],
    *,
    run_id: str,
    device: str | None,
    batch_size: int,
    num_workers: int,
    cache: Path,
    attempt: Callable[[str, str], AbstractContextManager[Path]],
    refresh: Callable[[list[str]], None],
    captioner_version: str | None = None,
) -> ScoringRun:
    """Score `shards` with the current version of `kind`, the model loaded once for all of them; with
    `captioner_version`, the shards' synthetic captions of that captioner rather than their own captions.

    `attempt(step, shard)` holds the shard's lock and gives a private staging folder; `refresh(keys)` makes
    newly written score files visible to the DuckDB views. A shard that fails (its audit, or an error) does not
    stop the others: they are published, then one error names every failed shard. Raises NoModelError when
    `kind` has no current version.
    """
    with tempfile.TemporaryDirectory(prefix="ca-current-model-") as scratch:
        document = current_model(store, kind, Path(scratch))
    scorer = load_scorer(store, kind, document, cache, device)
    results: list[ShardScores] = []
    failures: dict[str, Exception] = {}
    step = layout.synthetic_scores_step(kind) if captioner_version else layout.scores_step(kind)
    for shard in shards:
        try:
            with attempt(step, shard) as scratch:
                result = score_shard(
                    store, scorer, kind, shard, run_id, scratch, batch_size, num_workers, captioner_version
                )
        except Exception as error:  # one bad shard never stops the others; `attempt` quarantined it
            failures[shard] = error
            continue
        if not result.reused:
            refresh([result.key])
        results.append(result)
    if failures:
        check = (SYNTHETIC_SCORE_CHECKS if captioner_version else SCORE_CHECKS)[0].name
        raise failed_shards_error(f"{kind} {scorer.version}", failures, check)
    return ScoringRun(kind, scorer.version, results)
