"""The curation report as tables and text: one table per keep fraction, each cell with its seed spread, interval
and the markers of the differences outside noise, the legend, and the paragraph saying what each table measured
(generated from the figures, whichever training set wins); the compression curve as a table.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from ca_platform import layout
from ca_platform.analytics.plots import markdown_table
from ca_platform.evaluation.report_rows import (
    CAPTIONS,
    METRIC_LABELS,
    METRICS,
    REFERENCE_MARKERS,
    CurationRow,
    curve_fractions,
    curve_metrics,
    reference_key,
    references_of,
    rows_at,
    table_metrics,
)
from ca_platform.schemas import FULL, REWARD_TOPK, TRAINING_VARIANTS


def _columns(rows: Sequence[CurationRow]) -> tuple[str, ...]:
    return (
        "variant",
        "captions",
        "kept fraction",
        "scorer pref. acc.",
        *(METRIC_LABELS[m] for m in table_metrics(rows)),
    )


def figure_cell(row: CurationRow, metric: str, keep_fraction: float | None = None) -> str:
    """`mean ± seed spread [low, high]` and the markers of the differences outside noise (from full and from
    clipscore_topk at the table's k); "n/a" for a figure the row lacks."""
    if getattr(row, metric) is None:
        return "n/a"
    value = f"{getattr(row, metric):.3f}"
    if row.seeds > 1:
        value += f" ± {row.spread.get(metric, 0.0):.3f}"
    if metric in row.interval:
        low, high = row.interval[metric]
        value += f" [{low:.3f}, {high:.3f}]"
    markers = ""
    for reference, key in references_of(row, keep_fraction):
        compared = row.outside_noise(key, metric)
        if compared is not None:
            above, below = REFERENCE_MARKERS[reference]
            markers += above if compared.low > 0 else below
    return f"{value} {markers}" if markers else value


def _row_cells(row: CurationRow, metrics: Sequence[str], keep_fraction: float | None) -> list[Any]:
    accuracy = "n/a" if row.scorer_preference_accuracy is None else f"{row.scorer_preference_accuracy:.3f}"
    return [
        row.variant,
        CAPTIONS.get(row.ranking, "raw"),
        f"{row.kept_fraction:.3f}",
        accuracy,
        *(figure_cell(row, metric, keep_fraction) for metric in metrics),
    ]


def curation_markdown(rows: Sequence[CurationRow], keep_fraction: float | None = None) -> str:
    """One table of the given rows (the sets cut at `keep_fraction` and those without a k), its legend and what
    it measured."""
    table = markdown_table(_columns(rows), [_row_cells(row, table_metrics(rows), keep_fraction) for row in rows])
    return "\n\n".join([table, *_notes(rows, keep_fraction)])


def per_k_tables(
    rows: Sequence[CurationRow], table: Callable[[Sequence[CurationRow], float | None], str], heading: str
) -> str:
    """One `table` per keep fraction (called with the rows at k, and k), each under `heading` (formatted with k); the
    rows as one table when none was cut."""
    fractions = curve_fractions(rows)
    if not fractions:
        return table(rows, None)
    return "\n\n".join(f"{heading.format(k=k)}\n\n{table(rows_at(rows, k), k)}" for k in fractions)


def curation_text(rows: Sequence[CurationRow], keep_fraction: float | None = None) -> str:
    """The same table for a terminal, with its legend and what it measured."""
    columns = _columns(rows)
    cells = [list(columns)] + [[str(c) for c in _row_cells(row, table_metrics(rows), keep_fraction)] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    notes = [textwrap.fill(note, width=120) for note in _notes(rows, keep_fraction)]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:], *notes])


def _notes(rows: Sequence[CurationRow], keep_fraction: float | None) -> list[str]:
    return [text for text in (curation_legend(rows, keep_fraction), measured_text(rows, keep_fraction)) if text]


def curation_legend(rows: Sequence[CurationRow], keep_fraction: float | None = None) -> str:
    """What a cell shows, from the settings the rows were computed with."""
    if not rows:
        return ""
    seeds, settings = max(row.seeds for row in rows), rows[0].bootstrap
    parts = [f"mean ± sample standard deviation over {seeds} training seeds"] if seeds > 1 else []
    if settings:
        parts.append(
            f"[low, high]: {settings['confidence']:.0%} percentile bootstrap interval over the "
            f"{rows[0].evaluation_items} evaluation images"
            + (f" (top-1/top-5: the {rows[0].labelled_items} labelled images)" if rows[0].labelled_items else "")
            + f" ({settings['resamples']} resamples, seed {settings['seed']})"
        )
    compared = {
        reference: key for row in rows for reference, key in references_of(row, keep_fraction) if key in row.versus
    }
    if compared:
        markers = ", ".join(
            f"{above}/{below} above/below {compared[reference]}"
            for reference, (above, below) in REFERENCE_MARKERS.items()
            if reference in compared
        )
        parts.append(
            f"{markers}, outside noise: the {settings['confidence']:.0%} paired bootstrap interval of the difference "
            "(the same images and the same seeds resampled for both training sets) excludes 0"
        )
    return "; ".join(parts) + "." if parts else ""


