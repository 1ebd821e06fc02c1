"""Pool shards as dynamic partitions: the shard sensor and `ca-platform shards register` add them."""

from dagster import DynamicPartitionsDefinition

POOL_SHARDS = "pool_shards"
pool_shards = DynamicPartitionsDefinition(name=POOL_SHARDS)
