"""score_threshold and compressed_subset: the global cut of every variant, and each shard's kept pairs."""

from pathlib import Path

import numpy as np
import polars as pl
from dagster import AssetExecutionContext, Failure, MaterializeResult, MetadataValue, asset

from ca_platform import analytics, layout, schemas
from ca_platform.analytics.plots import histogram_png, markdown_image, markdown_table
from ca_platform.assets.automation import ON_SCORES_UPDATE, ON_THRESHOLD_UPDATE
from ca_platform.assets.downloads import downloaded_shard
from ca_platform.assets.partitions import pool_shards
from ca_platform.assets.scores import clip_scores, reward_scores
from ca_platform.compression.subsets import write_shard_subset
from ca_platform.compression.threshold import ScoreThreshold, random_version, score_histogram, shard_membership
from ca_platform.compression.threshold import score_threshold as compute_threshold
from ca_platform.ingest.download import downloaded_shards, fetch_downloaded_tars
from ca_platform.resources import CompressionConfig, PlatformStorage
from ca_platform.schemas import VARIANT_SCORERS
from ca_platform.scoring.registry import NoModelError, current_model
from ca_platform.storage import fetch_to_local, is_s3_uri, publish_folder, read_json, write_json

THRESHOLD_REPORT = f"{layout.REPORTS_DIR}/score_threshold.json"
THRESHOLD_PLOT = f"{layout.REPORTS_DIR}/score_threshold.png"


def _variant_versions(storage: PlatformStorage, compression: CompressionConfig, scratch: Path) -> dict[str, str]:
    """Each variant's ranking: the current reward and CLIP-score versions, and the random seed."""
    data = storage.data_store()
    versions = {}
    for variant, scorer in VARIANT_SCORERS.items():
        try:
            versions[variant] = current_model(data, scorer, scratch)["version"]
        except NoModelError as error:
            raise Failure(f"{error}: {variant} needs it") from error
    versions[schemas.RANDOM_TOPK] = random_version(compression.random_seed)
    return versions


def _require_scored(storage: PlatformStorage, versions: dict[str, str]) -> None:
    """Fail, naming them, when some downloaded shards lack scores of the current versions: a cut over part
    of the pool would keep the wrong pairs."""
    data = storage.data_store()
    missing = [
        f"{scorer} {versions[variant]} of shard {shard}"
        for shard in downloaded_shards(data)
        for variant, scorer in VARIANT_SCORERS.items()
        if not data.exists(layout.scores_key(scorer, versions[variant], shard))
    ]
    if missing:
        raise Failure(
            f"{len(missing)} shard scores are missing, e.g. {missing[:3]}: materialize reward_scores and "
            "clip_scores for every shard first"
        )


@asset(
    deps=[reward_scores, clip_scores],
    automation_condition=ON_SCORES_UPDATE,
    group_name="compression",
    kinds={"duckdb"},
)
def score_threshold(storage: PlatformStorage, compression: CompressionConfig) -> MaterializeResult:
    """The cut of every subset variant at keep fraction k, computed in DuckDB over all shards' files: exactly
    round(k*N) pairs kept, ties broken by (score, uid, shard). Written to reports/score_threshold.json."""
    data = storage.data_store()
    with storage.staging_dir("threshold") as staging:
        versions = _variant_versions(storage, compression, staging)
        _require_scored(storage, versions)
        if is_s3_uri(storage.data_uri):
            analytics.mirror(data, storage.analytics_root())
        root = storage.analytics_root()
        thresholds = {v: compute_threshold(root, v, versions[v], compression.keep_fraction) for v in versions}
        write_json(data, THRESHOLD_REPORT, {v: t.as_json() for v, t in thresholds.items()}, staging)
        reward = thresholds[schemas.REWARD_TOPK]
        histogram = score_histogram(root, reward)
        plot = histogram_png(
            histogram.edges,
            {"kept": histogram.kept, "dropped": histogram.dropped},
            staging / "plot" / "score_threshold.png",
            f"reward model {reward.model_version}: keep {reward.keep_fraction}",
            {"threshold": reward.score} if reward.score is not None else None,
        )
        image = markdown_image(plot, "reward score histogram")
        data.put_file(plot, THRESHOLD_PLOT, consume=False)
    table = markdown_table(
        ["variant", "ranked by", "pairs", "kept", "dropped", "threshold score"],
        [[t.variant, t.model_version, t.total, t.kept, t.total - t.kept, t.score] for t in thresholds.values()],
    )
    return MaterializeResult(
        metadata={
            "keep_fraction": compression.keep_fraction,
            "pairs": reward.total,
            "kept": reward.kept,
            "reward_model_version": reward.model_version,
            "threshold_score": reward.score if reward.score is not None else float("nan"),
            "thresholds": MetadataValue.md(table),
            "histogram": MetadataValue.md(image),
            "plot": MetadataValue.path(data.uri_of(THRESHOLD_PLOT)),
        }
    )


