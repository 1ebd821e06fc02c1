"""The global cut keeps exactly round(k*N) pairs, ties broken by (score, uid, shard)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from ca_platform import layout, schemas
from ca_platform.compression import subsets
from ca_platform.compression.subsets import SubsetError, write_shard_subsets
from ca_platform.compression.threshold import (
    ScoreHistogram,
    ScoreThreshold,
    _cuts_near_uniform_rank,
    keep_count,
    kept_condition,
    random_version,
    ranked_pairs,
    score_histogram,
    score_threshold,
    score_thresholds,
    shard_membership,
)
from ca_platform.ingest.quality import check_subsets
from ca_platform.ingest.webdataset_io import iter_samples
from ca_platform.schemas import Status
from tests.conftest import write_download_tar

SCORE_COLUMNS = {"uid": pl.String, "shard": pl.String, "score": pl.Float64}


def _write(root: Path, shard: str, rows: list[tuple[str, float]]) -> None:
    path = root / layout.scores_key("reward_model", "v1", shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        {"uid": [u for u, _ in rows], "shard": [shard] * len(rows), "score": [s for _, s in rows]}
    ).write_parquet(path)


def _kept(root: Path, threshold) -> list[tuple[str, str]]:
    condition, params = kept_condition(threshold)
    pattern = (root / layout.SCORES_DIR / "reward_model" / "v1" / "*.parquet").as_posix()
    with duckdb.connect() as con:
        rows = con.execute(
            f"SELECT shard, uid FROM read_parquet(?) WHERE {condition} ORDER BY shard, uid", [pattern, *params]
        ).fetchall()
    return rows


def test_keeps_exactly_round_k_n_with_ties_broken_by_uid_then_shard(tmp_path: Path) -> None:
    _write(tmp_path, "a", [("u1", 0.9), ("u2", 0.5), ("u3", 0.5), ("u4", 0.1)])
    _write(tmp_path, "b", [("u0", 0.5), ("u2", 0.5), ("u5", 0.7), ("u6", 0.2)])
    # order: u1 .9, u5 .7, then the 0.5 ties by uid then shard: u0/b, u2/a, u2/b, u3/a, then u6 .2, u4 .1
    threshold = score_threshold(tmp_path, "reward_topk", "v1", 0.5)
    assert (threshold.total, threshold.kept) == (8, 4)
    assert (threshold.score, threshold.uid, threshold.shard) == (0.5, "u2", "a")
    assert _kept(tmp_path, threshold) == [("a", "u1"), ("a", "u2"), ("b", "u0"), ("b", "u5")]

    five = score_threshold(tmp_path, "reward_topk", "v1", 0.625)
    assert five.kept == 5 and _kept(tmp_path, five) == [("a", "u1"), ("a", "u2"), ("b", "u0"), ("b", "u2"), ("b", "u5")]


@pytest.mark.parametrize(
    ("k", "n", "expected"), [(0.3, 10, 3), (0.25, 10, 3), (0.12, 100, 12), (0.05, 10, 1), (0.0, 7, 0), (1.0, 7, 7)]
)
def test_keep_count_rounds_half_up(k: float, n: int, expected: int) -> None:
    assert keep_count(k, n) == expected


def test_nothing_kept_and_bad_fraction(tmp_path: Path) -> None:
    _write(tmp_path, "a", [("u1", 0.9)])
    none = score_threshold(tmp_path, "reward_topk", "v1", 0.0)
    assert none.kept == 0 and _kept(tmp_path, none) == []
    with pytest.raises(ValueError, match="within"):
        keep_count(1.5, 3)


# Brute force: the cut as the module docstring defines it, by sorting every pair in Python.
Pair = tuple[float, str, str]  # score, uid, shard


def _rank(pairs: list[Pair]) -> list[Pair]:
    return sorted(pairs, key=lambda pair: (-pair[0], pair[1], pair[2]))


def _expected(pairs: list[Pair], keep_fraction: float) -> tuple[int, Pair | None, set[tuple[str, str]]]:
    ranked = _rank(pairs)
    kept = keep_count(keep_fraction, len(pairs))
    return kept, ranked[kept - 1] if kept else None, {(shard, uid) for _, uid, shard in ranked[:kept]}


def _tied_pairs(root: Path, seed: int, shards: int = 3, per_shard: int = 120, levels: int = 6) -> list[Pair]:
    """Scores from a few levels (many ties) and uids from a small pool, so uids repeat across shards."""
    rng = np.random.default_rng(seed)
    pairs: list[Pair] = []
    for index in range(shards):
        shard = f"part-{index:02d}"
        uids = rng.choice(2 * per_shard, size=per_shard, replace=False)
        rows = [(f"u{uid:04d}", float(level) / 4) for uid, level in zip(uids, rng.integers(0, levels, per_shard))]
        _write(root, shard, rows)
        pairs += [(score, uid, shard) for uid, score in rows]
    return pairs


def _histogram_reference(root: Path, threshold: ScoreThreshold, bins: int) -> tuple[list[int], list[int]]:
    """Kept and dropped per bin by evaluating kept_condition on every pair: what score_histogram must count."""
    relation, params = ranked_pairs(root, threshold.variant, threshold.model_version)
    condition, condition_params = kept_condition(threshold)
    with duckdb.connect() as con:
        low, high = con.execute(f"SELECT min(score), max(score) FROM ({relation})", params).fetchone()
        width = (high - low) / bins or 1.0
        rows = con.execute(
            f"SELECT least(CAST(floor((score - ?) / ?) AS INTEGER), ?) AS bin, count(*) FILTER ({condition}), "
            f"count(*) FILTER (NOT {condition}) FROM ({relation}) GROUP BY bin",
            [low, width, bins - 1, *condition_params, *condition_params, *params],
        ).fetchall()
    kept, dropped = [0] * bins, [0] * bins
    for index, kept_count, dropped_count in rows:
        kept[index], dropped[index] = kept_count, dropped_count
    return kept, dropped


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("keep_fraction", [0.0, 0.003, 0.3, 0.5, 1.0])
def test_cut_matches_a_full_sort_with_many_ties_and_uids_repeated_across_shards(
    tmp_path: Path, seed: int, keep_fraction: float
) -> None:
    pairs = _tied_pairs(tmp_path, seed)
    kept, last, members = _expected(pairs, keep_fraction)
    threshold = score_threshold(tmp_path, "reward_topk", "v1", keep_fraction)
    assert (threshold.total, threshold.kept) == (len(pairs), kept)
    assert (threshold.score, threshold.uid, threshold.shard) == (last or (None, None, None))
    assert set(_kept(tmp_path, threshold)) == members

    histogram = score_histogram(tmp_path, threshold, bins=7)
    assert (histogram.kept, histogram.dropped) == _histogram_reference(tmp_path, threshold, 7)
    assert sum(histogram.kept) == kept and sum(histogram.dropped) == len(pairs) - kept


def test_every_cut_of_small_sets_matches_a_full_sort(tmp_path: Path) -> None:
    """Every kept count of sets of 1 to 9 pairs: the selection's position arithmetic at every place."""
    rng = np.random.default_rng(7)
    for size in range(1, 10):
        root = tmp_path / str(size)
        rows = [(f"u{i}", float(rng.integers(0, 3))) for i in range(size)]
        half = (size + 1) // 2
        _write(root, "a", rows[:half])
        if size > half:
            _write(root, "b", rows[half:])
        pairs = [(score, uid, "a" if i < half else "b") for i, (uid, score) in enumerate(rows)]
        ranked = _rank(pairs)
        for kept in range(1, size + 1):
            threshold = score_threshold(root, "reward_topk", "v1", kept / size)
            assert threshold.kept == kept
            assert (threshold.score, threshold.uid, threshold.shard) == ranked[kept - 1], (size, kept)


