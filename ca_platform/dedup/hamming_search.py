"""Exact search for 64-bit hashes within a Hamming radius, without comparing every pair: multi-index hashing.

Pigeonhole: split the 64 bits into m bands; two hashes within t bits differ in at most t bands, so they agree
exactly on at least m - t of them. Every pair within t is therefore equal on the concatenated key of some
(m - t)-subset of the bands: sort by each subset's key and compare only hashes whose keys are equal, then
verify the Hamming distance. Nothing within t is missed; what the keys let through and the check rejects is
the only waste.

m = t + 1 (agree on one band of 64 / (t + 1) bits) is the classic split, and the cheapest for small pools. It
stops being cheap when the pool outgrows a band: at t = 6 a band has 9 bits, so 10^7 random hashes fall into
buckets of 20,000 and each band costs 10^7 x 20,000 / 2 comparisons. More, shorter bands make longer keys
(3 of 9 bands: 21 bits, buckets of 5) at the price of more sorts (C(9, 3) = 84); `plan_bands` picks m by
that trade for the pool's size. Each sort packs the key and the row into one uint64 and sorts values, several
times faster in numpy than an argsort.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np

HASH_BITS = 64
# Costs of the search in ns, per row and subset (key, pack, sort, find the runs) and per candidate pair the keys
# let through, measured on the 2-core development machine at 10^6 to 3 x 10^6 rows: only their ratio steers the plan.
SORT_COST_PER_ROW = 65.0
COMPARE_COST_PER_PAIR = 60.0

IntArray = np.ndarray


def _band_edges(bands: int) -> list[tuple[int, int]]:
    """(shift, width) of each band: 64 bits in `bands` contiguous bands whose widths differ by at most one."""
    widths = [HASH_BITS // bands + (1 if band < HASH_BITS % bands else 0) for band in range(bands)]
    shifts = np.concatenate([[0], np.cumsum(widths)[:-1]])
    return [(int(shift), width) for shift, width in zip(shifts, widths)]


def _key_bits(bands: int, max_bits: int, index_bits: int) -> int:
    """Bits of the narrowest (m - t)-band key, at most what fits beside the row index: what the plan expects."""
    return min((bands - max_bits) * (HASH_BITS // bands), HASH_BITS - index_bits)


def plan_bands(rows: int, max_bits: int, pairs_per_key: float | None = None) -> int:
    """The number of bands m (> max_bits) with the least expected work for `rows` uniformly spread hashes.

    Work per (m - t)-subset: a sort of the rows plus the candidates its keys let through, rows^2 / 2 / 2^bits
    for a search within one set; `pairs_per_key` replaces rows / 2 by the size of the other set when searching
    one set against another (rows x other / 2^bits).
    """
    if not 0 <= max_bits < HASH_BITS:
        raise ValueError(f"max_bits must be in [0, {HASH_BITS - 1}], got {max_bits}")
    index_bits = max(1, int(rows - 1).bit_length())
    others = rows / 2 if pairs_per_key is None else pairs_per_key
    best_bands, best_cost = max_bits + 1, math.inf
    for bands in range(max_bits + 1, HASH_BITS + 1):
        subsets = math.comb(bands, bands - max_bits)
        sorting = subsets * SORT_COST_PER_ROW * rows
        if sorting >= best_cost:
            break  # more bands only add subsets from here on
        key_bits = _key_bits(bands, max_bits, index_bits)
        cost = sorting + subsets * COMPARE_COST_PER_PAIR * rows * others / 2.0**key_bits
        if cost < best_cost:
            best_bands, best_cost = bands, cost
    return best_bands


def _merged(edges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent bands as one (shift, width) range, so a key of neighbouring bands costs one extraction."""
    merged: list[tuple[int, int]] = []
    for shift, width in edges:
        if merged and merged[-1][0] + merged[-1][1] == shift:
            merged[-1] = (merged[-1][0], merged[-1][1] + width)
        else:
            merged.append((shift, width))
    return merged


def _compacted(values: np.ndarray, edges: list[tuple[int, int]], max_width: int) -> tuple[np.ndarray, int]:
    """The bits of the bands at `edges`, side by side in a uint64 from bit 0, at most `max_width` of them (the
    last band cut from its top), and how many. In place on two buffers: fresh arrays per step cost more than
    the bit operations."""
    field = np.zeros(len(values), dtype=np.uint64)
    part = np.empty_like(field)
    used = 0
    for shift, width in _merged(edges):
        width = min(width, max_width - used)
        if width <= 0:
            break
        np.right_shift(values, np.uint64(shift), out=part)
        np.bitwise_and(part, np.uint64((1 << width) - 1), out=part)
        np.left_shift(part, np.uint64(used), out=part)
        np.bitwise_or(field, part, out=field)
        used += width
    return field, used


