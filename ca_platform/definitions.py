"""The one Dagster `Definitions` of the platform; `workspace.yaml` loads it."""

from dagster import Definitions

from ca_platform.assets import SPINE_ASSETS
from ca_platform.resources import resources_from_env
from ca_platform.sensors import pool_shard_sensor, shard_spine_job

defs = Definitions(
    assets=SPINE_ASSETS,
    jobs=[shard_spine_job],
    sensors=[pool_shard_sensor],
    resources=resources_from_env(),
)
