"""The curation report: each training-set variant's size and what the models trained on it achieve.

It reports what was measured. The method's claim is that `reward_topk` matches or beats `full` at a
fraction of the data, with `clipscore_topk` and `random_topk` as the baselines at the same size; whether it
holds on a given pool is for the table to say. Each figure comes with its spread over training seeds and a
bootstrap interval over the evaluation items, and each variant's difference from `full` and from
`clipscore_topk` is marked when it is outside noise (see `intervals`), so the table does not invite reading
a ranking into differences the evaluation cannot tell apart.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ca_platform import layout
from ca_platform.analytics.plots import markdown_table, pyplot
from ca_platform.evaluation import intervals
from ca_platform.evaluation.intervals import BootstrapSettings, Difference, ItemTable
from ca_platform.schemas import (
    CLIPSCORE_TOPK,
    FULL,
    RAW_TOPK_PLUS_RECAP,
    RECAP_ALL,
    RECAP_MIX,
    REWARD_BEST_CAPTION,
    REWARD_TOPK,
    TRAINING_VARIANTS,
    VARIANT_SCORERS,
)
from ca_platform.storage import DataStore, read_json, write_json

# The table's figures, in its column order, with their headers.
METRIC_LABELS = {
    "i2t_r1": "I->T R@1",
    "t2i_r1": "T->I R@1",
    "i2t_r5": "I->T R@5",
    "t2i_r5": "T->I R@5",
    "cider": "CIDEr-D",
    "bleu4": "BLEU-4",
}
METRICS = tuple(METRIC_LABELS)
# What every variant is compared with, and the markers of a difference outside noise (above, below).
REFERENCE_MARKERS = {FULL: ("▲", "▼"), CLIPSCORE_TOPK: ("↑", "↓")}

# Which captions each variant trains on.
CAPTIONS = {
    RECAP_ALL: "synthetic",
    RAW_TOPK_PLUS_RECAP: "raw top k + synthetic",
    RECAP_MIX: "raw/synthetic mix",
    REWARD_BEST_CAPTION: "reward's best",
}


@dataclass(frozen=True)
class CurationRow:
    variant: str
    kept_fraction: float
    scorer_preference_accuracy: float | None  # held-out human preference accuracy of the ranking scorer
    i2t_r1: float  # each metric: the mean over the seeds' models
    t2i_r1: float
    i2t_r5: float
    t2i_r5: float
    cider: float
    bleu4: float
    seeds: int = 1
    spread: dict[str, float] = field(default_factory=dict)  # metric -> sample standard deviation over seeds
    interval: dict[str, list[float]] = field(default_factory=dict)  # metric -> [low, high] over evaluation items
    # reference variant -> metric -> this variant's difference from it (Difference.as_json)
    versus: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    evaluation_items: int = 0  # the evaluation images the intervals resample
    bootstrap: dict[str, Any] = field(default_factory=dict)  # BootstrapSettings.as_json

    def outside_noise(self, reference: str, metric: str) -> Difference | None:
        """The difference from `reference` on `metric` when it is outside noise."""
        compared = self.versus.get(reference, {}).get(metric)
        if compared is None or not compared["outside_noise"]:
            return None
        return Difference(compared["difference"], compared["low"], compared["high"])

    def as_json(self) -> dict[str, Any]:
        document = asdict(self)
        document.pop("variant")
        return document


COLUMNS = ("variant", "captions", "kept fraction", "scorer pref. acc.", *METRIC_LABELS.values())


def figure_cell(row: CurationRow, metric: str) -> str:
    """`mean ± seed spread [low, high]` and the markers of the differences outside noise."""
    value = f"{getattr(row, metric):.3f}"
    if row.seeds > 1:
        value += f" ± {row.spread.get(metric, 0.0):.3f}"
    if metric in row.interval:
        low, high = row.interval[metric]
        value += f" [{low:.3f}, {high:.3f}]"
    markers = ""
    for reference, (above, below) in REFERENCE_MARKERS.items():
        compared = row.outside_noise(reference, metric)
        if compared is not None:
            markers += above if compared.low > 0 else below
    return f"{value} {markers}" if markers else value


def _row_cells(row: CurationRow) -> list[Any]:
    accuracy = "n/a" if row.scorer_preference_accuracy is None else f"{row.scorer_preference_accuracy:.3f}"
    return [
        row.variant,
        CAPTIONS.get(row.variant, "raw"),
        f"{row.kept_fraction:.3f}",
        accuracy,
        *(figure_cell(row, metric) for metric in METRICS),
    ]


def curation_markdown(rows: Sequence[CurationRow]) -> str:
    """One table of the given rows (any set of variants), its legend and what it measured."""
    return "\n\n".join([markdown_table(COLUMNS, [_row_cells(row) for row in rows]), *_notes(rows)])


def curation_text(rows: Sequence[CurationRow]) -> str:
    """The same table for a terminal, with its legend and what it measured."""
    cells = [list(COLUMNS)] + [[str(c) for c in _row_cells(row)] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    notes = [textwrap.fill(note, width=120) for note in _notes(rows)]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:], *notes])


def _notes(rows: Sequence[CurationRow]) -> list[str]:
    return [text for text in (curation_legend(rows), measured_text(rows)) if text]


def curation_legend(rows: Sequence[CurationRow]) -> str:
    """What a cell shows, from the settings the rows were computed with."""
    if not rows:
        return ""
    seeds, settings = max(row.seeds for row in rows), rows[0].bootstrap
    parts = [f"mean ± sample standard deviation over {seeds} training seeds"] if seeds > 1 else []
    if settings:
        parts.append(
            f"[low, high]: {settings['confidence']:.0%} percentile bootstrap interval over the "
            f"{rows[0].evaluation_items} evaluation images ({settings['resamples']} resamples, seed {settings['seed']})"
        )
    compared = [r for r in REFERENCE_MARKERS if any(r in row.versus for row in rows)]
    if compared:
        markers = ", ".join(f"{REFERENCE_MARKERS[r][0]}/{REFERENCE_MARKERS[r][1]} above/below {r}" for r in compared)
        parts.append(
            f"{markers}, outside noise: the {settings['confidence']:.0%} paired bootstrap interval of the difference "
            "(the same images and the same seeds resampled for both variants) excludes 0"
        )
    return "; ".join(parts) + "." if parts else ""


def measured_text(rows: Sequence[CurationRow]) -> str:
    """What the table measured, from its figures: each variant's differences outside noise from each reference,
    how many of the comparisons those are, and how many chance alone would give."""
    settings = rows[0].bootstrap if rows else {}
    sentences = [_method_sentence(rows)] if any(r.variant == REWARD_TOPK and FULL in r.versus for r in rows) else []
    compared = outside = 0
    for reference in REFERENCE_MARKERS:
        others = [row for row in rows if reference in row.versus]
        if not others:
            continue
        found = []
        for row in others:
            differences = [(m, row.outside_noise(reference, m)) for m in METRICS if m in row.versus[reference]]
            compared += len(differences)
            named = [
                f"{'higher' if d.low > 0 else 'lower'} {METRIC_LABELS[m]} "
                f"({d.difference:+.3f} [{d.low:+.3f}, {d.high:+.3f}])"
                for m, d in differences
                if d is not None
            ]
            outside += len(named)
            if named:
                found.append(f"{row.variant} {', '.join(named)}")
        if found:
            sentences.append(f"Outside noise against {reference}: {'; '.join(found)}.")
        else:
            sentences.append(f"No variant differs from {reference} outside noise on any figure.")
    if not compared:
        return ""
    expected = compared * (1 - settings["confidence"])
    sentences.append(
        f"{outside} of {compared} comparisons are outside noise; with no true difference anywhere about "
        f"{expected:.1f} would be by chance at {settings['confidence']:.0%}. The other differences are within the "
        "noise of the evaluation images and the training seeds: this run does not rank those variants on those "
        "figures."
    )
    return " ".join(sentences)


def _method_sentence(rows: Sequence[CurationRow]) -> str:
    """The method's claim as measured: reward_topk against full, figure by figure."""
    row = next(r for r in rows if r.variant == REWARD_TOPK)
    verdicts: dict[str, list[str]] = {"higher": [], "lower": [], "within noise": []}
    for metric in (m for m in METRICS if m in row.versus[FULL]):
        compared = row.outside_noise(FULL, metric)
        side = "within noise" if compared is None else "higher" if compared.low > 0 else "lower"
        verdicts[side].append(METRIC_LABELS[metric])
    said = [f"{side} on {', '.join(labels)}" for side, labels in verdicts.items() if labels]
    claim = f"The method's claim, {REWARD_TOPK} against {FULL} at {row.kept_fraction:.0%} of the pairs"
    return f"{claim}: {'; '.join(said)}."


