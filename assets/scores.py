"""reward_scores and clip_scores: every downloaded pair of a shard scored by the current model version."""

from collections.abc import Callable

import polars as pl
from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    BackfillPolicy,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from ca_platform import layout, schemas
from ca_platform.assets.automation import ON_NEW_MODEL_VERSION
from ca_platform.assets.baselines import clip_score_model
from ca_platform.assets.downloads import downloaded_shard
from ca_platform.assets.partitions import pool_shards
from ca_platform.assets.quality_checks import blocking_check_specs, check_results
from ca_platform.assets.reward import reward_model
from ca_platform.ingest.download import fetch_downloaded_tars
from ca_platform.ingest.quality import SCORE_CHECKS, CheckOutcome, check_scores
from ca_platform.resources import PlatformStorage, ScoringConfig
from ca_platform.schemas import CLIP_SCORE, REWARD_MODEL
from ca_platform.scoring.registry import NoModelError, current_model, load_scorer
from ca_platform.scoring.reward.model import RewardScorer
from ca_platform.scoring.scorer import PairScorer
from ca_platform.scoring.streaming import score_tars
from ca_platform.storage import fetch_to_local

SHARDS_PER_SCORING_RUN = 16


def _reward_norm(scorer: PairScorer) -> pl.Expr:
    """The reward model's own normalisation: (score - mean) / std over its training preferences."""
    assert isinstance(scorer, RewardScorer)
    return (pl.col("score") - scorer.loaded.mean) / scorer.loaded.std


def _no_norm(scorer: PairScorer) -> pl.Expr:
    """CLIP's cosine has no normalisation statistics of its own; score_norm stays null."""
    return pl.lit(None, dtype=pl.Float64)


def shard_scores_asset(
    name: str, kind: str, model_asset: AssetsDefinition, normalised: Callable[[PairScorer], pl.Expr]
) -> AssetsDefinition:
    @asset(
        name=name,
        partitions_def=pool_shards,
        deps=[downloaded_shard, model_asset],
        check_specs=blocking_check_specs(name, SCORE_CHECKS),
        backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=SHARDS_PER_SCORING_RUN),
        automation_condition=ON_NEW_MODEL_VERSION,
        group_name="scores",
        kinds={"pytorch", "parquet"},
    )
    def shard_scores(
        context: AssetExecutionContext, storage: PlatformStorage, scoring: ScoringConfig
    ) -> MaterializeResult:
        """Streams each shard's tars through DataLoader workers (decode, preprocess, tokenize) into batched
        scoring on CUDA with bf16 when present; writes uid, score, score_norm under the model version, beside
        older versions' scores. A shard already scored by this version is not scored again. A backfill gives
        one run up to SHARDS_PER_SCORING_RUN shards, so the model is loaded once for them."""
        data = storage.data_store()
        with storage.staging_dir(f"{name}-model") as staging:
            try:
                current = current_model(data, kind, staging)
            except NoModelError as error:
                raise Failure(f"{error}: materialize {model_asset.key.to_user_string()} first") from error
        scorer = load_scorer(data, kind, current, storage.cache_dir(), scoring.device)
        per_shard, outcomes = {}, []
        for shard in context.partition_keys:
            frame, ledger, reused = score_shard(storage, scorer, kind, normalised(scorer), scoring, shard)
            if reused:
                context.log.info(f"shard {shard} already scored by {kind} {scorer.version}: kept as is")
            outcome = check_scores(frame, ledger)[0]
            outcomes.append(outcome)
            per_shard[shard] = {"pairs": frame.height, "uid_coverage": outcome.passed, "reused": reused}
        combined = CheckOutcome(
            outcomes[0].name, all(o.passed for o in outcomes), {s: o.metadata for s, o in zip(per_shard, outcomes)}
        )
        return MaterializeResult(
            metadata={
                "model_version": scorer.version,
                "pairs": sum(v["pairs"] for v in per_shard.values()),
                "shards": MetadataValue.json(per_shard),
            },
            check_results=check_results([combined]),
            data_version=DataVersion(scorer.version),
        )

    return shard_scores


def score_shard(
    storage: PlatformStorage, scorer: PairScorer, kind: str, norm: pl.Expr, scoring: ScoringConfig, shard: str
) -> tuple[pl.DataFrame, pl.DataFrame, bool]:
    """Score one shard, publish its scores parquet and make it visible in DuckDB.

    Returns scores, ledger and whether an existing file of this version covering exactly the shard's
    downloaded uids was reused instead (scores of one checkpoint on one image never change).
    """
    data = storage.data_store()
    key = layout.scores_key(kind, scorer.version, shard)
    with storage.staging_dir(f"scores-{kind}-{shard}") as staging:
        ledger = pl.read_parquet(fetch_to_local(data, layout.download_rows_key(shard), staging / "ledger"))
        if data.exists(key):
            existing = pl.read_parquet(fetch_to_local(data, key, staging / "existing"))
            downloaded = ledger.filter(pl.col(schemas.STATUS) == schemas.Status.SUCCESS)[schemas.UID]
            if existing[schemas.UID].sort().equals(downloaded.sort()):
                return existing, ledger, True
        tars = fetch_downloaded_tars(data, shard, ledger, staging / "in")
        scored = score_tars(tars, scorer, batch_size=scoring.batch_size, num_workers=scoring.num_workers)
        frame = scored.with_columns(
            pl.lit(shard).alias(schemas.SHARD),
            pl.lit(kind).alias("scorer"),
            pl.lit(scorer.version).alias("model_version"),
            norm.alias("score_norm"),
        )
        frame = schemas.conform(frame, schemas.SCORES)
        local = staging / "scores.parquet"
        frame.write_parquet(local)
        data.put_file(local, key, consume=True)
    storage.refresh_analytics([key])
    return frame, ledger, False


reward_scores = shard_scores_asset("reward_scores", REWARD_MODEL, reward_model, _reward_norm)
clip_scores = shard_scores_asset("clip_scores", CLIP_SCORE, clip_score_model, _no_norm)
