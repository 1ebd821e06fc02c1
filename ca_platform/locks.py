"""Locks that keep two runs from writing the same shard at once, on a local or an S3 data root.

Dagster's backfills, sensors and automation start runs concurrently by design, and a data root may be
shared by several machines, so the lock lives beside the data: a small JSON document naming its holder,
created only if absent (an atomic link locally, a conditional PUT on S3) and rewritten by a heartbeat
thread while held. A holder that stops beating is considered gone after `stale_s` (at once when it was a
process of this host that no longer exists), and its lock may then be broken by the next run. A run that
finds the lock held waits up to `wait_s`, then fails with a message naming the holder.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ca_platform.layout import lock_key
from ca_platform.storage import DataStore


@dataclass(frozen=True)
class LockSettings:
    wait_s: float = 3600.0  # how long a run waits for another run's lock before it fails
    stale_s: float = 120.0  # a lock whose heartbeat is older than this belongs to a dead run
    heartbeat_s: float = 10.0
    poll_s: float = 1.0


class LockHeldError(RuntimeError):
    """The lock stayed held by another run for longer than the wait allowed."""


def _describe(holder: dict[str, Any], now: float) -> str:
    beat = now - float(holder.get("heartbeat_at", now))
    return (
        f"{holder.get('owner', '?')} on {holder.get('host', '?')} (pid {holder.get('pid', '?')}), "
        f"last heartbeat {beat:.0f} s ago"
    )


def _parse(data: bytes) -> dict[str, Any]:
    try:
        holder = json.loads(data)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _holder_is_gone(holder: dict[str, Any], now: float, settings: LockSettings) -> bool:
    """A holder that stopped beating, or a process of this host that no longer exists (a killed run)."""
    if now - float(holder.get("heartbeat_at", now)) > settings.stale_s:
        return True
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


class _Heartbeat(threading.Thread):
    """Rewrites the lock's heartbeat time until stopped; notices when the lock was taken from its owner."""

    def __init__(self, store: DataStore, key: str, holder: dict[str, Any], tag: str, interval_s: float) -> None:
        super().__init__(name=f"heartbeat {key}", daemon=True)
        self.store, self.key, self.holder, self.tag, self.interval_s = store, key, holder, tag, interval_s
        self.stopped = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            beat = {**self.holder, "heartbeat_at": time.time()}
            tag = self.store.replace(self.key, json.dumps(beat).encode(), self.tag)
            if tag is None:
                self.lost = True
                return
            self.tag = tag


@contextmanager
def held_lock(store: DataStore, name: str, owner: str, settings: LockSettings = LockSettings()) -> Iterator[None]:
    """Hold the lock `name` of a data root while the block runs.

    Raises LockHeldError (naming the holder) when another live holder keeps it past `settings.wait_s`, and
    RuntimeError after the block when the lock was broken meanwhile (the block ran longer than `stale_s`
    without a heartbeat, e.g. a suspended process), since its writes may then have interleaved with another's.
    """
    key = lock_key(name)
    holder = {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "acquired_at": time.time()}
    deadline = time.monotonic() + settings.wait_s
    while True:
        now = time.time()
        tag = store.create(key, json.dumps({**holder, "heartbeat_at": now}).encode())
        if tag is not None:
            break
        current = store.read(key)
        if current is None:
            continue  # released meanwhile: try again at once
        data, current_tag = current
        held_by = _parse(data)
        if _holder_is_gone(held_by, now, settings):
            store.delete_if(key, current_tag)  # a dead holder's lock; if someone beat us to it, theirs stands
            continue
        if time.monotonic() >= deadline:
            raise LockHeldError(
                f"{store.uri_of(key)} is held by {_describe(held_by, now)}; "
                f"gave up after {settings.wait_s:.0f} s: wait for that run or stop it"
            )
        time.sleep(settings.poll_s)
    heartbeat = _Heartbeat(store, key, holder, tag, settings.heartbeat_s)
    heartbeat.start()
    try:
        yield
    finally:
        heartbeat.stopped.set()
        heartbeat.join()
        if not heartbeat.lost:
            store.delete_if(key, heartbeat.tag)
    if heartbeat.lost:
        raise RuntimeError(f"{store.uri_of(key)} was taken from {owner} while it ran: its output may be mixed")
