"""Semantic search within k-means clusters: bounded clusters covering every row, planted near-identical
embeddings found across many clusters, evaluation matches against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from ca_platform.dedup.embedding_search import closest_semantic, embedding_clusters, semantic_pairs


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def clustered_embeddings(count: int, dimensions: int, seed: int) -> np.ndarray:
    """Embeddings around 40 topics, as image embeddings cluster by content."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((40, dimensions))
    return unit(topics[rng.integers(0, 40, count)] + 0.5 * rng.standard_normal((count, dimensions)))


def with_planted_pairs(embeddings: np.ndarray, pairs: int, seed: int) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """`pairs` rows replaced by near-identical copies (cosine > 0.995) of as many other rows."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(embeddings))
    originals, copies = order[:pairs], order[pairs : 2 * pairs]
    planted = embeddings.copy()
    noise = 0.005 * rng.standard_normal((pairs, embeddings.shape[1]))
    planted[copies] = unit(embeddings[originals] + noise)
    return planted, {(int(min(a, b)), int(max(a, b))) for a, b in zip(originals, copies)}


def test_clusters_cover_every_row_once_within_the_size_bound() -> None:
    embeddings = clustered_embeddings(3000, 32, seed=0)
    clusters = embedding_clusters(embeddings, max_cluster_size=64, seed=0)
    assert max(len(cluster) for cluster in clusters) <= 64
    assert sorted(np.concatenate(clusters).tolist()) == list(range(3000))
    assert len(clusters) >= 3000 // 64


def test_planted_near_identical_embeddings_are_found_across_many_small_clusters() -> None:
    embeddings, planted = with_planted_pairs(clustered_embeddings(3000, 32, seed=1), 150, seed=2)
    left, right, cosine = semantic_pairs(embeddings, 0.97, max_cluster_size=64, seed=0)
    found = set(zip(left.tolist(), right.tolist()))
    # Exact within clusters: every reported pair is above the threshold, with its true cosine.
    true_cosine = np.einsum("ij,ij->i", embeddings[left], embeddings[right])
    np.testing.assert_allclose(cosine, true_cosine, rtol=1e-5)
    assert np.all(cosine >= 0.97)
    brute = {(int(a), int(b)) for a, b in zip(*np.nonzero(np.triu(embeddings @ embeddings.T >= 0.97, 1)))}
    assert found <= brute
    # A pair split by a cluster boundary is missed by design; near-identical pairs rarely are.
    assert len(planted & found) >= 0.97 * len(planted)
    assert len(brute - found) <= 0.03 * len(brute)


@pytest.mark.parametrize("spread", [0.0, 1e-4], ids=["identical", "near-identical"])
def test_a_blob_larger_than_a_cluster_still_ends_in_one_group(spread: float) -> None:
    """Identical rows, which k-means cannot split, go to overlapping windows; near-identical ones, which it
    splits, are linked again through the clusters' central rows."""
    rng = np.random.default_rng(3)
    one_point = unit(np.ones((1, 16)) + spread * rng.standard_normal((200, 16)))
    clusters = embedding_clusters(one_point, max_cluster_size=50, seed=0)
    assert max(len(cluster) for cluster in clusters) <= 50
    left, right, _ = semantic_pairs(one_point, 0.97, max_cluster_size=50, seed=0)
    # overlapping windows chain all 200 into one connected group
    parent = list(range(200))

    def root(node: int) -> int:
        while parent[node] != node:
            node = parent[node]
        return node

    for a, b in zip(left.tolist(), right.tolist()):
        parent[root(a)] = root(b)
    assert len({root(node) for node in range(200)}) == 1


def test_clusters_and_pairs_are_deterministic_for_a_seed() -> None:
    embeddings, _ = with_planted_pairs(clustered_embeddings(1000, 16, seed=4), 50, seed=5)
    first = semantic_pairs(embeddings, 0.97, 64, seed=11)
    second = semantic_pairs(embeddings, 0.97, 64, seed=11)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_closest_semantic_matches_brute_force() -> None:
    pool, _ = with_planted_pairs(clustered_embeddings(2000, 32, seed=6), 1, seed=7)
    references = clustered_embeddings(60, 32, seed=8)
    pool[:30] = unit(references[:30] + 0.003 * np.random.default_rng(9).standard_normal((30, 32)))
    references[59] = references[0]  # an identical reference: the lower row wins the tie
    rows, found, cosine = closest_semantic(pool, references, 0.97)
    similarity = pool @ references.T
    expected_rows = np.flatnonzero(similarity.max(axis=1) >= 0.97)
    assert rows.tolist() == expected_rows.tolist()
    assert found.tolist() == np.argmax(similarity[expected_rows], axis=1).tolist()
    np.testing.assert_allclose(cosine, similarity[expected_rows].max(axis=1), rtol=1e-6)
    assert set(range(30)) <= set(rows.tolist())