def outside_noise(rows: Sequence[CurationRow]) -> dict[str, dict[str, dict[str, float]]]:
    """variant -> reference -> metric -> difference, for the table's differences outside noise only."""
    found: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        for reference in row.versus:
            for metric in METRICS:
                compared = row.outside_noise(reference, metric)
                if compared is not None:
                    found.setdefault(row.variant, {}).setdefault(reference, {})[metric] = compared.difference
    return found


def curation_plot(rows: Sequence[CurationRow], path: Path) -> Path:
    """Retrieval recall (left) and captioning scores (right) per variant, bars side by side, with the bootstrap
    interval over the evaluation images as error bars (the spread over seeds where rows have no interval)."""
    variants = [row.variant for row in rows]
    x = np.arange(len(rows))
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(max(10, 1.5 * len(rows)), 4.2), dpi=100)
    panels = (
        (
            left,
            "retrieval (CLIP)",
            {"I->T R@1": "i2t_r1", "T->I R@1": "t2i_r1", "I->T R@5": "i2t_r5", "T->I R@5": "t2i_r5"},
        ),
        (right, "captioning (BLIP)", {"CIDEr-D": "cider", "BLEU-4": "bleu4"}),
    )
    for axes, title, metrics in panels:
        width = 0.8 / len(metrics)
        for offset, (label, metric) in enumerate(metrics.items()):
            values = np.array([getattr(r, metric) for r in rows])
            if all(metric in r.interval for r in rows):
                bounds = np.array([r.interval[metric] for r in rows])
                error: np.ndarray | None = np.abs(np.stack([values - bounds[:, 0], bounds[:, 1] - values]))
            else:
                error = np.array([r.spread.get(metric, 0.0) for r in rows]) if any(r.seeds > 1 for r in rows) else None
            position = x + (offset - (len(metrics) - 1) / 2) * width
            axes.bar(position, values, width, yerr=error, capsize=2, label=label)
        confidence = rows[0].bootstrap.get("confidence") if rows else None
        axes.set_title(f"{title}; bars: {confidence:.0%} interval over images" if confidence else title, fontsize=9)
        axes.set_xticks(x, [f"{v}\n({r.kept_fraction:.2f})" for v, r in zip(variants, rows)], fontsize=7, rotation=30)
        axes.legend(fontsize=7)
    left.set_ylim(0, 1)
    figure.suptitle("training-set variant (kept fraction)", fontsize=9, y=0.02)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)
    return path