@pytest.mark.parametrize("keep_fraction", [0.001, 0.3, 0.999, 1.0])
def test_all_tied_and_heavy_ties_at_the_cut(tmp_path: Path, keep_fraction: float) -> None:
    all_tied = tmp_path / "all"
    for shard in ("a", "b"):
        _write(all_tied, shard, [(f"u{i:03d}", 0.5) for i in range(300)])
    heavy = tmp_path / "heavy"  # 90% share the score the cut falls in, a few score above and below it
    for shard in ("a", "b"):
        _write(heavy, shard, [(f"u{i:03d}", 0.9 if i < 10 else 0.1 if i >= 290 else 0.5) for i in range(300)])
    for root in (all_tied, heavy):
        pairs = [(score, uid, shard) for shard, uid, score in _scores(root)]
        kept, last, members = _expected(pairs, keep_fraction)
        threshold = score_threshold(root, "reward_topk", "v1", keep_fraction)
        assert threshold.kept == kept and (threshold.score, threshold.uid, threshold.shard) == last
        assert set(_kept(root, threshold)) == members
        histogram = score_histogram(root, threshold, bins=4)
        assert (histogram.kept, histogram.dropped) == _histogram_reference(root, threshold, 4)


def _scores(root: Path) -> list[tuple[str, str, float]]:
    pattern = (root / layout.SCORES_DIR / "reward_model" / "v1" / "*.parquet").as_posix()
    with duckdb.connect() as con:
        return con.execute("SELECT shard, uid, score FROM read_parquet(?)", [pattern]).fetchall()


