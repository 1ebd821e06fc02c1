"""Duplicate groups of a pool and its decontamination against evaluation images, from image fingerprints.

A pool keeps one image of each duplicate group, the one whose raw caption the current reward model scores
highest (the pair the cut would rank first), and loses every image that matches an evaluation image, so that
evaluations measure generalisation and not memorised copies. Both run before any cut, and every input image
ends either kept or in the removals with its reason.

Three kinds of link, each found without comparing every pair: the same pixel hash (a group-by), pHashes within
`near_max_bits` (banded multi-index search, `hamming_search`) and embeddings at cosine >= `semantic_min_cosine`
(within clusters, `embedding_search`). Groups are the connected components of all links.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ca_platform import schemas
from ca_platform.dedup.embedding_search import closest_semantic, normalised, semantic_pairs
from ca_platform.dedup.fingerprints import hamming_distance
from ca_platform.dedup.hamming_search import HASH_BITS, closest_near, identical_values, near_pairs

# Largest allowed pHash threshold: random 64-bit hashes differ by 32 bits on average, so beyond 32 unrelated
# images match, and the banded search degrades towards comparing everything.
MAX_NEAR_BITS = HASH_BITS // 2
EVAL_UID = "eval_uid"
# One row per pool image that matches an evaluation image: the closest match, its kind and distance.
CONTAMINATION: Mapping[str, pl.DataType] = {
    schemas.UID: pl.String(),
    schemas.SHARD: pl.String(),
    EVAL_UID: pl.String(),
    "kind": pl.String(),  # one of schemas.DUPLICATE_KINDS
    "distance": pl.Float64(),  # in the kind's unit, as in schemas.DUPLICATES
}
_KIND_ORDER = {kind: rank for rank, kind in enumerate(schemas.DUPLICATE_KINDS)}  # exact < near < semantic
_ROW = "_row"
_GROUP = "_group"


@dataclass(frozen=True)
class DedupSettings:
    """What counts as a duplicate.

    `near_max_bits` = 4: in tests/dedup, copies resized (64 to 48 or 128 px) or recompressed (JPEG quality 95 to
    40) land within 4 bits of their originals, and from 128 px up so do copies both resized and recompressed;
    distinct images differ by 14 bits or more. Only 64 px thumbnails both shrunk and recompressed reach 6 bits
    (1-2% of them): `near_max_bits=6` catches those at about four times the search's cost at 10^7 rows (84
    band-subset sorts instead of 35). `semantic_min_cosine` = 0.97 keeps semantic links to near-identical
    embeddings (a lower value removes near-paraphrases of an image too, SemDeDup's trade of data for
    diversity); None turns semantic dedup off. `max_cluster_size` bounds the pairwise work per cluster (N x
    1024 x d in all).
    """

    near_max_bits: int | None = 4  # None: no pHash links (for flat drawings, whose pHashes collide)
    semantic_min_cosine: float | None = 0.97
    max_cluster_size: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.near_max_bits is not None:
            if isinstance(self.near_max_bits, bool) or not isinstance(self.near_max_bits, int):
                raise ValueError(f"near_max_bits must be an int or None, got {self.near_max_bits!r}")
            if not 0 <= self.near_max_bits <= MAX_NEAR_BITS:
                raise ValueError(
                    f"near_max_bits must be in [0, {MAX_NEAR_BITS}] (random pHashes differ by 32 bits), "
                    f"got {self.near_max_bits}"
                )
        cosine = self.semantic_min_cosine
        if cosine is not None and not (isinstance(cosine, int | float) and 0 < cosine <= 1):
            raise ValueError(f"semantic_min_cosine must be in (0, 1] or None (semantic dedup off), got {cosine!r}")
        if isinstance(self.max_cluster_size, bool) or not isinstance(self.max_cluster_size, int):
            raise ValueError(f"max_cluster_size must be an int, got {self.max_cluster_size!r}")
        if self.max_cluster_size < 2:
            raise ValueError(f"max_cluster_size must be at least 2, got {self.max_cluster_size}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")


@dataclass(frozen=True)
class Deduplication:
    """The outcome of `deduplicate`: the duplicate groups left after decontamination, the removals, and the
    evaluation matches behind the contamination removals."""

    duplicates: pl.DataFrame  # schemas.DUPLICATES
    removals: pl.DataFrame  # schemas.DEDUP_REMOVALS
    contamination: pl.DataFrame  # CONTAMINATION
    images: int  # pool images in

    def counts(self) -> dict[str, int]:
        """Images in, removals by kind, and images kept: the removal counts and kept add up to images."""
        removed_members = self.duplicates.filter(pl.col("kind").is_not_null())
        counts = {"images": self.images}
        for kind in schemas.DUPLICATE_KINDS:
            counts[f"{kind}_duplicates"] = removed_members.filter(pl.col("kind") == kind).height
        counts[schemas.EVAL_CONTAMINATION] = self.contamination.height
        counts["kept"] = self.images - self.removals.height
        return counts


def _fingerprints(frame: pl.DataFrame, what: str) -> pl.DataFrame:
    """`frame` conformed to schemas.IMAGE_FINGERPRINTS, checked, in (shard, uid) order: the canonical order
    every result is derived in, so the input's row order never matters."""
    frame = schemas.conform(frame, schemas.IMAGE_FINGERPRINTS)
    required = (schemas.UID, schemas.SHARD, schemas.PIXEL_HASH, schemas.PHASH)
    nulls = frame.select(pl.col(column).null_count() for column in required).row(0)
    for column, count in zip(required, nulls):
        if count:
            first = frame.filter(pl.col(column).is_null()).row(0, named=True)
            raise ValueError(
                f"{what}: {count} rows have no {column}, first: shard {first[schemas.SHARD]!r}, "
                f"uid {first[schemas.UID]!r}"
            )
    frame = frame.sort(schemas.SHARD, schemas.UID)
    # sorted, a repeated (shard, uid) is a row equal to the one before it: no hash table of every key
    repeated = frame.select(
        (pl.col(schemas.SHARD) == pl.col(schemas.SHARD).shift(1))
        & (pl.col(schemas.UID) == pl.col(schemas.UID).shift(1))
    ).to_series()
    if repeated.any():
        first = frame.filter(repeated).row(0, named=True)
        raise ValueError(
            f"{what}: {int(repeated.sum())} rows repeat a (shard, uid) of another row, first: shard "
            f"{first[schemas.SHARD]!r}, uid {first[schemas.UID]!r}"
        )
    return frame


