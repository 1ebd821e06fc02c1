"""preference_data and reward_model: the human preferences and the reward model that learns them."""

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

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
from ca_platform.assets.automation import (
    OBSERVE_REGISTRATIONS,
    ON_NEW_REGISTERED_CHECKPOINT,
    REGISTERED_REWARD_CHECKPOINT,
)
from ca_platform.assets.baselines import blip_score_model
from ca_platform.preferences.pairs import preference_pairs
from ca_platform.preferences.staging import load_preference_split, stage_preferences
from ca_platform.resources import DownloadConfig, PlatformStorage, PreferencesConfig, RewardModelConfig
from ca_platform.schemas import BLIP_SCORE, REWARD_MODEL
from ca_platform.scoring.blip_itm import BlipItmScorer
from ca_platform.scoring.registry import current_model, load_scorer
from ca_platform.scoring.registry import (
    registered_reward_checkpoint as read_registered_checkpoint,
)
from ca_platform.scoring.reward.model import RewardModelSpec, TrainConfig, save_reward_model, train_reward_model
from ca_platform.storage import DataStore, fetch_folder, publish_folder, read_json, write_json


@asset(group_name="reward", kinds={"jsonl"})
def preference_data(
    storage: PlatformStorage, preferences: PreferencesConfig, downloader: DownloadConfig
) -> MaterializeResult:
    """The preference file validated (errors name row and field) and staged with its images as a
    content-addressed set; images given by URL come through the same guarded download as the pool."""
    if not preferences.uri:
        raise Failure("no preference file configured: pass --preferences FILE or set CA_PREFERENCES_URI")
    data = storage.data_store()
    with storage.staging_dir("preferences") as staging:
        version, items = stage_preferences(Path(preferences.uri), staging / "set", downloader.settings().policy)
        publish_folder(data, staging / "set", layout.preferences_prefix(version), index_name=layout.PREFERENCES_FILE)
        write_json(data, layout.CURRENT_PREFERENCES_KEY, {"version": version, "source": preferences.uri}, staging)
    ordered = sum(len(preference_pairs(i.ranking, "skip")) for i in items)
    tied = sum(len(preference_pairs(i.ranking, "soft")) for i in items) - ordered
    return MaterializeResult(
        metadata={
            "version": version,
            "images": len(items),
            "ordered_pairs": ordered,
            "tied_pairs": tied,
            "source": MetadataValue.path(preferences.uri),
        },
        data_version=DataVersion(version),
    )


# The reward model's backbone setting that means "start from the BLIP ITM model of blip_score_model".
POOL_BLIP_BACKBONE = "blip_score_model"


def training_recipe(preferences_version: str, spec: RewardModelSpec, config: TrainConfig, split: tuple) -> str:
    """What a reward model is trained from: the same recipe twice gives the same model, so it is not redone."""
    document = {"preferences": preferences_version, "spec": repr(spec), "config": repr(config), "split": split}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]


def pool_blip_backbone(storage: PlatformStorage, folder: Path) -> str:
    """Export the current BLIP ITM model (the user's pretrained BLIP, or one trained on the raw pool) as a
    transformers folder to start the reward model from, as ImageReward starts from pretrained BLIP.
    Returns that model's version."""
    data = storage.data_store()
    document = current_model(data, BLIP_SCORE, folder.parent)
    scorer = load_scorer(data, BLIP_SCORE, document, storage.cache_dir(), "cpu")
    assert isinstance(scorer, BlipItmScorer)
    scorer.model.save_pretrained(folder)
    return scorer.version


NO_REGISTERED_CHECKPOINT = "none"


@observable_source_asset(
    key=REGISTERED_REWARD_CHECKPOINT, group_name="reward", automation_condition=OBSERVE_REGISTRATIONS
)
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
    group_name="reward",
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
        pinned = read_registered_checkpoint(data, staging)
        if pinned is not None:
            context.log.info(f"reward model {pinned['version']} is pinned, from {pinned['registered_from']}")
            write_json(data, layout.current_model_key(REWARD_MODEL), pinned, staging)
            return _reward_model_result(data, pinned)
    spec = RewardModelSpec(
        backbone=reward_training.backbone,
        image_size=reward_training.image_size,
        freeze_fraction=reward_training.freeze_fraction,
    )
    config = TrainConfig(
        epochs=reward_training.epochs,
        learning_rate=reward_training.learning_rate,
        images_per_batch=reward_training.images_per_batch,
        tie_policy=reward_training.tie_policy,
        seed=reward_training.seed,
        device=reward_training.device,
    )
    with storage.staging_dir("reward-model") as staging:
        preferences_doc = read_json(data, layout.CURRENT_PREFERENCES_KEY, staging)
        if preferences_doc is None:
            raise Failure("no preference set yet: materialize preference_data first")
        split = (preferences.holdout_fraction, preferences.split_seed)
        if spec.backbone == POOL_BLIP_BACKBONE:
            backbone_version = pool_blip_backbone(storage, staging / "backbone")
            recipe = training_recipe(
                preferences_doc["version"],
                replace(spec, backbone=f"{POOL_BLIP_BACKBONE}@{backbone_version}"),
                config,
                split,
            )
            spec = replace(spec, backbone=str(staging / "backbone"))
        else:
            recipe = training_recipe(preferences_doc["version"], spec, config, split)
        current = read_json(data, layout.current_model_key(REWARD_MODEL), staging)
        if current is not None and current.get("recipe") == recipe:
            context.log.info(f"reward model {current['version']} already trained from this recipe: reused")
        else:
            folder = fetch_folder(data, layout.preferences_prefix(preferences_doc["version"]), storage.cache_dir())
            train, heldout = load_preference_split(folder, *split)
            trained = train_reward_model(train, heldout, spec, config)
            version, checkpoint = save_reward_model(trained, staging / "checkpoints")
            publish_folder(data, checkpoint, layout.model_prefix(REWARD_MODEL, version))
            current = {
                "version": version,
                "recipe": recipe,
                "preferences": preferences_doc["version"],
                "metrics": trained.metrics,
            }
            write_json(data, layout.current_model_key(REWARD_MODEL), current, staging)
    return _reward_model_result(data, current)


def _reward_model_result(data: DataStore, current: dict[str, Any]) -> MaterializeResult:
    metrics = current["metrics"]
    source = current.get("registered_from") or f"trained on preferences {current.get('preferences')}"
    return MaterializeResult(
        metadata={
            "version": current["version"],
            "source": source,
            "heldout_accuracy": float(metrics.get("heldout_accuracy", float("nan"))),
            "heldout_pairs": int(metrics.get("heldout_pairs", 0)),
            "metrics": MetadataValue.json(metrics),
            "checkpoint": MetadataValue.path(data.uri_of(layout.model_prefix(REWARD_MODEL, current["version"]))),
        },
        data_version=DataVersion(current["version"]),
    )