class NotEvaluatedError(LookupError):
    """A variant lacks an evaluation or a threshold the report needs; the message says which to materialize."""


def curation_rows(
    store: DataStore, scratch: Path, settings: BootstrapSettings = BootstrapSettings()
) -> list[CurationRow]:
    """Each training variant's row, from the score-threshold, preference-accuracy and evaluation reports, with
    the intervals and the differences from the references computed from the evaluations' per-item results."""
    thresholds = read_json(store, layout.SCORE_THRESHOLD_REPORT_KEY, scratch) or {}
    accuracy = read_json(store, layout.PREFERENCE_ACCURACY_REPORT_KEY, scratch) or {}
    rows, per_item = [], {}
    for variant in (v for v in TRAINING_VARIANTS if v == FULL or v in thresholds):
        retrieval = read_json(store, layout.variant_report_key(layout.RETRIEVAL_REPORT, variant), scratch)
        captioning = read_json(store, layout.variant_report_key(layout.CAPTIONING_REPORT, variant), scratch)
        if retrieval is None or captioning is None:
            raise NotEvaluatedError(
                f"variant {variant} has not been evaluated: materialize retrieval_eval and "
                f"captioning_eval for partition {variant} first"
            )
        if variant == FULL:
            kept_fraction = 1.0
        else:
            kept_fraction = thresholds[variant]["kept"] / thresholds[variant]["total"]
        scorer = VARIANT_SCORERS.get(variant)
        per_item[variant] = variant_item_results(
            variant, {"retrieval_eval": retrieval, "captioning_eval": captioning}
        )
        rows.append(
            CurationRow(
                variant=variant,
                kept_fraction=kept_fraction,
                scorer_preference_accuracy=accuracy.get(scorer) if scorer else None,
                i2t_r1=retrieval["i2t_r1"],
                t2i_r1=retrieval["t2i_r1"],
                i2t_r5=retrieval["i2t_r5"],
                t2i_r5=retrieval["t2i_r5"],
                cider=captioning["cider"],
                bleu4=captioning["bleu4"],
                seeds=len(retrieval.get("per_seed", {})) or 1,
                spread={**retrieval.get("spread", {}), **captioning.get("spread", {})},
            )
        )
    return with_intervals(rows, per_item, settings)


