"""Downloading one pool shard with img2dataset into webdataset tars plus a per-row ledger.

img2dataset's own `download()` spawns worker processes, where our guarded urllib opener would not be
installed; the platform's unit of parallelism is the shard (one Dagster step each), so here a shard is
fed straight to img2dataset's `Downloader` in this process, with its threads, behind the guard. Its
per-row parquet is then reconciled with the input so every input row appears exactly once.

img2dataset (with pandas, ray, wandb and albumentations behind it) is imported when a shard is downloaded, not
with the module: every Dagster process loads the definitions, few download.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa

from ca_platform import layout, schemas
from ca_platform.audit import StagedOutput, audit_and_publish
from ca_platform.ingest import download_guard
from ca_platform.ingest.download_guard import GuardPolicy, guarded_urlopen
from ca_platform.ingest.quality import CheckOutcome, QualityThresholds, check_download, check_not_worse
from ca_platform.ingest.raw_shard import read_raw_shard
from ca_platform.ingest.webdataset_io import tar_members
from ca_platform.progress import Task
from ca_platform.schemas import CAPTION, ERROR, ROW_INDEX, SHARD, SKIP_REASON, STATUS, UID, URL, Status
from ca_platform.storage import DataStore, fetch_to_local, write_json

# img2dataset's defaults: the opt-out directives it honours stay on.
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
_OPT_OUT_MESSAGE = "disallowed by X-Robots-Tag"
_URLOPEN_WRAPPER = "<urlopen error "


@dataclass(frozen=True)
class DownloadSettings:
    thread_count: int = 32
    timeout_s: float = 10.0
    retries: int = 0
    image_size: int = 256
    resize_mode: str = "keep_ratio"  # img2dataset's: no, keep_ratio, keep_ratio_largest, center_crop, border
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    encode_quality: int = 95
    samples_per_tar: int = 10_000
    user_agent_token: str | None = "ca-platform"
    opt_out_directives: tuple[str, ...] = OPT_OUT_DIRECTIVES
    policy: GuardPolicy = field(default_factory=GuardPolicy)


@dataclass(frozen=True)
class ShardDownload:
    rows: pl.DataFrame  # schemas.DOWNLOAD_ROWS, one row per input row
    tars: dict[str, Path]  # tar file name -> local path


def unwrap_error(error: str | None) -> str | None:
    """The reason itself, without the `<urlopen error ...>` wrapper urllib puts around connect-time errors."""
    if error and error.startswith(_URLOPEN_WRAPPER) and error.endswith(">"):
        return error[len(_URLOPEN_WRAPPER) : -1]
    return error


def classify(img2dataset_status: str | None, error: str | None) -> str:
    """Our status word for an img2dataset outcome (see schemas.Status)."""
    if img2dataset_status == "success":
        return Status.SUCCESS
    message = unwrap_error(error) or ""
    if message.startswith(download_guard.REFUSED_PREFIX):
        return Status.REFUSED
    if message.startswith(download_guard.TOO_LARGE_PREFIX) or message == "image area too large":
        return Status.TOO_LARGE
    if message.startswith(download_guard.DEADLINE_PREFIX):
        return Status.TIMEOUT
    if _OPT_OUT_MESSAGE in message:
        return Status.OPTED_OUT
    if img2dataset_status == "failed_to_resize":
        return Status.FAILED_TO_DECODE
    return Status.FAILED_TO_DOWNLOAD


def _tar_member_sizes(tar_path: Path, extension: str) -> dict[str, int]:
    """Sample key -> size of its `.extension` member, from the tar's headers alone (a full shard's
    `tarfile.getmembers` would cost a tenth of the download itself)."""
    suffix = f".{extension}"
    return {m.name[: -len(suffix)]: m.size for m in tar_members(tar_path) if m.name.endswith(suffix)}


def _run_downloader(
    chunk: pl.DataFrame, chunk_id: int, work_dir: Path, settings: DownloadSettings, oom_shard_count: int
) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations, which phones home
    # download_guard, imported with this module, has lowered OpenCV's pixel cap before img2dataset imports cv2
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    feather = work_dir / f"_input_{chunk_id:05d}.feather"
    table = pa.table({URL: chunk[URL].to_list(), CAPTION: chunk[CAPTION].to_list(), UID: chunk[UID].to_list()})
    with pa.OSFile(str(feather), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    resizer = Resizer(
        image_size=settings.image_size,
        resize_mode=settings.resize_mode,
        resize_only_if_bigger=settings.resize_only_if_bigger,
        encode_format=settings.encode_format,
        encode_quality=settings.encode_quality,
        max_image_area=settings.policy.max_pixels,
    )
    downloader = Downloader(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=resizer,
        thread_count=settings.thread_count,
        save_caption=True,
        extract_exif=False,
        output_folder=str(work_dir),
        column_list=[URL, CAPTION, UID],
        timeout=settings.timeout_s,
        number_sample_per_shard=max(settings.samples_per_tar, 2),
        oom_shard_count=oom_shard_count,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format=settings.encode_format,
        retries=settings.retries,
        user_agent_token=settings.user_agent_token,
        disallowed_header_directives=list(settings.opt_out_directives) or None,
    )
    ok, _ = downloader((chunk_id, str(feather)))
    feather.unlink(missing_ok=True)  # img2dataset removes its input itself
    if not ok:
        raise RuntimeError(f"img2dataset failed on chunk {chunk_id} of {work_dir} (see the log above)")


def download_shard(
    raw: pl.DataFrame, work_dir: Path, settings: DownloadSettings, tar_prefix: str = ""
) -> ShardDownload:
    """Download the usable rows of a RAW_SHARD frame into `work_dir`; return the ledger and the tars.

    `tar_prefix` is prepended to tar names (a run token), so a re-run never overwrites files that a
    published ledger still points at.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    shard = raw[SHARD][0] if raw.height else ""
    to_fetch = raw.filter(pl.col(SKIP_REASON).is_null())
    chunks = max(1, math.ceil(to_fetch.height / settings.samples_per_tar))
    oom_shard_count = max(5, len(str(chunks)))
    results = []
    tars: dict[str, Path] = {}
    with guarded_urlopen(settings.policy), Task(f"{shard}: downloading", to_fetch.height, "row") as task:
        for chunk_id in range(chunks if to_fetch.height else 0):
            chunk = to_fetch.slice(chunk_id * settings.samples_per_tar, settings.samples_per_tar)
            _run_downloader(chunk, chunk_id, work_dir, settings, oom_shard_count)
            task.advance(chunk.height)
            stem = f"{chunk_id:0{oom_shard_count}d}"
            tar_name = f"{tar_prefix}{stem}.tar"
            tar_path = work_dir / f"{stem}.tar"
            if tar_prefix:
                tar_path = tar_path.rename(work_dir / tar_name)
            tars[tar_name] = tar_path
            sizes = _tar_member_sizes(tar_path, settings.encode_format)
            part = pl.read_parquet(work_dir / f"{stem}.parquet")
            results.append(
                part.with_columns(
                    pl.lit(tar_name).alias("tar"),
                    pl.col("key").replace_strict(sizes, default=None, return_dtype=pl.Int64).alias("bytes"),
                )
            )
    return ShardDownload(_reconcile(raw, results, shard), tars)


