"""reward_scores: every downloaded pair of a shard scored by the current reward model version."""

import polars as pl
from dagster import AssetExecutionContext, Failure, MaterializeResult, MetadataValue, asset

from ca_platform import layout, schemas
from ca_platform.assets.downloads import downloaded_shard
from ca_platform.assets.partitions import pool_shards
from ca_platform.assets.quality_checks import blocking_check_specs, check_results
from ca_platform.assets.reward import reward_model
from ca_platform.download import fetch_shard_download
from ca_platform.model_registry import REWARD_MODEL, NoModelError, current_model, load_scorer
from ca_platform.quality import SCORE_CHECKS, check_scores
from ca_platform.resources import PlatformStorage, ScoringConfig
from ca_platform.reward_model import RewardScorer
from ca_platform.schemas import SHARD
from ca_platform.scoring import score_tars


@asset(
    partitions_def=pool_shards,
    deps=[downloaded_shard, reward_model],
    check_specs=blocking_check_specs("reward_scores", SCORE_CHECKS),
    group_name="reward",
    kinds={"pytorch", "parquet"},
)
def reward_scores(
    context: AssetExecutionContext, storage: PlatformStorage, scoring: ScoringConfig
) -> MaterializeResult:
    """Streams the shard's tars through DataLoader workers (decode, preprocess, tokenize) into batched
    scoring on CUDA with bf16 when present; writes uid, score, score_norm under the model version."""
    shard = context.partition_key
    data = storage.data_store()
    with storage.staging_dir(f"scores-{shard}") as staging:
        try:
            current = current_model(data, REWARD_MODEL, staging)
        except NoModelError as error:
            raise Failure(f"{error}: materialize reward_model first") from error
        scorer = load_scorer(data, REWARD_MODEL, current, storage.cache_dir(), scoring.device)
        assert isinstance(scorer, RewardScorer)
        version = scorer.version
        ledger, tars = fetch_shard_download(data, shard, staging / "in")
        scored = score_tars(tars, scorer, batch_size=scoring.batch_size, num_workers=scoring.num_workers)
        frame = scored.with_columns(
            pl.lit(shard).alias(SHARD),
            pl.lit(REWARD_MODEL).alias("scorer"),
            pl.lit(version).alias("model_version"),
            ((pl.col("score") - scorer.loaded.mean) / scorer.loaded.std).alias("score_norm"),
        )
        frame = schemas.conform(frame, schemas.SCORES)
        local = staging / "scores.parquet"
        frame.write_parquet(local)
        key = layout.scores_key(REWARD_MODEL, version, shard)
        data.put_file(local, key, consume=True)
    storage.refresh_analytics([key])
    return MaterializeResult(
        metadata={
            "model_version": version,
            "pairs": frame.height,
            "score_mean": float(frame["score"].mean()) if frame.height else 0.0,
            "score_std": float(frame["score"].std()) if frame.height > 1 else 0.0,
            "path": MetadataValue.path(data.uri_of(key)),
        },
        check_results=check_results(check_scores(frame, ledger)),
    )
