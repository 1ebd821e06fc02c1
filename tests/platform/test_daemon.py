"""Backfills from the CLI and the shard sensor, carried out by a real dagster-daemon over workspace.yaml."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pytest

from ca_platform import layout

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _wait_for(paths: list[Path], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(p.exists() for p in paths):
            return True
        time.sleep(1)
    return False


@pytest.fixture
def daemon_env(web_pool: Callable[..., Path], tmp_path: Path) -> Iterator[dict[str, str]]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").touch()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "CA_POOL_URI": str(web_pool(rows_per_shard=4)),
        "CA_DATA_URI": str(tmp_path / "data"),
        "CA_ALLOW_HOSTS": "127.0.0.1",
    }
    yield env


def dagster(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([BIN / "dagster", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_cli_backfill_and_shard_sensor_run_under_the_daemon(daemon_env: dict[str, str]) -> None:
    data = Path(daemon_env["CA_DATA_URI"])
    ledgers = [data / layout.download_rows_key(s) for s in ("part-00000", "part-00001")]
    subprocess.run(
        [BIN / "ca-platform", "shards", "register", "--pool", daemon_env["CA_POOL_URI"]],
        env=daemon_env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    dagster(daemon_env, "sensor", "stop", "pool_shard_sensor", "-w", "workspace.yaml")
    dagster(
        daemon_env,
        "job",
        "backfill",
        "-w",
        "workspace.yaml",
        "-j",
        "shard_spine",
        "--partitions",
        "part-00001",
        "--noprompt",
    )

    daemon = subprocess.Popen(
        [BIN / "dagster-daemon", "run", "-w", "workspace.yaml"],
        cwd=REPO,
        env=daemon_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert _wait_for([ledgers[1]], 240), "the backfilled partition was not materialized"
        assert not ledgers[0].exists()  # only the backfilled shard ran
        dagster(daemon_env, "sensor", "start", "pool_shard_sensor", "-w", "workspace.yaml")
        assert _wait_for([ledgers[0]], 240), "the shard sensor did not run the remaining shard"
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(60)
    assert [pl.read_parquet(p).height for p in ledgers] == [4, 4]
