"""Baselines the reward model must beat: clip_score_model and blip_score_model."""

from dagster import AssetExecutionContext, AssetsDefinition, DataVersion, MaterializeResult, asset

from ca_platform.assets.ingest import downloaded_shard
from ca_platform.resources import BaselineConfig, PlatformStorage
from ca_platform.resources.settings import shared_fields
from ca_platform.schemas import BLIP_SCORE, CLIP_SCORE
from ca_platform.scoring.baselines import BaselineSettings, current_baseline

GROUP = "baselines"
PRETRAINED_DIRS = {CLIP_SCORE: "clip_pretrained_dir", BLIP_SCORE: "blip_pretrained_dir"}  # BaselineConfig fields


def baseline_model_asset(kind: str) -> AssetsDefinition:
    @asset(name=f"{kind}_model", deps=[downloaded_shard], group_name=GROUP, kinds={"pytorch"})
    def baseline_model(
        context: AssetExecutionContext, storage: PlatformStorage, baselines: BaselineConfig
    ) -> MaterializeResult:
        """The user's local pretrained model when configured; otherwise one trained on the raw pool's
        downloaded pairs (retrained only when the downloads or the settings change)."""
        settings = BaselineSettings(**shared_fields(baselines, BaselineSettings))
        with storage.staging_dir(f"{kind}-model") as staging:
            current, trained = current_baseline(
                storage.data_store(), kind, getattr(baselines, PRETRAINED_DIRS[kind]), settings, staging
            )
        if not trained and not current.get("pretrained_dir"):
            context.log.info(f"{kind} {current['version']} already trained on these downloads")
        return MaterializeResult(
            metadata={
                "version": current["version"],
                "source": current.get("pretrained_dir") or "trained on the raw pool",
            },
            data_version=DataVersion(current["version"]),
        )

    return baseline_model


clip_score_model = baseline_model_asset(CLIP_SCORE)
blip_score_model = baseline_model_asset(BLIP_SCORE)
