"""The curation report: each training set's size and what the models trained on it achieve.

It reports what was measured. The method's claim is that `reward_topk` matches or beats `full` at a
fraction of the data, with `clipscore_topk` and `random_topk` as the baselines at the same size; whether it
holds on a given pool is for the tables to say. The paper's result is a curve, so every ranking is trained at
every keep fraction k of the compression curve: one table per k, and each figure drawn against k. Each figure
comes with its spread over training seeds and a bootstrap interval over the evaluation items, and each training
set's difference from `full` and from `clipscore_topk` at the same k is marked when it is outside noise (see
`intervals`), so the tables do not invite reading a ranking into differences the evaluation cannot tell apart.

Here: reading every training set's evaluations into rows (`curation_rows`), their intervals and verdicts, and
writing the report; the rows themselves in `report_rows`, their tables and text in `report_text`, their figures
in `report_plots`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ca_platform import layout
from ca_platform.evaluation import intervals
from ca_platform.evaluation.intervals import BootstrapSettings, ItemTable
from ca_platform.evaluation.report_plots import curation_curve_plot, curation_plot
from ca_platform.evaluation.report_rows import CLASSIFICATION_METRICS, CurationRow, curve_fractions, references_of
from ca_platform.evaluation.report_text import curation_markdown, per_k_tables
from ca_platform.schemas import FULL, VARIANT_SCORERS
from ca_platform.storage import DataStore, read_json, write_json


class NotEvaluatedError(LookupError):
    """A variant lacks an evaluation or a threshold the report needs; the message says which to materialize."""


def curation_rows(
    store: DataStore, scratch: Path, settings: BootstrapSettings = BootstrapSettings(), classification: bool = False
) -> list[CurationRow]:
    """Each training set's row (full, then every published cut: each variant at each k), from the
    score-threshold, preference-accuracy and evaluation reports, with the intervals and the differences from the
    references computed from the evaluations' per-item results; with `classification`, its zero-shot accuracy
    too (of the same CLIPs retrieval measured, on the current labelled set), bootstrapped over the labelled
    images the same way."""
    thresholds = read_json(store, layout.SCORE_THRESHOLD_REPORT_KEY, scratch) or {}
    accuracy = read_json(store, layout.PREFERENCE_ACCURACY_REPORT_KEY, scratch) or {}
    labelled = read_json(store, layout.CURRENT_CLASSIFICATION_KEY, scratch) if classification else None
    rows, per_item = [], {}
    for key in layout.in_training_set_order({FULL, *thresholds}):
        retrieval = read_json(store, layout.variant_report_key(layout.RETRIEVAL_REPORT, key), scratch)
        captioning = read_json(store, layout.variant_report_key(layout.CAPTIONING_REPORT, key), scratch)
        if retrieval is None or captioning is None:
            raise NotEvaluatedError(
                f"training set {key} has not been evaluated: materialize retrieval_eval and "
                f"captioning_eval for partition {key} first"
            )
        documents = {"retrieval_eval": retrieval, "captioning_eval": captioning}
        if classification:
            documents["classification_eval"] = _classification(store, key, retrieval, labelled, scratch)
        zero_shot = documents.get("classification_eval", {})
        variant, keep_fraction = layout.parse_training_set_key(key)
        if key == FULL:
            kept_fraction = 1.0
        else:
            kept_fraction = thresholds[key]["kept"] / thresholds[key]["total"]
        scorer = VARIANT_SCORERS.get(variant)
        per_item[key] = variant_item_results(key, documents)
        rows.append(
            CurationRow(
                variant=key,
                kept_fraction=kept_fraction,
                scorer_preference_accuracy=accuracy.get(scorer) if scorer else None,
                i2t_r1=retrieval["i2t_r1"],
                t2i_r1=retrieval["t2i_r1"],
                i2t_r5=retrieval["i2t_r5"],
                t2i_r5=retrieval["t2i_r5"],
                cider=captioning["cider"],
                bleu4=captioning["bleu4"],
                top1=zero_shot.get("top1"),
                top5=zero_shot.get("top5"),
                seeds=len(retrieval.get("per_seed", {})) or 1,
                spread={**retrieval.get("spread", {}), **captioning.get("spread", {}), **zero_shot.get("spread", {})},
                keep_fraction=keep_fraction,
            )
        )
    return with_intervals(rows, per_item, settings)


@dataclass(frozen=True)
class ItemResults:
    """One metric of one variant as evaluated item by item: the item ids, in the order of the table's items, and
    the training seeds of its rows, in order."""

    items: tuple[str, ...]
    seeds: tuple[str, ...]
    table: ItemTable


def variant_item_results(variant: str, documents: Mapping[str, Mapping[str, Any]]) -> dict[str, ItemResults]:
    """Every metric's per-item results from a variant's evaluation reports, keyed by the asset that wrote each
    (named when one predates per-item results)."""
    results = {}
    for asset, document in documents.items():
        if "per_item" not in document:
            raise NotEvaluatedError(
                f"the {asset} report of training set {variant} has no per-item results (written by an older version): "
                f"materialize {asset} for partition {variant} again"
            )
        items, seeds = tuple(document["items"]), tuple(sorted(document["per_item"], key=int))
        tables = intervals.item_tables(document)
        results.update({metric: ItemResults(items, seeds, table) for metric, table in tables.items()})
    return results


def with_intervals(
    rows: Sequence[CurationRow], per_item: Mapping[str, Mapping[str, ItemResults]], settings: BootstrapSettings
) -> list[CurationRow]:
    """The rows with each metric's interval over items and each training set's paired differences from the
    references among them: `full`, and `clipscore_topk` at the set's own k (at every k of the rows for a set
    without one), so a comparison never crosses keep fractions. `per_item` is keyed by training set."""
    fractions = curve_fractions(rows) or [None]
    updated = []
    for row in rows:
        results = per_item[row.variant]
        interval = {}
        for metric, result in results.items():
            measured = intervals.figure(result.table, settings)
            reported = getattr(row, metric, None)
            if reported is not None and not math.isclose(measured.mean, reported, rel_tol=1e-9, abs_tol=1e-12):
                raise ValueError(
                    f"training set {row.variant}: the per-item results give {metric} {measured.mean!r}, the report "
                    f"{reported!r}; evaluate it again"
                )
            interval[metric] = [measured.low, measured.high]
        ks = [row.keep_fraction] if row.keep_fraction is not None else fractions
        references = dict.fromkeys(key for k in ks for _, key in references_of(row, k) if key in per_item)
        versus = {}
        for reference in references:
            versus[reference] = {}
            for metric, result in results.items():
                base = per_item[reference].get(metric)
                if base is None:
                    continue
                if base.items != result.items:
                    raise ValueError(
                        f"{metric} of {row.variant} and of {reference} cover different evaluation items: evaluate "
                        "both on the current evaluation set"
                    )
                if base.seeds != result.seeds:  # a paired difference pairs seed i with seed i
                    raise NotEvaluatedError(
                        f"{metric} of {row.variant} was evaluated for seeds {list(result.seeds)}, of {reference} for "
                        f"{list(base.seeds)}: evaluate both with the same training seeds"
                    )
                versus[reference][metric] = intervals.difference(result.table, base.table, settings).as_json()
        evaluated = [result.items for metric, result in results.items() if metric not in CLASSIFICATION_METRICS]
        labelled = [results[metric].items for metric in CLASSIFICATION_METRICS if metric in results]
        updated.append(
            replace(
                row,
                interval=interval,
                versus=versus,
                evaluation_items=len(evaluated[0]) if evaluated else 0,
                labelled_items=len(labelled[0]) if labelled else 0,
                bootstrap=settings.as_json(),
            )
        )
    return updated


def _classification(
    store: DataStore, variant: str, retrieval: dict[str, Any], labelled: dict[str, Any] | None, scratch: Path
) -> dict[str, Any]:
    """The training set's classification report, refused when it measured other CLIPs than retrieval did or
    another labelled set than the current one (a report of an earlier run)."""
    document = read_json(store, layout.variant_report_key(layout.CLASSIFICATION_REPORT, variant), scratch)
    if document is None or labelled is None:
        raise NotEvaluatedError(
            f"training set {variant} has no zero-shot classification: materialize classification_set, then "
            f"classification_eval for partition {variant}"
        )
    if document["model_versions"] != retrieval["model_versions"]:
        raise NotEvaluatedError(
            f"training set {variant}: classification_eval measured CLIP versions {document['model_versions']}, "
            f"retrieval_eval {retrieval['model_versions']}: materialize classification_eval for {variant} again"
        )
    if document["classification_version"] != labelled["version"]:
        raise NotEvaluatedError(
            f"training set {variant}: classification_eval measured labelled set {document['classification_version']}, "
            f"the current one is {labelled['version']}: materialize classification_eval for {variant} again"
        )
    return document


@dataclass(frozen=True)
class CurationReport:
    rows: list[CurationRow]
    table: str  # markdown: one table per keep fraction
    plot: Path
    curve: Path  # the figures against the keep fraction


MARKDOWN_HEADING = "### keep fraction k = {k:g}"


def write_curation_report(
    store: DataStore, scratch: Path, settings: BootstrapSettings = BootstrapSettings(), classification: bool = False
) -> CurationReport:
    """The report across the training sets, published as JSON (one entry per training set), markdown (a table
    per keep fraction), the bar plot and the compression curve's plot; with `classification`, each training
    set's zero-shot accuracy too."""
    rows = curation_rows(store, scratch, settings, classification)
    write_json(store, layout.CURATION_REPORT_KEY, {row.variant: row.as_json() for row in rows}, scratch)
    table = per_k_tables(rows, curation_markdown, MARKDOWN_HEADING)
    (scratch / "report.md").write_text(table + "\n")
    store.put_file(scratch / "report.md", layout.CURATION_TABLE_KEY, consume=True)
    plot = curation_plot(rows, scratch / "report.png")
    store.put_file(plot, layout.CURATION_PLOT_KEY, consume=False)
    curve = curation_curve_plot(rows, scratch / "curve.png")
    store.put_file(curve, layout.CURATION_CURVE_PLOT_KEY, consume=False)
    return CurationReport(rows, table, plot, curve)
