"""The curation report: each training-set variant's size and what the models trained on it achieve.

It reports what was measured. The method's claim is that `reward_topk` matches or beats `full` at a
fraction of the data, with `clipscore_topk` and `random_topk` as the baselines at the same size; whether it
holds on a given pool is for the table to say.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ca_platform.analytics.plots import markdown_table, plt


@dataclass(frozen=True)
class CurationRow:
    variant: str
    kept_fraction: float
    scorer_preference_accuracy: float | None  # held-out human preference accuracy of the ranking scorer
    i2t_r1: float
    t2i_r1: float
    i2t_r5: float
    t2i_r5: float
    cider: float
    bleu4: float

    def as_json(self) -> dict[str, Any]:
        document = asdict(self)
        document.pop("variant")
        return document


COLUMNS = (
    "variant",
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
    return [
        row.variant,
        f"{row.kept_fraction:.3f}",
        accuracy,
        *(f"{v:.3f}" for v in (row.i2t_r1, row.t2i_r1, row.i2t_r5, row.t2i_r5, row.cider, row.bleu4)),
    ]


def curation_markdown(rows: Sequence[CurationRow]) -> str:
    return markdown_table(COLUMNS, [_row_cells(row) for row in rows])


def curation_text(rows: Sequence[CurationRow]) -> str:
    """The same table for a terminal."""
    cells = [list(COLUMNS)] + [[str(c) for c in _row_cells(row)] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def curation_plot(rows: Sequence[CurationRow], path: Path) -> Path:
    """Retrieval recall (left) and captioning scores (right) per variant, bars side by side."""
    variants = [row.variant for row in rows]
    x = np.arange(len(rows))
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    retrieval = {
        "I->T R@1": [r.i2t_r1 for r in rows],
        "T->I R@1": [r.t2i_r1 for r in rows],
        "I->T R@5": [r.i2t_r5 for r in rows],
        "T->I R@5": [r.t2i_r5 for r in rows],
    }
    width = 0.8 / len(retrieval)
    for offset, (label, values) in enumerate(retrieval.items()):
        left.bar(x + (offset - (len(retrieval) - 1) / 2) * width, values, width, label=label)
    left.set_title("retrieval (CLIP)")
    left.set_ylim(0, 1)
    captioning = {"CIDEr-D": [r.cider for r in rows], "BLEU-4": [r.bleu4 for r in rows]}
    width = 0.8 / len(captioning)
    for offset, (label, values) in enumerate(captioning.items()):
        right.bar(x + (offset - 0.5) * width, values, width, label=label)
    right.set_title("captioning (BLIP)")
    for axes in (left, right):
        axes.set_xticks(x, [f"{v}\n({r.kept_fraction:.2f})" for v, r in zip(variants, rows)], fontsize=8)
        axes.legend(fontsize=7)
    figure.suptitle("training-set variant (kept fraction)", fontsize=9, y=0.02)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)
    return path
