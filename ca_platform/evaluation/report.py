"""The curation report: each training set's size and what the models trained on it achieve.

It reports what was measured. The method's claim is that `reward_topk` matches or beats `full` at a
fraction of the data, with `clipscore_topk` and `random_topk` as the baselines at the same size; whether it
holds on a given pool is for the tables to say. The paper's result is a curve, so every ranking is trained at
every keep fraction k of the compression curve: one table per k, and each figure drawn against k. Each figure
comes with its spread over training seeds and a bootstrap interval over the evaluation items, and each training
set's difference from `full` and from `clipscore_topk` at the same k is marked when it is outside noise (see
`intervals`), so the tables do not invite reading a ranking into differences the evaluation cannot tell apart.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Mapping, Sequence
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
    UNCUT_VARIANTS,
    VARIANT_SCORERS,
)
from ca_platform.storage import DataStore, read_json, write_json

# The table's figures, in its column order, with their headers; zero-shot classification's last, shown when a
# labelled set was given.
METRIC_LABELS = {
    "i2t_r1": "I->T R@1",
    "t2i_r1": "T->I R@1",
    "i2t_r5": "I->T R@5",
    "t2i_r5": "T->I R@5",
    "cider": "CIDEr-D",
    "bleu4": "BLEU-4",
    "top1": "top-1",
    "top5": "top-5",
}
METRICS = tuple(METRIC_LABELS)
CLASSIFICATION_METRICS = ("top1", "top5")
# The compression curve's panels: each figure against the keep fraction (zero-shot top-1 too with a labelled set).
CURVE_METRICS = {"I->T R@5": "i2t_r5", "T->I R@5": "t2i_r5", "CIDEr-D": "cider", "zero-shot top-1": "top1"}
# What every training set is compared with (`clipscore_topk` at the set's own k), and the markers of a difference
# outside noise (above, below).
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
    variant: str  # the training set: `full`, `reward_topk@0.3`, `recap_all`, ... (layout.training_set_key)
    kept_fraction: float  # of the ranked pool, as kept (raw_topk_plus_recap keeps more than its k)
    scorer_preference_accuracy: float | None  # held-out human preference accuracy of the ranking scorer
    i2t_r1: float  # each metric: the mean over the seeds' models
    t2i_r1: float
    i2t_r5: float
    t2i_r5: float
    cider: float
    bleu4: float
    top1: float | None = None  # zero-shot classification accuracy of the CLIP; None without a labelled set
    top5: float | None = None
    seeds: int = 1
    spread: dict[str, float] = field(default_factory=dict)  # metric -> sample standard deviation over seeds
    keep_fraction: float | None = None  # the k it was cut at; None for full and the variants keeping every image
    interval: dict[str, list[float]] = field(default_factory=dict)  # metric -> [low, high] over evaluation items
    # reference training set (`full`, `clipscore_topk@<k>`) -> metric -> this set's difference from it
    # (Difference.as_json); a set without a k is compared with clipscore_topk at every k of the report
    versus: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    evaluation_items: int = 0  # the evaluation images the intervals resample
    labelled_items: int = 0  # the labelled images zero-shot top-1/top-5's intervals resample (0 without a set)
    bootstrap: dict[str, Any] = field(default_factory=dict)  # BootstrapSettings.as_json

    @property
    def ranking(self) -> str:
        """The variant, without its k: the line of the compression curve this row is a point of."""
        return layout.parse_training_set_key(self.variant)[0]

    def outside_noise(self, reference: str, metric: str) -> Difference | None:
        """The difference from the training set `reference` on `metric` when it is outside noise."""
        compared = self.versus.get(reference, {}).get(metric)
        if compared is None or not compared["outside_noise"]:
            return None
        return Difference(compared["difference"], compared["low"], compared["high"])

    def as_json(self) -> dict[str, Any]:
        document = asdict(self)
        document.pop("variant")
        return document


def _classified(rows: Sequence[CurationRow]) -> bool:
    return any(row.top1 is not None for row in rows)


def _metrics(rows: Sequence[CurationRow]) -> tuple[str, ...]:
    """The table's figures: without a labelled set, no zero-shot columns."""
    return METRICS if _classified(rows) else tuple(m for m in METRICS if m not in CLASSIFICATION_METRICS)


def _columns(rows: Sequence[CurationRow]) -> tuple[str, ...]:
    return ("variant", "captions", "kept fraction", "scorer pref. acc.", *(METRIC_LABELS[m] for m in _metrics(rows)))


def curve_metrics(rows: Sequence[CurationRow]) -> dict[str, str]:
    """CURVE_METRICS the rows have: zero-shot top-1 only with a labelled set."""
    return {label: m for label, m in CURVE_METRICS.items() if m not in CLASSIFICATION_METRICS or _classified(rows)}


def reference_key(reference: str, keep_fraction: float | None) -> str | None:
    """The training set a row at keep fraction k is compared with for `reference`: `full` itself, a ranking at
    the same k (None without a k: a table of the sets that keep every image has no clipscore_topk to compare)."""
    if reference in UNCUT_VARIANTS:
        return reference
    return None if keep_fraction is None else layout.training_set_key(reference, keep_fraction)


