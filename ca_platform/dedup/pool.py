"""Deduplication on the data root: each shard's fingerprints, then the pool-wide groups and removals every cut
and training set leaves out.

Fingerprints are per shard and per CLIP-score model version (the embedding is that model's), so a new CLIP-score
model fingerprints every shard again, and the pool-wide step groups them again; the pixel and perceptual hashes
are recomputed with them (cheap beside the embedding). The pool-wide step reads every healthy shard's
fingerprints, the current reward model's raw-caption scores (which pick each group's representative) and, when
there is an evaluation set or a labelled classification set, their images fingerprinted the same way; it writes
the groups (view `duplicates`) and the removals (view `dedup_removals`), replacing the previous ones whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from ca_platform import layout, schemas
from ca_platform.dedup.fingerprints import (
    FINGERPRINT_RECIPE,
    clip_image_embedder,
    fingerprint_images,
    fingerprint_tars,
)
from ca_platform.ingest.download import downloaded_rows, fetch_shard_download
from ca_platform.storage import DataStore, fetch_to_local, write_json

if TYPE_CHECKING:
    from ca_platform.dedup.groups import Deduplication, DedupSettings

NO_EMBEDDING = "no-embedding"  # the fingerprints' folder when there is no CLIP-score model to embed with


@dataclass(frozen=True)
class ShardFingerprints:
    shard: str
    fingerprints: pl.DataFrame
    reused: bool
    key: str


def fingerprint_shard(store: DataStore, shard: str, scorer: Any | None, scratch: Path) -> ShardFingerprints:
    """The shard's fingerprints by `scorer` (a ClipScorer; None: hashes only), published once they cover every
    downloaded image exactly (a ValueError names the images missing or extra otherwise); a published file of the
    same version that covers them is reused."""
    version = scorer.version if scorer is not None else NO_EMBEDDING
    key = layout.fingerprints_key(FINGERPRINT_RECIPE, version, shard)
    ledger, tars = fetch_shard_download(store, shard, scratch / "in")
    expected = set(downloaded_rows(ledger)[schemas.UID].to_list())
    if store.exists(key):
        existing = pl.read_parquet(fetch_to_local(store, key, scratch / "existing"))
        if set(existing[schemas.UID].to_list()) == expected and existing.height == len(expected):
            return ShardFingerprints(shard, existing, True, key)
    embed = clip_image_embedder(scorer) if scorer is not None else None
    frame = fingerprint_tars(tars, shard, embed, None if scorer is None else version)
    found = frame[schemas.UID].to_list()
    missing, extra = sorted(expected - set(found)), sorted(set(found) - expected)
    if missing or extra or len(found) != len(expected):
        raise ValueError(
            f"shard {shard}: fingerprints do not cover the downloaded images exactly "
            f"(missing {missing[:5]}, not downloaded {extra[:5]}, {len(found)} rows for {len(expected)} images)"
        )
    scratch.mkdir(parents=True, exist_ok=True)
    local = scratch / "fingerprints.parquet"
    schemas.conform(frame, schemas.IMAGE_FINGERPRINTS).write_parquet(local)
    store.put_file(local, key, consume=True)
    return ShardFingerprints(shard, frame, False, key)


def read_fingerprints(store: DataStore, version: str, shards: Sequence[str], scratch: Path) -> pl.DataFrame:
    """The published fingerprints of `shards` by one embedding version (a shard without them is an error)."""
    frames = []
    for shard in shards:
        key = layout.fingerprints_key(FINGERPRINT_RECIPE, version, shard)
        if not store.exists(key):
            raise LookupError(f"shard {shard} has no fingerprints by {version}: materialize image_fingerprints")
        frames.append(pl.read_parquet(fetch_to_local(store, key, scratch / "fingerprints")))
    return pl.concat(frames) if frames else schemas.empty(schemas.IMAGE_FINGERPRINTS)


def publish_deduplication(
    store: DataStore, result: Deduplication, versions: dict[str, str | None], settings: DedupSettings, scratch: Path
) -> dict[str, Any]:
    """Write the groups, the removals and the report (counts, settings, the versions used); returns the report."""
    scratch.mkdir(parents=True, exist_ok=True)
    for frame, key in ((result.duplicates, layout.DUPLICATES_KEY), (result.removals, layout.DEDUP_REMOVALS_KEY)):
        local = scratch / Path(key).name
        frame.write_parquet(local)
        store.put_file(local, key, consume=True)
    report = {"counts": result.counts(), "settings": asdict(settings), "versions": versions}
    write_json(store, layout.DEDUP_REPORT_KEY, report, scratch)
    return report


def published_removals(store: DataStore, scratch: Path) -> pl.DataFrame:
    """What dedup and decontamination removed (schemas.DEDUP_REMOVALS); empty before the pool was deduplicated."""
    if not store.exists(layout.DEDUP_REMOVALS_KEY):
        return schemas.empty(schemas.DEDUP_REMOVALS)
    return pl.read_parquet(fetch_to_local(store, layout.DEDUP_REMOVALS_KEY, scratch / "dedup"))


def _clip_scorer(store: DataStore, cache: Path, scratch: Path, device: str | None) -> Any | None:
    """The current CLIP-score model's scorer, whose image embeddings find semantic duplicates; None before one."""
    from ca_platform.scoring.registry import NoModelError, current_model, load_scorer

    try:
        document = current_model(store, schemas.CLIP_SCORE, scratch)
    except NoModelError:
        return None
    return load_scorer(store, schemas.CLIP_SCORE, document, cache, device)


