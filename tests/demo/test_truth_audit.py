"""The demo's truth audit: the annotators' utility of any caption read back from its words, AUROC by hand, and
the audit over a real (hand-written) data root's DuckDB views joined with a real shapes-world pool's truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy.stats import mannwhitneyu

from ca_platform import analytics, layout, schemas
from ca_platform.demo import annotators
from ca_platform.demo.shapes_pool import ShapesWorldConfig, generate_pool, read_truth
from ca_platform.demo.shapes_world import NOISE_KINDS, make_noisy_caption, sample_scene, scene_from_json
from ca_platform.demo.truth_audit import ANY_NOISE, AuditedCut, audit_against_truth, auroc


def test_claims_read_back_from_every_caption_the_grammar_writes() -> None:
    rng = np.random.default_rng(3)
    for _ in range(300):
        scene = sample_scene(rng)
        for claim in (annotators._full_claim(scene), annotators._partial_claim(scene, rng)):
            assert annotators.claim_of_caption(annotators._claim_text(claim)) == claim
    assert annotators.claim_of_caption("IMG_4242.jpg | photo 3 of 23") == annotators._Claim()


def test_caption_utility_orders_the_noise_kinds_as_the_annotators_do() -> None:
    rng = np.random.default_rng(4)
    mean = {}
    for kind in NOISE_KINDS:
        utilities = []
        for _ in range(200):
            scene, other = sample_scene(rng), sample_scene(rng)
            utilities.append(annotators.caption_utility(make_noisy_caption(scene, kind, rng, other), scene))
        mean[kind] = float(np.mean(utilities))
    assert mean["clean"] == pytest.approx(1.0)  # complete and correct, whatever its casing or full stop
    assert mean["clean"] > mean["partial"] > mean["wrong_attribute"] > mean["other_image"]
    assert mean["boilerplate"] < mean["partial"]


def test_auroc_by_hand_and_against_mann_whitney() -> None:
    assert auroc(np.array([2.0, 3.0]), np.array([1.0])) == 1.0
    assert auroc(np.array([1.0]), np.array([1.0, 2.0])) == 0.25  # one tie (half), one loss
    assert np.isnan(auroc(np.array([]), np.array([1.0])))
    rng = np.random.default_rng(0)
    positive, negative = rng.integers(0, 6, 40).astype(float), rng.integers(0, 5, 30).astype(float)
    expected = mannwhitneyu(positive, negative).statistic / (len(positive) * len(negative))
    assert auroc(positive, negative) == pytest.approx(expected)


def test_audit_joins_scores_and_cuts_with_the_truth(tmp_path: Path) -> None:
    world = generate_pool(tmp_path / "world", "http://127.0.0.1:9", ShapesWorldConfig(shards=1, rows_per_shard=60))
    truth = read_truth(world.truth_dir)
    pool = pl.read_parquet(world.shard_paths[0])
    rows = truth.with_columns(pool["caption"]).filter(pl.col("link_kind") == "ok").with_row_index("row_index")
    data = tmp_path / "data"
    downloads = rows.select(
        pl.format("uid-{}", "row_index").alias(schemas.UID),
        pl.lit("shard-00000").alias(schemas.SHARD),
        pl.col("row_index").cast(pl.Int64),
        schemas.URL,
        schemas.CAPTION,
        pl.lit(schemas.Status.SUCCESS).alias(schemas.STATUS),
    )
    ledger = data / layout.download_prefix("shard-00000") / layout.ROWS_FILE
    ledger.parent.mkdir(parents=True)
    schemas.conform(
        downloads.with_columns(pl.lit(None).alias(c) for c in schemas.DOWNLOAD_ROWS if c not in downloads.columns),
        schemas.DOWNLOAD_ROWS,
    ).write_parquet(ledger)
    clean = (rows["noise_kind"] == "clean").cast(pl.Float64)
    scores = downloads.select(schemas.UID, schemas.SHARD).with_columns(
        pl.lit(schemas.REWARD_MODEL).alias("scorer"),
        pl.lit("v1").alias("model_version"),
        clean.alias("score"),  # a perfect scorer: every clean pair above every noisy one
        clean.alias("score_norm"),
        pl.lit(schemas.RAW_CAPTION).alias("caption_source"),
        pl.lit(None).alias(schemas.CAPTIONER_VERSION),
        pl.lit(None).alias(schemas.CAPTION_RANK),
    )
    score_file = data / layout.SCORES_DIR / schemas.REWARD_MODEL / "v1" / "shard-00000.parquet"
    score_file.parent.mkdir(parents=True)
    schemas.conform(scores, schemas.SCORES).write_parquet(score_file)
    kept = clean.cast(pl.Boolean)
    membership = downloads.select(schemas.UID, schemas.SHARD).with_columns(
        pl.lit(schemas.REWARD_TOPK).alias("variant"),
        pl.lit("v1").alias("model_version"),
        pl.lit(0.3).alias("keep_fraction"),
        clean.alias("score"),
        kept.alias("kept"),
        pl.lit(schemas.RAW_CAPTION).alias("caption_source"),
        pl.lit(None).alias(schemas.CAPTIONER_VERSION),
        pl.lit(None).alias(schemas.CAPTION_RANK),
        pl.lit(None).alias("drop_reason"),
    )
    subset_file = data / layout.SUBSETS_DIR / schemas.REWARD_TOPK / "shard-00000" / layout.SUBSET_MEMBERSHIP_FILE
    subset_file.parent.mkdir(parents=True)
    schemas.conform(membership, schemas.SUBSETS).write_parquet(subset_file)
    # an earlier k list's cut by an older model stays on the data root: everything "kept"
    stale = membership.with_columns(pl.lit(0.5).alias("keep_fraction"), pl.lit("v0").alias("model_version"), kept=True)
    stale_file = (
        data / layout.SUBSETS_DIR / f"{schemas.REWARD_TOPK}@0.5" / "shard-00000" / layout.SUBSET_MEMBERSHIP_FILE
    )
    stale_file.parent.mkdir(parents=True)
    schemas.conform(stale, schemas.SUBSETS).write_parquet(stale_file)
    removal = downloads.head(1).select(schemas.UID, schemas.SHARD, pl.lit("duplicate_of:uid-x").alias("reason"))
    (data / layout.DEDUP_REMOVALS_KEY).parent.mkdir(parents=True, exist_ok=True)
    schemas.conform(removal, schemas.DEDUP_REMOVALS).write_parquet(data / layout.DEDUP_REMOVALS_KEY)
    analytics.ensure_views(data / layout.ANALYTICS_DB, data)

    cuts = [AuditedCut(schemas.REWARD_TOPK, 0.3, "v1")]
    audit = audit_against_truth(data / layout.ANALYTICS_DB, world.truth_dir, {schemas.REWARD_MODEL: "v1"}, cuts)

    separation = audit.separation[schemas.REWARD_MODEL]
    assert set(separation) == {*(k for k in NOISE_KINDS if k != "clean"), ANY_NOISE}
    assert all(value == 1.0 for value in separation.values())
    assert set(audit.kept) == {schemas.FULL, f"{schemas.REWARD_TOPK}@0.3"}  # the stale cut is not read
    assert audit.kept[schemas.FULL]["kept"] == rows.height - 1  # the full training set: what dedup kept
    reward = audit.kept[f"{schemas.REWARD_TOPK}@0.3"]
    assert reward["kept"] == int(clean.sum()) and reward["clean_share"] == 1.0
    assert reward["by_kind"] == {"clean": int(clean.sum())}
    assert reward["mean_utility"] == pytest.approx(1.0)
    full_utility = np.mean(
        [annotators.caption_utility(c, scene_from_json(s)) for c, s in zip(rows["caption"], rows["scene_json"])][1:]
    )
    assert audit.kept[schemas.FULL]["mean_utility"] == pytest.approx(full_utility)
    assert "reward_topk@0.3" in "\n".join(audit.lines())
