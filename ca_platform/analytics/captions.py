"""Raw against synthetic captions, pool-wide: how long and how varied each source's captions are, how the reward
model and CLIP score rate them, and how often the reward model prefers an image's own alt-text to every candidate
a captioner wrote for it.

Everything is computed in DuckDB over the analytics database's `captions` view (ca_platform.analytics.database),
read-only, so it runs at pool scale without pulling captions into Python. One call looks at one reward model
version, one CLIP version and one captioner version: the raw captions are those of the downloaded images, the
synthetic ones that captioner version's candidates.

Words are the runs of letters, digits and underscores of the lower-cased caption: Python's Unicode `\\w+`,
written `[\\p{L}\\p{N}_]+` for DuckDB's RE2 (whose own `\\w` is ASCII only). A trigram is three consecutive words of
one caption; the distinct-trigram ratio (distinct trigrams / all trigrams of a source) measures diversity: 1 when
no three-word phrase repeats, low when the captions recite templates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ca_platform import layout
from ca_platform.analytics.database import ensure_views, mirror, query
from ca_platform.analytics.plots import markdown_table, pyplot
from ca_platform.analytics.sql_literals import sql_string_literal
from ca_platform.schemas import CLIP_SCORE, RAW_CAPTION, REWARD_MODEL, SYNTHETIC_CAPTION
from ca_platform.storage import DataStore, write_json

WORD_PATTERN = r"[\p{L}\p{N}_]+"
QUANTILES = (0.1, 0.5, 0.9)
HISTOGRAM_BINS = 30
SOURCES = (RAW_CAPTION, SYNTHETIC_CAPTION)

_RAW, _SYNTHETIC = sql_string_literal(RAW_CAPTION), sql_string_literal(SYNTHETIC_CAPTION)

# One row per caption (raw captions of downloaded images, and the candidates of one captioner version) with its
# score by one reward model version and one CLIP version (null when that version did not score it). The
# `captions` view has a row per scoring-version combination: FILTER picks the wanted versions without losing
# a caption that other versions scored. Parameters: reward version, CLIP version, captioner version.
PER_CAPTION_SQL = f"""
SELECT
    caption_source, uid, shard, caption_rank,
    any_value(caption) AS caption,
    any_value(reward_score) FILTER (reward_model_version = ?) AS reward,
    any_value(clip_score) FILTER (clip_model_version = ?) AS clip
FROM captions
WHERE caption_source = {_RAW} OR (caption_source = {_SYNTHETIC} AND captioner_version = ?)
GROUP BY caption_source, uid, shard, caption_rank
"""

# One row per source, raw first, with the raw-against-synthetic comparison repeated on each. An image is
# compared when its raw caption has a reward score and at least one candidate has one; the raw caption is
# preferred when it scores at least the best candidate (a tie goes to the raw caption, as reward_best_caption
# breaks it).
STATS_SQL = f"""
WITH per_caption AS MATERIALIZED ({PER_CAPTION_SQL}),
worded AS (
    SELECT caption_source, uid, shard, reward, clip,
        coalesce(regexp_extract_all(lower(caption), {sql_string_literal(WORD_PATTERN)}), []) AS words
    FROM per_caption
),
per_source AS (
    SELECT
        caption_source,
        count(*) AS captions,
        count(DISTINCT (uid, shard)) AS images,
        avg(len(words)) AS mean_words,
        sum(greatest(len(words) - 2, 0)) AS trigrams,
        avg(reward) AS reward_mean,
        quantile_cont(reward, [{", ".join(map(str, QUANTILES))}]) AS reward_cuts,
        avg(clip) AS clip_mean,
        quantile_cont(clip, [{", ".join(map(str, QUANTILES))}]) AS clip_cuts
    FROM worded
    GROUP BY caption_source
),
vocabulary AS (
    SELECT caption_source, count(DISTINCT word) AS vocabulary
    FROM (SELECT caption_source, unnest(words) AS word FROM worded)
    GROUP BY caption_source
),
distinct_trigrams AS (
    SELECT caption_source, count(DISTINCT trigram) AS distinct_trigrams
    FROM (
        SELECT caption_source,
            unnest(list_transform(
                range(1, len(words) - 1), lambda i: words[i] || ' ' || words[i + 1] || ' ' || words[i + 2]
            )) AS trigram
        FROM worded
    )
    GROUP BY caption_source
),
compared AS (
    SELECT count(*) AS images_compared, avg(CAST(raw_reward >= best_synthetic AS DOUBLE)) AS raw_preferred_share
    FROM (
        SELECT
            any_value(reward) FILTER (caption_source = {_RAW}) AS raw_reward,
            max(reward) FILTER (caption_source = {_SYNTHETIC}) AS best_synthetic
        FROM per_caption
        GROUP BY uid, shard
    )
    WHERE raw_reward IS NOT NULL AND best_synthetic IS NOT NULL
)
SELECT
    sources.caption_source,
    coalesce(per_source.captions, 0),
    coalesce(per_source.images, 0),
    coalesce(per_source.mean_words, 0.0),
    coalesce(vocabulary.vocabulary, 0),
    coalesce(distinct_trigrams.distinct_trigrams / nullif(per_source.trigrams, 0), 0.0),
    per_source.reward_mean, per_source.reward_cuts,
    per_source.clip_mean, per_source.clip_cuts,
    compared.images_compared, compared.raw_preferred_share
