"""The global cut of each subset variant: which pairs a top-k fraction keeps, decided over every shard at once.

A variant ranks the downloaded pairs by a score: the reward model's (`reward_topk`, the method), CLIP
score's (`clipscore_topk`, DataComp's baseline) or a seeded uniform key (`random_topk`). Exactly
`keep_count(k, N)` pairs are kept: the best scores first, ties broken by uid and then shard (ascending), so
the same scores always give the same cut whatever order the files are read in. Every variant is cut at every
keep fraction k of the compression curve, each cut one training set (`layout.training_set_key`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from ca_platform import analytics, layout, quarantine, schemas
from ca_platform.analytics.plots import histogram_png
from ca_platform.ingest.download import downloaded_shards
from ca_platform.schemas import (
    CLIP_SCORE,
    CLIPSCORE_TOPK,
    KEEP_EVERY_IMAGE,
    MIXED_CAPTION,
    RANDOM_TOPK,
    RAW_CAPTION,
    RAW_TOPK_PLUS_RECAP,
    RECAP_ALL,
    RECAP_MIX,
    RECAPTION_VARIANTS,
    REWARD_BEST_CAPTION,
    REWARD_TOPK,
    SYNTHETIC_CAPTION,
    VARIANT_SCORERS,
    Status,
)
from ca_platform.scoring.registry import NoModelError, current_model
from ca_platform.storage import DataStore, read_json, write_json

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
    excluded: tuple[str, ...] = ()  # quarantined shards the cut left out (ca_platform.quarantine)
    removed: int = 0  # pairs of the healthy shards dedup and decontamination removed before the cut
    captioner_version: str | None = None  # the synthetic captions a caption variant chose among
    synthetic_caption_probability: float | None = None  # recap_mix_p: how often training draws the synthetic one

    @property
    def key(self) -> str:
        """The training set this cut makes (`reward_topk@0.3`; `recap_all` for a variant keeping every image)."""
        return layout.training_set_key(self.variant, self.keep_fraction)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "excluded": list(self.excluded)}

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> ScoreThreshold:
        return cls(**{**document, "excluded": tuple(document.get("excluded", ()))})


def keep_count(keep_fraction: float, total: int) -> int:
    """round(k * N), halves rounded up, so the count does not depend on banker's rounding."""
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep fraction must be within [0, 1], got {keep_fraction}")
    return min(total, math.floor(keep_fraction * total + 0.5))


def random_version(seed: int) -> str:
    return f"{RANDOM_VERSION_PREFIX}{seed}"


def _scores_glob(files_root: Path, scorer: str, version: str, shard: str, captioner: str | None = None) -> str:
    key = (
        layout.synthetic_scores_key(scorer, version, captioner, shard)
        if captioner
        else layout.scores_key(scorer, version, shard)
    )
    return (files_root / key).as_posix()


# Each image's best caption among scored ones (ties: the raw caption, then the lower candidate rank).
_BEST_PER_IMAGE = (
    "QUALIFY row_number() OVER (PARTITION BY uid, shard ORDER BY score DESC, caption_rank NULLS FIRST) = 1"
)


def _best_synthetic(files_root: Path, scorer: str, version: str, captioner: str, shard: str) -> tuple[str, list[Any]]:
    """`uid, shard, score, caption_rank` of each image's synthetic caption that `scorer` scores highest."""
    return (
        f"SELECT uid, shard, score, caption_rank FROM read_parquet(?) {_BEST_PER_IMAGE}",
        [_scores_glob(files_root, scorer, version, shard, captioner)],
    )


def _best_of_raw_and_synthetic(
    files_root: Path, scorer: str, version: str, captioner: str, shard: str
) -> tuple[str, list[Any]]:
    """`uid, shard, score, caption_rank` of each image's caption, raw or synthetic, that `scorer` scores highest
    (caption_rank null when the raw caption wins)."""
    return (
        "SELECT uid, shard, score, caption_rank FROM ("
        "SELECT uid, shard, score, CAST(NULL AS INTEGER) AS caption_rank FROM read_parquet(?) "
        f"UNION ALL SELECT uid, shard, score, caption_rank FROM read_parquet(?)) {_BEST_PER_IMAGE}",
        [
            _scores_glob(files_root, scorer, version, shard),
            _scores_glob(files_root, scorer, version, shard, captioner),
        ],
    )


