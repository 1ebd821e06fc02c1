"""Semantic duplicates among L2-normalised embeddings without comparing every pair: cluster, then compare within.

As NeMo Curator's SemDeDup does: spherical k-means splits the embeddings, recursively until no cluster holds
more than `max_cluster_size`, and pairs are compared only inside a cluster, with one matrix product each. The
work is N x cluster size x d instead of N^2 x d. A pair whose two images land in different clusters is not
compared: near-identical embeddings almost always share their nearest centroid, and the few split at a
boundary are missed, by design. One addition: the clusters' central rows are searched again the same way, so
a blob of more near-identical images than a cluster holds still ends in one group.
"""

from __future__ import annotations

import math

import numpy as np

BRANCHING = 32  # at most this many children per split: k-means cost stays N x 32 x d per level
KMEANS_ITERATIONS = 12
SAMPLE_PER_CENTROID = 64  # k-means is fitted on a sample of k x 64 rows, then every row is assigned
MOST_KEPT_BY_ONE_CHILD = 0.9  # a split leaving more than this in one child made no progress (near-identical rows)
ASSIGN_CHUNK_ROWS = 65536
SIMILARITY_CHUNK_ELEMENTS = 1 << 22  # rows x references per block of a chunked product (16 MiB of float32)


def normalised(embeddings: np.ndarray) -> np.ndarray:
    """Rows at unit length (float32), so cosine similarity is a dot product; rows already there are returned as
    they are, without a copy."""
    matrix = np.asarray(embeddings, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array, got shape {matrix.shape}")
    squared = np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64)  # no temporary of the matrix's size
    if not np.isfinite(squared).all():
        raise ValueError(f"embedding row {int(np.flatnonzero(~np.isfinite(squared))[0])} is not finite")
    if len(squared) and not np.all(squared > 0):
        raise ValueError(f"embedding row {int(np.argmin(squared))} is all zeros: it has no direction")
    if np.allclose(squared, 1.0, rtol=0, atol=1e-5):
        return matrix
    return matrix / np.sqrt(squared).astype(np.float32)[:, None]


