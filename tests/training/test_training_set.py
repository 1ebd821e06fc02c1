"""A variant's training set comes from its tars alone: one walk gives the pairs' fingerprint and their count."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import polars as pl
import pytest

from ca_platform import layout, schemas
from ca_platform.compression.subsets import write_shard_subsets
from ca_platform.storage import LocalStore, publish_folder
from ca_platform.training.training_set import NoTrainingDataError, TrainingSettings, budget_for, training_set
from tests.conftest import SHARDS, write_downloaded_pool


def _compress(data: Path, training_set_key: str, kept: set[str], scratch: Path) -> None:
    variant, keep_fraction = layout.parse_training_set_key(training_set_key)
    for shard, uids in SHARDS.items():
        ledger = pl.read_parquet(data / layout.download_rows_key(shard))
        tars = [data / layout.download_tar_key(shard, name) for name in sorted(ledger["tar"].unique())]
        membership = pl.DataFrame(
            {
                "uid": sorted(uids),
                "shard": shard,
                "variant": variant,
                "model_version": "v1",
                "keep_fraction": keep_fraction,
                "score": 0.0,
                "kept": [uid in kept for uid in sorted(uids)],
                "caption_source": schemas.RAW_CAPTION,
                "captioner_version": None,
                "caption_rank": None,
                "drop_reason": None,
            }
        )
        write_shard_subsets({training_set_key: membership}, tars, scratch / shard, shard)
        publish_folder(
            LocalStore(data),
            scratch / shard / training_set_key,
            layout.subset_prefix(training_set_key, shard),
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
    with pytest.raises(NoTrainingDataError, match="shard s0 has no reward_topk@0.3 subset yet"):
        training_set(store, "reward_topk@0.3", tmp_path / "scratch")
    with pytest.raises(ValueError, match="reward_topk is cut at a keep fraction k: its training sets are reward_"):
        training_set(store, schemas.REWARD_TOPK, tmp_path / "scratch")  # a variant that drops pairs needs its k

    _compress(data, "reward_topk@0.3", {"a1", "a4", "b0"}, tmp_path / "subsets-reward")
    subset = training_set(store, "reward_topk@0.3", tmp_path / "scratch")
    assert (subset.pairs, subset.pool_pairs) == (3, 10)
    _compress(data, "reward_topk@0.5", {"a1", "a4", "b0", "a0", "b1"}, tmp_path / "subsets-reward-half")
    half = training_set(store, "reward_topk@0.5", tmp_path / "scratch")
    assert (half.pairs, half.pool_pairs) == (5, 10)  # another point of the curve, counted in the same pool

    _compress(data, "random_topk@1.0", set(SHARDS["s0"] + SHARDS["s1"]), tmp_path / "subsets-all")
    everything = training_set(store, "random_topk@1.0", tmp_path / "scratch")
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
    # equal samples seen at every k: passes over the full pool, not over the subset
    assert budget_for(settings, subset.pool_pairs) == budget_for(settings, half.pool_pairs)
    assert budget_for(settings, subset.pool_pairs) == budget_for(settings, full.pool_pairs)
    assert budget_for(settings, full.pool_pairs).samples_seen == 25
    with pytest.raises(ValueError, match='budget must be "samples" or "epochs"'):
        budget_for(dataclasses.replace(settings, budget="steps"), 10)


@pytest.mark.parametrize(
    ("variant", "k", "key"),
    [
        (schemas.REWARD_TOPK, 0.3, "reward_topk@0.3"),
        (schemas.RAW_TOPK_PLUS_RECAP, 0.125, "raw_topk_plus_recap@0.125"),
        (schemas.RANDOM_TOPK, 1, "random_topk@1.0"),
        (schemas.FULL, None, "full"),
        (schemas.RECAP_ALL, 0.3, "recap_all"),  # keeps every image: one training set whatever k
        (schemas.RECAP_MIX, None, "recap_mix_p"),
    ],
)
def test_a_training_set_key_is_built_and_parsed_in_one_place(variant: str, k: float | None, key: str) -> None:
    assert layout.training_set_key(variant, k) == key
    parsed_variant, parsed_k = layout.parse_training_set_key(key)
    assert parsed_variant == variant and parsed_k == (None if variant in schemas.UNCUT_VARIANTS else k)


@pytest.mark.parametrize("key", ["reward_topk@", "reward_topk@0.30", "reward_topk@1.5", "full@0.3", "best@0.3", "x"])
def test_a_malformed_training_set_key_is_named(key: str) -> None:
    with pytest.raises(ValueError, match=f"training set '{re.escape(key)}'"):
        layout.parse_training_set_key(key)
