"""The shard sensor: new parquet files in the pool become partitions and get their runs."""

from dagster import DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult, sensor

from ca_platform.assets.jobs import shard_spine_job
from ca_platform.assets.partitions import POOL_SHARDS, pool_shards
from ca_platform.pool import discover_shards
from ca_platform.resources import PlatformStorage


@sensor(job=shard_spine_job, minimum_interval_seconds=30, default_status=DefaultSensorStatus.RUNNING)
def pool_shard_sensor(context: SensorEvaluationContext, storage: PlatformStorage) -> SensorResult:
    """Adds every pool shard not yet a partition and requests a run per shard and content version.

    The run key carries the file's fingerprint, so a shard is run once per version of its file: an
    unchanged shard is never requested twice, a rewritten one is run again.
    """
    shards = discover_shards(storage.pool_store())
    known = set(context.instance.get_dynamic_partitions(POOL_SHARDS))
    new_keys = [s.key for s in shards if s.key not in known]
    return SensorResult(
        run_requests=[RunRequest(partition_key=s.key, run_key=f"{s.key}@{s.fingerprint}") for s in shards],
        dynamic_partitions_requests=[pool_shards.build_add_request(new_keys)] if new_keys else [],
    )
