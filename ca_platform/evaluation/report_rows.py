"""The curation report's rows: one per training set, with the figures its models achieved, and what a table of
them shows (which figures, which references a set is compared with at its k).

The rows are read and given their intervals by `report`, rendered as tables and text by `report_text` and
drawn by `report_plots`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ca_platform import layout
from ca_platform.evaluation.intervals import Difference
from ca_platform.schemas import (
    CLIPSCORE_TOPK,
    FULL,
    RAW_TOPK_PLUS_RECAP,
    RECAP_ALL,
    RECAP_MIX,
    REWARD_BEST_CAPTION,
    UNCUT_VARIANTS,
)

# The table's figures, in its column order, with their headers; zero-shot classification's last, shown when a
# labelled set was given.
METRIC_LABELS = {
    "i2t_r1": "I->T R@1",
    "t2i_r1": "T->I R@1",
    "i2t_r5": "I->T R@5",
    "t2i_r5": "T->I R@5",
    "cider": "CIDEr-D",
    "bleu4": "BLEU-4",
    "top1": "top-1",
    "top5": "top-5",
}


METRICS = tuple(METRIC_LABELS)


CLASSIFICATION_METRICS = ("top1", "top5")


# The compression curve's panels: each figure against the keep fraction (zero-shot top-1 too with a labelled set).
CURVE_METRICS = {"I->T R@5": "i2t_r5", "T->I R@5": "t2i_r5", "CIDEr-D": "cider", "zero-shot top-1": "top1"}


# What every training set is compared with (`clipscore_topk` at the set's own k), and the markers of a difference
# outside noise (above, below).
REFERENCE_MARKERS = {FULL: ("▲", "▼"), CLIPSCORE_TOPK: ("↑", "↓")}


# Which captions each variant trains on.
CAPTIONS = {
    RECAP_ALL: "synthetic",
    RAW_TOPK_PLUS_RECAP: "raw top k + synthetic",
    RECAP_MIX: "raw/synthetic mix",
    REWARD_BEST_CAPTION: "reward's best",
}


@dataclass(frozen=True)
class CurationRow:
    variant: str  # the training set: `full`, `reward_topk@0.3`, `recap_all`, ... (layout.training_set_key)
    kept_fraction: float  # of the ranked pool, as kept (raw_topk_plus_recap keeps more than its k)
    scorer_preference_accuracy: float | None  # held-out human preference accuracy of the ranking scorer
    i2t_r1: float  # each metric: the mean over the seeds' models
    t2i_r1: float
    i2t_r5: float
    t2i_r5: float
    cider: float
    bleu4: float
    top1: float | None = None  # zero-shot classification accuracy of the CLIP; None without a labelled set
    top5: float | None = None
    seeds: int = 1
    spread: dict[str, float] = field(default_factory=dict)  # metric -> sample standard deviation over seeds
    keep_fraction: float | None = None  # the k it was cut at; None for full and the variants keeping every image
    interval: dict[str, list[float]] = field(default_factory=dict)  # metric -> [low, high] over evaluation items
    # reference training set (`full`, `clipscore_topk@<k>`) -> metric -> this set's difference from it
    # (Difference.as_json); a set without a k is compared with clipscore_topk at every k of the report
    versus: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    evaluation_items: int = 0  # the evaluation images the intervals resample
    labelled_items: int = 0  # the labelled images zero-shot top-1/top-5's intervals resample (0 without a set)
    bootstrap: dict[str, Any] = field(default_factory=dict)  # BootstrapSettings.as_json

    @property
    def ranking(self) -> str:
        """The variant, without its k: the line of the compression curve this row is a point of."""
        return layout.parse_training_set_key(self.variant)[0]

    def outside_noise(self, reference: str, metric: str) -> Difference | None:
        """The difference from the training set `reference` on `metric` when it is outside noise."""
        compared = self.versus.get(reference, {}).get(metric)
        if compared is None or not compared["outside_noise"]:
            return None
        return Difference(compared["difference"], compared["low"], compared["high"])

    def as_json(self) -> dict[str, Any]:
        document = asdict(self)
        document.pop("variant")
        return document


def classified(rows: Sequence[CurationRow]) -> bool:
    return any(row.top1 is not None for row in rows)


def table_metrics(rows: Sequence[CurationRow]) -> tuple[str, ...]:
    """The table's figures: without a labelled set, no zero-shot columns."""
    return METRICS if classified(rows) else tuple(m for m in METRICS if m not in CLASSIFICATION_METRICS)


def curve_metrics(rows: Sequence[CurationRow]) -> dict[str, str]:
    """CURVE_METRICS the rows have: zero-shot top-1 only with a labelled set."""
    return {label: m for label, m in CURVE_METRICS.items() if m not in CLASSIFICATION_METRICS or classified(rows)}


def reference_key(reference: str, keep_fraction: float | None) -> str | None:
    """The training set a row at keep fraction k is compared with for `reference`: `full` itself, a ranking at
    the same k (None without a k: a table of the sets that keep every image has no clipscore_topk to compare)."""
    if reference in UNCUT_VARIANTS:
        return reference
    return None if keep_fraction is None else layout.training_set_key(reference, keep_fraction)


def curve_fractions(rows: Sequence[CurationRow]) -> list[float]:
    """The keep fractions the rows were cut at, ascending."""
    return sorted({row.keep_fraction for row in rows if row.keep_fraction is not None})


def rows_at(rows: Sequence[CurationRow], keep_fraction: float) -> list[CurationRow]:
    """The table at one k: the training sets cut at it, with full and the variants keeping every image (which
    have no k) beside them, as a report at that one k would show them."""
    return [row for row in rows if row.keep_fraction in (None, keep_fraction)]


def references_of(row: CurationRow, keep_fraction: float | None) -> list[tuple[str, str]]:
    """(reference, its training-set key) for `row` in the table at `keep_fraction`: a cut row's own k wins."""
    k = row.keep_fraction if row.keep_fraction is not None else keep_fraction
    keys = [(reference, reference_key(reference, k)) for reference in REFERENCE_MARKERS]
    return [(reference, key) for reference, key in keys if key is not None and key != row.variant]