def ranked_pairs(
    files_root: Path,
    variant: str,
    model_version: str,
    shard: str = "*",
    excluded: Sequence[str] = (),
    captioner_version: str | None = None,
) -> tuple[str, list[Any]]:
    """SQL (with parameters) of `uid, shard, score, caption_rank` for every image `variant` ranks: all shards
    but the `excluded` ones, or one shard.

    Raw-caption variants read the scorer's files of `model_version` (caption_rank null); random_topk reads the
    download ledgers' successes, so all rank the same downloaded images. Caption variants rank each image by one
    chosen caption of `captioner_version`'s candidates: recap_all and recap_mix_p by its best synthetic caption
    by CLIP score, reward_best_caption by its best caption, raw or synthetic, by reward; raw_topk_plus_recap
    ranks by the raw CLIP score (its cut is clipscore_topk's; `raw_plus_recap_pairs` adds the recaptions). The
    file globs are parameters too, so a data root, version or shard holding a quote cannot change the SQL.
    """
    # only when there are shards to leave out: the filter reads the shard column, which the score-only passes
    # of the cut and the histogram otherwise never decode
    leave_out, leave_out_params = (
        ("NOT list_contains(CAST(? AS VARCHAR[]), shard)", [list(excluded)]) if excluded else ("true", [])
    )
    removals = files_root / layout.DEDUP_REMOVALS_KEY
    if removals.is_file():  # duplicates and evaluation copies leave before any cut (uids are unique pool-wide)
        leave_out = f"{leave_out} AND uid NOT IN (SELECT uid FROM read_parquet(?))"
        leave_out_params = [*leave_out_params, removals.as_posix()]
    if variant == RANDOM_TOPK:
        seed = model_version.removeprefix(RANDOM_VERSION_PREFIX)
        ledgers = (files_root / layout.download_rows_key(shard)).as_posix()
        return (
            f"SELECT uid, shard, {RANDOM_KEY_SQL} AS score, CAST(NULL AS INTEGER) AS caption_rank FROM read_parquet(?) "
            f"WHERE status = ? AND {leave_out}",
            [seed, ledgers, Status.SUCCESS, *leave_out_params],
        )
    if variant not in VARIANT_SCORERS:
        raise ValueError(f"unknown subset variant {variant!r}; expected one of {schemas.SUBSET_VARIANTS}")
    scorer = VARIANT_SCORERS[variant]
    if variant in (RECAP_ALL, RECAP_MIX, REWARD_BEST_CAPTION):
        if captioner_version is None:
            raise ValueError(f"{variant} ranks synthetic captions: give the captioner version")
        chosen = _best_synthetic if variant != REWARD_BEST_CAPTION else _best_of_raw_and_synthetic
        relation, params = chosen(files_root, scorer, model_version, captioner_version, shard)
        return f"SELECT * FROM ({relation}) WHERE {leave_out}", [*params, *leave_out_params]
    return (
        f"SELECT uid, shard, score, CAST(NULL AS INTEGER) AS caption_rank FROM read_parquet(?) WHERE {leave_out}",
        [_scores_glob(files_root, scorer, model_version, shard), *leave_out_params],
    )


def raw_plus_recap_pairs(
    files_root: Path, clip_cut: ScoreThreshold, captioner_version: str, shard: str = "*"
) -> tuple[str, list[Any]]:
    """SQL of `uid, shard, score, caption_rank, kept` for raw_topk_plus_recap (Nguyen et al.): the pairs CLIP
    score's cut `clip_cut` keeps keep their raw caption; every other image takes its best synthetic caption by
    CLIP score, kept when that caption scores at least the cut's threshold. Shards the cut left out are left out."""
    relation, params = ranked_pairs(files_root, CLIPSCORE_TOPK, clip_cut.model_version, shard, clip_cut.excluded)
    condition, condition_params = kept_condition(clip_cut)
    synthetic, synthetic_params = _best_synthetic(
        files_root, CLIP_SCORE, clip_cut.model_version, captioner_version, shard
    )
    return (
        "SELECT uid, shard, CASE WHEN raw_kept THEN raw.score ELSE synthetic.score END AS score, "
        "CASE WHEN raw_kept THEN NULL ELSE synthetic.caption_rank END AS caption_rank, "
        "raw_kept OR coalesce(synthetic.score >= ?, false) AS kept "
        f"FROM (SELECT uid, shard, score, {condition} AS raw_kept FROM ({relation})) AS raw "
        f"LEFT JOIN ({synthetic}) AS synthetic USING (uid, shard)",
        [clip_cut.score, *condition_params, *params, *synthetic_params],
    )


