"""Partial failure is normal: a shard whose host is gone is quarantined, and the pool goes on without it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from dagster import DagsterInstance

from ca_platform import analytics, layout, quarantine
from ca_platform.resources import ModelTrainingConfig
from ca_platform.runner import build_resources, report, run_lineage
from ca_platform.schemas import TRAINING_VARIANTS
from ca_platform.storage import LocalStore
from tests.conftest import RoutesServer, fast_reward_stage, write_evaluation_file, write_pool


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


@pytest.mark.slow
def test_a_dead_shard_is_quarantined_and_the_healthy_ones_go_all_the_way(
    web_pool: Callable[..., Path], routes_server: RoutesServer, tmp_path: Path
) -> None:
    pool = web_pool(rows_per_shard=10)
    dead = [routes_server.url(f"/gone/{i}.png") for i in range(7)]  # a host whose images are all gone
    write_pool(pool, {"part-dead": {"url": dead, "caption": [f"lost {i}" for i in range(7)]}})
    evaluation, _ = write_evaluation_file(routes_server, tmp_path / "eval.parquet", images=6, seed=900)
    data = tmp_path / "data"
    resources = build_resources(
        str(pool),
        str(data),
        ["127.0.0.1"],
        download_options={"thread_count": 4},
        **fast_reward_stage(tmp_path / "prefs"),
        keep_fraction=0.5,
        evaluation_uri=str(evaluation),
        model_training=ModelTrainingConfig(full_epochs=1, image_size=32, batch_size=8),
    )
    run = run_lineage(resources, DagsterInstance.ephemeral(), compress=True)

    assert not run.success  # `ca-platform run` exits non-zero, after producing everything the healthy shards allow
    assert list(run.quarantined) == ["part-dead"]
    (entry,) = run.quarantined["part-dead"]
    assert entry.step == "downloads" and entry.rows == 7 and "success rate 0.000 is below the floor" in entry.reason
    text = report(run)
    assert "part-dead (7 input rows) failed at downloads: " in text
    db = data / layout.ANALYTICS_DB
    assert analytics.query(db, "SELECT DISTINCT shard FROM scores ORDER BY shard").rows == [
        ("part-00000",),
        ("part-00001",),
    ]
    thresholds = json.loads((data / layout.SCORE_THRESHOLD_REPORT_KEY).read_text())
    assert all(t["excluded"] == ["part-dead"] for t in thresholds.values())  # the cut names what it left out
    assert analytics.query(db, "SELECT count(DISTINCT shard) FROM subsets").rows == [(2,)]
    curation = json.loads((data / layout.CURATION_REPORT_KEY).read_text())
    assert set(curation) == set(TRAINING_VARIANTS)
    # every input row is accounted for: the healthy shards' ledgers, and the quarantined shard's rows by reason
    assert analytics.query(db, "SELECT count(*) FROM downloads").rows == [(20,)]
    rejected = next((data / layout.REJECTED_DIR / "downloads" / "part-dead").iterdir())
    assert json.loads((rejected / "audit.json").read_text())["shard"] == "part-dead"
