"""The score macros on a real DuckDB file with views over parquet files, checked against figures worked by hand.

Scores of reward_model (uid: v1 -> v2), shard a: u1 1 -> 2, u2 2 -> 1, u3 3 -> 3.5, u4 4 -> 4; shard b:
u5 5 -> 9, u6 6 -> 6, u7 7 -> 6, u8 10 -> (missing), u9 (missing) -> 0.5. clip_score v1: u1, u5 both 2.0.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from ca_platform import layout, schemas
from ca_platform.analytics import queries as score_queries
from ca_platform.analytics.sql_literals import sql_string_literal

V1 = {"a": {"u1": 1.0, "u2": 2.0, "u3": 3.0, "u4": 4.0}, "b": {"u5": 5.0, "u6": 6.0, "u7": 7.0, "u8": 10.0}}
V2 = {"a": {"u1": 2.0, "u2": 1.0, "u3": 3.5, "u4": 4.0}, "b": {"u5": 9.0, "u6": 6.0, "u7": 6.0, "u9": 0.5}}
CLIP_V1 = {"a": {"u1": 2.0}, "b": {"u5": 2.0}}
# variant -> (model_version, keep_fraction, {shard: {uid: (score, kept)}})
SUBSETS = {
    "reward_topk": (
        "v1",
        0.5,
        {
            "a": {"u1": (1.0, False), "u2": (2.0, False), "u3": (3.0, False), "u4": (4.0, False)},
            "b": {"u5": (5.0, True), "u6": (6.0, True), "u7": (7.0, True), "u8": (10.0, True)},
        },
    ),
    "random_topk": (
        "seed-0",
        0.25,
        {
            "a": {"u1": (0.9, True), "u2": (0.1, False), "u3": (0.2, False), "u4": (0.3, False)},
            "b": {"u5": (0.4, False), "u6": (0.8, True), "u7": (0.5, False), "u8": (0.6, False)},
        },
    ),
}


def _write(path: Path, frame: pl.DataFrame, schema: Mapping[str, pl.DataType]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    schemas.conform(frame, schema).write_parquet(path)


def _write_scores(root: Path, scorer: str, version: str, shards: dict[str, dict[str, float]]) -> None:
    for shard, scores in shards.items():
        frame = pl.DataFrame({"uid": list(scores), "score": list(scores.values())}).with_columns(
            shard=pl.lit(shard),
            scorer=pl.lit(scorer),
            model_version=pl.lit(version),
            score_norm=pl.col("score") / 10,
            caption_source=pl.lit(schemas.RAW_CAPTION),
            captioner_version=pl.lit(None),
            caption_rank=pl.lit(None),
        )
        _write(root / layout.scores_key(scorer, version, shard), frame, schemas.SCORES)


def _write_subsets(root: Path) -> None:
    for variant, (version, fraction, shards) in SUBSETS.items():
        for shard, members in shards.items():
            frame = pl.DataFrame(
                {
                    "uid": list(members),
                    "shard": shard,
                    "variant": variant,
                    "model_version": version,
                    "keep_fraction": fraction,
                    "score": [score for score, _ in members.values()],  # the score that kept or dropped it
                    "kept": [kept for _, kept in members.values()],
                    "caption_source": schemas.RAW_CAPTION,
                    "captioner_version": None,
                    "caption_rank": None,
                    "drop_reason": None,
                }
            )
            _write(root / layout.subset_membership_key(variant, shard), frame, schemas.SUBSETS)


def _create_views(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    """The views as the analytics database holds them once files exist: globs over the parquet files."""
    for name in ("scores", "subsets"):
        glob = sql_string_literal((root / layout.VIEW_GLOBS[name]).as_posix())
        con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet({glob}, union_by_name = true)")
    con.execute(f"CREATE OR REPLACE VIEW duplicates AS SELECT {schemas.duckdb_columns(schemas.DUPLICATES)} WHERE false")


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An analytics file with the views and the macros installed, written once and then only read."""
    root = tmp_path_factory.mktemp("data")
    _write_scores(root, "reward_model", "v1", V1)
    _write_scores(root, "reward_model", "v2", V2)
    _write_scores(root, "clip_score", "v1", CLIP_V1)
    _write_subsets(root)
    path = root / layout.ANALYTICS_DB
    with duckdb.connect(str(path)) as con:
        _create_views(con, root)
        score_queries.install_macros(con)
    return path


