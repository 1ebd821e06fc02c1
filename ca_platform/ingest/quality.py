"""Data-quality checks of each shard, expressed as great_expectations 1.x expectations.

A check is a named group of expectations; it passes when all of them do. The Dagster layer turns each
`CheckOutcome` into an asset check result, blocking downstream work of the shard when one fails.
GX runs in an ephemeral context (no project files), built once per process because it is slow to start.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from ca_platform import schemas
from ca_platform.schemas import CAPTION, ROW_INDEX, SHARD, STATUS, UID, Status


@dataclass(frozen=True)
class QualityThresholds:
    min_caption_fraction: float = 0.9  # share of a shard's rows with a non-empty caption
    min_download_success_rate: float = 0.5  # successes among rows sent to download
    max_success_rate_drop: float = 0.05  # how far a re-download's success rate may fall below the published one
    min_image_side: int = 8  # pixels, of the image as served
    max_image_side: int = 16384


@dataclass(frozen=True)
class CheckSpec:
    name: str
    description: str


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    metadata: Mapping[str, Any]


RAW_SHARD_CHECKS = (
    CheckSpec("raw_schema", "columns and dtypes are exactly the raw shard schema"),
    CheckSpec("uid_unique", "every uid occurs once in the shard"),
    CheckSpec("captions_non_empty", "enough rows have a non-empty caption"),
)
DOWNLOAD_CHECKS = (
    CheckSpec("rows_accounted", "every input row appears exactly once in the download ledger"),
    CheckSpec("download_success_rate", "successful downloads among attempted rows reach the floor"),
    CheckSpec("image_size_bounds", "downloaded images' original sides lie within the configured bounds"),
    CheckSpec("not_worse_than_published", "a re-download's success rate is not below the published one's by more"),
)

SUBSET_CHECKS = (
    CheckSpec(
        "membership_accounted",
        "each variant's membership holds every downloaded pair of the shard once, and its tar exactly the kept ones",
    ),
)

SCORE_CHECKS = (
    CheckSpec("uid_coverage", "the scored uids are exactly the shard's successfully downloaded uids, once each"),
)
CAPTION_CHECKS = (
    CheckSpec(
        "captions_cover_images",
        "every successfully downloaded image has each of its candidate captions (ranks 0..n-1) once, none null",
    ),
)
SYNTHETIC_SCORE_CHECKS = (
    CheckSpec("candidates_scored", "every synthetic candidate caption of the shard is scored once, with a score"),
)


@functools.cache
def _batch_definition() -> Any:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # GX would post usage events to the internet
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("ca_platform")
    return source.add_dataframe_asset("shard").add_batch_definition_whole_dataframe("whole_shard")


def _run(name: str, frame: pl.DataFrame, expectations: Sequence[Any]) -> CheckOutcome:
    batch = _batch_definition().get_batch(batch_parameters={"dataframe": frame.to_pandas()})
    metadata: dict[str, Any] = {}
    passed = True
    for expectation in expectations:
        result = batch.validate(expectation)
        passed = passed and bool(result.success)
        summary = {k: v for k, v in result.result.items() if k in _SUMMARY_KEYS}
        metadata[type(expectation).__name__] = {"success": bool(result.success), **summary}
    return CheckOutcome(name, passed, metadata)


_SUMMARY_KEYS = ("observed_value", "element_count", "unexpected_count", "unexpected_percent", "partial_unexpected_list")


OFFENDING_ROWS_SHOWN = 20  # rows a check names in its metadata; the count covers all of them


def _with_offending_rows(outcome: CheckOutcome, raw: pl.DataFrame, offending: pl.Expr) -> CheckOutcome:
    """`outcome` naming the rows behind it (row index and uid, first few) and their count, not only a share."""
    rows = raw.filter(offending).sort(ROW_INDEX)
    named = rows.head(OFFENDING_ROWS_SHOWN).select(ROW_INDEX, UID).to_dicts()
    metadata = {**outcome.metadata, "offending_row_count": rows.height, "offending_rows": named}
    return CheckOutcome(outcome.name, outcome.passed, metadata)


def check_raw_shard(raw: pl.DataFrame, thresholds: QualityThresholds) -> list[CheckOutcome]:
    import great_expectations.expectations as gxe

    caption = pl.col(CAPTION).fill_null("").str.strip_chars()
    captions = raw.select(caption)
    return [
        _run(
            "raw_schema",
            raw,
            [
                gxe.ExpectTableColumnsToMatchOrderedList(column_list=list(schemas.RAW_SHARD)),
                gxe.ExpectColumnValuesToBeOfType(column=ROW_INDEX, type_="int64"),
                gxe.ExpectColumnValuesToNotBeNull(column=UID),
                gxe.ExpectColumnValuesToNotBeNull(column=SHARD),
            ],
        ),
        _with_offending_rows(
            _run("uid_unique", raw.select(UID), [gxe.ExpectColumnValuesToBeUnique(column=UID)]),
            raw,
            pl.col(UID).is_duplicated(),
        ),
        _with_offending_rows(
            _run(
                "captions_non_empty",
                captions,
                [
                    gxe.ExpectColumnValueLengthsToBeBetween(
                        column=CAPTION, min_value=1, mostly=thresholds.min_caption_fraction
                    ),
                ],
            ),
            raw,
            caption == "",
        ),
    ]


def check_download(ledger: pl.DataFrame, input_uids: pl.Series, thresholds: QualityThresholds) -> list[CheckOutcome]:
    import great_expectations.expectations as gxe

    attempted = ledger.filter(pl.col(STATUS) != Status.SKIPPED).select(STATUS)
    successes = ledger.filter(pl.col(STATUS) == Status.SUCCESS).select("original_width", "original_height")
    unknown_uids = ledger.filter(~pl.col(UID).is_in(input_uids.implode())).height
    sides = [
        gxe.ExpectColumnValuesToBeBetween(
            column=side, min_value=thresholds.min_image_side, max_value=thresholds.max_image_side
        )
        for side in ("original_width", "original_height")
    ]
    accounted = _run(
        "rows_accounted",
        ledger.select(UID, STATUS),
        [
            gxe.ExpectTableRowCountToEqual(value=input_uids.len()),
            gxe.ExpectColumnValuesToBeUnique(column=UID),
            gxe.ExpectColumnValuesToNotBeNull(column=STATUS),
            gxe.ExpectColumnValuesToBeInSet(column=STATUS, value_set=list(Status.ALL)),
        ],
    )
    accounted = CheckOutcome(
        accounted.name, accounted.passed and unknown_uids == 0, {**accounted.metadata, "unknown_uids": unknown_uids}
    )
    rate = _run(
        "download_success_rate",
        attempted,
        [
            gxe.ExpectColumnValuesToBeInSet(
                column=STATUS, value_set=[Status.SUCCESS], mostly=thresholds.min_download_success_rate
            ),
        ],
    )
    if not rate.passed:
        observed = success_rate(ledger) or 0.0
        reason = f"success rate {observed:.3f} is below the floor {thresholds.min_download_success_rate}"
        rate = CheckOutcome(rate.name, False, {**rate.metadata, "reason": reason})
    return [accounted, rate, _run("image_size_bounds", successes, sides)]


def check_scores(scores: pl.DataFrame, ledger: pl.DataFrame) -> list[CheckOutcome]:
    import great_expectations.expectations as gxe

    downloaded = ledger.filter(pl.col(STATUS) == Status.SUCCESS)[UID]
    missing = downloaded.filter(~downloaded.is_in(scores[UID].implode()))
    unexpected = scores[UID].filter(~scores[UID].is_in(downloaded.implode()))
    outcome = _run(
        "uid_coverage",
        scores.select(UID, "score"),
        [
            gxe.ExpectTableRowCountToEqual(value=downloaded.len()),
            gxe.ExpectColumnValuesToBeUnique(column=UID),
            gxe.ExpectColumnValuesToNotBeNull(column="score"),
        ],
    )
    return [
        CheckOutcome(
            outcome.name,
            outcome.passed and missing.len() == 0 and unexpected.len() == 0,
            {
                **outcome.metadata,
                "missing_uids": missing.head(10).to_list(),
                "unexpected_uids": unexpected.head(10).to_list(),
            },
        )
    ]


def success_rate(ledger: pl.DataFrame) -> float | None:
    """Successful downloads among the rows sent to download; None when none were."""
    attempted = ledger.filter(pl.col(STATUS) != Status.SKIPPED)
    return attempted.filter(pl.col(STATUS) == Status.SUCCESS).height / attempted.height if attempted.height else None


def check_not_worse(
    ledger: pl.DataFrame, published: pl.DataFrame | None, thresholds: QualityThresholds
) -> CheckOutcome:
    """A new download may not replace a clearly better published one (link rot, a host down for the day)."""
    name = "not_worse_than_published"
    new_rate = success_rate(ledger)
    old_rate = success_rate(published) if published is not None else None
    metadata: dict[str, Any] = {
        "success_rate": new_rate,
        "published_success_rate": old_rate,
        "max_drop": thresholds.max_success_rate_drop,
    }
    if old_rate is None or new_rate is None or new_rate >= old_rate - thresholds.max_success_rate_drop:
        return CheckOutcome(name, True, metadata)
    reason = f"success rate {new_rate:.3f} is below the published {old_rate:.3f} by more than {metadata['max_drop']}"
    return CheckOutcome(name, False, {**metadata, "reason": reason})


def check_subsets(
    memberships: Mapping[str, pl.DataFrame], written: Mapping[str, Sequence[str]], downloaded: pl.Series
) -> CheckOutcome:
    """Nothing lost between the ledger and a shard's subsets: per variant, the membership is the downloaded
    uids once each, and the tar holds exactly the kept ones (`written`: the uids written to its tar)."""
    expected = set(downloaded.to_list())
    per_variant: dict[str, Any] = {}
    problems = []
    for variant, membership in memberships.items():
        uids = membership[UID].to_list()
        kept = set(membership.filter(pl.col("kept"))[UID].to_list())
        in_tar = set(written.get(variant, []))
        report = {
            "pairs": len(uids),
            "downloaded": len(expected),
            "kept": len(kept),
            "written": len(in_tar),
            "duplicated_uids": sorted(uid for uid, n in Counter(uids).items() if n > 1)[:10],
            "not_ranked": sorted(expected - set(uids))[:10],
            "not_downloaded": sorted(set(uids) - expected)[:10],
            "kept_not_in_tar": sorted(kept - in_tar)[:10],
        }
        per_variant[variant] = report
        if len(set(uids)) != len(uids) or set(uids) != expected or kept != in_tar:
            problems.append(
                f"{variant}: {len(uids)} pairs ranked of {len(expected)} downloaded, {len(kept)} kept, "
                f"{len(in_tar)} in its tar"
            )
    metadata: dict[str, Any] = dict(per_variant)
    if problems:
        metadata["reason"] = "; ".join(problems) + " (rescore the shard or download it again)"
    return CheckOutcome(SUBSET_CHECKS[0].name, not problems, metadata)


def _missing_and_unexpected(found: pl.DataFrame, expected: pl.DataFrame, keys: list[str]) -> dict[str, Any]:
    """The first few expected key rows that `found` lacks and found rows that were not expected, with counts."""
    missing = expected.select(keys).join(found.select(keys), on=keys, how="anti", nulls_equal=True)
    unexpected = found.select(keys).join(expected.select(keys), on=keys, how="anti", nulls_equal=True)
    return {
        "missing_count": missing.height,
        "missing": missing.head(10).to_dicts(),
        "unexpected_count": unexpected.height,
        "unexpected": unexpected.head(10).to_dicts(),
    }


def check_synthetic_captions(captions: pl.DataFrame, ledger: pl.DataFrame, candidates: int) -> list[CheckOutcome]:
    """Each downloaded image has exactly `candidates` captions, ranked 0..candidates-1, none null, and no caption
    belongs to an image that was not downloaded."""
    import great_expectations.expectations as gxe

    downloaded = ledger.filter(pl.col(STATUS) == Status.SUCCESS).select(UID)
    expected = downloaded.join(pl.DataFrame({schemas.RANK: pl.Series(range(candidates), dtype=pl.Int32)}), how="cross")
    outcome = _run(
        CAPTION_CHECKS[0].name,
        captions.select(UID, schemas.RANK, CAPTION),
        [
            gxe.ExpectTableRowCountToEqual(value=expected.height),
            gxe.ExpectCompoundColumnsToBeUnique(column_list=[UID, schemas.RANK]),
            gxe.ExpectColumnValuesToNotBeNull(column=CAPTION),
        ],
    )
    coverage = _missing_and_unexpected(captions, expected, [UID, schemas.RANK])
    passed = outcome.passed and coverage["missing_count"] == 0 and coverage["unexpected_count"] == 0
    return [CheckOutcome(outcome.name, passed, {**outcome.metadata, **coverage})]


def check_synthetic_scores(scores: pl.DataFrame, captions: pl.DataFrame) -> list[CheckOutcome]:
    """Every candidate caption of the captions table is scored exactly once, with a non-null score."""
    import great_expectations.expectations as gxe

    expected = captions.select(UID, pl.col(schemas.RANK).alias(schemas.CAPTION_RANK))
    outcome = _run(
        SYNTHETIC_SCORE_CHECKS[0].name,
        scores.select(UID, schemas.CAPTION_RANK, "score"),
        [
            gxe.ExpectTableRowCountToEqual(value=expected.height),
            gxe.ExpectCompoundColumnsToBeUnique(column_list=[UID, schemas.CAPTION_RANK]),
            gxe.ExpectColumnValuesToNotBeNull(column="score"),
        ],
    )
    coverage = _missing_and_unexpected(scores, expected, [UID, schemas.CAPTION_RANK])
    passed = outcome.passed and coverage["missing_count"] == 0 and coverage["unexpected_count"] == 0
    return [CheckOutcome(outcome.name, passed, {**outcome.metadata, **coverage})]
