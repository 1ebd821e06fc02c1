"""The DuckDB analytics file: typed views before any data, views that follow new shards, read-only queries."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ca_platform import analytics, layout, schemas


def _ledger(shard: str, statuses: list[str]) -> pl.DataFrame:
    n = len(statuses)
    frame = pl.DataFrame(
        {
            "uid": [f"{shard}-{i}" for i in range(n)],
            "shard": [shard] * n,
            "row_index": list(range(n)),
            "url": [f"http://h/{i}" for i in range(n)],
            "caption": ["c"] * n,
            "status": statuses,
            "error": [None if s == "success" else "why" for s in statuses],
        }
    )
    for name in schemas.DOWNLOAD_ROWS:
        if name not in frame.columns:
            frame = frame.with_columns(pl.lit(None).alias(name))
    return schemas.conform(frame, schemas.DOWNLOAD_ROWS)


def test_views_exist_typed_before_any_shard_and_follow_new_files(tmp_path: Path) -> None:
    db = tmp_path / layout.ANALYTICS_DB
    analytics.ensure_views(db, tmp_path)
    empty = analytics.query(db, "SELECT * FROM downloads")
    assert empty.columns == list(schemas.DOWNLOAD_ROWS) and empty.rows == []

    for shard, statuses in {"a": ["success", "failed_to_download"], "b": ["success"] * 3}.items():
        path = tmp_path / layout.download_rows_key(shard)
        path.parent.mkdir(parents=True)
        _ledger(shard, statuses).write_parquet(path)
    analytics.ensure_views(db, tmp_path)
    mtime = db.stat().st_mtime_ns
    result = analytics.query(
        db, "SELECT shard, count(*) FILTER (status = 'success') FROM downloads GROUP BY shard ORDER BY shard"
    )
    assert result.rows == [("a", 1), ("b", 3)]

    path = tmp_path / layout.download_rows_key("c")
    path.parent.mkdir(parents=True)
    _ledger("c", ["success"]).write_parquet(path)
    analytics.ensure_views(db, tmp_path)  # the glob view already covers it: no write to the database
    assert db.stat().st_mtime_ns == mtime
    assert analytics.query(db, "SELECT count(*) FROM downloads WHERE shard = ?", ["c"]).rows == [(1,)]
