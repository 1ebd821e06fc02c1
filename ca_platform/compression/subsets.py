"""A shard's part of each compressed subset: the kept pairs re-packed as a webdataset tar, ready for training.

Beside each variant's tar: the kept uids (one per line), a manifest with the counts, and the membership table
of every downloaded pair of the shard (kept or dropped, with the score that decided it), so nothing is lost
between the download ledger and the training set. One pass over the shard's download tars writes every
variant's tar.

webdataset (which imports torch) is imported when the tars are written, not with the module: every Dagster
process loads the definitions, few compress.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ca_platform import layout, schemas
from ca_platform.analytics.plots import histogram_png
from ca_platform.audit import AuditFailed, StagedOutput, audit_and_publish, reject
from ca_platform.captioning.shards import read_synthetic_captions
from ca_platform.compression.threshold import histogram_cut, mirror_if_remote, published_thresholds, shard_membership
from ca_platform.ingest.download import downloaded_rows, fetch_downloaded_tars, read_download_ledger
from ca_platform.ingest.quality import CheckOutcome, check_subsets
from ca_platform.ingest.webdataset_io import iter_samples
from ca_platform.schemas import REWARD_TOPK, VARIANT_SCORERS
from ca_platform.storage import DataStore


class SubsetError(RuntimeError):
    """The downloads and the membership table disagree; the message names the shard and the uids."""


@dataclass(frozen=True)
class WrittenSubsets:
    manifests: dict[str, dict[str, Any]]  # training set (`<variant>@<k>`, ...) -> its manifest
    written: dict[str, list[str]]  # training set -> the uids written to its tar, in order


def _kept_captions(membership: pl.DataFrame) -> dict[str, tuple[str, int | None]]:
    """uid -> (caption source, candidate rank) of the variant's kept pairs."""
    kept = membership.filter(pl.col("kept")).select(schemas.UID, "caption_source", schemas.CAPTION_RANK)
    return {uid: (source, rank) for uid, source, rank in kept.iter_rows()}


def write_shard_subsets(
    memberships: Mapping[str, pl.DataFrame],
    download_tars: Sequence[Path],
    out_root: Path,
    shard: str,
    token: str = "",
    synthetic: Mapping[tuple[str, int], str] | None = None,
) -> WrittenSubsets:
    """Write each training set's tar, uid list, manifest and membership of one shard into
    `out_root/<training set>` (`memberships` is keyed by training set: a variant at each k), in one pass over
    the download tars. `token` goes into the tar's name (see layout.subset_tar_name).

    The samples are copied byte for byte (image, json) in canonical order, each with the caption its membership
    names: its own, the synthetic candidate of `synthetic` ((uid, rank) -> caption), or (recap_mix_p) its own
    with the synthetic one beside it in the json member, for training to draw from.
    """
    import webdataset as wds

    kept = {variant: _kept_captions(membership) for variant, membership in memberships.items()}
    written: dict[str, list[str]] = {variant: [] for variant in memberships}
    sizes = dict.fromkeys(memberships, 0)
    seen: set[str] = set()
    with ExitStack() as stack:
        writers = {}
        for variant in memberships:
            (out_root / variant).mkdir(parents=True, exist_ok=True)
            tar = out_root / variant / layout.subset_tar_name(shard, token)
            writers[variant] = stack.enter_context(wds.TarWriter(str(tar)))
        for sample in iter_samples(download_tars):
            uid = str(sample.meta.get(schemas.UID))
            keeping = [variant for variant, captions in kept.items() if uid in captions]
            if not keeping:
                continue
            if uid in seen:
                raise SubsetError(f"shard {shard}: uid {uid} appears twice in its download tars")
            seen.add(uid)
            for variant in keeping:
                caption, meta = _caption_and_meta(sample.caption, sample.meta, *kept[variant][uid], synthetic, shard)
                writers[variant].write(
                    {
                        "__key__": sample.key,
                        sample.image_format: sample.image,
                        "txt": caption.encode("utf-8"),
                        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
                    }
                )
                written[variant].append(uid)
                sizes[variant] += len(sample.image)
    manifests = {
        key: _write_beside_tar(membership, key, written[key], sizes[key], out_root / key, shard, token)
        for key, membership in memberships.items()
    }
    return WrittenSubsets(manifests, written)


def _caption_and_meta(
    raw: str,
    meta: dict[str, Any],
    source: str,
    rank: int | None,
    synthetic: Mapping[tuple[str, int], str] | None,
    shard: str,
) -> tuple[str, dict[str, Any]]:
    """The caption a kept sample carries and its json member: the raw caption's sample unchanged; a synthetic
    caption in `txt` with the raw one kept as `raw_caption`; a mixed sample with both."""
    if source == schemas.RAW_CAPTION:
        return raw, meta
    uid = str(meta.get(schemas.UID))
    if rank is None or synthetic is None or (uid, rank) not in synthetic:
        raise SubsetError(f"shard {shard}: uid {uid} should carry synthetic caption {rank}, which is not there")
    if source == schemas.MIXED_CAPTION:
        return raw, {**meta, schemas.SYNTHETIC_CAPTION_META: synthetic[uid, rank]}
    return synthetic[uid, rank], {**meta, "raw_caption": raw, schemas.CAPTION_RANK: rank}


