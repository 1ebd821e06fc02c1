"""The Dagster spine on real small data: materialize(), blocking checks, re-runs, the shard sensor."""

from __future__ import annotations

import json
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
from tests.conftest import RoutesServer, write_pool

DATA = "it's data"  # a data root whose path holds a quote and a space: every path reaches SQL safely


def spine(tmp_path: Path, pool: Path, shard: str, instance: DagsterInstance, quality: QualityConfig | None = None):
    resources = build_resources(
        str(pool), str(tmp_path / DATA), ["127.0.0.1"], quality=quality, download_options={"thread_count": 4}
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
        "downloaded_shard:not_worse_than_published": True,
    }
    ledger = pl.read_parquet(tmp_path / DATA / layout.download_rows_key("part-00000"))
    assert ledger.height == 10
    assert dict(ledger["status"].value_counts().rows()) == {
        "success": 8,
        "failed_to_decode": 1,
        "failed_to_download": 1,
    }
    db = tmp_path / DATA / layout.ANALYTICS_DB
    assert analytics.query(db, "SELECT count(*), count(DISTINCT uid) FROM downloads").rows == [(10, 10)]
    materialization = result.asset_materializations_for_node("downloaded_shard")[0]
    assert materialization.metadata["downloaded"].value == 8


def test_rematerializing_a_partition_is_idempotent(web_pool: Callable[..., Path], tmp_path: Path) -> None:
    pool = web_pool(rows_per_shard=6)
    instance = DagsterInstance.ephemeral()
    assert spine(tmp_path, pool, "part-00001", instance).success
    assert spine(tmp_path, pool, "part-00001", instance).success
    shard_dir = tmp_path / DATA / layout.download_prefix("part-00001")
    tars = sorted(p.name for p in shard_dir.glob("*.tar"))
    ledger = pl.read_parquet(shard_dir / layout.ROWS_FILE)
    assert len(tars) == 1 and set(ledger["tar"].drop_nulls()) == set(tars)
    db = tmp_path / DATA / layout.ANALYTICS_DB
    assert analytics.query(db, "SELECT count(*), count(DISTINCT uid) FROM downloads").rows == [(6, 6)]
    assert not list((tmp_path / DATA / ".staging").iterdir())


def test_failed_blocking_check_stops_the_shards_downstream(tmp_path: Path, routes_server) -> None:
    pool = write_pool(
        tmp_path / "pool", {"p": {"url": ["http://127.0.0.1:9/x.png"] * 4, "caption": ["a", "", "", "d"]}}
    )
    instance = DagsterInstance.ephemeral()
    result = spine(tmp_path, pool, "p", instance, QualityConfig(min_caption_fraction=0.9))
    assert not result.success
    assert checks_of(result)["raw_pool_shard:captions_non_empty"] is False
    assert instance.get_latest_materialization_event(AssetKey("downloaded_shard")) is None
    assert not (tmp_path / DATA / layout.download_rows_key("p")).exists()


def failure_message(result) -> str:
    failure = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error
    while failure.cause is not None:
        failure = failure.cause
    return failure.message


def test_success_rate_floor_rejects_the_download_without_publishing(
    web_pool: Callable[..., Path], tmp_path: Path
) -> None:
    pool = web_pool(rows_per_shard=4)  # 2 of 4 rows fail
    result = spine(
        tmp_path, pool, "part-00000", DagsterInstance.ephemeral(), QualityConfig(min_download_success_rate=0.9)
    )
    assert checks_of(result)["downloaded_shard:download_success_rate"] is False
    assert not result.success
    assert "success rate 0.500 is below the floor 0.9" in failure_message(result)
    assert not (tmp_path / DATA / layout.download_rows_key("part-00000")).exists()
    # the attempt is kept for inspection: every row accounted for in its ledger, with the audit's reasons
    (rejected,) = (tmp_path / DATA / "rejected" / "downloads" / "part-00000").iterdir()
    assert rejected.name == result.run_id
    assert pl.read_parquet(rejected / layout.ROWS_FILE).height == 4
    audit = json.loads((rejected / "audit.json").read_text())
    assert {c["name"]: c["passed"] for c in audit["checks"]}["download_success_rate"] is False


