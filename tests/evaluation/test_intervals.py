"""The bootstrap on hand-made tables whose answer is known: identical variants, a constant shift, training noise
that only seed resampling sees, a tiny table whose bootstrap distribution is enumerated, BLEU-4 recomputed on
a resampled corpus."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ca_platform.evaluation.captions import bleu4
from ca_platform.evaluation.intervals import (
    BLEU4,
    RATIO,
    BootstrapSettings,
    ItemTable,
    difference,
    figure,
    item_counts,
    item_tables,
)

RNG = np.random.default_rng(7)
HITS = ItemTable((RNG.random((3, 40)) < 0.3).astype(float))  # 3 seeds x 40 items of 0/1 hits


def test_identical_variants_differ_by_exactly_zero_and_not_outside_noise() -> None:
    result = difference(HITS, ItemTable(HITS.values.copy()))
    assert (result.difference, result.low, result.high) == (0.0, 0.0, 0.0)
    assert not result.outside_noise


@pytest.mark.parametrize("shift", [0.25, -0.125])
def test_a_constant_shift_on_every_item_is_outside_noise_with_the_shift_as_its_interval(shift: float) -> None:
    shifted = ItemTable(HITS.values + shift)
    result = difference(shifted, HITS)
    assert (result.difference, result.low, result.high) == pytest.approx((shift, shift, shift), abs=1e-12)
    assert result.outside_noise
    assert result.as_json()["outside_noise"] is True


def test_training_noise_widens_the_paired_interval_where_items_alone_see_none() -> None:
    # Each seed's model is off the reference by one constant on every item: +1, -0.5, +0.2. Resampling items
    # alone would give the interval [0.233, 0.233]; drawing the seeds too finds replicates made of seed 1 only.
    items = 30
    reference = ItemTable(np.zeros((3, items)))
    variant = ItemTable(np.repeat([[1.0], [-0.5], [0.2]], items, axis=1))
    result = difference(variant, reference)
    assert result.difference == pytest.approx(0.7 / 3)
    assert result.low == pytest.approx(-0.5) and result.high == pytest.approx(1.0)  # 1/27 of replicates each
    assert not result.outside_noise
    one_seed = difference(ItemTable(variant.values[:1]), ItemTable(reference.values[:1]))
    assert (one_seed.low, one_seed.high) == pytest.approx((1.0, 1.0)) and one_seed.outside_noise


def test_the_interval_of_a_tiny_table_matches_its_enumerated_bootstrap_distribution() -> None:
    # 4 items, one seed: the 4^4 = 256 equally likely resamples give the exact bootstrap distribution of the mean.
    values = np.array([0.0, 1.0, 2.0, 7.0])
    exact = np.array([values[list(draw)].mean() for draw in itertools.product(range(4), repeat=4)])
    settings = BootstrapSettings(resamples=40_000, confidence=0.8, seed=3)
    replicates = ItemTable(values[None, :]).resampled(item_counts(4, settings))[:, 0]
    support = np.unique(exact)
    assert set(np.round(replicates, 12)) <= set(np.round(support, 12))
    exact_cdf = np.searchsorted(np.sort(exact), support, side="right") / exact.size
    sampled_cdf = np.searchsorted(np.sort(replicates), support + 1e-12, side="right") / replicates.size
    assert np.abs(exact_cdf - sampled_cdf).max() < 0.01  # the draws follow the bootstrap distribution
    # The exact 10% and 90% points (0.75 and 4.25) lie 0.02 or more of probability from the neighbouring support
    # points, 13 standard errors of a 40,000-draw quantile: the percentile interval lands on them exactly.
    low, high = np.quantile(exact, [0.1, 0.9], method="inverted_cdf")
    result = figure(ItemTable(values[None, :]), settings)
    assert (result.mean, result.spread) == (2.5, 0.0)
    assert (result.low, result.high) == (low, high) == (0.75, 4.25)


def test_resampled_figures_are_the_figures_of_the_resampled_items() -> None:
    counts = item_counts(HITS.items, BootstrapSettings(resamples=5, seed=1))
    for row, replicate in zip(counts, HITS.resampled(counts)):
        drawn = np.repeat(np.arange(HITS.items), row)
        np.testing.assert_allclose(replicate, HITS.values[:, drawn, 0].mean(axis=1), rtol=1e-12)


def test_a_ratio_pools_numerators_and_denominators_over_the_items() -> None:
    # Text->image recall per image: (captions that found it, its captions). 3 of 6 captions overall; the mean
    # of the per-image shares would be (1/3 + 0 + 1) / 3 = 0.444.
    table = ItemTable(np.array([[[1, 3], [0, 1], [2, 2]]]), RATIO)
    assert table.per_seed().tolist() == [0.5]
    counts = np.array([[2, 1, 0], [0, 0, 3]])  # items {0, 0, 1} -> 2/7; items {2, 2, 2} -> 6/6
    assert table.resampled(counts)[:, 0] == pytest.approx([2 / 7, 1.0])


def test_bleu4_on_a_resample_is_the_corpus_bleu4_of_the_resampled_corpus() -> None:
    candidates = {"a": "a man rides a horse", "b": "two dogs play in the snow", "c": "a red car"}
    references = {
        "a": ["a man rides a brown horse", "a man is riding a horse"],
        "b": ["two dogs play in snow", "dogs are playing in the snow"],
        "c": ["a red car parked on the street"],
    }
    score = bleu4(candidates, references)
    table = ItemTable(np.array([[score.statistics[item] for item in candidates]]), BLEU4)
    assert table.per_seed()[0] == pytest.approx(score.score, rel=1e-12)
    counts = np.array([[2, 0, 1], [0, 1, 2]])
    for row, replicate in zip(counts, table.resampled(counts)[:, 0]):
        drawn = [item for item, times in zip(candidates, row) for _ in range(times)]
        again = bleu4(
            dict(enumerate(candidates[item] for item in drawn)), dict(enumerate(references[item] for item in drawn))
        )
        assert replicate == pytest.approx(again.score, rel=1e-12)


def test_figure_has_the_seed_mean_and_sample_spread_and_an_interval_around_it() -> None:
    result = figure(HITS)
    per_seed = HITS.values[:, :, 0].mean(axis=1)
    assert result.mean == pytest.approx(per_seed.mean()) and result.spread == pytest.approx(per_seed.std(ddof=1))
    assert result.low < result.mean < result.high
    assert result.high - result.low < 0.3  # 120 hits at ~0.3: a standard error near 0.04


def test_the_bootstrap_is_deterministic_under_its_seed_and_moves_with_it() -> None:
    shifted = ItemTable(np.clip(HITS.values + RNG.normal(0.1, 0.3, HITS.values.shape), 0, 1))
    first, again = difference(shifted, HITS), difference(shifted, HITS)
    assert first == again and figure(HITS) == figure(HITS)
    assert difference(shifted, HITS, BootstrapSettings(seed=1)) != first
    wider = difference(shifted, HITS, BootstrapSettings(confidence=0.99))
    assert wider.low <= first.low and wider.high >= first.high


def test_an_evaluation_report_layout_becomes_tables() -> None:
    document = {
        "items": ["u1", "u2"],
        "per_item": {
            "1": {"i2t_r1": [1, 0], "t2i_r1": [[1, 2], [0, 1]]},
            "0": {"i2t_r1": [1, 1], "t2i_r1": [[2, 2], [1, 1]]},
        },
        "item_statistics": {"t2i_r1": RATIO},
    }
    tables = item_tables(document)
    assert tables["i2t_r1"].per_seed().tolist() == [1.0, 0.5]  # seeds in numeric order
    assert tables["t2i_r1"].statistic == RATIO and tables["t2i_r1"].per_seed().tolist() == [1.0, 1 / 3]


def test_bad_tables_are_named() -> None:
    with pytest.raises(ValueError, match="same seeds and items"):
        difference(HITS, ItemTable(HITS.values[:, :10, 0]))
    with pytest.raises(ValueError, match="ratio takes 2 value"):
        ItemTable(np.ones((1, 3)), RATIO)
    with pytest.raises(ValueError, match="denominators must be positive"):
        ItemTable(np.array([[[1, 2], [0, 0]]]), RATIO)
    with pytest.raises(ValueError, match="unknown item statistic"):
        ItemTable(np.ones((1, 3)), "median")
    with pytest.raises(ValueError, match="finite"):
        ItemTable(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="at least one resample"):
        BootstrapSettings(resamples=0)
    with pytest.raises(ValueError, match="3 per-item values for 2 items"):
        item_tables({"items": ["a", "b"], "per_item": {"0": {"top1": [1, 0, 1]}}})