def _window_outside(subset_bits: set[int], width: int) -> int:
    """The first bit of the cyclic window of `width` bits that shares the fewest bits with the key's."""
    overlaps = [sum((start + bit) % HASH_BITS in subset_bits for bit in range(width)) for start in range(HASH_BITS)]
    return int(np.argmin(overlaps))


def _packed_subsets(
    values: np.ndarray, bands: int, max_bits: int, index_bits: int
) -> Iterator[tuple[np.ndarray, np.uint64, np.uint64]]:
    """Per (m - t)-subset of the bands: one uint64 per row, `key | extra | row index` from the top bit down,
    with the shift to the key and the mask of the extra field.

    Sorting these values groups rows by key. The key is cut to what fits beside the index (a coarser key only
    lets more candidates through, so the search stays exact); the bits left over carry a window of the hash
    mostly outside the key, on which a pair within the radius differs by at most the radius too.
    """
    edges = _band_edges(bands)
    rows = np.arange(len(values), dtype=np.uint64)
    extra = np.empty_like(values)
    spare = np.empty_like(values)
    for subset in itertools.combinations(range(bands), bands - max_bits):
        chosen = [edges[band] for band in subset]
        packed, key_width = _compacted(values, chosen, HASH_BITS - index_bits)
        extra_width = HASH_BITS - index_bits - key_width
        key_shift = np.uint64(index_bits + extra_width)
        np.left_shift(packed, key_shift, out=packed)
        extra_mask = np.uint64(((1 << extra_width) - 1) << index_bits)
        if extra_width:
            subset_bits = {shift + bit for shift, width in chosen for bit in range(width)}
            start = _window_outside(subset_bits, extra_width)
            # rotate right by `start`, so the window's bits come first, then move them above the index
            np.right_shift(values, np.uint64(start), out=extra)
            if start:
                np.left_shift(values, np.uint64(HASH_BITS - start), out=spare)
                np.bitwise_or(extra, spare, out=extra)
            np.left_shift(extra, np.uint64(index_bits), out=extra)
            np.bitwise_and(extra, extra_mask, out=extra)
            np.bitwise_or(packed, extra, out=packed)
        np.bitwise_or(packed, rows, out=packed)
        yield packed, key_shift, extra_mask


def _subset_keys(values: np.ndarray, bands: int, max_bits: int) -> Iterator[np.ndarray]:
    """The uint64 key of every (m - t)-subset of the bands (at most 64 bits)."""
    edges = _band_edges(bands)
    for subset in itertools.combinations(range(bands), bands - max_bits):
        yield _compacted(values, [edges[band] for band in subset], HASH_BITS)[0]


def _as_uint64(hashes: np.ndarray | list[int]) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(hashes, dtype=np.int64)).view(np.uint64)


def _pair_codes(left: IntArray, right: IntArray, count: int) -> IntArray:
    """Each unordered pair once, as the int64 code min * count + max: pairs found by several subsets collapse."""
    low, high = np.minimum(left, right), np.maximum(left, right)
    return np.unique(low * count + high)


def identical_values(values: np.ndarray) -> tuple[IntArray, IntArray, IntArray]:
    """(distinct rows, repeated rows, first row of each repeated row's value) of uint64 values: every row whose
    value an earlier row holds, with that earlier row, and the rows left when they are taken out.

    Identical hashes are collapsed before the banded search (they would make one long run in every subset):
    only each value's first row takes part, the others are paired with it directly. Found with one sort of the
    values and a search among the repeated ones, which are few, instead of an argsort of all of them.
    """
    count = len(values)
    ordered = np.sort(values)
    repeated_values = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if len(repeated_values) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return np.arange(count, dtype=np.int64), empty, empty
    position = np.minimum(np.searchsorted(repeated_values, values), len(repeated_values) - 1)
    rows = np.flatnonzero(repeated_values[position] == values)
    codes = position[rows]
    first_of_code = np.full(len(repeated_values), count, dtype=np.int64)
    np.minimum.at(first_of_code, codes, rows)
    first = first_of_code[codes]
    later = rows != first
    distinct = np.ones(count, dtype=bool)
    distinct[rows[later]] = False
    return np.flatnonzero(distinct), rows[later], first[later]


