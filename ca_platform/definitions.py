"""The one Dagster `Definitions` of the platform; `workspace.yaml` loads it."""

from dagster import AssetSelection, Definitions, define_asset_job

from ca_platform.assets import ALL_ASSETS, REWARD_ASSETS, SHARD_SCORE_ASSETS
from ca_platform.assets.partitions import pool_shards
from ca_platform.resources import resources_from_env
from ca_platform.sensors import pool_shard_sensor, shard_spine_job

reward_models_job = define_asset_job(
    "reward_models",
    selection=AssetSelection.assets(*REWARD_ASSETS),
    description="Stage the preferences, train the reward model and its baselines, compare them.",
)
shard_scores_job = define_asset_job(
    "shard_scores",
    selection=AssetSelection.assets(*SHARD_SCORE_ASSETS),
    partitions_def=pool_shards,
    description="Score one downloaded shard with the current reward model.",
)

defs = Definitions(
    assets=ALL_ASSETS,
    jobs=[shard_spine_job, reward_models_job, shard_scores_job],
    sensors=[pool_shard_sensor],
    resources=resources_from_env(),
)
