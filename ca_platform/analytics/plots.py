"""Plots and tables for the UI: a score histogram as PNG and markdown the Dagster UI renders inline.

Matplotlib's Agg backend draws without a display, so plots render on servers and in CI alike. Matplotlib is
imported when a plot is drawn, not with the module: every Dagster process loads the definitions, few plot.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np


@functools.cache
def pyplot() -> ModuleType:
    """matplotlib.pyplot, on the Agg backend chosen once per process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def histogram_png(
    edges: Sequence[float],
    counts: Mapping[str, Sequence[int]],
    path: Path,
    title: str,
    cuts: Mapping[str, float] | None = None,
) -> Path:
    """Stacked per-bin counts (e.g. kept and dropped pairs) over shared bin edges, with labelled cut lines."""
    edges_array = np.asarray(edges, dtype=np.float64)
    widths = np.diff(edges_array)
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 3.5), dpi=100)
    bottom = np.zeros(widths.size)
    for label, values in counts.items():
        heights = np.asarray(values, dtype=np.float64)
        axes.bar(
            edges_array[:-1],
            heights,
            width=widths,
            bottom=bottom,
            align="edge",
            label=f"{label} ({int(heights.sum())})",
        )
        bottom += heights
    for label, cut in (cuts or {}).items():
        axes.axvline(cut, color="black", linestyle="--", linewidth=1)
        axes.annotate(label, (cut, bottom.max(initial=1) * 0.95), rotation=90, ha="right", va="top", fontsize=8)
    axes.set_title(title)
    axes.set_xlabel("score")
    axes.set_ylabel("pairs")
    if counts:
        axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)
    return path


def bar_png(labels: Sequence[str], values: Sequence[int], path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    """One bar per label (e.g. how many duplicate groups have each size)."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 3.5), dpi=100)
    axes.bar(list(labels), list(values))
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)
    return path


def markdown_image(png: Path, alt: str) -> str:
    """The PNG inlined as a data URI, so the UI shows it without serving files."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode('ascii')})"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
