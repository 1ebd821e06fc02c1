"""downloaded_shard: the shard's images as webdataset tars, and a ledger row for every input row."""

import polars as pl
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from ca_platform import layout
from ca_platform.assets.partitions import pool_shards
from ca_platform.assets.pool import raw_pool_shard
from ca_platform.assets.quality_checks import blocking_check_specs, check_results
from ca_platform.ingest.download import download_shard, failure_counts
from ca_platform.ingest.quality import DOWNLOAD_CHECKS, check_download
from ca_platform.resources import DownloadConfig, PlatformStorage, QualityConfig
from ca_platform.schemas import STATUS, UID, Status
from ca_platform.storage import fetch_to_local, publish


@asset(
    partitions_def=pool_shards,
    deps=[raw_pool_shard],
    check_specs=blocking_check_specs("downloaded_shard", DOWNLOAD_CHECKS),
    group_name="ingest",
    kinds={"webdataset", "parquet"},
)
def downloaded_shard(
    context: AssetExecutionContext, storage: PlatformStorage, downloader: DownloadConfig, quality: QualityConfig
) -> MaterializeResult:
    """img2dataset behind the download guard. Tars carry a run token and the ledger is published last,
    so readers see either the previous complete download or this one, never a mix."""
    shard = context.partition_key
    data = storage.data_store()
    with storage.staging_dir(f"download-{shard}") as staging:
        raw = pl.read_parquet(fetch_to_local(data, layout.raw_shard_key(shard), staging / "in"))
        result = download_shard(raw, staging / "out", downloader.settings(), tar_prefix=f"{context.run_id[:8]}-")
        ledger_path = staging / layout.ROWS_FILE
        result.rows.write_parquet(ledger_path)
        previous = {o.key for o in data.list(layout.download_prefix(shard) + "/")}
        tars = {layout.download_tar_key(shard, name): path for name, path in result.tars.items()}
        publish(data, tars, layout.download_rows_key(shard), ledger_path)
        for stale in previous - set(tars) - {layout.download_rows_key(shard)}:
            data.delete(stale)
    storage.refresh_analytics([layout.download_rows_key(shard)])

    ledger = result.rows
    counts = failure_counts(ledger)
    attempted = ledger.filter(pl.col(STATUS) != Status.SKIPPED).height
    return MaterializeResult(
        metadata={
            "rows": ledger.height,
            "downloaded": counts.get(Status.SUCCESS, 0),
            "success_rate": counts.get(Status.SUCCESS, 0) / attempted if attempted else 0.0,
            "status_counts": MetadataValue.json(counts),
            "tars": MetadataValue.json(sorted(tars)),
            "ledger": MetadataValue.path(data.uri_of(layout.download_rows_key(shard))),
        },
        check_results=check_results(check_download(ledger, raw[UID], quality.thresholds())),
    )
