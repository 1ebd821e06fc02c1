"""Training: clip_checkpoint and blip_checkpoint, the same models trained on each training set (full, and each
variant at each keep fraction k: partitions such as `reward_topk@0.3`) at an equal budget."""

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
from ca_platform.training.training_set import train_on_variant

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
        """Trained on the training set's webdataset tars with fixed seeds (one model per seed of
        `model_training.seeds`) and the budget held equal across training sets (samples seen: passes over the full
        pool, whatever k); saved as safetensors with its training metrics, versioned by
        content hash. Not retrained while the variant's pairs and the settings are unchanged."""
        variant = context.partition_key
        data = storage.data_store()
        settings = model_training.settings()
        per_seed = {}
        for seed in settings.training_seeds():
            with storage.staging_dir(f"{model}-{variant}-{seed}") as staging:
                current, trained = train_on_variant(data, model, variant, settings, seed, staging)
            if not trained:
                context.log.info(
                    f"{model} {current['version']} of {variant}, seed {seed}, already trained from this recipe"
                )
            per_seed[seed] = current
        first = per_seed[settings.seed]
        losses = first["loss"]
        return MaterializeResult(
            metadata={
                "versions": MetadataValue.json({str(seed): doc["version"] for seed, doc in per_seed.items()}),
                "training_pairs": first["training_pairs"],
                "samples_seen": first["metrics"].get("samples_seen"),
                "first_loss": losses[0] if losses else float("nan"),
                "last_loss": losses[-1] if losses else float("nan"),
                "last_loss_per_seed": MetadataValue.json(
                    {str(seed): doc["loss"][-1] if doc["loss"] else None for seed, doc in per_seed.items()}
                ),
                "metrics": MetadataValue.json(first["metrics"]),
                "checkpoint": MetadataValue.path(
                    data.uri_of(
                        layout.model_prefix(layout.trained_model_kind(model, variant, settings.seed), first["version"])
                    )
                ),
            },
            data_version=DataVersion("+".join(doc["version"] for doc in per_seed.values())),
        )

    return checkpoint


clip_checkpoint = checkpoint_asset(layout.CLIP_CHECKPOINT)
blip_checkpoint = checkpoint_asset(layout.BLIP_CHECKPOINT)
