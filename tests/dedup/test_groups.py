"""Deduplication and decontamination of a pool of real images: the planted groups and nothing else, the
reward model's favourite kept, evaluation copies removed first, every image accounted for once."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from PIL import Image

from ca_platform import schemas
from ca_platform.dedup.fingerprints import fingerprint_images, hamming_distance, perceptual_hash
from ca_platform.dedup.groups import CONTAMINATION, DedupSettings, contaminated, deduplicate, duplicate_groups
from tests.dedup.photos import photo, reencoded, resized

SETTINGS = DedupSettings()


def _pool_images() -> dict[tuple[str, str], Image.Image]:
    """(shard, uid) -> image: distinct photos, planted duplicate groups and copies of evaluation images."""
    images: dict[tuple[str, str], Image.Image] = {}
    for index in range(14):
        images[("s0" if index % 2 else "s1", f"single-{index:02d}")] = photo(1000 + index)
    a = photo(1)
    images[("s0", "a0")] = a
    images[("s1", "a1")] = reencoded(a, "PNG")  # the same pixels, saved again
    images[("s0", "a2")] = reencoded(a, "JPEG", 40)
    b = photo(2)
    images[("s0", "b0")] = b
    images[("s0", "b1")] = resized(b, 48)
    images[("s1", "b2")] = resized(b, 128)
    c = reencoded(photo(3), "JPEG", 95)  # served as a JPEG, then recompressed by another site
    images[("s0", "c0")] = c
    images[("s0", "c1")] = reencoded(c, "JPEG", 40)
    images[("s1", "c2")] = reencoded(c, "PNG")
    d = photo(4)
    images[("s0", "d1")] = d
    images[("s0", "d0")] = reencoded(d, "BMP")
    e = photo(5)  # one uid in two shards, the same image: ties by uid, then shard
    images[("s1", "e")] = e
    images[("s0", "e")] = reencoded(e, "PNG")
    for number, (seed, copy) in enumerate(
        [
            (11, lambda image: reencoded(image, "PNG")),
            (11, lambda image: resized(image, 56)),
            (12, lambda image: reencoded(image, "JPEG", 40)),
        ]
    ):
        images[("s1", f"x{number}")] = copy(photo(seed))
    return images


POOL_IMAGES = _pool_images()
EVALUATION = {"ev0": photo(11), "ev1": photo(12), "ev2": photo(13)}
PLANTED_GROUPS = [{"a0", "a1", "a2"}, {"b0", "b1", "b2"}, {"c0", "c1", "c2"}, {"d0", "d1"}, {"e"}]
SCORES = {
    ("s0", "a0"): 0.1,
    ("s1", "a1"): 0.3,
    ("s0", "a2"): 0.9,  # the recompressed copy carries the best caption: it represents, the others are near
    ("s0", "b0"): 2.0,
    ("s0", "b1"): 1.0,
    ("s1", "b2"): float("nan"),  # no usable score: ranks last
    ("s0", "c0"): 0.5,
    ("s1", "c2"): 0.5,  # a tie: c0 wins by uid; c1 has no score at all
    ("s0", "d0"): -1.0,
    ("s0", "d1"): -1.0,
    ("s1", "e"): 0.2,
    ("s0", "e"): 0.2,
}


def fingerprints(images: dict[tuple[str, str], Image.Image]) -> pl.DataFrame:
    frames = []
    for shard in sorted({shard for shard, _ in images}):
        uids = [uid for s, uid in images if s == shard]
        frames.append(fingerprint_images(uids, shard, [images[(shard, uid)] for uid in uids]))
    return pl.concat(frames)


def scores_frame(scores: dict[tuple[str, str], float]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            schemas.UID: [uid for _, uid in scores],
            schemas.SHARD: [shard for shard, _ in scores],
            "score": list(scores.values()),
        }
    )


@pytest.fixture(scope="module")
def pool() -> pl.DataFrame:
    return fingerprints(POOL_IMAGES)


@pytest.fixture(scope="module")
def evaluation() -> pl.DataFrame:
    return fingerprint_images(list(EVALUATION), "eval", list(EVALUATION.values()))


def test_deduplicate_finds_the_planted_groups_keeps_the_best_scored_and_removes_eval_copies(
    pool: pl.DataFrame, evaluation: pl.DataFrame
) -> None:
    result = deduplicate(pool, scores_frame(SCORES), evaluation, SETTINGS)
    duplicates = result.duplicates
    assert duplicates.schema == pl.Schema(schemas.DUPLICATES)
    groups = duplicates.group_by("group_id").agg(pl.col(schemas.UID))
    assert sorted(sorted(set(uids)) for uids in groups[schemas.UID].to_list()) == sorted(
        sorted(group) for group in PLANTED_GROUPS
    )
    rows = {(row[schemas.SHARD], row[schemas.UID]): row for row in duplicates.iter_rows(named=True)}
    expected = {
        ("s0", "a2"): ("s0/a2", None, "a2"),
        ("s0", "a0"): ("s0/a2", schemas.NEAR_DUPLICATE, "a2"),
        ("s1", "a1"): ("s0/a2", schemas.NEAR_DUPLICATE, "a2"),  # same pixels as a0, not as the representative
        ("s0", "b0"): ("s0/b0", None, "b0"),
        ("s0", "b1"): ("s0/b0", schemas.NEAR_DUPLICATE, "b0"),
        ("s1", "b2"): ("s0/b0", schemas.NEAR_DUPLICATE, "b0"),
        ("s0", "c0"): ("s0/c0", None, "c0"),
        ("s0", "c1"): ("s0/c0", schemas.NEAR_DUPLICATE, "c0"),
        ("s1", "c2"): ("s0/c0", schemas.EXACT_DUPLICATE, "c0"),
        ("s0", "d0"): ("s0/d0", None, "d0"),
        ("s0", "d1"): ("s0/d0", schemas.EXACT_DUPLICATE, "d0"),
        ("s0", "e"): ("s0/e", None, "e"),
        ("s1", "e"): ("s0/e", schemas.EXACT_DUPLICATE, "e"),
    }
    assert {key: (row["group_id"], row["kind"], row["representative_uid"]) for key, row in rows.items()} == expected
    for key, row in rows.items():
        if row["kind"] in (None, schemas.EXACT_DUPLICATE):
            assert row["distance"] == 0.0
        else:
            representative = next(k for k, r in rows.items() if r["group_id"] == row["group_id"] and not r["kind"])
            bits = hamming_distance(perceptual_hash(POOL_IMAGES[key]), perceptual_hash(POOL_IMAGES[representative]))
            assert row["distance"] == bits <= SETTINGS.near_max_bits

    assert result.contamination.schema == pl.Schema(CONTAMINATION)
    assert {(row[schemas.UID], row["eval_uid"], row["kind"]) for row in result.contamination.iter_rows(named=True)} == {
        ("x0", "ev0", schemas.EXACT_DUPLICATE),
        ("x1", "ev0", schemas.NEAR_DUPLICATE),
        ("x2", "ev1", "near"),
    }

    removals = result.removals
    assert removals.schema == pl.Schema(schemas.DEDUP_REMOVALS)
    assert dict(zip(zip(removals[schemas.SHARD], removals[schemas.UID]), removals["reason"])) == {
        ("s1", "x0"): "eval_contamination:ev0",
        ("s1", "x1"): "eval_contamination:ev0",
        ("s1", "x2"): "eval_contamination:ev1",
        ("s0", "a0"): "duplicate_of:a2",
        ("s1", "a1"): "duplicate_of:a2",
        ("s0", "b1"): "duplicate_of:b0",
        ("s1", "b2"): "duplicate_of:b0",
        ("s0", "c1"): "duplicate_of:c0",
        ("s1", "c2"): "duplicate_of:c0",
        ("s0", "d1"): "duplicate_of:d0",
        ("s1", "e"): "duplicate_of:e",
    }
    counts = result.counts()
    assert counts == {
        "images": pool.height,
        "exact_duplicates": 3,
        "near_duplicates": 5,
        "semantic_duplicates": 0,
        "eval_contamination": 3,
        "kept": pool.height - 11,
    }
    removed = sum(value for key, value in counts.items() if key not in ("images", "kept"))
    assert counts["kept"] + removed == counts["images"]


def test_results_do_not_depend_on_the_rows_order(pool: pl.DataFrame, evaluation: pl.DataFrame) -> None:
    first = deduplicate(pool, scores_frame(SCORES), evaluation, SETTINGS)
    shuffled = deduplicate(
        pool.sample(fraction=1.0, shuffle=True, seed=3),
        scores_frame(SCORES).sample(fraction=1.0, shuffle=True, seed=4),
        evaluation.reverse(),
        SETTINGS,
    )
    assert shuffled.duplicates.equals(first.duplicates)
    assert shuffled.removals.equals(first.removals)
    assert shuffled.contamination.equals(first.contamination)


def test_without_evaluation_images_copies_of_them_group_among_themselves(pool: pl.DataFrame) -> None:
    result = deduplicate(pool, scores_frame(SCORES), None, SETTINGS)
    assert result.contamination.is_empty()
    x_group = result.duplicates.filter(pl.col(schemas.UID).str.starts_with("x"))
    assert sorted(x_group[schemas.UID].to_list()) == ["x0", "x1"]  # copies of ev0; x2 copies ev1 alone
    assert result.counts()["eval_contamination"] == 0


def test_contaminated_takes_the_closest_match_exact_before_near_then_eval_uid(pool: pl.DataFrame) -> None:
    original = photo(11)
    evaluation = fingerprint_images(
        ["z-near", "b-near", "m-exact"],
        "eval",
        [resized(original, 60), reencoded(resized(original, 60), "PNG"), original],
    )
    matches = contaminated(pool, evaluation, SETTINGS)
    by_uid = {row[schemas.UID]: (row["eval_uid"], row["kind"]) for row in matches.iter_rows(named=True)}
    assert by_uid["x0"] == ("m-exact", schemas.EXACT_DUPLICATE)  # x0 has ev0's very pixels
    assert by_uid["x1"][1] == schemas.NEAR_DUPLICATE and by_uid["x1"][0] in ("m-exact", "b-near")
    # b-near and z-near have the same pixels (so the same pHash): the tie goes to the smaller eval uid
    assert "z-near" not in {eval_uid for eval_uid, _ in by_uid.values()}


def _frame(rows: list[tuple[str, str, int, list[float] | None]], version: str | None = "v1") -> pl.DataFrame:
    """Fingerprints written directly: (uid, pixel hash, pHash, embedding)."""
    return schemas.conform(
        pl.DataFrame(
            {
                schemas.UID: [uid for uid, _, _, _ in rows],
                schemas.SHARD: ["s0"] * len(rows),
                schemas.PIXEL_HASH: [pixels for _, pixels, _, _ in rows],
                schemas.PHASH: [phash for _, _, phash, _ in rows],
                schemas.EMBEDDING: pl.Series([e for _, _, _, e in rows], dtype=pl.List(pl.Float32)),
                schemas.EMBEDDING_MODEL_VERSION: [version if e is not None else None for _, _, _, e in rows],
            }
        ),
        schemas.IMAGE_FINGERPRINTS,
    )


def test_semantic_duplicates_and_members_linked_only_through_a_chain() -> None:
    far = 0x0F0F_0F0F_0F0F_0F0F
    pool = _frame(
        [
            ("p", "h-p", 0, [1.0, 0.0, 0.0]),
            ("q", "h-q", far, [0.999, 0.0447, 0.0]),  # another pHash, the same content: semantic
            ("r", "h-r", 0b1111, None),  # 4 bits from p: near
            ("s", "h-s", 0b1111_1111, None),  # 4 bits from r, 8 from p: near through r only
            ("t", "h-t", ~far, [0.0, 0.0, 1.0]),  # unrelated
        ]
    )
    scores = scores_frame({("s0", "p"): 1.0})
    duplicates = duplicate_groups(pool, scores, SETTINGS)
    rows = {row[schemas.UID]: (row["kind"], row["distance"]) for row in duplicates.iter_rows(named=True)}
    assert set(rows) == {"p", "q", "r", "s"}
    assert rows["p"] == (None, 0.0)
    assert rows["q"][0] == schemas.SEMANTIC_DUPLICATE and rows["q"][1] == pytest.approx(1 - 0.999 / 1.0, abs=1e-3)
    assert rows["r"] == (schemas.NEAR_DUPLICATE, 4.0)
    assert rows["s"] == (schemas.NEAR_DUPLICATE, 8.0)  # beyond the threshold: linked through r
    off = duplicate_groups(pool, scores, DedupSettings(semantic_min_cosine=None))
    assert set(off[schemas.UID].to_list()) == {"p", "r", "s"}


def test_semantic_groups_do_not_depend_on_the_rows_order() -> None:
    """k-means samples and seeds rows by position: the canonical (shard, uid) order makes that position-free."""
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((400, 16))
    embeddings[200:260] = embeddings[:60] + 0.01 * rng.standard_normal((60, 16))
    phashes = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 400, dtype=np.int64, endpoint=True)
    pool = _frame([(f"u{i:03d}", f"h{i}", int(phashes[i]), embeddings[i].tolist()) for i in range(400)])
    settings = DedupSettings(max_cluster_size=32, seed=5)
    first = duplicate_groups(pool, scores_frame({}), settings)
    assert first.filter(pl.col("kind") == schemas.SEMANTIC_DUPLICATE).height >= 55
    shuffled = duplicate_groups(pool.sample(fraction=1.0, shuffle=True, seed=1), scores_frame({}), settings)
    assert shuffled.equals(first)


def test_semantic_contamination_needs_embeddings_of_one_model() -> None:
    pool = _frame([("p", "h-p", 0, [1.0, 0.0]), ("q", "h-q", -1, [0.0, 1.0])])
    evaluation = _frame([("ev", "h-ev", 0x00FF_00FF_00FF_00FF, [0.9999, 0.01])])
    matches = contaminated(pool, evaluation, SETTINGS)
    assert matches.select(schemas.UID, "eval_uid", "kind").rows() == [("p", "ev", schemas.SEMANTIC_DUPLICATE)]
    with pytest.raises(ValueError, match="same model"):
        contaminated(pool, evaluation.with_columns(pl.lit("v2").alias(schemas.EMBEDDING_MODEL_VERSION)), SETTINGS)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"near_max_bits": -1}, "near_max_bits"),
        ({"near_max_bits": 40}, "near_max_bits"),
        ({"semantic_min_cosine": 0.0}, "semantic_min_cosine"),
        ({"semantic_min_cosine": 1.5}, "semantic_min_cosine"),
        ({"max_cluster_size": 1}, "max_cluster_size"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_settings_are_validated(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DedupSettings(**arguments)


def test_bad_inputs_are_named() -> None:
    pool = _frame([("p", "h-p", 0, None), ("p", "h-q", 1, None)])
    with pytest.raises(ValueError, match="repeat a \\(shard, uid\\).*'p'"):
        deduplicate(pool, scores_frame({}), None, SETTINGS)
    good = _frame([("p", "h-p", 0, None), ("q", "h-q", 1, None)])
    twice = scores_frame({("s0", "p"): 1.0}).vstack(scores_frame({("s0", "p"): 2.0}))
    with pytest.raises(ValueError, match="scores: 2 rows share"):
        deduplicate(good, twice, None, SETTINGS)
    mixed = _frame([("p", "h-p", 0, [1.0, 0.0]), ("q", "h-q", 1, [0.0, 1.0])]).with_columns(
        pl.Series(schemas.EMBEDDING_MODEL_VERSION, ["v1", "v2"])
    )
    with pytest.raises(ValueError, match="one model version"):
        deduplicate(mixed, scores_frame({}), None, SETTINGS)
