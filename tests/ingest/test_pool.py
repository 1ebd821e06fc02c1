"""Reading and validating pool shards: schema errors name file and column; rows are never dropped."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from ca_platform import schemas
from ca_platform.ingest.pool import (
    MalformedShardError,
    PoolColumns,
    derive_uids,
    discover_shards,
    find_shard,
    read_shard,
)
from ca_platform.storage import LocalStore
from tests.conftest import write_pool


def read(pool_dir: Path, name: str, tmp_path: Path, columns: PoolColumns = PoolColumns()) -> pl.DataFrame:
    store = LocalStore(pool_dir)
    return read_shard(store, find_shard(store, name), columns, tmp_path / "scratch")


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    pool = write_pool(tmp_path / "pool", {"a": {"url": ["http://x/1.png"], "text": ["hi"]}})
    with pytest.raises(MalformedShardError, match=r"a\.parquet.*caption"):
        read(pool, "a", tmp_path)


def test_wrong_type_names_file_and_column(tmp_path: Path) -> None:
    pool = write_pool(tmp_path / "pool", {"b": {"url": [1, 2], "caption": ["x", "y"]}})
    with pytest.raises(MalformedShardError, match=r"b\.parquet.*'url'.*string.*int64"):
        read(pool, "b", tmp_path)


def test_not_parquet_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "c.parquet").write_text("url,caption\n")
    with pytest.raises(MalformedShardError, match=r"c\.parquet: not a readable parquet"):
        read(tmp_path / "pool", "c", tmp_path)


def test_empty_given_uid_names_the_rows(tmp_path: Path) -> None:
    pool = write_pool(
        tmp_path / "pool", {"d": {"url": ["u1", "u2", "u3"], "caption": ["a", "b", "c"], "uid": ["x", None, " "]}}
    )
    with pytest.raises(MalformedShardError, match=r"'uid' is empty at rows \[1, 2\]"):
        read(pool, "d", tmp_path)


def test_rows_kept_in_order_with_skip_reasons(tmp_path: Path) -> None:
    pool = write_pool(
        tmp_path / "pool",
        {
            "e": {
                "url": ["http://h/1.png", None, "  ", "http://h/2.png", "http://h/3.png"],
                "caption": ["one", "two", "three", "", None],
            }
        },
    )
    raw = read(pool, "e", tmp_path)
    assert raw.columns == list(schemas.RAW_SHARD)
    assert raw["row_index"].to_list() == [0, 1, 2, 3, 4]
    assert raw["skip_reason"].to_list() == [None, "missing url", "missing url", "empty caption", "empty caption"]
    assert raw["shard"].unique().to_list() == ["e"]
    assert raw["uid"].n_unique() == 5


def test_derived_uids_are_stable_and_unique_for_repeated_pairs() -> None:
    urls = ["http://h/a.png", "http://h/a.png", "http://h/b.png"]
    captions = ["same", "same", "same"]
    first = derive_uids(urls, captions)
    assert first == derive_uids(urls, captions)
    assert len(set(first)) == 3
    assert derive_uids(urls[:1], captions[:1]) == first[:1]


def test_laion_style_column_names_are_configurable(tmp_path: Path) -> None:
    pool = write_pool(tmp_path / "pool", {"f": {"URL": ["http://h/1.png"], "TEXT": ["hi"], "key": ["k1"]}})
    raw = read(pool, "f", tmp_path, PoolColumns(url="URL", caption="TEXT", uid="key"))
    assert raw.select("uid", "url", "caption").row(0) == ("k1", "http://h/1.png", "hi")


def test_discovery_lists_parquet_files_as_safe_partition_keys(tmp_path: Path) -> None:
    pool = write_pool(
        tmp_path / "pool", {"part 1": {"url": ["u"], "caption": ["c"]}, "part-2": {"url": ["u"], "caption": ["c"]}}
    )
    (pool / "notes.txt").write_text("ignored")
    (pool / "sub").mkdir()
    pl.DataFrame({"url": ["u"], "caption": ["c"]}).write_parquet(pool / "sub" / "x.parquet")
    assert [s.key for s in discover_shards(LocalStore(pool))] == ["part-2", "part_1", "sub__x"]
