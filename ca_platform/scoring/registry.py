"""Which version of each scoring model is current, and loading it as a PairScorer.

Each kind of model ("reward_model", "clip_score", "blip_score") keeps its checkpoints under
`models/<kind>/<version>/` and a pointer `models/<kind>/current.json` saying which version is current, what
it was made from, and its metrics. A user's own pretrained folder is used in place, by its content hash.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ca_platform import layout
from ca_platform.schemas import BLIP_SCORE, CLIP_SCORE, REWARD_MODEL
from ca_platform.scoring.blip_itm import BlipItmScorer, load_blip_itm
from ca_platform.scoring.clip_score import ClipScorer, load_clip
from ca_platform.scoring.reward.model import RewardScorer, load_reward_model, register_reward_model
from ca_platform.scoring.scorer import PairScorer
from ca_platform.storage import DataStore, fetch_folder, publish_folder, read_json, write_json

_LOADERS: dict[str, Callable[[Path, str | None], PairScorer]] = {
    REWARD_MODEL: lambda folder, device: RewardScorer(load_reward_model(folder, device=device)),
    CLIP_SCORE: load_clip,
    BLIP_SCORE: load_blip_itm,
}
_PRETRAINED: dict[str, Callable[[Path, str | None], PairScorer]] = {
    CLIP_SCORE: ClipScorer.from_pretrained_dir,
    BLIP_SCORE: BlipItmScorer.from_pretrained_dir,
}


class NoModelError(LookupError):
    """A kind of model has no current version yet."""


def current_model(store: DataStore, kind: str, scratch: Path) -> dict[str, Any]:
    """The pointer document of the current version of `kind`."""
    document = read_json(store, layout.current_model_key(kind), scratch)
    if document is None:
        raise NoModelError(f"no {kind} has been trained or registered yet under {store.uri}")
    return document


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
    loaders = _PRETRAINED if origin == "pretrained" else _LOADERS
    return loaders[kind](Path(folder), device)


def register_reward_checkpoint(store: DataStore, source: Path, scratch: Path) -> str:
    """Pin a reward-model checkpoint trained elsewhere (a folder as `save_reward_model` writes it): it must
    load (safetensors only) before it is copied. `reward_model` adopts the pinned version instead of training
    until it is unpinned. Returns its version."""
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
