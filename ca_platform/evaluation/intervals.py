"""How far a figure can be trusted: its spread over training seeds, a bootstrap interval over evaluation items,
and whether the difference between two variants is outside that noise.

A metric of one variant is an `ItemTable`: for each seed's model, what each evaluation item contributes to the
figure. Most figures are the mean of one value per item (a hit, a per-image CIDEr-D); some pool counts over the
items before a ratio (text->image recall over the images' captions, corpus BLEU-4), so each item carries a row of
sufficient statistics and a named statistic turns their sums into the figure. Resampling items is then one
matrix product of resample counts with the table, for every seed and resample at once.

Every replicate of every variant draws the same items (the draws depend only on the number of items and seeds,
the resample count and the seed), so intervals of different variants are comparable and a difference is paired:
the same resampled items and the same resampled seeds for both variants, each seed's model counted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ca_platform.evaluation.captions import bleu4_of_statistics

MEAN = "mean"  # one value per item; the figure is their mean
RATIO = "ratio"  # (numerator, denominator) per item; the figure is sum of numerators / sum of denominators
BLEU4 = "bleu4"  # captions.BLEU_STATISTICS per item; the figure is corpus BLEU-4 of their sums

# Each statistic: (summed per-item statistics [..., k], the number of items) -> the figure [...].
STATISTICS: Mapping[str, Callable[[np.ndarray, int], np.ndarray]] = {
    MEAN: lambda sums, items: sums[..., 0] / items,
    RATIO: lambda sums, items: sums[..., 0] / sums[..., 1],
    BLEU4: lambda sums, items: bleu4_of_statistics(sums),
}
STATISTIC_WIDTHS = {MEAN: 1, RATIO: 2}  # a BLEU4 row's width is checked by bleu4_of_statistics

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_SEED = 0


@dataclass(frozen=True)
class BootstrapSettings:
    """Percentile bootstrap: `resamples` draws of the items (and, for differences, of the seeds) from `seed`."""

    resamples: int = DEFAULT_RESAMPLES
    confidence: float = DEFAULT_CONFIDENCE
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if self.resamples < 1:
            raise ValueError(f"the bootstrap needs at least one resample, got {self.resamples}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"the confidence level must be in (0, 1), got {self.confidence}")

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ItemTable:
    """One metric of one variant: `values[seed, item]` (or `values[seed, item, k]`, k sufficient statistics per
    item), with the statistic that makes a figure of them."""

    values: np.ndarray
    statistic: str = MEAN

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise ValueError(f"unknown item statistic {self.statistic!r}; known: {sorted(STATISTICS)}")
        values = np.asarray(self.values, dtype=np.float64)
        if values.ndim == 2:
            values = values[:, :, None]
        if values.ndim != 3 or 0 in values.shape:
            raise ValueError(f"per-item values must be [seeds, items] or [seeds, items, k], got {values.shape}")
        width = STATISTIC_WIDTHS.get(self.statistic)
        if width is not None and values.shape[2] != width:
            raise ValueError(f"statistic {self.statistic} takes {width} value(s) per item, got {values.shape[2]}")
        if not np.isfinite(values).all():
            raise ValueError("per-item values must be finite")
        if self.statistic == RATIO and not (values[:, :, 1] > 0).all():
            raise ValueError("a ratio's denominators must be positive on every item")
        object.__setattr__(self, "values", values)

    @property
    def seeds(self) -> int:
        return int(self.values.shape[0])

    @property
    def items(self) -> int:
        return int(self.values.shape[1])

    def per_seed(self) -> np.ndarray:
        """Each seed's model's figure on all the items, as the evaluation reports it."""
        return STATISTICS[self.statistic](self.values.sum(axis=1), self.items)

    def resampled(self, item_counts: np.ndarray) -> np.ndarray:
        """`[resample, seed]`: each seed's figure on each resample, `item_counts[resample, item]` the times an
        item was drawn."""
        # einsum's own loops rather than a BLAS product: the sums do not depend on the thread count, so a report
        # repeats to the last digit in any process.
        sums = np.einsum("ri,sik->rsk", item_counts.astype(np.float64), self.values)
        return STATISTICS[self.statistic](sums, self.items)


@dataclass(frozen=True)
class Figure:
    """A metric of one variant: the mean over seeds, their spread, and the bootstrap interval over items."""

    mean: float
    spread: float  # sample standard deviation over the seeds' models (0 for one seed)
    low: float
    high: float


@dataclass(frozen=True)
class Difference:
    """A variant's figure minus a reference's, with the paired bootstrap interval of that difference."""

    difference: float
    low: float
    high: float

    @property
    def outside_noise(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "outside_noise": self.outside_noise}


def item_counts(items: int, settings: BootstrapSettings, seeds: int = 1) -> np.ndarray:
    """`[resample, item]`: how often each item is drawn in each resample of `items` with replacement (the same
    for any number of seeds: the seed draws come after)."""
    return _draws(items, seeds, settings)[0]


@functools.lru_cache(maxsize=16)
def _draws(items: int, seeds: int, settings: BootstrapSettings) -> tuple[np.ndarray, np.ndarray]:
    """Item counts and seed counts per resample, from one generator: the same for every variant (and drawn once
    for all of a report's metrics and variants)."""
    rng = np.random.default_rng(settings.seed)
    items_drawn = rng.multinomial(items, np.full(items, 1.0 / items), size=settings.resamples)
    seeds_drawn = rng.multinomial(seeds, np.full(seeds, 1.0 / seeds), size=settings.resamples)
    items_drawn.flags.writeable = seeds_drawn.flags.writeable = False
    return items_drawn, seeds_drawn


def _interval(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    return float(low), float(high)


def figure(table: ItemTable, settings: BootstrapSettings = BootstrapSettings()) -> Figure:
    """Mean over seeds, seed spread, and the percentile interval of the seed mean over resampled items (the
    seeds held fixed: the spread shows their noise)."""
    per_seed = table.per_seed()
    replicates = table.resampled(item_counts(table.items, settings, table.seeds)).mean(axis=1)
    low, high = _interval(replicates, settings.confidence)
    spread = float(per_seed.std(ddof=1)) if table.seeds > 1 else 0.0
    return Figure(float(per_seed.mean()), spread, low, high)


def difference(
    variant: ItemTable, reference: ItemTable, settings: BootstrapSettings = BootstrapSettings()
) -> Difference:
    """The variant's mean over seeds minus the reference's, with the percentile interval over replicates that
    draw the same items and the same seeds for both: item noise and training noise both widen it, what the two
    share (an item hard for every model) cancels. Seed i of one variant pairs with seed i of the other."""
    if variant.values.shape[:2] != reference.values.shape[:2]:
        raise ValueError(
            f"a paired difference needs the same seeds and items on both sides: [seeds, items] "
            f"{list(variant.values.shape[:2])} against {list(reference.values.shape[:2])}"
        )
    items_drawn, seeds_drawn = _draws(variant.items, variant.seeds, settings)
    per_replicate = variant.resampled(items_drawn) - reference.resampled(items_drawn)  # [resample, seed]
    replicates = (seeds_drawn * per_replicate).sum(axis=1) / variant.seeds
    low, high = _interval(replicates, settings.confidence)
    return Difference(float(variant.per_seed().mean() - reference.per_seed().mean()), low, high)


def item_tables(document: Mapping[str, Any]) -> dict[str, ItemTable]:
    """Each metric's table from an evaluation report's `items`, `per_item` (seed -> metric -> one value or one
    row of statistics per item, in `items` order) and `item_statistics` (metric -> statistic; absent: MEAN)."""
    per_item: Mapping[str, Mapping[str, list[Any]]] = document["per_item"]
    items = len(document["items"])
    seeds = sorted(per_item, key=int)
    statistics = document.get("item_statistics", {})
    tables = {}
    for metric in per_item[seeds[0]]:
        values = np.asarray([per_item[seed][metric] for seed in seeds], dtype=np.float64)
        if values.shape[1] != items:
            raise ValueError(f"metric {metric}: {values.shape[1]} per-item values for {items} items")
        tables[metric] = ItemTable(values, statistics.get(metric, MEAN))
    return tables