def _query(db: Path, sql: str, params: list[object] | None = None) -> list[tuple[object, ...]]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def test_histogram_edges_and_counts_with_empty_bins_and_the_max_in_the_last_bin(db: Path) -> None:
    # scores 1 2 3 4 5 6 7 10: width 3 -> [1,4) [4,7) [7,10]
    assert _query(db, "SELECT * FROM score_histogram('reward_model', 'v1', bins := 3)") == [
        (0, 1.0, 4.0, 3),
        (1, 4.0, 7.0, 3),
        (2, 7.0, 10.0, 2),
    ]
    nine = _query(
        db, "SELECT bin, lower_edge, upper_edge, pairs FROM score_histogram(?, ?, bins := ?)", ["reward_model", "v1", 9]
    )
    assert [row[3] for row in nine] == [1, 1, 1, 1, 1, 1, 1, 0, 1]
    assert [row[1] for row in nine] == [float(edge) for edge in range(1, 10)] and nine[-1][2] == 10.0
    default = _query(db, "SELECT * FROM score_histogram('reward_model', 'v1')")
    assert len(default) == 20 and sum(row[3] for row in default) == 8
    assert default[0][1] == 1.0 and default[-1][2] == 10.0 and default[-1][3] == 1


def test_histogram_of_one_distinct_score_an_unknown_version_and_no_bins(db: Path) -> None:
    assert _query(db, "SELECT * FROM score_histogram('clip_score', 'v1', bins := 4)") == [
        (0, 1.5, 1.75, 0),
        (1, 1.75, 2.0, 0),
        (2, 2.0, 2.25, 2),
        (3, 2.25, 2.5, 0),
    ]
    assert _query(db, "SELECT * FROM score_histogram('reward_model', 'v7')") == []
    with pytest.raises(duckdb.InvalidInputException, match="bins must be at least 1, got 0"):
        _query(db, "SELECT * FROM score_histogram('reward_model', 'v1', bins := 0)")


def test_histogram_matches_numpy_on_awkward_edges(tmp_path: Path) -> None:
    # rounded scores land on bin edges, where a bare floor((score - low) / width) is one bin off for these bins
    rounded = np.round(np.random.default_rng(3).normal(size=997), 1)
    scores = np.concatenate([rounded, np.arange(0.0, 1.0, 0.1), [1 / 3, 2 / 3]])
    _write_scores(tmp_path, "reward_model", "v1", {"a": {f"u{i}": float(s) for i, s in enumerate(scores)}})
    _write_subsets(tmp_path)
    with duckdb.connect(str(tmp_path / "analytics.duckdb")) as con:
        _create_views(con, tmp_path)
        score_queries.install_macros(con)
        for bins in (1, 6, 7, 11, 18, 21, 45, 64):
            rows = con.execute("SELECT * FROM score_histogram('reward_model', 'v1', bins := ?)", [bins]).fetchall()
            counts, edges = np.histogram(scores, bins)
            assert [row[3] for row in rows] == counts.tolist()
            assert [row[1] for row in rows] + [rows[-1][2]] == edges.tolist()


