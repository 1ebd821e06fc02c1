"""The reward model: human preferences (preference_data), a checkpoint pinned from outside
(registered_reward_checkpoint), the model trained on the preferences (reward_model), and how well it and its
baselines order held-out preferences (preference_accuracy)."""

import functools
from math import nan

from dagster import (
    AssetExecutionContext,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    ObserveResult,
    asset,
    observable_source_asset,
)

from ca_platform import layout
from ca_platform.analytics.plots import markdown_table
from ca_platform.assets.automation import (
    OBSERVE_REGISTRATIONS,
    ON_NEW_REGISTERED_CHECKPOINT,
    REGISTERED_REWARD_CHECKPOINT,
)
from ca_platform.assets.baselines import blip_score_model, clip_score_model
from ca_platform.evaluation.preference_accuracy import measure_preference_accuracy
from ca_platform.preferences.staging import publish_preference_set
from ca_platform.resources import (
    DownloadConfig,
    PlatformStorage,
    PreferencesConfig,
    RewardModelConfig,
    ScoringConfig,
)
from ca_platform.schemas import REWARD_MODEL
from ca_platform.scoring.baselines import pool_blip_backbone
from ca_platform.scoring.registry import current_reward_model
from ca_platform.scoring.registry import registered_reward_checkpoint as read_registered_checkpoint

GROUP = "reward"
NO_REGISTERED_CHECKPOINT = "none"


@asset(group_name=GROUP, kinds={"jsonl"})
def preference_data(
    storage: PlatformStorage, preferences: PreferencesConfig, downloader: DownloadConfig
) -> MaterializeResult:
    """The preference file validated whole, format and every image (errors name row and field), and staged with
    its images as a content-addressed set; local images only from under the file's folder (or `image_root`),
    images given by URL through the same guarded download as the pool."""
    if not preferences.uri:
        raise Failure("no preference file configured: pass --preferences FILE or set CA_PREFERENCES_URI")
    with storage.staging_dir("preferences") as staging:
        published = publish_preference_set(
            storage.data_store(), preferences.uri, downloader.settings().policy, staging, preferences.image_root
        )
    return MaterializeResult(
        metadata={
            "version": published.version,
            "images": published.images,
            "ordered_pairs": published.ordered_pairs,
            "tied_pairs": published.tied_pairs,
            "source": MetadataValue.path(preferences.uri),
        },
        data_version=DataVersion(published.version),
    )


@observable_source_asset(key=REGISTERED_REWARD_CHECKPOINT, group_name=GROUP, automation_condition=OBSERVE_REGISTRATIONS)
def registered_reward_checkpoint(storage: PlatformStorage) -> ObserveResult:
    """A reward-model checkpoint trained elsewhere and pinned with `ca-platform register-reward-model`; its
    data version is the checkpoint's content hash ("none" while nothing is pinned)."""
    with storage.staging_dir("registered-reward") as staging:
        document = read_registered_checkpoint(storage.data_store(), staging)
    if document is None:
        return ObserveResult(data_version=DataVersion(NO_REGISTERED_CHECKPOINT))
    return ObserveResult(
        data_version=DataVersion(document["version"]),
        metadata={"version": document["version"], "registered_from": document["registered_from"]},
    )


@asset(
    deps=[preference_data, blip_score_model, registered_reward_checkpoint],
    automation_condition=ON_NEW_REGISTERED_CHECKPOINT,
    group_name=GROUP,
    kinds={"pytorch", "safetensors"},
)
def reward_model(
    context: AssetExecutionContext,
    storage: PlatformStorage,
    preferences: PreferencesConfig,
    reward_training: RewardModelConfig,
) -> MaterializeResult:
    """A BLIP-backbone reward model trained on the preferences with a held-out split by image, saved as a
    checkpoint versioned by content hash. By default it starts from blip_score_model's BLIP; "tiny" starts
    from scratch and a folder from a local pretrained BLIP. Retraining is skipped when the recipe
    (preference set, backbone, model and training settings) has not changed. While a checkpoint is pinned
    (registered_reward_checkpoint), that checkpoint is the reward model and nothing is trained."""
    data = storage.data_store()
    with storage.staging_dir("reward-model") as staging:
        current, trained = current_reward_model(
            data,
            reward_training.spec(),
            reward_training.train_config(),
            (preferences.holdout_fraction, preferences.split_seed),
            functools.partial(pool_blip_backbone, data, storage.cache_dir()),
            storage.cache_dir(),
            staging,
        )
    if current.get("registered_from"):
        context.log.info(f"reward model {current['version']} is pinned, from {current['registered_from']}")
    elif not trained:
        context.log.info(f"reward model {current['version']} already trained from this recipe: reused")
    metrics = current["metrics"]
    return MaterializeResult(
        metadata={
            "version": current["version"],
            "source": current.get("registered_from") or f"trained on preferences {current.get('preferences')}",
            "heldout_accuracy": float(metrics.get("heldout_accuracy", float("nan"))),
            "heldout_pairs": int(metrics.get("heldout_pairs", 0)),
            "heldout_cross_image_accuracy": float(
                nan if (across := metrics.get("heldout_cross_image_accuracy")) is None else across
            ),
            # checkpoints from before calibration existed were trained within images only
            "calibration": str(metrics.get("calibration", "within_image")),
            "metrics": MetadataValue.json(metrics),
            "checkpoint": MetadataValue.path(data.uri_of(layout.model_prefix(REWARD_MODEL, current["version"]))),
        },
        data_version=DataVersion(current["version"]),
    )


@asset(
    deps=[preference_data, reward_model, clip_score_model, blip_score_model],
    group_name=GROUP,
    kinds={"json"},
)
def preference_accuracy(
    storage: PlatformStorage, preferences: PreferencesConfig, scoring: ScoringConfig
) -> MaterializeResult:
    """Reward model, CLIP score and BLIP ITM score on the same held-out human preferences: the share of caption
    pairs of one image (ties excluded) each orders as people did, and the share of (top caption of one image,
    bottom caption of another) pairs, which a cut across images relies on. Written to
    reports/preference_accuracy.json."""
    with storage.staging_dir("preference-accuracy") as staging:
        accuracy = measure_preference_accuracy(
            storage.data_store(),
            preferences.holdout_fraction,
            preferences.split_seed,
            scoring.device,
            storage.cache_dir(),
            staging,
        )
    report, versions = accuracy.report, accuracy.versions
    across = report["cross_image"]
    table = markdown_table(
        ["scorer", "within an image", "across images", "version"],
        [[kind, f"{report[kind]:.3f}", f"{across[kind]:.3f}", versions[kind]] for kind in versions],
    )
    return MaterializeResult(
        metadata={
            **{kind: float(report[kind]) for kind in versions},
            **{f"{kind}_cross_image": float(across[kind]) for kind in versions},
            "pairs": report["pairs"],
            "cross_image_pairs": report["cross_image_pairs"],
            "table": MetadataValue.md(table),
        },
    )
