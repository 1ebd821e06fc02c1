"""Human preference rankings: the pairs they imply, splits by image, and how well a scorer orders them, within
one image and across images.

A ranking lists the rank of each caption of one image, 1 best, equal ranks tied (so [1, 3, 2] says
caption 0 is best, then caption 2, then caption 1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

TiePolicy = Literal["skip", "soft"]


@dataclass(frozen=True)
class PreferenceItem:
    image: str  # a local path once resolved (or an http(s) URL before)
    captions: tuple[str, ...]
    ranking: tuple[int, ...]
    row: int  # 1-based row of the preference file, for error messages

    @property
    def image_id(self) -> str:
        return hashlib.sha1(self.image.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class PreferencePair:
    better: int  # caption index
    worse: int
    target: float  # probability that `better` is preferred: 1.0, or 0.5 for a soft tie


def preference_pairs(ranking: Sequence[int], tie_policy: TiePolicy = "skip") -> list[PreferencePair]:
    """Every pair of captions a ranking orders (ties skipped, or kept as 0.5 targets with "soft")."""
    pairs = []
    for i in range(len(ranking)):
        for j in range(i + 1, len(ranking)):
            if ranking[i] < ranking[j]:
                pairs.append(PreferencePair(i, j, 1.0))
            elif ranking[j] < ranking[i]:
                pairs.append(PreferencePair(j, i, 1.0))
            elif tie_policy == "soft":
                pairs.append(PreferencePair(i, j, 0.5))
    return pairs


def split_by_image(
    items: Sequence[PreferenceItem], holdout_fraction: float = 0.2, seed: int = 0
) -> tuple[list[PreferenceItem], list[PreferenceItem]]:
    """(train, held out), all captions of one image on one side; stable under reordering of the file."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    train, heldout = [], []
    for item in items:
        bucket = int(hashlib.sha1(f"{seed}:{item.image_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (heldout if bucket < holdout_fraction else train).append(item)
    return train, heldout


def pairwise_accuracy(items: Sequence[PreferenceItem], scores: Sequence[Sequence[float]]) -> tuple[float, int]:
    """Share of human-ordered pairs (ties excluded) the scores order the same way; a score tie counts half.

    `scores[k][i]` is the score of `items[k].captions[i]`. Returns (accuracy, number of pairs).
    """
    agreed, total = 0.0, 0
    for item, item_scores in zip(items, scores, strict=True):
        if len(item_scores) != len(item.captions):
            raise ValueError(f"row {item.row}: {len(item_scores)} scores for {len(item.captions)} captions")
        for pair in preference_pairs(item.ranking, "skip"):
            total += 1
            difference = item_scores[pair.better] - item_scores[pair.worse]
            agreed += 1.0 if difference > 0 else 0.5 if difference == 0 else 0.0
    return (agreed / total if total else float("nan")), total


def top_and_bottom(ranking: Sequence[int]) -> tuple[list[int], list[int]]:
    """Indices of a ranking's top-ranked and bottom-ranked captions (ties all included); both empty when every
    caption ties, as such a ranking orders nothing."""
    best, worst = min(ranking), max(ranking)
    if best == worst:
        return [], []
    return [i for i, rank in enumerate(ranking) if rank == best], [i for i, rank in enumerate(ranking) if rank == worst]


def cross_image_accuracy(items: Sequence[PreferenceItem], scores: Sequence[Sequence[float]]) -> tuple[float, int]:
    """Share of (top-ranked caption of image A, bottom-ranked caption of image B), A != B, pairs the scores order
    with A's caption first; a score tie counts half. Returns (accuracy, number of pairs).

    A global top-k cut compares scores of different images, which `pairwise_accuracy` never tests: a scorer can
    order every image's own captions right and still rank one image's worst caption over another's best.
    Tied tops or bottoms all count; an image whose captions all tie has neither.
    """
    tops: list[tuple[float, int]] = []
    bottoms: list[tuple[float, int]] = []
    for image, (item, item_scores) in enumerate(zip(items, scores, strict=True)):
        if len(item_scores) != len(item.captions):
            raise ValueError(f"row {item.row}: {len(item_scores)} scores for {len(item.captions)} captions")
        top, bottom = top_and_bottom(item.ranking)
        tops += [(item_scores[i], image) for i in top]
        bottoms += [(item_scores[i], image) for i in bottom]
    if not tops:
        return float("nan"), 0
    top_scores = np.array([score for score, _ in tops], dtype=np.float64)
    bottom_scores = np.sort(np.array([score for score, _ in bottoms], dtype=np.float64))
    below = np.searchsorted(bottom_scores, top_scores, side="left")
    level = np.searchsorted(bottom_scores, top_scores, side="right") - below
    agreed = float(below.sum() + 0.5 * level.sum())
    total = len(tops) * len(bottoms)
    # take out the pairs of an image with itself
    for image in {image for _, image in tops}:
        own_tops = [score for score, owner in tops if owner == image]
        own_bottoms = [score for score, owner in bottoms if owner == image]
        for top in own_tops:
            agreed -= sum(1.0 if top > bottom else 0.5 if top == bottom else 0.0 for bottom in own_bottoms)
        total -= len(own_tops) * len(own_bottoms)
    return (agreed / total if total else float("nan")), total
