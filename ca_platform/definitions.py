"""The one Dagster `Definitions` of the platform; `workspace.yaml` loads it."""

from dagster import Definitions

from ca_platform.assets import ALL_ASSETS
from ca_platform.assets.jobs import reward_models_job, shard_scores_job, shard_spine_job
from ca_platform.resources import resources_from_env
from ca_platform.sensors import pool_shard_sensor

defs = Definitions(
    assets=ALL_ASSETS,
    jobs=[shard_spine_job, reward_models_job, shard_scores_job],
    sensors=[pool_shard_sensor],
    resources=resources_from_env(),
)
