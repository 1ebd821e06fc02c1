"""A shard's part of each compressed subset: the kept pairs re-packed as a webdataset tar, ready for training.

Beside each variant's tar: the kept uids (one per line), a manifest with the counts, and the membership table
of every downloaded pair of the shard (kept or dropped, with the score that decided it), so nothing is lost
between the download ledger and the training set. One pass over the shard's download tars writes every
variant's tar.
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
import webdataset as wds

from ca_platform import layout, schemas
from ca_platform.analytics.plots import histogram_png
from ca_platform.compression.threshold import mirror_if_remote, published_thresholds, shard_membership
from ca_platform.ingest.download import downloaded_rows, fetch_downloaded_tars, read_download_ledger
from ca_platform.ingest.webdataset_io import iter_samples
from ca_platform.schemas import REWARD_TOPK, VARIANT_SCORERS
from ca_platform.storage import DataStore, publish_folder

SUBSET_STEP = "subsets"  # the step name in staging and locks' owners


class SubsetError(RuntimeError):
    """The downloads and the membership table disagree; the message names the shard and the uids."""


def write_shard_subsets(
    memberships: Mapping[str, pl.DataFrame], download_tars: Sequence[Path], out_root: Path, shard: str
) -> dict[str, dict[str, Any]]:
    """Write each variant's tar, uid list, manifest and membership of one shard into `out_root/<variant>`, in
    one pass over the download tars; returns each variant's manifest.

    The samples are copied byte for byte (image, caption, json), in download order.
    """
    kept_uids = {v: set(m.filter(pl.col("kept"))[schemas.UID].to_list()) for v, m in memberships.items()}
    written: dict[str, list[str]] = {variant: [] for variant in memberships}
    sizes = dict.fromkeys(memberships, 0)
    seen: set[str] = set()
    with ExitStack() as stack:
        writers = {}
        for variant in memberships:
            (out_root / variant).mkdir(parents=True, exist_ok=True)
            tar = out_root / variant / layout.subset_tar_name(shard)
            writers[variant] = stack.enter_context(wds.TarWriter(str(tar)))
        for sample in iter_samples(download_tars):
            uid = str(sample.meta.get(schemas.UID))
            keeping = [variant for variant, uids in kept_uids.items() if uid in uids]
            if not keeping:
                continue
            if uid in seen:
                raise SubsetError(f"shard {shard}: uid {uid} appears twice in its download tars")
            seen.add(uid)
            record = {
                "__key__": sample.key,
                sample.image_format: sample.image,
                "txt": sample.caption.encode("utf-8"),
                "json": json.dumps(sample.meta, sort_keys=True).encode("utf-8"),
            }
            for variant in keeping:
                writers[variant].write(record)
                written[variant].append(uid)
                sizes[variant] += len(sample.image)
    manifests = {}
    for variant, membership in memberships.items():
        missing = sorted(kept_uids[variant] - seen)
        if missing:
            raise SubsetError(
                f"shard {shard}: {len(missing)} kept uids of {variant} are not in its download tars, e.g. {missing[:5]}"
            )
        manifests[variant] = _write_beside_tar(membership, written[variant], sizes[variant], out_root / variant, shard)
    return manifests


def _write_beside_tar(
    membership: pl.DataFrame, written: list[str], size: int, out_dir: Path, shard: str
) -> dict[str, Any]:
    (out_dir / layout.SUBSET_UIDS_FILE).write_text("".join(f"{uid}\n" for uid in written))
    first = membership.row(0, named=True) if membership.height else {}
    manifest = {
        "shard": shard,
        "variant": first.get("variant"),
        "model_version": first.get("model_version"),
        "keep_fraction": first.get("keep_fraction"),
        "pairs": membership.height,
        "kept": len(written),
        "dropped": membership.height - len(written),
        "tar": layout.subset_tar_name(shard),
        "image_bytes": size,
    }
    (out_dir / layout.SUBSET_MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    schemas.conform(membership, schemas.SUBSETS).write_parquet(out_dir / layout.SUBSET_MEMBERSHIP_FILE)
    return manifest


@dataclass(frozen=True)
class ShardSubsets:
    manifests: list[dict[str, Any]]  # one per variant, in the score-threshold report's order
    plot: Path  # the shard's reward scores, kept and dropped


def compress_shard(
    store: DataStore, files_root: Path, shard: str, scratch: Path, refresh: Callable[[list[str]], None]
) -> ShardSubsets:
    """Apply every variant's published cut to one shard and publish its subsets (each variant's membership
    last, which marks it complete); `refresh(keys)` makes the memberships visible to the DuckDB views.

    The scores and ledger are read by DuckDB under `files_root` (the data root or its local mirror).
    """
    thresholds = published_thresholds(store, scratch)
    ledger = read_download_ledger(store, shard, scratch / "ledger")
    tars = fetch_downloaded_tars(store, shard, ledger, scratch / "in")
    scored = [
        layout.scores_key(VARIANT_SCORERS[t.variant], t.model_version, shard)
        for t in thresholds
        if t.variant in VARIANT_SCORERS
    ]
    mirror_if_remote(store, files_root, [layout.download_rows_key(shard), *scored])
    downloaded = downloaded_rows(ledger).height
    memberships = {}
    for threshold in thresholds:
        membership = shard_membership(files_root, threshold, shard)
        if membership.height != downloaded:
            raise SubsetError(
                f"shard {shard}: {threshold.variant} ranks {membership.height} pairs but the shard downloaded "
                f"{downloaded}; rescore it"
            )
        memberships[threshold.variant] = membership
    manifests = write_shard_subsets(memberships, tars, scratch / "subsets", shard)
    published = []
    for variant in memberships:
        prefix = layout.subset_prefix(variant, shard)
        publish_folder(store, scratch / "subsets" / variant, prefix, index_name=layout.SUBSET_MEMBERSHIP_FILE)
        published.append(layout.subset_membership_key(variant, shard))
    refresh(published)
    plot = shard_score_plot(memberships[REWARD_TOPK], scratch / "plot.png", shard)
    return ShardSubsets([manifests[v] for v in memberships], plot)


def shard_score_plot(membership: pl.DataFrame, path: Path, shard: str) -> Path:
    """Kept and dropped pairs of one shard per score bin."""
    scores = membership["score"].to_numpy()
    edges = np.histogram_bin_edges(scores, bins=20) if scores.size else np.linspace(0.0, 1.0, 21)
    kept = membership.filter(pl.col("kept"))["score"].to_numpy()
    dropped = membership.filter(~pl.col("kept"))["score"].to_numpy()
    counts = {"kept": np.histogram(kept, edges)[0].tolist(), "dropped": np.histogram(dropped, edges)[0].tolist()}
    return histogram_png(edges.tolist(), counts, path, f"{REWARD_TOPK} of shard {shard}")