def _reconcile(raw: pl.DataFrame, results: list[pl.DataFrame], shard: str) -> pl.DataFrame:
    """Join img2dataset's rows back to the input: each input row exactly once, with a status and a reason."""
    result_columns = ["tar", "key", "width", "height", "original_width", "original_height", "bytes", "sha256"]
    if results:
        fetched = pl.concat(results, how="diagonal_relaxed")
        duplicated = fetched.filter(pl.col(UID).is_duplicated())
        if duplicated.height:
            raise RuntimeError(f"shard {shard}: img2dataset reported uids twice: {duplicated[UID].head(5).to_list()}")
        fetched = fetched.select(
            UID,
            pl.struct("status", "error_message")
            .map_elements(lambda r: classify(r["status"], r["error_message"]), return_dtype=pl.String)
            .alias(STATUS),
            pl.col("error_message").map_elements(unwrap_error, return_dtype=pl.String).alias(ERROR),
            *result_columns,
        )
        # img2dataset gives failed rows a key too, but only successes have an image in the tar
        fetched = fetched.with_columns(
            [pl.when(pl.col(STATUS) == Status.SUCCESS).then(pl.col(c)).alias(c) for c in ("tar", "key")]
        )
    else:
        fetched = pl.DataFrame(schema={UID: pl.String, STATUS: pl.String, ERROR: pl.String})
    ledger = raw.join(fetched, on=UID, how="left", validate="1:1", maintain_order="left")
    ledger = ledger.with_columns(
        pl.when(pl.col(SKIP_REASON).is_not_null())
        .then(pl.lit(Status.SKIPPED))
        .when(pl.col(STATUS).is_null())
        .then(pl.lit(Status.FAILED_TO_DOWNLOAD))
        .otherwise(pl.col(STATUS))
        .alias(STATUS),
        pl.when(pl.col(SKIP_REASON).is_not_null())
        .then(pl.col(SKIP_REASON))
        .when(pl.col(STATUS).is_null())
        .then(pl.lit("img2dataset returned no result for this row"))
        .otherwise(pl.col(ERROR))
        .alias(ERROR),
    )
    for column in result_columns:
        if column not in ledger.columns:
            ledger = ledger.with_columns(pl.lit(None).alias(column))
    ledger = schemas.conform(ledger.sort(ROW_INDEX), schemas.DOWNLOAD_ROWS)
    if ledger.height != raw.height:
        raise RuntimeError(f"shard {shard}: {raw.height} input rows but {ledger.height} ledger rows")
    return ledger