@dataclass(frozen=True)
class ItemResults:
    """One metric of one variant as evaluated item by item: the item ids, in the order of the table's items."""

    items: tuple[str, ...]
    table: ItemTable


def variant_item_results(variant: str, documents: Mapping[str, Mapping[str, Any]]) -> dict[str, ItemResults]:
    """Every metric's per-item results from a variant's evaluation reports, keyed by the asset that wrote each
    (named when one predates per-item results)."""
    results = {}
    for asset, document in documents.items():
        if "per_item" not in document:
            raise NotEvaluatedError(
                f"the {asset} report of variant {variant} has no per-item results (written by an older version): "
                f"materialize {asset} for partition {variant} again"
            )
        items = tuple(document["items"])
        results.update({metric: ItemResults(items, table) for metric, table in intervals.item_tables(document).items()})
    return results


def with_intervals(
    rows: Sequence[CurationRow], per_item: Mapping[str, Mapping[str, ItemResults]], settings: BootstrapSettings
) -> list[CurationRow]:
    """The rows with each metric's interval over items and each variant's paired differences from the
    references among them (any set of rows: a table per kept fraction compares within itself)."""
    references = [r for r in REFERENCE_MARKERS if r in per_item]
    updated = []
    for row in rows:
        results = per_item[row.variant]
        interval = {}
        for metric, result in results.items():
            measured = intervals.figure(result.table, settings)
            reported = getattr(row, metric, None)
            if reported is not None and not math.isclose(measured.mean, reported, rel_tol=1e-9, abs_tol=1e-12):
                raise ValueError(
                    f"variant {row.variant}: the per-item results give {metric} {measured.mean!r}, the report "
                    f"{reported!r}; evaluate the variant again"
                )
            interval[metric] = [measured.low, measured.high]
        versus = {}
        for reference in (r for r in references if r != row.variant):
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
                versus[reference][metric] = intervals.difference(result.table, base.table, settings).as_json()
        first = next(iter(results.values()))
        updated.append(
            replace(
                row,
                interval=interval,
                versus=versus,
                evaluation_items=len(first.items),
                bootstrap=settings.as_json(),
            )
        )
    return updated


@dataclass(frozen=True)
class CurationReport:
    rows: list[CurationRow]
    table: str  # markdown
    plot: Path


def write_curation_report(
    store: DataStore, scratch: Path, settings: BootstrapSettings = BootstrapSettings()
) -> CurationReport:
    """The report across the training variants, published as JSON, markdown table and plot."""
    rows = curation_rows(store, scratch, settings)
    write_json(store, layout.CURATION_REPORT_KEY, {row.variant: row.as_json() for row in rows}, scratch)
    table = curation_markdown(rows)
    (scratch / "report.md").write_text(table + "\n")
    store.put_file(scratch / "report.md", layout.CURATION_TABLE_KEY, consume=True)
    plot = curation_plot(rows, scratch / "report.png")
    store.put_file(plot, layout.CURATION_PLOT_KEY, consume=False)
    return CurationReport(rows, table, plot)
