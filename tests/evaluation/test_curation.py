"""The whole lineage with an evaluation set: models on every training variant, evaluated, in one report."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from dagster import DagsterInstance

from ca_platform import analytics, layout
from ca_platform.resources import ModelTrainingConfig
from ca_platform.runner import build_resources, report, run_lineage
from ca_platform.schemas import TRAINING_VARIANTS
from ca_platform.training.captioner import train_blip_captioner_on_tars
from ca_platform.training.clip import train_clip_on_tars
from ca_platform.training.tars import TrainingBudget
from tests.conftest import RoutesServer, fast_reward_stage, write_evaluation_file, write_pool

CONTRACT_KEYS = {"kept_fraction", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "cider"}


@pytest.mark.slow
def test_the_report_lists_every_variant_as_measured_over_the_healthy_shards(
    web_pool: Callable[..., Path], routes_server: RoutesServer, tmp_path: Path
) -> None:
    """The whole lineage on a pool where one shard's host is gone: that shard is quarantined, and the scores,
    subsets, models and report are produced for the healthy ones; the run names it and fails."""
    pool = web_pool(rows_per_shard=12)
    dead = [routes_server.url(f"/gone/{i}.png") for i in range(7)]  # a host whose images are all gone
    write_pool(pool, {"part-dead": {"url": dead, "caption": [f"lost {i}" for i in range(7)]}})
    evaluation, urls = write_evaluation_file(routes_server, tmp_path / "eval.parquet", images=6, seed=500)
    second_references = pl.DataFrame({"url": urls[:2], "caption": ["a first", "a second"]})
    pl.concat([pl.read_parquet(evaluation), second_references]).write_parquet(evaluation)
    data = tmp_path / "data"
    resources = build_resources(
        str(pool),
        str(data),
        ["127.0.0.1"],
        download_options={"thread_count": 4},
        **fast_reward_stage(tmp_path / "prefs"),
        keep_fraction=0.5,
        evaluation_uri=str(evaluation),
        model_training=ModelTrainingConfig(full_epochs=2, image_size=32, batch_size=8),
    )
    run = run_lineage(resources, DagsterInstance.ephemeral(), compress=True)
    assert not run.success  # `ca-platform run` exits non-zero, after producing everything the healthy shards allow
    assert [r.target for r in run.runs if not r.success] == ["part-dead"]
    (entry,) = run.quarantined["part-dead"]
    assert entry.step == "downloads" and entry.rows == 7 and "success rate 0.000 is below the floor" in entry.reason
    assert "part-dead (7 input rows) failed at downloads: " in report(run)
    db = data / layout.ANALYTICS_DB
    assert analytics.query(db, "SELECT DISTINCT shard FROM subsets ORDER BY shard").rows == [
        ("part-00000",),
        ("part-00001",),
    ]
    thresholds = json.loads((data / layout.SCORE_THRESHOLD_REPORT_KEY).read_text())
    assert all(t["excluded"] == ["part-dead"] for t in thresholds.values())  # the cut names what it left out
    # every input row is accounted for: the healthy shards' ledgers, the quarantined shard's rows with its reason
    assert analytics.query(db, "SELECT count(*) FROM downloads").rows == [(24,)]
    rejected = next((data / layout.REJECTED_DIR / "downloads" / "part-dead").iterdir())
    assert json.loads((rejected / "audit.json").read_text())["shard"] == "part-dead"

    reports = data / layout.REPORTS_DIR
    curation = json.loads((reports / "curation_report.json").read_text())
    assert set(curation) == set(TRAINING_VARIANTS)
    for variant, figures in curation.items():
        assert CONTRACT_KEYS <= set(figures), variant
        assert all(0.0 <= figures[k] <= 1.0 for k in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5")), variant
        assert figures["cider"] >= 0.0
        retrieval = json.loads((reports / "retrieval" / f"{variant}.json").read_text())
        assert retrieval["i2t_r1"] == figures["i2t_r1"]  # the report shows what the evaluation measured
    assert curation["full"]["kept_fraction"] == 1.0 and curation["reward_topk"]["kept_fraction"] == pytest.approx(0.5)
    assert (reports / "curation_report.png").stat().st_size > 0
    assert all(v in (reports / "curation_report.md").read_text() for v in TRAINING_VARIANTS)
    assert "curation report" in report(run)

    # equal budget: every variant's models saw the same number of samples
    seen_by = TRAINING_VARIANTS
    seen = {
        json.loads((data / layout.current_model_key(layout.trained_model_kind(m, v))).read_text())["metrics"][
            "samples_seen"
        ]
        for m in ("clip_checkpoint", "blip_checkpoint")
        for v in TRAINING_VARIANTS
    }
    assert len(seen) == 1

    # a second run reuses the downloaded evaluation set and trains nothing again: the data and settings are the same
    versions = {v: json.loads((data / layout.current_model_key(f"clip_checkpoint/{v}")).read_text()) for v in seen_by}
    evaluation_ledger = next((data / layout.EVALUATION_DIR).glob("*/rows.parquet")).stat().st_mtime_ns
    again = run_lineage(resources, DagsterInstance.ephemeral(), compress=True)
    assert list(again.quarantined) == ["part-dead"]  # still gone: still quarantined, the rest reused
    assert next((data / layout.EVALUATION_DIR).glob("*/rows.parquet")).stat().st_mtime_ns == evaluation_ledger
    assert all(
        json.loads((data / layout.current_model_key(f"clip_checkpoint/{v}")).read_text()) == versions[v]
        for v in seen_by
    )

    # a tiny CLIP and a tiny BLIP trained a few dozen steps on the real subset tars: their losses fall
    tars = sorted((data / layout.SUBSETS_DIR / "reward_topk").glob("*/*.tar"))
    budget = TrainingBudget(samples_seen=240)
    for train, rate in ((train_clip_on_tars, 2e-3), (train_blip_captioner_on_tars, 5e-3)):
        losses = np.asarray(train(tars, budget, image_size=32, batch_size=8, learning_rate=rate).metrics["loss"])
        assert losses[-5:].mean() < losses[:5].mean(), train.__name__