def score_threshold(
    files_root: Path,
    variant: str,
    model_version: str,
    keep_fraction: float,
    excluded: Sequence[str] = (),
    captioner_version: str | None = None,
) -> ScoreThreshold:
    """The cut of `variant` at one keep fraction (see `score_thresholds`)."""
    return score_thresholds(files_root, variant, model_version, [keep_fraction], excluded, captioner_version)[0]


def score_thresholds(
    files_root: Path,
    variant: str,
    model_version: str,
    keep_fractions: Iterable[float],
    excluded: Sequence[str] = (),
    captioner_version: str | None = None,
) -> list[ScoreThreshold]:
    """The cuts of `variant` at each of `keep_fractions` over all shards under `files_root` (a local data root or
    its mirror) but the `excluded` (quarantined) ones, in the fractions' order.

    Found by selection rather than by sorting every pair with its strings: the kept-th best score of every cut
    by one `quantile_disc` pass over the score column, then each cut's place among the pairs tied at its score,
    the only rows whose uid and shard are read. random_topk computes its key from every uid at each pass, so its
    cuts are looked for in one pass first, among the few pairs whose uniform keys lie near where each must fall.
    """
    fractions = list(keep_fractions)
    relation, params = ranked_pairs(
        files_root, variant, model_version, excluded=excluded, captioner_version=captioner_version
    )
    with duckdb.connect() as con:
        total = con.execute(f"SELECT count(*) FROM ({relation})", params).fetchone()[0]
        counts = [keep_count(fraction, total) for fraction in fractions]
        wanted = sorted({kept for kept in counts if kept})
        lasts: dict[int, tuple[float, str, str] | None] = dict.fromkeys(wanted)
        if wanted and variant == RANDOM_TOPK:
            lasts.update(_cuts_near_uniform_rank(con, relation, params, total, wanted))
        missing = [kept for kept, last in lasts.items() if last is None]
        if missing:
            lasts.update(_cuts_by_selection(con, relation, params, total, missing))
    removed = removed_before_cut(files_root, excluded)
    cuts = []
    for fraction, kept in zip(fractions, counts):
        score, uid, shard = lasts[kept] if kept else (None, None, None)
        cuts.append(
            ScoreThreshold(
                variant,
                model_version,
                fraction,
                total,
                kept,
                score,
                uid,
                shard,
                tuple(excluded),
                removed,
                captioner_version,
            )
        )
    return cuts


def removed_before_cut(files_root: Path, excluded: Sequence[str] = ()) -> int:
    """Pairs of the shards not `excluded` that dedup and decontamination removed (0 before any dedup)."""
    removals = files_root / layout.DEDUP_REMOVALS_KEY
    if not removals.is_file():
        return 0
    with duckdb.connect() as con:
        return con.execute(
            "SELECT count(*) FROM read_parquet(?) WHERE NOT list_contains(CAST(? AS VARCHAR[]), shard)",
            [removals.as_posix(), list(excluded)],
        ).fetchone()[0]


def raw_plus_recap_threshold(files_root: Path, clip_cut: ScoreThreshold, captioner_version: str) -> ScoreThreshold:
    """raw_topk_plus_recap's cut: clipscore_topk's, with the count of images it keeps once the recaptions that
    clear the same threshold join the raw top k."""
    relation, params = raw_plus_recap_pairs(files_root, clip_cut, captioner_version)
    with duckdb.connect() as con:
        kept = con.execute(f"SELECT count(*) FILTER (kept) FROM ({relation})", params).fetchone()[0]
    return dataclasses.replace(clip_cut, variant=RAW_TOPK_PLUS_RECAP, kept=kept, captioner_version=captioner_version)


def _selection_fraction(values: int, kept: int) -> float:
    """The `quantile_disc` fraction that selects the kept-th largest of `values` scores.

    DuckDB picks the ascending index max(1, n - floor(n - n*q)) - 1; q = (n - kept + 0.5) / n puts n*q half
    way between integers, far from floor's edges for any n a double counts exactly, so the index is n - kept.
    """
    return (values - kept + 0.5) / values


