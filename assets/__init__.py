"""Software-defined assets, one module per stage of the lineage, each module one group in the UI.

ingest -> reward (preferences, reward model) and baselines -> scores -> dedup -> captions (recaptioning, optional) ->
compression -> training -> evaluation.
The lists below are what the runner materializes stage by stage and the jobs select.
"""

from ca_platform.assets.baselines import blip_score_model, clip_score_model
from ca_platform.assets.captions import caption_analytics, captioner_model, synthetic_caption_scores, synthetic_captions
from ca_platform.assets.compression import compressed_subset, score_threshold
from ca_platform.assets.dedup import duplicate_groups, image_fingerprints
from ca_platform.assets.evaluation import (
    captioning_eval,
    classification_eval,
    classification_set,
    curation_report,
    evaluation_set,
    retrieval_eval,
)
from ca_platform.assets.ingest import downloaded_shard, raw_pool_shard
from ca_platform.assets.reward import preference_accuracy, preference_data, registered_reward_checkpoint, reward_model
from ca_platform.assets.scores import clip_scores, reward_scores
from ca_platform.assets.training import blip_checkpoint, clip_checkpoint

SOURCE_ASSETS = [registered_reward_checkpoint]
SPINE_ASSETS = [raw_pool_shard, downloaded_shard]
REWARD_ASSETS = [preference_data, reward_model, clip_score_model, blip_score_model, preference_accuracy]
PINNED_REWARD_ASSETS = [reward_model, clip_score_model]  # a pinned checkpoint needs no preferences
SHARD_SCORE_ASSETS = [reward_scores, clip_scores, image_fingerprints]
DEDUP_ASSETS = [duplicate_groups]
CAPTIONER_ASSETS = [captioner_model]
SHARD_CAPTION_ASSETS = [synthetic_captions, synthetic_caption_scores]
CAPTION_ANALYTICS_ASSETS = [caption_analytics]
THRESHOLD_ASSETS = [score_threshold]
SHARD_SUBSET_ASSETS = [compressed_subset]
EVALUATION_SET_ASSETS = [evaluation_set]
CLASSIFICATION_SET_ASSETS = [classification_set]  # with a labelled set only
VARIANT_MODEL_ASSETS = [clip_checkpoint, blip_checkpoint, retrieval_eval, captioning_eval]  # per training variant
VARIANT_CLASSIFICATION_ASSETS = [classification_eval]  # per training set, with a labelled set only
REPORT_ASSETS = [curation_report]
ALL_ASSETS = (
    SOURCE_ASSETS
    + SPINE_ASSETS
    + REWARD_ASSETS
    + SHARD_SCORE_ASSETS
    + DEDUP_ASSETS
    + CAPTIONER_ASSETS
    + SHARD_CAPTION_ASSETS
    + CAPTION_ANALYTICS_ASSETS
    + THRESHOLD_ASSETS
    + SHARD_SUBSET_ASSETS
    + EVALUATION_SET_ASSETS
    + CLASSIFICATION_SET_ASSETS
    + VARIANT_MODEL_ASSETS
    + VARIANT_CLASSIFICATION_ASSETS
    + REPORT_ASSETS
)
