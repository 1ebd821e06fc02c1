"""Software-defined assets, one module per stage of the lineage."""

from ca_platform.assets.baselines import blip_score_model, clip_score_model
from ca_platform.assets.compression import score_threshold
from ca_platform.assets.downloads import downloaded_shard
from ca_platform.assets.evaluation import preference_accuracy
from ca_platform.assets.pool import raw_pool_shard
from ca_platform.assets.reward import preference_data, reward_model
from ca_platform.assets.scores import reward_scores

SPINE_ASSETS = [raw_pool_shard, downloaded_shard]
REWARD_ASSETS = [preference_data, reward_model, clip_score_model, blip_score_model, preference_accuracy]
SHARD_SCORE_ASSETS = [reward_scores]
COMPRESSION_ASSETS = [score_threshold]
ALL_ASSETS = SPINE_ASSETS + REWARD_ASSETS + SHARD_SCORE_ASSETS + COMPRESSION_ASSETS
