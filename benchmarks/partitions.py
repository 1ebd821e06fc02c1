"""Dagster's side of a 10^5-shard pool: registering the shards as dynamic partitions, listing them, and one
tick of `pool_shard_sensor` over the whole pool.

A pool of `--shards` parquet files (empty files: discovery only lists them) is laid out on local disk, half of
them marked done in the data root (`done/<shard>/<digest>.json`, as a published spine leaves it), on a
Dagster instance in a temporary DAGSTER_HOME (SQLite, or PostgreSQL when CA_DAGSTER_PG_URL is set). Timed:
adding every shard as a partition (in batches of `--batch`, as the sensor's requests do), listing the
partitions, and the sensor's tick (list the pool, list the partitions, list the done markers, build the run
requests). The tick runs every 30 s, so its time over 30 s is the share of the sensor's interval one tick
takes: goal < 0.5 at 10^5 shards.

    .venv/bin/python benchmarks/partitions.py [--shards 100000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from dagster import DagsterInstance, build_sensor_context

from ca_platform import layout
from ca_platform.assets.partitions import POOL_SHARDS
from ca_platform.ingest.download import source_digest
from ca_platform.instance import write_instance_config
from ca_platform.resources import PlatformStorage
from ca_platform.sensors import pool_shard_sensor
from ca_platform.storage import LocalStore

SENSOR_INTERVAL_S = 30


def lay_out_pool(root: Path, shards: int) -> tuple[Path, Path]:
    """`shards` empty parquet files, and a data root where every other one is done from its current file."""
    pool, data = root / "pool", root / "data"
    pool.mkdir(parents=True)
    for i in range(shards):
        (pool / f"shard-{i:06d}.parquet").touch()
    store = LocalStore(pool)
    for obj in store.list()[::2]:
        marker = data / layout.spine_done_key(obj.key.removesuffix(".parquet"), source_digest(obj.fingerprint))
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("{}")
    return pool, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ca-partitions-") as scratch:
        root = Path(scratch)
        started = time.perf_counter()
        pool, data = lay_out_pool(root, args.shards)
        print(f"pool of {args.shards} files laid out in {time.perf_counter() - started:.1f} s")
        home = root / "dagster_home"
        write_instance_config(home, os.environ.get("CA_DAGSTER_PG_URL"), max_concurrent_runs=4)
        with DagsterInstance.from_config(str(home)) as instance:
            keys = [f"shard-{i:06d}" for i in range(args.shards)]
            started = time.perf_counter()
            for i in range(0, len(keys), args.batch):
                instance.add_dynamic_partitions(POOL_SHARDS, keys[i : i + args.batch])
            registered = time.perf_counter() - started
            started = time.perf_counter()
            listed = len(instance.get_dynamic_partitions(POOL_SHARDS))
            listing = time.perf_counter() - started
            storage = PlatformStorage(pool_uri=str(pool), data_uri=str(data))
            started = time.perf_counter()
            with build_sensor_context(instance=instance, resources={"storage": storage}) as context:
                result = pool_shard_sensor(context)
            tick = time.perf_counter() - started
        storage_kind = "PostgreSQL" if os.environ.get("CA_DAGSTER_PG_URL") else "SQLite"
        print(f"instance storage: {storage_kind}")
        print(f"register {args.shards} partitions: {registered:.1f} s ({registered / args.shards * 1e6:.0f} us each)")
        print(f"list {listed} partitions: {listing:.2f} s")
        print(f"sensor tick: {tick:.1f} s, {len(result.run_requests)} run requests (the shards not done)")
        print(f"tick / {SENSOR_INTERVAL_S} s interval: {tick / SENSOR_INTERVAL_S:.2f} (goal < 0.5)")


if __name__ == "__main__":
    main()