FROM (VALUES (0, {_RAW}), (1, {_SYNTHETIC})) AS sources(place, caption_source)
LEFT JOIN per_source USING (caption_source)
LEFT JOIN vocabulary USING (caption_source)
LEFT JOIN distinct_trigrams USING (caption_source)
CROSS JOIN compared
ORDER BY sources.place
"""

# Per scorer ('reward_model', 'clip_score') and source, the captions per equal-width score bin between the
# scorer's lowest and highest score over both sources (one distinct score: +- 0.5 around it, as numpy's
# histogram), the highest score in the last bin. Parameters: PER_CAPTION_SQL's, then the bin count twice.
HISTOGRAM_SQL = f"""
WITH per_caption AS MATERIALIZED ({PER_CAPTION_SQL}),
picked AS (
    SELECT {sql_string_literal(REWARD_MODEL)} AS scorer, caption_source, reward AS score
    FROM per_caption WHERE reward IS NOT NULL
    UNION ALL
    SELECT {sql_string_literal(CLIP_SCORE)}, caption_source, clip FROM per_caption WHERE clip IS NOT NULL
),
bounds AS (
    SELECT scorer,
        CASE WHEN min(score) < max(score) THEN min(score) ELSE min(score) - 0.5 END AS low,
        CASE WHEN min(score) < max(score) THEN max(score) ELSE max(score) + 0.5 END AS high
    FROM picked
    GROUP BY scorer
),
binned AS (
    SELECT scorer, low, high, caption_source,
        least(greatest(CAST(floor((score - low) / ((high - low) / ?)) AS BIGINT), 0), ? - 1) AS bin
    FROM picked JOIN bounds USING (scorer)
)
SELECT scorer, low, high, caption_source, bin, count(*) AS captions
FROM binned
GROUP BY scorer, low, high, caption_source, bin
ORDER BY scorer, caption_source, bin
"""


@dataclass(frozen=True)
class CaptionSourceStats:
    source: str  # RAW_CAPTION or SYNTHETIC_CAPTION
    captions: int
    images: int
    mean_words: float  # words per caption (runs of lower-cased Unicode \w); 0 without captions
    vocabulary: int  # distinct words
    distinct_trigram_ratio: float  # distinct word trigrams / all word trigrams; 0 when there is no trigram
    reward_mean: float | None  # None: no caption of the source has a score of that version
    reward_p10: float | None
    reward_p50: float | None
    reward_p90: float | None
    clip_mean: float | None
    clip_p10: float | None
    clip_p50: float | None
    clip_p90: float | None


@dataclass(frozen=True)
class CaptionAnalytics:
    reward_version: str
    clip_version: str
    captioner_version: str
    sources: list[CaptionSourceStats]  # raw first, then synthetic
    images_compared: int  # images with a raw reward score and at least one scored synthetic candidate
    raw_preferred_share: float | None  # of those, the share whose raw caption scores >= every candidate

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScoreHistogram:
    """Captions per score bin of each source, over edges shared by the sources."""

    edges: list[float]
    counts: dict[str, list[int]]  # source -> captions per bin


def _cuts(cuts: list[float] | None) -> tuple[float | None, ...]:
    return tuple(cuts) if cuts is not None else (None,) * len(QUANTILES)


def caption_analytics(
    db_path: Path, reward_version: str, clip_version: str, captioner_version: str
) -> CaptionAnalytics:
    """Raw against `captioner_version`'s synthetic captions, scored by `reward_version` and `clip_version`, from
    the analytics database at `db_path` (its views made by `ensure_views`)."""
    result = query(db_path, STATS_SQL, [reward_version, clip_version, captioner_version])
    sources = [
        CaptionSourceStats(
            source,
            captions,
            images,
            float(mean_words),
            vocabulary,
            float(trigram_ratio),
            reward_mean,
            *_cuts(reward_cuts),
            clip_mean,
            *_cuts(clip_cuts),
        )
        for (
            source,
            captions,
            images,
            mean_words,
            vocabulary,
            trigram_ratio,
            reward_mean,
            reward_cuts,
            clip_mean,
            clip_cuts,
            _,
            _,
        ) in result.rows
    ]
    images_compared, raw_preferred_share = result.rows[0][-2:]
    return CaptionAnalytics(
        reward_version, clip_version, captioner_version, sources, images_compared, raw_preferred_share
    )


def caption_score_histograms(
    db_path: Path, analytics: CaptionAnalytics, bins: int = HISTOGRAM_BINS
) -> dict[str, ScoreHistogram]:
    """Per scorer (REWARD_MODEL, CLIP_SCORE) with any score of its version, each source's captions per score bin,
    counted in DuckDB; every source and bin is present, empty ones with 0."""
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    params = [analytics.reward_version, analytics.clip_version, analytics.captioner_version, bins, bins]
    histograms: dict[str, ScoreHistogram] = {}
    for scorer, low, high, source, bin_index, captions in query(db_path, HISTOGRAM_SQL, params).rows:
        if scorer not in histograms:
            edges = np.linspace(low, high, bins + 1).tolist()
            histograms[scorer] = ScoreHistogram(edges, {s: [0] * bins for s in SOURCES})
        histograms[scorer].counts[source][bin_index] = captions
    return histograms


def caption_analytics_plot(db_path: Path, analytics: CaptionAnalytics, path: Path) -> Path:
    """A PNG of the reward-score histograms of raw and synthetic captions (left) and the CLIP-score ones
    (right), each panel titled with its model version."""
    histograms = caption_score_histograms(db_path, analytics)
    panels: Mapping[str, tuple[str, str]] = {
        REWARD_MODEL: ("reward score", f"reward model {analytics.reward_version}"),
        CLIP_SCORE: ("CLIP score", f"CLIP score {analytics.clip_version}"),
    }
    plt = pyplot()
    figure, axes_pair = plt.subplots(1, 2, figsize=(11, 3.8), dpi=100)
    for axes, (scorer, (label, title)) in zip(axes_pair, panels.items()):
        histogram = histograms.get(scorer)
        if histogram is None:
            axes.text(0.5, 0.5, "no scores", ha="center", va="center", transform=axes.transAxes)
        else:
            for source, counts in histogram.counts.items():
                axes.stairs(counts, histogram.edges, fill=True, alpha=0.45, label=f"{source} ({sum(counts)})")
            axes.legend(fontsize=8)
        axes.set_title(title)
        axes.set_xlabel(label)
        axes.set_ylabel("captions")
    figure.suptitle(f"raw against synthetic captions (captioner {analytics.captioner_version})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)
    return path


def caption_analytics_table(analytics: CaptionAnalytics) -> str:
    """Markdown, one row per caption source."""
    columns = [
        "source",
        "captions",
        "images",
        "mean words",
        "vocabulary",
        "distinct trigrams",
        f"reward mean ({analytics.reward_version})",
        "reward p10",
        "reward p50",
        "reward p90",
        f"CLIP mean ({analytics.clip_version})",
        "CLIP p10",
        "CLIP p50",
        "CLIP p90",
    ]
    rows = [
        [
            s.source,
            s.captions,
            s.images,
            s.mean_words,
            s.vocabulary,
            s.distinct_trigram_ratio,
            s.reward_mean,
            s.reward_p10,
            s.reward_p50,
            s.reward_p90,
            s.clip_mean,
            s.clip_p10,
            s.clip_p50,
            s.clip_p90,
        ]
        for s in analytics.sources
    ]
    return markdown_table(columns, rows)


def write_caption_analytics(
    store: DataStore,
    db_path: Path,
    files_root: Path,
    reward_version: str,
    clip_version: str,
    captioner_version: str,
    scratch: Path,
) -> tuple[CaptionAnalytics, Path]:
    """The caption analytics of these versions over the data root's files (mirrored under `files_root` when the
    root is remote), published as reports/caption_analytics.json and its plot; returns them and the local plot."""
    if store.local_path(layout.ANALYTICS_DB) is None:
        mirror(store, files_root)
    ensure_views(db_path, files_root)
    figures = caption_analytics(db_path, reward_version, clip_version, captioner_version)
    write_json(store, layout.CAPTION_ANALYTICS_KEY, figures.as_json(), scratch)
    plot = caption_analytics_plot(db_path, figures, scratch / Path(layout.CAPTION_ANALYTICS_PLOT_KEY).name)
    store.put_file(plot, layout.CAPTION_ANALYTICS_PLOT_KEY, consume=False)
    return figures, plot