def _embedding_version(frame: pl.DataFrame, what: str) -> str | None:
    """The one model version of the frame's embeddings (None when it has none): embeddings of two models do
    not compare."""
    embedded = frame.filter(pl.col(schemas.EMBEDDING).is_not_null())
    versions = embedded[schemas.EMBEDDING_MODEL_VERSION].unique().sort(nulls_last=True).to_list()
    if len(versions) > 1 or None in versions:
        raise ValueError(f"{what}: embeddings must come from one model version, got {versions}")
    return versions[0] if versions else None


def _embeddings(frame: pl.DataFrame, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows that have an embedding, their unit-length embeddings [rows, d])."""
    lengths = frame[schemas.EMBEDDING].list.len()
    rows = np.flatnonzero(lengths.is_not_null().to_numpy())
    if len(rows) == 0:
        return rows.astype(np.int64), np.zeros((0, 0), dtype=np.float32)
    present = lengths.gather(rows)
    width = int(present[0])
    wrong = np.flatnonzero(present.to_numpy() != width)
    if len(wrong) or width == 0:
        row = frame.row(int(rows[wrong[0] if len(wrong) else 0]), named=True)
        raise ValueError(
            f"{what}: embeddings must all have one length ({width} first), shard {row[schemas.SHARD]!r} uid "
            f"{row[schemas.UID]!r} has {len(row[schemas.EMBEDDING])}"
        )
    flat = frame[schemas.EMBEDDING].gather(rows).explode().to_numpy().astype(np.float32, copy=False)
    return rows.astype(np.int64), normalised(flat.reshape(len(rows), width))


def _with_scores(members: pl.DataFrame, scores: pl.DataFrame) -> pl.DataFrame:
    """`members` with their `score` (null when missing or NaN). Only group members' scores are looked at, so a
    pool-wide scores frame is joined, not indexed; a member with two scores is an error, as its rank would be
    ambiguous."""
    missing = [column for column in (schemas.UID, schemas.SHARD, "score") if column not in scores.columns]
    if missing:
        raise ValueError(f"scores lack columns {missing} (have {scores.columns})")
    keys = [schemas.SHARD, schemas.UID]
    selected = scores.select(
        pl.col(schemas.UID).cast(pl.String),
        pl.col(schemas.SHARD).cast(pl.String),
        pl.col("score").cast(pl.Float64).fill_nan(None),
    ).join(members.select(keys), on=keys, how="semi")  # hashes the few members, not every score
    scored = members.join(selected, on=keys, how="left")
    if scored.height != members.height:
        repeated = scored.filter(pl.struct(schemas.SHARD, schemas.UID).is_duplicated())
        first = repeated.row(0, named=True)
        raise ValueError(
            f"scores: {repeated.height} rows share a (shard, uid), first: shard {first[schemas.SHARD]!r}, uid "
            f"{first[schemas.UID]!r}; pass one score per image (the raw caption's, current reward model)"
        )
    return scored


def _exact_links(pool: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(first row, later row) for every row whose pixel hash an earlier row holds.

    The strings are hashed to 64 bits and compared with one numpy sort; only the rows whose 64-bit value
    repeats are grouped by the strings themselves, so a collision cannot link two images.
    """
    _, repeated, first = identical_values(pool[schemas.PIXEL_HASH].hash(seed=0).to_numpy())
    candidates = np.unique(np.concatenate([repeated, first]))
    if len(candidates) == 0:
        return first, repeated
    subset = pl.DataFrame(
        {_ROW: candidates, schemas.PIXEL_HASH: pool[schemas.PIXEL_HASH].gather(candidates)}
    ).with_columns(pl.col(_ROW).min().over(schemas.PIXEL_HASH).alias("first"))
    linked = subset.filter(pl.col(_ROW) != pl.col("first"))
    return linked["first"].to_numpy(), linked[_ROW].to_numpy()