def _write_ledgers(root: Path, shards: dict[str, list[tuple[str, str]]]) -> None:
    for shard, rows in shards.items():
        path = root / layout.download_rows_key(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        pl.DataFrame(
            {"uid": [u for u, _ in rows], "shard": [shard] * len(rows), "status": [s for _, s in rows]}
        ).write_parquet(path)


def _random_pairs(root: Path, seed: int) -> list[Pair]:
    """random_topk's ranked pairs, keyed by the platform's own key expression (the definition under test is
    the cut, not the key)."""
    relation, params = ranked_pairs(root, "random_topk", random_version(seed))
    with duckdb.connect() as con:
        return con.execute(f"SELECT score, uid, shard FROM ({relation})", params).fetchall()


@pytest.mark.parametrize("keep_fraction", [0.0, 0.001, 0.3, 1.0])
def test_random_cut_matches_a_full_sort(tmp_path: Path, keep_fraction: float) -> None:
    rng = np.random.default_rng(3)
    shards = {}
    for index in range(3):  # uids drawn from one pool, so some pairs share a uid (and so a key) across shards
        uids = rng.choice(3000, size=1500, replace=False)
        statuses = rng.choice([Status.SUCCESS, "failed_to_download"], size=1500, p=[0.9, 0.1])
        shards[f"part-{index:02d}"] = [(f"u{uid:05d}", str(status)) for uid, status in zip(uids, statuses)]
    _write_ledgers(tmp_path, shards)
    pairs = _random_pairs(tmp_path, 11)
    assert len(pairs) == sum(status == Status.SUCCESS for rows in shards.values() for _, status in rows)
    kept, last, _ = _expected(pairs, keep_fraction)
    threshold = score_threshold(tmp_path, "random_topk", random_version(11), keep_fraction)
    assert (threshold.total, threshold.kept) == (len(pairs), kept)
    assert (threshold.score, threshold.uid, threshold.shard) == (last or (None, None, None))
    histogram = score_histogram(tmp_path, threshold, bins=5)
    assert (histogram.kept, histogram.dropped) == _histogram_reference(tmp_path, threshold, 5)


CURVE = [0.1, 0.2, 0.3, 0.5, 1.0]


def test_every_k_of_the_curve_in_one_call_is_the_exact_cut_of_that_k(tmp_path: Path) -> None:
    """The compression curve's cuts, one selection pass for all k: each keeps exactly round(k*N), the same
    pairs a full sort keeps and the same cut as that k alone."""
    pairs = _tied_pairs(tmp_path / "scored", 7)
    cuts = score_thresholds(tmp_path / "scored", "reward_topk", "v1", CURVE)
    assert [t.keep_fraction for t in cuts] == CURVE
    for threshold in cuts:
        kept, last, members = _expected(pairs, threshold.keep_fraction)
        assert (threshold.total, threshold.kept) == (len(pairs), kept) and kept == round(threshold.keep_fraction * 360)
        assert (threshold.score, threshold.uid, threshold.shard) == last
        assert set(_kept(tmp_path / "scored", threshold)) == members
        assert threshold == score_threshold(tmp_path / "scored", "reward_topk", "v1", threshold.keep_fraction)
        assert threshold.key == f"reward_topk@{threshold.keep_fraction}"
    _write_ledgers(tmp_path / "random", {"part-00": [(f"u{i:04d}", Status.SUCCESS) for i in range(997)]})
    random_pairs = _random_pairs(tmp_path / "random", 5)
    for threshold in score_thresholds(tmp_path / "random", "random_topk", random_version(5), CURVE):
        kept, last, _ = _expected(random_pairs, threshold.keep_fraction)
        assert threshold.kept == kept == math.floor(threshold.keep_fraction * 997 + 0.5)
        assert (threshold.score, threshold.uid, threshold.shard) == last


def test_random_cut_outside_the_expected_band_falls_back_to_selection(tmp_path: Path) -> None:
    """One uid in every shard: every key is the same, far from where uniform keys would put the cut."""
    _write_ledgers(tmp_path, {f"part-{i:04d}": [("same", Status.SUCCESS)] for i in range(2000)})
    pairs = _random_pairs(tmp_path, 0)
    key = pairs[0][0]
    assert abs(key - 0.7) > 0.1, "pick another uid: the band around 0.7 must miss the common key"
    relation, params = ranked_pairs(tmp_path, "random_topk", random_version(0))
    with duckdb.connect() as con:
        assert _cuts_near_uniform_rank(con, relation, params, 2000, [600]) == {600: None}
    threshold = score_threshold(tmp_path, "random_topk", random_version(0), 0.3)
    assert (threshold.score, threshold.uid, threshold.shard) == (key, "same", "part-0599")


def test_a_stale_threshold_is_counted_by_its_condition(tmp_path: Path) -> None:
    """The histogram counts what kept_condition keeps even when the threshold does not come from these files."""
    _tied_pairs(tmp_path, 5)
    fresh = score_threshold(tmp_path, "reward_topk", "v1", 0.4)
    stale = replace(fresh, kept=fresh.kept - 17, uid="u0100")
    assert score_histogram(tmp_path, stale, bins=6) == ScoreHistogram(
        score_histogram(tmp_path, fresh, bins=6).edges, *_histogram_reference(tmp_path, stale, 6)
    )


def test_pairs_without_a_score_rank_last_and_a_cut_reaching_them_is_refused(tmp_path: Path) -> None:
    _write(tmp_path, "a", [("u1", 0.9), ("u2", 0.5), ("u3", 0.5)])
    path = tmp_path / layout.scores_key("reward_model", "v1", "b")
    pl.DataFrame({"uid": ["u0", "u4"], "shard": ["b", "b"], "score": [None, 0.7]}, schema=SCORE_COLUMNS).write_parquet(
        path
    )
    threshold = score_threshold(tmp_path, "reward_topk", "v1", 0.6)  # 3 of 5: u1, u4, then u2 of the 0.5 ties
    assert (threshold.total, threshold.kept, threshold.score, threshold.uid) == (5, 3, 0.5, "u2")
    with pytest.raises(ValueError, match="1 of 5 pairs have no score .*shard b, uid u0"):
        score_threshold(tmp_path, "reward_topk", "v1", 1.0)


def _membership(variant: str, uids: list[str], kept: set[str]) -> pl.DataFrame:
    frame = pl.DataFrame(
        {
            "uid": uids,
            "shard": ["s0"] * len(uids),
            "variant": [variant] * len(uids),
            "model_version": ["v1"] * len(uids),
            "keep_fraction": [0.5] * len(uids),
            "score": [float(i) for i in range(len(uids))],
            "kept": [uid in kept for uid in uids],
            "caption_source": [schemas.RAW_CAPTION] * len(uids),
            "captioner_version": [None] * len(uids),
            "caption_rank": [None] * len(uids),
            "drop_reason": [None] * len(uids),
        }
    )
    return schemas.conform(frame, schemas.SUBSETS)


def test_one_pass_over_the_downloads_writes_every_variants_subset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uids = [f"u{i:02d}" for i in range(10)]
    rows = [(f"{i:09d}", uid, f"caption {i}") for i, uid in enumerate(uids)]
    tars = [write_download_tar(tmp_path / "a.tar", rows[:6]), write_download_tar(tmp_path / "b.tar", rows[6:])]
    kept = {"reward_topk": {"u01", "u03", "u07"}, "clipscore_topk": {"u03", "u09"}, "random_topk": set()}
    walks = []

    def counted(download_tars):  # the real reader, counting the passes over the downloads
        walks.append(list(download_tars))
        return iter_samples(download_tars)

    monkeypatch.setattr(subsets, "iter_samples", counted)
    manifests = write_shard_subsets(
        {v: _membership(v, uids, k) for v, k in kept.items()}, tars, tmp_path / "out", "s0"
    ).manifests

    assert walks == [tars]
    originals = {s.key: s for s in iter_samples(tars)}
    for variant, kept_uids in kept.items():
        folder = tmp_path / "out" / variant
        written = list(iter_samples([folder / layout.subset_tar_name("s0")]))
        assert [s.meta["uid"] for s in written] == sorted(kept_uids)  # exactly its kept pairs, in download order
        assert all(s.image == originals[s.key].image and s.caption == originals[s.key].caption for s in written)
        assert (folder / layout.SUBSET_UIDS_FILE).read_text().split() == sorted(kept_uids)
        manifest = json.loads((folder / layout.SUBSET_MANIFEST_FILE).read_text())
        assert manifest == manifests[variant]
        assert (manifest["variant"], manifest["pairs"], manifest["kept"]) == (variant, 10, len(kept_uids))
        membership = pl.read_parquet(folder / layout.SUBSET_MEMBERSHIP_FILE)
        assert set(membership.filter(pl.col("kept"))["uid"]) == kept_uids and membership.height == 10


def test_the_subset_audit_names_a_kept_uid_missing_from_the_downloads(tmp_path: Path) -> None:
    tar = write_download_tar(tmp_path / "a.tar", [("000000000", "u00", "a caption")])
    memberships = {"reward_topk": _membership("reward_topk", ["u00", "u99"], {"u99"})}
    written = write_shard_subsets(memberships, [tar], tmp_path / "out", "s0", token="run1")
    assert (tmp_path / "out" / "reward_topk" / "s0.run1.tar").exists()
    outcome = check_subsets(memberships, written.written, pl.Series(["u00", "u99"]))
    assert not outcome.passed
    assert outcome.metadata["reward_topk"]["kept_not_in_tar"] == ["u99"]
    assert "reward_topk: 2 pairs ranked of 2 downloaded, 1 kept, 0 in its tar" in outcome.metadata["reason"]
    assert check_subsets(memberships, written.written, pl.Series(["u00"])).metadata["reward_topk"][
        "not_downloaded"
    ] == ["u99"]


def test_a_uid_twice_in_the_download_tars_is_named(tmp_path: Path) -> None:
    tar = write_download_tar(tmp_path / "a.tar", [("000000000", "u00", "a"), ("000000001", "u00", "b")])
    with pytest.raises(SubsetError, match=r"shard s0: uid u00 appears twice"):
        write_shard_subsets({"reward_topk": _membership("reward_topk", ["u00"], {"u00"})}, [tar], tmp_path / "o", "s0")


def test_cuts_and_membership_under_a_data_root_whose_path_holds_a_quote(tmp_path: Path) -> None:
    root = tmp_path / "it's my data"
    _write(root, "a", [("u1", 0.9), ("u2", 0.5)])
    _write(root, "b", [("u3", 0.7), ("u4", 0.1)])
    _write_ledgers(root, {"a": [("u1", Status.SUCCESS), ("u2", Status.SUCCESS)], "b": [("u3", Status.SUCCESS)]})
    threshold = score_threshold(root, "reward_topk", "v1", 0.5)
    assert (threshold.total, threshold.kept, threshold.uid) == (4, 2, "u3")
    assert sum(score_histogram(root, threshold, bins=3).kept) == 2
    membership = shard_membership(root, threshold, "b")
    assert membership.select("uid", "kept").rows() == [("u3", True), ("u4", False)]
    assert score_threshold(root, "random_topk", random_version(0), 1.0).total == 3


def test_a_quarantined_shard_is_left_out_of_every_cut(tmp_path: Path) -> None:
    _write(tmp_path, "a", [("u1", 0.9), ("u2", 0.5)])
    _write(tmp_path, "bad", [("u3", 0.99), ("u4", 0.98)])  # scores of a shard quarantined since
    _write_ledgers(tmp_path, {"a": [("u1", Status.SUCCESS), ("u2", Status.SUCCESS)], "bad": [("u3", Status.SUCCESS)]})
    threshold = score_threshold(tmp_path, "reward_topk", "v1", 0.5, excluded=["bad"])
    assert (threshold.total, threshold.kept, threshold.uid, threshold.excluded) == (2, 1, "u1", ("bad",))
    assert ScoreThreshold.from_json(json.loads(json.dumps(threshold.as_json()))) == threshold
    assert sum(score_histogram(tmp_path, threshold, bins=2).kept) == 1
    assert score_threshold(tmp_path, "random_topk", random_version(0), 1.0, excluded=["bad"]).total == 2
