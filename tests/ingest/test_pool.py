"""Reading and validating pool shards: schema errors name file and column; rows are never dropped."""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl
import pytest

from ca_platform import layout, schemas
from ca_platform.ingest.download import DownloadSettings, download_shard
from ca_platform.ingest.download_guard import GuardPolicy
from ca_platform.ingest.pool import (
    MalformedShardError,
    PoolColumns,
    ShardKeyCollisionError,
    derive_uids,
    discover_shards,
    find_shard,
    read_shard,
    skip_uids_of_other_shards,
    survey_pool,
)
from ca_platform.schemas import Status
from ca_platform.storage import LocalStore
from tests.conftest import RoutesServer, png_bytes, write_pool


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


def test_colliding_keys_are_one_error_naming_every_file(tmp_path: Path) -> None:
    pool = write_pool(
        tmp_path / "pool", {"a__x": {"url": ["u"], "caption": ["c"]}, "b c": {"url": ["u"], "caption": ["c"]}}
    )
    for path in (pool / "a" / "x.parquet", pool / "b_c.parquet"):
        path.parent.mkdir(exist_ok=True)
        pl.DataFrame({"url": ["u"], "caption": ["c"]}).write_parquet(path)
    with pytest.raises(ShardKeyCollisionError) as raised:
        discover_shards(LocalStore(pool))
    message = str(raised.value)
    assert "'a/x.parquet' and 'a__x.parquet' -> 'a__x'" in message
    assert "'b c.parquet' and 'b_c.parquet' -> 'b_c'" in message
    assert "rename one file" in message


def test_files_that_are_not_shards_are_listed_with_a_reason_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pool = write_pool(tmp_path / "pool", {"part-0": {"url": ["u"], "caption": ["c"]}})
    (pool / "README.md").write_text("about this pool")
    (pool / "_SUCCESS").touch()
    (pool / ".hidden.parquet").touch()
    survey = survey_pool(LocalStore(pool))
    assert [s.key for s in survey.shards] == ["part-0"]
    assert {(f.object_key, f.reason.split(" (")[0]) for f in survey.ignored} == {
        ("README.md", "not a .parquet file"),
        ("_SUCCESS", "not a .parquet file"),
        (".hidden.parquet", "hidden or marker file"),
    }
    with caplog.at_level(logging.WARNING, logger="ca_platform.ingest.pool"):
        assert [s.key for s in discover_shards(LocalStore(pool))] == ["part-0"]
    assert "3 files are not shards" in caplog.text and "README.md (not a .parquet file)" in caplog.text


def test_credentials_in_urls_are_never_stored(tmp_path: Path) -> None:
    urls = [
        "http://user:secret@h.example/a.png",
        "  https://secret@h.example:8443/b.png?x=1",
        "HTTP://us%40er:se:cret@h.example/c.png",
        "//user:secret@h.example/d.png",
        "http://h.example/e@f.png?mail=a@b#c@d",
        "http://h.example/plain.png",
    ]
    pool = write_pool(tmp_path / "pool", {"creds": {"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}})
    raw = read(pool, "creds", tmp_path)
    assert raw["url"].to_list() == [
        "http://h.example/a.png",
        "https://h.example:8443/b.png?x=1",
        "HTTP://h.example/c.png",
        "//h.example/d.png",
        "http://h.example/e@f.png?mail=a@b#c@d",
        "http://h.example/plain.png",
    ]
    assert not any("secret" in str(value) for row in raw.rows() for value in row)
    without = [url.replace("user:secret@", "").replace("secret@", "").replace("us%40er:se:cret@", "") for url in urls]
    plain = write_pool(tmp_path / "plain", {"creds": {"url": without, "caption": raw["caption"]}})
    assert raw["uid"].to_list() == read(plain, "creds", tmp_path)["uid"].to_list()  # uids never hash a secret


def test_a_url_with_credentials_downloads_without_them(routes_server: RoutesServer, tmp_path: Path) -> None:
    """urllib cannot send a URL's userinfo (it takes it for part of the host name), so the stripped URL is the
    only one that can be fetched; the ledger and the tar hold no trace of the secret."""
    url = routes_server.add("/a.png", png_bytes(20, 20), Content_Type="image/png")
    with_secret = url.replace("http://", "http://user:s3cret@")
    pool = write_pool(tmp_path / "pool", {"creds": {"url": [with_secret], "caption": ["a picture"]}})
    raw = read(pool, "creds", tmp_path)
    policy = GuardPolicy(allow_hosts=frozenset({"127.0.0.1"}))
    result = download_shard(raw, tmp_path / "out", DownloadSettings(policy=policy, thread_count=1))
    assert result.rows.select("url", "status").rows() == [(url, Status.SUCCESS)]
    assert routes_server.hits == {"/a.png": 1}
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file() and b"s3cret" in p.read_bytes()]


def _publish_raw(data: Path, shard: str, uids: list[str], skip_reasons: list[str | None] | None = None) -> pl.DataFrame:
    frame = schemas.conform(
        pl.DataFrame(
            {
                "uid": uids,
                "shard": [shard] * len(uids),
                "row_index": list(range(len(uids))),
                "url": [f"http://h/{uid}.png" for uid in uids],
                "caption": ["c"] * len(uids),
                "skip_reason": skip_reasons or [None] * len(uids),
            },
            schema_overrides={"skip_reason": pl.String},
        ),
        schemas.RAW_SHARD,
    )
    path = data / layout.raw_shard_key(shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path)
    return frame


def test_a_uid_another_shard_holds_is_skipped_naming_that_shard(tmp_path: Path) -> None:
    data = tmp_path / "it's data"
    store = LocalStore(data)
    _publish_raw(data, "a", ["u1", "u2", "u3"])
    _publish_raw(data, "c", ["u3", "u4"], ["uid already in shard a", None])  # c's u3 is skipped: no owner of it
    _publish_raw(data, "b", ["u5"])  # b's own earlier file is not another shard
    (data / layout.RAW_DIR / "notes.txt").write_text("not a shard")
    fresh = _publish_raw(tmp_path / "fresh", "b", ["u0", "u1", "u2", "u3", "u4", "u5"])
    fresh = fresh.with_columns(
        pl.when(pl.col("uid") == "u2")
        .then(pl.lit("empty caption"))
        .otherwise(pl.col("skip_reason"))
        .alias("skip_reason")
    )

    marked = skip_uids_of_other_shards(store, "b", fresh, tmp_path / "scratch")
    assert marked.columns == list(schemas.RAW_SHARD) and marked["row_index"].to_list() == list(range(6))
    assert marked.drop("skip_reason").equals(fresh.drop("skip_reason"))
    assert marked["skip_reason"].to_list() == [
        None,
        "uid already in shard a",
        "empty caption",  # a row skipped already keeps its reason
        "uid already in shard a",  # a keeps it: c's row holding it is skipped itself
        "uid already in shard c",
        None,
    ]


def test_the_shard_published_first_keeps_its_pairs_when_materialized_again(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "data")
    first = _publish_raw(tmp_path / "data", "a", ["u1", "u2"])
    later = skip_uids_of_other_shards(store, "b", _publish_raw(tmp_path / "fresh", "b", ["u2", "u3"]), tmp_path / "s")
    _publish_raw(tmp_path / "data", "b", later["uid"].to_list(), later["skip_reason"].to_list())
    assert later["skip_reason"].to_list() == ["uid already in shard a", None]
    assert skip_uids_of_other_shards(store, "a", first, tmp_path / "s").equals(first)
    assert skip_uids_of_other_shards(LocalStore(tmp_path / "empty"), "a", first, tmp_path / "s").equals(first)
