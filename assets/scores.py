"""reward_scores: every downloaded pair of a shard scored by the current reward model version."""

import polars as pl
from dagster import AssetExecutionContext, BackfillPolicy, Failure, MaterializeResult, MetadataValue, asset

from ca_platform import layout, schemas
from ca_platform.assets.downloads import downloaded_shard
from ca_platform.assets.partitions import pool_shards
from ca_platform.assets.quality_checks import blocking_check_specs, check_results
from ca_platform.assets.reward import reward_model
from ca_platform.download import fetch_shard_download
from ca_platform.model_registry import REWARD_MODEL, NoModelError, current_model, load_scorer
from ca_platform.quality import SCORE_CHECKS, CheckOutcome, check_scores
from ca_platform.resources import PlatformStorage, ScoringConfig
from ca_platform.reward_model import RewardScorer
from ca_platform.schemas import SHARD
from ca_platform.scoring import score_tars

SHARDS_PER_SCORING_RUN = 16


@asset(
    partitions_def=pool_shards,
    deps=[downloaded_shard, reward_model],
    check_specs=blocking_check_specs("reward_scores", SCORE_CHECKS),
    backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=SHARDS_PER_SCORING_RUN),
    group_name="reward",
    kinds={"pytorch", "parquet"},
)
def reward_scores(
    context: AssetExecutionContext, storage: PlatformStorage, scoring: ScoringConfig
) -> MaterializeResult:
    """Streams each shard's tars through DataLoader workers (decode, preprocess, tokenize) into batched
    scoring on CUDA with bf16 when present; writes uid, score, score_norm under the model version.
    A backfill gives one run up to SHARDS_PER_SCORING_RUN shards, so the model is loaded once for them."""
    data = storage.data_store()
    with storage.staging_dir("scores-model") as staging:
        try:
            current = current_model(data, REWARD_MODEL, staging)
        except NoModelError as error:
            raise Failure(f"{error}: materialize reward_model first") from error
    scorer = load_scorer(data, REWARD_MODEL, current, storage.cache_dir(), scoring.device)
    assert isinstance(scorer, RewardScorer)
    per_shard, outcomes = {}, []
    for shard in context.partition_keys:
        frame, ledger = score_shard(storage, scorer, scoring, shard)
        outcome = check_scores(frame, ledger)[0]
        outcomes.append(outcome)
        per_shard[shard] = {"pairs": frame.height, "uid_coverage": outcome.passed}
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
    )


def score_shard(
    storage: PlatformStorage, scorer: RewardScorer, scoring: ScoringConfig, shard: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Score one shard, publish its scores parquet and make it visible in DuckDB; returns scores and ledger."""
    data = storage.data_store()
    with storage.staging_dir(f"scores-{shard}") as staging:
        ledger, tars = fetch_shard_download(data, shard, staging / "in")
        scored = score_tars(tars, scorer, batch_size=scoring.batch_size, num_workers=scoring.num_workers)
        frame = scored.with_columns(
            pl.lit(shard).alias(SHARD),
            pl.lit(REWARD_MODEL).alias("scorer"),
            pl.lit(scorer.version).alias("model_version"),
            ((pl.col("score") - scorer.loaded.mean) / scorer.loaded.std).alias("score_norm"),
        )
        frame = schemas.conform(frame, schemas.SCORES)
        local = staging / "scores.parquet"
        frame.write_parquet(local)
        key = layout.scores_key(REWARD_MODEL, scorer.version, shard)
        data.put_file(local, key, consume=True)
    storage.refresh_analytics([key])
    return frame, ledger
