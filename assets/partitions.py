"""Partitions: pool shards (dynamic: the shard sensor and `ca-platform shards register` add them) and the
training sets the models are trained and evaluated on (dynamic: `score_threshold` adds one per cut)."""

from collections.abc import Iterable

from dagster import DagsterInstance, DynamicPartitionsDefinition

from ca_platform.schemas import FULL

POOL_SHARDS = "pool_shards"
pool_shards = DynamicPartitionsDefinition(name=POOL_SHARDS)
# One partition per point of the compression curve: `full`, and each cut's training set (`reward_topk@0.3`,
# `recap_all`, ...; layout.training_set_key), so a single point is materialized or backfilled by its key.
TRAINING_VARIANTS = "training_variants"
training_variants = DynamicPartitionsDefinition(name=TRAINING_VARIANTS)


def register_training_sets(instance: DagsterInstance, keys: Iterable[str]) -> list[str]:
    """Add `full` and the training sets `keys` as partitions (idempotent: known ones stay); returns them all.
    Training sets of earlier cuts stay too, as their checkpoints do."""
    wanted = [FULL, *keys]
    instance.add_dynamic_partitions(TRAINING_VARIANTS, wanted)
    return wanted
