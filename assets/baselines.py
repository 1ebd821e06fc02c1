"""The baselines the reward model must beat: clip_score_model and blip_score_model."""

import hashlib
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from dagster import AssetExecutionContext, AssetsDefinition, DataVersion, MaterializeResult, asset
from PIL import Image

from ca_platform import layout
from ca_platform.assets.downloads import downloaded_shard
from ca_platform.ingest.download import downloaded_shards, fetch_shard_download
from ca_platform.models.checkpoints import content_version
from ca_platform.resources import BaselineConfig, PlatformStorage
from ca_platform.schemas import BLIP_SCORE, CLIP_SCORE, STATUS, UID, Status
from ca_platform.scoring.blip_itm import save_blip_itm, train_blip_itm
from ca_platform.scoring.clip_score import save_clip, train_clip
from ca_platform.scoring.streaming import iter_pairs
from ca_platform.storage import DataStore, fetch_to_local, publish_folder, read_json, write_json


@dataclass(frozen=True)
class Baseline:
    kind: str
    train: Callable[..., Any]
    save: Callable[[Any, Path], tuple[str, Path]]
    pretrained_field: str


BASELINES = (
    Baseline(CLIP_SCORE, train_clip, save_clip, "clip_pretrained_dir"),
    Baseline(BLIP_SCORE, train_blip_itm, save_blip_itm, "blip_pretrained_dir"),
)


def downloads_fingerprint(data: DataStore, shards: list[str], scratch: Path) -> str:
    """A hash of which images were downloaded (uid and image sha256 of every success): it stays the same when
    a shard is downloaded again with the same result, so models trained on the pool are not retrained."""
    digest = hashlib.sha256()
    for shard in shards:
        ledger = pl.read_parquet(fetch_to_local(data, layout.download_rows_key(shard), scratch))
        successes = ledger.filter(pl.col(STATUS) == Status.SUCCESS).select(UID, "sha256").sort(UID)
        digest.update(shard.encode())
        digest.update(successes.write_csv().encode())
    return digest.hexdigest()


def pool_pairs(data: DataStore, shards: list[str], scratch: Path, limit: int) -> Iterator[tuple[Image.Image, str]]:
    """(image, caption) of successfully downloaded pairs of the raw pool, shard by shard, at most `limit`."""

    def every_pair() -> Iterator[tuple[Image.Image, str]]:
        for shard in shards:
            _, tars = fetch_shard_download(data, shard, scratch)
            for _, image, caption in iter_pairs(tars):
                yield image, caption

    return itertools.islice(every_pair(), limit)


def baseline_model_asset(baseline: Baseline) -> AssetsDefinition:
    @asset(name=f"{baseline.kind}_model", deps=[downloaded_shard], group_name="baselines", kinds={"pytorch"})
    def baseline_model(
        context: AssetExecutionContext, storage: PlatformStorage, baselines: BaselineConfig
    ) -> MaterializeResult:
        """The user's local pretrained model when configured; otherwise one trained on the raw pool's
        downloaded pairs (retrained only when the downloads or the settings change)."""
        data = storage.data_store()
        with storage.staging_dir(f"{baseline.kind}-model") as staging:
            pretrained = getattr(baselines, baseline.pretrained_field)
            if pretrained:
                current = {"version": content_version(Path(pretrained)), "pretrained_dir": pretrained}
            else:
                shards = downloaded_shards(data)
                fingerprints = downloads_fingerprint(data, shards, staging / "in")
                settings = baselines.model_dump(exclude={"clip_pretrained_dir", "blip_pretrained_dir", "device"})
                recipe = hashlib.sha256(json.dumps([fingerprints, settings], sort_keys=True).encode()).hexdigest()[:16]
                current = read_json(data, layout.current_model_key(baseline.kind), staging)
                if current is not None and current.get("recipe") == recipe and not current.get("pretrained_dir"):
                    context.log.info(f"{baseline.kind} {current['version']} already trained on these downloads")
                else:
                    trained = baseline.train(
                        pool_pairs(data, shards, staging / "in", baselines.max_train_pairs),
                        image_size=baselines.image_size,
                        epochs=baselines.epochs,
                        batch_size=baselines.batch_size,
                        learning_rate=baselines.learning_rate,
                        seed=baselines.seed,
                        device=baselines.device,
                    )
                    version, folder = baseline.save(trained, staging / "checkpoints")
                    publish_folder(data, folder, layout.model_prefix(baseline.kind, version))
                    current = {"version": version, "recipe": recipe, "metrics": trained.metrics}
            write_json(data, layout.current_model_key(baseline.kind), current, staging)
        return MaterializeResult(
            metadata={
                "version": current["version"],
                "source": current.get("pretrained_dir") or "trained on the raw pool",
            },
            data_version=DataVersion(current["version"]),
        )

    return baseline_model


clip_score_model, blip_score_model = (baseline_model_asset(b) for b in BASELINES)
