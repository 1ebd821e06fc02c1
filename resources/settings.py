"""How each stage runs: download, data quality, preferences, reward model, scoring, baselines, compression,
evaluation and model training, as Dagster resources.

A resource whose stage has a settings dataclass in `ca_platform` builds it from its own values, field by
name, so a setting added to both is passed on without a line of mapping here. Modules that pull in torch or
img2dataset are imported where they are used.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from dagster import ConfigurableResource
from pydantic import Field

from ca_platform.compression import DEFAULT_KEEP_FRACTION, keep_fractions
from ca_platform.evaluation import DEFAULT_CLASS_TEMPLATES
from ca_platform.evaluation.intervals import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED, BootstrapSettings
from ca_platform.ingest.download_guard import DEFAULT_DEADLINE_S, DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, GuardPolicy
from ca_platform.ingest.quality import QualityThresholds
from ca_platform.schemas import POOL_BLIP_BACKBONE

if TYPE_CHECKING:
    from ca_platform.captioning.shards import CaptionerSettings
    from ca_platform.dedup.groups import DedupSettings
    from ca_platform.ingest.download import DownloadSettings
    from ca_platform.scoring.reward.model import RewardModelSpec
    from ca_platform.scoring.reward.train import TrainConfig
    from ca_platform.training.training_set import TrainingSettings


def shared_fields(resource: ConfigurableResource, target: type, **overrides: Any) -> dict[str, Any]:
    """The resource's values for the fields that the dataclass `target` also has, then `overrides`."""
    names = {f.name for f in dataclasses.fields(target)}
    return {name: value for name, value in resource.model_dump().items() if name in names} | overrides


class DownloadConfig(ConfigurableResource):
    """How images are fetched: img2dataset's knobs and the guard's limits."""

    thread_count: int = 32
    timeout_s: float = Field(default=10.0, description="img2dataset's limit on each socket operation.")
    deadline_s: float = Field(
        default=DEFAULT_DEADLINE_S,
        description="Total seconds one URL may take (connect, redirects, headers and every body read); past it "
        "the row fails as `timeout`, so a host dripping bytes cannot hold a shard.",
    )
    retries: int = 0
    image_size: int = 256
    resize_mode: str = "keep_ratio"
    encode_format: str = "jpg"
    samples_per_tar: int = 10_000
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_hosts: str = Field(
        default="",
        description="Comma-separated hosts or IPs that downloads may reach although they are private, "
        "loopback or link-local (e.g. 127.0.0.1 for a local pool). Empty: public addresses only.",
    )

    def settings(self) -> DownloadSettings:
        from ca_platform.ingest.download import DownloadSettings

        hosts = frozenset(h.strip().lower() for h in self.allow_hosts.split(",") if h.strip())
        policy = GuardPolicy(**shared_fields(self, GuardPolicy, allow_hosts=hosts))
        return DownloadSettings(**shared_fields(self, DownloadSettings, policy=policy))


class QualityConfig(ConfigurableResource):
    """Floors and bounds of the per-shard data-quality checks."""

    min_caption_fraction: float = 0.9
    min_download_success_rate: float = 0.5
    max_success_rate_drop: float = Field(
        default=0.05,
        description="A re-download whose success rate falls more than this below the published one is rejected.",
    )
    min_image_side: int = 8
    max_image_side: int = 16384

    def thresholds(self) -> QualityThresholds:
        return QualityThresholds(**shared_fields(self, QualityThresholds))


class PreferencesConfig(ConfigurableResource):
    """The human preference file the reward model learns from, and how it is split."""

    uri: str | None = Field(default=None, description="Local JSONL or parquet preference file.")
    image_root: str | None = Field(
        default=None,
        description="Local folder the file's local images must lie under (after symlinks and '..'); any other "
        "path is refused by row. Default: the preference file's own folder.",
    )
    holdout_fraction: float = Field(default=0.2, description="Share of images held out for evaluation.")
    split_seed: int = 0


