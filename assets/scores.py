"""Per-shard scores: reward_scores and clip_scores, every downloaded pair of a shard scored by the current
version of the reward model and of CLIP score."""

import time
from collections.abc import Generator, Iterator

from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    AssetsDefinition,
    BackfillPolicy,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from ca_platform.assets.automation import ON_NEW_MODEL_VERSION
from ca_platform.assets.baselines import clip_score_model
from ca_platform.assets.ingest import downloaded_shard
from ca_platform.assets.partitions import pool_shards
from ca_platform.assets.quality_checks import audited, blocking_check_specs, check_results
from ca_platform.assets.reward import reward_model
from ca_platform.engine import current_placement
from ca_platform.ingest.quality import SCORE_CHECKS
from ca_platform.progress import rate_metadata
from ca_platform.resources import PlatformStorage, ScoringConfig
from ca_platform.schemas import CLIP_SCORE, REWARD_MODEL
from ca_platform.scoring.registry import NoModelError
from ca_platform.scoring.shards import ScoringRun, score_shards

GROUP = "scores"
SHARDS_PER_SCORING_RUN = 16


def audited_scoring(
    context: AssetExecutionContext,
    storage: PlatformStorage,
    scoring: ScoringConfig,
    kind: str,
    captioner_version: str | None = None,
) -> Generator[AssetCheckResult, None, ScoringRun]:
    """The run's shards scored by the current `kind` (their own captions, or `captioner_version`'s candidates),
    each under its lock and audited; use as `run = yield from audited_scoring(...)` in a generator asset."""
    return (
        yield from audited(
            lambda: score_shards(
                storage.data_store(),
                kind,
                context.partition_keys,
                run_id=context.run_id,
                device=scoring.device,
                batch_size=scoring.batch_size,
                num_workers=scoring.num_workers,
                cache=storage.cache_dir(),
                attempt=lambda step, shard: storage.shard_attempt(step, shard, context.run_id),
                refresh=storage.refresh_analytics,
                captioner_version=captioner_version,
            )
        )
    )


def shard_scores_asset(name: str, kind: str, model_asset: AssetsDefinition) -> AssetsDefinition:
    @asset(
        name=name,
        partitions_def=pool_shards,
        deps=[downloaded_shard, model_asset],
        check_specs=blocking_check_specs(name, SCORE_CHECKS),
        backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=SHARDS_PER_SCORING_RUN),
        automation_condition=ON_NEW_MODEL_VERSION,
        group_name=GROUP,
        kinds={"pytorch", "parquet"},
    )
    def shard_scores(
        context: AssetExecutionContext, storage: PlatformStorage, scoring: ScoringConfig
    ) -> Iterator[MaterializeResult | AssetCheckResult]:
        """Streams each shard's tars through DataLoader workers (decode, preprocess, tokenize) into batched
        scoring on CUDA with bf16 when present; writes uid, score, score_norm under the model version, beside
        older versions' scores. A shard already scored by this version is not scored again. A backfill gives
        one run up to SHARDS_PER_SCORING_RUN shards, so the model is loaded once for them. Each shard's scores
        are audited (uid coverage) before they are published; a failed shard does not stop the others."""
        started = time.monotonic()
        try:
            run = yield from audited_scoring(context, storage, scoring, kind)
        except NoModelError as error:
            raise Failure(f"{error}: materialize {model_asset.key.to_user_string()} first") from error
        for shard in run.shards:
            if shard.reused:
                context.log.info(f"shard {shard.shard} already scored by {kind} {run.model_version}: kept as is")
        per_shard = {
            s.shard: {"pairs": s.scores.height, "uid_coverage": s.coverage.passed, "reused": s.reused}
            for s in run.shards
        }
        yield MaterializeResult(
            metadata={
                "model_version": run.model_version,
                **rate_metadata(sum(s.scores.height for s in run.shards), "pairs", time.monotonic() - started),
                "shards": MetadataValue.json(per_shard),
                **current_placement().as_metadata(),
            },
            check_results=check_results([run.coverage()]),
            data_version=DataVersion(run.model_version),
        )

    return shard_scores


reward_scores = shard_scores_asset("reward_scores", REWARD_MODEL, reward_model)
clip_scores = shard_scores_asset("clip_scores", CLIP_SCORE, clip_score_model)
