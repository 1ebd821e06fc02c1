"""Which version of each model is current, training a model once per recipe, and loading a scorer.

Each kind of model (the scorers of `schemas.SCORERS`, and the CLIP/BLIP trained on each training variant)
keeps its checkpoints under `models/<kind>/<version>/` and a pointer `models/<kind>/current.json` saying
which version is current, what it was made from (its recipe), and its metrics. A user's own pretrained
folder is used in place, by its content hash.

The scorers and trainers (torch, transformers) are imported where a model is trained or loaded, not with the
module: every Dagster process loads the definitions, and most only read the pointer documents.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ca_platform import layout
from ca_platform.preferences.staging import current_preference_set, load_preference_split
from ca_platform.schemas import BLIP_SCORE, CLIP_SCORE, POOL_BLIP_BACKBONE, REWARD_MODEL
from ca_platform.storage import DataStore, fetch_folder, publish_folder, read_json, write_json

if TYPE_CHECKING:
    from ca_platform.scoring.reward.model import RewardModelSpec
    from ca_platform.scoring.reward.train import TrainConfig
    from ca_platform.scoring.scorer import PairScorer


class NoModelError(LookupError):
    """A kind of model has no current version yet."""


def current_model(store: DataStore, kind: str, scratch: Path) -> dict[str, Any]:
    """The pointer document of the current version of `kind`."""
    document = read_json(store, layout.current_model_key(kind), scratch)
    if document is None:
        raise NoModelError(f"no {kind} has been trained or registered yet under {store.uri}")
    return document


def recipe_hash(recipe: Any) -> str:
    """A short hash of what a model is trained from (a JSON value; dict keys sorted): the same recipe twice
    gives the same model, so the second time nothing is trained."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def recipe_settings(settings: Any) -> dict[str, Any]:
    """A settings dataclass's values that shape the model: all but the device it is trained on."""
    return {name: value for name, value in dataclasses.asdict(settings).items() if name != "device"}


# Trains a model and saves its checkpoint: (version, checkpoint folder, the pointer document's other fields).
TrainAndSave = Callable[[], tuple[str, Path, dict[str, Any]]]


def train_once(
    store: DataStore, kind: str, recipe: str, train_and_save: TrainAndSave, scratch: Path
) -> tuple[dict[str, Any], bool]:
    """The current document of `kind` once a model of `recipe` is current, and whether it was trained now.

    The current version is kept when it was trained from `recipe`; otherwise `train_and_save` trains one,
    its checkpoint is published under `models/<kind>/<version>/` and then made current.
    """
    current = read_json(store, layout.current_model_key(kind), scratch)
    if current is not None and current.get("recipe") == recipe:
        return current, False
    version, folder, fields = train_and_save()
    publish_folder(store, folder, layout.model_prefix(kind, version))
    current = {**fields, "version": version, "recipe": recipe}
    write_json(store, layout.current_model_key(kind), current, scratch)
    return current, True


