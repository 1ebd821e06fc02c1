"""Ingest: raw_pool_shard (one pool shard read, validated, given stable uids) and downloaded_shard (its images
as webdataset tars, and a ledger row for every input row), each with its blocking data-quality checks."""

import polars as pl
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from ca_platform import layout
from ca_platform.assets.partitions import pool_shards
from ca_platform.assets.quality_checks import blocking_check_specs, check_results
from ca_platform.ingest.download import download_and_publish, downloaded_rows, failure_counts
from ca_platform.ingest.pool import find_shard, read_shard
from ca_platform.ingest.quality import DOWNLOAD_CHECKS, RAW_SHARD_CHECKS, check_download, check_raw_shard
from ca_platform.resources import DownloadConfig, PlatformStorage, QualityConfig
from ca_platform.schemas import STATUS, UID, Status

GROUP = "ingest"


@asset(
    partitions_def=pool_shards,
    check_specs=blocking_check_specs("raw_pool_shard", RAW_SHARD_CHECKS),
    group_name=GROUP,
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


@asset(
    partitions_def=pool_shards,
    deps=[raw_pool_shard],
    check_specs=blocking_check_specs("downloaded_shard", DOWNLOAD_CHECKS),
    group_name=GROUP,
    kinds={"webdataset", "parquet"},
)
def downloaded_shard(
    context: AssetExecutionContext, storage: PlatformStorage, downloader: DownloadConfig, quality: QualityConfig
) -> MaterializeResult:
    """img2dataset behind the download guard. Tars carry the run's token and the ledger is published last,
    so readers see either the previous complete download or this one, never a mix."""
    shard = context.partition_key
    data = storage.data_store()
    with storage.staging_dir(f"download-{shard}") as staging:
        download = download_and_publish(data, shard, downloader.settings(), context.run_id[:8], staging)
    storage.refresh_analytics([layout.download_rows_key(shard)])
    ledger = download.ledger
    counts = failure_counts(ledger)
    attempted = ledger.filter(pl.col(STATUS) != Status.SKIPPED).height
    downloaded = downloaded_rows(ledger).height
    return MaterializeResult(
        metadata={
            "rows": ledger.height,
            "downloaded": downloaded,
            "success_rate": downloaded / attempted if attempted else 0.0,
            "status_counts": MetadataValue.json(counts),
            "tars": MetadataValue.json(download.tar_keys),
            "ledger": MetadataValue.path(data.uri_of(layout.download_rows_key(shard))),
        },
        check_results=check_results(check_download(ledger, download.raw[UID], quality.thresholds())),
    )
