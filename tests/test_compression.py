"""The global cut keeps exactly round(k*N) pairs, ties broken by (score, uid, shard)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl
import pytest

from ca_platform import layout
from ca_platform.compression import keep_count, kept_condition, score_threshold


def _write(root: Path, shard: str, rows: list[tuple[str, float]]) -> None:
    path = root / layout.scores_key("reward_model", "v1", shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        {"uid": [u for u, _ in rows], "shard": [shard] * len(rows), "score": [s for _, s in rows]}
    ).write_parquet(path)


def _kept(root: Path, threshold) -> list[tuple[str, str]]:
    condition, params = kept_condition(threshold)
    pattern = (root / layout.SCORES_DIR / "reward_model" / "v1" / "*.parquet").as_posix()
    with duckdb.connect() as con:
        rows = con.execute(
            f"SELECT shard, uid FROM read_parquet('{pattern}') WHERE {condition} ORDER BY shard, uid", params
        ).fetchall()
    return rows


def test_keeps_exactly_round_k_n_with_ties_broken_by_uid_then_shard(tmp_path: Path) -> None:
    _write(tmp_path, "a", [("u1", 0.9), ("u2", 0.5), ("u3", 0.5), ("u4", 0.1)])
    _write(tmp_path, "b", [("u0", 0.5), ("u2", 0.5), ("u5", 0.7), ("u6", 0.2)])
    # order: u1 .9, u5 .7, then the 0.5 ties by uid then shard: u0/b, u2/a, u2/b, u3/a, then u6 .2, u4 .1
    threshold = score_threshold(tmp_path, "reward_topk", "v1", 0.5)
    assert (threshold.total, threshold.kept) == (8, 4)
    assert (threshold.score, threshold.uid, threshold.shard) == (0.5, "u2", "a")
    assert _kept(tmp_path, threshold) == [("a", "u1"), ("a", "u2"), ("b", "u0"), ("b", "u5")]

    five = score_threshold(tmp_path, "reward_topk", "v1", 0.625)
    assert five.kept == 5 and _kept(tmp_path, five) == [("a", "u1"), ("a", "u2"), ("b", "u0"), ("b", "u2"), ("b", "u5")]


@pytest.mark.parametrize(
    ("k", "n", "expected"), [(0.3, 10, 3), (0.25, 10, 3), (0.12, 100, 12), (0.05, 10, 1), (0.0, 7, 0), (1.0, 7, 7)]
)
def test_keep_count_rounds_half_up(k: float, n: int, expected: int) -> None:
    assert keep_count(k, n) == expected


def test_nothing_kept_and_bad_fraction(tmp_path: Path) -> None:
    _write(tmp_path, "a", [("u1", 0.9)])
    none = score_threshold(tmp_path, "reward_topk", "v1", 0.0)
    assert none.kept == 0 and _kept(tmp_path, none) == []
    with pytest.raises(ValueError, match="within"):
        keep_count(1.5, 3)
