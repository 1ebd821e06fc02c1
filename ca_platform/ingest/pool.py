"""Reading web-pool shards (LAION/DataComp-style parquet with a URL and a caption column, maybe a uid).

A shard is validated as a whole: a missing column or a column of the wrong type is an error naming the
file and the column. Rows are then judged one by one: a row that cannot be downloaded (no URL, empty
caption, a uid another shard already holds) stays in the shard with a `skip_reason`, so it is accounted for
downstream instead of vanishing.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.parquet as pq

from ca_platform import layout, schemas
from ca_platform.schemas import CAPTION, ROW_INDEX, SHARD, SKIP_REASON, UID, URL
from ca_platform.storage import DataStore, fetch_to_local

logger = logging.getLogger(__name__)

_SHARD_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
# The userinfo of a URL's authority (`user:pass@`), up to its last `@` as urllib splits it.
_URL_USERINFO = r"^(\s*(?:[A-Za-z][A-Za-z0-9+.\-]*:)?//)[^/?#]*@"
# The start of the skip reason of a row whose uid another shard holds; the shard's key follows it.
UID_IN_OTHER_SHARD = "uid already in shard "


class MalformedShardError(ValueError):
    """The shard as a whole cannot be read as a pool shard; the message names file and column."""


class ShardKeyCollisionError(MalformedShardError):
    """Pool files whose paths map to one shard key; the message names every such group of files."""


@dataclass(frozen=True)
class PoolColumns:
    """Names of the pool's columns; LAION uses URL/TEXT, DataComp url/text/uid."""

    url: str = URL
    caption: str = CAPTION
    uid: str = UID


@dataclass(frozen=True)
class PoolShard:
    key: str  # the Dagster partition key
    object_key: str  # the file's key inside the pool store
    fingerprint: str


def shard_key_for(object_key: str) -> str:
    """Partition key of a pool file: its path without `.parquet`, made safe for Dagster."""
    stem = object_key.removesuffix(".parquet").replace("/", "__")
    return _SHARD_KEY_UNSAFE.sub("_", stem)


@dataclass(frozen=True)
class IgnoredPoolFile:
    object_key: str
    reason: str


@dataclass(frozen=True)
class PoolSurvey:
    shards: list[PoolShard]  # sorted by key
    ignored: list[IgnoredPoolFile]  # every other file of the pool, with the reason it is not a shard


def survey_pool(pool: DataStore) -> PoolSurvey:
    """Every file of the pool, as a shard or as ignored with a reason.

    Files whose paths map to one key (`a/x.parquet` and `a__x.parquet` both give `a__x`) are an error naming
    all of them, rather than a scheme that cannot collide: keys are Dagster partitions already in use, so a
    pool without collisions keeps its keys, and a renamed file is the user's choice, not a silent one.
    """
    by_key: dict[str, list[PoolShard]] = {}
    ignored: list[IgnoredPoolFile] = []
    for obj in pool.list():
        name = obj.key.rsplit("/", 1)[-1]
        if not obj.key.endswith(".parquet"):
            ignored.append(IgnoredPoolFile(obj.key, "not a .parquet file"))
        elif name.startswith((".", "_")):
            ignored.append(IgnoredPoolFile(obj.key, "hidden or marker file (name starts with '.' or '_')"))
        else:
            key = shard_key_for(obj.key)
            by_key.setdefault(key, []).append(PoolShard(key, obj.key, obj.fingerprint))
    collisions = {key: shards for key, shards in by_key.items() if len(shards) > 1}
    if collisions:
        groups = "; ".join(
            f"{' and '.join(repr(s.object_key) for s in group)} -> {key!r}" for key, group in sorted(collisions.items())
        )
        raise ShardKeyCollisionError(
            f"pool {pool.uri}: files map to the same shard key: {groups}. A key is the path without .parquet, "
            "'/' as '__' and other characters outside [A-Za-z0-9_.-] as '_': rename one file of each group"
        )
    return PoolSurvey(sorted((group[0] for group in by_key.values()), key=lambda s: s.key), ignored)


def discover_shards(pool: DataStore) -> list[PoolShard]:
    """All parquet shards of a pool, sorted; the files that are not shards are logged as a warning, with why."""
    survey = survey_pool(pool)
    if survey.ignored:
        shown = ", ".join(f"{f.object_key} ({f.reason})" for f in survey.ignored[:5])
        more = f" and {len(survey.ignored) - 5} more" if len(survey.ignored) > 5 else ""
        logger.warning("pool %s: %d files are not shards, ignored: %s%s", pool.uri, len(survey.ignored), shown, more)
    return survey.shards


def find_shard(pool: DataStore, key: str) -> PoolShard:
    for shard in discover_shards(pool):
        if shard.key == key:
            return shard
    raise KeyError(f"shard {key!r} is not in pool {pool.uri}")


def derive_uids(urls: list[str | None], captions: list[str | None]) -> list[str]:
    """Stable uids from content: sha1 of url and caption; repeats of one pair get an occurrence suffix."""
    seen: dict[str, int] = {}
    uids = []
    for url, caption in zip(urls, captions, strict=True):
        base = f"{url or ''}\x00{caption or ''}"
        occurrence = seen.get(base, 0)
        seen[base] = occurrence + 1
        material = base if occurrence == 0 else f"{base}\x00{occurrence}"
        uids.append(hashlib.sha1(material.encode("utf-8")).hexdigest()[:24])
    return uids


