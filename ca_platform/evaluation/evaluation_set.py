"""The held-out evaluation set the trained models are judged on: parquet `url, caption`, COCO style.

Rows that share a URL are one image with several reference captions. Images come through the same guarded
img2dataset download as the pool, and every row is accounted for: an image that fails to download is in
the ledger with its reason and is left out of the metrics, which say how many images they cover.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
from PIL import Image

from ca_platform import layout, schemas
from ca_platform.ingest.download import DownloadSettings, download_shard, downloaded_rows
from ca_platform.ingest.webdataset_io import iter_pairs
from ca_platform.schemas import CAPTION, UID, URL, Status
from ca_platform.storage import DataStore, fetch_folder, fetch_to_local, publish_folder, read_json, write_json

EVALUATION_SHARD = "evaluation"
LEDGER_FILE = "rows.parquet"
REFERENCES_FILE = "references.parquet"


class EvaluationSetError(ValueError):
    """An unusable evaluation file; the message names the file and the rows."""


def evaluation_version(path: Path) -> str:
    """The file's content hash: the same file is downloaded and evaluated on once."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def read_held_out_columns(
    path: Path, required: Sequence[str], optional: Sequence[str], error: type[ValueError]
) -> pl.DataFrame:
    """The `required` columns (and those of `optional` the file has) of a held-out set's parquet file; `error`
    names the file when it is not parquet or lacks a required column."""
    try:
        table = pq.read_table(path)
    except Exception as cause:  # pyarrow raises several types for a file that is not parquet
        raise error(f"{path}: not a readable parquet file ({cause})") from cause
    missing = [c for c in required if c not in table.schema.names]
    if missing:
        raise error(f"{path}: missing column(s) {missing} (columns: {table.schema.names})")
    frame = pl.from_arrow(table.select([*required, *(c for c in optional if c in table.schema.names)]))
    assert isinstance(frame, pl.DataFrame)
    return frame


def read_evaluation_file(path: Path) -> pl.DataFrame:
    """`uid, url, caption` per row; the uid names the image (sha1 of its URL)."""
    frame = read_held_out_columns(path, (URL, CAPTION), (), EvaluationSetError)
    frame = frame.with_columns(pl.col(URL).cast(pl.String).str.strip_chars(), pl.col(CAPTION).cast(pl.String))
    bad = frame.with_row_index("row").filter(
        pl.col(URL).is_null()
        | (pl.col(URL) == "")
        | pl.col(CAPTION).is_null()
        | (pl.col(CAPTION).str.strip_chars() == "")
    )
    if bad.height:
        raise EvaluationSetError(f"{path}: empty url or caption at rows {(bad['row'] + 1).head(5).to_list()}")
    if frame.is_empty():
        raise EvaluationSetError(f"{path}: no rows")
    return frame.with_columns(url_uids(frame[URL])).select(UID, URL, CAPTION)


def url_uids(urls: pl.Series) -> pl.Series:
    """The uid of each held-out image: the sha1 of its URL, so rows sharing a URL are one image."""
    return pl.Series(UID, [hashlib.sha1(url.encode("utf-8")).hexdigest()[:24] for url in urls], dtype=pl.String)


def download_images(images: pl.DataFrame, out_dir: Path, settings: DownloadSettings, shard: str) -> pl.DataFrame:
    """Download the images of a held-out set (`uid, url, caption` per distinct image, in the file's order; the
    caption goes into the tar beside the image) into `out_dir` as tars beside their ledger (LEDGER_FILE, its rows
    under the set's name `shard`), through the pool's guarded img2dataset; returns the ledger.

    Every held-out set (the evaluation set, the labelled classification set) comes through here, so each is
    fetched under the same guard and accounted for row by row in the same way."""
    raw = schemas.conform(
        images.select(UID, URL, CAPTION)
        .with_row_index(schemas.ROW_INDEX)
        .with_columns(pl.lit(shard).alias(schemas.SHARD), pl.lit(None, dtype=pl.String).alias(schemas.SKIP_REASON)),
        schemas.RAW_SHARD,
    )
    result = download_shard(raw, out_dir / "download", settings)
    for name, tar in result.tars.items():
        tar.rename(out_dir / name)
    shutil.rmtree(out_dir / "download")  # img2dataset's own bookkeeping; the ledger says it all
    result.rows.write_parquet(out_dir / LEDGER_FILE)
    return result.rows


