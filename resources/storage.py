"""Where the platform reads its pool and writes its outputs: a local folder or an S3 prefix, behind one resource."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dagster import ConfigurableResource
from dagster_aws.s3 import S3Resource
from pydantic import Field

from ca_platform import analytics, layout
from ca_platform.ingest.pool import PoolColumns
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
    def staging_dir(self, name: str) -> Iterator[Path]:
        """A private folder for one step's output before it is published; removed afterwards.

        For a local data root it lies beside the data (same filesystem, so publishing is a rename);
        leftovers of a killed run carry its name and are removed by the next run of the same step.
        """
        if is_s3_uri(self.data_uri):
            with tempfile.TemporaryDirectory(prefix=f"ca-{name}-") as path:
                yield Path(path)
            return
        parent = Path(self.data_uri).expanduser().resolve() / ".staging"
        parent.mkdir(parents=True, exist_ok=True)
        for leftover in parent.glob(f"{name}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