def _check_column(table_schema, name: str, role: str, where: str, required: bool) -> bool:
    if name not in table_schema.names:
        if required:
            raise MalformedShardError(
                f"{where}: missing required {role} column {name!r} (columns: {table_schema.names})"
            )
        return False
    arrow_type = table_schema.field(name).type
    if not (str(arrow_type) in ("string", "large_string", "string_view") or str(arrow_type) == "null"):
        raise MalformedShardError(f"{where}: column {name!r} ({role}) must be a string column, found {arrow_type}")
    return True


def read_shard(pool: DataStore, shard: PoolShard, columns: PoolColumns, scratch: Path) -> pl.DataFrame:
    """The shard as a RAW_SHARD frame: every input row once, in order, with a skip reason where unusable.

    Credentials in a URL (`http://user:pass@host/x.jpg`) are removed here, before uids are derived, so
    nothing downstream (raw/, downloads/, the analytics views) stores them. Nothing is lost: urllib, which
    img2dataset fetches with, cannot use them (it takes `user:pass@host` for the host name and fails to
    resolve it), so the row is fetched from the same URL without them.
    """
    where = pool.uri_of(shard.object_key)
    path = fetch_to_local(pool, shard.object_key, scratch)
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a file that is not parquet
        raise MalformedShardError(f"{where}: not a readable parquet file ({err})") from err
    _check_column(table.schema, columns.url, "url", where, required=True)
    _check_column(table.schema, columns.caption, "caption", where, required=True)
    has_uid = _check_column(table.schema, columns.uid, "uid", where, required=False)

    frame = pl.from_arrow(
        table.select([c for c in (columns.url, columns.caption) + ((columns.uid,) if has_uid else ())])
    )
    assert isinstance(frame, pl.DataFrame)
    frame = frame.rename({columns.url: URL, columns.caption: CAPTION} | ({columns.uid: UID} if has_uid else {}))
    frame = frame.with_columns(
        pl.col(URL).cast(pl.String).str.replace(_URL_USERINFO, "${1}"), pl.col(CAPTION).cast(pl.String)
    )
    if has_uid:
        frame = frame.with_columns(pl.col(UID).cast(pl.String))
        missing = frame.with_row_index(ROW_INDEX).filter(pl.col(UID).is_null() | (pl.col(UID).str.strip_chars() == ""))
        if missing.height:
            raise MalformedShardError(
                f"{where}: column {columns.uid!r} is empty at rows {missing[ROW_INDEX].head(5).to_list()}"
            )
    else:
        frame = frame.with_columns(pl.Series(UID, derive_uids(frame[URL].to_list(), frame[CAPTION].to_list())))

    url = pl.col(URL).str.strip_chars()
    frame = frame.with_row_index(ROW_INDEX).with_columns(
        pl.lit(shard.key).alias(SHARD),
        pl.when(pl.col(URL).is_null() | (url == ""))
        .then(pl.lit("missing url"))
        .when(pl.col(CAPTION).is_null() | (pl.col(CAPTION).str.strip_chars() == ""))
        .then(pl.lit("empty caption"))
        .otherwise(pl.lit(None, dtype=pl.String))
        .alias(SKIP_REASON),
        url.alias(URL),
    )
    return schemas.conform(frame, schemas.RAW_SHARD)


def _published_raw_shards(store: DataStore) -> dict[str, str]:
    """Shard key -> key of its published raw file, for every shard under raw/ (staged copies excluded)."""
    shards = {}
    for obj in store.list(f"{layout.RAW_DIR}/"):
        shard = obj.key.removeprefix(f"{layout.RAW_DIR}/").removesuffix(".parquet")
        if "/" not in shard and not shard.startswith(".") and obj.key == layout.raw_shard_key(shard):
            shards[shard] = obj.key
    return shards


def skip_uids_of_other_shards(store: DataStore, shard_key: str, raw: pl.DataFrame, scratch: Path) -> pl.DataFrame:
    """`raw` with each row whose uid another published raw shard holds skipped as `uid already in shard <key>`.

    A uid names one pair across the pool (scores, cuts and subsets join on it), so it is downloaded once: the
    shard published first keeps it, and later shards keep the row, skipped and accounted for. A row skipped
    this way holds nothing, so the first shard keeps its pairs when it is materialized again; when that
    shard's file drops the uid, materializing the later shard again takes the pair over. Rows skipped already
    keep their reason. Two shards materialized at the same moment do not see each other's uids.

    DuckDB reads only the uid, shard and skip_reason columns of the other shards' files (copied under
    `scratch` first when the data root is remote).
    """
    others = {s: k for s, k in _published_raw_shards(store).items() if s != shard_key}
    candidates = raw.filter(pl.col(SKIP_REASON).is_null()).select(UID)
    if not others or candidates.is_empty():
        return raw
    files = [fetch_to_local(store, key, scratch).as_posix() for key in others.values()]
    with duckdb.connect() as con:
        con.register("candidates", candidates.to_arrow())
        owners = con.sql(
            f"SELECT {UID}, min({SHARD}) AS owner FROM read_parquet(?, union_by_name = true) "
            f"WHERE {SHARD} <> ? AND ({SKIP_REASON} IS NULL OR NOT starts_with({SKIP_REASON}, ?)) "
            f"AND {UID} IN (SELECT {UID} FROM candidates) GROUP BY {UID}",
            params=[files, shard_key, UID_IN_OTHER_SHARD],
        ).pl()
    if owners.is_empty():
        return raw
    return (
        raw.join(owners, on=UID, how="left", maintain_order="left")
        .with_columns(
            pl.when(pl.col(SKIP_REASON).is_null() & pl.col("owner").is_not_null())
            .then(pl.lit(UID_IN_OTHER_SHARD) + pl.col("owner"))
            .otherwise(pl.col(SKIP_REASON))
            .alias(SKIP_REASON)
        )
        .select(raw.columns)
    )
