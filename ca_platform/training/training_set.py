"""A training set and the CLIP/BLIP trained on it, once per recipe, at a budget equal across training sets.

A training set is `full` or one cut of a subset variant, at one keep fraction k of the compression curve for
the variants that drop pairs (`reward_topk@0.3`; layout.training_set_key). It is read from one source, its
tars themselves: every downloaded shard's tars for `full`, its compressed subsets' tars otherwise. One walk
over them, images left undecoded, gives both the fingerprint of the pairs (what decides whether a model must be
trained again) and their count (which the trainer is handed, so it does not walk the tars again to count them).

The trainers (torch, transformers) are imported where a model is trained, not with the module: every Dagster
process loads the definitions, and most train nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ca_platform import layout, schemas
from ca_platform.compression.threshold import ScoreThreshold, published_thresholds
from ca_platform.dedup.pool import published_removals
from ca_platform.ingest.download import downloaded_rows, downloaded_shards, fetch_downloaded_tars, read_download_ledger
from ca_platform.ingest.webdataset_io import TarSample, iter_samples
from ca_platform.scoring.registry import recipe_hash, recipe_settings, train_once
from ca_platform.storage import DataStore, fetch_to_local, read_json

if TYPE_CHECKING:
    from ca_platform.training.tars import TrainingBudget


class NoTrainingDataError(LookupError):
    """A variant's tars are not there yet (nothing downloaded, or a shard not compressed)."""


@dataclass(frozen=True)
class TrainingSet:
    variant: str  # the training-set key: `full`, `reward_topk@0.3`, `recap_all`, ...
    tars: list[Path]  # local paths of the variant's webdataset tars
    fingerprint: str  # of the pairs themselves (shard, uid, image sha256, caption): the same after a re-pack
    pairs: int
    pool_pairs: int  # downloaded pairs of the whole pool, what the samples-seen budget is counted in, whatever k
    synthetic_caption_probability: float | None = None  # recap_mix_p: training draws the synthetic caption so often
    excluded_uids: frozenset[str] = frozenset()  # full: the downloaded pairs dedup removed, which training skips


def training_set(store: DataStore, variant: str, scratch: Path) -> TrainingSet:
    """The tars of the training set `variant` (a training-set key) fetched under `scratch` (a local data root's
    files are used in place), walked once.

    Every training set, `full` included, covers the same pool: the downloaded shards but those the published cut
    left out (quarantined), so the variants stay comparable. A key the published cut did not make (another k)
    is an error that says so, rather than training on an older cut's subsets."""
    layout.parse_training_set_key(variant)
    digest = hashlib.sha256()
    tars: list[Path] = []
    pairs = pool_pairs = 0
    cuts = _published_cuts(store, scratch)
    if cuts and variant != schemas.FULL and variant not in cuts:
        raise NoTrainingDataError(
            f"the published cut has no training set {variant} (it has {', '.join(cuts)}): add its keep fraction to "
            "the compression curve (--keep, CA_KEEP_FRACTION) and materialize score_threshold and compressed_subset"
        )
    left_out = {shard for cut in cuts.values() for shard in cut.excluded}
    mix = cuts[variant].synthetic_caption_probability if variant in cuts else None
    shards = [shard for shard in downloaded_shards(store) if shard not in left_out]
    if not shards:
        raise NoTrainingDataError(f"no training data for {variant}: no shard has been downloaded")
    # the subsets' tars hold only what survived dedup; full's are the downloads, so it skips what dedup removed
    excluded = (
        frozenset(published_removals(store, scratch)[schemas.UID].to_list()) if variant == schemas.FULL else frozenset()
    )
    for shard in shards:
        shard_tars, shard_pool_pairs = _shard_tars(store, variant, shard, scratch)
        rows = sorted(
            row for row in (_pair_row(shard, sample) for sample in iter_samples(shard_tars)) if row[0] not in excluded
        )
        for row in rows:
            digest.update(json.dumps([shard, *row]).encode() + b"\n")
        tars += shard_tars
        pairs += len(rows)
        pool_pairs += shard_pool_pairs
    if mix is not None:
        digest.update(f"synthetic caption probability {mix}".encode())
    return TrainingSet(variant, tars, digest.hexdigest(), pairs, pool_pairs, mix, excluded)


def _published_cuts(store: DataStore, scratch: Path) -> dict[str, ScoreThreshold]:
    """The published cut of each training set but `full` (none before there is a cut)."""
    try:
        return {threshold.key: threshold for threshold in published_thresholds(store, scratch)}
    except LookupError:
        return {}


def _pair_row(shard: str, sample: TarSample) -> tuple[str, str, str, str | None]:
    """(uid, image sha256, caption, synthetic caption carried beside it) of a sample, its image left undecoded."""
    uid = sample.meta.get(schemas.UID)
    if uid is None:
        raise ValueError(f"shard {shard}: sample {sample.key!r} has no uid in its json member")
    synthetic = sample.meta.get(schemas.SYNTHETIC_CAPTION_META)
    return str(uid), hashlib.sha256(sample.image).hexdigest(), sample.caption, synthetic


