"""The caption variants' cuts on a small known table: which images each keeps and with which caption."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ca_platform import layout, schemas
from ca_platform.compression.subsets import write_shard_subsets
from ca_platform.compression.threshold import (
    raw_plus_recap_threshold,
    score_threshold,
    shard_membership,
)
from ca_platform.ingest.webdataset_io import iter_samples
from tests.conftest import write_download_tar

CAPTIONER = "c1"
UIDS = ["u0", "u1", "u2", "u3", "u4", "u5"]
# uid -> raw score, then the scores of synthetic candidates 0 and 1
REWARD = {
    "u0": (0.1, 0.8, 0.2),
    "u1": (0.9, 0.1, 0.95),
    "u2": (0.3, 0.3, 0.1),  # the raw caption ties its best candidate: the raw one is kept
    "u3": (0.5, 0.4, 0.45),
    "u4": (0.2, 0.25, 0.7),
    "u5": (0.6, 0.55, 0.1),
}
CLIP = {
    "u0": (0.2, 0.45, 0.3),
    "u1": (0.5, 0.1, 0.2),
    "u2": (0.9, 0.1, 0.1),
    "u3": (0.1, 0.35, 0.38),
    "u4": (0.4, 0.1, 0.1),
    "u5": (0.3, 0.4, 0.41),
}


def _scores(root: Path, scorer: str, table: dict[str, tuple[float, float, float]]) -> None:
    def frame(rows: list[tuple[str, int | None, float]], source: str, captioner: str | None) -> pl.DataFrame:
        return schemas.conform(
            pl.DataFrame(
                {
                    "uid": [u for u, _, _ in rows],
                    "shard": "s0",
                    "scorer": scorer,
                    "model_version": "v1",
                    "score": [s for _, _, s in rows],
                    "score_norm": None,
                    "caption_source": source,
                    "captioner_version": captioner,
                    "caption_rank": [r for _, r, _ in rows],
                },
                schema_overrides={"caption_rank": pl.Int32, "score_norm": pl.Float64, "captioner_version": pl.String},
            ),
            schemas.SCORES,
        )

    raw = root / layout.scores_key(scorer, "v1", "s0")
    synthetic = root / layout.synthetic_scores_key(scorer, "v1", CAPTIONER, "s0")
    for path in (raw, synthetic):
        path.parent.mkdir(parents=True, exist_ok=True)
    frame([(u, None, s[0]) for u, s in table.items()], schemas.RAW_CAPTION, None).write_parquet(raw)
    candidates = [(u, rank, s[rank + 1]) for u, s in table.items() for rank in (0, 1)]
    frame(candidates, schemas.SYNTHETIC_CAPTION, CAPTIONER).write_parquet(synthetic)


def _kept(membership: pl.DataFrame) -> dict[str, tuple[str, int | None]]:
    kept = membership.filter(pl.col("kept"))
    return {u: (s, r) for u, s, r in kept.select("uid", "caption_source", "caption_rank").iter_rows()}


def test_each_caption_variant_keeps_its_images_with_the_caption_it_chose(tmp_path: Path) -> None:
    _scores(tmp_path, schemas.REWARD_MODEL, REWARD)
    _scores(tmp_path, schemas.CLIP_SCORE, CLIP)

    # ours: each image's best caption by reward (raw or candidate), then the top round(0.5 * 6) = 3 of them
    best = score_threshold(tmp_path, schemas.REWARD_BEST_CAPTION, "v1", 0.5, captioner_version=CAPTIONER)
    assert (best.total, best.kept, best.score) == (6, 3, 0.7)
    membership = shard_membership(tmp_path, best, "s0")
    assert membership.height == 6 and membership["uid"].to_list() == UIDS
    assert _kept(membership) == {"u1": ("synthetic", 1), "u0": ("synthetic", 0), "u4": ("synthetic", 1)}
    chosen = dict(zip(membership["uid"], membership["caption_rank"]))
    assert chosen["u2"] is None and chosen["u3"] is None  # the raw caption wins its tie, and outright
    for uid, rank in chosen.items():
        candidates = REWARD[uid]
        assert candidates[0 if rank is None else rank + 1] == max(candidates)

    # Nguyen et al.: the CLIP top 3 keep their raw caption; of the rest, those whose best recaption reaches the
    # same threshold (0.4) join with it
    clip_cut = score_threshold(tmp_path, schemas.CLIPSCORE_TOPK, "v1", 0.5)
    assert (clip_cut.kept, clip_cut.score) == (3, 0.4)
    plus = raw_plus_recap_threshold(tmp_path, clip_cut, CAPTIONER)
    assert (plus.total, plus.kept, plus.score) == (6, 5, 0.4)
    assert _kept(shard_membership(tmp_path, plus, "s0")) == {
        "u2": ("raw", None),
        "u1": ("raw", None),
        "u4": ("raw", None),
        "u0": ("synthetic", 0),
        "u5": ("synthetic", 1),
    }

    # recap_all keeps every image with its best candidate by CLIP score (ties: the lower rank)
    recap = score_threshold(tmp_path, schemas.RECAP_ALL, "v1", 1.0, captioner_version=CAPTIONER)
    everything = shard_membership(tmp_path, recap, "s0")
    assert recap.kept == 6 and everything["kept"].all()
    assert dict(zip(everything["uid"], everything["caption_rank"])) == {
        "u0": 0,
        "u1": 1,
        "u2": 0,
        "u3": 1,
        "u4": 0,
        "u5": 1,
    }
    assert set(everything["caption_source"]) == {"synthetic"}
    assert set(everything["captioner_version"]) == {CAPTIONER}


def test_subset_tars_carry_the_chosen_caption_and_the_mix_carries_both(tmp_path: Path) -> None:
    _scores(tmp_path, schemas.REWARD_MODEL, REWARD)
    _scores(tmp_path, schemas.CLIP_SCORE, CLIP)
    (tmp_path / "in").mkdir()
    # written out of key order, as img2dataset writes downloads as they complete: read back in key order
    samples = [(f"{i:09d}", u, f"raw {u}") for i, u in enumerate(UIDS)]
    tar = write_download_tar(tmp_path / "in" / "s0.tar", samples[::-1])
    synthetic = {(u, rank): f"candidate {rank} of {u}" for u in UIDS for rank in (0, 1)}
    best = score_threshold(tmp_path, schemas.REWARD_BEST_CAPTION, "v1", 0.5, captioner_version=CAPTIONER)
    mix = score_threshold(tmp_path, schemas.RECAP_MIX, "v1", 1.0, captioner_version=CAPTIONER)
    memberships = {
        schemas.REWARD_BEST_CAPTION: shard_membership(tmp_path, best, "s0"),
        schemas.RECAP_MIX: shard_membership(tmp_path, mix, "s0"),
    }
    write_shard_subsets(memberships, [tar], tmp_path / "out", "s0", synthetic=synthetic)

    best_tar = tmp_path / "out" / schemas.REWARD_BEST_CAPTION / layout.subset_tar_name("s0")
    captions = {s.meta["uid"]: (s.caption, s.meta["raw_caption"]) for s in iter_samples([best_tar])}
    assert captions == {
        "u0": ("candidate 0 of u0", "raw u0"),
        "u1": ("candidate 1 of u1", "raw u1"),
        "u4": ("candidate 1 of u4", "raw u4"),
    }
    assert set(memberships[schemas.RECAP_MIX]["caption_source"]) == {schemas.MIXED_CAPTION}
    mix_tar = tmp_path / "out" / schemas.RECAP_MIX / layout.subset_tar_name("s0")
    samples = list(iter_samples([mix_tar]))
    assert [s.meta["uid"] for s in samples] == UIDS
    assert all(s.caption == f"raw {s.meta['uid']}" for s in samples)
    assert samples[0].meta[schemas.SYNTHETIC_CAPTION_META] == "candidate 0 of u0"