def _components(rows: int, links: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Component label of each row under the links (rows without links are their own component)."""
    left = np.concatenate([pair[0] for pair in links] + [np.zeros(0, dtype=np.int64)])
    right = np.concatenate([pair[1] for pair in links] + [np.zeros(0, dtype=np.int64)])
    graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(rows, rows)).tocsr()
    return connected_components(graph, directed=False)[1]


def _duplicate_groups(pool: pl.DataFrame, scores: pl.DataFrame, settings: DedupSettings) -> pl.DataFrame:
    """schemas.DUPLICATES of a pool already in canonical form (see `_fingerprints`)."""
    rows = pool.height
    if rows < 2:
        return schemas.empty(schemas.DUPLICATES)
    links = [_exact_links(pool)]
    phashes = pool[schemas.PHASH].to_numpy()
    if settings.near_max_bits is not None:
        near_left, near_right, _ = near_pairs(phashes, settings.near_max_bits)
        links.append((near_left, near_right))
    embedded_rows, embeddings = np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    min_cosine = settings.semantic_min_cosine
    if min_cosine is not None:
        _embedding_version(pool, "pool")
        embedded_rows, embeddings = _embeddings(pool, "pool")
        if len(embedded_rows) > 1:
            left, right, _ = semantic_pairs(embeddings, min_cosine, settings.max_cluster_size, settings.seed)
            links.append((embedded_rows[left], embedded_rows[right]))
    labels = _components(rows, links)
    sizes = np.bincount(labels, minlength=rows)
    grouped = np.flatnonzero(sizes[labels] >= 2)
    if len(grouped) == 0:
        return schemas.empty(schemas.DUPLICATES)

    members = (
        pool.select(schemas.UID, schemas.SHARD)[grouped]
        .with_columns(pl.Series(_ROW, grouped, dtype=pl.Int64), pl.Series(_GROUP, labels[grouped], dtype=pl.Int64))
        .pipe(_with_scores, scores)
        .sort([_GROUP, "score", schemas.UID, schemas.SHARD], descending=[False, True, False, False], nulls_last=True)
        .with_columns(
            pl.col(_ROW).first().over(_GROUP).alias("representative_row"),
            pl.col(schemas.UID).first().over(_GROUP).alias("representative_uid"),
            pl.col(schemas.SHARD).first().over(_GROUP).alias("representative_shard"),
        )
        .with_columns(pl.format("{}/{}", "representative_shard", "representative_uid").alias("group_id"))
    )
    member_rows = members[_ROW].to_numpy()
    representative_rows = members["representative_row"].to_numpy()
    pixel_hashes = pool[schemas.PIXEL_HASH]
    same_pixels = (pixel_hashes.gather(member_rows) == pixel_hashes.gather(representative_rows)).to_numpy()
    bits = np.asarray(hamming_distance(phashes[member_rows], phashes[representative_rows]), dtype=np.int64)
    position = np.full(rows, -1, dtype=np.int64)
    position[embedded_rows] = np.arange(len(embedded_rows))
    member_at, representative_at = position[member_rows], position[representative_rows]
    both_embedded = (min_cosine is not None) & (member_at >= 0) & (representative_at >= 0)
    cosine = np.zeros(len(member_rows), dtype=np.float64)
    if both_embedded.any():
        cosine[both_embedded] = np.einsum(
            "ij,ij->i", embeddings[member_at[both_embedded]], embeddings[representative_at[both_embedded]]
        )
    is_representative = member_rows == representative_rows
    near_max_bits = settings.near_max_bits
    near = bits <= near_max_bits if near_max_bits is not None else np.zeros(len(bits), dtype=bool)
    # Linked only through a chain, a member can be farther from the representative than any threshold: it is
    # then semantic when both have embeddings (1 - cosine), else near (the differing bits). Lowest priority first:
    kind = np.full(len(member_rows), schemas.NEAR_DUPLICATE, dtype=object)
    distance = bits.astype(np.float64)
    chained_semantic = both_embedded & ~near
    kind[chained_semantic] = schemas.SEMANTIC_DUPLICATE
    distance[chained_semantic] = 1.0 - cosine[chained_semantic]
    kind[same_pixels] = schemas.EXACT_DUPLICATE
    distance[same_pixels] = 0.0
    kind[is_representative] = None
    distance[is_representative] = 0.0
    duplicates = members.with_columns(
        pl.Series("kind", kind.tolist(), dtype=pl.String), pl.Series("distance", distance, dtype=pl.Float64)
    ).sort("group_id", pl.col("kind").is_not_null(), schemas.SHARD, schemas.UID)
    return schemas.conform(duplicates, schemas.DUPLICATES)


def _contaminated(pool: pl.DataFrame, evaluation: pl.DataFrame, settings: DedupSettings) -> pl.DataFrame:
    """CONTAMINATION of a canonical pool against canonical evaluation fingerprints."""
    if pool.height == 0 or evaluation.height == 0:
        return schemas.empty(CONTAMINATION)
    evaluation = evaluation.sort(schemas.UID, schemas.SHARD)  # reference row order = eval uid order, for ties
    candidates = []

    eval_pixels = evaluation.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("reference"), schemas.PIXEL_HASH)
    exact = (
        pool.select(pl.int_range(pl.len(), dtype=pl.Int64).alias(_ROW), schemas.PIXEL_HASH)
        .join(eval_pixels.group_by(schemas.PIXEL_HASH).agg(pl.col("reference").min()), on=schemas.PIXEL_HASH)
        .select(_ROW, "reference")
    )
    candidates.append((exact[_ROW].to_numpy(), exact["reference"].to_numpy(), schemas.EXACT_DUPLICATE, 0.0))

    if settings.near_max_bits is not None:
        rows, references, bits = closest_near(
            pool[schemas.PHASH].to_numpy(), evaluation[schemas.PHASH].to_numpy(), settings.near_max_bits
        )
        candidates.append((rows, references, schemas.NEAR_DUPLICATE, bits.astype(np.float64)))

    if settings.semantic_min_cosine is not None:
        pool_version = _embedding_version(pool, "pool")
        eval_version = _embedding_version(evaluation, "evaluation")
        if pool_version is not None and eval_version is not None:
            if pool_version != eval_version:
                raise ValueError(
                    f"pool embeddings are of model version {pool_version!r}, evaluation embeddings of "
                    f"{eval_version!r}: embed both with the same model"
                )
            pool_rows, pool_embeddings = _embeddings(pool, "pool")
            eval_rows, eval_embeddings = _embeddings(evaluation, "evaluation")
            if pool_embeddings.shape[1] != eval_embeddings.shape[1]:
                raise ValueError(
                    f"pool embeddings have {pool_embeddings.shape[1]} dimensions, evaluation embeddings "
                    f"{eval_embeddings.shape[1]}"
                )
            rows, references, cosine = closest_semantic(pool_embeddings, eval_embeddings, settings.semantic_min_cosine)
            candidates.append((pool_rows[rows], eval_rows[references], schemas.SEMANTIC_DUPLICATE, 1.0 - cosine))

    matches = pl.concat(
        [
            pl.DataFrame(
                {
                    _ROW: pl.Series(rows, dtype=pl.Int64),
                    "reference": pl.Series(references, dtype=pl.Int64),
                    "kind": pl.Series([kind] * len(rows), dtype=pl.String),
                    "kind_order": pl.Series([_KIND_ORDER[kind]] * len(rows), dtype=pl.Int64),
                    "distance": pl.Series(np.broadcast_to(distance, len(rows)), dtype=pl.Float64),
                }
            )
            for rows, references, kind, distance in candidates
        ]
    )
    closest = matches.sort(_ROW, "kind_order", "distance", "reference").unique(_ROW, keep="first", maintain_order=True)
    pool_rows = closest[_ROW].to_numpy()
    references = closest["reference"].to_numpy()
    contamination = pl.DataFrame(
        {
            schemas.UID: pool[schemas.UID].gather(pool_rows),
            schemas.SHARD: pool[schemas.SHARD].gather(pool_rows),
            EVAL_UID: evaluation[schemas.UID].gather(references),
            "kind": closest["kind"],
            "distance": closest["distance"],
        }
    )
    return schemas.conform(contamination, CONTAMINATION)


def duplicate_groups(pool: pl.DataFrame, scores: pl.DataFrame, settings: DedupSettings) -> pl.DataFrame:
    """Duplicate groups (schemas.DUPLICATES) of a pool's fingerprints: only groups of two or more images, each
    image with its group, its kind and distance to the group's representative, representative first.

    The representative is the image whose raw caption scores highest in `scores` (uid, shard, score: one row
    per image, the current reward model's), an image without a score last, ties by uid then shard. `group_id`
    is its f"{shard}/{uid}". A member's kind is measured against the representative directly: exact (same
    pixels), else near (pHash within the threshold), else semantic (1 - cosine); linked only through a chain
    of others, it can be farther than the thresholds. Deterministic whatever the rows' order.
    """
    return _duplicate_groups(_fingerprints(pool, "pool"), scores, settings)


def contaminated(pool: pl.DataFrame, evaluation: pl.DataFrame, settings: DedupSettings) -> pl.DataFrame:
    """Pool images that match an evaluation image (CONTAMINATION: uid, shard, eval_uid, kind, distance), each
    with its closest match: exact (same pixels) before near (pHash within the threshold) before semantic
    (cosine >= the threshold, when both sides have embeddings of one model), then the smaller distance, then
    the smaller eval uid. Sorted by (shard, uid).

    Not quadratic: pixel hashes are joined, pHashes searched by band against the evaluation set, embeddings
    compared by a chunked product with every evaluation embedding (evaluation sets are small; see
    `embedding_search.closest_semantic`).
    """
    return _contaminated(_fingerprints(pool, "pool"), _fingerprints(evaluation, "evaluation"), settings)


def deduplicate(
    pool: pl.DataFrame, scores: pl.DataFrame, evaluation: pl.DataFrame | None, settings: DedupSettings
) -> Deduplication:
    """Decontaminate the pool, then group what is left: every pool image is kept, or removed exactly once with
    f"{EVAL_CONTAMINATION}:<eval uid>" or f"{DUPLICATE_OF}:<representative uid>".

    Decontamination first, so an evaluation image's copies leave the pool whichever of them would have
    represented a group. Deterministic for the same inputs whatever their row order.
    """
    pool = _fingerprints(pool, "pool")
    if evaluation is not None and evaluation.height:
        contamination = _contaminated(pool, _fingerprints(evaluation, "evaluation"), settings)
    else:
        contamination = schemas.empty(CONTAMINATION)
    remaining = (
        pool.join(contamination.select(schemas.SHARD, schemas.UID), on=[schemas.SHARD, schemas.UID], how="anti")
        if contamination.height
        else pool
    )
    duplicates = _duplicate_groups(remaining, scores, settings)
    removals = pl.concat(
        [
            contamination.select(
                schemas.UID,
                schemas.SHARD,
                pl.format(f"{schemas.EVAL_CONTAMINATION}:{{}}", EVAL_UID).alias("reason"),
            ),
            duplicates.filter(pl.col("kind").is_not_null()).select(
                schemas.UID,
                schemas.SHARD,
                pl.format(f"{schemas.DUPLICATE_OF}:{{}}", "representative_uid").alias("reason"),
            ),
        ]
    ).sort(schemas.SHARD, schemas.UID)
    removals = schemas.conform(removals, schemas.DEDUP_REMOVALS)
    if removals.select(pl.struct(schemas.SHARD, schemas.UID).is_duplicated().any()).item():
        raise AssertionError("an image was removed twice: decontamination and grouping overlap")
    return Deduplication(duplicates, removals, contamination, pool.height)