def _cuts_by_selection(
    con: duckdb.DuckDBPyConnection, relation: str, params: list[Any], total: int, kepts: Sequence[int]
) -> dict[int, tuple[float, str, str]]:
    """kept -> (score, uid, shard) of the kept-th pair in rank order, for each of `kepts`: every cut's score by
    one selection pass, then each one's place in its ties."""
    fractions = [_selection_fraction(total, kept) for kept in kepts]
    scored, scores = con.execute(
        f"SELECT count(score), quantile_disc(score, ?::DOUBLE[]) FROM ({relation})", [fractions, *params]
    ).fetchone()
    if scored < total:
        # ORDER BY ranks pairs without a score last: each cut is among the scored ones, or it is no cut at all
        if max(kepts) > scored:
            shard, uid = con.execute(
                f"SELECT shard, uid FROM ({relation}) WHERE score IS NULL ORDER BY shard, uid LIMIT 1", params
            ).fetchone()
            raise ValueError(
                f"{total - scored} of {total} pairs have no score (first: shard {shard}, uid {uid}) and keeping "
                f"{max(kepts)} would reach them: rescore them or lower the keep fraction"
            )
        scores = con.execute(
            f"SELECT quantile_disc(score, ?::DOUBLE[]) FROM ({relation})",
            [[_selection_fraction(scored, kept) for kept in kepts], *params],
        ).fetchone()[0]
    # the offset among the ties is kept - 1 - (pairs scoring above them); both scans read the score column
    # and DuckDB pushes `score = ?` into the parquet reader, so only the tied rows' strings are decoded
    return {
        kept: con.execute(
            f"SELECT score, uid, shard FROM ({relation}) WHERE score = ? ORDER BY uid, shard LIMIT 1 "
            f"OFFSET ? - 1 - (SELECT count(*) FROM ({relation}) WHERE score > ?)",
            [*params, score, kept, *params, score],
        ).fetchone()
        for kept, score in zip(kepts, scores)
    }


def _cuts_near_uniform_rank(
    con: duckdb.DuckDBPyConnection, relation: str, params: list[Any], total: int, kepts: Sequence[int]
) -> dict[int, tuple[float, str, str] | None]:
    """kept -> (score, uid, shard) of the kept-th pair when keys are uniform on [0, 1), for each of `kepts` in
    one pass; None for a cut that is not where they put it (then the selection decides).

    The kept-th largest of n uniform keys lies within a few sqrt(p(1 - p) / n) of 1 - p, p = kept / n; the pass
    counts the keys above a band of 8 of those (plus 16 / n, for p near 0 or 1) either side and ranks the pairs
    inside it, about 16 sqrt(n p (1 - p)) of them. The count says whether the kept-th pair is among them, so
    the result is exact either way.
    """
    bands = []
    for kept in kepts:
        share = kept / total
        spread = 8 * math.sqrt(share * (1 - share) / total) + 16 / total
        bands.append((1 - share - spread, 1 - share + spread))
    aggregates = ", ".join(
        "count(*) FILTER (WHERE score > ?), list(struct_pack(score, uid, shard) ORDER BY score DESC, uid, shard) "
        "FILTER (WHERE score >= ? AND score <= ?)"
        for _ in bands
    )
    row = con.execute(
        f"SELECT {aggregates} FROM ({relation})", [*(v for low, high in bands for v in (high, low, high)), *params]
    ).fetchone()
    found: dict[int, tuple[float, str, str] | None] = {}
    for index, kept in enumerate(kepts):
        above, near = row[2 * index], row[2 * index + 1]
        place = kept - above - 1
        if near is None or not 0 <= place < len(near):
            found[kept] = None
        else:
            found[kept] = (near[place]["score"], near[place]["uid"], near[place]["shard"])
    return found


def kept_condition(threshold: ScoreThreshold) -> tuple[str, list[Any]]:
    """A SQL condition (with parameters) over columns score, uid, shard that holds exactly for kept pairs."""
    if threshold.kept == 0 or threshold.score is None:
        return "false", []
    return (
        "(score > ? OR (score = ? AND (uid < ? OR (uid = ? AND shard <= ?))))",
        [threshold.score, threshold.score, threshold.uid, threshold.uid, threshold.shard],
    )


