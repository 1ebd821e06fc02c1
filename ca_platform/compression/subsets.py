"""A shard's part of a compressed subset: the kept pairs re-packed as a webdataset tar, ready for training.

Beside the tar: the kept uids (one per line), a manifest with the counts, and the membership table of
every downloaded pair of the shard (kept or dropped, with the score that decided it), so nothing is lost
between the download ledger and the training set.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl
import webdataset as wds

from ca_platform import layout, schemas
from ca_platform.ingest.webdataset_io import iter_samples


class SubsetError(RuntimeError):
    """The downloads and the membership table disagree; the message names the shard and the uids."""


def write_shard_subset(
    membership: pl.DataFrame, download_tars: Sequence[Path], out_dir: Path, shard: str
) -> dict[str, Any]:
    """Write the tar, uid list, manifest and membership of one shard's subset into `out_dir`; returns the manifest.

    The samples are copied byte for byte (image, caption, json), in download order.
    """
    kept_uids = set(membership.filter(pl.col("kept"))[schemas.UID].to_list())
    out_dir.mkdir(parents=True, exist_ok=True)
    tar_path = out_dir / layout.subset_tar_name(shard)
    written: list[str] = []
    seen: set[str] = set()
    size = 0
    with wds.TarWriter(str(tar_path)) as writer:
        for sample in iter_samples(download_tars):
            uid = str(sample.meta.get(schemas.UID))
            if uid not in kept_uids:
                continue
            if uid in seen:
                raise SubsetError(f"shard {shard}: uid {uid} appears twice in its download tars")
            writer.write(
                {
                    "__key__": sample.key,
                    sample.image_format: sample.image,
                    "txt": sample.caption.encode("utf-8"),
                    "json": json.dumps(sample.meta, sort_keys=True).encode("utf-8"),
                }
            )
            written.append(uid)
            seen.add(uid)
            size += len(sample.image)
    missing = sorted(kept_uids - seen)
    if missing:
        raise SubsetError(f"shard {shard}: {len(missing)} kept uids are not in its download tars, e.g. {missing[:5]}")
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
        "tar": tar_path.name,
        "image_bytes": size,
    }
    (out_dir / layout.SUBSET_MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    schemas.conform(membership, schemas.SUBSETS).write_parquet(out_dir / layout.SUBSET_MEMBERSHIP_FILE)
    return manifest
