"""The `captions` view and the caption analytics on a real DuckDB file over hand-made parquet files, checked
against figures worked by hand.

Downloads: shard a: a-0 "A red car on a road", a-1 "a dog", a-2 failed; shard b: b-0 "Two birds, two birds!",
b-1 "a red car on a hill". Captioner cap1 writes two candidates for a-0, a-1 and b-0; cap2 one for a-0.
Reward model v1 scores every raw caption and every candidate but b-0's second; v2 only a-0's raw caption.
CLIP score c1 scores every raw caption (shard a's file written by an older platform, without caption_source,
captioner_version and caption_rank) and cap1's candidates.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ca_platform import analytics, layout, schemas
from ca_platform.analytics.captions import (
    CaptionAnalytics,
    caption_analytics,
    caption_analytics_plot,
    caption_analytics_table,
    caption_score_histograms,
)

LEDGERS = {
    "a": [("a-0", "A red car on a road", "success"), ("a-1", "a dog", "success"), ("a-2", "a cat cat cat", "timeout")],
    "b": [("b-0", "Two birds, two birds!", "success"), ("b-1", "a red car on a hill", "success")],
}
# captioner version -> shard -> [(uid, rank, caption)]
SYNTHETIC = {
    "cap1": {
        "a": [
            ("a-0", 0, "A red car parked on the road"),
            ("a-0", 1, "a car"),
            ("a-1", 0, "A brown dog on green grass"),
            ("a-1", 1, "a dog"),
        ],
        "b": [("b-0", 0, "two small birds"), ("b-0", 1, "two small birds")],
    },
    "cap2": {"a": [("a-0", 0, "an excellent photo")]},
}
# (scorer, version) -> shard -> {uid: score} of raw captions
RAW_SCORES = {
    ("reward_model", "v1"): {"a": {"a-0": 0.5, "a-1": 0.2}, "b": {"b-0": 0.9, "b-1": 0.4}},
    ("reward_model", "v2"): {"a": {"a-0": 0.7}},
    ("clip_score", "c1"): {"a": {"a-0": 0.30, "a-1": 0.20}, "b": {"b-0": 0.25, "b-1": 0.10}},
}
OLD_STYLE = {("clip_score", "c1", "a")}  # raw score files without the caption columns
# (scorer, version, captioner) -> shard -> {(uid, rank): score}
SYNTHETIC_SCORES = {
    ("reward_model", "v1", "cap1"): {
        "a": {("a-0", 0): 0.5, ("a-0", 1): 0.1, ("a-1", 0): 0.6, ("a-1", 1): 0.3},
        "b": {("b-0", 0): 0.4},
    },
    ("reward_model", "v1", "cap2"): {"a": {("a-0", 0): 0.99}},
    ("clip_score", "c1", "cap1"): {
        "a": {("a-0", 0): 0.35, ("a-0", 1): 0.15, ("a-1", 0): 0.28, ("a-1", 1): 0.22},
        "b": {("b-0", 0): 0.31, ("b-0", 1): 0.31},
    },
}


def _write(path: Path, frame: pl.DataFrame, schema: Mapping[str, pl.DataType]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    schemas.conform(frame, schema).write_parquet(path)


def _write_downloads(root: Path) -> None:
    for shard, rows in LEDGERS.items():
        uids, captions, statuses = zip(*rows)
        frame = pl.DataFrame({"uid": uids, "caption": captions, "status": statuses}).with_columns(
            shard=pl.lit(shard),
            row_index=pl.int_range(pl.len()),
            url=pl.format("http://h/{}", pl.col("uid")),
            error=pl.when(pl.col("status") == "success").then(None).otherwise(pl.lit("why")),
        )
        frame = frame.with_columns([pl.lit(None).alias(c) for c in schemas.DOWNLOAD_ROWS if c not in frame.columns])
        _write(root / layout.download_rows_key(shard), frame, schemas.DOWNLOAD_ROWS)


def _write_raw_scores(root: Path) -> None:
    for (scorer, version), shards in RAW_SCORES.items():
        for shard, scores in shards.items():
            frame = pl.DataFrame({"uid": list(scores), "score": list(scores.values())}).with_columns(
                shard=pl.lit(shard),
                scorer=pl.lit(scorer),
                model_version=pl.lit(version),
                score_norm=pl.col("score") * 2,
                caption_source=pl.lit("raw"),
                captioner_version=pl.lit(None),
                caption_rank=pl.lit(None),
            )
            frame = schemas.conform(frame, schemas.SCORES)
            if (scorer, version, shard) in OLD_STYLE:
                frame = frame.drop("caption_source", "captioner_version", "caption_rank")
            path = root / layout.scores_key(scorer, version, shard)
            path.parent.mkdir(parents=True, exist_ok=True)
            frame.write_parquet(path)


def _write_synthetic(root: Path) -> None:
    for captioner, shards in SYNTHETIC.items():
        for shard, rows in shards.items():
            uids, ranks, captions = zip(*rows)
            frame = pl.DataFrame({"uid": uids, "rank": ranks, "caption": captions}).with_columns(
                shard=pl.lit(shard), captioner_version=pl.lit(captioner)
            )
            _write(root / layout.synthetic_captions_key(captioner, shard), frame, schemas.SYNTHETIC_CAPTIONS)
    for (scorer, version, captioner), shards in SYNTHETIC_SCORES.items():
        for shard, scores in shards.items():
            frame = pl.DataFrame(
                {
                    "uid": [uid for uid, _ in scores],
                    "caption_rank": [rank for _, rank in scores],
                    "score": list(scores.values()),
                }
            ).with_columns(
                shard=pl.lit(shard),
                scorer=pl.lit(scorer),
                model_version=pl.lit(version),
                score_norm=pl.col("score") * 2,
                caption_source=pl.lit("synthetic"),
                captioner_version=pl.lit(captioner),
            )
            _write(root / layout.synthetic_scores_key(scorer, version, captioner, shard), frame, schemas.SCORES)


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    """The data root with every file; returns its analytics database, views made."""
    _write_downloads(tmp_path)
    _write_raw_scores(tmp_path)
    _write_synthetic(tmp_path)
    db = tmp_path / layout.ANALYTICS_DB
    analytics.ensure_views(db, tmp_path)
    return db


def _rounded(rows: list[tuple]) -> list[tuple]:
    return [tuple(round(v, 9) if isinstance(v, float) else v for v in row) for row in rows]


def test_captions_view_puts_raw_and_synthetic_captions_beside_their_scores(pool: Path) -> None:
    result = analytics.query(
        pool,
        "SELECT * FROM captions ORDER BY uid, caption_source, captioner_version NULLS FIRST, caption_rank, "
        "reward_model_version",
    )
    assert result.columns == [
        "uid",
        "shard",
        "caption_source",
        "captioner_version",
        "caption_rank",
        "caption",
        "reward_model_version",
        "reward_score",
        "clip_model_version",
        "clip_score",
    ]
    assert _rounded(result.rows) == [
        # a-0's raw caption was scored by two reward model versions: one row per version
        ("a-0", "a", "raw", None, None, "A red car on a road", "v1", 0.5, "c1", 0.30),
        ("a-0", "a", "raw", None, None, "A red car on a road", "v2", 0.7, "c1", 0.30),
        ("a-0", "a", "synthetic", "cap1", 0, "A red car parked on the road", "v1", 0.5, "c1", 0.35),
        ("a-0", "a", "synthetic", "cap1", 1, "a car", "v1", 0.1, "c1", 0.15),
        ("a-0", "a", "synthetic", "cap2", 0, "an excellent photo", "v1", 0.99, None, None),
        ("a-1", "a", "raw", None, None, "a dog", "v1", 0.2, "c1", 0.20),
        ("a-1", "a", "synthetic", "cap1", 0, "A brown dog on green grass", "v1", 0.6, "c1", 0.28),
        ("a-1", "a", "synthetic", "cap1", 1, "a dog", "v1", 0.3, "c1", 0.22),
        # a-2 failed to download: no row
        ("b-0", "b", "raw", None, None, "Two birds, two birds!", "v1", 0.9, "c1", 0.25),
        ("b-0", "b", "synthetic", "cap1", 0, "two small birds", "v1", 0.4, "c1", 0.31),
        ("b-0", "b", "synthetic", "cap1", 1, "two small birds", None, None, "c1", 0.31),
        ("b-1", "b", "raw", None, None, "a red car on a hill", "v1", 0.4, "c1", 0.10),
    ]
    types = dict(analytics.query(pool, "SELECT column_name, column_type FROM (DESCRIBE captions)").rows)
    assert types["caption_rank"] == "INTEGER" and types["reward_score"] == types["clip_score"] == "DOUBLE"


def test_caption_analytics_match_figures_worked_by_hand(pool: Path) -> None:
    result = caption_analytics(pool, "v1", "c1", "cap1")
    raw, synthetic = result.sources
    # raw: 4 downloaded captions of 6 + 2 + 4 + 6 words; vocabulary a red car on road dog two birds hill;
    # trigrams: 4 (a-0) + 2 (b-0) + 4 (b-1, three of them a-0's) = 10, of which 7 distinct
    assert (raw.source, raw.captions, raw.images, raw.vocabulary) == ("raw", 4, 4, 9)
    assert raw.mean_words == pytest.approx(18 / 4) and raw.distinct_trigram_ratio == pytest.approx(7 / 10)
    # reward [0.2, 0.4, 0.5, 0.9]: quantile_cont at p * 3; CLIP [0.10, 0.20, 0.25, 0.30]
    assert (raw.reward_mean, raw.reward_p10, raw.reward_p50, raw.reward_p90) == pytest.approx((0.5, 0.26, 0.45, 0.78))
    assert (raw.clip_mean, raw.clip_p10, raw.clip_p50, raw.clip_p90) == pytest.approx((0.2125, 0.13, 0.225, 0.285))
    # cap1 only (cap2's candidate is left out): 6 candidates of 7 + 2 + 6 + 2 + 3 + 3 words on 3 images;
    # vocabulary a red car parked on the road brown dog green grass two small birds; trigrams 5 + 4 + 1 + 1 = 11,
    # "two small birds" twice
    assert (synthetic.source, synthetic.captions, synthetic.images, synthetic.vocabulary) == ("synthetic", 6, 3, 14)
    assert synthetic.mean_words == pytest.approx(23 / 6)
    assert synthetic.distinct_trigram_ratio == pytest.approx(10 / 11)
    # reward [0.1, 0.3, 0.4, 0.5, 0.6] (b-0's second candidate unscored); CLIP [0.15, 0.22, 0.28, 0.31, 0.31, 0.35]
    rewards = (synthetic.reward_mean, synthetic.reward_p10, synthetic.reward_p50, synthetic.reward_p90)
    assert rewards == pytest.approx((0.38, 0.18, 0.4, 0.56))
    clips = (synthetic.clip_mean, synthetic.clip_p10, synthetic.clip_p50, synthetic.clip_p90)
    assert clips == pytest.approx((0.27, 0.185, 0.295, 0.33))
    # compared: a-0 (raw 0.5 ties the best candidate 0.5: raw preferred; cap2's 0.99 does not count), a-1 (0.2 <
    # 0.6), b-0 (0.9 > 0.4); b-1 has no candidate
    assert result.images_compared == 3 and result.raw_preferred_share == pytest.approx(2 / 3)

    document = result.as_json()
    assert document["sources"][1]["vocabulary"] == 14 and document["captioner_version"] == "cap1"
    table = caption_analytics_table(result).splitlines()
    assert len(table) == 4 and table[2].startswith("| raw | 4 | 4 | 4.5 | 9 | 0.7 | 0.5 |")
    assert table[3].startswith("| synthetic | 6 | 3 |")

    # another reward version: only a-0's raw caption is scored, so nothing is compared
    other = caption_analytics(pool, "v2", "c1", "cap1")
    assert other.sources[0].reward_mean == pytest.approx(0.7) and other.sources[1].reward_mean is None
    assert other.sources[0].captions == 4 and (other.images_compared, other.raw_preferred_share) == (0, None)


def test_caption_score_histograms_and_plot(pool: Path, tmp_path: Path) -> None:
    result = caption_analytics(pool, "v1", "c1", "cap1")
    histograms = caption_score_histograms(pool, result, bins=4)
    reward = histograms["reward_model"]
    raw, synthetic = [0.5, 0.2, 0.9, 0.4], [0.5, 0.1, 0.6, 0.3, 0.4]
    edges = np.histogram_bin_edges(raw + synthetic, bins=4)
    assert reward.edges == pytest.approx(edges.tolist())
    assert reward.counts == {
        "raw": np.histogram(raw, bins=edges)[0].tolist(),
        "synthetic": np.histogram(synthetic, bins=edges)[0].tolist(),
    }
    assert [sum(c) for c in histograms["clip_score"].counts.values()] == [4, 6]

    png = caption_analytics_plot(pool, result, tmp_path / "reports" / "captions.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_before_any_synthetic_file_views_are_typed_and_empty_and_follow_new_files(tmp_path: Path) -> None:
    _write_downloads(tmp_path)
    _write_raw_scores(tmp_path)
    for path in (tmp_path / layout.SCORES_DIR).glob("*/*/*.parquet"):  # every raw file as an older platform wrote
        pl.read_parquet(path).drop("caption_source", "captioner_version", "caption_rank", strict=False).write_parquet(
            path
        )
    db = tmp_path / layout.ANALYTICS_DB
    analytics.ensure_views(db, tmp_path)

    for view, schema in {"synthetic_captions": schemas.SYNTHETIC_CAPTIONS, "synthetic_scores": schemas.SCORES}.items():
        described = analytics.query(db, f"SELECT column_name, column_type FROM (DESCRIBE {view})").rows
        assert described == [(name, schemas.DUCKDB_TYPES[type(dtype)]) for name, dtype in schema.items()]
        assert analytics.query(db, f"SELECT count(*) FROM {view}").rows == [(0,)]
    by_source = "SELECT caption_source, count(*), count(reward_score), count(clip_score) FROM captions GROUP BY ALL"
    # raw captions with their scores though no file has caption_source; a-0 twice (two reward versions)
    assert analytics.query(db, by_source).rows == [("raw", 5, 5, 5)]
    empty = caption_analytics(db, "v1", "c1", "cap1")
    assert empty.sources[1] == type(empty.sources[1])("synthetic", 0, 0, 0.0, 0, 0.0, *[None] * 8)
    assert isinstance(empty, CaptionAnalytics) and (empty.images_compared, empty.raw_preferred_share) == (0, None)
    mtime = db.stat().st_mtime_ns
    analytics.ensure_views(db, tmp_path)  # nothing changed: the database is not rewritten
    assert db.stat().st_mtime_ns == mtime

    _write_synthetic(tmp_path)
    analytics.ensure_views(db, tmp_path)  # the synthetic glob views now read files; the captions view follows
    assert analytics.query(db, by_source + " ORDER BY 1").rows == [("raw", 5, 5, 5), ("synthetic", 7, 6, 6)]
    assert caption_analytics(db, "v1", "c1", "cap1").images_compared == 3
    mtime = db.stat().st_mtime_ns
    analytics.ensure_views(db, tmp_path)
    assert db.stat().st_mtime_ns == mtime