# The caption a variant's kept pairs carry: the raw one, the synthetic one, both (training draws), or whichever
# won (raw when no candidate rank was chosen).
_CAPTION_SOURCE_SQL = {
    RECAP_ALL: f"'{SYNTHETIC_CAPTION}'",
    RECAP_MIX: f"'{MIXED_CAPTION}'",
    REWARD_BEST_CAPTION: f"CASE WHEN caption_rank IS NULL THEN '{RAW_CAPTION}' ELSE '{SYNTHETIC_CAPTION}' END",
    RAW_TOPK_PLUS_RECAP: f"CASE WHEN caption_rank IS NULL THEN '{RAW_CAPTION}' ELSE '{SYNTHETIC_CAPTION}' END",
}


def shard_membership(files_root: Path, threshold: ScoreThreshold, shard: str) -> pl.DataFrame:
    """Every ranked image of one shard with its score, whether the variant's cut keeps it, and the caption it
    carries (SUBSETS schema)."""
    if threshold.variant == RAW_TOPK_PLUS_RECAP:
        assert threshold.captioner_version is not None
        relation, params = raw_plus_recap_pairs(files_root, threshold, threshold.captioner_version, shard)
        condition, condition_params = "kept", []
    else:
        relation, params = ranked_pairs(
            files_root, threshold.variant, threshold.model_version, shard, captioner_version=threshold.captioner_version
        )
        condition, condition_params = kept_condition(threshold)
    source = _CAPTION_SOURCE_SQL.get(threshold.variant, f"'{RAW_CAPTION}'")
    with duckdb.connect() as con:
        frame = con.sql(
            f"SELECT uid, shard, score, {condition} AS kept, caption_rank, {source} AS caption_source "
            f"FROM ({relation}) ORDER BY uid",
            params=[*condition_params, *params],
        ).pl()
    frame = pl.concat(
        [frame.with_columns(drop_reason=pl.lit(None, pl.String())), _removed_rows(files_root, shard)],
        how="vertical_relaxed",
    )
    synthetic = pl.col("caption_source") != RAW_CAPTION
    frame = frame.with_columns(
        pl.lit(threshold.variant).alias("variant"),
        pl.lit(threshold.model_version).alias("model_version"),
        pl.lit(threshold.keep_fraction).alias("keep_fraction"),
        pl.when(synthetic).then(pl.lit(threshold.captioner_version)).alias(schemas.CAPTIONER_VERSION),
    )
    return schemas.conform(frame, schemas.SUBSETS)


def _removed_rows(files_root: Path, shard: str) -> pl.DataFrame:
    """The shard's pairs dedup removed, as membership rows: not kept, no score, the removal's reason."""
    columns = ["uid", "shard", "score", "kept", schemas.CAPTION_RANK, "caption_source", "drop_reason"]
    removals = files_root / layout.DEDUP_REMOVALS_KEY
    if not removals.is_file():
        return pl.DataFrame(schema={name: schemas.SUBSETS[name] for name in columns})
    with duckdb.connect() as con:
        frame = con.sql(
            "SELECT uid, shard, CAST(NULL AS DOUBLE) AS score, false AS kept, CAST(NULL AS INTEGER) AS caption_rank, "
            "? AS caption_source, reason AS drop_reason FROM read_parquet(?) WHERE shard = ? ORDER BY uid",
            params=[RAW_CAPTION, removals.as_posix(), shard],
        ).pl()
    return frame.select([pl.col(name).cast(schemas.SUBSETS[name]) for name in columns])


@dataclass(frozen=True)
class ScoreHistogram:
    edges: list[float]  # bins + 1 equal-width edges from the lowest to the highest score
    kept: list[int]  # pairs per bin the cut keeps
    dropped: list[int]