class RewardModelConfig(ConfigurableResource):
    """How the reward model is built and trained."""

    backbone: str = Field(
        default=POOL_BLIP_BACKBONE,
        description=f'"{POOL_BLIP_BACKBONE}": start from the BLIP ITM baseline (the user\'s pretrained BLIP, or one '
        'trained on the raw pool); "tiny": a small BLIP from scratch; or a local pretrained BLIP folder.',
    )
    image_size: int = 64
    freeze_fraction: float = Field(default=0.0, description="Freeze this first fraction of encoder layers.")
    epochs: int = 8
    learning_rate: float = 2e-3
    images_per_batch: int = 32
    tie_policy: str = Field(default="skip", description='"skip" human ties, or "soft" (target 0.5).')
    calibration: str = Field(
        default="cross_image",
        description='"cross_image": rewards comparable across images, for a top-k cut over the pool (each image\'s '
        "mean reward anchored, and an image's best caption ranked over another image's worst); \"within_image\": "
        "the pairwise loss alone (ImageReward's recipe), which leaves every image a free offset.",
    )
    seed: int = 0
    device: str | None = Field(default=None, description="cpu, cuda, ...; default: CUDA when present.")

    def spec(self) -> RewardModelSpec:
        """The architecture this resource sets; what it leaves out keeps RewardModelSpec's default."""
        from ca_platform.scoring.reward.model import RewardModelSpec

        return RewardModelSpec(**shared_fields(self, RewardModelSpec))

    def train_config(self) -> TrainConfig:
        """The optimisation settings this resource sets; what it leaves out keeps TrainConfig's default."""
        from ca_platform.scoring.reward.train import TrainConfig

        return TrainConfig(**shared_fields(self, TrainConfig))


class ScoringConfig(ConfigurableResource):
    """How shards are scored: batch size, DataLoader workers, device."""

    batch_size: int = 64
    num_workers: int = 2
    device: str | None = None


class BaselineConfig(ConfigurableResource):
    """The CLIP-score and BLIP-ITM baselines: local pretrained folders, or trained on the raw pool."""

    clip_pretrained_dir: str | None = Field(default=None, description="Local CLIP folder (save_pretrained).")
    blip_pretrained_dir: str | None = Field(default=None, description="Local BLIP ITM folder (save_pretrained).")
    image_size: int = 64
    epochs: int = 4
    batch_size: int = 32
    learning_rate: float = 5e-4
    max_train_pairs: int = 20_000
    seed: int = 0
    device: str | None = None


class CompressionConfig(ConfigurableResource):
    """How hard to compress: the fractions of the pool every ranking keeps (the paper goes down to ~0.12)."""

    keep_fractions: list[float] = Field(
        default=[DEFAULT_KEEP_FRACTION],
        description="The compression curve: every subset variant is cut at each of these fractions of the scored "
        "pool, each in (0, 1], and models are trained on every cut.",
    )
    random_seed: int = Field(default=0, description="Seed of the random_topk baseline's uniform sample.")
    recap_mix_probability: float = Field(
        default=0.8,
        ge=0.0,
        le=1.0,
        description="recap_mix_p: the chance that training draws an image's synthetic caption over its raw one.",
    )
    # Deduplication and decontamination, which every cut comes after (ca_platform.dedup).
    near_duplicate_bits: int | None = Field(
        default=4,
        ge=0,
        le=32,
        description="pHash Hamming distance at or below which two images are near copies (resized or recompressed "
        "copies stay within 4 bits; at 6 the search over 10^7 rows costs about 5x); null: no pHash matching.",
    )
    semantic_duplicate_cosine: float | None = Field(
        default=None,
        description="CLIP-score image embeddings at or above this cosine are semantic duplicates (e.g. 0.95 with a "
        "pretrained CLIP); null, the default: off, since a tiny CLIP trained on a small pool embeds most images "
        "alike and would merge unrelated ones.",
    )
    semantic_cluster_size: int = Field(
        default=1024, ge=2, description="Largest embedding cluster semantic dedup compares pairwise within."
    )

    def curve(self) -> tuple[float, ...]:
        """The keep fractions, checked, ascending, each once."""
        return keep_fractions(self.keep_fractions)

    def dedup_settings(self) -> DedupSettings:
        from ca_platform.dedup.groups import DedupSettings  # scipy: imported where dedup runs

        return DedupSettings(
            near_max_bits=self.near_duplicate_bits,
            semantic_min_cosine=self.semantic_duplicate_cosine,
            max_cluster_size=self.semantic_cluster_size,
            seed=self.random_seed,
        )


