"""Jobs over the assets: what a backfill or a sensor launches."""

from dagster import AssetSelection, define_asset_job

from ca_platform.assets import REWARD_ASSETS, SHARD_SCORE_ASSETS, SHARD_SUBSET_ASSETS, SPINE_ASSETS, THRESHOLD_ASSETS
from ca_platform.assets.partitions import pool_shards

shard_spine_job = define_asset_job(
    "shard_spine",
    selection=AssetSelection.assets(*SPINE_ASSETS),
    partitions_def=pool_shards,  # what pool_shard_sensor requests per new shard
    description="Read, validate and download one pool shard.",
)
reward_models_job = define_asset_job(
    "reward_models",
    selection=AssetSelection.assets(*REWARD_ASSETS),
    description="Stage the preferences, train the reward model and its baselines, compare them.",
)
shard_scores_job = define_asset_job(
    "shard_scores",
    selection=AssetSelection.assets(*SHARD_SCORE_ASSETS),
    partitions_def=pool_shards,
    description="Score one downloaded shard with the current reward model and CLIP score.",
)
compression_job = define_asset_job(
    "compression",
    selection=AssetSelection.assets(*THRESHOLD_ASSETS, *SHARD_SUBSET_ASSETS),
    description="The global cut of every subset variant, then each shard's compressed subsets.",
)