def test_quantiles_per_shard_and_over_all_shards(db: Path) -> None:
    rows = _query(db, "SELECT * FROM score_quantiles('reward_model') WHERE model_version = 'v1'")
    expected = [
        # version, shard, pairs, mean, p05, p25, p50, p75, p95, min, max
        ("v1", "a", 4, 2.5, 1.15, 1.75, 2.5, 3.25, 3.85, 1.0, 4.0),
        ("v1", "b", 4, 7.0, 5.15, 5.75, 6.5, 7.75, 9.55, 5.0, 10.0),
        ("v1", "(all)", 8, 4.75, 1.35, 2.75, 4.5, 6.25, 8.95, 1.0, 10.0),
    ]
    assert [row[:3] for row in rows] == [row[:3] for row in expected]
    for row, want in zip(rows, expected):
        assert row[3:] == pytest.approx(want[3:], abs=1e-12)
    all_v2 = _query(db, "SELECT * FROM score_quantiles('reward_model') WHERE model_version = 'v2' AND shard = '(all)'")
    v2_scores = [s for shard in V2.values() for s in shard.values()]
    assert all_v2[0][4:9] == pytest.approx(np.quantile(v2_scores, [0.05, 0.25, 0.5, 0.75, 0.95]).tolist(), abs=1e-12)
    assert [row[:3] for row in _query(db, "SELECT * FROM score_quantiles('clip_score')")] == [
        ("v1", "a", 1),
        ("v1", "b", 1),
        ("v1", "(all)", 2),
    ]


def test_shift_per_pair_with_ranks_in_compressions_cut_order(db: Path) -> None:
    rows = _query(db, "SELECT * FROM score_shift(?, ?, ?)", ["reward_model", "v1", "v2"])
    assert rows == [
        # uid, shard, old, new, shift, old_rank (of 8 in v1), new_rank (of 8 in v2; u6 before u7 at a tie)
        ("u5", "b", 5.0, 9.0, 4.0, 4, 1),
        ("u6", "b", 6.0, 6.0, 0.0, 3, 2),
        ("u7", "b", 7.0, 6.0, -1.0, 2, 3),
        ("u4", "a", 4.0, 4.0, 0.0, 5, 4),
        ("u3", "a", 3.0, 3.5, 0.5, 6, 5),
        ("u1", "a", 1.0, 2.0, 1.0, 8, 6),
        ("u2", "a", 2.0, 1.0, -1.0, 7, 7),
    ]


def test_shift_summary(db: Path) -> None:
    [row] = _query(db, "SELECT * FROM score_shift_summary('reward_model', 'v1', 'v2')")
    pairs_both, only_old, only_new, mean, mean_abs, low, high, score_corr, rank_corr = row
    assert (pairs_both, only_old, only_new) == (7, 1, 1)  # u8 only in v1, u9 only in v2
    assert (mean, mean_abs, low, high) == pytest.approx((3.5 / 7, 7.5 / 7, -1.0, 4.0))
    old = [5.0, 6.0, 7.0, 4.0, 3.0, 1.0, 2.0]
    new = [9.0, 6.0, 6.0, 4.0, 3.5, 2.0, 1.0]
    assert score_corr == pytest.approx(np.corrcoef(old, new)[0, 1])
    # ranks among the 7 common pairs differ by -2, 0, 2, 0, 0, -1, 1: Spearman 1 - 6 * 10 / (7 * 48)
    assert rank_corr == pytest.approx(1 - 60 / 336)
    [same] = _query(db, "SELECT * FROM score_shift_summary('reward_model', 'v1', 'v1')")
    assert same[:3] == (8, 0, 0) and same[3] == 0.0 and same[8] == pytest.approx(1.0)


def test_subset_counts_per_shard_and_in_all(db: Path) -> None:
    assert _query(db, "SELECT * FROM subset_counts()") == [
        ("random_topk", "seed-0", 0.25, "a", 4, 1, 3, 0.25),
        ("random_topk", "seed-0", 0.25, "b", 4, 1, 3, 0.25),
        ("random_topk", "seed-0", 0.25, "(all)", 8, 2, 6, 0.25),
        ("reward_topk", "v1", 0.5, "a", 4, 0, 4, 0.0),
        ("reward_topk", "v1", 0.5, "b", 4, 4, 0, 1.0),
        ("reward_topk", "v1", 0.5, "(all)", 8, 4, 4, 0.5),
    ]
    assert _query(db, "SELECT * FROM subset_cuts()") == [
        ("random_topk", "seed-0", 0.25, 8, 2, 0.8, 0.6),
        ("reward_topk", "v1", 0.5, 8, 4, 5.0, 4.0),
    ]


