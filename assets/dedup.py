"""Deduplication: image_fingerprints (a shard's pixel hashes, pHashes and CLIP-score embeddings) and
duplicate_groups (the pool's duplicate groups and its decontamination against the evaluation set)."""

import time
from collections import Counter

from dagster import (
    AssetExecutionContext,
    BackfillPolicy,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
)

from ca_platform import layout
from ca_platform.analytics.plots import bar_png, markdown_image, markdown_table
from ca_platform.assets.automation import CLASSIFICATION_SET, EVALUATION_SET, ON_NEW_MODEL_VERSION, ON_SCORES_UPDATE
from ca_platform.assets.baselines import clip_score_model
from ca_platform.assets.ingest import downloaded_shard
from ca_platform.assets.partitions import pool_shards
from ca_platform.assets.scores import reward_scores
from ca_platform.engine import current_placement
from ca_platform.ingest.download import downloaded_shards
from ca_platform.progress import rate_metadata
from ca_platform.quarantine import quarantined
from ca_platform.resources import CompressionConfig, PlatformStorage, ScoringConfig

GROUP = "dedup"
SHARDS_PER_FINGERPRINT_RUN = 16


@asset(
    partitions_def=pool_shards,
    deps=[downloaded_shard, clip_score_model],
    backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=SHARDS_PER_FINGERPRINT_RUN),
    automation_condition=ON_NEW_MODEL_VERSION,
    group_name=GROUP,
    kinds={"pytorch", "parquet"},
)
def image_fingerprints(
    context: AssetExecutionContext, storage: PlatformStorage, scoring: ScoringConfig
) -> MaterializeResult:
    """Each downloaded image's pixel hash (re-encodes of the same pixels match), DCT pHash (resized and
    recompressed copies land within a few bits) and embedding by the current CLIP-score model (semantic
    duplicates); published once they cover every downloaded image. Its data version is the embedding model's,
    so a new CLIP-score model fingerprints every shard again, and duplicate_groups follows."""
    from ca_platform.dedup.pool import fingerprint_shards

    started = time.monotonic()
    with storage.staging_dir("fingerprints", context.run_id) as scratch:
        version, shards = fingerprint_shards(
            storage.data_store(), context.partition_keys, storage.cache_dir(), scratch, scoring.device
        )
    images = sum(s.fingerprints.height for s in shards)
    return MaterializeResult(
        metadata={
            "embedding_model_version": version,
            **rate_metadata(images, "images", time.monotonic() - started),
            "reused": MetadataValue.json({s.shard: s.reused for s in shards}),
            **current_placement().as_metadata(),
        },
        data_version=DataVersion(version),
    )


@asset(
    # the held-out sets by key: their module imports compression's, which imports this one
    deps=[image_fingerprints, reward_scores, EVALUATION_SET, CLASSIFICATION_SET],
    automation_condition=ON_SCORES_UPDATE,
    group_name=GROUP,
    kinds={"polars", "parquet"},
)
def duplicate_groups(
    storage: PlatformStorage, compression: CompressionConfig, scoring: ScoringConfig
) -> MaterializeResult:
    """The healthy shards' duplicate groups (same pixels, pHash within `near_duplicate_bits`, embeddings at
    `semantic_duplicate_cosine`), each kept through the image whose raw caption the reward model scores highest
    (ties by uid), the others removed as `duplicate_of:<uid>`; before that, every image matching an evaluation
    image (or an image of the labelled classification set) is removed as `eval_contamination:<eval uid>`. Every
    cut and training set comes after it (views `duplicates` and `dedup_removals`)."""
    from ca_platform.dedup.pool import deduplicate_pool

    data = storage.data_store()
    held = set(quarantined(data))
    shards = [shard for shard in downloaded_shards(data) if shard not in held]
    with storage.staging_dir("dedup") as scratch:
        result, report = deduplicate_pool(
            data, compression.dedup_settings(), shards, storage.cache_dir(), scratch, scoring.device
        )
        storage.refresh_analytics([layout.DUPLICATES_KEY, layout.DEDUP_REMOVALS_KEY])
        sizes = Counter(Counter(result.duplicates["group_id"].to_list()).values())
        plot = bar_png(
            [str(size) for size in sorted(sizes)],
            [sizes[size] for size in sorted(sizes)],
            scratch / "group_sizes.png",
            "duplicate groups by size",
            "images in the group",
            "groups",
        )
        data.put_file(plot, layout.DEDUP_PLOT_KEY)
        image = markdown_image(plot, "duplicate group sizes")
    counts = report["counts"]
    return MaterializeResult(
        metadata={
            **counts,
            "groups": len(set(result.duplicates["group_id"].to_list())),
            "removed": MetadataValue.md(markdown_table(["removed as", "images"], list(counts.items()))),
            "group_sizes": MetadataValue.md(image),
            "excluded_shards": MetadataValue.json(sorted(held)),
            **{f"{name}_version": version or "" for name, version in report["versions"].items()},
        }
    )
