"""The demo's scorers and cuts judged against the shapes world's truth files.

Every demo pair's noise kind and scene are known, so what a real pool can only guess is measured here: how well
each scorer separates clean captions from each kind of noise across images (AUROC: the probability that a clean
pair scores above a noisy one, ties half), and what each cut kept: its share of clean pairs and the mean utility
the simulated annotators give the kept captions (`caption_utility`, the quantity their rankings come from).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ca_platform import analytics, layout, schemas
from ca_platform.compression.threshold import published_thresholds
from ca_platform.demo.annotators import caption_utility
from ca_platform.demo.shapes_pool import read_truth
from ca_platform.demo.shapes_world import scene_from_json
from ca_platform.schemas import CLIP_SCORE, REWARD_MODEL
from ca_platform.scoring.registry import current_model
from ca_platform.storage import DataStore, write_json

CLEAN = "clean"
ANY_NOISE = "any noise"


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half (Mann-Whitney U / (n_pos * n_neg))."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    values = np.concatenate([positive, negative]).astype(np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    average_rank = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # 1-based ranks, ties sharing their mean
    u = average_rank[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2.0
    return float(u / (len(positive) * len(negative)))


@dataclass(frozen=True)
class TruthAudit:
    separation: dict[str, dict[str, float]]  # scorer -> noise kind (and ANY_NOISE) -> AUROC of clean against it
    kept: dict[str, dict[str, Any]]  # training set -> kept pairs, clean share, mean utility, kept per noise kind

    def as_json(self) -> dict[str, Any]:
        return {"separation": self.separation, "kept": self.kept}

    def lines(self) -> list[str]:
        """The audit as terminal lines: one row per scorer, then one per cut."""
        kinds = [kind for kind in next(iter(self.separation.values()), {}) if kind != ANY_NOISE]
        lines = [
            "against the shapes world's truth (AUROC of clean pairs against each noise kind, across images):",
            "  " + f"{'scorer':14s}" + "".join(f"{kind:>17s}" for kind in [*kinds, ANY_NOISE]),
        ]
        for scorer, row in self.separation.items():
            lines.append("  " + f"{scorer:14s}" + "".join(f"{row[kind]:17.3f}" for kind in [*kinds, ANY_NOISE]))
        lines.append("what each cut kept (clean share, the annotators' mean utility of the kept captions):")
        for name, row in self.kept.items():
            mix = ", ".join(f"{kind} {n}" for kind, n in sorted(row["by_kind"].items(), key=lambda kv: -kv[1]))
            lines.append(
                f"  {name:20s} {row['kept']:4d} pairs  clean {row['clean_share']:.3f}  "
                f"utility {row['mean_utility']:+.3f}  ({mix})"
            )
        return lines


def _frame(db: Path, sql: str, params: list[Any]) -> pl.DataFrame:
    result = analytics.query(db, sql, params)
    return pl.DataFrame(result.rows, schema=result.columns, orient="row")


def pool_truth(db: Path, truth_dir: Path) -> pl.DataFrame:
    """Every downloaded raw pair (uid, shard) with its caption, noise kind and annotator utility."""
    truth = read_truth(truth_dir).select(schemas.URL, "noise_kind", "scene_json")
    downloads = _frame(
        db,
        f"SELECT {schemas.UID}, {schemas.SHARD}, {schemas.URL}, {schemas.CAPTION} FROM downloads WHERE status = ?",
        [schemas.Status.SUCCESS],
    )
    pairs = downloads.join(truth, on=schemas.URL, how="inner")
    utilities = [
        caption_utility(caption, scene_from_json(scene))
        for caption, scene in zip(pairs[schemas.CAPTION], pairs["scene_json"])
    ]
    return pairs.with_columns(pl.Series("utility", utilities, dtype=pl.Float64)).drop("scene_json")


@dataclass(frozen=True)
class AuditedCut:
    """One raw-caption cut of the current score threshold: what the subsets view holds for it."""

    variant: str
    keep_fraction: float
    model_version: str


def audit_against_truth(db: Path, truth_dir: Path, versions: dict[str, str], cuts: Sequence[AuditedCut]) -> TruthAudit:
    """Separation of each scorer's version in `versions` (scorer -> model version) over the downloaded raw pairs,
    and what each of `cuts` and the full training set (the downloads dedup kept) kept, from the DuckDB views of
    `db`. Only the given cuts are read: subsets of an earlier k list or model version stay on the data root."""
    pairs = pool_truth(db, truth_dir)
    separation = {}
    for scorer, version in versions.items():
        scores = _frame(
            db,
            f"SELECT {schemas.UID}, {schemas.SHARD}, score FROM scores "
            "WHERE scorer = ? AND model_version = ? AND coalesce(caption_source, ?) = ?",
            [scorer, version, schemas.RAW_CAPTION, schemas.RAW_CAPTION],
        )
        separation[scorer] = separation_by_kind(pairs.join(scores, on=[schemas.UID, schemas.SHARD], how="inner"))
    removed = _frame(db, f"SELECT {schemas.UID}, {schemas.SHARD} FROM dedup_removals", [])
    kept = {schemas.FULL: kept_summary(pairs.join(removed, on=[schemas.UID, schemas.SHARD], how="anti"))}
    for cut in cuts:
        rows = _frame(
            db,
            f"SELECT {schemas.UID}, {schemas.SHARD} FROM subsets "
            "WHERE kept AND variant = ? AND keep_fraction = ? AND model_version = ?",
            [cut.variant, cut.keep_fraction, cut.model_version],
        )
        kept_pairs = pairs.join(rows, on=[schemas.UID, schemas.SHARD], how="semi")
        kept[layout.training_set_key(cut.variant, cut.keep_fraction)] = kept_summary(kept_pairs)
    return TruthAudit(separation, kept)


def separation_by_kind(scored: pl.DataFrame) -> dict[str, float]:
    """AUROC of the clean pairs' `score` against each noise kind's, and against every noisy pair."""
    clean = scored.filter(pl.col("noise_kind") == CLEAN)["score"].to_numpy()
    kinds = [kind for kind in scored["noise_kind"].unique(maintain_order=True).to_list() if kind != CLEAN]
    row = {
        kind: auroc(clean, scored.filter(pl.col("noise_kind") == kind)["score"].to_numpy()) for kind in sorted(kinds)
    }
    row[ANY_NOISE] = auroc(clean, scored.filter(pl.col("noise_kind") != CLEAN)["score"].to_numpy())
    return row


def kept_summary(kept: pl.DataFrame) -> dict[str, Any]:
    by_kind = Counter(kept["noise_kind"].to_list())
    return {
        "kept": kept.height,
        "clean_share": by_kind[CLEAN] / kept.height if kept.height else float("nan"),
        "mean_utility": float(kept["utility"].mean()) if kept.height else float("nan"),
        "by_kind": dict(by_kind),
    }


def write_truth_audit(store: DataStore, db: Path, truth_dir: Path, scratch: Path) -> TruthAudit:
    """The audit of the current reward model and CLIP score and of the current score threshold's raw-caption
    cuts (over the analytics database `db` of `store`), written to the demo's truth report."""
    versions = {kind: current_model(store, kind, scratch)["version"] for kind in (REWARD_MODEL, CLIP_SCORE)}
    cuts = [
        AuditedCut(t.variant, t.keep_fraction, t.model_version)
        for t in published_thresholds(store, scratch)
        if t.variant in schemas.FILTER_VARIANTS
    ]
    audit = audit_against_truth(db, truth_dir, versions, cuts)
    write_json(store, layout.DEMO_TRUTH_REPORT_KEY, {"versions": versions, **audit.as_json()}, scratch)
    return audit