def fingerprint_shards(
    store: DataStore, shards: Sequence[str], cache: Path, scratch: Path, device: str | None = None
) -> tuple[str, list[ShardFingerprints]]:
    """Every shard's fingerprints by the current CLIP-score model (hashes only before there is one); the
    embedding version and the shards' fingerprints."""
    scorer = _clip_scorer(store, cache, scratch, device)
    version = scorer.version if scorer is not None else NO_EMBEDDING
    return version, [fingerprint_shard(store, shard, scorer, scratch / shard) for shard in shards]


def _reward_scores(store: DataStore, shards: Sequence[str], scratch: Path) -> tuple[str | None, pl.DataFrame]:
    """The current reward model's raw-caption scores of the shards (uid, shard, score), which pick each group's
    representative; empty before there is a reward model (representatives then go by uid)."""
    from ca_platform.scoring.registry import NoModelError, current_model

    try:
        version = current_model(store, schemas.REWARD_MODEL, scratch)["version"]
    except NoModelError:
        return None, pl.DataFrame(schema={schemas.UID: pl.String(), schemas.SHARD: pl.String(), "score": pl.Float64()})
    frames = []
    for shard in shards:
        key = layout.scores_key(schemas.REWARD_MODEL, version, shard)
        if store.exists(key):
            frames.append(
                pl.read_parquet(fetch_to_local(store, key, scratch / "scores"), columns=["uid", "shard", "score"])
            )
    if not frames:
        return version, pl.DataFrame(
            schema={schemas.UID: pl.String(), schemas.SHARD: pl.String(), "score": pl.Float64()}
        )
    return version, pl.concat(frames)


def deduplicate_pool(
    store: DataStore,
    settings: DedupSettings,
    shards: Sequence[str],
    cache: Path,
    scratch: Path,
    device: str | None = None,
) -> tuple[Deduplication, dict[str, Any]]:
    """Group the shards' images, decontaminate them against the current evaluation set and labelled
    classification set (those there are), publish the groups, removals and report; returns the outcome and the
    report."""
    from ca_platform.dedup.groups import deduplicate
    from ca_platform.evaluation.classification_set import NoClassificationSetError, current_classification_set
    from ca_platform.evaluation.evaluation_set import NoEvaluationSetError, current_evaluation_set

    scorer = _clip_scorer(store, cache, scratch, device)
    embedding_version = scorer.version if scorer is not None else NO_EMBEDDING
    pool = read_fingerprints(store, embedding_version, shards, scratch)
    reward_version, scores = _reward_scores(store, shards, scratch)
    embed = clip_image_embedder(scorer) if scorer is not None else None
    held_out, versions = [], {"embedding": embedding_version, "reward_model": reward_version}
    for name, current, missing in (
        ("evaluation", current_evaluation_set, NoEvaluationSetError),
        ("classification", current_classification_set, NoClassificationSetError),
    ):
        try:
            versions[f"{name}_set"], images = current(store, cache, scratch)
        except missing:
            versions[f"{name}_set"] = None
        else:
            version = scorer.version if scorer is not None else None
            held_out.append(fingerprint_images(images.uids, name, images.images, embed, version))
    evaluation = pl.concat(held_out) if held_out else None
    result = deduplicate(pool, scores, evaluation, settings)
    return result, publish_deduplication(store, result, versions, settings, scratch)