def download_evaluation_set(path: Path, out_dir: Path, settings: DownloadSettings) -> pl.DataFrame:
    """Download each distinct image of the file into `out_dir` (tars + ledger) beside the references;
    returns the ledger (one row per distinct image)."""
    frame = read_evaluation_file(path)
    ledger = download_images(frame.unique(UID, keep="first", maintain_order=True), out_dir, settings, EVALUATION_SHARD)
    frame.select(UID, CAPTION).write_parquet(out_dir / REFERENCES_FILE)
    return ledger


def downloaded_images(folder: Path) -> tuple[list[tuple[str, Image.Image]], int]:
    """The (uid, image) pairs a `download_images` folder holds, in uid order, and how many of its images failed
    to download (in the ledger with their reason)."""
    ledger = pl.read_parquet(folder / LEDGER_FILE)
    tars = sorted(folder / name for name in ledger.filter(pl.col(schemas.STATUS) == Status.SUCCESS)["tar"].unique())
    pairs = sorted(((uid, image) for uid, image, _ in iter_pairs(tars)), key=lambda pair: pair[0])
    return pairs, ledger.filter(pl.col(schemas.STATUS) != Status.SUCCESS).height


@dataclass(frozen=True)
class EvaluationSet:
    uids: list[str]  # one per downloaded image, in uid order
    images: list[Image.Image]
    references: list[list[str]]  # the captions of each image
    not_downloaded: int  # images of the file that failed to download (in the ledger with their reason)

    @property
    def captions(self) -> tuple[list[str], list[int]]:
        """Every reference caption flattened, and the index of the image each belongs to (for retrieval)."""
        flat, owner = [], []
        for index, references in enumerate(self.references):
            flat += references
            owner += [index] * len(references)
        return flat, owner


def load_evaluation_set(folder: Path) -> EvaluationSet:
    """The downloaded images of a folder `download_evaluation_set` wrote, with their reference captions."""
    references = pl.read_parquet(folder / REFERENCES_FILE).group_by(UID, maintain_order=True).agg(pl.col(CAPTION))
    by_uid = dict(zip(references[UID], references[CAPTION].to_list()))
    pairs, not_downloaded = downloaded_images(folder)
    if not pairs:
        raise EvaluationSetError(f"{folder}: no evaluation image was downloaded (see {folder / LEDGER_FILE})")
    return EvaluationSet(
        uids=[uid for uid, _ in pairs],
        images=[image for _, image in pairs],
        references=[by_uid[uid] for uid, _ in pairs],
        not_downloaded=not_downloaded,
    )


class NoEvaluationSetError(LookupError):
    """No evaluation set has been downloaded under the data root yet."""


@dataclass(frozen=True)
class StagedEvaluationSet:
    version: str
    ledger: pl.DataFrame  # one row per distinct image of the file

    @property
    def downloaded(self) -> int:
        return downloaded_rows(self.ledger).height


def stage_evaluation_set(
    store: DataStore, path: Path, settings: DownloadSettings, scratch: Path
) -> StagedEvaluationSet:
    """Download the file's images and publish the set under the file's content hash, then make it current.

    A file downloaded before is reused as it is (its ledger is published last, so it marks a complete set).
    """
    return stage_held_out_set(
        store,
        path,
        scratch,
        layout.evaluation_prefix,
        layout.CURRENT_EVALUATION_KEY,
        lambda folder: download_evaluation_set(path, folder, settings),
    )


def stage_held_out_set(
    store: DataStore,
    path: Path,
    scratch: Path,
    prefix: Callable[[str], str],
    current_key: str,
    download: Callable[[Path], pl.DataFrame],
) -> StagedEvaluationSet:
    """Publish what `download` writes into a folder under `prefix(content hash of the file)` and point
    `current_key` at it; a file staged before is reused as it is (its ledger, published last, marks it complete)."""
    version = evaluation_version(path)
    ledger_key = f"{prefix(version)}/{LEDGER_FILE}"
    if store.exists(ledger_key):
        ledger = pl.read_parquet(fetch_to_local(store, ledger_key, scratch))
    else:
        ledger = download(scratch / "set")
        publish_folder(store, scratch / "set", prefix(version), index_name=LEDGER_FILE)
    write_json(store, current_key, {"version": version, "source": str(path)}, scratch)
    return StagedEvaluationSet(version, ledger)


def current_evaluation_set(store: DataStore, cache: Path, scratch: Path) -> tuple[str, EvaluationSet]:
    """The current evaluation set's version and its downloaded images (kept in the local `cache`)."""
    document = read_json(store, layout.CURRENT_EVALUATION_KEY, scratch)
    if document is None:
        raise NoEvaluationSetError(f"no evaluation set yet under {store.uri}: materialize evaluation_set first")
    folder = fetch_folder(store, layout.evaluation_prefix(document["version"]), cache)
    return document["version"], load_evaluation_set(folder)
