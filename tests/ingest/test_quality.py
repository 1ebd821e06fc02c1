"""The raw shard's checks name the rows behind a failure, not only a share of them."""

from __future__ import annotations

import polars as pl

from ca_platform import schemas
from ca_platform.ingest.quality import OFFENDING_ROWS_SHOWN, QualityThresholds, check_raw_shard


def _raw(uids: list[str], captions: list[str | None]) -> pl.DataFrame:
    frame = pl.DataFrame(
        {
            "uid": uids,
            "shard": ["s"] * len(uids),
            "row_index": list(range(len(uids))),
            "url": [f"http://h/{i}.png" for i in range(len(uids))],
            "caption": captions,
            "skip_reason": [None] * len(uids),
        },
        schema_overrides={"caption": pl.String, "skip_reason": pl.String},
    )
    return schemas.conform(frame, schemas.RAW_SHARD)


def _outcomes(raw: pl.DataFrame) -> dict:
    return {o.name: o for o in check_raw_shard(raw, QualityThresholds(min_caption_fraction=0.9))}


def test_a_duplicate_uid_names_every_row_holding_it() -> None:
    outcome = _outcomes(_raw(["a", "b", "a", "c", "b", "a"], ["x"] * 6))["uid_unique"]
    assert not outcome.passed
    assert outcome.metadata["offending_row_count"] == 5
    assert outcome.metadata["offending_rows"] == [
        {"row_index": 0, "uid": "a"},
        {"row_index": 1, "uid": "b"},
        {"row_index": 2, "uid": "a"},
        {"row_index": 4, "uid": "b"},
        {"row_index": 5, "uid": "a"},
    ]


def test_too_many_empty_captions_name_the_rows_first_few_and_count_all() -> None:
    rows = 3 * OFFENDING_ROWS_SHOWN
    captions = ["" if i % 2 else f"caption {i}" for i in range(rows)]
    captions[0] = None
    captions[2] = "   "
    outcomes = _outcomes(_raw([f"u{i}" for i in range(rows)], captions))
    outcome = outcomes["captions_non_empty"]
    assert not outcome.passed
    assert outcome.metadata["offending_row_count"] == rows // 2 + 2
    named = outcome.metadata["offending_rows"]
    assert len(named) == OFFENDING_ROWS_SHOWN
    assert named[:4] == [
        {"row_index": 0, "uid": "u0"},
        {"row_index": 1, "uid": "u1"},
        {"row_index": 2, "uid": "u2"},
        {"row_index": 3, "uid": "u3"},
    ]
    assert outcomes["uid_unique"].passed and outcomes["uid_unique"].metadata["offending_rows"] == []


def test_a_sound_shard_names_no_rows() -> None:
    outcomes = _outcomes(_raw(["a", "b"], ["x", "y"]))
    assert all(o.passed for o in outcomes.values())
    assert outcomes["captions_non_empty"].metadata["offending_row_count"] == 0
