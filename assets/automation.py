"""When assets refresh themselves (declarative automation, run by `sensors.automation_sensor`).

The chain a new reward model sets off: `reward_model` materializes with a new DataVersion (its checkpoint's
content hash) -> every shard's `reward_scores` is requested -> once no scoring run is left, `score_threshold`
-> every shard's `compressed_subset`. Each step is requested by the sensor tick after the one before landed.
A new captioner version (`captioner_model`) sets off the same chain from `synthetic_captions`, through
`synthetic_caption_scores`, which a new reward model also re-requests. A new CLIP-score model re-fingerprints
every shard (`image_fingerprints`, its embeddings), then `duplicate_groups`, and the cut follows; a new reward
model re-runs `duplicate_groups` too (it picks each group's representative).

Scores follow *data versions*, not materializations: re-running `reward_model` with an unchanged recipe, or
re-observing the same registered checkpoint, changes no data version and so requests nothing; one model
version scores each shard once. A checkpoint registered from outside reaches `reward_model` through the
observable source `registered_reward_checkpoint`, whose data version is the checkpoint's hash.
"""

from dagster import AssetKey, AssetSelection, AutomationCondition

REGISTERED_REWARD_CHECKPOINT = AssetKey("registered_reward_checkpoint")
SCORE_THRESHOLD = AssetKey("score_threshold")
SYNTHETIC_CAPTIONS = AssetKey("synthetic_captions")
SYNTHETIC_CAPTION_SCORES = AssetKey("synthetic_caption_scores")
EVALUATION_SET = AssetKey("evaluation_set")
CLASSIFICATION_SET = AssetKey("classification_set")

# Any dependency has a data version the previous evaluation had not seen (a new model, a new download).
_DEPS_NEW_VERSION = AutomationCondition.any_deps_match(AutomationCondition.data_version_changed()).with_label(
    "any_deps_new_data_version"
)

# Scores: eager, but on new data versions of the model or the download rather than on any materialization.
ON_NEW_MODEL_VERSION = AutomationCondition.eager().replace("any_deps_updated", _DEPS_NEW_VERSION)

# The reward model adopts a newly registered checkpoint on its own; training from preferences stays a
# deliberate act (a run, a backfill, or `reward_refresh_schedule`).
ON_NEW_REGISTERED_CHECKPOINT = (
    _DEPS_NEW_VERSION.allow(AssetSelection.assets(REGISTERED_REWARD_CHECKPOINT)).since_last_handled()
    & ~AutomationCondition.in_progress()
).with_label("new_registered_checkpoint")

# Recaptioning and the held-out sets are optional: a pool never captioned has no synthetic captions, and one
# with no evaluation or labelled set nothing to decontaminate against, which must not hold back what the raw
# pairs alone decide (dedup, the cut of the raw variants, their subsets).
_DEPS_MISSING_BUT_CAPTIONS = (
    AutomationCondition.any_deps_missing()
    .ignore(AssetSelection.assets(SYNTHETIC_CAPTIONS, SYNTHETIC_CAPTION_SCORES, EVALUATION_SET, CLASSIFICATION_SET))
    .with_label("any_deps_missing_but_optional")
)

# Dedup and the threshold: once the scores (fingerprints) they read are updated and none is still running.
ON_SCORES_UPDATE = AutomationCondition.eager().replace("any_deps_missing", _DEPS_MISSING_BUT_CAPTIONS)

# Subsets: after the threshold, never on the scores alone (the cut they apply would be the previous one).
ON_THRESHOLD_UPDATE = (
    AutomationCondition.eager()
    .replace(
        "any_deps_updated",
        AutomationCondition.any_deps_updated()
        .allow(AssetSelection.assets(SCORE_THRESHOLD))
        .with_label("threshold_updated"),
    )
    .replace("any_deps_missing", _DEPS_MISSING_BUT_CAPTIONS)
)

# How often the registered checkpoint's pointer is looked at.
OBSERVE_REGISTRATIONS = AutomationCondition.cron_tick_passed("*/5 * * * *")
