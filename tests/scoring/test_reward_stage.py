"""The reward stage through Dagster: preferences -> reward model + baselines -> scores of every shard."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
import webdataset as wds
from dagster import DagsterInstance, build_sensor_context, materialize
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from ca_platform import analytics, layout
from ca_platform.assets import ALL_ASSETS, SHARD_SCORE_ASSETS, SPINE_ASSETS
from ca_platform.assets.reward import preference_data
from ca_platform.compression.threshold import keep_count
from ca_platform.demo.annotators import ShapesPreferenceConfig, write_shapes_preferences
from ca_platform.resources import BaselineConfig, CompressionConfig, RewardModelConfig, ScoringConfig
from ca_platform.runner import build_resources, report, run_lineage
from ca_platform.sensors import pool_shard_sensor
from tests.conftest import RoutesServer

FAST_REWARD = RewardModelConfig(epochs=8, learning_rate=1e-3, images_per_batch=8)
FAST_BASELINES = BaselineConfig(epochs=1, batch_size=8)
NO_WORKERS = ScoringConfig(num_workers=0, batch_size=16)
# Each run_lineage downloads the pool again, and later runs must find the same images, or the pool baselines and
# so the reward model retrain. img2dataset's defaults (10 s per socket operation, no retry) leave a request to
# the test's own server no slack when the machine is oversubscribed; these do, and a lost image still fails.
LOOPBACK_DOWNLOADS = {"thread_count": 4, "timeout_s": 60.0, "retries": 2}
DOWNLOADED = "SELECT shard, uid, sha256 FROM downloads WHERE status = 'success' ORDER BY ALL"


def _resources(pool: Path, data: Path, preferences: Path, scoring: ScoringConfig = NO_WORKERS) -> dict[str, object]:
    return build_resources(
        str(pool),
        str(data),
        ["127.0.0.1"],
        download_options=LOOPBACK_DOWNLOADS,
        preferences_uri=str(preferences),
        reward_training=FAST_REWARD,
        baselines=FAST_BASELINES,
        scoring=scoring,
    )


def _subset_tar_uids(data: Path, training_set: str) -> list[str]:
    """The uids in a training set's subset tars, read with webdataset itself as a training job would."""
    tars = sorted(str(p) for p in (data / layout.SUBSETS_DIR / training_set).glob("*/*.tar"))
    dataset = (
        wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode("pil").to_tuple("jpg;png", "txt", "json")
    )
    uids = []
    for image, caption, meta in dataset:
        assert image.size[0] > 0 and caption
        uids.append(meta["uid"])
    return uids


