"""The global cut of each subset variant: which pairs a top-k fraction keeps, decided over every shard at once.

A variant ranks the downloaded pairs by a score: the reward model's (`reward_topk`, the method), CLIP
score's (`clipscore_topk`, DataComp's baseline) or a seeded uniform key (`random_topk`). Exactly
`keep_count(k, N)` pairs are kept: the best scores first, ties broken by uid and then shard (ascending), so
the same scores always give the same cut whatever order the files are read in.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from ca_platform import layout, schemas
from ca_platform.schemas import CLIPSCORE_TOPK, RANDOM_TOPK, REWARD_TOPK, Status

# The scorer whose scores rank each scored variant; random_topk ranks by RANDOM_KEY_SQL instead.
VARIANT_SCORERS: dict[str, str] = {REWARD_TOPK: "reward_model", CLIPSCORE_TOPK: "clip_score"}
RANDOM_VERSION_PREFIX = "seed-"

# A uniform key in [0, 1) from md5(seed:uid): stable across DuckDB versions, machines and file orders.
RANDOM_KEY_SQL = "CAST(md5_number(concat(?, ':', uid)) AS DOUBLE) / 3.402823669209385e38"


@dataclass(frozen=True)
class ScoreThreshold:
    variant: str
    model_version: str  # the scorer's version, or "seed-<n>" for random_topk
    keep_fraction: float
    total: int
    kept: int
    score: float | None  # the last kept pair's score, uid and shard (None when nothing is kept)
    uid: str | None
    shard: str | None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> ScoreThreshold:
        return cls(**document)


def keep_count(keep_fraction: float, total: int) -> int:
    """round(k * N), halves rounded up, so the count does not depend on banker's rounding."""
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep fraction must be within [0, 1], got {keep_fraction}")
    return min(total, math.floor(keep_fraction * total + 0.5))


def random_version(seed: int) -> str:
    return f"{RANDOM_VERSION_PREFIX}{seed}"


def ranked_pairs(files_root: Path, variant: str, model_version: str, shard: str = "*") -> tuple[str, list[Any]]:
    """SQL (with parameters) of `uid, shard, score` for every pair `variant` ranks: all shards, or one.

    Scored variants read the scorer's files of `model_version`; random_topk reads the download ledgers'
    successes, so all three rank the same downloaded pairs.
    """
    if variant == RANDOM_TOPK:
        seed = model_version.removeprefix(RANDOM_VERSION_PREFIX)
        ledgers = (files_root / layout.download_rows_key(shard)).as_posix()
        return (
            f"SELECT uid, shard, {RANDOM_KEY_SQL} AS score FROM read_parquet('{ledgers}') WHERE status = ?",
            [seed, Status.SUCCESS],
        )
    if variant not in VARIANT_SCORERS:
        raise ValueError(f"unknown subset variant {variant!r}; expected one of {schemas.SUBSET_VARIANTS}")
    scores = (files_root / layout.scores_key(VARIANT_SCORERS[variant], model_version, shard)).as_posix()
    return f"SELECT uid, shard, score FROM read_parquet('{scores}')", []


def score_threshold(files_root: Path, variant: str, model_version: str, keep_fraction: float) -> ScoreThreshold:
    """The cut of `variant` over all shards under `files_root` (a local data root or its mirror)."""
    relation, params = ranked_pairs(files_root, variant, model_version)
    with duckdb.connect() as con:
        total = con.execute(f"SELECT count(*) FROM ({relation})", params).fetchone()[0]
        kept = keep_count(keep_fraction, total)
        last = None
        if kept:
            last = con.execute(
                f"SELECT score, uid, shard FROM ({relation}) ORDER BY score DESC, uid ASC, shard ASC LIMIT 1 OFFSET ?",
                [*params, kept - 1],
            ).fetchone()
    score, uid, shard = last if last else (None, None, None)
    return ScoreThreshold(variant, model_version, keep_fraction, total, kept, score, uid, shard)


def kept_condition(threshold: ScoreThreshold) -> tuple[str, list[Any]]:
    """A SQL condition (with parameters) over columns score, uid, shard that holds exactly for kept pairs."""
    if threshold.kept == 0:
        return "false", []
    return (
        "(score > ? OR (score = ? AND (uid < ? OR (uid = ? AND shard <= ?))))",
        [threshold.score, threshold.score, threshold.uid, threshold.uid, threshold.shard],
    )


def shard_membership(files_root: Path, threshold: ScoreThreshold, shard: str) -> pl.DataFrame:
    """Every ranked pair of one shard with its score and whether the variant's cut keeps it (SUBSETS schema)."""
    relation, params = ranked_pairs(files_root, threshold.variant, threshold.model_version, shard)
    condition, condition_params = kept_condition(threshold)
    with duckdb.connect() as con:
        frame = con.sql(
            f"SELECT uid, shard, score, {condition} AS kept FROM ({relation}) ORDER BY uid",
            params=[*condition_params, *params],
        ).pl()
    frame = frame.with_columns(
        pl.lit(threshold.variant).alias("variant"),
        pl.lit(threshold.model_version).alias("model_version"),
        pl.lit(threshold.keep_fraction).alias("keep_fraction"),
    )
    return schemas.conform(frame, schemas.SUBSETS)


@dataclass(frozen=True)
class ScoreHistogram:
    edges: list[float]  # bins + 1 equal-width edges from the lowest to the highest score
    kept: list[int]  # pairs per bin the cut keeps
    dropped: list[int]


def score_histogram(files_root: Path, threshold: ScoreThreshold, bins: int = 40) -> ScoreHistogram:
    """Kept and dropped pairs per equal-width score bin of one variant, counted in DuckDB (no scores in memory)."""
    relation, params = ranked_pairs(files_root, threshold.variant, threshold.model_version)
    condition, condition_params = kept_condition(threshold)
    with duckdb.connect() as con:
        low, high = con.execute(f"SELECT min(score), max(score) FROM ({relation})", params).fetchone()
        if low is None:
            return ScoreHistogram([0.0, 1.0], [0], [0])
        width = (high - low) / bins or 1.0
        rows = con.execute(
            f"SELECT least(CAST(floor((score - ?) / ?) AS INTEGER), ?) AS bin, "
            f"count(*) FILTER ({condition}), count(*) FILTER (NOT {condition}) "
            f"FROM ({relation}) GROUP BY bin",
            [low, width, bins - 1, *condition_params, *condition_params, *params],
        ).fetchall()
    kept, dropped = [0] * bins, [0] * bins
    for index, kept_count, dropped_count in rows:
        kept[index], dropped[index] = kept_count, dropped_count
    return ScoreHistogram([low + i * width for i in range(bins + 1)], kept, dropped)
