"""The validated copy of a pool shard under the data root: read, audited, and published only if sound.

It carries the fingerprint of the pool file it was read from (parquet metadata), so the download made
from it can record which version of the file the shard's spine is done for.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ca_platform import layout, schemas
from ca_platform.audit import StagedOutput, audit_and_publish
from ca_platform.ingest.pool import PoolColumns, PoolShard, read_shard, skip_uids_of_other_shards
from ca_platform.ingest.quality import CheckOutcome, QualityThresholds, check_raw_shard
from ca_platform.storage import DataStore, fetch_to_local


def write_raw_shard(raw: pl.DataFrame, path: Path, source_fingerprint: str) -> None:
    """A validated shard's parquet, carrying the fingerprint of the pool file it was read from."""
    raw.write_parquet(path, metadata={schemas.SOURCE_FINGERPRINT_METADATA: source_fingerprint})


def read_raw_shard(store: DataStore, shard: str, scratch: Path) -> tuple[pl.DataFrame, str]:
    """A published validated shard and the fingerprint of the pool file it was read from."""
    path = fetch_to_local(store, layout.raw_shard_key(shard), scratch)
    fingerprint = pl.read_parquet_metadata(path).get(schemas.SOURCE_FINGERPRINT_METADATA, "")
    return pl.read_parquet(path), fingerprint


def publish_raw_shard(
    pool: DataStore,
    data: DataStore,
    shard: PoolShard,
    columns: PoolColumns,
    thresholds: QualityThresholds,
    run_id: str,
    scratch: Path,
) -> tuple[pl.DataFrame, list[CheckOutcome]]:
    """Read and validate a pool shard, audit it, and publish it under the data root if it passes. Rows whose
    uid another published shard holds are skipped with that reason (kept, not dropped).

    Raises AuditFailed (the attempt kept under rejected/, the published copy unchanged) when it does not.
    """
    raw = skip_uids_of_other_shards(
        data, shard.key, read_shard(pool, shard, columns, scratch / "in"), scratch / "other"
    )
    local = scratch / "raw.parquet"
    write_raw_shard(raw, local, shard.fingerprint)
    outcomes = check_raw_shard(raw, thresholds)
    audit_and_publish(
        data, StagedOutput(layout.RAW_STEP, shard.key, run_id, {}, layout.raw_shard_key(shard.key), local), outcomes
    )
    return raw, outcomes
