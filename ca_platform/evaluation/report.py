"""The curation report: each training set's size and what the models trained on it achieve.

It reports what was measured. The method's claim is that `reward_topk` matches or beats `full` at a
fraction of the data, with `clipscore_topk` and `random_topk` as the baselines at the same size; whether it
holds on a given pool is for the tables to say. The paper's result is a curve, so every ranking is trained at
every keep fraction k of the compression curve: one table per k, and each figure drawn against k.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ca_platform import layout
from ca_platform.analytics.plots import markdown_table, pyplot
from ca_platform.schemas import (
    FULL,
    RAW_TOPK_PLUS_RECAP,
    RECAP_ALL,
    RECAP_MIX,
    REWARD_BEST_CAPTION,
    TRAINING_VARIANTS,
    VARIANT_SCORERS,
)
from ca_platform.storage import DataStore, read_json, write_json

METRICS = ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "cider", "bleu4")  # the table's figures, in its column order
# The compression curve's panels: each figure against the keep fraction.
CURVE_METRICS = {"I->T R@5": "i2t_r5", "T->I R@5": "t2i_r5", "CIDEr-D": "cider"}

# Which captions each variant trains on.
CAPTIONS = {
    RECAP_ALL: "synthetic",
    RAW_TOPK_PLUS_RECAP: "raw top k + synthetic",
    RECAP_MIX: "raw/synthetic mix",
    REWARD_BEST_CAPTION: "reward's best",
}


@dataclass(frozen=True)
class CurationRow:
    variant: str  # the training set: `full`, `reward_topk@0.3`, `recap_all`, ... (layout.training_set_key)
    kept_fraction: float  # of the ranked pool, as kept (raw_topk_plus_recap keeps more than its k)
    scorer_preference_accuracy: float | None  # held-out human preference accuracy of the ranking scorer
    i2t_r1: float  # each metric: the mean over the seeds' models
    t2i_r1: float
    i2t_r5: float
    t2i_r5: float
    cider: float
    bleu4: float
    seeds: int = 1
    spread: dict[str, float] = field(default_factory=dict)  # metric -> sample standard deviation over seeds
    keep_fraction: float | None = None  # the k it was cut at; None for full and the variants keeping every image

    @property
    def ranking(self) -> str:
        """The variant, without its k: the line of the compression curve this row is a point of."""
        return layout.parse_training_set_key(self.variant)[0]

    def as_json(self) -> dict[str, Any]:
        document = asdict(self)
        document.pop("variant")
        return document


COLUMNS = (
    "variant",
    "captions",
    "kept fraction",
    "scorer pref. acc.",
    "I->T R@1",
    "T->I R@1",
    "I->T R@5",
    "T->I R@5",
    "CIDEr-D",
    "BLEU-4",
)


def _row_cells(row: CurationRow) -> list[Any]:
    accuracy = "n/a" if row.scorer_preference_accuracy is None else f"{row.scorer_preference_accuracy:.3f}"

    def figure(metric: str) -> str:
        value = f"{getattr(row, metric):.3f}"
        return f"{value} ± {row.spread.get(metric, 0.0):.3f}" if row.seeds > 1 else value

    return [
        row.variant,
        CAPTIONS.get(row.ranking, "raw"),
        f"{row.kept_fraction:.3f}",
        accuracy,
        *(figure(metric) for metric in METRICS),
    ]


def curation_markdown(rows: Sequence[CurationRow]) -> str:
    return markdown_table(COLUMNS, [_row_cells(row) for row in rows])


def curve_fractions(rows: Sequence[CurationRow]) -> list[float]:
    """The keep fractions the rows were cut at, ascending."""
    return sorted({row.keep_fraction for row in rows if row.keep_fraction is not None})


def rows_at(rows: Sequence[CurationRow], keep_fraction: float) -> list[CurationRow]:
    """The table at one k: the training sets cut at it, with full and the variants keeping every image (which
    have no k) beside them, as a report at that one k would show them."""
    return [row for row in rows if row.keep_fraction in (None, keep_fraction)]


def per_k_tables(rows: Sequence[CurationRow], table: Callable[[Sequence[CurationRow]], str], heading: str) -> str:
    """One `table` per keep fraction, each under `heading` (formatted with k); the rows as one table when none
    was cut."""
    fractions = curve_fractions(rows)
    if not fractions:
        return table(rows)
    return "\n\n".join(f"{heading.format(k=k)}\n\n{table(rows_at(rows, k))}" for k in fractions)


def curation_text(rows: Sequence[CurationRow]) -> str:
    """The same table for a terminal, with a note on the spread when models of several seeds were trained."""
    cells = [list(COLUMNS)] + [[str(c) for c in _row_cells(row)] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    seeds = max((row.seeds for row in rows), default=1)
    note = [f"(mean ± sample standard deviation over {seeds} training seeds)"] if seeds > 1 else []
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:], *note])


def curve_text(rows: Sequence[CurationRow]) -> str:
    """The compression curve for a terminal: per ranking, CURVE_METRICS' means at each k (the sets without a k,
    full first, as one reference column); the spreads are in the tables."""
    fractions = curve_fractions(rows)
    rankings = [v for v in TRAINING_VARIANTS if any(r.ranking == v and r.keep_fraction is not None for r in rows)]

    def cell(row: CurationRow | None) -> str:
        return "" if row is None else " / ".join(f"{getattr(row, metric):.3f}" for metric in CURVE_METRICS.values())

    by_key = {row.variant: row for row in rows}
    header = ["ranking", *(f"k = {k:g}" for k in fractions)]
    cells = [header] + [
        [ranking, *(cell(by_key.get(layout.training_set_key(ranking, k))) for k in fractions)] for ranking in rankings
    ]
    uncut = [row for row in rows if row.keep_fraction is None]
    cells += [[f"{row.variant} (no k)", cell(row), *[""] * (len(fractions) - 1)] for row in uncut]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    return "\n".join([f"({' / '.join(CURVE_METRICS)} at each keep fraction)", *lines])


def curation_plot(rows: Sequence[CurationRow], path: Path) -> Path:
    """Retrieval recall (left) and captioning scores (right) per variant, bars side by side, with the spread over
    seeds as error bars when several were trained."""
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
            values = [getattr(r, metric) for r in rows]
            spread = [r.spread.get(metric, 0.0) for r in rows] if any(r.seeds > 1 for r in rows) else None
            position = x + (offset - (len(metrics) - 1) / 2) * width
            axes.bar(position, values, width, yerr=spread, capsize=2, label=label)
        axes.set_title(title)
        axes.set_xticks(x, [f"{v}\n({r.kept_fraction:.2f})" for v, r in zip(variants, rows)], fontsize=7, rotation=30)
        axes.legend(fontsize=7)
    left.set_ylim(0, 1)
    figure.suptitle("training-set variant (kept fraction)", fontsize=9, y=0.02)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)
    return path


def curation_curve_plot(rows: Sequence[CurationRow], path: Path) -> Path:
    """The compression curve: each of CURVE_METRICS against the keep fraction k, one line per ranking, its
    spread over seeds as a band (mean ± sample standard deviation) when several were trained; full (and each
    variant keeping every image) as a horizontal reference line. x is the k a set was cut at (raw_topk_plus_recap
    keeps its recaptions on top: the tables give the kept fraction)."""
    plt = pyplot()
    figure, panels = plt.subplots(1, len(CURVE_METRICS), figsize=(5 * len(CURVE_METRICS), 4.2), dpi=100)
    banded = any(row.seeds > 1 for row in rows)
    lines = [v for v in TRAINING_VARIANTS if any(r.ranking == v and r.keep_fraction is not None for r in rows)]
    references = sorted((row for row in rows if row.keep_fraction is None), key=lambda row: row.ranking != FULL)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axes, (title, metric) in zip(panels, CURVE_METRICS.items()):
        for reference, style in zip(references, ("-", ":", "-.", "--")):
            value, spread = getattr(reference, metric), reference.spread.get(metric, 0.0)
            full = reference.ranking == FULL
            label = f"{reference.variant} (every {'pair' if full else 'image'})"
            axes.axhline(value, color="black" if full else "grey", linestyle=style, label=label)
            if banded and full:
                axes.axhspan(value - spread, value + spread, color="black", alpha=0.08, linewidth=0)
        for index, ranking in enumerate(lines):
            points = sorted(
                (r for r in rows if r.ranking == ranking and r.keep_fraction is not None), key=lambda r: r.keep_fraction
            )
            ks = np.array([r.keep_fraction for r in points])
            values = np.array([getattr(r, metric) for r in points])
            colour = colours[index % len(colours)]
            axes.plot(ks, values, marker="o", color=colour, label=ranking)
            if banded:
                spread = np.array([r.spread.get(metric, 0.0) for r in points])
                axes.fill_between(ks, values - spread, values + spread, color=colour, alpha=0.18, linewidth=0)
        axes.set_title(title)
        axes.set_xlabel("keep fraction k")
        axes.set_xticks(sorted({*curve_fractions(rows), 1.0}))
        axes.set_xlim(0.0, 1.02)
        axes.set_ylim(bottom=0.0)
    handles, labels = panels[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    note = " (bands: ± sample standard deviation over seeds)" if banded else ""
    figure.suptitle(f"the compression curve{note}", fontsize=10)
    figure.tight_layout(rect=(0, 0.06 + 0.04 * ((len(labels) - 1) // 4), 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)
    return path


class NotEvaluatedError(LookupError):
    """A variant lacks an evaluation or a threshold the report needs; the message says which to materialize."""


def curation_rows(store: DataStore, scratch: Path) -> list[CurationRow]:
    """Each training set's row (full, then every published cut: each variant at each k), from the
    score-threshold, preference-accuracy and evaluation reports."""
    thresholds = read_json(store, layout.SCORE_THRESHOLD_REPORT_KEY, scratch) or {}
    accuracy = read_json(store, layout.PREFERENCE_ACCURACY_REPORT_KEY, scratch) or {}
    rows = []
    for key in (FULL, *thresholds):
        retrieval = read_json(store, layout.variant_report_key(layout.RETRIEVAL_REPORT, key), scratch)
        captioning = read_json(store, layout.variant_report_key(layout.CAPTIONING_REPORT, key), scratch)
        if retrieval is None or captioning is None:
            raise NotEvaluatedError(
                f"training set {key} has not been evaluated: materialize retrieval_eval and "
                f"captioning_eval for partition {key} first"
            )
        variant, keep_fraction = layout.parse_training_set_key(key)
        if key == FULL:
            kept_fraction = 1.0
        else:
            kept_fraction = thresholds[key]["kept"] / thresholds[key]["total"]
        scorer = VARIANT_SCORERS.get(variant)
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
                seeds=len(retrieval.get("per_seed", {})) or 1,
                spread={**retrieval.get("spread", {}), **captioning.get("spread", {})},
                keep_fraction=keep_fraction,
            )
        )
    return rows


@dataclass(frozen=True)
class CurationReport:
    rows: list[CurationRow]
    table: str  # markdown: one table per keep fraction
    plot: Path
    curve: Path  # the figures against the keep fraction


MARKDOWN_HEADING = "### keep fraction k = {k:g}"


def write_curation_report(store: DataStore, scratch: Path) -> CurationReport:
    """The report across the training sets, published as JSON (one entry per training set), markdown (a table
    per keep fraction), the bar plot and the compression curve's plot."""
    rows = curation_rows(store, scratch)
    write_json(store, layout.CURATION_REPORT_KEY, {row.variant: row.as_json() for row in rows}, scratch)
    table = per_k_tables(rows, curation_markdown, MARKDOWN_HEADING)
    (scratch / "report.md").write_text(table + "\n")
    store.put_file(scratch / "report.md", layout.CURATION_TABLE_KEY, consume=True)
    plot = curation_plot(rows, scratch / "report.png")
    store.put_file(plot, layout.CURATION_PLOT_KEY, consume=False)
    curve = curation_curve_plot(rows, scratch / "curve.png")
    store.put_file(curve, layout.CURATION_CURVE_PLOT_KEY, consume=False)
    return CurationReport(rows, table, plot, curve)
