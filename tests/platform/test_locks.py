"""Shard locks and private staging, on a local data root and on a real S3-compatible server on loopback."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest

from ca_platform import layout
from ca_platform.locks import LockHeldError, LockSettings, held_lock
from ca_platform.resources import PlatformStorage
from ca_platform.storage import DataStore, LocalStore, S3Store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DataStore]:
    if request.param == "local":
        yield LocalStore(tmp_path / "data")
        return
    endpoint = request.getfixturevalue("s3_endpoint")
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="platform")
    yield S3Store("s3://platform/ca", client)


FAST = LockSettings(wait_s=0.5, stale_s=60, heartbeat_s=0.1, poll_s=0.05)


def test_conditional_operations(store: DataStore) -> None:
    tag = store.create("locks/x.json", b"one")
    assert tag is not None and store.create("locks/x.json", b"two") is None
    assert store.read("locks/x.json") == (b"one", tag)
    assert store.replace("locks/x.json", b"three", "not-the-tag") is None
    new_tag = store.replace("locks/x.json", b"three", tag)
    assert new_tag is not None and store.read("locks/x.json") == (b"three", new_tag)
    assert not store.delete_if("locks/x.json", tag)
    assert store.read("locks/x.json") is not None
    assert store.delete_if("locks/x.json", new_tag) and store.read("locks/x.json") is None


def hold_in_thread(store: DataStore, name: str, settings: LockSettings) -> tuple[threading.Event, Callable[[], None]]:
    """Hold `name` in another thread until the returned release is called."""
    held, release = threading.Event(), threading.Event()

    def run() -> None:
        with held_lock(store, name, "run first", settings):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=run)
    thread.start()
    assert held.wait(10)

    def stop() -> None:
        release.set()
        thread.join()

    return held, stop


def test_a_held_lock_fails_fast_naming_its_holder(store: DataStore) -> None:
    _, release = hold_in_thread(store, "shards/2024-01", FAST)
    try:
        with pytest.raises(LockHeldError, match=r"held by run first on .* \(pid \d+\), last heartbeat"):
            with held_lock(store, "shards/2024-01", "run second", FAST):
                pass
        with held_lock(store, "shards/2024-01-02", "run second", FAST):  # another shard: not blocked
            pass
    finally:
        release()
    with held_lock(store, "shards/2024-01", "run second", FAST):
        assert json.loads(store.read(layout.lock_key("shards/2024-01"))[0])["owner"] == "run second"
    assert store.read(layout.lock_key("shards/2024-01")) is None


def test_a_waiting_run_gets_the_lock_when_it_is_released(store: DataStore) -> None:
    _, release = hold_in_thread(store, "shards/a", FAST)
    timer = threading.Timer(0.5, release)
    timer.start()
    with held_lock(store, "shards/a", "run second", LockSettings(wait_s=10, heartbeat_s=0.1, poll_s=0.05)):
        pass
    timer.join()


def test_the_heartbeat_keeps_a_long_holder_alive(store: DataStore) -> None:
    beating = LockSettings(wait_s=0.5, stale_s=0.6, heartbeat_s=0.1, poll_s=0.05)
    _, release = hold_in_thread(store, "shards/a", beating)
    try:
        time.sleep(1.2)  # twice the stale age: only the heartbeat keeps it
        with pytest.raises(LockHeldError):
            with held_lock(store, "shards/a", "run second", beating):
                pass
    finally:
        release()


def test_a_dead_holders_lock_is_broken(store: DataStore) -> None:
    stale = {"owner": "run gone", "host": "elsewhere", "pid": 1, "heartbeat_at": time.time() - 600}
    store.create(layout.lock_key("shards/a"), json.dumps(stale).encode())
    with held_lock(store, "shards/a", "run second", FAST):
        assert json.loads(store.read(layout.lock_key("shards/a"))[0])["owner"] == "run second"


def test_a_killed_process_of_this_host_frees_its_lock_at_once(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "data")
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    holder = {"owner": "run killed", "host": os.uname().nodename, "pid": child, "heartbeat_at": time.time()}
    store.create(layout.lock_key("shards/a"), json.dumps(holder).encode())
    with held_lock(store, "shards/a", "run second", FAST):
        pass


def test_staging_is_private_per_attempt_and_only_stale_leftovers_are_swept(tmp_path: Path) -> None:
    storage = PlatformStorage(pool_uri=str(tmp_path / "pool"), data_uri=str(tmp_path / "data"))
    with storage.staging_dir("download-2024-01-02", attempt="run-b") as other:
        (other / "part.tar").write_bytes(b"x")
        with storage.staging_dir("download-2024-01", attempt="run-a") as mine:
            assert mine != other and mine.name.startswith("download-2024-01.run-a.")
        assert (other / "part.tar").exists()  # the other shard's attempt is untouched
        old = tmp_path / "data" / ".staging" / "download-2024-01.killed"
        old.mkdir()
        long_ago = time.time() - storage.staging_stale_s - 60
        os.utime(old, (long_ago, long_ago))
        with storage.staging_dir("download-2024-01", attempt="run-c"):
            assert not old.exists() and (other / "part.tar").exists()
