"""Quarantine: a shard whose step failed, recorded with its reason until the step next succeeds (the pool going
on without it end to end: tests/evaluation/test_curation.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ca_platform import layout, quarantine
from ca_platform.storage import LocalStore


def test_a_failed_step_is_recorded_and_released_by_its_next_success(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "data")
    with pytest.raises(RuntimeError):
        with quarantine.recorded(store, "s1", layout.DOWNLOAD_STEP, "run-1"):
            raise RuntimeError("every image answered 404")
    with pytest.raises(ValueError):
        with quarantine.recorded(store, "s2", layout.SUBSET_STEP, "run-1"):
            raise ValueError("boom")
    held = quarantine.quarantined(store)
    assert [(e.step, e.reason, e.run_id) for e in held["s1"]] == [("downloads", "every image answered 404", "run-1")]
    assert sorted(quarantine.held_from_cut(store)) == ["s1"]  # a failed subset keeps its shard in the cut
    with quarantine.recorded(store, "s1", layout.DOWNLOAD_STEP, "run-2"):
        pass
    assert sorted(quarantine.quarantined(store)) == ["s2"]
    # a failed re-download that leaves the published download in place does not quarantine the shard
    (tmp_path / "data" / layout.download_rows_key("s1")).parent.mkdir(parents=True)
    (tmp_path / "data" / layout.download_rows_key("s1")).write_bytes(b"published")
    with pytest.raises(RuntimeError):
        with quarantine.recorded(store, "s1", layout.DOWNLOAD_STEP, "run-3", layout.download_rows_key("s1")):
            raise RuntimeError("success rate below the published one")
    assert sorted(quarantine.quarantined(store)) == ["s2"]
