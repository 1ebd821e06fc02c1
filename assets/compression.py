"""Compression: score_threshold (the global cut of every subset variant) and compressed_subset (each shard's
kept pairs of every variant, re-packed for training)."""

from collections.abc import Iterator

from dagster import AssetCheckResult, AssetExecutionContext, MaterializeResult, MetadataValue, asset

from ca_platform import layout
from ca_platform.analytics.plots import markdown_image, markdown_table
from ca_platform.assets.automation import ON_SCORES_UPDATE, ON_THRESHOLD_UPDATE
from ca_platform.assets.captions import synthetic_caption_scores, synthetic_captions
from ca_platform.assets.dedup import duplicate_groups
from ca_platform.assets.ingest import downloaded_shard
from ca_platform.assets.partitions import pool_shards, register_training_sets
from ca_platform.assets.quality_checks import audited, blocking_check_specs, check_results
from ca_platform.assets.scores import clip_scores, reward_scores
from ca_platform.captioning.shards import current_captioner
from ca_platform.compression.subsets import compress_shard
from ca_platform.compression.threshold import cut_variants, histogram_cut
from ca_platform.engine import current_placement
from ca_platform.ingest.quality import SUBSET_CHECKS
from ca_platform.resources import CaptioningConfig, CompressionConfig, PlatformStorage

GROUP = "compression"


@asset(
    deps=[reward_scores, clip_scores, synthetic_caption_scores, duplicate_groups],
    automation_condition=ON_SCORES_UPDATE,
    group_name=GROUP,
    kinds={"duckdb"},
)
def score_threshold(
    context: AssetExecutionContext,
    storage: PlatformStorage,
    compression: CompressionConfig,
    captioning: CaptioningConfig,
) -> MaterializeResult:
    """The cut of every subset variant at each keep fraction k of the compression curve, computed in DuckDB over
    the healthy shards' files: exactly round(k*N) pairs kept, ties broken by (score, uid, shard); with
    recaptioning on, the caption variants too (over the current captioner's scored candidates). Quarantined
    shards are left out and listed. Written to reports/score_threshold.json; each cut's training set (and
    `full`) becomes a partition of the models and their evaluations."""
    data = storage.data_store()
    with storage.staging_dir("threshold") as staging:
        captioner = current_captioner(data, captioning.settings(), staging).version if captioning.enabled else None
        cuts = cut_variants(
            data,
            storage.analytics_root(),
            compression.curve(),
            compression.random_seed,
            staging,
            captioner,
            compression.recap_mix_probability,
        )
        image = markdown_image(cuts.plot, "reward score histogram")
    training_sets = register_training_sets(context.instance, cuts.thresholds)
    reward = histogram_cut(cuts.thresholds.values())
    table = markdown_table(
        ["training set", "k", "ranked by", "captions by", "pairs", "kept", "dropped", "threshold score"],
        [
            [key, t.keep_fraction, t.model_version, t.captioner_version or "", t.total, t.kept, t.total - t.kept]
            + [t.score]
            for key, t in cuts.thresholds.items()
        ],
    )
    return MaterializeResult(
        metadata={
            "keep_fractions": MetadataValue.json(list(compression.curve())),
            "training_sets": MetadataValue.json(training_sets),
            "pairs": reward.total,  # every downloaded pair of the pool that dedup kept, ranked
            "removed_by_dedup": reward.removed,
            "kept": reward.kept,  # reward_topk's at the largest k, like the threshold score
            "reward_model_version": reward.model_version,
            "threshold_score": reward.score if reward.score is not None else float("nan"),
            "quarantined_shards": MetadataValue.md(
                markdown_table(
                    ["shard", "failed step", "input rows", "reason"],
                    [[e.shard, e.step, e.rows, e.reason] for entries in cuts.held.values() for e in entries],
                )
            ),
            "thresholds": MetadataValue.md(table),
            "histogram": MetadataValue.md(image),
            "plot": MetadataValue.path(data.uri_of(layout.SCORE_THRESHOLD_PLOT_KEY)),
        }
    )


@asset(
    partitions_def=pool_shards,
    deps=[
        score_threshold,
        downloaded_shard,
        reward_scores,
        clip_scores,
        synthetic_captions,
        synthetic_caption_scores,
        duplicate_groups,
    ],
    check_specs=blocking_check_specs("compressed_subset", SUBSET_CHECKS),
    automation_condition=ON_THRESHOLD_UPDATE,
    group_name=GROUP,
    kinds={"webdataset"},
)
def compressed_subset(
    context: AssetExecutionContext, storage: PlatformStorage
) -> Iterator[MaterializeResult | AssetCheckResult]:
    """Each variant's kept pairs of the shard re-packed as a webdataset tar, with the kept uids, a manifest
    and the membership of every downloaded pair (dropped ones keep the score that dropped them); audited
    (every downloaded pair accounted for) before it is published."""
    shard = context.partition_key
    with storage.shard_attempt(layout.SUBSET_STEP, shard, context.run_id) as staging:
        subsets = yield from audited(
            lambda: compress_shard(
                storage.data_store(),
                storage.analytics_root(),
                shard,
                context.run_id,
                staging,
                storage.refresh_analytics,
            )
        )
        image = markdown_image(subsets.plot, f"reward scores of shard {shard}")
    manifests = subsets.manifests
    table = markdown_table(
        ["training set", "ranked by", "pairs", "kept", "dropped"],
        [[m["training_set"], m["model_version"], m["pairs"], m["kept"], m["dropped"]] for m in manifests],
    )
    yield MaterializeResult(
        metadata={
            "pairs": manifests[0]["pairs"] if manifests else 0,
            **{f"kept_{m['training_set']}": m["kept"] for m in manifests},
            "subsets": MetadataValue.md(table),
            "histogram": MetadataValue.md(image),
            **current_placement().as_metadata(),
        },
        check_results=check_results(subsets.outcomes),
    )
