"""clip_checkpoint and blip_checkpoint: the same models trained on each training-set variant, equal budget."""

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    AssetsDefinition,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from ca_platform import layout, schemas
from ca_platform.assets.compression import compressed_subset
from ca_platform.assets.downloads import downloaded_shard
from ca_platform.assets.partitions import training_variants
from ca_platform.ingest.download import downloaded_shards
from ca_platform.resources import ModelTrainingConfig, PlatformStorage
from ca_platform.storage import DataStore, fetch_to_local, publish_folder, read_json, write_json
from ca_platform.training.captioner import save_trained_captioner, train_blip_captioner_on_tars
from ca_platform.training.clip import save_trained_clip, train_clip_on_tars
from ca_platform.training.tars import TrainingBudget

CLIP_CHECKPOINT = "clip_checkpoint"
BLIP_CHECKPOINT = "blip_checkpoint"


@dataclass(frozen=True)
class TrainingSet:
    keys: list[str]  # the webdataset tars of the variant, under the data root
    fingerprint: str  # of the pairs themselves (shard, uid, image sha256, caption): the same after a re-pack
    pairs: int
    pool_pairs: int  # downloaded pairs of the whole pool, what the samples-seen budget is counted in


def training_set(data: DataStore, variant: str, scratch: Path) -> TrainingSet:
    """The tars of a variant: every downloaded shard's tars for `full`, its compressed subsets otherwise."""
    keys, pairs, pool_pairs = [], [], 0
    for shard in downloaded_shards(data):
        ledger = pl.read_parquet(fetch_to_local(data, layout.download_rows_key(shard), scratch / "ledgers"))
        members = ledger.filter(pl.col(schemas.STATUS) == schemas.Status.SUCCESS)
        pool_pairs += members.height
        if variant == schemas.FULL:
            keys += [layout.download_tar_key(shard, name) for name in sorted(members["tar"].unique())]
        else:
            manifest = read_json(data, f"{layout.subset_prefix(variant, shard)}/{layout.SUBSET_MANIFEST_FILE}", scratch)
            if manifest is None or not data.exists(layout.subset_membership_key(variant, shard)):
                raise Failure(f"shard {shard} has no {variant} subset yet: materialize compressed_subset for it first")
            membership = pl.read_parquet(
                fetch_to_local(data, layout.subset_membership_key(variant, shard), scratch / "memberships")
            )
            kept = membership.filter(pl.col("kept"))[schemas.UID].implode()
            members = members.filter(pl.col(schemas.UID).is_in(kept))
            keys.append(f"{layout.subset_prefix(variant, shard)}/{manifest['tar']}")
        pairs.append(members.select(schemas.SHARD, schemas.UID, "sha256", schemas.CAPTION))
    if not keys:
        raise Failure(f"no training data for {variant}: no shard has been downloaded")
    table = pl.concat(pairs).sort(schemas.SHARD, schemas.UID)
    return TrainingSet(keys, hashlib.sha256(table.write_csv().encode()).hexdigest(), table.height, pool_pairs)


def budget_for(config: ModelTrainingConfig, full_pairs: int) -> TrainingBudget:
    """Equal samples seen across variants (DataComp's rule), or equal epochs when configured."""
    if config.budget == "epochs":
        return TrainingBudget(samples_seen=None, epochs=config.epochs)
    if config.budget != "samples":
        raise Failure(f'model_training.budget must be "samples" or "epochs", got {config.budget!r}')
    return TrainingBudget(samples_seen=config.samples_seen or round(config.full_epochs * full_pairs), epochs=None)


def checkpoint_asset(
    name: str,
    train: Callable[..., Any],
    save: Callable[[Any, Path], tuple[str, Path]],
    source_field: str,
    learning_rate_field: str,
) -> AssetsDefinition:
    @asset(
        name=name,
        partitions_def=training_variants,
        deps=[
            AssetDep(upstream, partition_mapping=AllPartitionMapping())
            for upstream in (downloaded_shard, compressed_subset)
        ],
        group_name="training",
        kinds={"pytorch", "safetensors"},
    )
    def checkpoint(
        context: AssetExecutionContext, storage: PlatformStorage, model_training: ModelTrainingConfig
    ) -> MaterializeResult:
        """Trained on the variant's webdataset tars with fixed seeds and the budget held equal across variants;
        saved as safetensors with its training metrics, versioned by content hash. Not retrained while the
        tars and the settings are unchanged."""
        variant = context.partition_key
        data = storage.data_store()
        kind = layout.trained_model_kind(name, variant)
        with storage.staging_dir(f"{name}-{variant}") as staging:
            dataset = training_set(data, variant, staging)
            budget = budget_for(model_training, dataset.pool_pairs)
            settings = model_training.model_dump(exclude={"device"})
            recipe = hashlib.sha256(
                json.dumps([name, dataset.fingerprint, settings, repr(budget)], sort_keys=True).encode()
            ).hexdigest()[:16]
            current = read_json(data, layout.current_model_key(kind), staging)
            if current is not None and current.get("recipe") == recipe:
                context.log.info(f"{name} {current['version']} of {variant} already trained from this recipe")
            else:
                tars = [fetch_to_local(data, key, staging / "in") for key in dataset.keys]
                trained = train(
                    tars,
                    budget,
                    source=getattr(model_training, source_field),
                    image_size=model_training.image_size,
                    batch_size=model_training.batch_size,
                    learning_rate=getattr(model_training, learning_rate_field),
                    seed=model_training.seed,
                    device=model_training.device,
                )
                version, folder = save(trained, staging / "checkpoints")
                publish_folder(data, folder, layout.model_prefix(kind, version))
                current = {
                    "version": version,
                    "recipe": recipe,
                    "variant": variant,
                    "training_pairs": dataset.pairs,
                    "metrics": {k: v for k, v in trained.metrics.items() if k != "loss"},
                    "loss": trained.metrics.get("loss", []),
                }
                write_json(data, layout.current_model_key(kind), current, staging)
        losses = current["loss"]
        return MaterializeResult(
            metadata={
                "version": current["version"],
                "training_pairs": current["training_pairs"],
                "samples_seen": current["metrics"].get("samples_seen"),
                "first_loss": losses[0] if losses else float("nan"),
                "last_loss": losses[-1] if losses else float("nan"),
                "metrics": MetadataValue.json(current["metrics"]),
                "checkpoint": MetadataValue.path(data.uri_of(layout.model_prefix(kind, current["version"]))),
            },
            data_version=DataVersion(current["version"]),
        )

    return checkpoint


clip_checkpoint = checkpoint_asset(
    CLIP_CHECKPOINT, train_clip_on_tars, save_trained_clip, "clip_source", "clip_learning_rate"
)
blip_checkpoint = checkpoint_asset(
    BLIP_CHECKPOINT, train_blip_captioner_on_tars, save_trained_captioner, "blip_source", "blip_learning_rate"
)
