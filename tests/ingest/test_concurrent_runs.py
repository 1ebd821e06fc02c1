"""Runs that overlap or die: `ca-platform run` processes on one data root, and a run killed at each named point
of a shard's write-audit-publish, then run again. Every row stays accounted for, nothing half-written is ever
visible, and no run deletes another's files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from ca_platform import analytics, layout
from ca_platform.storage import FAULT_ENV
from tests.conftest import BIN, RoutesServer, png_bytes, write_pool

CLI = BIN / "ca-platform"
REPO = Path(__file__).resolve().parents[2]
ROWS = 12

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slow_images() -> Iterator[RoutesServer]:
    """Image routes that answer after a pause, so concurrent runs really overlap."""
    server = RoutesServer()
    server.thread.start()
    server.delay_s = 0.5
    yield server
    server.server.shutdown()
    server.server.server_close()


def shard_columns(server: RoutesServer, shard: str) -> dict[str, list]:
    urls = [
        server.add(f"/{shard}/{i}.png", png_bytes(20 + i, 20, seed=i), Content_Type="image/png") for i in range(ROWS)
    ]
    return {"url": urls, "caption": [f"{shard} picture {i}" for i in range(ROWS)]}


def start_run(pool: Path, data: Path, *extra: str, fault: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", FAULT_ENV)}
    if fault:
        env[FAULT_ENV] = fault
    command = [str(CLI), "run", "--pool", str(pool), "--data", str(data), "--allow-host", "127.0.0.1", *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


def assert_consistent(data: Path, shards: dict[str, int], *, settled: bool, views: bool = True) -> None:
    """What a reader may see: each published ledger complete and once per row, its tars present, nothing
    half-written; once `settled` (after a clean run), no orphan tars and no lock left either."""
    for shard, rows in shards.items():
        ledger = pl.read_parquet(data / layout.download_rows_key(shard))
        assert ledger.height == rows and ledger["uid"].n_unique() == rows
        referenced = set(ledger["tar"].drop_nulls())
        present = {p.name for p in (data / layout.download_prefix(shard)).glob("*.tar")}
        assert referenced <= present
        if settled:
            assert referenced == present, f"orphan tars in {shard}: {present - referenced}"
    visible = [p for p in data.rglob("*") if ".staging" not in p.parts]
    assert not [p for p in visible if p.name.endswith(".part")]
    if settled:
        assert not list((data / layout.LOCKS_DIR).rglob("*.json"))
    if settled and views:
        db = data / layout.ANALYTICS_DB
        total = sum(shards.values())
        assert analytics.query(db, "SELECT count(*), count(DISTINCT uid) FROM downloads").rows == [(total, total)]


def test_concurrent_runs_of_one_shard_and_of_prefix_named_shards(slow_images: RoutesServer, tmp_path: Path) -> None:
    """Three `ca-platform run` at once on one data root: two of shard `2024-01`, one of `2024-01-02` (whose name
    `2024-01` prefixes). They wait on each other's shard lock, never on another shard's, and never delete
    each other's staging: all end correctly with every row accounted for once."""
    pool_a = write_pool(tmp_path / "pool-a", {"2024-01": shard_columns(slow_images, "a")})
    pool_b = write_pool(tmp_path / "pool-b", {"2024-01-02": shard_columns(slow_images, "b")})
    data = tmp_path / "data"
    runs = [start_run(pool_a, data), start_run(pool_a, data), start_run(pool_b, data)]
    for code, output in map(finish, runs):
        assert code == 0, output
    assert_consistent(data, {"2024-01": ROWS, "2024-01-02": ROWS}, settled=True)


def spine_once(pool_dir: str, data_dir: str, shard: str, run_id: str) -> None:
    """One shard's spine as the assets run it (the shard's lock, a private staging folder, write-audit-publish),
    light enough to start in a process many times: the crash cases kill such a process at a fault point, then
    run the spine again here."""
    from ca_platform.ingest.download import DownloadSettings, download_audit_publish
    from ca_platform.ingest.download_guard import GuardPolicy
    from ca_platform.ingest.pool import PoolColumns, find_shard
    from ca_platform.ingest.quality import QualityThresholds
    from ca_platform.ingest.raw_shard import publish_raw_shard
    from ca_platform.locks import held_lock
    from ca_platform.storage import LocalStore

    pool, data = LocalStore(pool_dir), LocalStore(data_dir)
    settings = DownloadSettings(thread_count=4, policy=GuardPolicy(allow_hosts=frozenset({"127.0.0.1"})))
    with held_lock(data, f"shards/{shard}", f"run {run_id}"):
        with tempfile.TemporaryDirectory(dir=data_dir) as staging:
            shard_file = find_shard(pool, shard)
            publish_raw_shard(pool, data, shard_file, PoolColumns(), QualityThresholds(), run_id, Path(staging))
            download_audit_publish(data, shard, settings, QualityThresholds(), run_id, Path(staging))


def killed_spine(pool: Path, data: Path, shard: str, run_id: str, fault: str) -> tuple[int, str]:
    """`spine_once` in a process of its own that kills itself at `fault`; its exit code and output."""
    env = {**os.environ, FAULT_ENV: fault, "PYTHONPATH": str(REPO)}
    script = "import sys; from tests.ingest.test_concurrent_runs import spine_once; spine_once(*sys.argv[1:])"
    command = [sys.executable, "-c", script, str(pool), str(data), shard, run_id]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def downloaded_once(slow_images: RoutesServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A one-shard pool and its data root after one complete download; each crash case starts from a copy."""
    root = tmp_path_factory.mktemp("downloaded")
    pool = write_pool(root / "pool", {"s0": shard_columns(slow_images, "s0")})
    (root / "data").mkdir()
    spine_once(str(pool), str(root / "data"), "s0", "first")
    return pool, root / "data"


@pytest.mark.parametrize("point", ["downloads:after-staging", "downloads:after-audit", "downloads:mid-publish"])
def test_a_run_killed_at_each_point_of_write_audit_publish(
    downloaded_once: tuple[Path, Path], point: str, tmp_path: Path
) -> None:
    """A shard downloaded once, re-downloaded by a run killed at `point`, then by a run that completes."""
    pool, published = downloaded_once
    data = tmp_path / "data"
    shutil.copytree(published, data)
    before = pl.read_parquet(data / layout.download_rows_key("s0"))

    code, output = killed_spine(pool, data, "s0", "killed", fault=point)
    assert code == -9, output
    assert_consistent(data, {"s0": ROWS}, settled=False)
    # the index is published last: readers still see the previous download
    assert pl.read_parquet(data / layout.download_rows_key("s0")).equals(before)

    spine_once(str(pool), str(data), "s0", "again")  # breaks the killed run's lock at once: its process is gone
    assert_consistent(data, {"s0": ROWS}, settled=True, views=False)