def measured_text(rows: Sequence[CurationRow], keep_fraction: float | None = None) -> str:
    """What the table at `keep_fraction` measured, from its figures: each training set's differences outside
    noise from each reference, how many of the comparisons those are, and how many chance alone would give."""
    settings = rows[0].bootstrap if rows else {}
    sentences = [f"At keep fraction k = {keep_fraction:g}:"] if keep_fraction is not None else []
    method = _method_sentence(rows, keep_fraction)
    sentences += [method] if method else []
    compared = outside = 0
    for reference in REFERENCE_MARKERS:
        found, others = [], 0
        for row in rows:
            key = dict(references_of(row, keep_fraction)).get(reference)
            if key is None or key not in row.versus:
                continue
            others += 1
            differences = [(m, row.outside_noise(key, m)) for m in METRICS if m in row.versus[key]]
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
        name = reference_key(reference, keep_fraction) or reference
        if found:
            sentences.append(f"Outside noise against {name}: {'; '.join(found)}.")
        elif others:
            sentences.append(f"No training set differs from {name} outside noise on any figure.")
    if not compared:
        return ""
    expected = compared * (1 - settings["confidence"])
    sentences.append(
        f"{outside} of {compared} comparisons are outside noise; with no true difference anywhere about "
        f"{expected:.1f} would be by chance at {settings['confidence']:.0%}. The other differences are within the "
        "noise of the evaluation images and the training seeds: this run does not rank those training sets on "
        "those figures."
    )
    return " ".join(sentences)


def _method_sentence(rows: Sequence[CurationRow], keep_fraction: float | None) -> str:
    """The method's claim as measured: reward_topk at k against full, figure by figure ("" when the table has
    no reward_topk compared with full)."""
    key = reference_key(REWARD_TOPK, keep_fraction)
    row = next((r for r in rows if r.variant == key and FULL in r.versus), None)
    if row is None:
        return ""
    verdicts: dict[str, list[str]] = {"higher": [], "lower": [], "within noise": []}
    for metric in (m for m in METRICS if m in row.versus[FULL]):
        compared = row.outside_noise(FULL, metric)
        side = "within noise" if compared is None else "higher" if compared.low > 0 else "lower"
        verdicts[side].append(METRIC_LABELS[metric])
    said = [f"{side} on {', '.join(labels)}" for side, labels in verdicts.items() if labels]
    claim = f"The method's claim, {row.variant} against {FULL} at {row.kept_fraction:.0%} of the pairs"
    return f"{claim}: {'; '.join(said)}."


def measured_by_k(rows: Sequence[CurationRow]) -> str:
    """What every table measured, one paragraph per keep fraction (each says its k)."""
    fractions = curve_fractions(rows) or [None]
    texts = (measured_text(rows_at(rows, k) if k is not None else rows, k) for k in fractions)
    return "\n\n".join(text for text in texts if text)


def outside_noise(rows: Sequence[CurationRow]) -> dict[str, dict[str, dict[str, float]]]:
    """training set -> reference training set -> metric -> difference, for the differences outside noise only."""
    found: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        for reference in row.versus:
            for metric in METRICS:
                compared = row.outside_noise(reference, metric)
                if compared is not None:
                    found.setdefault(row.variant, {}).setdefault(reference, {})[metric] = compared.difference
    return found


def curve_text(rows: Sequence[CurationRow]) -> str:
    """The compression curve for a terminal: per ranking, CURVE_METRICS' means at each k (the sets without a k,
    full first, as one reference column); the spreads are in the tables."""
    fractions, metrics = curve_fractions(rows), curve_metrics(rows)
    rankings = [v for v in TRAINING_VARIANTS if any(r.ranking == v and r.keep_fraction is not None for r in rows)]

    def cell(row: CurationRow | None) -> str:
        return "" if row is None else " / ".join(f"{getattr(row, metric):.3f}" for metric in metrics.values())

    by_key = {row.variant: row for row in rows}
    header = ["ranking", *(f"k = {k:g}" for k in fractions)]
    cells = [header] + [
        [ranking, *(cell(by_key.get(layout.training_set_key(ranking, k))) for k in fractions)] for ranking in rankings
    ]
    uncut = [row for row in rows if row.keep_fraction is None]
    cells += [[f"{row.variant} (no k)", cell(row), *[""] * (len(fractions) - 1)] for row in uncut]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    return "\n".join([f"({' / '.join(metrics)} at each keep fraction)", *lines])
