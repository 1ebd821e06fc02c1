"""The one Dagster `Definitions` of the platform; `workspace.yaml` loads it."""

from dagster import Definitions, in_process_executor

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
    # every run's steps one after the other in the run's process: a process per step would only add an import of
    # the definitions (torch, transformers, img2dataset) to each step, about doubling a shard's run from the UI
    executor=in_process_executor,
)
