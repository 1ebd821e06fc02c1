"""What starts runs without anyone clicking: new pool shards, new model versions, and a retraining cron."""

import os

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DagsterInstance,
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    ScheduleDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from ca_platform.assets.automation import REGISTERED_REWARD_CHECKPOINT
from ca_platform.assets.jobs import reward_models_job, shard_spine_job
from ca_platform.assets.partitions import POOL_SHARDS, pool_shards
from ca_platform.ingest.download import done_shards, is_done
from ca_platform.ingest.pool import discover_shards
from ca_platform.resources import PlatformStorage

PARTITION_NAME_TAG = "dagster/partition"
IN_FLIGHT = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]


@sensor(job=shard_spine_job, minimum_interval_seconds=30, default_status=DefaultSensorStatus.RUNNING)
def pool_shard_sensor(context: SensorEvaluationContext, storage: PlatformStorage) -> SensorResult:
    """Adds every pool shard not yet a partition and requests a run for each shard whose content is new.

    "Done" is read from the data root (ca_platform.ingest.download.done_shards), the notion `ca-platform run`
    uses too: a shard whose spine was published from this version of its file, by any path (CLI, UI,
    backfill, another instance), is not requested; a rewritten file is. Nor is a shard with a run queued or
    under way, whoever started it (a backfill from the UI, the CLI): the sensor never doubles a backfill. The
    run key carries the file's fingerprint, so the sensor's own request is not repeated either. Re-running a
    done shard is an explicit materialization in the UI.
    """
    shards = discover_shards(storage.pool_store())
    known = set(context.instance.get_dynamic_partitions(POOL_SHARDS))
    new_keys = [s.key for s in shards if s.key not in known]
    done = done_shards(storage.data_store())
    busy = shards_in_flight(context.instance)
    return SensorResult(
        run_requests=[
            RunRequest(partition_key=s.key, run_key=f"{s.key}@{s.fingerprint}")
            for s in shards
            if not is_done(done, s.key, s.fingerprint) and s.key not in busy
        ],
        dynamic_partitions_requests=[pool_shards.build_add_request(new_keys)] if new_keys else [],
    )


def shards_in_flight(instance: DagsterInstance) -> set[str]:
    """The partitions of every run queued or under way on the instance (any job: spine, scores, subsets)."""
    records = instance.get_run_records(RunsFilter(statuses=IN_FLIGHT))
    return {key for record in records if (key := record.dagster_run.tags.get(PARTITION_NAME_TAG))}


# Evaluates the assets' automation conditions (ca_platform.assets.automation): a new reward-model version
# rescores every shard, then the threshold and subsets follow, as one backfill.
automation_sensor = AutomationConditionSensorDefinition(
    "automation_sensor",
    target=AssetSelection.all() | AssetSelection.assets(REGISTERED_REWARD_CHECKPOINT),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Rescoring on new model versions, then threshold and subsets; observes registered checkpoints.",
)

# Retrain on the user's cron (CA_REWARD_CRON): an unchanged recipe reuses the model and so rescores nothing.
reward_refresh_schedule = ScheduleDefinition(
    name="reward_refresh_schedule",
    job=reward_models_job,
    cron_schedule=os.environ.get("CA_REWARD_CRON", "0 3 * * 1"),
    default_status=DefaultScheduleStatus.RUNNING if os.environ.get("CA_REWARD_CRON") else DefaultScheduleStatus.STOPPED,
    description="Re-stage the preferences and retrain the reward model and baselines; new versions are rescored.",
)
