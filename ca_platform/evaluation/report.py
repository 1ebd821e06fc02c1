"""The curation report: each training-set variant's size and what the models trained on it achieve.

It reports what was measured. The method's claim is that `reward_topk` matches or beats `full` at a
fraction of the data, with `clipscore_topk` and `random_topk` as the baselines at the same size; whether it
holds on a given pool is for the table to say.
"""

from __future__ import annotations

from collections.abc import Sequence
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
CLASSIFICATION_METRICS = ("top1", "top5")  # zero-shot classification's, after them when a labelled set was given

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
    top1: float | None = None  # zero-shot classification accuracy of the CLIP; None without a labelled set
    top5: float | None = None
    seeds: int = 1
    spread: dict[str, float] = field(default_factory=dict)  # metric -> sample standard deviation over seeds

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
CLASSIFICATION_COLUMNS = ("top-1", "top-5")


def _classified(rows: Sequence[CurationRow]) -> bool:
    return any(row.top1 is not None for row in rows)


def _columns(rows: Sequence[CurationRow]) -> tuple[str, ...]:
    return COLUMNS + (CLASSIFICATION_COLUMNS if _classified(rows) else ())


def _metrics(rows: Sequence[CurationRow]) -> tuple[str, ...]:
    return METRICS + (CLASSIFICATION_METRICS if _classified(rows) else ())


def _row_cells(row: CurationRow, metrics: Sequence[str] = METRICS) -> list[Any]:
    accuracy = "n/a" if row.scorer_preference_accuracy is None else f"{row.scorer_preference_accuracy:.3f}"

    def figure(metric: str) -> str:
        if getattr(row, metric) is None:
            return "n/a"
        value = f"{getattr(row, metric):.3f}"
        return f"{value} ± {row.spread.get(metric, 0.0):.3f}" if row.seeds > 1 else value

    return [
        row.variant,
        CAPTIONS.get(row.variant, "raw"),
        f"{row.kept_fraction:.3f}",
        accuracy,
        *(figure(metric) for metric in metrics),
    ]


def curation_markdown(rows: Sequence[CurationRow]) -> str:
    return markdown_table(_columns(rows), [_row_cells(row, _metrics(rows)) for row in rows])


def curation_text(rows: Sequence[CurationRow]) -> str:
    """The same table for a terminal, with a note on the spread when models of several seeds were trained."""
    columns = _columns(rows)
    cells = [list(columns)] + [[str(c) for c in _row_cells(row, _metrics(rows))] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    seeds = max((row.seeds for row in rows), default=1)
    note = [f"(mean ± sample standard deviation over {seeds} training seeds)"] if seeds > 1 else []
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:], *note])


def curation_plot(rows: Sequence[CurationRow], path: Path) -> Path:
    """Retrieval recall (left), captioning scores and, with a labelled set, zero-shot classification accuracy per
    variant, bars side by side, with the spread over seeds as error bars when several were trained."""
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


class NotEvaluatedError(LookupError):
    """A variant lacks an evaluation or a threshold the report needs; the message says which to materialize."""


def curation_rows(store: DataStore, scratch: Path, classification: bool = False) -> list[CurationRow]:
    """Each training variant's row, from the score-threshold, preference-accuracy and evaluation reports; with
    `classification`, its zero-shot accuracy too (of the same CLIPs retrieval measured, on the current labelled
    set)."""
    thresholds = read_json(store, layout.SCORE_THRESHOLD_REPORT_KEY, scratch) or {}
    accuracy = read_json(store, layout.PREFERENCE_ACCURACY_REPORT_KEY, scratch) or {}
    labelled = read_json(store, layout.CURRENT_CLASSIFICATION_KEY, scratch) if classification else None
    rows = []
    for variant in (v for v in TRAINING_VARIANTS if v == FULL or v in thresholds):
        retrieval = read_json(store, layout.variant_report_key(layout.RETRIEVAL_REPORT, variant), scratch)
        captioning = read_json(store, layout.variant_report_key(layout.CAPTIONING_REPORT, variant), scratch)
        if retrieval is None or captioning is None:
            raise NotEvaluatedError(
                f"variant {variant} has not been evaluated: materialize retrieval_eval and "
                f"captioning_eval for partition {variant} first"
            )
        zero_shot = _classification(store, variant, retrieval, labelled, scratch) if classification else {}
        if variant == FULL:
            kept_fraction = 1.0
        else:
            kept_fraction = thresholds[variant]["kept"] / thresholds[variant]["total"]
        scorer = VARIANT_SCORERS.get(variant)
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
                top1=zero_shot.get("top1"),
                top5=zero_shot.get("top5"),
                seeds=len(retrieval.get("per_seed", {})) or 1,
                spread={**retrieval.get("spread", {}), **captioning.get("spread", {}), **zero_shot.get("spread", {})},
            )
        )
    return rows


def _classification(
    store: DataStore, variant: str, retrieval: dict[str, Any], labelled: dict[str, Any] | None, scratch: Path
) -> dict[str, Any]:
    """The variant's classification report, refused when it measured other CLIPs than retrieval did or another
    labelled set than the current one (a report of an earlier run)."""
    document = read_json(store, layout.variant_report_key(layout.CLASSIFICATION_REPORT, variant), scratch)
    if document is None or labelled is None:
        raise NotEvaluatedError(
            f"variant {variant} has no zero-shot classification: materialize classification_set, then "
            f"classification_eval for partition {variant}"
        )
    if document["model_versions"] != retrieval["model_versions"]:
        raise NotEvaluatedError(
            f"variant {variant}: classification_eval measured CLIP versions {document['model_versions']}, "
            f"retrieval_eval {retrieval['model_versions']}: materialize classification_eval for {variant} again"
        )
    if document["classification_version"] != labelled["version"]:
        raise NotEvaluatedError(
            f"variant {variant}: classification_eval measured labelled set {document['classification_version']}, "
            f"the current one is {labelled['version']}: materialize classification_eval for {variant} again"
        )
    return document


@dataclass(frozen=True)
class CurationReport:
    rows: list[CurationRow]
    table: str  # markdown
    plot: Path


def write_curation_report(store: DataStore, scratch: Path, classification: bool = False) -> CurationReport:
    """The report across the training variants, published as JSON, markdown table and plot; with
    `classification`, each variant's zero-shot accuracy too."""
    rows = curation_rows(store, scratch, classification)
    write_json(store, layout.CURATION_REPORT_KEY, {row.variant: row.as_json() for row in rows}, scratch)
    table = curation_markdown(rows)
    (scratch / "report.md").write_text(table + "\n")
    store.put_file(scratch / "report.md", layout.CURATION_TABLE_KEY, consume=True)
    plot = curation_plot(rows, scratch / "report.png")
    store.put_file(plot, layout.CURATION_PLOT_KEY, consume=False)
    return CurationReport(rows, table, plot)
