"""A variant's training set comes from its tars alone: one walk gives the pairs' fingerprint and their count."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import polars as pl
import pytest

from ca_platform import layout, schemas
from ca_platform.compression.subsets import write_shard_subsets
from ca_platform.storage import LocalStore, publish_folder
from ca_platform.training.training_set import NoTrainingDataError, TrainingSettings, budget_for, training_set
from tests.conftest import SHARDS, write_downloaded_pool


def _compress(data: Path, variant: str, kept: set[str], scratch: Path) -> None:
    for shard, uids in SHARDS.items():
        ledger = pl.read_parquet(data / layout.download_rows_key(shard))
        tars = [data / layout.download_tar_key(shard, name) for name in sorted(ledger["tar"].unique())]
        membership = pl.DataFrame(
            {
                "uid": sorted(uids),
                "shard": shard,
                "variant": variant,
                "model_version": "v1",
                "keep_fraction": 0.5,
                "score": 0.0,
                "kept": [uid in kept for uid in sorted(uids)],
                "caption_source": schemas.RAW_CAPTION,
                "captioner_version": None,
                "caption_rank": None,
                "drop_reason": None,
            }
        )
        write_shard_subsets({variant: membership}, tars, scratch / shard, shard)
        publish_folder(
            LocalStore(data),
            scratch / shard / variant,
            layout.subset_prefix(variant, shard),
            index_name=layout.SUBSET_MANIFEST_FILE,
        )


def test_the_full_set_is_every_downloaded_pair_fingerprinted_whatever_the_tars(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_downloaded_pool(data)
    full = training_set(LocalStore(data), schemas.FULL, tmp_path / "scratch")
    assert (full.pairs, full.pool_pairs) == (10, 10)
    assert sorted(p.name for p in full.tars) == ["run1-00000.tar"] * 2 + ["run1-00001.tar"] * 2

    write_downloaded_pool(data, token="run2", reverse=True)  # downloaded again: other tar names, order and split
    again = training_set(LocalStore(data), schemas.FULL, tmp_path / "scratch")
    assert again.fingerprint == full.fingerprint and again.pairs == 10

    write_downloaded_pool(data, token="run3", captions={"b2": "another caption"})
    assert training_set(LocalStore(data), schemas.FULL, tmp_path / "scratch").fingerprint != full.fingerprint


def test_a_subset_is_its_kept_pairs_and_counts_the_budget_in_the_whole_pool(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_downloaded_pool(data)
    store = LocalStore(data)
    with pytest.raises(NoTrainingDataError, match="shard s0 has no reward_topk subset yet"):
        training_set(store, schemas.REWARD_TOPK, tmp_path / "scratch")

    _compress(data, schemas.REWARD_TOPK, {"a1", "a4", "b0"}, tmp_path / "subsets-reward")
    subset = training_set(store, schemas.REWARD_TOPK, tmp_path / "scratch")
    assert (subset.pairs, subset.pool_pairs) == (3, 10)

    _compress(data, schemas.RANDOM_TOPK, set(SHARDS["s0"] + SHARDS["s1"]), tmp_path / "subsets-all")
    everything = training_set(store, schemas.RANDOM_TOPK, tmp_path / "scratch")
    full = training_set(store, schemas.FULL, tmp_path / "scratch")
    assert everything.fingerprint == full.fingerprint  # the same pairs, from re-packed tars

    settings = TrainingSettings(
        clip_source="tiny",
        blip_source="tiny",
        budget="samples",
        samples_seen=None,
        full_epochs=2.5,
        epochs=3,
        image_size=32,
        batch_size=8,
        clip_learning_rate=1e-3,
        blip_learning_rate=1e-3,
        seed=0,
        seeds=1,
        device=None,
    )
    assert budget_for(settings, subset.pool_pairs) == budget_for(settings, full.pool_pairs)
    assert budget_for(settings, full.pool_pairs).samples_seen == 25
    with pytest.raises(ValueError, match='budget must be "samples" or "epochs"'):
        budget_for(dataclasses.replace(settings, budget="steps"), 10)
