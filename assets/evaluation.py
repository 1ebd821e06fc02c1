"""preference_accuracy: the reward model and its baselines on the same held-out human preferences."""

import json
from pathlib import Path
from typing import Any

from dagster import MaterializeResult, MetadataValue, asset

from ca_platform import layout
from ca_platform.assets.baselines import blip_score_model, clip_score_model
from ca_platform.assets.reward import preference_data, reward_model
from ca_platform.models.images import decode_image
from ca_platform.preferences.pairs import pairwise_accuracy
from ca_platform.preferences.staging import load_preference_split
from ca_platform.resources import PlatformStorage, PreferencesConfig, ScoringConfig
from ca_platform.schemas import BLIP_SCORE, CLIP_SCORE, REWARD_MODEL
from ca_platform.scoring.registry import current_model, load_scorer
from ca_platform.scoring.streaming import score_pairs
from ca_platform.storage import fetch_folder, read_json

PREFERENCE_ACCURACY_REPORT = f"{layout.REPORTS_DIR}/preference_accuracy.json"


@asset(
    deps=[preference_data, reward_model, clip_score_model, blip_score_model],
    group_name="reward",
    kinds={"json"},
)
def preference_accuracy(
    storage: PlatformStorage, preferences: PreferencesConfig, scoring: ScoringConfig
) -> MaterializeResult:
    """Reward model, CLIP score and BLIP ITM score on the same held-out human preference pairs (ties excluded):
    the share of pairs each orders as people did. Written to reports/preference_accuracy.json."""
    data = storage.data_store()
    with storage.staging_dir("preference-accuracy") as staging:
        preferences_doc = read_json(data, layout.CURRENT_PREFERENCES_KEY, staging)
        folder = fetch_folder(data, layout.preferences_prefix(preferences_doc["version"]), storage.cache_dir())
        _, heldout = load_preference_split(folder, preferences.holdout_fraction, preferences.split_seed)
        report: dict[str, Any] = {}
        versions = {}
        for kind in (REWARD_MODEL, CLIP_SCORE, BLIP_SCORE):
            document = current_model(data, kind, staging)
            scorer = load_scorer(data, kind, document, storage.cache_dir(), scoring.device)
            scores = []
            for item in heldout:
                image = decode_image(Path(item.image).read_bytes())
                scores.append(score_pairs([image] * len(item.captions), list(item.captions), scorer).tolist())
            report[kind], report["pairs"] = pairwise_accuracy(heldout, scores)
            versions[kind] = scorer.version
        local = staging / "preference_accuracy.json"
        local.write_text(json.dumps(report, indent=2))
        data.put_file(local, PREFERENCE_ACCURACY_REPORT, consume=True)
    table = "| scorer | held-out preference accuracy | version |\n| --- | --- | --- |\n" + "\n".join(
        f"| {kind} | {report[kind]:.3f} | {versions[kind]} |" for kind in versions
    )
    return MaterializeResult(
        metadata={
            **{kind: float(report[kind]) for kind in versions},
            "pairs": report["pairs"],
            "table": MetadataValue.md(table),
        },
    )
