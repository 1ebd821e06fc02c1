"""The curation report's figures: the training sets' bars at each k, and the compression curve."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ca_platform.analytics.plots import pyplot
from ca_platform.evaluation.report_rows import CurationRow, classified, curve_fractions, curve_metrics
from ca_platform.schemas import FULL, TRAINING_VARIANTS


def interval_error(values: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """matplotlib's yerr ([below, above]) for intervals [low, high] around `values`; a percentile interval of a
    ratio can leave its mean outside, and a bar then has no length on that side rather than a flipped one."""
    return np.clip(np.stack([values - low, high - values]), 0.0, None)


def curation_plot(rows: Sequence[CurationRow], path: Path) -> Path:
    """Retrieval recall (left), captioning scores and, with a labelled set, zero-shot classification accuracy per
    training set, bars side by side, with the bootstrap interval over the evaluation (or labelled) images as error
    bars (the spread over seeds where rows have no interval)."""
    variants = [row.variant for row in rows]
    x = np.arange(len(rows))
    plt = pyplot()
    with_classes = classified(rows)
    width = max(10, 1.5 * len(rows)) * (1.4 if with_classes else 1.0)
    figure, axes_row = plt.subplots(1, 3 if with_classes else 2, figsize=(width, 4.2), dpi=100)
    left = axes_row[0]
    panels = [
        (
            left,
            "retrieval (CLIP)",
            {"I->T R@1": "i2t_r1", "T->I R@1": "t2i_r1", "I->T R@5": "i2t_r5", "T->I R@5": "t2i_r5"},
        ),
        (axes_row[1], "captioning (BLIP)", {"CIDEr-D": "cider", "BLEU-4": "bleu4"}),
    ]
    if with_classes:
        panels.append((axes_row[2], "zero-shot classification (CLIP)", {"top-1": "top1", "top-5": "top5"}))
        axes_row[2].set_ylim(0, 1)
    for axes, title, metrics in panels:
        width = 0.8 / len(metrics)
        for offset, (label, metric) in enumerate(metrics.items()):
            values = np.array([getattr(r, metric) for r in rows])
            if all(metric in r.interval for r in rows):
                bounds = np.array([r.interval[metric] for r in rows])
                error: np.ndarray | None = interval_error(values, bounds[:, 0], bounds[:, 1])
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
                yerr = interval_error(values, low, high)
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
