"""Partitions: pool shards (dynamic: the shard sensor and `ca-platform shards register` add them) and the
training-set variants the models are trained and evaluated on."""

from dagster import DynamicPartitionsDefinition, StaticPartitionsDefinition

from ca_platform.schemas import TRAINING_VARIANTS

POOL_SHARDS = "pool_shards"
pool_shards = DynamicPartitionsDefinition(name=POOL_SHARDS)
training_variants = StaticPartitionsDefinition(list(TRAINING_VARIANTS))
