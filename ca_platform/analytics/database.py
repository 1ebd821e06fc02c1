"""The DuckDB analytics database: views over the per-shard parquet the runs write.

Views, not tables: a run only ever writes parquet files, so queries work while runs write, and a new
shard shows up in a view without anyone touching the database. The database file is written only to
create or fix a view definition, briefly, with retries against a concurrent writer.

Glob views (`layout.VIEW_GLOBS`) read the files; derived views (`DERIVED_VIEWS`) are SQL over the glob views,
such as `captions`, which puts every raw and synthetic caption beside its scores.

For a data root on S3 the parquet files the views read are mirrored into a local folder first (DuckDB's
S3 support is an extension it would download from the internet, which this platform never does).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from ca_platform import layout, schemas
from ca_platform.analytics.queries import install_macros, stale_macros
from ca_platform.analytics.sql_literals import sql_string_literal
from ca_platform.storage import DataStore

# View name -> the schema of the files it reads, for a typed empty view before any file exists.
VIEW_SCHEMAS: Mapping[str, Mapping[str, Any]] = {
    "downloads": schemas.DOWNLOAD_ROWS,
    "scores": schemas.SCORES,
    "subsets": schemas.SUBSETS,
    "synthetic_captions": schemas.SYNTHETIC_CAPTIONS,
    "synthetic_scores": schemas.SCORES,
    "duplicates": schemas.DUPLICATES,
    "dedup_removals": schemas.DEDUP_REMOVALS,
}


_RAW, _SYNTHETIC = sql_string_literal(schemas.RAW_CAPTION), sql_string_literal(schemas.SYNTHETIC_CAPTION)

# The `captions` view: every caption of the pool side by side, one row per caption: the raw caption of each
# downloaded image (caption_source 'raw', captioner_version and caption_rank null) and every synthetic candidate
# of every captioner version, each with its reward model and CLIP scores. The scores are LEFT JOINed on uid,
# shard, caption source, captioner version and rank, so an unscored caption keeps its row with null scores. When
# several reward model or CLIP versions scored a caption, it has one row per (reward_model_version,
# clip_model_version) combination: filter on the versions wanted, or aggregate per caption with FILTER as
# ca_platform.analytics.captions does. Raw score files of older platform versions lack caption_source,
# captioner_version and caption_rank: the union with a typed empty relation gives them those columns (null), and
# a null caption_source counts as raw. The output columns are cast, so their types never depend on the files.
CAPTIONS_VIEW_SQL = f"""
WITH raw_captions AS (
    SELECT uid, shard, {_RAW} AS caption_source, CAST(NULL AS VARCHAR) AS captioner_version,
        CAST(NULL AS INTEGER) AS caption_rank, caption
    FROM downloads
    WHERE status = {sql_string_literal(schemas.Status.SUCCESS)}
),
all_captions AS (
    SELECT * FROM raw_captions
    UNION ALL
    SELECT uid, shard, {_SYNTHETIC}, captioner_version, rank, caption FROM synthetic_captions
),
raw_scores AS (
    SELECT uid, shard, scorer, model_version, score, caption_source
    FROM (SELECT {schemas.duckdb_columns(schemas.SCORES)} WHERE false UNION ALL BY NAME SELECT * FROM scores)
),
all_scores AS (
    SELECT uid, shard, scorer, model_version, score, {_RAW} AS caption_source,
        CAST(NULL AS VARCHAR) AS captioner_version, CAST(NULL AS INTEGER) AS caption_rank
    FROM raw_scores
    WHERE coalesce(caption_source, {_RAW}) = {_RAW}
    UNION ALL
    SELECT uid, shard, scorer, model_version, score, caption_source, captioner_version, caption_rank
    FROM synthetic_scores
    WHERE caption_source = {_SYNTHETIC}
),
reward AS (SELECT * FROM all_scores WHERE scorer = {sql_string_literal(schemas.REWARD_MODEL)}),
clip AS (SELECT * FROM all_scores WHERE scorer = {sql_string_literal(schemas.CLIP_SCORE)})
SELECT
    CAST(c.uid AS VARCHAR) AS uid,
    CAST(c.shard AS VARCHAR) AS shard,
    CAST(c.caption_source AS VARCHAR) AS caption_source,
    CAST(c.captioner_version AS VARCHAR) AS captioner_version,
    CAST(c.caption_rank AS INTEGER) AS caption_rank,
    CAST(c.caption AS VARCHAR) AS caption,
    CAST(reward.model_version AS VARCHAR) AS reward_model_version,
    CAST(reward.score AS DOUBLE) AS reward_score,
    CAST(clip.model_version AS VARCHAR) AS clip_model_version,
    CAST(clip.score AS DOUBLE) AS clip_score
