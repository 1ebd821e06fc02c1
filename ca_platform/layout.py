"""Where each output lives under the data root: the one place that knows the keys."""

from __future__ import annotations

RAW_DIR = "raw"
DOWNLOADS_DIR = "downloads"
ROWS_FILE = "rows.parquet"
ANALYTICS_DB = "analytics.duckdb"
REPORTS_DIR = "reports"


def raw_shard_key(shard: str) -> str:
    """The validated copy of a pool shard."""
    return f"{RAW_DIR}/{shard}.parquet"


def download_prefix(shard: str) -> str:
    """Folder holding a shard's webdataset tars and its per-row ledger."""
    return f"{DOWNLOADS_DIR}/{shard}"


def download_rows_key(shard: str) -> str:
    """A shard's per-row download ledger; written last, it marks the shard's download complete."""
    return f"{download_prefix(shard)}/{ROWS_FILE}"


def download_tar_key(shard: str, tar_name: str) -> str:
    return f"{download_prefix(shard)}/{tar_name}"


# DuckDB view name -> glob of the parquet files it reads, relative to the data root (or its local mirror).
VIEW_GLOBS: dict[str, str] = {
    "downloads": f"{DOWNLOADS_DIR}/*/{ROWS_FILE}",
}