def _references(row: CurationRow, keep_fraction: float | None) -> list[tuple[str, str]]:
    """(reference, its training-set key) for `row` in the table at `keep_fraction`: a cut row's own k wins."""
    k = row.keep_fraction if row.keep_fraction is not None else keep_fraction
    keys = [(reference, reference_key(reference, k)) for reference in REFERENCE_MARKERS]
    return [(reference, key) for reference, key in keys if key is not None and key != row.variant]


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
    for reference, key in _references(row, keep_fraction):
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
    table = markdown_table(_columns(rows), [_row_cells(row, _metrics(rows), keep_fraction) for row in rows])
    return "\n\n".join([table, *_notes(rows, keep_fraction)])


def curve_fractions(rows: Sequence[CurationRow]) -> list[float]:
    """The keep fractions the rows were cut at, ascending."""
    return sorted({row.keep_fraction for row in rows if row.keep_fraction is not None})


def rows_at(rows: Sequence[CurationRow], keep_fraction: float) -> list[CurationRow]:
    """The table at one k: the training sets cut at it, with full and the variants keeping every image (which
    have no k) beside them, as a report at that one k would show them."""
    return [row for row in rows if row.keep_fraction in (None, keep_fraction)]


def per_k_tables(
    rows: Sequence[CurationRow], table: Callable[[Sequence[CurationRow], float | None], str], heading: str
) -> str:
    """One `table` per keep fraction (given the rows at k and k), each under `heading` (formatted with k); the
    rows as one table when none was cut."""
    fractions = curve_fractions(rows)
    if not fractions:
        return table(rows, None)
    return "\n\n".join(f"{heading.format(k=k)}\n\n{table(rows_at(rows, k), k)}" for k in fractions)


def curation_text(rows: Sequence[CurationRow], keep_fraction: float | None = None) -> str:
    """The same table for a terminal, with its legend and what it measured."""
    columns = _columns(rows)
    cells = [list(columns)] + [[str(c) for c in _row_cells(row, _metrics(rows), keep_fraction)] for row in rows]
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
        reference: key for row in rows for reference, key in _references(row, keep_fraction) if key in row.versus
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
            key = dict(_references(row, keep_fraction)).get(reference)
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


def curation_plot(rows: Sequence[CurationRow], path: Path) -> Path:
    """Retrieval recall (left), captioning scores and, with a labelled set, zero-shot classification accuracy per
    training set, bars side by side, with the bootstrap interval over the evaluation (or labelled) images as error
    bars (the spread over seeds where rows have no interval)."""
    variants = [row.variant for row in rows]
    x = np.arange(len(rows))
    plt = pyplot()
    classified = _classified(rows)
    width = max(10, 1.5 * len(rows)) * (1.4 if classified else 1.0)
    figure, axes_row = plt.subplots(1, 3 if classified else 2, figsize=(width, 4.2), dpi=100)
    left = axes_row[0]
    panels = [
        (
            left,
            "retrieval (CLIP)",
            {"I->T R@1": "i2t_r1", "T->I R@1": "t2i_r1", "I->T R@5": "i2t_r5", "T->I R@5": "t2i_r5"},
        ),
        (axes_row[1], "captioning (BLIP)", {"CIDEr-D": "cider", "BLEU-4": "bleu4"}),
    ]
    if classified:
        panels.append((axes_row[2], "zero-shot classification (CLIP)", {"top-1": "top1", "top-5": "top5"}))
        axes_row[2].set_ylim(0, 1)
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


def curation_curve_plot(rows: Sequence[CurationRow], path: Path) -> Path:
    """The compression curve: each of CURVE_METRICS against the keep fraction k, one line per ranking, its
    spread over seeds as a band (mean ± sample standard deviation) when several were trained and each point's
    bootstrap interval over evaluation items as a bar (what the paired verdicts of the tables test); full (and each
    variant keeping every image) as a horizontal reference line. x is the k a set was cut at (raw_topk_plus_recap
    keeps its recaptions on top: the tables give the kept fraction)."""
    plt = pyplot()
    metrics = curve_metrics(rows)
    figure, panels = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.2), dpi=100)
    banded = any(row.seeds > 1 for row in rows)
    lines = [v for v in TRAINING_VARIANTS if any(r.ranking == v and r.keep_fraction is not None for r in rows)]
    references = sorted((row for row in rows if row.keep_fraction is None), key=lambda row: row.ranking != FULL)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axes, (title, metric) in zip(panels, metrics.items()):
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
            intervals_at = [r.interval.get(metric) for r in points]
            if all(intervals_at):
                low, high = np.array(intervals_at, dtype=np.float64).T
                dodge = 0.006 * (index - (len(lines) - 1) / 2)  # side by side, so the bars of one k stay apart
                yerr = np.clip([values - low, high - values], 0.0, None)
                axes.errorbar(ks + dodge, values, yerr=yerr, fmt="none", ecolor=colour, capsize=2, linewidth=1)
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
    confidence = rows[0].bootstrap.get("confidence") if rows else None
    bars = f"bars: the {confidence:.0%} bootstrap interval over evaluation items" if confidence else "bars: none"
    note = f" (bands: ± sample standard deviation over seeds; {bars})" if banded else f" ({bars})"
    figure.suptitle(f"the compression curve{note}", fontsize=10)
    figure.tight_layout(rect=(0, 0.06 + 0.04 * ((len(labels) - 1) // 4), 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)
    return path


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
    for key in (FULL, *thresholds):
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
                f"the {asset} report of training set {variant} has no per-item results (written by an older version): "
                f"materialize {asset} for partition {variant} again"
            )
        items = tuple(document["items"])
        results.update({metric: ItemResults(items, table) for metric, table in intervals.item_tables(document).items()})
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
        references = dict.fromkeys(key for k in ks for _, key in _references(row, k) if key in per_item)
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
