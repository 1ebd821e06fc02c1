"""raw_pool_shard: one pool shard read, validated and given stable uids."""

import polars as pl
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from ca_platform import layout
from ca_platform.assets.partitions import pool_shards
from ca_platform.assets.quality_checks import blocking_check_specs, check_results
from ca_platform.ingest.pool import find_shard, read_shard
from ca_platform.ingest.quality import RAW_SHARD_CHECKS, check_raw_shard
from ca_platform.resources import PlatformStorage, QualityConfig


@asset(
    partitions_def=pool_shards,
    check_specs=blocking_check_specs("raw_pool_shard", RAW_SHARD_CHECKS),
    group_name="ingest",
    kinds={"parquet", "polars"},
)
def raw_pool_shard(
    context: AssetExecutionContext, storage: PlatformStorage, quality: QualityConfig
) -> MaterializeResult:
    """The shard's rows with a uid each (derived from url and caption when the pool has none) and the
    reason a row will not be downloaded; a malformed shard fails here, naming file and column."""
    pool, data = storage.pool_store(), storage.data_store()
    shard = find_shard(pool, context.partition_key)
    with storage.staging_dir(f"raw-{shard.key}") as scratch:
        raw = read_shard(pool, shard, storage.pool_columns(), scratch)
        local = scratch / "raw.parquet"
        raw.write_parquet(local)
        data.put_file(local, layout.raw_shard_key(shard.key), consume=True)
    skipped = raw.filter(pl.col("skip_reason").is_not_null())
    return MaterializeResult(
        metadata={
            "source": MetadataValue.path(pool.uri_of(shard.object_key)),
            "path": MetadataValue.path(data.uri_of(layout.raw_shard_key(shard.key))),
            "rows": raw.height,
            "skipped": skipped.height,
            "skip_reasons": MetadataValue.json(dict(skipped.group_by("skip_reason").len().iter_rows())),
        },
        check_results=check_results(check_raw_shard(raw, quality.thresholds())),
    )
