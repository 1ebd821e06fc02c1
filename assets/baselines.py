"""The baselines the reward model must beat, and the comparison: clip_score_model, blip_score_model,
preference_accuracy."""

import hashlib
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from ca_platform.assets.downloads import downloaded_shard
from ca_platform.assets.reward import preference_data, reward_model
from ca_platform.resources import BaselineConfig, PlatformStorage, PreferencesConfig, ScoringConfig
from dagster import AssetExecutionContext, AssetsDefinition, DataVersion, MaterializeResult, MetadataValue, asset
from PIL import Image

from ca_platform import layout
from ca_platform.blip_itm import save_blip_itm, train_blip_itm
from ca_platform.checkpoints import content_version
from ca_platform.clip_score import save_clip, train_clip
from ca_platform.image_preprocessing import decode_image
from ca_platform.model_registry import BLIP_SCORE, CLIP_SCORE, REWARD_MODEL, current_model, load_scorer
from ca_platform.preference_sets import load_preference_split
from ca_platform.preferences import pairwise_accuracy
from ca_platform.schemas import STATUS, Status
from ca_platform.scoring import iter_pairs, score_pairs
from ca_platform.storage import DataStore, fetch_folder, fetch_to_local, publish_folder, read_json, write_json


@dataclass(frozen=True)
class Baseline:
    kind: str
    train: Callable[..., Any]
    save: Callable[[Any, Path], tuple[str, Path]]
    pretrained_field: str


BASELINES = (
    Baseline(CLIP_SCORE, train_clip, save_clip, "clip_pretrained_dir"),
    Baseline(BLIP_SCORE, train_blip_itm, save_blip_itm, "blip_pretrained_dir"),
)


def downloaded_ledgers(data: DataStore) -> list[str]:
    """Keys of every shard's download ledger."""
    return [o.key for o in data.list(f"{layout.DOWNLOADS_DIR}/") if o.key.endswith(f"/{layout.ROWS_FILE}")]


def pool_pairs(data: DataStore, ledgers: list[str], scratch: Path, limit: int) -> Iterator[tuple[Image.Image, str]]:
    """(image, caption) of successfully downloaded pairs of the raw pool, shard by shard, at most `limit`."""

    def every_pair() -> Iterator[tuple[Image.Image, str]]:
        for key in ledgers:
            ledger = pl.read_parquet(fetch_to_local(data, key, scratch))
            shard_prefix = key.rsplit("/", 1)[0]
            names = sorted(ledger.filter(pl.col(STATUS) == Status.SUCCESS)["tar"].unique().to_list())
            tars = [fetch_to_local(data, f"{shard_prefix}/{name}", scratch) for name in names]
            for _, image, caption in iter_pairs(tars):
                yield image, caption

    return itertools.islice(every_pair(), limit)


def baseline_model_asset(baseline: Baseline) -> AssetsDefinition:
    @asset(name=f"{baseline.kind}_model", deps=[downloaded_shard], group_name="baselines", kinds={"pytorch"})
    def baseline_model(
        context: AssetExecutionContext, storage: PlatformStorage, baselines: BaselineConfig
    ) -> MaterializeResult:
        """The user's local pretrained model when configured; otherwise one trained on the raw pool's
        downloaded pairs (retrained only when the downloads or the settings change)."""
        data = storage.data_store()
        with storage.staging_dir(f"{baseline.kind}-model") as staging:
            pretrained = getattr(baselines, baseline.pretrained_field)
            if pretrained:
                current = {"version": content_version(Path(pretrained)), "pretrained_dir": pretrained}
            else:
                ledgers = downloaded_ledgers(data)
                fingerprints = {o.key: o.fingerprint for o in data.list(f"{layout.DOWNLOADS_DIR}/") if o.key in ledgers}
                settings = baselines.model_dump(exclude={"clip_pretrained_dir", "blip_pretrained_dir", "device"})
                recipe = hashlib.sha256(json.dumps([fingerprints, settings], sort_keys=True).encode()).hexdigest()[:16]
                current = read_json(data, layout.current_model_key(baseline.kind), staging)
                if current is not None and current.get("recipe") == recipe and not current.get("pretrained_dir"):
                    context.log.info(f"{baseline.kind} {current['version']} already trained on these downloads")
                else:
                    trained = baseline.train(
                        pool_pairs(data, ledgers, staging / "in", baselines.max_train_pairs),
                        image_size=baselines.image_size,
                        epochs=baselines.epochs,
                        batch_size=baselines.batch_size,
                        learning_rate=baselines.learning_rate,
                        seed=baselines.seed,
                        device=baselines.device,
                    )
                    version, folder = baseline.save(trained, staging / "checkpoints")
                    publish_folder(data, folder, layout.model_prefix(baseline.kind, version))
                    current = {"version": version, "recipe": recipe, "metrics": trained.metrics}
            write_json(data, layout.current_model_key(baseline.kind), current, staging)
        return MaterializeResult(
            metadata={
                "version": current["version"],
                "source": current.get("pretrained_dir") or "trained on the raw pool",
            },
            data_version=DataVersion(current["version"]),
        )

    return baseline_model


clip_score_model, blip_score_model = (baseline_model_asset(b) for b in BASELINES)


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
        data.put_file(local, f"{layout.REPORTS_DIR}/preference_accuracy.json", consume=True)
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
