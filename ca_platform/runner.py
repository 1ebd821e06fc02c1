"""Running the lineage in-process for every shard of a pool: what `ca-platform run` and the demo do.

It goes through the same asset definitions the Dagster UI shows, with `materialize()` once per shard,
on the instance of DAGSTER_HOME when set (so the runs appear in the UI's history) or an ephemeral one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dagster import DagsterInstance, materialize
from dagster_aws.s3 import S3Resource

from ca_platform import analytics
from ca_platform.assets import SPINE_ASSETS
from ca_platform.assets.partitions import POOL_SHARDS
from ca_platform.pool import discover_shards
from ca_platform.resources import DownloadConfig, PlatformStorage, QualityConfig
from ca_platform.storage import DataStore


@dataclass
class ShardRun:
    shard: str
    success: bool
    checks: dict[str, bool] = field(default_factory=dict)  # "asset:check" -> passed
    error: str | None = None


@dataclass
class LineageRun:
    storage: PlatformStorage
    shards: list[ShardRun]

    @property
    def success(self) -> bool:
        return all(s.success for s in self.shards)


def build_resources(
    pool_uri: str,
    data_uri: str,
    allow_hosts: Sequence[str] = (),
    s3_endpoint_url: str | None = None,
    download_options: Mapping[str, Any] | None = None,
    quality: QualityConfig | None = None,
    analytics_dir: str | None = None,
) -> dict[str, object]:
    """Resources for an in-process run; `download_options` are DownloadConfig fields."""
    s3 = S3Resource(endpoint_url=s3_endpoint_url) if s3_endpoint_url else S3Resource()
    return {
        "storage": PlatformStorage(pool_uri=pool_uri, data_uri=data_uri, s3=s3, analytics_dir=analytics_dir),
        "downloader": DownloadConfig(allow_hosts=",".join(allow_hosts), **(download_options or {})),
        "quality": quality or QualityConfig(),
    }


def default_instance() -> DagsterInstance:
    return DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else DagsterInstance.ephemeral()


def register_shards(pool: DataStore, instance: DagsterInstance) -> list[str]:
    """Add every shard of the pool as a partition; returns all shard keys."""
    keys = [s.key for s in discover_shards(pool)]
    known = set(instance.get_dynamic_partitions(POOL_SHARDS))
    new = [k for k in keys if k not in known]
    if new:
        instance.add_dynamic_partitions(POOL_SHARDS, new)
    return keys


def run_lineage(
    resources: dict[str, object], instance: DagsterInstance | None = None, log_level: str = "WARNING"
) -> LineageRun:
    """Materialize the lineage for every shard of the pool, one run per shard."""
    instance = instance or default_instance()
    storage = resources["storage"]
    assert isinstance(storage, PlatformStorage)
    shard_runs = []
    for key in register_shards(storage.pool_store(), instance):
        result = materialize(
            SPINE_ASSETS,
            partition_key=key,
            instance=instance,
            resources=resources,
            raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
        )
        checks = {
            f"{e.asset_key.to_user_string()}:{e.check_name}": e.passed for e in result.get_asset_check_evaluations()
        }
        error = None
        if not result.success:
            failures = [ev for ev in result.all_events if ev.is_step_failure]
            error = "; ".join(_root_cause(ev.step_failure_data.error) for ev in failures) or "run failed"
        shard_runs.append(ShardRun(key, result.success and all(checks.values()), checks, error))
    analytics.ensure_views(storage.analytics_db(), storage.analytics_root())
    return LineageRun(storage, shard_runs)


def _root_cause(error: Any) -> str:
    """The innermost error's message: the asset's own exception, not Dagster's wrapper around it."""
    while error is not None and error.cause is not None:
        error = error.cause
    return str(error.message).strip() if error is not None else "unknown error"


def report(run: LineageRun) -> str:
    """A short text report: rows, downloads, failures by reason, checks."""
    db = run.storage.analytics_db()
    totals = analytics.query(
        db, "SELECT count(*) AS rows, count(*) FILTER (status = 'success') AS downloaded FROM downloads"
    ).rows[0]
    by_status = analytics.query(
        db,
        "SELECT status, count(*) AS n, any_value(error) AS example_reason FROM downloads "
        "WHERE status <> 'success' GROUP BY status ORDER BY n DESC",
    )
    lines = [
        f"pool {run.storage.pool_uri} -> data {run.storage.data_uri}",
        f"shards: {len(run.shards)}, rows: {totals[0]}, downloaded: {totals[1]}, "
        f"not downloaded: {totals[0] - totals[1]}",
        "",
        "not downloaded, by reason:",
        by_status.as_text() if by_status.rows else "(none)",
        "",
        "checks (shards passed / shards):",
    ]
    names = sorted({name for s in run.shards for name in s.checks})
    for name in names:
        passed = sum(1 for s in run.shards if s.checks.get(name))
        evaluated = sum(1 for s in run.shards if name in s.checks)
        lines.append(f"  {name:40s} {passed}/{evaluated}")
    for s in run.shards:
        if not s.success:
            failed = [n for n, ok in s.checks.items() if not ok]
            lines.append(f"  FAILED shard {s.shard}: {s.error or 'checks failed: ' + ', '.join(failed)}")
    lines.append(f'\nDuckDB: {db}  (try: ca-platform sql --data {run.storage.data_uri} "SELECT ...")')
    return "\n".join(lines)
