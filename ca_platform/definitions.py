"""The one Dagster `Definitions` of the platform; `workspace.yaml` loads it."""

from dagster import Definitions

from ca_platform.assets import ALL_ASSETS
from ca_platform.assets.jobs import compression_job, reward_models_job, shard_scores_job, shard_spine_job
from ca_platform.resources import resources_from_env
from ca_platform.sensors import automation_sensor, pool_shard_sensor, reward_refresh_schedule

defs = Definitions(
    assets=ALL_ASSETS,
    jobs=[shard_spine_job, reward_models_job, shard_scores_job, compression_job],
    sensors=[pool_shard_sensor, automation_sensor],
    schedules=[reward_refresh_schedule],
    resources=resources_from_env(),
)
