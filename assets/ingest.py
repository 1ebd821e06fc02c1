"""Ingest: raw_pool_shard (one pool shard read, validated, given stable uids) and downloaded_shard (its images
as webdataset tars, and a ledger row for every input row). Each writes aside, audits with its blocking
data-quality checks, and publishes only if they pass (ca_platform.audit), holding the shard's lock."""

import time
from collections.abc import Iterator

import polars as pl
from dagster import AssetCheckResult, AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset

from ca_platform import layout
from ca_platform.assets.partitions import pool_shards
from ca_platform.assets.quality_checks import audited, blocking_check_specs, check_results
from ca_platform.engine import current_placement
from ca_platform.ingest.download import download_audit_publish, downloaded_rows, failure_counts
from ca_platform.ingest.pool import find_shard
from ca_platform.ingest.quality import DOWNLOAD_CHECKS, RAW_SHARD_CHECKS, success_rate
from ca_platform.ingest.raw_shard import publish_raw_shard
from ca_platform.progress import rate_metadata
from ca_platform.resources import DownloadConfig, PlatformStorage, QualityConfig
from ca_platform.schemas import SKIP_REASON

GROUP = "ingest"


@asset(
    partitions_def=pool_shards,
    check_specs=blocking_check_specs("raw_pool_shard", RAW_SHARD_CHECKS),
    group_name=GROUP,
    kinds={"parquet", "polars"},
)
def raw_pool_shard(
    context: AssetExecutionContext, storage: PlatformStorage, quality: QualityConfig
) -> Iterator[MaterializeResult | AssetCheckResult]:
    """The shard's rows with a uid each (derived from url and caption when the pool has none) and the
    reason a row will not be downloaded; a malformed shard fails here, naming file and column. Its data
    version is the pool file's fingerprint."""
    pool, data = storage.pool_store(), storage.data_store()
    shard = find_shard(pool, context.partition_key)
    with storage.shard_attempt(layout.RAW_STEP, shard.key, context.run_id, layout.raw_shard_key(shard.key)) as staging:
        raw, outcomes = yield from audited(
            lambda: publish_raw_shard(
                pool, data, shard, storage.pool_columns(), quality.thresholds(), context.run_id, staging
            )
        )
    skipped = raw.filter(pl.col(SKIP_REASON).is_not_null())
    yield MaterializeResult(
        metadata={
            "source": MetadataValue.path(pool.uri_of(shard.object_key)),
            "path": MetadataValue.path(data.uri_of(layout.raw_shard_key(shard.key))),
            "rows": raw.height,
            "skipped": skipped.height,
            "skip_reasons": MetadataValue.json(dict(skipped.group_by(SKIP_REASON).len().iter_rows())),
            **current_placement().as_metadata(),
        },
        check_results=check_results(outcomes),
        data_version=DataVersion(shard.fingerprint),
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
) -> Iterator[MaterializeResult | AssetCheckResult]:
    """img2dataset behind the download guard, into staging; published only if the audit passes, which
    includes not being clearly worse than the published download. Tars carry the run's token and the
    ledger is published last, so readers see either the previous complete download or this one."""
    shard = context.partition_key
    data = storage.data_store()
    started = time.monotonic()
    with storage.shard_attempt(layout.DOWNLOAD_STEP, shard, context.run_id, layout.download_rows_key(shard)) as staging:
        download = yield from audited(
            lambda: download_audit_publish(
                data, shard, downloader.settings(), quality.thresholds(), context.run_id, staging
            )
        )
    storage.refresh_analytics([layout.download_rows_key(shard)])
    ledger = download.ledger
    yield MaterializeResult(
        metadata={
            **rate_metadata(ledger.height, "rows", time.monotonic() - started),
            "downloaded": downloaded_rows(ledger).height,
            "success_rate": success_rate(ledger) or 0.0,
            "status_counts": MetadataValue.json(failure_counts(ledger)),
            "tars": MetadataValue.json(download.tar_keys),
            "ledger": MetadataValue.path(data.uri_of(layout.download_rows_key(shard))),
            **current_placement().as_metadata(),
        },
        check_results=check_results(download.outcomes),
    )
