"""The DuckDB analytics file: typed views before any data, views that follow new shards, read-only queries."""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl

from ca_platform import analytics, layout, schemas
from ca_platform.analytics.sql_literals import sql_string_literal


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


def test_a_data_root_whose_path_holds_a_quote_and_a_space(tmp_path: Path) -> None:
    root = tmp_path / "it's my data"
    path = root / layout.download_rows_key("a")
    path.parent.mkdir(parents=True)
    _ledger("a", ["success", "failed_to_download"]).write_parquet(path)
    scores = pl.DataFrame({"uid": ["a-0"], "shard": ["a"], "scorer": ["reward_model"], "model_version": ["v'1"]})
    scores_path = root / layout.scores_key("reward_model", "v'1", "a")
    scores_path.parent.mkdir(parents=True)
    scores.with_columns(score=pl.lit(0.5), score_norm=pl.lit(0.0)).write_parquet(scores_path)
    db = root / layout.ANALYTICS_DB

    analytics.ensure_views(db, root)
    assert analytics.query(db, "SELECT shard, count(*) FROM downloads GROUP BY shard").rows == [("a", 2)]
    assert analytics.query(db, "SELECT uid, score FROM scores WHERE model_version = ?", ["v'1"]).rows == [("a-0", 0.5)]
    assert analytics.query(db, "SELECT model_version, pairs FROM score_versions()").rows == [("v'1", 1)]
    mtime = db.stat().st_mtime_ns
    analytics.ensure_views(db, root)  # the quoted definitions read back as unchanged: no rewrite
    assert db.stat().st_mtime_ns == mtime


def test_sql_string_literal_survives_quotes() -> None:
    for value in ["plain", "it's", "''", "'; DROP TABLE x; --", "back\\slash"]:
        with duckdb.connect() as con:
            assert con.execute(f"SELECT {sql_string_literal(value)}").fetchone() == (value,)
