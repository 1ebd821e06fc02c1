"""Scale-out on Ray: how per-shard throughput grows with nodes, and what concurrency buys `ca-platform run`.

1. Nodes: the same shapes-world pool through the lineage's download and scoring stages on a Ray cluster of
   one worker node and then of two (`ray.cluster_utils.Cluster` on this machine, one CPU per node), each on a
   fresh data root. Throughput = downloaded pairs / (download stage + scoring stage wall time, as the runner
   measures them); the pool-wide reward-model training between them is left out. Each node's task worker is
   started (and has imported Dagster, great_expectations, torch, img2dataset: seconds) before the clock
   starts, as it is for every shard but the first in a pool of thousands; the scorer actors start inside the
   scoring stage, as they do in a run. Goal: efficiency (2-node throughput / twice the 1-node throughput) >= 0.8.
2. Concurrency: the download stage of `--shards` shards inline (one after another, as before the engine)
   and on the embedded local Ray with this machine's CPUs (its workers started first, likewise). Goal: >= 1.6x
   on 2 cores.

The images are served from a separate process with `--latency-ms` of delay per request (a web host is not on
loopback). Run it on an otherwise idle machine.

    .venv/bin/python benchmarks/scale.py [--shards 8] [--rows 1000] [--latency-ms 50] [--part nodes|concurrency|both]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from dagster import DagsterInstance  # noqa: E402

from ca_platform import analytics  # noqa: E402
from ca_platform.demo.annotators import ShapesPreferenceConfig, write_shapes_preferences  # noqa: E402
from ca_platform.demo.image_server import serve  # noqa: E402
from ca_platform.demo.shapes_pool import ShapesWorldConfig, generate_pool  # noqa: E402
from ca_platform.engine import EngineSettings, RayEngine, connect  # noqa: E402
from ca_platform.resources import BaselineConfig, RewardModelConfig, ScoringConfig  # noqa: E402
from ca_platform.runner import LineageRun, build_resources, report, run_lineage  # noqa: E402

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _downloaded_pairs(run: LineageRun) -> int:
    db = run.storage.analytics_db()
    return analytics.query(db, "SELECT count(*) FROM downloads WHERE status = 'success'").rows[0][0]


def _import_what_a_shard_needs(slot: str) -> str:
    import great_expectations  # noqa: F401
    import img2dataset  # noqa: F401
    import torch  # noqa: F401

    import ca_platform.runner  # noqa: F401

    time.sleep(2)  # held long enough that every slot gets a worker of its own
    return slot


def warm_up(settings: EngineSettings) -> None:
    """Start one task worker per CPU slot of the cluster, each having imported what a shard's run imports."""
    engine = RayEngine(settings)
    list(engine.map_shards(_import_what_a_shard_needs, [str(i) for i in range(engine.slots())]))


def _run(pool: Path, data: Path, engine: EngineSettings, preferences: Path | None) -> LineageRun:
    extra = {}
    if preferences is not None:
        extra = {
            "preferences_uri": str(preferences),
            "reward_training": RewardModelConfig(epochs=3, images_per_batch=16),
            "baselines": BaselineConfig(epochs=1, batch_size=32),
            "scoring": ScoringConfig(num_workers=0),
        }
    resources = build_resources(str(pool), str(data), [HOST], download_options={"thread_count": 16}, **extra)
    with tempfile.TemporaryDirectory(prefix="ca-bench-dagster-") as home, DagsterInstance.local_temp(home) as inst:
        run = run_lineage(resources, inst, engine=engine)
    if not run.success:
        raise SystemExit(f"the run failed:\n{report(run)}")
    return run


def nodes(pool: Path, preferences: Path, work: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    throughput = {}
    for count in (1, 2):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        for _ in range(count - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        engine = EngineSettings(kind="ray", address=cluster.address)
        connect(engine)
        warm_up(engine)
        try:
            run = _run(pool, work / f"data-{count}-nodes", engine, preferences)
        finally:
            ray.shutdown()
            cluster.shutdown()
        seconds = run.stage_seconds["spine"] + run.stage_seconds["scores"]
        pairs = _downloaded_pairs(run)
        throughput[count] = pairs / seconds
        print(
            f"{count} node(s): {pairs} pairs downloaded and scored in {seconds:.1f} s "
            f"(download {run.stage_seconds['spine']:.1f} s, scoring {run.stage_seconds['scores']:.1f} s): "
            f"{throughput[count]:.1f} pairs/s",
            flush=True,
        )
    efficiency = throughput[2] / (2 * throughput[1])
    print(f"scaling efficiency, 2 nodes vs 1: {efficiency:.2f} of linear (goal >= 0.8)")


def concurrency(pool: Path, work: Path) -> None:
    serial = _run(pool, work / "data-inline", EngineSettings(kind="inline"), None)
    warm_up(EngineSettings(kind="ray"))
    concurrent = _run(pool, work / "data-ray", EngineSettings(kind="ray"), None)
    print(f"download stage, inline (one shard at a time): {serial.stage_seconds['spine']:.1f} s")
    print(f"download stage, {concurrent.engine}: {concurrent.stage_seconds['spine']:.1f} s")
    ratio = serial.stage_seconds["spine"] / concurrent.stage_seconds["spine"]
    print(f"concurrent vs serial: {ratio:.2f}x (goal >= 1.6x on 2 cores)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rows", type=int, default=1000, help="rows per shard")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="the image server's delay per request")
    parser.add_argument("--preference-images", type=int, default=200)
    parser.add_argument("--part", choices=["nodes", "concurrency", "both"], default="both")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ca-bench-scale-") as scratch:
        work = Path(scratch)
        port = _free_port()
        server = multiprocessing.Process(
            target=serve, args=(work / "world", HOST, port, args.latency_ms / 1000), daemon=True
        )
        (work / "world").mkdir()
        server.start()
        try:
            config = ShapesWorldConfig(shards=args.shards, rows_per_shard=args.rows)
            world = generate_pool(work / "world", f"http://{HOST}:{port}", config)
            print(f"pool: {world.rows} rows in {args.shards} shards, {args.latency_ms:g} ms per image request")
            if args.part in ("nodes", "both"):
                preferences = write_shapes_preferences(
                    work / "preferences", ShapesPreferenceConfig(images=args.preference_images, avoid_pool=config)
                )
                nodes(world.pool_dir, preferences, work)
            if args.part in ("concurrency", "both"):
                concurrency(world.pool_dir, work)
        finally:
            server.terminate()


if __name__ == "__main__":
    main()
