"""Held-out preference accuracy: the reward model and its baselines on the same held-out human preferences.

Two figures per scorer. Within an image: the share of caption pairs (ties excluded) it orders as people did;
it says whether the reward model learnt something its baselines do not already know. Across images: the share
of (top-ranked caption of image A, bottom-ranked caption of image B) pairs it orders with A's first; a global
top-k cut compares scores of different images, and a scorer can be right within every image and still wrong
across them.

Scoring (torch) is imported where accuracy is measured, not with the module: every Dagster process loads the
definitions, and most measure nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ca_platform import layout
from ca_platform.models.images import decode_image
from ca_platform.preferences.pairs import cross_image_accuracy, pairwise_accuracy
from ca_platform.preferences.staging import current_preference_split
from ca_platform.schemas import SCORERS
from ca_platform.scoring.registry import current_model, load_scorer
from ca_platform.storage import DataStore


@dataclass(frozen=True)
class PreferenceAccuracy:
    # scorer -> within-image accuracy, "pairs": the held-out pairs counted; "cross_image": scorer -> cross-image
    # accuracy, "cross_image_pairs": the (top of A, bottom of B) pairs counted
    report: dict[str, Any]
    versions: dict[str, str]  # scorer -> the version measured


def measure_preference_accuracy(
    store: DataStore,
    holdout_fraction: float,
    split_seed: int,
    device: str | None,
    cache: Path,
    scratch: Path,
) -> PreferenceAccuracy:
    """Every scorer's within-image and cross-image accuracy on the current preference set's held-out images
    (split as the reward model's training split them), written to the preference-accuracy report."""
    from ca_platform.scoring.streaming import score_pairs

    _, heldout = current_preference_split(store, holdout_fraction, split_seed, cache, scratch)
    images = [decode_image(Path(item.image).read_bytes()) for item in heldout]
    report: dict[str, Any] = {"cross_image": {}}
    versions = {}
    for kind in SCORERS:
        scorer = load_scorer(store, kind, current_model(store, kind, scratch), cache, device)
        scores = [
            score_pairs([image] * len(item.captions), list(item.captions), scorer).tolist()
            for image, item in zip(images, heldout)
        ]
        report[kind], report["pairs"] = pairwise_accuracy(heldout, scores)
        report["cross_image"][kind], report["cross_image_pairs"] = cross_image_accuracy(heldout, scores)
        versions[kind] = scorer.version
    local = scratch / Path(layout.PREFERENCE_ACCURACY_REPORT_KEY).name
    local.write_text(json.dumps(report, indent=2))
    store.put_file(local, layout.PREFERENCE_ACCURACY_REPORT_KEY, consume=True)
    return PreferenceAccuracy(report, versions)
