"""Recaptioning: captioner_model (which captioner writes synthetic captions), synthetic_captions (a shard's
candidate captions), synthetic_caption_scores (each candidate scored by the reward model and CLIP score) and
caption_analytics (raw against synthetic captions, pool-wide)."""

from collections.abc import Iterator

from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    BackfillPolicy,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from ca_platform.analytics.captions import caption_analytics_table, write_caption_analytics
from ca_platform.analytics.plots import markdown_image, markdown_table
from ca_platform.assets.automation import ON_NEW_MODEL_VERSION
from ca_platform.assets.baselines import clip_score_model
from ca_platform.assets.ingest import downloaded_shard
from ca_platform.assets.partitions import pool_shards
from ca_platform.assets.quality_checks import audited, blocking_check_specs, check_results
from ca_platform.assets.reward import reward_model
from ca_platform.assets.scores import audited_scoring
from ca_platform.captioning.shards import (
    caption_shards,
    captioner_metadata,
    current_captioner,
    train_or_adopt_captioner,
)
from ca_platform.engine import current_placement
from ca_platform.ingest.quality import CAPTION_CHECKS, SYNTHETIC_SCORE_CHECKS, CheckOutcome
from ca_platform.progress import rate_metadata
from ca_platform.resources import CaptioningConfig, PlatformStorage, ScoringConfig
from ca_platform.schemas import CAPTION, CLIP_SCORE, RANK, REWARD_MODEL, UID
from ca_platform.scoring.registry import NoModelError, current_model

GROUP = "captions"
SHARDS_PER_CAPTIONING_RUN = 16


@asset(deps=[downloaded_shard], group_name=GROUP, kinds={"pytorch"})
def captioner_model(storage: PlatformStorage, captioning: CaptioningConfig) -> MaterializeResult:
    """The captioner: the user's local pretrained image-to-text folder, or the platform's BLIP captioner trained
    on the pool's downloaded pairs (retrained only when the pairs or the settings change). Its data version is
    the captioner version (model, prompt and decoding), so a new one re-captions every shard automatically."""
    settings = captioning.settings()
    with storage.staging_dir("captioner") as staging:
        current, trained = train_or_adopt_captioner(storage.data_store(), settings, staging)
    metrics = current.document.get("metrics", {})
    losses = metrics.get("loss", [])
    return MaterializeResult(
        metadata={
            **{
                k: v if isinstance(v, str) else MetadataValue.json(v)
                for k, v in captioner_metadata(current, settings).items()
            },
            "trained_now": trained,
            "last_loss": losses[-1] if losses else float("nan"),
        },
        data_version=DataVersion(current.version),
    )


@asset(
    partitions_def=pool_shards,
    deps=[downloaded_shard, captioner_model],
    check_specs=blocking_check_specs("synthetic_captions", CAPTION_CHECKS),
    backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=SHARDS_PER_CAPTIONING_RUN),
    automation_condition=ON_NEW_MODEL_VERSION,
    group_name=GROUP,
    kinds={"pytorch", "parquet"},
)
def synthetic_captions(
    context: AssetExecutionContext, storage: PlatformStorage, captioning: CaptioningConfig
) -> Iterator[MaterializeResult | AssetCheckResult]:
    """Candidate captions for every downloaded image of the shard: decoded and preprocessed in DataLoader
    workers, batched generation with the KV cache (bf16 on CUDA), the captioner loaded once per process.
    Written as parquet `uid, shard, captioner_version, caption, rank` under the captioner version, audited
    (every image has each candidate once) before it is published."""
    try:
        run = yield from audited(
            lambda: caption_shards(
                storage.data_store(),
                captioning.settings(),
                context.partition_keys,
                run_id=context.run_id,
                batch_size=captioning.batch_size,
                num_workers=captioning.num_workers,
                cache=storage.cache_dir(),
                attempt=lambda step, shard: storage.shard_attempt(step, shard, context.run_id),
                refresh=storage.refresh_analytics,
            )
        )
    except NoModelError as error:
        raise Failure(str(error)) from error
    tokens = sum(s.generated_tokens for s in run.shards)
    seconds = sum(s.seconds for s in run.shards)
    first = run.shards[0].captions
    yield MaterializeResult(
        metadata={
            "captioner_version": run.version,
            "captions": sum(s.captions.height for s in run.shards),
            **rate_metadata(sum(s.captions[UID].n_unique() for s in run.shards), "images", seconds),
            "generated_tokens": tokens,
            "tokens_per_second": tokens / seconds if seconds else float("nan"),
            "reused": MetadataValue.json({s.shard: s.reused for s in run.shards}),
            "examples": MetadataValue.md(
                markdown_table(["uid", "rank", "caption"], first.select(UID, RANK, CAPTION).head(6).rows())
            ),
            **current_placement().as_metadata(),
        },
        check_results=check_results([run.coverage()]),
        data_version=DataVersion(run.version),
    )


