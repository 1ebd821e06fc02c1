"""Training: clip_checkpoint and blip_checkpoint, the same models trained on each training-set variant at an
equal budget."""

from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    AssetsDefinition,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
)

from ca_platform import layout
from ca_platform.assets.compression import compressed_subset
from ca_platform.assets.ingest import downloaded_shard
from ca_platform.assets.partitions import training_variants
from ca_platform.resources import ModelTrainingConfig, PlatformStorage
from ca_platform.resources.settings import shared_fields
from ca_platform.training.training_set import TrainingSettings, train_on_variant

GROUP = "training"


def checkpoint_asset(model: str) -> AssetsDefinition:
    @asset(
        name=model,
        partitions_def=training_variants,
        deps=[
            AssetDep(upstream, partition_mapping=AllPartitionMapping())
            for upstream in (downloaded_shard, compressed_subset)
        ],
        group_name=GROUP,
        kinds={"pytorch", "safetensors"},
    )
    def checkpoint(
        context: AssetExecutionContext, storage: PlatformStorage, model_training: ModelTrainingConfig
    ) -> MaterializeResult:
        """Trained on the variant's webdataset tars with fixed seeds and the budget held equal across variants;
        saved as safetensors with its training metrics, versioned by content hash. Not retrained while the
        variant's pairs and the settings are unchanged."""
        variant = context.partition_key
        data = storage.data_store()
        settings = TrainingSettings(**shared_fields(model_training, TrainingSettings))
        with storage.staging_dir(f"{model}-{variant}") as staging:
            current, trained = train_on_variant(data, model, variant, settings, staging)
        if not trained:
            context.log.info(f"{model} {current['version']} of {variant} already trained from this recipe")
        losses = current["loss"]
        kind = layout.trained_model_kind(model, variant)
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


clip_checkpoint = checkpoint_asset(layout.CLIP_CHECKPOINT)
blip_checkpoint = checkpoint_asset(layout.BLIP_CHECKPOINT)
