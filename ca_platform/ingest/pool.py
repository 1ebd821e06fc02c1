"""Reading web-pool shards (LAION/DataComp-style parquet with a URL and a caption column, maybe a uid).

A shard is validated as a whole: a missing column or a column of the wrong type is an error naming the
file and the column. Rows are then judged one by one: a row that cannot be downloaded (no URL, empty
caption) stays in the shard with a `skip_reason`, so it is accounted for downstream instead of vanishing.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from ca_platform import schemas
from ca_platform.schemas import CAPTION, ROW_INDEX, SHARD, UID, URL
from ca_platform.storage import DataStore, fetch_to_local

_SHARD_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class MalformedShardError(ValueError):
    """The shard as a whole cannot be read as a pool shard; the message names file and column."""


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


def discover_shards(pool: DataStore) -> list[PoolShard]:
    """All parquet shards of a pool, sorted; two files mapping to one key is an error."""
    shards: dict[str, PoolShard] = {}
    for obj in pool.list():
        name = obj.key.rsplit("/", 1)[-1]
        if not obj.key.endswith(".parquet") or name.startswith((".", "_")):
            continue
        key = shard_key_for(obj.key)
        if key in shards:
            raise MalformedShardError(
                f"pool files {shards[key].object_key!r} and {obj.key!r} map to the same shard key {key!r}"
            )
        shards[key] = PoolShard(key, obj.key, obj.fingerprint)
    return sorted(shards.values(), key=lambda s: s.key)


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
    """The shard as a RAW_SHARD frame: every input row once, in order, with a skip reason where unusable."""
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
    frame = frame.with_columns(pl.col(URL).cast(pl.String), pl.col(CAPTION).cast(pl.String))
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
        .alias("skip_reason"),
        url.alias(URL),
    )
    return schemas.conform(frame, schemas.RAW_SHARD)
