"""Pool and data root both on S3: a real S3-compatible server (moto's server mode) on loopback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import boto3
import polars as pl
import pytest

from ca_platform import analytics, cli, layout
from ca_platform.resources import ModelTrainingConfig
from ca_platform.runner import build_resources, run_lineage
from ca_platform.schemas import FILTER_VARIANTS
from tests.conftest import RoutesServer, fast_reward_stage, write_evaluation_file


@pytest.mark.slow
def test_pool_and_data_on_s3(web_pool: Callable[..., Path], s3_endpoint: str, tmp_path: Path, capsys) -> None:
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="web-pool")
    client.create_bucket(Bucket="platform")
    pool_dir = web_pool(rows_per_shard=6)
    for shard in sorted(pool_dir.glob("*.parquet")):
        client.upload_file(str(shard), "web-pool", f"laion/{shard.name}")

    analytics_dir = tmp_path / "analytics"
    resources = build_resources(
        "s3://web-pool/laion",
        "s3://platform/ca",
        ["127.0.0.1"],
        s3_endpoint_url=s3_endpoint,
        download_options={"thread_count": 4},
        analytics_dir=str(analytics_dir),
    )
    run = run_lineage(resources)
    assert run.success, run.runs

    keys = {o["Key"] for o in client.list_objects_v2(Bucket="platform", Prefix="ca/")["Contents"]}
    for shard in ("part-00000", "part-00001"):
        assert f"ca/{layout.raw_shard_key(shard)}" in keys
        assert f"ca/{layout.download_rows_key(shard)}" in keys
        ledger_path = tmp_path / f"{shard}.parquet"
        client.download_file("platform", f"ca/{layout.download_rows_key(shard)}", str(ledger_path))
        ledger = pl.read_parquet(ledger_path)
        assert ledger.height == 6
        for tar in ledger["tar"].drop_nulls().unique():
            assert f"ca/{layout.download_tar_key(shard, tar)}" in keys
    assert (analytics_dir / layout.ANALYTICS_DB).exists()

    # the CLI mirrors the ledgers from S3 into a fresh local folder and queries them
    fresh = tmp_path / "fresh-analytics"
    code = cli.main(
        [
            "sql",
            "SELECT count(*) AS n, count(DISTINCT uid) AS u FROM downloads",
            "--data",
            "s3://platform/ca",
            "--s3-endpoint-url",
            s3_endpoint,
            "--analytics-dir",
            str(fresh),
        ]
    )
    assert code == 0
    assert capsys.readouterr().out.splitlines()[-1].split("|") == ["12 ", " 12"]


@pytest.mark.slow
def test_subsets_models_and_report_on_s3(
    web_pool: Callable[..., Path], routes_server: RoutesServer, s3_endpoint: str, tmp_path: Path
) -> None:
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="platform")
    evaluation, _ = write_evaluation_file(routes_server, tmp_path / "eval.parquet", images=4, seed=700)
    resources = build_resources(
        str(web_pool(rows_per_shard=8)),
        "s3://platform/ca",
        ["127.0.0.1"],
        s3_endpoint_url=s3_endpoint,
        download_options={"thread_count": 4},
        analytics_dir=str(tmp_path / "analytics"),
        **fast_reward_stage(tmp_path / "prefs"),
        keep_fraction=0.5,
        evaluation_uri=str(evaluation),
        model_training=ModelTrainingConfig(full_epochs=1, image_size=32, batch_size=8),
    )
    run = run_lineage(resources, compress=True)
    assert run.success, [r for r in run.runs if not r.success]

    pages = client.get_paginator("list_objects_v2").paginate(Bucket="platform", Prefix="ca/")
    keys = {o["Key"] for page in pages for o in page["Contents"]}
    for variant in FILTER_VARIANTS:  # no recaptioning here: the pairs as they are
        training_set = layout.training_set_key(variant, 0.5)
        for shard in ("part-00000", "part-00001"):
            prefix = f"ca/{layout.subset_prefix(training_set, shard)}/"
            assert len([k for k in keys if k.startswith(prefix) and k.endswith(".tar")]) == 1
            assert f"ca/{layout.subset_membership_key(training_set, shard)}" in keys
            assert f"ca/{layout.subset_manifest_key(training_set, shard)}" in keys
    assert "ca/reports/curation_report.json" in keys
    subsets = analytics.query(tmp_path / "analytics" / layout.ANALYTICS_DB, "SELECT count(*) FROM subsets").rows
    downloaded = analytics.query(
        tmp_path / "analytics" / layout.ANALYTICS_DB, "SELECT count(*) FROM downloads WHERE status = 'success'"
    ).rows
    assert subsets[0][0] == 3 * downloaded[0][0] > 0