def _published_files(data: Path) -> dict[str, bytes]:
    """Every published download, score and subset file, by path."""
    roots = [data / layout.DOWNLOADS_DIR, data / layout.SCORES_DIR, data / layout.SUBSETS_DIR]
    return {str(p.relative_to(data)): p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_scores_every_downloaded_pair_per_model_version(
    web_pool: Callable[..., Path], routes_server: RoutesServer, tmp_path: Path
) -> None:
    pool = web_pool(rows_per_shard=6)
    preferences = write_shapes_preferences(tmp_path / "prefs", ShapesPreferenceConfig(images=24))
    data = tmp_path / "data"
    instance = DagsterInstance.ephemeral()

    resources = _resources(pool, data, preferences, ScoringConfig(num_workers=2, batch_size=4))
    resources["compression"] = CompressionConfig(keep_fractions=[0.3])
    first = run_lineage(resources, instance, compress=True)
    assert first.success, [r for r in first.runs if not r.success]
    coverage = [r.checks["reward_scores:uid_coverage"] for r in first.runs if "reward_scores:uid_coverage" in r.checks]
    assert coverage == [True, True]
    db = data / layout.ANALYTICS_DB
    first_downloads = analytics.query(db, DOWNLOADED).rows
    downloaded = len(first_downloads)
    per_version = analytics.query(
        db,
        "SELECT model_version, count(*), count(DISTINCT (shard, uid)) FROM scores WHERE scorer = 'reward_model' "
        "GROUP BY model_version",
    ).rows
    assert len(per_version) == 1 and per_version[0][1:] == (downloaded, downloaded)

    accuracy = json.loads((data / layout.REPORTS_DIR / "preference_accuracy.json").read_text())
    assert set(accuracy) == {"reward_model", "clip_score", "blip_score", "pairs", "cross_image", "cross_image_pairs"}
    assert accuracy["pairs"] > 0 and accuracy["cross_image_pairs"] > 0
    for kind in ("reward_model", "clip_score", "blip_score"):
        assert 0.0 <= accuracy[kind] <= 1.0 and 0.0 <= accuracy["cross_image"][kind] <= 1.0
    assert "held-out preference accuracy" in report(first)
    thresholds = json.loads((data / layout.REPORTS_DIR / "score_threshold.json").read_text())
    assert set(thresholds) == {"reward_topk@0.3", "clipscore_topk@0.3", "random_topk@0.3"}
    for key, threshold in thresholds.items():
        assert (threshold["total"], threshold["kept"]) == (downloaded, keep_count(0.3, downloaded)), key
        kept_uids = _subset_tar_uids(data, key)
        variant = threshold["variant"]
        expected = analytics.query(db, "SELECT uid FROM subsets WHERE variant = ? AND kept", [variant]).rows
        assert sorted(kept_uids) == sorted(uid for (uid,) in expected) and len(kept_uids) == threshold["kept"]
    assert analytics.query(db, "SELECT count(*) FROM subsets").rows == [(3 * downloaded,)]
    assert f"kept {thresholds['reward_topk@0.3']['kept']} of {downloaded}" in report(first)

    # the UI opened after `run` on the same pool and data root (another instance), the image host now down:
    # the sensor requests nothing (every shard is done from the same files), and a re-download the user forces
    # is rejected, leaving downloads, scores and subsets as they were and keeping the attempt under rejected/
    published = _published_files(data)
    with build_sensor_context(instance=DagsterInstance.ephemeral(), resources={"storage": resources["storage"]}) as ctx:
        assert pool_shard_sensor(ctx).run_requests == []
    routes_server.routes.clear()
    forced = materialize(
        ALL_ASSETS,
        selection=SPINE_ASSETS,
        partition_key="part-00000",
        instance=instance,
        resources=resources,
        raise_on_error=False,
    )
    assert not forced.success
    assert _published_files(data) == published
    rejected = data / layout.rejected_prefix("downloads", "part-00000", forced.run_id)
    assert pl.read_parquet(rejected / layout.ROWS_FILE)["status"].unique().to_list() == ["failed_to_download"]

    # a backfill run over a range of shards scores them all with one load of the model
    ranged = materialize(
        ALL_ASSETS,
        selection=SHARD_SCORE_ASSETS,
        instance=instance,
        resources=_resources(pool, data, preferences),
        tags={ASSET_PARTITION_RANGE_START_TAG: "part-00000", ASSET_PARTITION_RANGE_END_TAG: "part-00001"},
    )
    assert ranged.success
    assert [e.passed for e in ranged.get_asset_check_evaluations()] == [True, True]  # reward and CLIP scores
    shards = ranged.asset_materializations_for_node("reward_scores")[0].metadata["shards"].value
    assert sorted(shards) == ["part-00000", "part-00001"]
    assert analytics.query(db, "SELECT scorer, count(*) FROM scores GROUP BY ALL ORDER BY ALL").rows == [
        ("clip_score", downloaded),
        ("reward_model", downloaded),
    ]

    # unchanged preferences: the reward model is not retrained and no second version appears
    current = json.loads((data / layout.current_model_key("reward_model")).read_text())
    again = run_lineage(_resources(pool, data, preferences), instance)
    assert again.success, [r for r in again.runs if not r.success]
    assert analytics.query(db, DOWNLOADED).rows == first_downloads  # done from the same files: not downloaded again
    assert [r.target for r in again.runs if r.already_done] == ["part-00000", "part-00001"]
    assert json.loads((data / layout.current_model_key("reward_model")).read_text()) == current

    # changed preferences: a new version, scored beside the old one
    changed = write_shapes_preferences(tmp_path / "prefs2", ShapesPreferenceConfig(images=24, seed=5))
    retrained = run_lineage(_resources(pool, data, changed), instance)
    assert retrained.success, [r for r in retrained.runs if not r.success]
    assert analytics.query(db, DOWNLOADED).rows == first_downloads
    per_version = analytics.query(
        db, "SELECT model_version, count(*) FROM scores WHERE scorer = 'reward_model' GROUP BY ALL ORDER BY ALL"
    ).rows
    assert len(per_version) == 2 and {n for _, n in per_version} == {downloaded}
    assert current["version"] in {v for v, _ in per_version}


def test_bad_preference_file_fails_the_asset_naming_the_row(tmp_path: Path) -> None:
    """Materialized from the UI (no `run` to check the file first), the stage itself names the row."""
    bad = tmp_path / "prefs.jsonl"
    bad.write_text(
        '{"image": "a.png", "captions": ["x", "y"], "ranking": [1, 2]}\n{"image": "b.png", "captions": ["x"]}\n'
    )
    resources = _resources(tmp_path / "pool", tmp_path / "data", bad)
    result = materialize(ALL_ASSETS, selection=[preference_data], resources=resources, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error
    while failure.cause is not None:
        failure = failure.cause
    assert "prefs.jsonl: row 2: field 'captions'" in failure.message
    assert not (tmp_path / "data" / layout.PREFERENCES_DIR / layout.CURRENT_FILE).exists()


def test_reward_training_settings_reach_the_model_spec_and_the_training_config() -> None:
    from dataclasses import asdict

    from ca_platform.scoring.reward.model import RewardModelSpec
    from ca_platform.scoring.reward.train import TrainConfig

    settings = RewardModelConfig(
        backbone="tiny",
        image_size=32,
        freeze_fraction=0.5,
        epochs=3,
        learning_rate=0.01,
        images_per_batch=4,
        tie_policy="soft",
        seed=7,
        device="cpu",
    )
    spec, config = settings.spec(), settings.train_config()
    given = settings.model_dump()
    assert {**asdict(spec), **asdict(config)}.items() >= given.items()  # every setting reaches the model layer
    untouched = {"max_text_length", "head_hidden", "text_init"}  # what the resource does not set keeps its default
    assert {k: getattr(spec, k) for k in untouched} == {k: getattr(RewardModelSpec(), k) for k in untouched}
    assert config.weight_decay == TrainConfig().weight_decay


def test_a_checkpoint_trained_elsewhere_is_pinned_until_unpinned(tmp_path: Path, capsys) -> None:
    from ca_platform import cli
    from ca_platform.models.tokenization import bert_tokenizer
    from ca_platform.schemas import REWARD_MODEL
    from ca_platform.scoring.registry import current_model
    from ca_platform.scoring.reward.model import RewardModelSpec, build_reward_model
    from ca_platform.scoring.reward.scorer import save_reward_model
    from ca_platform.scoring.reward.train import TrainedRewardModel
    from ca_platform.storage import LocalStore

    tokenizer = bert_tokenizer()
    trained = TrainedRewardModel(
        build_reward_model(RewardModelSpec(), tokenizer),
        tokenizer,
        RewardModelSpec(),
        {"reward_mean": 0.0, "reward_std": 1.0},
    )
    version, folder = save_reward_model(trained, tmp_path / "elsewhere")
    data = tmp_path / "data"
    assert cli.main(["register-reward-model", str(folder), "--data", str(data)]) == 0
    assert version in capsys.readouterr().out
    resources = build_resources(str(tmp_path / "pool"), str(data))
    adopted = materialize(ALL_ASSETS, selection=["reward_model"], resources=resources)
    assert adopted.success  # pinned: adopted without preferences or training
    assert adopted.asset_materializations_for_node("reward_model")[0].metadata["source"].value == str(folder)
    document = current_model(LocalStore(data), REWARD_MODEL, tmp_path / "scratch")
    assert document["version"] == version and document["registered_from"] == str(folder)

    assert cli.main(["register-reward-model", "--unpin", "--data", str(data)]) == 0
    assert "unpinned" in capsys.readouterr().out
    retrain = materialize(ALL_ASSETS, selection=["reward_model"], resources=resources, raise_on_error=False)
    assert not retrain.success  # unpinned, it trains from preferences, and there are none yet

    (folder / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(Exception, match="refusing pickle files"):
        cli.main(["register-reward-model", str(folder), "--data", str(tmp_path / "data")])