def near_pairs(
    hashes: np.ndarray | list[int], max_bits: int, bands: int | None = None
) -> tuple[IntArray, IntArray, IntArray]:
    """(i, j, distance), i < j, sorted: the edges of a graph whose connected components are those of "within
    `max_bits`", at a size linear in the rows and exact (no pair within the radius is missed).

    Each hash value is represented by its first row: every pair of distinct values within `max_bits` appears once,
    between those first rows, and every later row holding a value is paired with its first row (distance 0). The
    rows of two values within the radius are all linked through them, without the product of their counts.

    Equal-key runs are compared vectorised: position p with p + d for d = 1, 2, ... while some run is longer
    than d, the set of positions still inside a run shrinking as d grows. `bands` overrides `plan_bands`.
    """
    values = _as_uint64(hashes)
    distinct, repeated, first = identical_values(values)
    lefts, rights, distances = [first], [repeated], [np.zeros(len(repeated), dtype=np.int64)]
    searched = values[distinct]
    size = len(searched)
    if max_bits > 0 and size > 1:
        bands = bands if bands is not None else plan_bands(size, max_bits)
        if not max_bits < bands <= HASH_BITS:
            raise ValueError(f"bands must be in ({max_bits}, {HASH_BITS}] for max_bits {max_bits}, got {bands}")
        index_bits = max(1, int(size - 1).bit_length())
        index_mask = np.uint64((1 << index_bits) - 1)
        found_left, found_right = [], []
        for packed, key_shift, extra_mask in _packed_subsets(searched, bands, max_bits, index_bits):
            packed.sort()
            active = np.flatnonzero(((packed[1:] ^ packed[:-1]) >> key_shift) == 0)
            step = 1
            while len(active):
                # The packed extra bits are a free lower bound on the distance: gather only what passes it.
                differing = (packed[active] ^ packed[active + step]) & extra_mask
                candidates = active[np.bitwise_count(differing) <= max_bits]
                left = (packed[candidates] & index_mask).astype(np.int64)
                right = (packed[candidates + step] & index_mask).astype(np.int64)
                close = np.bitwise_count(searched[left] ^ searched[right]) <= max_bits
                found_left.append(left[close])
                found_right.append(right[close])
                step += 1
                active = active[active + step < size]
                active = active[((packed[active] ^ packed[active + step]) >> key_shift) == 0]
        if found_left:
            codes = _pair_codes(np.concatenate(found_left), np.concatenate(found_right), size)
            left_local, right_local = codes // size, codes % size
            lefts.append(distinct[left_local])
            rights.append(distinct[right_local])
            distances.append(np.bitwise_count(searched[left_local] ^ searched[right_local]).astype(np.int64))
    left, right, distance = np.concatenate(lefts), np.concatenate(rights), np.concatenate(distances)
    low, high = np.minimum(left, right), np.maximum(left, right)
    order = np.lexsort((high, low))
    return low[order], high[order], distance[order]


def closest_near(
    hashes: np.ndarray | list[int], references: np.ndarray | list[int], max_bits: int, bands: int | None = None
) -> tuple[IntArray, IntArray, IntArray]:
    """(row, reference row, distance) for every row of `hashes` with a reference hash within `max_bits`: its
    closest reference, ties to the lowest reference row; exact, sorted by row.

    For a pool against a small reference set (evaluation images): per (m - t)-subset the references are sorted
    by key and each pool hash finds its equal-key range by binary search, so the work is a pass over the pool
    per subset plus the candidates, pool x references / 2^bits of them.
    """
    values = _as_uint64(hashes)
    reference_values, first_reference = np.unique(_as_uint64(references), return_index=True)
    count, size = len(values), len(reference_values)
    found_rows, found_references = [], []
    if count and size:
        bands = bands if bands is not None else plan_bands(count, max_bits, pairs_per_key=size)
        if not max_bits < bands <= HASH_BITS:
            raise ValueError(f"bands must be in ({max_bits}, {HASH_BITS}] for max_bits {max_bits}, got {bands}")
        for row_keys, reference_keys in zip(
            _subset_keys(values, bands, max_bits), _subset_keys(reference_values, bands, max_bits)
        ):
            order = np.argsort(reference_keys, kind="stable")
            sorted_keys = reference_keys[order]
            start = np.searchsorted(sorted_keys, row_keys, side="left")
            matches = np.searchsorted(sorted_keys, row_keys, side="right") - start
            rows = np.flatnonzero(matches)
            if len(rows) == 0:
                continue
            repeats = matches[rows]
            row_of_pair = np.repeat(rows, repeats)
            offset = np.arange(len(row_of_pair)) - np.repeat(np.cumsum(repeats) - repeats, repeats)
            reference_of_pair = order[start[row_of_pair] + offset]
            close = np.bitwise_count(values[row_of_pair] ^ reference_values[reference_of_pair]) <= max_bits
            found_rows.append(row_of_pair[close])
            found_references.append(reference_of_pair[close])
    if not found_rows:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    rows = np.concatenate(found_rows)
    references_found = first_reference[np.concatenate(found_references)].astype(np.int64)
    reference_hashes = _as_uint64(references)[references_found]
    distance = np.bitwise_count(values[rows] ^ reference_hashes).astype(np.int64)
    order = np.lexsort((references_found, distance, rows))
    rows, references_found, distance = rows[order], references_found[order], distance[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    return rows[first], references_found[first], distance[first]
