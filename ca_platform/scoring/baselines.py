"""The baselines the reward model must beat, CLIP score and BLIP ITM: the user's pretrained models, or models
trained on the raw pool's downloaded pairs (again only when the downloads or the settings change).

The models (torch, transformers) are imported where one is trained or exported, not with the module: every
Dagster process loads the definitions, and most train none.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ca_platform import layout
from ca_platform.ingest.download import downloaded_rows, downloaded_shards, fetch_shard_download, read_download_ledger
from ca_platform.ingest.webdataset_io import iter_pairs
from ca_platform.models.checkpoints import content_version
from ca_platform.schemas import BLIP_SCORE, CLIP_SCORE, UID
from ca_platform.scoring.registry import current_model, load_scorer, recipe_hash, recipe_settings, train_once
from ca_platform.storage import DataStore, write_json


def _trainer(kind: str) -> tuple[Callable[..., Any], Callable[[Any, Path], tuple[str, Path]]]:
    """The baseline's trainer and checkpoint writer."""
    from ca_platform.scoring.blip_itm import save_blip_itm, train_blip_itm
    from ca_platform.scoring.clip_score import save_clip, train_clip

    return {CLIP_SCORE: (train_clip, save_clip), BLIP_SCORE: (train_blip_itm, save_blip_itm)}[kind]


@dataclass(frozen=True)
class BaselineSettings:
    """How a baseline is trained on the pool (both baselines alike)."""

    image_size: int
    epochs: int
    batch_size: int
    learning_rate: float
    max_train_pairs: int
    seed: int
    device: str | None


def downloads_fingerprint(store: DataStore, shards: list[str], scratch: Path) -> str:
    """A hash of which images were downloaded (uid and image sha256 of every success): it stays the same when
    a shard is downloaded again with the same result, so models trained on the pool are not retrained."""
    digest = hashlib.sha256()
    for shard in shards:
        successes = downloaded_rows(read_download_ledger(store, shard, scratch)).select(UID, "sha256").sort(UID)
        digest.update(shard.encode())
        digest.update(successes.write_csv().encode())
    return digest.hexdigest()


def pool_pairs(store: DataStore, shards: list[str], scratch: Path, limit: int) -> Iterator[tuple[Image.Image, str]]:
    """(image, caption) of successfully downloaded pairs of the raw pool, shard by shard, at most `limit`."""

    def every_pair() -> Iterator[tuple[Image.Image, str]]:
        for shard in shards:
            _, tars = fetch_shard_download(store, shard, scratch)
            for _, image, caption in iter_pairs(tars):
                yield image, caption

    return itertools.islice(every_pair(), limit)


def current_baseline(
    store: DataStore, kind: str, pretrained_dir: str | None, settings: BaselineSettings, scratch: Path
) -> tuple[dict[str, Any], bool]:
    """The current document of baseline `kind` (CLIP_SCORE or BLIP_SCORE), and whether it was trained now.

    A configured `pretrained_dir` is used in place, versioned by its content hash; otherwise the model is
    trained on the raw pool's downloaded pairs once per recipe (downloads fingerprint and settings).
    """
    if pretrained_dir:
        current = {"version": content_version(Path(pretrained_dir)), "pretrained_dir": pretrained_dir}
        write_json(store, layout.current_model_key(kind), current, scratch)
        return current, False
    train, save = _trainer(kind)
    shards = downloaded_shards(store)
    recipe = recipe_hash([downloads_fingerprint(store, shards, scratch / "in"), recipe_settings(settings)])

    def train_and_save() -> tuple[str, Path, dict[str, Any]]:
        trained = train(
            pool_pairs(store, shards, scratch / "in", settings.max_train_pairs),
            image_size=settings.image_size,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            seed=settings.seed,
            device=settings.device,
        )
        version, folder = save(trained, scratch / "checkpoints")
        return version, folder, {"metrics": trained.metrics}

    return train_once(store, kind, recipe, train_and_save, scratch)


def pool_blip_backbone(store: DataStore, cache: Path, folder: Path) -> str:
    """Export the current BLIP ITM model (the user's pretrained BLIP, or one trained on the raw pool) as a
    transformers folder to start the reward model from, as ImageReward starts from pretrained BLIP.
    Returns that model's version."""
    from ca_platform.scoring.blip_itm import BlipItmScorer

    document = current_model(store, BLIP_SCORE, folder.parent)
    scorer = load_scorer(store, BLIP_SCORE, document, cache, "cpu")
    assert isinstance(scorer, BlipItmScorer)
    scorer.model.save_pretrained(folder)
    return scorer.version
