"""Where the platform reads its pool and writes its outputs: a local folder or an S3 prefix, behind one resource."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dagster import ConfigurableResource
from dagster_aws.s3 import S3Resource
from pydantic import Field

from ca_platform import analytics, layout, quarantine
from ca_platform.ingest.pool import PoolColumns
from ca_platform.locks import LockSettings, held_lock
from ca_platform.storage import DataStore, is_s3_uri, open_store


def s3_resource(endpoint_url: str | None = None) -> S3Resource:
    """dagster-aws's S3 resource, at `endpoint_url` when given (an S3-compatible server), else boto3's default."""
    return S3Resource(endpoint_url=endpoint_url) if endpoint_url else S3Resource()


class PlatformStorage(ConfigurableResource):
    """Where the pool is read from and where the platform writes: local directories or s3://bucket/prefix."""

    pool_uri: str = Field(description="Folder or s3://bucket/prefix holding the pool's parquet shards.")
    data_uri: str = Field(description="Folder or s3://bucket/prefix the platform writes its outputs to.")
    s3: S3Resource = Field(default_factory=S3Resource, description="S3 client settings (endpoint, region, keys).")
    analytics_dir: str | None = Field(
        default=None,
        description="Local folder for the DuckDB file when data_uri is on S3 (a mirror of the parquet it reads). "
        "Defaults to ~/.cache/ca-platform/<bucket>/<prefix>. For a local data_uri it is data_uri itself.",
    )
    lock_wait_s: float = Field(
        default=3600.0, description="How long a run waits for another run holding the same shard before it fails."
    )
    lock_stale_s: float = Field(
        default=120.0, description="A shard lock whose holder has not beaten its heartbeat for this long is broken."
    )
    staging_stale_s: float = Field(
        default=2 * 86400.0,
        description="Staging folders of attempts untouched for this long (killed runs) are swept away.",
    )
    url_column: str = "url"
    caption_column: str = "caption"
    uid_column: str = "uid"

    def pool_store(self) -> DataStore:
        return open_store(self.pool_uri, self.s3.get_client)

    def data_store(self) -> DataStore:
        return open_store(self.data_uri, self.s3.get_client)

    def pool_columns(self) -> PoolColumns:
        return PoolColumns(url=self.url_column, caption=self.caption_column, uid=self.uid_column)

    def analytics_root(self) -> Path:
        """Local folder whose parquet files the DuckDB views read, and that holds the database file."""
        if not is_s3_uri(self.data_uri):
            return Path(self.data_uri).expanduser().resolve()
        if self.analytics_dir:
            return Path(self.analytics_dir).expanduser().resolve()
        return Path.home() / ".cache" / "ca-platform" / self.data_uri.removeprefix("s3://").strip("/")

    def analytics_db(self) -> Path:
        return self.analytics_root() / layout.ANALYTICS_DB

    def refresh_analytics(self, keys: list[str]) -> None:
        """Make newly written parquet visible to the DuckDB views (mirrored first for an S3 data root)."""
        if is_s3_uri(self.data_uri):
            analytics.mirror(self.data_store(), self.analytics_root(), keys)
        analytics.ensure_views(self.analytics_db(), self.analytics_root())

    def cache_dir(self) -> Path:
        """Local copies of immutable objects (model and preference versions) of an S3 data root."""
        return self.analytics_root() / ".cache"

    @contextmanager
    def staging_dir(self, name: str, attempt: str = "") -> Iterator[Path]:
        """A private folder for one attempt at a step's output before it is published; removed afterwards.

        The folder's name carries `attempt` (the run id) and a random part, so concurrent runs of any steps
        never share or delete each other's folders. For a local data root it lies beside the data (same
        filesystem, so publishing is a rename); leftovers of killed runs are swept once older than
        `staging_stale_s`.
        """
        prefix = f"{name}.{attempt[:8]}." if attempt else f"{name}."
        if is_s3_uri(self.data_uri):
            with tempfile.TemporaryDirectory(prefix=f"ca-{prefix}") as path:
                yield Path(path)
            return
        parent = Path(self.data_uri).expanduser().resolve() / ".staging"
        parent.mkdir(parents=True, exist_ok=True)
        self._sweep_stale_staging(parent)
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def _sweep_stale_staging(self, parent: Path) -> None:
        cutoff = time.time() - self.staging_stale_s
        for leftover in parent.iterdir():
            try:
                if leftover.stat().st_mtime < cutoff:
                    shutil.rmtree(leftover, ignore_errors=True)
            except FileNotFoundError:
                pass  # its owner removed it meanwhile

    def lock_settings(self) -> LockSettings:
        return LockSettings(wait_s=self.lock_wait_s, stale_s=self.lock_stale_s)

    @contextmanager
    def shard_attempt(self, step: str, shard: str, run_id: str, published_key: str | None = None) -> Iterator[Path]:
        """Hold the shard's lock and give a private staging folder: what every per-shard write runs inside. A
        failure puts the shard in quarantine for `step` (ca_platform.quarantine) unless the step's earlier output,
        `published_key`, stays published; a success takes it out.

        One lock per shard, whatever the step, so a download never replaces tars a scoring run of the same
        shard is reading, and two runs of one shard never interleave; different shards never wait on each other.
        """
        store = self.data_store()
        with held_lock(store, f"shards/{shard}", f"run {run_id} ({step})", self.lock_settings()):
            with (
                quarantine.recorded(store, shard, step, run_id, published_key),
                self.staging_dir(f"{step}-{shard}", run_id) as staging,
            ):
                yield staging