def test_score_versions(db: Path) -> None:
    assert _query(db, "SELECT * FROM score_versions()") == [
        ("clip_score", "v1", 2, 2, 2.0, 2.0, 2.0),
        ("reward_model", "v1", 8, 2, 4.75, 1.0, 10.0),
        ("reward_model", "v2", 8, 2, 4.0, 0.5, 9.0),
    ]


def test_installed_before_any_file_and_following_the_views_as_they_change(tmp_path: Path) -> None:
    path = tmp_path / layout.ANALYTICS_DB
    with duckdb.connect(str(path)) as con:
        for name, schema in (
            ("scores", schemas.SCORES),
            ("subsets", schemas.SUBSETS),
            ("duplicates", schemas.DUPLICATES),
        ):
            con.execute(f"CREATE VIEW {name} AS SELECT {schemas.duckdb_columns(schema)} WHERE false")
        assert score_queries.stale_macros(con) == [m.name for m in score_queries.MACROS]
        score_queries.install_macros(con)
        score_queries.install_macros(con)  # replacing is harmless
        assert score_queries.stale_macros(con) == []
        assert con.execute("SELECT * FROM subset_counts()").fetchall() == []
    _write_scores(tmp_path, "reward_model", "v1", V1)
    _write_subsets(tmp_path)
    with duckdb.connect(str(path)) as con:
        _create_views(con, tmp_path)  # the view is replaced; the macro binds it anew at each call
    with duckdb.connect(str(path), read_only=True) as con:
        assert score_queries.stale_macros(con) == []
        assert con.execute("SELECT pairs, shards FROM score_versions()").fetchall() == [(8, 2)]
        comments = dict(con.execute("SELECT function_name, comment FROM duckdb_functions()").fetchall())
        assert comments["score_versions"].startswith("Every scorer and model version")


def test_install_needs_the_views_and_leaves_nothing_half_done(tmp_path: Path) -> None:
    with duckdb.connect(str(tmp_path / "empty.duckdb")) as con:
        con.execute(f"CREATE VIEW scores AS SELECT {schemas.duckdb_columns(schemas.SCORES)} WHERE false")
        with pytest.raises(RuntimeError, match=r"subset_counts\(\).*subsets"):
            score_queries.install_macros(con)
        assert score_queries.stale_macros(con) == [m.name for m in score_queries.MACROS]


def test_descriptions_signatures_and_parameter_names() -> None:
    described = {name: (signature, text) for name, signature, text in score_queries.describe_macros()}
    assert described["score_histogram"][0] == "score_histogram(scorer_name, version, bins := 20)"
    assert described["score_shift"][0] == "score_shift(scorer_name, old_version, new_version)"
    assert described["subset_counts"][0] == "subset_counts()"
    assert {"score_quantiles", "score_shift_summary", "score_versions"} <= set(described)
    assert all(text and not text.startswith("--") for _, text in described.values())
    columns = set(schemas.SCORES) | set(schemas.SUBSETS)
    for macro in score_queries.MACROS:
        names = {part.split(":=")[0].strip() for part in macro.parameters.split(",") if part.strip()}
        assert not names & columns, f"{macro.name}: a parameter named like a column would shadow it"


def test_parse_errors_name_the_line() -> None:
    with pytest.raises(ValueError, match=r"x.sql:2: macro m has no comment"):
        score_queries.parse_macros("\nCREATE OR REPLACE MACRO m() AS TABLE SELECT 1;\n", "x.sql")
    with pytest.raises(ValueError, match=r"x.sql:2: expected `CREATE OR REPLACE MACRO"):
        score_queries.parse_macros("-- what\nCREATE VIEW v AS SELECT 1;\n", "x.sql")
    with pytest.raises(ValueError, match=r"x.sql:2: statement not ended"):
        score_queries.parse_macros("-- what\nCREATE OR REPLACE MACRO m() AS TABLE SELECT 1\n", "x.sql")
