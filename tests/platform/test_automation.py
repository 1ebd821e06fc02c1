"""Rescoring automation: a new reward-model version rescores every shard once, then dedup, threshold and subsets
follow; a new CLIP-score model re-fingerprints every shard and dedup runs again.

The automation conditions are evaluated as the automation sensor evaluates them (`evaluate_automation_conditions`
with the cursor carried from tick to tick); what they request is then run with `materialize()`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from dagster import AssetKey, DagsterInstance, Definitions, evaluate_automation_conditions, materialize

from ca_platform import analytics, layout
from ca_platform.assets import ALL_ASSETS
from ca_platform.models.tokenization import bert_tokenizer
from ca_platform.resources import BaselineConfig, CaptioningConfig, ScoringConfig
from ca_platform.runner import build_resources, run_lineage
from ca_platform.schemas import CLIP_SCORE
from ca_platform.scoring.registry import current_model, register_reward_checkpoint
from ca_platform.scoring.reward.model import RewardModelSpec, build_reward_model
from ca_platform.scoring.reward.scorer import save_reward_model
from ca_platform.scoring.reward.train import TrainedRewardModel
from ca_platform.storage import read_json

ASSET_NAMES = [a.key.to_user_string() for a in ALL_ASSETS]  # in dependency order


def _checkpoint(root: Path, seed: int) -> Path:
    """A tiny reward model trained elsewhere (here: untrained weights of a given seed)."""
    torch.manual_seed(seed)
    tokenizer = bert_tokenizer()
    model = build_reward_model(RewardModelSpec(image_size=32), tokenizer)
    trained = TrainedRewardModel(
        model, tokenizer, RewardModelSpec(image_size=32), {"reward_mean": 0.0, "reward_std": 1.0}
    )
    return save_reward_model(trained, root)[1]


class Automation:
    """The automation sensor's evaluations, tick after tick, and the runs they request."""

    def __init__(self, instance: DagsterInstance, resources: dict[str, object]) -> None:
        self.instance, self.resources, self.cursor = instance, resources, None

    def tick(self) -> dict[str, set[str | None]]:
        """Evaluate once; returns asset -> requested partitions (None for an unpartitioned asset)."""
        definitions = Definitions(assets=ALL_ASSETS, resources=self.resources)
        result = evaluate_automation_conditions(definitions, self.instance, cursor=self.cursor)
        self.cursor = result.cursor
        requested = {
            name: set(partitions)
            for name in ASSET_NAMES
            if (partitions := result.get_requested_partitions(AssetKey.from_user_string(name)))
        }
        if requested.pop("registered_reward_checkpoint", None):  # its 5-minute observation cron ticked meanwhile
            self.observe_registration()
        return requested

    def run(self, requested: dict[str, set[str | None]]) -> None:
        """Materialize what a tick requested, in dependency order, one run per partition."""
        for name in ASSET_NAMES:
            for partition in sorted(requested.get(name, ()), key=str):
                result = materialize(
                    ALL_ASSETS,
                    selection=[name],
                    partition_key=partition,
                    instance=self.instance,
                    resources=self.resources,
                )
                assert result.success, (name, partition)

    def observe_registration(self) -> None:
        observe = materialize(
            ALL_ASSETS, selection=["registered_reward_checkpoint"], instance=self.instance, resources=self.resources
        )
        assert observe.success


def _rescoring_follows(automation: Automation, shards: set[str]) -> None:
    """Every shard rescored, then dedup (the reward model picks each group's representative) and the threshold,
    then every shard's subsets; then nothing more."""
    for expected in (
        {"reward_scores": shards},
        {"duplicate_groups": {None}, "score_threshold": {None}},
        {"compressed_subset": shards},
    ):
        requested = automation.tick()
        assert requested == expected
        automation.run(requested)
    assert automation.tick() == {}  # nothing twice