def score_histogram(files_root: Path, threshold: ScoreThreshold, bins: int = 40) -> ScoreHistogram:
    """Kept and dropped pairs per equal-width score bin of one variant, counted in DuckDB (no scores in memory).

    Pairs scoring above the threshold's score are kept and those below dropped whatever their uid, so for
    scored variants the range pass and the bin pass read the score column alone; the pairs tied at that score
    (all in one bin) are counted apart, in a scan that decodes the strings of those rows only. random_topk
    reads every uid for its key at each pass anyway, so its bin pass applies the whole kept condition.
    """
    relation, params = ranked_pairs(files_root, threshold.variant, threshold.model_version, excluded=threshold.excluded)
    condition, condition_params = kept_condition(threshold)
    count_ties_apart = threshold.kept > 0 and threshold.variant != RANDOM_TOPK
    if count_ties_apart:
        condition, condition_params = "score > ?", [threshold.score]
    with duckdb.connect() as con:
        low, high = con.execute(f"SELECT min(score), max(score) FROM ({relation})", params).fetchone()
        if low is None:
            return ScoreHistogram([0.0, 1.0], [0], [0])
        width = (high - low) / bins or 1.0
        rows = con.execute(
            f"SELECT least(CAST(floor((score - ?) / ?) AS INTEGER), ?) AS bin, count(*), "
            f"count(*) FILTER ({condition}), count(*) FILTER (score = ?) FROM ({relation}) GROUP BY bin",
            [low, width, bins - 1, *condition_params, threshold.score, *params],
        ).fetchall()
        tied_kept = 0
        if count_ties_apart and any(tied for *_, tied in rows):
            # the uid test sits in FILTER, not WHERE: a WHERE conjunct on uid would be pushed into the scan too,
            # which would then decode every uid (1.8x the time at 10M pairs)
            tied_kept = con.execute(
                f"SELECT count(*) FILTER (uid < ? OR (uid = ? AND shard <= ?)) FROM ({relation}) WHERE score = ?",
                [threshold.uid, threshold.uid, threshold.shard, *params, threshold.score],
            ).fetchone()[0]
    kept, dropped = [0] * bins, [0] * bins
    for index, pairs, kept_count, tied in rows:
        kept[index] = kept_count + (tied_kept if tied else 0)
        dropped[index] = pairs - kept[index]
    return ScoreHistogram([low + i * width for i in range(bins + 1)], kept, dropped)


class NotScoredError(LookupError):
    """Some downloaded shards have no scores of the current model versions; the message names them."""


def mirror_if_remote(store: DataStore, files_root: Path, keys: list[str] | None = None) -> None:
    """Bring the parquet DuckDB reads (`keys`, or every view's files) to `files_root` when the data root is
    remote; a local data root is its own files root."""
    if store.local_path(layout.ANALYTICS_DB) is None:
        analytics.mirror(store, files_root, keys)


def variant_rankings(store: DataStore, random_seed: int, scratch: Path, recaptioned: bool) -> dict[str, str]:
    """Each subset variant's ranking: the current versions of the scorers, and random_topk's seed; the caption
    variants only when the pool is `recaptioned`."""
    versions = {}
    for variant, scorer in VARIANT_SCORERS.items():
        if variant in RECAPTION_VARIANTS and not recaptioned:
            continue
        try:
            versions[variant] = current_model(store, scorer, scratch)["version"]
        except NoModelError as error:
            raise NoModelError(f"{error}: {variant} needs it") from error
    versions[RANDOM_TOPK] = random_version(random_seed)
    return versions


def require_scored(
    store: DataStore, versions: dict[str, str], excluded: Collection[str], captioner_version: str | None
) -> None:
    """Fail, naming them, when some downloaded shards that are not `excluded` (quarantined) lack scores of the
    current versions (of their raw captions, and of `captioner_version`'s synthetic ones when given): a cut over
    part of the healthy pool would keep the wrong pairs."""
    wanted = {(scorer, versions[variant]) for variant, scorer in VARIANT_SCORERS.items() if variant in versions}
    missing = []
    for shard in downloaded_shards(store):
        if shard in excluded:
            continue
        for scorer, version in sorted(wanted):
            if not store.exists(layout.scores_key(scorer, version, shard)):
                missing.append(f"{scorer} {version} of shard {shard}")
            if captioner_version and not store.exists(
                layout.synthetic_scores_key(scorer, version, captioner_version, shard)
            ):
                missing.append(f"{scorer} {version} of shard {shard}'s captions by {captioner_version}")
    if missing:
        raise NotScoredError(
            f"{len(missing)} shard scores are missing, e.g. {missing[:3]}: materialize reward_scores and "
            "clip_scores (and, recaptioning, synthetic_caption_scores) for every shard first"
        )


