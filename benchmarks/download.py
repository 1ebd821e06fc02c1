"""Download-stage throughput through the platform vs img2dataset run standalone on the same URL list.

Both fetch the same shapes-world images from a file server in a separate process on 127.0.0.1, with the
same thread count, resize and encode settings, into webdataset tars. The platform figure is the
`downloaded_shard` asset materialized by Dagster (guard, img2dataset, ledger, publish, DuckDB views, GX
checks); the standalone figure is `img2dataset.download()` (which spawns its own worker process).
Goal: platform / standalone >= 0.9.

    .venv/bin/python benchmarks/download.py [--rows 10000] [--threads 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from dagster import AssetKey, DagsterInstance, materialize  # noqa: E402

from ca_platform.assets import SPINE_ASSETS  # noqa: E402
from ca_platform.assets.partitions import POOL_SHARDS  # noqa: E402
from ca_platform.demo.image_server import ImageServer  # noqa: E402
from ca_platform.demo.shapes_pool import ShapesWorldConfig, generate_pool
from ca_platform.runner import build_resources  # noqa: E402

PORT_FILE = "port"


def _serve(root: str, ready: multiprocessing.synchronize.Event, port_path: str) -> None:
    with ImageServer(Path(root)) as server:
        Path(port_path).write_text(server.base_url)
        ready.set()
        server.wait()


def platform_seconds(pool_dir: Path, work: Path, threads: int) -> float:
    instance = DagsterInstance.ephemeral()
    resources = build_resources(
        str(pool_dir), str(work / "data"), ["127.0.0.1"], download_options={"thread_count": threads}
    )
    shard = "shard-00000"
    instance.add_dynamic_partitions(POOL_SHARDS, [shard])
    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}

    def step(asset: str) -> bool:
        selection = [AssetKey(asset)]
        run = materialize(
            SPINE_ASSETS,
            partition_key=shard,
            instance=instance,
            resources=resources,
            run_config=quiet,
            selection=selection,
        )
        return run.success

    step("raw_pool_shard")
    start = time.perf_counter()
    succeeded = step("downloaded_shard")
    elapsed = time.perf_counter() - start
    assert succeeded, "platform download failed"
    return elapsed


def standalone_seconds(pool_file: Path, work: Path, threads: int) -> tuple[float, float]:
    """Wall time of `img2dataset.download()`, and the time its worker spent on the shard itself."""
    from img2dataset import download

    start = time.perf_counter()
    download(
        url_list=str(pool_file),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="webdataset",
        output_folder=str(work / "standalone"),
        processes_count=1,
        thread_count=threads,
        image_size=256,
        resize_mode="keep_ratio",
        resize_only_if_bigger=True,
        encode_format="jpg",
        number_sample_per_shard=10_000,
        extract_exif=False,
        compute_hash="sha256",
        enable_wandb=False,
        timeout=10,
    )
    wall = time.perf_counter() - start
    stats = [json.loads(p.read_text()) for p in (work / "standalone").glob("*_stats.json")]
    return wall, sum(s["duration"] for s in stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000, help="one shard of this many rows (a typical pool shard)")
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="ca-bench-download-"))
    try:
        world_dir = root / "world"
        world_dir.mkdir()
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Event()
        port_path = root / PORT_FILE
        server = ctx.Process(target=_serve, args=(str(world_dir), ready, str(port_path)), daemon=True)
        server.start()
        ready.wait(60)
        base_url = port_path.read_text()
        config = ShapesWorldConfig(shards=1, rows_per_shard=args.rows, missing_fraction=0.0, corrupt_fraction=0.0)
        world = generate_pool(world_dir, base_url, config)

        platform, standalone, worker = [], [], []
        for repeat in range(args.repeats):
            work = root / f"run{repeat}"
            wall, in_worker = standalone_seconds(world.shard_paths[0], work, args.threads)
            standalone.append(wall)
            worker.append(in_worker)
            platform.append(platform_seconds(world.pool_dir, work, args.threads))
        server.terminate()

        rows = args.rows
        best_platform, best_standalone, best_worker = min(platform), min(standalone), min(worker)
        print(f"rows: {rows}, threads: {args.threads}, repeats: {args.repeats} (best of each)")
        print(f"platform downloaded_shard step:     {best_platform:7.2f} s  {rows / best_platform:8.1f} images/s")
        print(f"img2dataset download(), wall:       {best_standalone:7.2f} s  {rows / best_standalone:8.1f} images/s")
        print(f"img2dataset worker on the shard:    {best_worker:7.2f} s  {rows / best_worker:8.1f} images/s")
        print(f"ratio vs img2dataset wall time:     {best_standalone / best_platform:.2f}")
        print(f"ratio vs img2dataset worker alone:  {best_worker / best_platform:.2f}  (goal >= 0.9; the strict one)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