@pytest.mark.slow
def test_a_new_reward_model_version_rescores_every_shard_once(web_pool: Callable[..., Path], tmp_path: Path) -> None:
    pool, data = web_pool(rows_per_shard=5), tmp_path / "data"
    resources = build_resources(
        str(pool),
        str(data),
        ["127.0.0.1"],
        download_options={"thread_count": 4},
        baselines=BaselineConfig(epochs=1, batch_size=8, image_size=32),
        scoring=ScoringConfig(num_workers=0, batch_size=8),
    )
    instance = DagsterInstance.ephemeral()
    assert run_lineage(resources, instance).success  # both shards downloaded
    shards = {"part-00000", "part-00001"}
    automation = Automation(instance, resources)
    automation.run({"clip_score_model": {None}, "clip_scores": shards, "image_fingerprints": shards})
    assert automation.tick() == {}  # the first tick only takes stock

    first = register_reward_checkpoint(
        data_store := resources["storage"].data_store(), _checkpoint(tmp_path / "a", 1), tmp_path / "s"
    )
    automation.observe_registration()
    assert automation.tick() == {"reward_model": {None}}
    automation.run({"reward_model": {None}})

    _rescoring_follows(automation, shards)  # nothing twice

    automation.observe_registration()  # the same version observed again
    assert automation.tick() == {}

    second = register_reward_checkpoint(data_store, _checkpoint(tmp_path / "b", 2), tmp_path / "s")
    assert second != first
    automation.observe_registration()
    assert automation.tick() == {"reward_model": {None}}
    automation.run({"reward_model": {None}})
    _rescoring_follows(automation, shards)

    db = data / layout.ANALYTICS_DB
    downloaded = analytics.query(db, "SELECT count(*) FROM downloads WHERE status = 'success'").rows[0][0]
    per_version = analytics.query(
        db,
        "SELECT model_version, count(DISTINCT (shard, uid)) FROM scores WHERE scorer = 'reward_model' "
        "GROUP BY ALL ORDER BY ALL",
    ).rows
    assert sorted(per_version) == sorted([(first, downloaded), (second, downloaded)])
    subsets = analytics.query(db, "SELECT DISTINCT model_version FROM subsets WHERE variant = 'reward_topk'").rows
    assert subsets == [(second,)]

    # a new CLIP-score model: every shard fingerprinted (its embeddings) and CLIP-scored again, then dedup runs
    # again with them and the cut follows
    retrained = {**resources, "baselines": BaselineConfig(epochs=2, batch_size=8, image_size=32)}
    assert materialize(ALL_ASSETS, selection=["clip_score_model"], instance=instance, resources=retrained).success
    clip = current_model(data_store, CLIP_SCORE, tmp_path / "s")["version"]
    for expected in (
        {"clip_scores": shards, "image_fingerprints": shards},
        {"duplicate_groups": {None}, "score_threshold": {None}},
        {"compressed_subset": shards},
    ):
        requested = automation.tick()
        assert requested == expected
        automation.run(requested)
    assert automation.tick() == {}
    assert read_json(data_store, layout.DEDUP_REPORT_KEY, tmp_path / "s")["versions"]["embedding"] == clip
    assert {path.parent.name for path in (data / layout.FINGERPRINTS_DIR).glob("*/*/*.parquet")} >= {clip}


@pytest.mark.slow
def test_a_new_captioner_version_recaptions_every_shard_then_the_cut_follows(
    web_pool: Callable[..., Path], tmp_path: Path
) -> None:
    pool, data = web_pool(rows_per_shard=5), tmp_path / "data"
    captioning = CaptioningConfig(enabled=True, image_size=32, pool_epochs=1.0, batch_size=8, num_workers=0)
    settings = {
        "download_options": {"thread_count": 4},
        "baselines": BaselineConfig(epochs=1, batch_size=8, image_size=32),
        "scoring": ScoringConfig(num_workers=0, batch_size=8),
    }
    resources = build_resources(str(pool), str(data), ["127.0.0.1"], captioning=captioning, **settings)
    register_reward_checkpoint(resources["storage"].data_store(), _checkpoint(tmp_path / "a", 1), tmp_path / "s")
    instance = DagsterInstance.ephemeral()
    assert run_lineage(resources, instance, compress=True).success  # captioned, scored, cut and compressed
    shards = {"part-00000", "part-00001"}
    db = data / layout.ANALYTICS_DB
    first = analytics.query(db, "SELECT DISTINCT captioner_version FROM synthetic_captions").rows
    automation = Automation(instance, resources)
    automation.observe_registration()
    assert automation.tick() == {}  # the first tick only takes stock

    # another captioner (trained with another seed): a new version, materialized as a user would
    automation.resources = build_resources(
        str(pool),
        str(data),
        ["127.0.0.1"],
        captioning=CaptioningConfig(**{**captioning.model_dump(), "seed": 1}),
        **settings,
    )
    automation.run({"captioner_model": {None}})
    for expected in (
        {"synthetic_captions": shards},
        {"synthetic_caption_scores": shards},
        {"score_threshold": {None}},
        {"compressed_subset": shards},
    ):
        requested = automation.tick()
        assert requested == expected
        automation.run(requested)
    assert automation.tick() == {}  # nothing twice

    versions = analytics.query(
        db, "SELECT captioner_version, count(DISTINCT uid) FROM synthetic_captions GROUP BY ALL ORDER BY ALL"
    ).rows
    downloaded = analytics.query(db, "SELECT count(*) FROM downloads WHERE status = 'success'").rows[0][0]
    assert len(versions) == 2 and {n for _, n in versions} == {downloaded} and first[0][0] in dict(versions)
    second = next(v for v, _ in versions if v != first[0][0])
    cut = analytics.query(db, "SELECT DISTINCT captioner_version FROM subsets WHERE variant = 'recap_all'").rows
    assert cut == [(second,)]
