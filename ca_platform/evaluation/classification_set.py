"""The labelled set zero-shot classification is measured on: parquet `url, label` with an optional `name`.

`label` is each image's class (any type; compared as text); `name`, when given, is the class's readable name,
what the prompt templates say ("a photo of a {name}."), else the label itself is. Rows that share a URL are one
image and must agree on its label. Images come through the same guarded img2dataset download as the evaluation
set and are staged the same way, by the file's content hash; an image that fails to download is in the ledger
with its reason and is left out of the accuracy, which says how many images it covers. Every class of the file
is a candidate, even one whose images all failed to download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl
from PIL import Image

from ca_platform import layout, schemas
from ca_platform.evaluation.evaluation_set import (
    LEDGER_FILE,
    StagedEvaluationSet,
    download_images,
    downloaded_images,
    read_held_out_columns,
    stage_held_out_set,
    url_uids,
)
from ca_platform.ingest.download import DownloadSettings
from ca_platform.schemas import CAPTION, CLASS_NAME, LABEL, UID, URL
from ca_platform.storage import DataStore, fetch_folder, read_json

LABELS_FILE = "labels.parquet"
MIN_CLASSES = 2


CLASSIFICATION_SHARD = "classification"  # the labelled set's rows in its download ledger


class ClassificationSetError(ValueError):
    """An unusable labelled classification file; the message names the file and the rows."""


def _rows(frame: pl.DataFrame) -> list[int]:
    """The first few (1-based) file rows of `frame`'s `row` column, for a message."""
    return (frame["row"] + 1).head(5).to_list()


def read_classification_file(path: Path) -> pl.DataFrame:
    """`uid, url, label, name` per distinct image (schemas.CLASSIFICATION_LABELS), in the file's order."""
    frame = read_held_out_columns(path, (URL, LABEL), (CLASS_NAME,), ClassificationSetError)
    has_names = CLASS_NAME in frame.columns
    try:
        frame = frame.with_columns(
            pl.col(URL).cast(pl.String).str.strip_chars(),
            pl.col(LABEL).cast(pl.String).str.strip_chars(),
            (pl.col(CLASS_NAME).cast(pl.String) if has_names else pl.col(LABEL).cast(pl.String))
            .str.strip_chars()
            .alias(CLASS_NAME),
        ).with_row_index("row")
    except pl.exceptions.PolarsError as error:  # e.g. a nested label column
        raise ClassificationSetError(f"{path}: url, label and name must be text or numbers ({error})") from error
    if frame.is_empty():
        raise ClassificationSetError(f"{path}: no rows")
    for column in (URL, LABEL, CLASS_NAME):
        empty = frame.filter(pl.col(column).is_null() | (pl.col(column) == ""))
        if empty.height:
            raise ClassificationSetError(f"{path}: empty {column} at rows {_rows(empty)}")
    frame = frame.with_columns(url_uids(frame[URL]))
    # one name per class, one class per name (else two classes read alike to the model), one class per image
    for key, value in ((LABEL, CLASS_NAME), (CLASS_NAME, LABEL), (UID, LABEL)):
        conflicts = frame.filter(pl.col(value).n_unique().over(key) > 1)
        if conflicts.height:
            first = conflicts.filter(pl.col(key) == conflicts[key][0])
            subject = f"url {first[URL][0]!r}" if key == UID else f"{key} {first[key][0]!r}"
            values = sorted(set(first[value]))
            raise ClassificationSetError(f"{path}: {subject} has several {value}s {values} at rows {_rows(first)}")
    classes = frame[LABEL].unique(maintain_order=True)
    if classes.len() < MIN_CLASSES:
        raise ClassificationSetError(
            f"{path}: a single class ({classes[0]!r}) in {frame.height} rows: classification needs at least "
            f"{MIN_CLASSES}"
        )
    return schemas.conform(frame.unique(UID, keep="first", maintain_order=True), schemas.CLASSIFICATION_LABELS)


def download_classification_set(path: Path, out_dir: Path, settings: DownloadSettings) -> pl.DataFrame:
    """Download each distinct image of the file into `out_dir` (tars + ledger, the class name as each image's
    caption) beside its labels; returns the ledger."""
    frame = read_classification_file(path)
    ledger = download_images(
        frame.with_columns(pl.col(CLASS_NAME).alias(CAPTION)), out_dir, settings, CLASSIFICATION_SHARD
    )
    frame.write_parquet(out_dir / LABELS_FILE)
    return ledger


@dataclass(frozen=True)
class ClassificationSet:
    uids: list[str]  # one per downloaded image, in uid order
    images: list[Image.Image]
    classes: list[int]  # each image's class, an index into class_names
    class_names: list[str]  # what the prompts say, in the file's order of first appearance
    class_labels: list[str]  # the file's label of each class
    not_downloaded: int  # images of the file that failed to download (in the ledger with their reason)


def load_classification_set(folder: Path) -> ClassificationSet:
    """The downloaded images of a folder `download_classification_set` wrote, with their classes."""
    labels = pl.read_parquet(folder / LABELS_FILE)
    classes = labels.unique(LABEL, keep="first", maintain_order=True)
    index = {label: i for i, label in enumerate(classes[LABEL])}
    by_uid = dict(zip(labels[UID], labels[LABEL]))
    pairs, not_downloaded = downloaded_images(folder)
    if not pairs:
        raise ClassificationSetError(f"{folder}: no labelled image was downloaded (see {folder / LEDGER_FILE})")
    return ClassificationSet(
        uids=[uid for uid, _ in pairs],
        images=[image for _, image in pairs],
        classes=[index[by_uid[uid]] for uid, _ in pairs],
        class_names=classes[CLASS_NAME].to_list(),
        class_labels=classes[LABEL].to_list(),
        not_downloaded=not_downloaded,
    )


def stage_classification_set(
    store: DataStore, path: Path, settings: DownloadSettings, scratch: Path
) -> StagedEvaluationSet:
    """Download the file's images and publish the set under the file's content hash, then make it current; a
    file staged before is reused as it is."""
    return stage_held_out_set(
        store,
        path,
        scratch,
        layout.classification_prefix,
        layout.CURRENT_CLASSIFICATION_KEY,
        lambda folder: download_classification_set(path, folder, settings),
    )


class NoClassificationSetError(LookupError):
    """No labelled classification set has been downloaded under the data root yet."""


def current_classification_set(store: DataStore, cache: Path, scratch: Path) -> tuple[str, ClassificationSet]:
    """The current labelled set's version and its downloaded images (kept in the local `cache`)."""
    document = read_json(store, layout.CURRENT_CLASSIFICATION_KEY, scratch)
    if document is None:
        raise NoClassificationSetError(
            f"no labelled classification set yet under {store.uri}: materialize classification_set first"
        )
    folder = fetch_folder(store, layout.classification_prefix(document["version"]), cache)
    return document["version"], load_classification_set(folder)