class CaptioningConfig(ConfigurableResource):
    """Recaptioning: which captioner writes synthetic captions for every downloaded image and how it decodes.

    Off unless `enabled`: the captioner, the synthetic captions and their scores, and the four caption variants
    (recap_all, raw_topk_plus_recap, recap_mix_p, reward_best_caption) then join the lineage.
    """

    enabled: bool = Field(default=False, description="Caption every shard and cut the caption variants too.")
    pretrained_dir: str | None = Field(
        default=None,
        description="A local pretrained image-to-text folder (BLIP, BLIP-2, LLaVA-style); default: the platform's "
        "own BLIP captioner trained on the pool (CapFilt).",
    )
    prompt: str | None = Field(default=None, description="Text prompt, for models that caption after one (LLaVA).")
    strategy: str = Field(default="beam", description='"greedy", "beam", "nucleus" or "top_k".')
    candidates: int = Field(default=3, description="Captions per image (greedy: 1; beam: at most num_beams).")
    max_new_tokens: int = 20
    num_beams: int = 3
    top_p: float = 0.9
    top_k: int = 50
    temperature: float = 1.0
    decoding_seed: int = 0
    source: str = Field(default="tiny", description='The platform captioner\'s start: "tiny" or a local BLIP folder.')
    image_size: int = 64
    pool_epochs: float = Field(default=8.0, description="Passes of the platform captioner over the pool's pairs.")
    batch_size: int = Field(default=32, description="Images per training step and per generation batch.")
    learning_rate: float = 5e-3
    seed: int = 0
    num_workers: int = Field(default=2, description="DataLoader workers decoding images while the model generates.")
    device: str | None = None

    def settings(self) -> CaptionerSettings:
        from ca_platform.captioning.shards import CaptionerSettings

        return CaptionerSettings(**shared_fields(self, CaptionerSettings))


class EvaluationConfig(ConfigurableResource):
    """The held-out clean evaluation set: parquet `url, caption` (rows sharing a URL: one image, several
    references), and optionally a labelled set for zero-shot classification: parquet `url, label[, name]`."""

    uri: str | None = Field(default=None, description="Local parquet file with url, caption columns.")
    classes_uri: str | None = Field(
        default=None,
        description="Local parquet file with url, label and optionally name (a readable class name per label): "
        "each variant's CLIP is then also scored on zero-shot top-1/top-5 accuracy (classification_eval). "
        "Unset: no classification.",
    )
    class_templates: list[str] = Field(
        default=list(DEFAULT_CLASS_TEMPLATES),
        description="Prompt templates, each with '{}' where the class name goes; a class's text embedding is the "
        "normalised mean of its prompts' normalised embeddings.",
    )
    batch_size: int = 64
    max_new_tokens: int = 24
    device: str | None = None
    bootstrap_resamples: int = Field(
        default=DEFAULT_RESAMPLES, ge=1, description="Resamples of the evaluation items behind each interval."
    )
    confidence: float = Field(default=DEFAULT_CONFIDENCE, gt=0, lt=1, description="The level of the intervals.")
    bootstrap_seed: int = Field(
        default=DEFAULT_SEED, description="Seed of the resampling: the same report for the same figures."
    )

    def bootstrap(self) -> BootstrapSettings:
        return BootstrapSettings(self.bootstrap_resamples, self.confidence, self.bootstrap_seed)


class ModelTrainingConfig(ConfigurableResource):
    """How the CLIP and BLIP models are trained on each training-set variant.

    The budget is equal across variants: in samples seen (DataComp's rule; by default `full_epochs` passes
    over the full pool, so a subset at k = 0.3 is seen about 3.3 times as often), or in epochs.
    """

    clip_source: str = Field(default="tiny", description='"tiny" (from config) or a local pretrained CLIP folder.')
    blip_source: str = Field(default="tiny", description='"tiny" (from config) or a local pretrained BLIP folder.')
    budget: str = Field(default="samples", description='"samples": equal samples seen; "epochs": equal epochs.')
    samples_seen: int | None = Field(default=None, description="Samples seen per model; default full_epochs x pool.")
    full_epochs: float = 3.0
    epochs: int = Field(default=3, description='Epochs per model when budget is "epochs".')
    image_size: int = 64
    batch_size: int = 32
    clip_learning_rate: float = 2e-3
    blip_learning_rate: float = 5e-3  # a tiny captioner barely moves at 5e-4
    seed: int = 0
    seeds: int = Field(
        default=1,
        ge=1,
        description="Models per variant, seeded seed, seed + 1, ...: the report gives their mean and spread.",
    )
    device: str | None = None

    def settings(self) -> TrainingSettings:
        from ca_platform.training.training_set import TrainingSettings

        return TrainingSettings(**shared_fields(self, TrainingSettings))