def current_reward_model(
    store: DataStore,
    spec: RewardModelSpec,
    config: TrainConfig,
    split: tuple[float, int],
    pool_backbone: Callable[[Path], str],
    cache: Path,
    scratch: Path,
) -> tuple[dict[str, Any], bool]:
    """The reward model's current document, and whether it was trained now.

    While a checkpoint is pinned (`register_reward_checkpoint`), that checkpoint is current and nothing is
    trained. Otherwise the model is trained on the current preference set, split `(holdout_fraction, seed)`
    by image, once per recipe (preference set, backbone, model and training settings, split). With the
    backbone POOL_BLIP_BACKBONE, `pool_backbone(folder)` exports the BLIP to start from into `folder` and
    returns its version, which the recipe names (`scoring.baselines.pool_blip_backbone`; passed in, as that
    module builds on this one).
    """
    pinned = registered_reward_checkpoint(store, scratch)
    if pinned is not None:
        write_json(store, layout.current_model_key(REWARD_MODEL), pinned, scratch)
        return pinned, False
    preferences = current_preference_set(store, scratch)
    recipe_spec = spec
    if spec.backbone == POOL_BLIP_BACKBONE:
        backbone = scratch / "backbone"
        recipe_spec = dataclasses.replace(spec, backbone=f"{POOL_BLIP_BACKBONE}@{pool_backbone(backbone)}")
        spec = dataclasses.replace(spec, backbone=str(backbone))
    recipe = {"preferences": preferences, "spec": repr(recipe_spec), "config": repr(config), "split": split}

    def train_and_save() -> tuple[str, Path, dict[str, Any]]:
        from ca_platform.scoring.reward.scorer import save_reward_model
        from ca_platform.scoring.reward.train import train_reward_model

        folder = fetch_folder(store, layout.preferences_prefix(preferences), cache)
        train, heldout = load_preference_split(folder, *split)
        trained = train_reward_model(train, heldout, spec, config)
        version, checkpoint = save_reward_model(trained, scratch / "checkpoints")
        return version, checkpoint, {"preferences": preferences, "metrics": trained.metrics}

    return train_once(store, REWARD_MODEL, recipe_hash(recipe), train_and_save, scratch)


def load_scorer(store: DataStore, kind: str, document: dict[str, Any], cache: Path, device: str | None) -> PairScorer:
    """The scorer of the version `document` points at: a platform checkpoint or a user's pretrained folder.

    Loaded once per process and version: a run that scores many shards in one process (`ca-platform run`)
    loads the model once.
    """
    version = document["version"]
    if document.get("pretrained_dir"):
        return _cached_scorer(kind, "pretrained", document["pretrained_dir"], version, device)
    folder = fetch_folder(store, layout.model_prefix(kind, version), cache)
    return _cached_scorer(kind, "checkpoint", str(folder), version, device)


@functools.lru_cache(maxsize=4)
def _cached_scorer(kind: str, origin: str, folder: str, version: str, device: str | None) -> PairScorer:
    """Keyed by the content version too, so a pretrained folder changed in place is loaded again."""
    from ca_platform.scoring.blip_itm import BlipItmScorer, load_blip_itm
    from ca_platform.scoring.clip_score import ClipScorer, load_clip
    from ca_platform.scoring.reward.scorer import RewardScorer, load_reward_model

    if origin == "pretrained":
        return {CLIP_SCORE: ClipScorer, BLIP_SCORE: BlipItmScorer}[kind].from_pretrained_dir(Path(folder), device)
    if kind == REWARD_MODEL:
        return RewardScorer(load_reward_model(Path(folder), device=device))
    return {CLIP_SCORE: load_clip, BLIP_SCORE: load_blip_itm}[kind](Path(folder), device)


def register_reward_checkpoint(store: DataStore, source: Path, scratch: Path) -> str:
    """Pin a reward-model checkpoint trained elsewhere (a folder as `save_reward_model` writes it): it must
    load (safetensors only) before it is copied. `reward_model` adopts the pinned version instead of training
    until it is unpinned. Returns its version."""
    from ca_platform.scoring.reward.scorer import load_reward_model, register_reward_model

    version, folder = register_reward_model(source, scratch / "checkpoints")
    metrics = load_reward_model(folder, device="cpu").metrics
    publish_folder(store, folder, layout.model_prefix(REWARD_MODEL, version))
    document = {"version": version, "registered_from": str(source.resolve()), "metrics": metrics}
    write_json(store, layout.registered_model_key(REWARD_MODEL), document, scratch)
    return version


def registered_reward_checkpoint(store: DataStore, scratch: Path) -> dict[str, Any] | None:
    """The pinned reward-model checkpoint's document, or None when reward_model trains its own."""
    return read_json(store, layout.registered_model_key(REWARD_MODEL), scratch)


def unpin_reward_checkpoint(store: DataStore) -> bool:
    """Let reward_model train from the preferences again; False when nothing was pinned."""
    key = layout.registered_model_key(REWARD_MODEL)
    if not store.exists(key):
        return False
    store.delete(key)
    return True
