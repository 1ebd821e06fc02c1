"""The banded pHash search against brute force: every pair within the radius found, none beyond it."""

from __future__ import annotations

import numpy as np
import pytest

from ca_platform.dedup.hamming_search import closest_near, near_pairs, plan_bands


def planted_hashes(count: int, seed: int) -> np.ndarray:
    """Random 64-bit hashes, a tenth of them overwritten by copies of others with 0 to 9 bits flipped (some
    copies of copies), so distances at and around every radius occur."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=count, dtype=np.int64, endpoint=True)
    unsigned = hashes.view(np.uint64)
    targets = rng.permutation(count)[: count // 10]
    for target in targets:
        flipped = rng.choice(64, int(rng.integers(0, 10)), replace=False)
        mask = np.bitwise_or.reduce(np.uint64(1) << flipped.astype(np.uint64)) if len(flipped) else np.uint64(0)
        unsigned[target] = unsigned[int(rng.integers(count))] ^ mask
    return hashes


def brute_force_distances(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    return np.bitwise_count(left.view(np.uint64)[:, None] ^ right.view(np.uint64)[None, :]).astype(np.int64)


@pytest.fixture(scope="module")
def hashes() -> np.ndarray:
    return planted_hashes(3000, seed=1)


@pytest.fixture(scope="module")
def distances(hashes: np.ndarray) -> np.ndarray:
    return brute_force_distances(hashes, hashes)


@pytest.mark.parametrize("max_bits", [0, 1, 3, 6, 8])
@pytest.mark.parametrize("bands", ["planned", "one more than the radius", "many"])
def test_near_pairs_link_exactly_the_pairs_within_the_radius(
    hashes: np.ndarray, distances: np.ndarray, max_bits: int, bands: str
) -> None:
    count = {"planned": None, "one more than the radius": max_bits + 1, "many": max_bits + 3}[bands]
    left, right, distance = near_pairs(hashes, max_bits, count)
    # Identical hashes are represented by their first row: map every row to it, then compare pair sets.
    _, first_index, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    first = first_index[inverse]
    expected = {(int(first[i]), int(first[j])) for i, j in zip(*np.nonzero(np.triu(distances <= max_bits, 1)))}
    expected = {(min(pair), max(pair)) for pair in expected if pair[0] != pair[1]}
    expected |= {(int(first[row]), row) for row in range(len(hashes)) if first[row] != row}
    found = set(zip(left.tolist(), right.tolist()))
    assert found == expected
    assert len(found) == len(left)  # each pair once
    assert np.all(left < right)
    assert distance.tolist() == distances[left, right].tolist()
    assert any(d == max_bits for d in distance.tolist()) or max_bits == 0  # the radius itself is included


def test_planned_bands_are_the_classic_split_for_small_pools_and_more_for_large() -> None:
    assert plan_bands(3000, 6) == 7  # t + 1 bands: one band must agree
    assert plan_bands(10**7, 6) > 7  # 9-bit bands would make buckets of 20,000
    assert plan_bands(10**7, 6, pairs_per_key=100) < plan_bands(10**7, 6)  # a small reference set: short keys do


def test_closest_near_finds_each_rows_closest_reference(hashes: np.ndarray) -> None:
    references = np.concatenate([hashes[:40], hashes[100:140]])
    references[5] = references[3]  # identical references: the lower row wins the tie
    rows, found, distance = closest_near(hashes, references, 6)
    distances = brute_force_distances(hashes, references)
    expected = []
    for row in range(len(hashes)):
        within = np.flatnonzero(distances[row] <= 6)
        if len(within):
            best = within[np.lexsort((within, distances[row, within]))[0]]
            expected.append((row, int(best), int(distances[row, best])))
    assert list(zip(rows.tolist(), found.tolist(), distance.tolist())) == expected
    assert len(expected) > 80  # the planted copies of references are among them


def test_empty_inputs_give_no_pairs() -> None:
    empty = np.zeros(0, dtype=np.int64)
    assert all(len(part) == 0 for part in near_pairs(empty, 6))
    assert all(len(part) == 0 for part in closest_near(empty, np.array([1, 2]), 6))
    assert all(len(part) == 0 for part in closest_near(np.array([1, 2]), empty, 6))