@dataclass(frozen=True)
class VariantCuts:
    thresholds: dict[str, ScoreThreshold]  # training-set key -> its cut, in layout.in_training_set_order
    plot: Path  # the reward model's score histogram with its cuts
    held: dict[str, list[quarantine.QuarantinedShard]]  # the quarantined shards the cut left out, with why


def histogram_cut(thresholds: Iterable[ScoreThreshold]) -> ScoreThreshold:
    """The reward_topk cut a kept/dropped histogram colours: the largest k's (the others are lines on it)."""
    return max((t for t in thresholds if t.variant == REWARD_TOPK), key=lambda t: t.keep_fraction)


def cut_variants(
    store: DataStore,
    files_root: Path,
    keep_fractions: Sequence[float],
    random_seed: int,
    scratch: Path,
    captioner_version: str | None = None,
    mix_probability: float = 0.8,
) -> VariantCuts:
    """The cut of every subset variant at each of `keep_fractions` (the compression curve) over the healthy
    shards' score files (read by DuckDB under `files_root`, the data root or its local mirror), published as the
    score-threshold report (keyed by training set) and plot. With `captioner_version` (the pool recaptioned), the
    caption variants too: recap_all and recap_mix_p keep every image (one cut, whatever k), raw_topk_plus_recap
    adds to clipscore_topk's cut at each k the recaptions above its threshold, and reward_best_caption cuts at
    each k by each image's best reward; recap_mix_p's cut records `mix_probability`, the chance that training
    draws an image's synthetic caption. Shards quarantined before the cut (ca_platform.quarantine) are left out
    and listed in each cut."""
    versions = variant_rankings(store, random_seed, scratch, recaptioned=captioner_version is not None)
    held = quarantine.held_from_cut(store)
    excluded = sorted(held)
    require_scored(store, versions, excluded, captioner_version)
    mirror_if_remote(store, files_root)
    curve = sorted(set(keep_fractions))
    cuts: list[ScoreThreshold] = []
    for v in versions:
        if v == RAW_TOPK_PLUS_RECAP:
            continue
        cuts += score_thresholds(
            files_root,
            v,
            versions[v],
            [1.0] if v in KEEP_EVERY_IMAGE else curve,
            excluded,
            captioner_version if v in RECAPTION_VARIANTS else None,
        )
    if RAW_TOPK_PLUS_RECAP in versions:
        assert captioner_version is not None
        clip_cuts = [t for t in cuts if t.variant == CLIPSCORE_TOPK]
        cuts += [raw_plus_recap_threshold(files_root, clip_cut, captioner_version) for clip_cut in clip_cuts]
    cuts = [
        dataclasses.replace(t, synthetic_caption_probability=mix_probability) if t.variant == RECAP_MIX else t
        for t in cuts
    ]
    by_key = {t.key: t for t in cuts}
    thresholds = {key: by_key[key] for key in layout.in_training_set_order(by_key)}
    write_json(store, layout.SCORE_THRESHOLD_REPORT_KEY, {key: t.as_json() for key, t in thresholds.items()}, scratch)
    reward = histogram_cut(cuts)
    histogram = score_histogram(files_root, reward)
    lines = {f"k = {t.keep_fraction:g}": t.score for t in cuts if t.variant == REWARD_TOPK and t.score is not None}
    plot = histogram_png(
        histogram.edges,
        {f"kept at k = {reward.keep_fraction:g}": histogram.kept, "dropped": histogram.dropped},
        scratch / "plot" / Path(layout.SCORE_THRESHOLD_PLOT_KEY).name,
        f"reward model {reward.model_version}: the cut at each keep fraction",
        lines or None,
    )
    store.put_file(plot, layout.SCORE_THRESHOLD_PLOT_KEY, consume=False)
    return VariantCuts(thresholds, plot, held)


def published_thresholds(store: DataStore, scratch: Path) -> list[ScoreThreshold]:
    """The cuts of the score-threshold report, in the training sets' order (`layout.in_training_set_order`; each
    one training set: `ScoreThreshold.key`)."""
    document = read_json(store, layout.SCORE_THRESHOLD_REPORT_KEY, scratch)
    if document is None:
        raise LookupError("no score threshold yet: materialize score_threshold first")
    return [ScoreThreshold.from_json(document[key]) for key in layout.in_training_set_order(document)]