def _shard_tars(store: DataStore, variant: str, shard: str, scratch: Path) -> tuple[list[Path], int]:
    """One shard's tars of the variant, and the pairs the shard downloaded (its ledger's, or its subset
    manifest's count, which is the same)."""
    if variant == schemas.FULL:
        ledger = read_download_ledger(store, shard, scratch / "ledgers")
        return fetch_downloaded_tars(store, shard, ledger, scratch / "in"), downloaded_rows(ledger).height
    manifest = read_json(store, f"{layout.subset_prefix(variant, shard)}/{layout.SUBSET_MANIFEST_FILE}", scratch)
    if manifest is None or not store.exists(layout.subset_membership_key(variant, shard)):
        raise NoTrainingDataError(
            f"shard {shard} has no {variant} subset yet: materialize compressed_subset for it first"
        )
    tar = fetch_to_local(store, f"{layout.subset_prefix(variant, shard)}/{manifest['tar']}", scratch / "in")
    return [tar], manifest["pairs"]


@dataclass(frozen=True)
class TrainingSettings:
    """How the CLIP and BLIP models are trained on each variant (see the model_training resource)."""

    clip_source: str
    blip_source: str
    budget: str  # "samples": equal samples seen across variants; "epochs": equal epochs
    samples_seen: int | None
    full_epochs: float
    epochs: int
    image_size: int
    batch_size: int
    clip_learning_rate: float
    blip_learning_rate: float
    seed: int
    seeds: int  # models per variant, seeded seed, seed + 1, ...
    device: str | None

    def training_seeds(self) -> list[int]:
        return [self.seed + offset for offset in range(self.seeds)]


def budget_for(settings: TrainingSettings, full_pairs: int) -> TrainingBudget:
    """Equal samples seen across training sets (DataComp's rule), counted in passes over the full pool's
    `full_pairs` whatever a set's k, so every point of the compression curve costs the same; or equal epochs when
    configured."""
    from ca_platform.training.tars import TrainingBudget

    if settings.budget == "epochs":
        return TrainingBudget(samples_seen=None, epochs=settings.epochs)
    if settings.budget != "samples":
        raise ValueError(f'model_training.budget must be "samples" or "epochs", got {settings.budget!r}')
    return TrainingBudget(samples_seen=settings.samples_seen or round(settings.full_epochs * full_pairs), epochs=None)


@dataclass(frozen=True)
class _VariantModel:
    train: Callable[..., Any]
    save: Callable[[Any, Path], tuple[str, Path]]
    source: Callable[[TrainingSettings], str]
    learning_rate: Callable[[TrainingSettings], float]


def _variant_model(model: str) -> _VariantModel:
    from ca_platform.training.captioner import save_trained_captioner, train_blip_captioner_on_tars
    from ca_platform.training.clip import save_trained_clip, train_clip_on_tars

    return {
        layout.CLIP_CHECKPOINT: _VariantModel(
            train_clip_on_tars, save_trained_clip, lambda s: s.clip_source, lambda s: s.clip_learning_rate
        ),
        layout.BLIP_CHECKPOINT: _VariantModel(
            train_blip_captioner_on_tars,
            save_trained_captioner,
            lambda s: s.blip_source,
            lambda s: s.blip_learning_rate,
        ),
    }[model]


def train_on_variant(
    store: DataStore, model: str, variant: str, settings: TrainingSettings, seed: int, scratch: Path
) -> tuple[dict[str, Any], bool]:
    """The current document of `model` (CLIP_CHECKPOINT or BLIP_CHECKPOINT) trained on the training set `variant`
    (a training-set key) with `seed`, and whether it was trained now: not while its pairs and the settings are
    unchanged."""
    spec = _variant_model(model)
    dataset = training_set(store, variant, scratch)
    settings = dataclasses.replace(settings, seed=seed, seeds=1)  # this model's own recipe, whatever else trains
    budget = budget_for(settings, dataset.pool_pairs)
    recipe = recipe_hash([model, dataset.fingerprint, recipe_settings(settings), repr(budget)])

    def train_and_save() -> tuple[str, Path, dict[str, Any]]:
        trained = spec.train(
            dataset.tars,
            budget,
            pairs=dataset.pairs,
            source=spec.source(settings),
            image_size=settings.image_size,
            batch_size=settings.batch_size,
            learning_rate=spec.learning_rate(settings),
            seed=settings.seed,
            device=settings.device,
            synthetic_caption_probability=dataset.synthetic_caption_probability,
            description=f"{model} {variant} seed {seed}: training",
            excluded_uids=dataset.excluded_uids,
        )
        version, folder = spec.save(trained, scratch / "checkpoints")
        fields = {
            "variant": variant,
            "seed": seed,
            "training_pairs": dataset.pairs,
            "metrics": {k: v for k, v in trained.metrics.items() if k != "loss"},
            "loss": trained.metrics.get("loss", []),
        }
        return version, folder, fields

    return train_once(store, layout.trained_model_kind(model, variant, seed), recipe, train_and_save, scratch)
