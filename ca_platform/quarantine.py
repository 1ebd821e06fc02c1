"""Quarantine: the shards whose last attempt at some step failed, each with its reason.

At scale some shard always fails (its image host is gone, a file is corrupt), and one must never hold the
pool hostage: a failed step records the shard here instead, the pool-wide stages (the cut, the subsets,
training, the report) proceed over the healthy shards, and every report names the quarantined ones with their
reason and row counts. A shard leaves quarantine when the step that put it there next succeeds (a re-run or a
backfill). The record lives in the data root, so every runner and instance sees the same pool.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from ca_platform import layout
from ca_platform.storage import DataStore, fetch_to_local, write_json


@dataclass(frozen=True)
class QuarantinedShard:
    shard: str
    step: str  # the step that failed: raw, downloads, scores-<scorer>, subsets
    reason: str
    run_id: str
    rows: int | None  # the shard's input rows, when its validated copy was published


def record(store: DataStore, shard: str, step: str, reason: str, run_id: str) -> None:
    """Put `shard` in quarantine for `step`, with the reason its attempt failed."""
    document = {"shard": shard, "step": step, "reason": reason, "run_id": run_id, "at": time.time()}
    with tempfile.TemporaryDirectory() as scratch:
        write_json(store, layout.quarantine_key(shard, step), document, Path(scratch))


def release(store: DataStore, shard: str, step: str) -> None:
    """Take `shard` out of quarantine for `step`: the step succeeded."""
    store.delete(layout.quarantine_key(shard, step))


@contextmanager
def recorded(store: DataStore, shard: str, step: str, run_id: str, published_key: str | None = None) -> Iterator[None]:
    """Run one shard's step: quarantine the shard with the error's message when it fails (the error still
    propagates), release it when it succeeds.

    A failed attempt that leaves the step's earlier output published (`published_key` exists: a re-download
    rejected as worse than the published one, say) does not quarantine the shard: its data is whole and
    current; that run alone fails, with the reason."""
    try:
        yield
    except Exception as error:
        if published_key is None or not store.exists(published_key):
            record(store, shard, step, str(error) or type(error).__name__, run_id)
        raise
    release(store, shard, step)


def quarantined(store: DataStore) -> dict[str, list[QuarantinedShard]]:
    """Shard -> its failed steps, from one listing of the quarantine folder."""
    shards: dict[str, list[QuarantinedShard]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for obj in store.list(f"{layout.QUARANTINE_DIR}/"):
            document = json.loads(fetch_to_local(store, obj.key, Path(scratch)).read_text())
            rows = _input_rows(store, document["shard"], Path(scratch))
            entry = QuarantinedShard(document["shard"], document["step"], document["reason"], document["run_id"], rows)
            shards.setdefault(entry.shard, []).append(entry)
    return shards


def held_from_cut(store: DataStore) -> dict[str, list[QuarantinedShard]]:
    """The quarantined shards the pool-wide cut leaves out: those failed at a step before it (a shard whose
    subsets failed keeps its place in the cut, which its next subset run applies)."""
    held = {
        shard: [e for e in entries if e.step != layout.SUBSET_STEP] for shard, entries in quarantined(store).items()
    }
    return {shard: entries for shard, entries in held.items() if entries}


def _input_rows(store: DataStore, shard: str, scratch: Path) -> int | None:
    key = layout.raw_shard_key(shard)
    if not store.exists(key):
        return None
    return pq.read_metadata(fetch_to_local(store, key, scratch / "raw")).num_rows
