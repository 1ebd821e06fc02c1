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
from ca_platform.audit import AuditFailed, StagedOutput, audit_and_publish
from ca_platform.ingest.download import downloaded_rows, fetch_downloaded_tars, read_download_ledger
from ca_platform.ingest.quality import SCORE_CHECKS, CheckOutcome, check_scores
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


def score_shard(
    store: DataStore,
    scorer: PairScorer,
    kind: str,
    shard: str,
    run_id: str,
    scratch: Path,
    batch_size: int,
    num_workers: int,
) -> ShardScores:
    """Score one shard's downloaded pairs, audit them against its ledger and publish its scores parquet if
    they pass (AuditFailed otherwise, the attempt kept under rejected/); a file of this version that already
    covers exactly the shard's downloaded uids is reused instead."""
    from ca_platform.scoring.streaming import score_tars

    key = layout.scores_key(kind, scorer.version, shard)
    ledger = read_download_ledger(store, shard, scratch / "ledger")
    if store.exists(key):
        existing = pl.read_parquet(fetch_to_local(store, key, scratch / "existing"))
        if existing[schemas.UID].sort().equals(downloaded_rows(ledger)[schemas.UID].sort()):
            return ShardScores(shard, existing, check_scores(existing, ledger)[0], reused=True)
    tars = fetch_downloaded_tars(store, shard, ledger, scratch / "in")
    scored = score_tars(tars, scorer, batch_size=batch_size, num_workers=num_workers)
    frame = scored.with_columns(
        pl.lit(shard).alias(schemas.SHARD),
        pl.lit(kind).alias("scorer"),
        pl.lit(scorer.version).alias("model_version"),
        score_normalisation(scorer).alias("score_norm"),
    )
    frame = schemas.conform(frame, schemas.SCORES)
    local = scratch / "scores.parquet"
    frame.write_parquet(local)
    outcomes = check_scores(frame, ledger)
    audit_and_publish(store, StagedOutput(layout.scores_step(kind), shard, run_id, {}, key, local), outcomes)
    return ShardScores(shard, frame, outcomes[0], reused=False)


def _failed_shards(kind: str, version: str, failures: dict[str, Exception]) -> Exception:
    """One error naming every failed shard with its reason; an AuditFailed (carrying one merged uid-coverage
    outcome for the run's check) when some failed their audit."""
    what = f"{kind} {version}: {len(failures)} shards failed: " + "; ".join(f"{s}: {e}" for s, e in failures.items())
    audits = {shard: error for shard, error in failures.items() if isinstance(error, AuditFailed)}
    if not audits:
        return RuntimeError(what)
    per_shard = {shard: error.outcomes[0].metadata for shard, error in audits.items()}
    merged = CheckOutcome(
        SCORE_CHECKS[0].name, False, {"reason": f"failed for shards {', '.join(audits)}", **per_shard}
    )
    return AuditFailed(what, [merged], ", ".join(error.rejected_uri for error in audits.values()))


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
) -> ScoringRun:
    """Score `shards` with the current version of `kind`, the model loaded once for all of them.

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
    for shard in shards:
        try:
            with attempt(layout.scores_step(kind), shard) as scratch:
                result = score_shard(store, scorer, kind, shard, run_id, scratch, batch_size, num_workers)
        except Exception as error:  # one bad shard never stops the others; `attempt` quarantined it
            failures[shard] = error
            continue
        if not result.reused:
            refresh([layout.scores_key(kind, scorer.version, shard)])
        results.append(result)
    if failures:
        raise _failed_shards(kind, scorer.version, failures)
    return ScoringRun(kind, scorer.version, results)
