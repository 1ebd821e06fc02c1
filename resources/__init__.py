"""Dagster resources: where the platform reads and writes (`storage`) and how each stage runs (`settings`).

`build_resources` is the one factory of the resource set: the Dagster `Definitions` (through
`resources_from_env`) and in-process runs (`ca_platform.runner`, the CLI) both call it, so the two cannot
drift apart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

from dagster import ConfigurableResource, EnvVar

from ca_platform.compression import keep_fractions, parse_keep_fractions
from ca_platform.resources.settings import (
    DEFAULT_KEEP_FRACTION,
    BaselineConfig,
    CaptioningConfig,
    CompressionConfig,
    DownloadConfig,
    EvaluationConfig,
    ModelTrainingConfig,
    PreferencesConfig,
    QualityConfig,
    RewardModelConfig,
    ScoringConfig,
)
from ca_platform.resources.storage import PlatformStorage, s3_resource

__all__ = [
    "DEFAULT_KEEP_FRACTION",
    "BaselineConfig",
    "CaptioningConfig",
    "CompressionConfig",
    "DownloadConfig",
    "EvaluationConfig",
    "ModelTrainingConfig",
    "PlatformStorage",
    "PreferencesConfig",
    "QualityConfig",
    "RewardModelConfig",
    "ScoringConfig",
    "ResourceRecipe",
    "build_resources",
    "recipe_of",
    "resources_from_env",
    "resources_from_recipe",
    "s3_resource",
]


def build_resources(
    pool_uri: str,
    data_uri: str,
    allow_hosts: Sequence[str] = (),
    s3_endpoint_url: str | None = None,
    download_options: Mapping[str, Any] | None = None,
    quality: QualityConfig | None = None,
    analytics_dir: str | None = None,
    preferences_uri: str | None = None,
    preference_image_root: str | None = None,
    reward_training: RewardModelConfig | None = None,
    baselines: BaselineConfig | None = None,
    scoring: ScoringConfig | None = None,
    keep_fraction: float | Sequence[float] | None = None,
    evaluation_uri: str | None = None,
    classes_uri: str | None = None,
    class_templates: Sequence[str] | None = None,
    model_training: ModelTrainingConfig | None = None,
    captioning: CaptioningConfig | None = None,
    compression: CompressionConfig | None = None,
) -> dict[str, ConfigurableResource]:
    """Every resource the assets ask for, by key; what is not given takes the resource's defaults.

    `pool_uri` and `data_uri` may be `EnvVar`s (read when Dagster runs); `download_options` are DownloadConfig
    fields; `keep_fraction` is one fraction or the compression curve's several, None meaning `compression`'s (by
    default DEFAULT_KEEP_FRACTION); `compression`, when given, sets the other compression settings; `classes_uri`
    is the labelled set of zero-shot classification and `class_templates` its prompts (None: the default set).
    """
    compression = compression or CompressionConfig()
    if keep_fraction is None:
        curve = compression.curve()
    else:
        curve = keep_fractions([keep_fraction] if isinstance(keep_fraction, Real) else keep_fraction)
    return {
        "storage": PlatformStorage(
            pool_uri=pool_uri, data_uri=data_uri, s3=s3_resource(s3_endpoint_url), analytics_dir=analytics_dir
        ),
        "downloader": DownloadConfig(allow_hosts=",".join(allow_hosts), **(download_options or {})),
        "quality": quality or QualityConfig(),
        "preferences": PreferencesConfig(uri=preferences_uri, image_root=preference_image_root),
        "reward_training": reward_training or RewardModelConfig(),
        "baselines": baselines or BaselineConfig(),
        "scoring": scoring or ScoringConfig(),
        "compression": CompressionConfig(**{**compression.model_dump(), "keep_fractions": list(curve)}),
        "evaluation": EvaluationConfig(
            uri=evaluation_uri,
            classes_uri=classes_uri,
            **({"class_templates": list(class_templates)} if class_templates is not None else {}),
        ),
        "model_training": model_training or ModelTrainingConfig(),
        "captioning": captioning or CaptioningConfig(),
    }


# A resource set as its classes and configuration values: what crosses to another process (a Ray worker), as
# Dagster's resource objects themselves do not pickle.
ResourceRecipe = dict[str, tuple[type[ConfigurableResource], dict[str, Any]]]


def recipe_of(resources: Mapping[str, object]) -> ResourceRecipe:
    """The recipe of resolved resources (EnvVar fields already read), for `resources_from_recipe` elsewhere."""
    recipe: ResourceRecipe = {}
    for key, resource in resources.items():
        if not isinstance(resource, ConfigurableResource):
            raise TypeError(f"resource {key!r} is a {type(resource).__name__}, not a ConfigurableResource")
        recipe[key] = (type(resource), resource.model_dump())
    return recipe


def resources_from_recipe(recipe: ResourceRecipe) -> dict[str, ConfigurableResource]:
    return {key: cls(**values) for key, (cls, values) in recipe.items()}


def resources_from_env() -> dict[str, ConfigurableResource]:
    """The resources `dagster dev` uses: required locations from CA_POOL_URI / CA_DATA_URI, the rest optional.

    CA_ALLOW_HOSTS (comma-separated), CA_ANALYTICS_DIR, CA_PREFERENCES_URI, CA_PREFERENCE_IMAGE_ROOT,
    CA_KEEP_FRACTION (one fraction or a comma list: the compression curve), CA_EVAL_URI, CA_EVAL_CLASSES_URI (a
    labelled set for zero-shot classification), CA_CLIP_DIR, CA_BLIP_DIR, CA_RECAPTION (1: recaptioning on) and
    CA_CAPTIONER_DIR (a local pretrained captioner); unset or empty means the default. S3 credentials,
    region and endpoint come from boto3's usual environment (AWS_ACCESS_KEY_ID, AWS_REGION, AWS_ENDPOINT_URL, ...).
    """
    return build_resources(
        EnvVar("CA_POOL_URI"),
        EnvVar("CA_DATA_URI"),
        allow_hosts=os.environ.get("CA_ALLOW_HOSTS", "").split(","),
        analytics_dir=os.environ.get("CA_ANALYTICS_DIR"),
        preferences_uri=os.environ.get("CA_PREFERENCES_URI"),
        preference_image_root=os.environ.get("CA_PREFERENCE_IMAGE_ROOT") or None,
        baselines=BaselineConfig(
            clip_pretrained_dir=os.environ.get("CA_CLIP_DIR"), blip_pretrained_dir=os.environ.get("CA_BLIP_DIR")
        ),
        keep_fraction=_keep_fraction_from_env(),
        evaluation_uri=os.environ.get("CA_EVAL_URI"),
        classes_uri=os.environ.get("CA_EVAL_CLASSES_URI") or None,
        captioning=CaptioningConfig(
            enabled=os.environ.get("CA_RECAPTION", "").strip().lower() in ("1", "true", "yes"),
            pretrained_dir=os.environ.get("CA_CAPTIONER_DIR") or None,
        ),
    )


def _keep_fraction_from_env() -> tuple[float, ...] | None:
    """CA_KEEP_FRACTION: one keep fraction, or the compression curve's as a comma list (0.1,0.3,0.5)."""
    value = os.environ.get("CA_KEEP_FRACTION", "").strip()
    if not value:
        return None
    try:
        return parse_keep_fractions(value)
    except ValueError as error:
        raise ValueError(f"CA_KEEP_FRACTION: {error}") from error