@asset(
    partitions_def=pool_shards,
    deps=[synthetic_captions, reward_model, clip_score_model],
    check_specs=blocking_check_specs("synthetic_caption_scores", SYNTHETIC_SCORE_CHECKS),
    backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=SHARDS_PER_CAPTIONING_RUN),
    automation_condition=ON_NEW_MODEL_VERSION,
    group_name=GROUP,
    kinds={"pytorch", "parquet"},
)
def synthetic_caption_scores(
    context: AssetExecutionContext, storage: PlatformStorage, scoring: ScoringConfig, captioning: CaptioningConfig
) -> Iterator[MaterializeResult | AssetCheckResult]:
    """Every synthetic candidate caption of the shard scored by the current reward model and CLIP score, in the
    same streaming scorer as the raw pairs (a pair is an image with one of its captions); written beside the
    raw scores under each model version and the captioner version, audited before publishing."""
    data = storage.data_store()
    with storage.staging_dir("captioner-pointer") as staging:
        try:
            captioner = current_captioner(data, captioning.settings(), staging)
        except NoModelError as error:
            raise Failure(str(error)) from error
    runs = []
    for kind in (REWARD_MODEL, CLIP_SCORE):
        try:
            run = yield from audited_scoring(context, storage, scoring, kind, captioner.version)
        except NoModelError as error:
            raise Failure(f"{error}: materialize reward_model and clip_score_model first") from error
        runs.append(run)
    outcome = CheckOutcome(
        SYNTHETIC_SCORE_CHECKS[0].name,
        all(run.coverage().passed for run in runs),
        {run.kind: run.coverage().metadata for run in runs},
    )
    yield MaterializeResult(
        metadata={
            "captioner_version": captioner.version,
            **{f"{run.kind}_version": run.model_version for run in runs},
            "scored_captions": sum(s.scores.height for s in runs[0].shards),
            **current_placement().as_metadata(),
        },
        check_results=check_results([outcome]),
        data_version=DataVersion("+".join([captioner.version, *(run.model_version for run in runs)])),
    )


@asset(deps=[synthetic_caption_scores], group_name=GROUP, kinds={"duckdb"})
def caption_analytics(storage: PlatformStorage, captioning: CaptioningConfig) -> MaterializeResult:
    """Raw against synthetic captions over the pool, in DuckDB: per source the mean length, vocabulary and
    distinct-trigram ratio (diversity), the reward and CLIP score distributions, and the share of images whose
    raw caption the reward model prefers to every candidate; a histogram plot. Written to
    reports/caption_analytics.json."""
    data = storage.data_store()
    with storage.staging_dir("caption-analytics") as staging:
        try:
            captioner = current_captioner(data, captioning.settings(), staging)
            reward, clip = (current_model(data, kind, staging)["version"] for kind in (REWARD_MODEL, CLIP_SCORE))
        except NoModelError as error:
            raise Failure(str(error)) from error
        figures, plot = write_caption_analytics(
            data, storage.analytics_db(), storage.analytics_root(), reward, clip, captioner.version, staging
        )
        image = markdown_image(plot, "reward and CLIP scores, raw against synthetic captions")
    return MaterializeResult(
        metadata={
            "captioner_version": captioner.version,
            "reward_model_version": reward,
            "clip_score_version": clip,
            "raw_preferred_share": figures.raw_preferred_share
            if figures.raw_preferred_share is not None
            else float("nan"),
            "images_compared": figures.images_compared,
            "by_source": MetadataValue.md(caption_analytics_table(figures)),
            "plot": MetadataValue.md(image),
        }
    )