@asset(
    partitions_def=pool_shards,
    deps=[score_threshold, downloaded_shard, reward_scores, clip_scores],
    automation_condition=ON_THRESHOLD_UPDATE,
    group_name="compression",
    kinds={"webdataset"},
)
def compressed_subset(context: AssetExecutionContext, storage: PlatformStorage) -> MaterializeResult:
    """Each variant's kept pairs of the shard re-packed as a webdataset tar, with the kept uids, a manifest
    and the membership of every downloaded pair (dropped ones keep the score that dropped them)."""
    data = storage.data_store()
    shard = context.partition_key
    with storage.staging_dir(f"subset-{shard}") as staging:
        document = read_json(data, THRESHOLD_REPORT, staging)
        if document is None:
            raise Failure("no score threshold yet: materialize score_threshold first")
        thresholds = [ScoreThreshold.from_json(t) for t in document.values()]
        ledger = pl.read_parquet(fetch_to_local(data, layout.download_rows_key(shard), staging / "ledger"))
        tars = fetch_downloaded_tars(data, shard, ledger, staging / "in")
        root = storage.analytics_root()
        if is_s3_uri(storage.data_uri):
            analytics.mirror(
                data,
                root,
                [layout.download_rows_key(shard)]
                + [
                    layout.scores_key(VARIANT_SCORERS[t.variant], t.model_version, shard)
                    for t in thresholds
                    if t.variant in VARIANT_SCORERS
                ],
            )
        downloaded = ledger.filter(pl.col(schemas.STATUS) == schemas.Status.SUCCESS).height
        manifests, memberships, published = [], {}, []
        for threshold in thresholds:
            membership = shard_membership(root, threshold, shard)
            if membership.height != downloaded:
                raise Failure(
                    f"shard {shard}: {threshold.variant} ranks {membership.height} pairs but the shard "
                    "downloaded a different number; rescore it"
                )
            folder = staging / threshold.variant
            manifests.append(write_shard_subset(membership, tars, folder, shard))
            memberships[threshold.variant] = membership
            prefix = layout.subset_prefix(threshold.variant, shard)
            publish_folder(data, folder, prefix, index_name=layout.SUBSET_MEMBERSHIP_FILE)
            published.append(f"{prefix}/{layout.SUBSET_MEMBERSHIP_FILE}")
        storage.refresh_analytics(published)
        plot = _shard_plot(memberships[schemas.REWARD_TOPK], staging / "plot.png", shard)
        image = markdown_image(plot, f"reward scores of shard {shard}")
    table = markdown_table(
        ["variant", "ranked by", "pairs", "kept", "dropped"],
        [[m["variant"], m["model_version"], m["pairs"], m["kept"], m["dropped"]] for m in manifests],
    )
    return MaterializeResult(
        metadata={
            "pairs": manifests[0]["pairs"] if manifests else 0,
            **{f"kept_{m['variant']}": m["kept"] for m in manifests},
            "subsets": MetadataValue.md(table),
            "histogram": MetadataValue.md(image),
        }
    )


def _shard_plot(membership: pl.DataFrame, path: Path, shard: str) -> Path:
    scores = membership["score"].to_numpy()
    edges = np.histogram_bin_edges(scores, bins=20) if scores.size else np.linspace(0.0, 1.0, 21)
    kept = membership.filter(pl.col("kept"))["score"].to_numpy()
    dropped = membership.filter(~pl.col("kept"))["score"].to_numpy()
    counts = {"kept": np.histogram(kept, edges)[0].tolist(), "dropped": np.histogram(dropped, edges)[0].tolist()}
    return histogram_png(edges.tolist(), counts, path, f"reward_topk of shard {shard}")
