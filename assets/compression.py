"""score_threshold: the global cut that keeps the top fraction of the pool by reward."""

from dagster import MaterializeResult, MetadataValue, asset

from ca_platform import analytics, layout
from ca_platform.assets.scores import reward_scores
from ca_platform.compression import score_threshold as compute_threshold
from ca_platform.model_registry import REWARD_MODEL, current_model
from ca_platform.resources import CompressionConfig, PlatformStorage
from ca_platform.storage import is_s3_uri, write_json

THRESHOLD_REPORT = f"{layout.REPORTS_DIR}/score_threshold.json"


@asset(deps=[reward_scores], group_name="compression", kinds={"duckdb"})
def score_threshold(storage: PlatformStorage, compression: CompressionConfig) -> MaterializeResult:
    """Computed in DuckDB over every shard's scores of the current reward model: exactly round(k*N) pairs
    are kept, ties broken by (score, uid, shard). Written to reports/score_threshold.json."""
    data = storage.data_store()
    with storage.staging_dir("threshold") as staging:
        version = current_model(data, REWARD_MODEL, staging)["version"]
        if is_s3_uri(storage.data_uri):
            analytics.mirror(data, storage.analytics_root())
        threshold = compute_threshold(storage.analytics_root(), REWARD_MODEL, version, compression.keep_fraction)
        write_json(data, THRESHOLD_REPORT, threshold.as_json(), staging)
    table = (
        "| model version | keep fraction | pairs | kept | dropped | threshold score |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
        f"| {version} | {threshold.keep_fraction} | {threshold.total} | {threshold.kept} | "
        f"{threshold.total - threshold.kept} | {threshold.score} |"
    )
    return MaterializeResult(
        metadata={
            "model_version": version,
            "keep_fraction": threshold.keep_fraction,
            "pairs": threshold.total,
            "kept": threshold.kept,
            "threshold_score": threshold.score if threshold.score is not None else float("nan"),
            "table": MetadataValue.md(table),
        }
    )