def test_a_worse_download_never_replaces_the_published_one(
    web_pool: Callable[..., Path], tmp_path: Path, routes_server: RoutesServer
) -> None:
    """The image host goes down after a good download: the re-download is rejected, the good one stays."""
    pool = web_pool(rows_per_shard=10)
    instance = DagsterInstance.ephemeral()
    assert spine(tmp_path, pool, "part-00000", instance).success
    shard_dir = tmp_path / DATA / layout.download_prefix("part-00000")
    published = {p.name: p.read_bytes() for p in shard_dir.iterdir()}

    routes_server.routes.clear()  # every image now answers 404
    result = spine(tmp_path, pool, "part-00000", instance, QualityConfig(min_download_success_rate=0.0))
    assert not result.success
    assert checks_of(result)["downloaded_shard:not_worse_than_published"] is False
    assert "below the published 0.800" in failure_message(result)
    assert {p.name: p.read_bytes() for p in shard_dir.iterdir()} == published
    db = tmp_path / DATA / layout.ANALYTICS_DB
    assert analytics.query(db, "SELECT count(*) FILTER (status = 'success') FROM downloads").rows == [(8,)]
    rejected = tmp_path / DATA / layout.rejected_prefix("downloads", "part-00000", result.run_id)
    assert pl.read_parquet(rejected / layout.ROWS_FILE)["status"].to_list() == ["failed_to_download"] * 10


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
    storage = PlatformStorage(pool_uri=str(pool), data_uri=str(tmp_path / DATA))

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


def test_shard_sensor_skips_shards_done_from_the_same_file(web_pool: Callable[..., Path], tmp_path: Path) -> None:
    """`done` lives in the data root: a shard downloaded by any path is not requested again until its file
    changes, even by a sensor on another instance (the UI opened after `ca-platform run`)."""
    pool = web_pool(rows_per_shard=4, failures=False)
    assert spine(tmp_path, pool, "part-00000", DagsterInstance.ephemeral()).success
    storage = PlatformStorage(pool_uri=str(pool), data_uri=str(tmp_path / DATA))

    def requested() -> list[str]:
        with build_sensor_context(instance=DagsterInstance.ephemeral(), resources={"storage": storage}) as context:
            return sorted(r.partition_key for r in pool_shard_sensor(context).run_requests)

    assert requested() == ["part-00001"]
    frame = pl.read_parquet(pool / "part-00000.parquet")
    pl.concat([frame, frame.head(1).with_columns(pl.lit("another").alias("caption"))]).write_parquet(
        pool / "part-00000.parquet"
    )
    assert requested() == ["part-00000", "part-00001"]


def test_shard_sensor_never_doubles_a_run_queued_or_under_way(tmp_path: Path) -> None:
    """A backfill's queued runs (any job, started from the UI or the CLI) are not requested again by the sensor,
    which would otherwise ask for every shard not yet done at each tick while the backfill works through them."""
    from dagster import DagsterRunStatus
    from dagster._core.test_utils import create_run_for_test

    from ca_platform.assets.jobs import shard_spine_job

    pool = write_pool(tmp_path / "pool", {f"s{i}": {"url": ["http://h/1.png"], "caption": ["c"]} for i in range(3)})
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(POOL_SHARDS, ["s0", "s1", "s2"])
    for shard, status in (("s0", DagsterRunStatus.STARTED), ("s1", DagsterRunStatus.FAILURE)):
        create_run_for_test(instance, job_name=shard_spine_job.name, status=status, tags={"dagster/partition": shard})
    storage = PlatformStorage(pool_uri=str(pool), data_uri=str(tmp_path / DATA))
    with build_sensor_context(instance=instance, resources={"storage": storage}) as context:
        assert sorted(r.partition_key for r in pool_shard_sensor(context).run_requests) == ["s1", "s2"]


def test_definitions_load_with_job_and_sensor() -> None:
    from ca_platform.definitions import defs

    assert defs.resolve_job_def("shard_spine").partitions_def.name == POOL_SHARDS
    assert defs.resolve_sensor_def("pool_shard_sensor").job_name == "shard_spine"