def _write_beside_tar(
    membership: pl.DataFrame, training_set: str, written: list[str], size: int, out_dir: Path, shard: str, token: str
) -> dict[str, Any]:
    (out_dir / layout.SUBSET_UIDS_FILE).write_text("".join(f"{uid}\n" for uid in written))
    first = membership.row(0, named=True) if membership.height else {}
    manifest = {
        "shard": shard,
        "training_set": training_set,
        "variant": first.get("variant"),
        "model_version": first.get("model_version"),
        "keep_fraction": first.get("keep_fraction"),
        "pairs": membership.height,
        "kept": len(written),
        "dropped": membership.height - len(written),
        "tar": layout.subset_tar_name(shard, token),
        "image_bytes": size,
    }
    (out_dir / layout.SUBSET_MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    schemas.conform(membership, schemas.SUBSETS).write_parquet(out_dir / layout.SUBSET_MEMBERSHIP_FILE)
    return manifest


@dataclass(frozen=True)
class ShardSubsets:
    manifests: list[dict[str, Any]]  # one per training set, in the score-threshold report's order
    outcomes: list[CheckOutcome]  # the audit that let them be published
    plot: Path  # the shard's reward scores, kept and dropped


def compress_shard(
    store: DataStore,
    files_root: Path,
    shard: str,
    run_id: str,
    scratch: Path,
    refresh: Callable[[list[str]], None],
) -> ShardSubsets:
    """Apply every published cut (each variant at each k) to one shard, audit the result and publish its subsets
    if it passes (AuditFailed otherwise, the attempt kept under rejected/); `refresh(keys)` makes the memberships
    visible to the DuckDB views.

    The audit proves nothing is lost: each variant's membership is the shard's downloaded pairs once each, and
    its tar exactly the kept ones. A variant's tar carries the run's token and its manifest, which names the
    tar, is published last, so a reader sees either the previous complete subset or this one; the previous
    tar is removed afterwards. The scores and ledger are read by DuckDB under `files_root` (the data root or
    its local mirror).
    """
    thresholds = published_thresholds(store, scratch)
    if any(shard in t.excluded for t in thresholds):
        raise SubsetError(
            f"shard {shard} was quarantined when the pool was cut, so no cut covers it: materialize its failed step "
            "again, then score_threshold"
        )
    ledger = read_download_ledger(store, shard, scratch / "ledger")
    tars = fetch_downloaded_tars(store, shard, ledger, scratch / "in")
    scored = sorted(
        {
            layout.scores_key(VARIANT_SCORERS[t.variant], t.model_version, shard)
            for t in thresholds
            if t.variant in VARIANT_SCORERS
        }
        | {
            layout.synthetic_scores_key(VARIANT_SCORERS[t.variant], t.model_version, t.captioner_version, shard)
            for t in thresholds
            if t.captioner_version
        }
    )
    mirror_if_remote(store, files_root, [layout.download_rows_key(shard), *scored])
    memberships = {t.key: shard_membership(files_root, t, shard) for t in thresholds}
    captioners = {t.captioner_version for t in thresholds if t.captioner_version}
    synthetic = {
        (uid, rank): caption
        for version in captioners
        for uid, rank, caption in read_synthetic_captions(store, version, shard, scratch / "captions")
        .select(schemas.UID, schemas.RANK, schemas.CAPTION)
        .iter_rows()
    }
    written = write_shard_subsets(memberships, tars, scratch / "subsets", shard, run_id[:8], synthetic)
    outcomes = [check_subsets(memberships, written.written, downloaded_rows(ledger)[schemas.UID])]
    staged = {
        variant: _staged_variant(scratch / "subsets" / variant, variant, shard, run_id) for variant in memberships
    }
    if not outcomes[0].passed:
        rejected = ", ".join(store.uri_of(reject(store, output, outcomes)) for output in staged.values())
        raise AuditFailed(f"shard {shard} ({layout.SUBSET_STEP})", outcomes, rejected)
    for variant, output in staged.items():
        previous = {o.key for o in store.list(layout.subset_prefix(variant, shard) + "/")}
        audit_and_publish(store, output, outcomes)
        for stale in previous - {*output.files, output.index_key}:
            store.delete(stale)
    refresh([layout.subset_membership_key(variant, shard) for variant in memberships])
    plot = shard_score_plot(memberships[histogram_cut(thresholds).key], scratch / "plot.png", shard)
    return ShardSubsets([written.manifests[v] for v in memberships], outcomes, plot)


def _staged_variant(folder: Path, variant: str, shard: str, run_id: str) -> StagedOutput:
    """A variant's written folder as one staged output: its files first, the manifest (the index) last."""
    prefix = layout.subset_prefix(variant, shard)
    files = {
        f"{prefix}/{path.name}": path
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != layout.SUBSET_MANIFEST_FILE
    }
    manifest = folder / layout.SUBSET_MANIFEST_FILE
    return StagedOutput(
        f"{layout.SUBSET_STEP}-{variant}", shard, run_id, files, layout.subset_manifest_key(variant, shard), manifest
    )


def shard_score_plot(membership: pl.DataFrame, path: Path, shard: str) -> Path:
    """Kept and dropped pairs of one shard per score bin (pairs dedup removed have no score and no bin)."""
    membership = membership.filter(pl.col("score").is_not_null())
    scores = membership["score"].to_numpy()
    edges = np.histogram_bin_edges(scores, bins=20) if scores.size else np.linspace(0.0, 1.0, 21)
    kept = membership.filter(pl.col("kept"))["score"].to_numpy()
    dropped = membership.filter(~pl.col("kept"))["score"].to_numpy()
    counts = {"kept": np.histogram(kept, edges)[0].tolist(), "dropped": np.histogram(dropped, edges)[0].tolist()}
    return histogram_png(edges.tolist(), counts, path, f"{REWARD_TOPK} of shard {shard}")