@dataclass(frozen=True)
class PublishedDownload:
    raw: pl.DataFrame  # schemas.RAW_SHARD: the validated rows that were downloaded
    ledger: pl.DataFrame  # schemas.DOWNLOAD_ROWS, one row per input row
    tar_keys: list[str]  # the published tars, under the data root
    outcomes: list[CheckOutcome]  # the audit that let it be published


def download_audit_publish(
    store: DataStore,
    shard: str,
    settings: DownloadSettings,
    thresholds: QualityThresholds,
    run_id: str,
    scratch: Path,
) -> PublishedDownload:
    """Download a shard's validated rows aside, audit them, and publish tars and ledger only if they pass.

    The audit is the download checks plus a comparison with the published download, whose success rate may
    not fall by more than `thresholds.max_success_rate_drop` (an image host down for the day must not
    replace good images with failures). A failed audit raises AuditFailed and keeps the attempt under
    rejected/. Tars carry the run's token and the ledger is published last, so readers see either the
    previous complete download or this one; then the spine's done marker records the pool file's
    fingerprint, and the previous download's tars are removed.
    """
    raw, source_fingerprint = read_raw_shard(store, shard, scratch / "in")
    result = download_shard(raw, scratch / "out", settings, tar_prefix=f"{run_id[:8]}-")
    ledger_path = scratch / layout.ROWS_FILE
    result.rows.write_parquet(ledger_path)
    previous = {o.key for o in store.list(layout.download_prefix(shard) + "/")}
    published = (
        read_download_ledger(store, shard, scratch / "published")
        if layout.download_rows_key(shard) in previous
        else None
    )
    outcomes = [
        *check_download(result.rows, raw[UID], thresholds),
        check_not_worse(result.rows, published, thresholds),
    ]
    tars = {layout.download_tar_key(shard, name): path for name, path in result.tars.items()}
    staged = StagedOutput(layout.DOWNLOAD_STEP, shard, run_id, tars, layout.download_rows_key(shard), ledger_path)
    audit_and_publish(store, staged, outcomes)
    mark_spine_done(store, shard, source_fingerprint, result.rows, run_id, scratch)
    for stale in previous - set(tars) - {layout.download_rows_key(shard)}:
        store.delete(stale)
    return PublishedDownload(raw, result.rows, sorted(tars), outcomes)


