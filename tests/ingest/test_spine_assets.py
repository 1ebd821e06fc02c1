"""The Dagster spine on real small data: materialize(), blocking checks, re-runs, the shard sensor."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import polars as pl
from dagster import AssetKey, DagsterInstance, build_sensor_context, materialize

from ca_platform import analytics, layout
from ca_platform.assets import SPINE_ASSETS
from ca_platform.assets.partitions import POOL_SHARDS
from ca_platform.resources import PlatformStorage, QualityConfig
from ca_platform.runner import build_resources
from ca_platform.sensors import pool_shard_sensor
from tests.conftest import write_pool


def spine(tmp_path: Path, pool: Path, shard: str, instance: DagsterInstance, quality: QualityConfig | None = None):
    resources = build_resources(
        str(pool), str(tmp_path / "data"), ["127.0.0.1"], quality=quality, download_options={"thread_count": 4}
    )
    if shard not in instance.get_dynamic_partitions(POOL_SHARDS):
        instance.add_dynamic_partitions(POOL_SHARDS, [shard])
    return materialize(SPINE_ASSETS, partition_key=shard, instance=instance, resources=resources, raise_on_error=False)


def checks_of(result) -> dict[str, bool]:
    return {f"{e.asset_key.to_user_string()}:{e.check_name}": e.passed for e in result.get_asset_check_evaluations()}


def test_one_partition_end_to_end(web_pool: Callable[..., Path], tmp_path: Path) -> None:
    pool = web_pool(rows_per_shard=10)
    instance = DagsterInstance.ephemeral()
    result = spine(tmp_path, pool, "part-00000", instance)
    assert result.success
    assert checks_of(result) == {
        "raw_pool_shard:raw_schema": True,
        "raw_pool_shard:uid_unique": True,
        "raw_pool_shard:captions_non_empty": True,
        "downloaded_shard:rows_accounted": True,
        "downloaded_shard:download_success_rate": True,
        "downloaded_shard:image_size_bounds": True,
    }
    ledger = pl.read_parquet(tmp_path / "data" / layout.download_rows_key("part-00000"))
    assert ledger.height == 10
    assert dict(ledger["status"].value_counts().rows()) == {
        "success": 8,
        "failed_to_decode": 1,
        "failed_to_download": 1,
    }
    db = tmp_path / "data" / layout.ANALYTICS_DB
    assert analytics.query(db, "SELECT count(*), count(DISTINCT uid) FROM downloads").rows == [(10, 10)]
    materialization = result.asset_materializations_for_node("downloaded_shard")[0]
    assert materialization.metadata["downloaded"].value == 8


def test_rematerializing_a_partition_is_idempotent(web_pool: Callable[..., Path], tmp_path: Path) -> None:
    pool = web_pool(rows_per_shard=6)
    instance = DagsterInstance.ephemeral()
    assert spine(tmp_path, pool, "part-00001", instance).success
    assert spine(tmp_path, pool, "part-00001", instance).success
    shard_dir = tmp_path / "data" / layout.download_prefix("part-00001")
    tars = sorted(p.name for p in shard_dir.glob("*.tar"))
    ledger = pl.read_parquet(shard_dir / layout.ROWS_FILE)
    assert len(tars) == 1 and set(ledger["tar"].drop_nulls()) == set(tars)
    db = tmp_path / "data" / layout.ANALYTICS_DB
    assert analytics.query(db, "SELECT count(*), count(DISTINCT uid) FROM downloads").rows == [(6, 6)]
    assert not list((tmp_path / "data" / ".staging").iterdir())


def test_failed_blocking_check_stops_the_shards_downstream(tmp_path: Path, routes_server) -> None:
    pool = write_pool(
        tmp_path / "pool", {"p": {"url": ["http://127.0.0.1:9/x.png"] * 4, "caption": ["a", "", "", "d"]}}
    )
    instance = DagsterInstance.ephemeral()
    result = spine(tmp_path, pool, "p", instance, QualityConfig(min_caption_fraction=0.9))
    assert not result.success
    assert checks_of(result)["raw_pool_shard:captions_non_empty"] is False
    assert instance.get_latest_materialization_event(AssetKey("downloaded_shard")) is None
    assert not (tmp_path / "data" / layout.download_rows_key("p")).exists()


def test_success_rate_floor_fails_the_download_check(web_pool: Callable[..., Path], tmp_path: Path) -> None:
    pool = web_pool(rows_per_shard=4)  # 2 of 4 rows fail
    result = spine(
        tmp_path, pool, "part-00000", DagsterInstance.ephemeral(), QualityConfig(min_download_success_rate=0.9)
    )
    assert checks_of(result)["downloaded_shard:download_success_rate"] is False
    assert not result.success
    # the ledger is still published: every row accounted for, the check says the shard is not good enough
    assert pl.read_parquet(tmp_path / "data" / layout.download_rows_key("part-00000")).height == 4


def test_malformed_shard_fails_naming_file_and_column(tmp_path: Path) -> None:
    pool = write_pool(tmp_path / "pool", {"bad": {"url": ["http://h/1.png"], "alt": ["x"]}})
    result = spine(tmp_path, pool, "bad", DagsterInstance.ephemeral())
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error
    while failure.cause is not None:
        failure = failure.cause
    assert "bad.parquet" in failure.message and "'caption'" in failure.message


def test_shard_sensor_adds_new_shards_and_requests_each_file_version(tmp_path: Path) -> None:
    pool = write_pool(tmp_path / "pool", {f"s{i}": {"url": ["http://h/1.png"], "caption": ["c"]} for i in range(2)})
    instance = DagsterInstance.ephemeral()
    storage = PlatformStorage(pool_uri=str(pool), data_uri=str(tmp_path / "data"))

    def tick():
        with build_sensor_context(instance=instance, resources={"storage": storage}) as context:
            return pool_shard_sensor(context)

    first = tick()
    assert [r.partition_keys for r in first.dynamic_partitions_requests] == [["s0", "s1"]]
    assert sorted(r.partition_key for r in first.run_requests) == ["s0", "s1"]
    instance.add_dynamic_partitions(POOL_SHARDS, ["s0", "s1"])  # what the daemon does with the request

    write_pool(pool, {"s2": {"url": ["http://h/2.png"], "caption": ["c"]}})
    second = tick()
    assert [r.partition_keys for r in second.dynamic_partitions_requests] == [["s2"]]
    run_keys = {r.partition_key: r.run_key for r in second.run_requests}
    instance.add_dynamic_partitions(POOL_SHARDS, ["s2"])
    assert run_keys["s0"] == {r.partition_key: r.run_key for r in first.run_requests}["s0"]

    write_pool(pool, {"s0": {"url": ["http://h/3.png", "http://h/4.png"], "caption": ["c", "d"]}})
    third = tick()
    assert not third.dynamic_partitions_requests
    assert {r.partition_key: r.run_key for r in third.run_requests}["s0"] != run_keys["s0"]


def test_definitions_load_with_job_and_sensor() -> None:
    from ca_platform.definitions import defs

    assert defs.resolve_job_def("shard_spine").partitions_def.name == POOL_SHARDS
    assert defs.resolve_sensor_def("pool_shard_sensor").job_name == "shard_spine"