FROM all_captions AS c
LEFT JOIN reward
    ON reward.uid = c.uid AND reward.shard = c.shard AND reward.caption_source = c.caption_source
    AND reward.captioner_version IS NOT DISTINCT FROM c.captioner_version
    AND reward.caption_rank IS NOT DISTINCT FROM c.caption_rank
LEFT JOIN clip
    ON clip.uid = c.uid AND clip.shard = c.shard AND clip.caption_source = c.caption_source
    AND clip.captioner_version IS NOT DISTINCT FROM c.captioner_version
    AND clip.caption_rank IS NOT DISTINCT FROM c.caption_rank
""".strip()

# Derived view name -> its SQL over the glob views, created after them (in this order).
DERIVED_VIEWS: Mapping[str, str] = {"captions": CAPTIONS_VIEW_SQL}


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]

    def as_text(self) -> str:
        widths = [max([len(c)] + [len(_cell(r[i])) for r in self.rows]) for i, c in enumerate(self.columns)]
        lines = [" | ".join(c.ljust(w) for c, w in zip(self.columns, widths))]
        lines.append("-+-".join("-" * w for w in widths))
        lines += [" | ".join(_cell(v).ljust(w) for v, w in zip(row, widths)) for row in self.rows]
        return "\n".join(lines)


def _cell(value: Any) -> str:
    return "NULL" if value is None else str(value)


def _connect(db_path: Path, read_only: bool, timeout_s: float = 30.0) -> duckdb.DuckDBPyConnection:
    """Open the database, waiting out another process that holds it for writing."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return duckdb.connect(str(db_path), read_only=read_only)
        except duckdb.IOException as err:
            if "lock" not in str(err).lower() or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _view_sql(name: str, files_root: Path) -> str:
    """A view's body; the glob is quoted as a literal, as a view body cannot take parameters."""
    glob = files_root / layout.VIEW_GLOBS[name]
    if any(files_root.glob(layout.VIEW_GLOBS[name])):
        return f"SELECT * FROM read_parquet({sql_string_literal(glob.as_posix())}, union_by_name = true)"
    return f"SELECT {schemas.duckdb_columns(VIEW_SCHEMAS[name])} WHERE false"


def ensure_views(db_path: Path, files_root: Path) -> None:
    """Create or update every view (the glob views, then the derived views over them) and the ready-made query
    macros (`score_queries.sql`); writes the database only when a definition changes."""
    wanted = {name: _view_sql(name, files_root) for name in VIEW_SCHEMAS} | dict(DERIVED_VIEWS)
    current: dict[str, str] = {}
    macros_stale = True
    if db_path.exists():
        with _connect(db_path, read_only=True) as con:
            current = dict(con.execute("SELECT view_name, comment FROM duckdb_views() WHERE NOT internal").fetchall())
            macros_stale = bool(stale_macros(con))
    stale = {name: sql for name, sql in wanted.items() if current.get(name) != _fingerprint(sql)}
    if not stale and not macros_stale:
        return
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with _connect(db_path, read_only=False) as con:
        for name, sql in stale.items():
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
            con.execute(f"COMMENT ON VIEW {name} IS {sql_string_literal(_fingerprint(sql))}")
        if macros_stale:
            install_macros(con)


def _fingerprint(sql: str) -> str:
    """What a view's comment holds, so `ensure_views` can tell whether its definition changed: the SQL itself,
    or for a long one its start and a digest of the whole."""
    if len(sql) <= 2000:
        return sql
    return f"{sql[:1900]} [sql {hashlib.sha256(sql.encode()).hexdigest()}]"


def query(db_path: Path, sql: str, params: list[Any] | None = None) -> QueryResult:
    """Run `sql` against the analytics database, read-only."""
    with _connect(db_path, read_only=True) as con:
        cursor = con.execute(sql, params or [])
        columns = [d[0] for d in cursor.description] if cursor.description else []
        return QueryResult(columns, cursor.fetchall() if columns else [])


def mirror(store: DataStore, mirror_root: Path, keys: list[str] | None = None) -> None:
    """Copy the parquet files the views read from a remote data root into `mirror_root`.

    With `keys`, only those; otherwise every file matching a view's glob, skipping unchanged ones.
    """
    stamps_path = mirror_root / ".mirror-fingerprints.json"
    stamps: dict[str, str] = json.loads(stamps_path.read_text()) if stamps_path.exists() else {}
    wanted = set(keys or [])
    for obj in store.list():
        if keys is not None and obj.key not in wanted:
            continue
        if keys is None and not any(fnmatch.fnmatch(obj.key, g) for g in layout.VIEW_GLOBS.values()):
            continue
        if stamps.get(obj.key) == obj.fingerprint and (mirror_root / obj.key).exists():
            continue
        store.get_file(obj.key, mirror_root / obj.key)
        stamps[obj.key] = obj.fingerprint
    mirror_root.mkdir(parents=True, exist_ok=True)
    stamps_path.write_text(json.dumps(stamps, indent=1, sort_keys=True))
