"""The global score cut: which pairs the top-k fraction keeps, decided over every shard at once.

Exactly `keep_count(k, N)` pairs are kept: the best scores first, ties broken by uid and then shard
(ascending), so the same scores always give the same cut whatever order the files are read in.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import duckdb

from ca_platform import layout


@dataclass(frozen=True)
class ScoreThreshold:
    scorer: str
    model_version: str
    keep_fraction: float
    total: int
    kept: int
    score: float | None  # the last kept pair's score, uid and shard (None when nothing is kept)
    uid: str | None
    shard: str | None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def keep_count(keep_fraction: float, total: int) -> int:
    """round(k * N), halves rounded up, so the count does not depend on banker's rounding."""
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep fraction must be within [0, 1], got {keep_fraction}")
    return min(total, math.floor(keep_fraction * total + 0.5))


def score_threshold(files_root: Path, scorer: str, model_version: str, keep_fraction: float) -> ScoreThreshold:
    """The cut over all shards' score files of one model version under `files_root` (a local data root)."""
    pattern = (files_root / layout.SCORES_DIR / scorer / model_version / "*.parquet").as_posix()
    with duckdb.connect() as con:
        con.execute(f"CREATE VIEW version_scores AS SELECT uid, shard, score FROM read_parquet('{pattern}')")
        total = con.execute("SELECT count(*) FROM version_scores").fetchone()[0]
        kept = keep_count(keep_fraction, total)
        last = None
        if kept:
            last = con.execute(
                "SELECT score, uid, shard FROM version_scores ORDER BY score DESC, uid ASC, shard ASC LIMIT 1 OFFSET ?",
                [kept - 1],
            ).fetchone()
    score, uid, shard = last if last else (None, None, None)
    return ScoreThreshold(scorer, model_version, keep_fraction, total, kept, score, uid, shard)


def kept_condition(threshold: ScoreThreshold) -> tuple[str, list[Any]]:
    """A SQL condition (with parameters) over columns score, uid, shard that holds exactly for kept pairs."""
    if threshold.kept == 0:
        return "false", []
    return (
        "(score > ? OR (score = ? AND (uid < ? OR (uid = ? AND shard <= ?))))",
        [threshold.score, threshold.score, threshold.uid, threshold.uid, threshold.shard],
    )