def _nearest_centroid(vectors: np.ndarray, rows: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    labels = np.empty(len(rows), dtype=np.int64)
    for start in range(0, len(rows), ASSIGN_CHUNK_ROWS):
        chunk = vectors[rows[start : start + ASSIGN_CHUNK_ROWS]]
        labels[start : start + len(chunk)] = np.argmax(chunk @ centroids.T, axis=1)
    return labels


def _spherical_kmeans(sample: np.ndarray, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """Unit centroids [clusters, d] of the sample: k-means++ seeding, then Lloyd iterations on cosine."""
    first = int(rng.integers(len(sample)))
    centroids = [sample[first]]
    farthest = 1.0 - sample @ sample[first]
    for _ in range(1, clusters):
        weights = np.maximum(farthest, 0.0).astype(np.float64) ** 2
        total = weights.sum()
        chosen = int(rng.choice(len(sample), p=weights / total)) if total > 0 else int(rng.integers(len(sample)))
        centroids.append(sample[chosen])
        farthest = np.minimum(farthest, 1.0 - sample @ sample[chosen])
    centre = np.stack(centroids)
    for _ in range(KMEANS_ITERATIONS):
        similarity = sample @ centre.T
        labels = np.argmax(similarity, axis=1)
        membership = np.zeros((clusters, len(sample)), dtype=np.float32)
        membership[labels, np.arange(len(sample))] = 1.0
        sums = membership @ sample
        counts = np.bincount(labels, minlength=clusters)
        empty = np.flatnonzero(counts == 0)
        if len(empty):  # reseed an empty cluster at the rows worst served by their centroid
            worst = np.argsort(similarity[np.arange(len(sample)), labels], kind="stable")[: len(empty)]
            sums[empty[: len(worst)]] = sample[worst]
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        centre = np.where(norms > 0, sums / np.maximum(norms, 1e-12), centre)
    return centre.astype(np.float32)


def _projection_windows(vectors: np.ndarray, rows: np.ndarray, size: int, rng: np.random.Generator) -> list:
    """Windows of `size` rows, half overlapping, along a random direction: for rows k-means cannot split (nearly
    one point), so neighbours share a window and overlapping windows chain one group across them."""
    direction = rng.standard_normal(vectors.shape[1]).astype(np.float32)
    ordered = rows[np.argsort(vectors[rows] @ direction, kind="stable")]
    stride = max(1, size // 2)
    return [ordered[start : start + size] for start in range(0, max(1, len(ordered) - size + stride), stride)]


def embedding_clusters(embeddings: np.ndarray, max_cluster_size: int, seed: int = 0) -> list[np.ndarray]:
    """Row indices of clusters of at most `max_cluster_size` rows covering every row: recursive spherical
    k-means, deterministic for a seed and the row order.

    Each split fits k = min(32, 2 x rows / max_cluster_size) centroids on a sample and assigns every row, so a
    level costs rows x k x d. Rows k-means cannot split (many near-identical embeddings) are cut into
    half-overlapping windows along a random direction instead.
    """
    if max_cluster_size < 2:
        raise ValueError(f"max_cluster_size must be at least 2, got {max_cluster_size}")
    vectors = normalised(embeddings)
    rng = np.random.default_rng(seed)
    pending = [np.arange(len(vectors), dtype=np.int64)]
    clusters: list[np.ndarray] = []
    while pending:
        rows = pending.pop()
        if len(rows) <= max_cluster_size:
            if len(rows):
                clusters.append(rows)
            continue
        k = min(BRANCHING, max(2, math.ceil(2 * len(rows) / max_cluster_size)))
        sample_size = min(len(rows), k * SAMPLE_PER_CENTROID)
        sample = np.sort(rng.choice(rows, sample_size, replace=False)) if sample_size < len(rows) else rows
        centroids = _spherical_kmeans(vectors[sample], k, rng)
        labels = _nearest_centroid(vectors, rows, centroids)
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(k + 1))
        children = [rows[order[bounds[c] : bounds[c + 1]]] for c in range(k) if bounds[c + 1] > bounds[c]]
        if max(len(child) for child in children) > MOST_KEPT_BY_ONE_CHILD * len(rows):
            clusters.extend(_projection_windows(vectors, rows, max_cluster_size, rng))
            continue
        pending.extend(reversed(children))
    return clusters


def semantic_pairs(
    embeddings: np.ndarray, min_cosine: float, max_cluster_size: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, cosine), i < j, sorted, of pairs with cosine >= `min_cosine`: every such pair inside a cluster of
    `embedding_clusters`, plus those among the clusters' central rows, searched the same way.

    The second pass links clusters that cut through one dense blob (more near-identical images than a cluster
    holds), at the cost of a search over one row per cluster. Other pairs split across clusters are missed,
    by design (see the module).
    """
    vectors = normalised(embeddings)
    count = len(vectors)
    found_left, found_right = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    central = []
    for rows in embedding_clusters(vectors, max_cluster_size, seed):
        members = vectors[rows]
        similarity = members @ members.T
        left, right = np.nonzero(similarity >= min_cosine)
        upper = left < right  # each pair once, not with itself
        found_left.append(rows[left[upper]])
        found_right.append(rows[right[upper]])
        central.append(rows[int(np.argmax(similarity.sum(axis=1)))])
    if 1 < len(central) < count:
        centres = np.asarray(central, dtype=np.int64)
        left, right, _ = semantic_pairs(vectors[centres], min_cosine, max_cluster_size, seed)
        found_left.append(centres[left])
        found_right.append(centres[right])
    left, right = np.concatenate(found_left), np.concatenate(found_right)
    low, high = np.minimum(left, right), np.maximum(left, right)
    codes = np.unique(low * max(count, 1) + high)  # overlapping windows and the second pass can repeat a pair
    low, high = codes // max(count, 1), codes % max(count, 1)
    cosine = np.einsum("ij,ij->i", vectors[low], vectors[high]).astype(np.float64)
    return low, high, cosine


def closest_semantic(
    embeddings: np.ndarray, references: np.ndarray, min_cosine: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, reference row, cosine) for every row with a reference at cosine >= `min_cosine`: its most similar
    reference, ties to the lowest reference row; sorted by row.

    A chunked matrix product over all references: reference sets (evaluation images) are small, 10^3 to 10^5,
    and E x d multiply-adds per pool image (10^7 for 10^4 references of 512 dimensions) is under 1% of the image
    tower forward pass that made the embedding (a ViT-B/32 is about 4.4 GFLOP), so clustering would save little.
    """
    vectors, reference_vectors = normalised(embeddings), normalised(references)
    if len(vectors) == 0 or len(reference_vectors) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float64)
    chunk = max(1, SIMILARITY_CHUNK_ELEMENTS // len(reference_vectors))
    rows, best, cosines = [], [], []
    for start in range(0, len(vectors), chunk):
        similarity = vectors[start : start + chunk] @ reference_vectors.T
        nearest = np.argmax(similarity, axis=1)
        value = similarity[np.arange(len(similarity)), nearest]
        hit = np.flatnonzero(value >= min_cosine)
        rows.append(hit + start)
        best.append(nearest[hit])
        cosines.append(value[hit].astype(np.float64))
    return np.concatenate(rows).astype(np.int64), np.concatenate(best).astype(np.int64), np.concatenate(cosines)