def source_digest(fingerprint: str) -> str:
    """A pool file fingerprint (mtime and size, or an ETag) as a short name safe in any key."""
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


def mark_spine_done(
    store: DataStore, shard: str, source_fingerprint: str, ledger: pl.DataFrame, run_id: str, scratch: Path
) -> None:
    """Record that the shard's spine is published from this version of its pool file, replacing older marks."""
    key = layout.spine_done_key(shard, source_digest(source_fingerprint))
    older = [o.key for o in store.list(layout.spine_done_prefix(shard) + "/") if o.key != key]
    summary = {
        "shard": shard,
        "source_fingerprint": source_fingerprint,
        "run_id": run_id,
        "rows": ledger.height,
        "downloaded": downloaded_rows(ledger).height,
        "published_at": time.time(),
    }
    write_json(store, key, summary, scratch)
    for stale in older:
        store.delete(stale)


def done_shards(store: DataStore) -> dict[str, set[str]]:
    """Shard -> digests of the pool file versions its published spine was made from (one listing)."""
    done: dict[str, set[str]] = {}
    for obj in store.list(f"{layout.DONE_DIR}/"):
        shard, _, name = obj.key[len(layout.DONE_DIR) + 1 :].rpartition("/")
        done.setdefault(shard, set()).add(name.removesuffix(".json"))
    return done


def is_done(done: dict[str, set[str]], shard: str, fingerprint: str) -> bool:
    """Whether `shard`'s spine is published from the pool file version with `fingerprint` (see done_shards)."""
    return source_digest(fingerprint) in done.get(shard, set())


def downloaded_rows(ledger: pl.DataFrame) -> pl.DataFrame:
    """The ledger's successfully downloaded pairs: those with an image in the shard's tars."""
    return ledger.filter(pl.col(STATUS) == Status.SUCCESS)


def failure_counts(ledger: pl.DataFrame) -> dict[str, int]:
    """Rows per status word."""
    return dict(Counter(ledger[STATUS].to_list()))


def downloaded_shards(store: DataStore) -> list[str]:
    """The shards whose download ledger is published under a data root."""
    suffix = f"/{layout.ROWS_FILE}"
    keys = [o.key for o in store.list(f"{layout.DOWNLOADS_DIR}/") if o.key.endswith(suffix)]
    return sorted(key[len(layout.DOWNLOADS_DIR) + 1 : -len(suffix)] for key in keys)


def read_download_ledger(store: DataStore, shard: str, scratch: Path) -> pl.DataFrame:
    """A shard's published download ledger (schemas.DOWNLOAD_ROWS): one row per input row."""
    return pl.read_parquet(fetch_to_local(store, layout.download_rows_key(shard), scratch))


def fetch_shard_download(store: DataStore, shard: str, scratch: Path) -> tuple[pl.DataFrame, list[Path]]:
    """A shard's ledger and local paths of the tars holding its successfully downloaded images."""
    ledger = read_download_ledger(store, shard, scratch)
    return ledger, fetch_downloaded_tars(store, shard, ledger, scratch)


def fetch_downloaded_tars(store: DataStore, shard: str, ledger: pl.DataFrame, scratch: Path) -> list[Path]:
    """Local paths of the tars of a shard's ledger that hold its successfully downloaded images."""
    names = sorted(downloaded_rows(ledger)["tar"].unique().to_list())
    return [fetch_to_local(store, layout.download_tar_key(shard, name), scratch) for name in names]
