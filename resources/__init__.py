"""Dagster resources: configuration of storage, download and data quality, from config or environment.

Each resource is a thin `ConfigurableResource` that builds the plain-Python objects of `ca_platform`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dagster import ConfigurableResource, EnvVar
from dagster_aws.s3 import S3Resource
from pydantic import Field

from ca_platform import analytics, layout
from ca_platform.ingest.download import DownloadSettings
from ca_platform.ingest.download_guard import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, GuardPolicy
from ca_platform.ingest.pool import PoolColumns
from ca_platform.ingest.quality import QualityThresholds
from ca_platform.storage import DataStore, is_s3_uri, open_store


def s3_resource(endpoint_url: str | None = None) -> S3Resource:
    """dagster-aws's S3 resource, at `endpoint_url` when given (an S3-compatible server), else boto3's default."""
    return S3Resource(endpoint_url=endpoint_url) if endpoint_url else S3Resource()


class PlatformStorage(ConfigurableResource):
    """Where the pool is read from and where the platform writes: local directories or s3://bucket/prefix."""

    pool_uri: str = Field(description="Folder or s3://bucket/prefix holding the pool's parquet shards.")
    data_uri: str = Field(description="Folder or s3://bucket/prefix the platform writes its outputs to.")
    s3: S3Resource = Field(default_factory=S3Resource, description="S3 client settings (endpoint, region, keys).")
    analytics_dir: str | None = Field(
        default=None,
        description="Local folder for the DuckDB file when data_uri is on S3 (a mirror of the parquet it reads). "
        "Defaults to ~/.cache/ca-platform/<bucket>/<prefix>. For a local data_uri it is data_uri itself.",
    )
    url_column: str = "url"
    caption_column: str = "caption"
    uid_column: str = "uid"

    def pool_store(self) -> DataStore:
        return open_store(self.pool_uri, self.s3.get_client)

    def data_store(self) -> DataStore:
        return open_store(self.data_uri, self.s3.get_client)

    def pool_columns(self) -> PoolColumns:
        return PoolColumns(url=self.url_column, caption=self.caption_column, uid=self.uid_column)

    def analytics_root(self) -> Path:
        """Local folder whose parquet files the DuckDB views read, and that holds the database file."""
        if not is_s3_uri(self.data_uri):
            return Path(self.data_uri).expanduser().resolve()
        if self.analytics_dir:
            return Path(self.analytics_dir).expanduser().resolve()
        return Path.home() / ".cache" / "ca-platform" / self.data_uri.removeprefix("s3://").strip("/")

    def analytics_db(self) -> Path:
        return self.analytics_root() / layout.ANALYTICS_DB

    def refresh_analytics(self, keys: list[str]) -> None:
        """Make newly written parquet visible to the DuckDB views (mirrored first for an S3 data root)."""
        if is_s3_uri(self.data_uri):
            analytics.mirror(self.data_store(), self.analytics_root(), keys)
        analytics.ensure_views(self.analytics_db(), self.analytics_root())

    def cache_dir(self) -> Path:
        """Local copies of immutable objects (model and preference versions) of an S3 data root."""
        return self.analytics_root() / ".cache"

    @contextmanager
    def staging_dir(self, name: str) -> Iterator[Path]:
        """A private folder for one step's output before it is published; removed afterwards.

        For a local data root it lies beside the data (same filesystem, so publishing is a rename);
        leftovers of a killed run carry its name and are removed by the next run of the same step.
        """
        import shutil

        if is_s3_uri(self.data_uri):
            with tempfile.TemporaryDirectory(prefix=f"ca-{name}-") as path:
                yield Path(path)
            return
        parent = Path(self.data_uri).expanduser().resolve() / ".staging"
        parent.mkdir(parents=True, exist_ok=True)
        for leftover in parent.glob(f"{name}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


class DownloadConfig(ConfigurableResource):
    """How images are fetched: img2dataset's knobs and the guard's limits."""

    thread_count: int = 32
    timeout_s: float = 10.0
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
        hosts = frozenset(h.strip().lower() for h in self.allow_hosts.split(",") if h.strip())
        return DownloadSettings(
            thread_count=self.thread_count,
            timeout_s=self.timeout_s,
            retries=self.retries,
            image_size=self.image_size,
            resize_mode=self.resize_mode,
            encode_format=self.encode_format,
            samples_per_tar=self.samples_per_tar,
            policy=GuardPolicy(allow_hosts=hosts, max_bytes=self.max_bytes, max_pixels=self.max_pixels),
        )


class QualityConfig(ConfigurableResource):
    """Floors and bounds of the per-shard data-quality checks."""

    min_caption_fraction: float = 0.9
    min_download_success_rate: float = 0.5
    min_image_side: int = 8
    max_image_side: int = 16384

    def thresholds(self) -> QualityThresholds:
        return QualityThresholds(
            min_caption_fraction=self.min_caption_fraction,
            min_download_success_rate=self.min_download_success_rate,
            min_image_side=self.min_image_side,
            max_image_side=self.max_image_side,
        )


class PreferencesConfig(ConfigurableResource):
    """The human preference file the reward model learns from, and how it is split."""

    uri: str | None = Field(default=None, description="Local JSONL or parquet preference file.")
    holdout_fraction: float = Field(default=0.2, description="Share of images held out for evaluation.")
    split_seed: int = 0


class RewardModelConfig(ConfigurableResource):
    """How the reward model is built and trained."""

    backbone: str = Field(
        default="blip_score_model",
        description='"blip_score_model": start from the BLIP ITM baseline (the user\'s pretrained BLIP, or one trained '
        'on the raw pool); "tiny": a small BLIP from scratch; or a local pretrained BLIP folder.',
    )
    image_size: int = 64
    freeze_fraction: float = Field(default=0.0, description="Freeze this first fraction of encoder layers.")
    epochs: int = 15
    learning_rate: float = 1e-3
    images_per_batch: int = 16
    tie_policy: str = Field(default="skip", description='"skip" human ties, or "soft" (target 0.5).')
    seed: int = 0
    device: str | None = Field(default=None, description="cpu, cuda, ...; default: CUDA when present.")


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
    """How hard to compress: the fraction of the pool the reward model keeps (the paper goes down to ~0.12)."""

    keep_fraction: float = Field(default=0.3, ge=0.0, le=1.0)
    random_seed: int = Field(default=0, description="Seed of the random_topk baseline's uniform sample.")


class EvaluationConfig(ConfigurableResource):
    """The held-out clean evaluation set: parquet `url, caption` (rows sharing a URL: one image, several
    references)."""

    uri: str | None = Field(default=None, description="Local parquet file with url, caption columns.")
    batch_size: int = 64
    max_new_tokens: int = 24
    device: str | None = None


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
    device: str | None = None


def resources_from_env() -> dict[str, ConfigurableResource]:
    """The resources `dagster dev` uses: required locations from CA_POOL_URI / CA_DATA_URI.

    S3 credentials, region and endpoint come from boto3's usual environment (AWS_ACCESS_KEY_ID,
    AWS_REGION, AWS_ENDPOINT_URL, ...).
    """
    return {
        "storage": PlatformStorage(
            pool_uri=EnvVar("CA_POOL_URI"),
            data_uri=EnvVar("CA_DATA_URI"),
            analytics_dir=os.environ.get("CA_ANALYTICS_DIR"),
        ),
        "downloader": DownloadConfig(allow_hosts=os.environ.get("CA_ALLOW_HOSTS", "")),
        "quality": QualityConfig(),
        "preferences": PreferencesConfig(uri=os.environ.get("CA_PREFERENCES_URI")),
        "reward_training": RewardModelConfig(),
        "scoring": ScoringConfig(),
        "compression": CompressionConfig(keep_fraction=float(os.environ.get("CA_KEEP_FRACTION", "0.3"))),
        "evaluation": EvaluationConfig(uri=os.environ.get("CA_EVAL_URI")),
        "model_training": ModelTrainingConfig(),
        "baselines": BaselineConfig(
            clip_pretrained_dir=os.environ.get("CA_CLIP_DIR"), blip_pretrained_dir=os.environ.get("CA_BLIP_DIR")
        ),
    }
