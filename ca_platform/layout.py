"""Where each output lives under the data root: the one place that knows the keys."""

from __future__ import annotations

import math
from collections.abc import Iterable

from ca_platform.schemas import TRAINING_VARIANTS, UNCUT_VARIANTS

RAW_DIR = "raw"
DOWNLOADS_DIR = "downloads"
ROWS_FILE = "rows.parquet"
ANALYTICS_DB = "analytics.duckdb"
REPORTS_DIR = "reports"
# The pool-wide reports, each written by one asset and read by the CLI's summary.
PREFERENCE_ACCURACY_REPORT_KEY = f"{REPORTS_DIR}/preference_accuracy.json"  # preference_accuracy
SCORE_THRESHOLD_REPORT_KEY = f"{REPORTS_DIR}/score_threshold.json"  # score_threshold: each variant's cut
SCORE_THRESHOLD_PLOT_KEY = f"{REPORTS_DIR}/score_threshold.png"
CURATION_REPORT_KEY = f"{REPORTS_DIR}/curation_report.json"  # curation_report: the figures per variant
CURATION_TABLE_KEY = f"{REPORTS_DIR}/curation_report.md"
CURATION_PLOT_KEY = f"{REPORTS_DIR}/curation_report.png"
CURATION_CURVE_PLOT_KEY = f"{REPORTS_DIR}/curation_curve.png"  # the figures against the keep fraction
CAPTION_ANALYTICS_KEY = f"{REPORTS_DIR}/caption_analytics.json"  # caption_analytics: per caption source
CAPTION_ANALYTICS_PLOT_KEY = f"{REPORTS_DIR}/caption_analytics.png"
DEMO_TRUTH_REPORT_KEY = f"{REPORTS_DIR}/demo_truth.json"  # the demo only: scorers and cuts against its truth files


def raw_shard_key(shard: str) -> str:
    """The validated copy of a pool shard."""
    return f"{RAW_DIR}/{shard}.parquet"


def download_prefix(shard: str) -> str:
    """Folder holding a shard's webdataset tars and its per-row ledger."""
    return f"{DOWNLOADS_DIR}/{shard}"


def download_rows_key(shard: str) -> str:
    """A shard's per-row download ledger; written last, it marks the shard's download complete."""
    return f"{download_prefix(shard)}/{ROWS_FILE}"


def download_tar_key(shard: str, tar_name: str) -> str:
    return f"{download_prefix(shard)}/{tar_name}"


DONE_DIR = "done"


def spine_done_prefix(shard: str) -> str:
    """Markers of a shard's completed spine: one object named by the digest of the pool file it was made from,
    so a single listing of DONE_DIR tells which shards are done with which version of their file."""
    return f"{DONE_DIR}/{shard}"


def spine_done_key(shard: str, source_digest: str) -> str:
    return f"{spine_done_prefix(shard)}/{source_digest}.json"


# The per-shard steps, by the names their staging folders, locks' owners, rejected/ and quarantine/ entries and
# fault points carry.
RAW_STEP = "raw"
DOWNLOAD_STEP = "downloads"
SUBSET_STEP = "subsets"


CAPTION_STEP = "captions"


def scores_step(scorer: str) -> str:
    return f"scores-{scorer}"


def synthetic_scores_step(scorer: str) -> str:
    """Scoring a shard's synthetic captions with one scorer."""
    return f"synthetic-scores-{scorer}"


QUARANTINE_DIR = "quarantine"


def quarantine_key(shard: str, step: str) -> str:
    """Why a shard's step last failed (see ca_platform.quarantine); removed when the step next succeeds."""
    return f"{QUARANTINE_DIR}/{shard}/{step}.json"


REJECTED_DIR = "rejected"


def rejected_prefix(step: str, shard: str, attempt: str) -> str:
    """An attempt whose audit failed, kept for inspection with the reasons (audit.json); safe to delete."""
    return f"{REJECTED_DIR}/{step}/{shard}/{attempt}"


LOCKS_DIR = "locks"


def lock_key(name: str) -> str:
    """A lock document (see ca_platform.locks); present only while a run holds it."""
    return f"{LOCKS_DIR}/{name}.json"


PREFERENCES_DIR = "preferences"
PREFERENCES_FILE = "preferences.jsonl"
MODELS_DIR = "models"
SCORES_DIR = "scores"
CURRENT_FILE = "current.json"


CURRENT_PREFERENCES_KEY = f"{PREFERENCES_DIR}/{CURRENT_FILE}"  # which preference set is current


def preferences_prefix(version: str) -> str:
    """A validated preference set with its images, named by content hash."""
    return f"{PREFERENCES_DIR}/{version}"


def model_root(kind: str) -> str:
    """Checkpoints of one kind of model (a scorer of schemas.SCORERS, or a `trained_model_kind`), one folder per
    version."""
    return f"{MODELS_DIR}/{kind}"


def model_prefix(kind: str, version: str) -> str:
    return f"{model_root(kind)}/{version}"


def current_model_key(kind: str) -> str:
    """Which version of a kind of model is current, and what it was trained from."""
    return f"{model_root(kind)}/{CURRENT_FILE}"


def registered_model_key(kind: str) -> str:
    """A checkpoint registered from outside and pinned as the kind's model until unpinned."""
    return f"{model_root(kind)}/registered.json"


def scores_key(scorer: str, version: str, shard: str) -> str:
    """One shard's scores by one model version: versions live side by side."""
    return f"{SCORES_DIR}/{scorer}/{version}/{shard}.parquet"


SYNTHETIC_DIR = "synthetic"


def synthetic_scores_key(scorer: str, version: str, captioner_version: str, shard: str) -> str:
    """One shard's synthetic captions of one captioner version, scored by one model version."""
    return f"{SCORES_DIR}/{scorer}/{version}/{SYNTHETIC_DIR}/{captioner_version}/{shard}.parquet"


CAPTIONS_DIR = "captions"
CAPTIONER = "captioner"  # the model kind (models/captioner/) that writes synthetic captions


def synthetic_captions_key(captioner_version: str, shard: str) -> str:
    """One shard's candidate captions by one captioner version (schemas.SYNTHETIC_CAPTIONS)."""
    return f"{CAPTIONS_DIR}/{captioner_version}/{shard}.parquet"


FINGERPRINTS_DIR = "fingerprints"
FINGERPRINT_STEP = "fingerprints"


def fingerprints_key(recipe: str, embedding_version: str, shard: str) -> str:
    """One shard's image fingerprints (schemas.IMAGE_FINGERPRINTS) by one hash recipe, embedded by one
    CLIP-score model version: a change of either makes new files rather than mixing old and new hashes."""
    return f"{FINGERPRINTS_DIR}/{recipe}/{embedding_version}/{shard}.parquet"


DEDUP_DIR = "dedup"
# The current deduplication of the pool, replaced whole by each duplicate_groups materialization.
DUPLICATES_KEY = f"{DEDUP_DIR}/duplicates.parquet"  # schemas.DUPLICATES
DEDUP_REMOVALS_KEY = f"{DEDUP_DIR}/removals.parquet"  # schemas.DEDUP_REMOVALS: what every cut leaves out
DEDUP_REPORT_KEY = f"{REPORTS_DIR}/duplicate_groups.json"  # counts, settings and the versions it used
DEDUP_PLOT_KEY = f"{REPORTS_DIR}/duplicate_groups.png"


# A training set: what one CLIP and BLIP are trained on, and one Dagster partition of the models and their
# evaluations. `<variant>@<k>` for a variant cut at keep fraction k (`reward_topk@0.3`), the bare variant for
# those that keep every pair (`full`, `recap_all`, `recap_mix_p`): one point of the compression curve each. The
# key also names the subset's folder, the models' kinds and the evaluation reports.
KEEP_FRACTION_SEPARATOR = "@"


def training_set_key(variant: str, keep_fraction: float | None) -> str:
    """The key of `variant` cut at `keep_fraction` (ignored for the variants that keep every pair); k is written
    as the shortest decimal that reads back as the same float (0.3 -> "0.3")."""
    if variant not in TRAINING_VARIANTS:
        raise ValueError(f"unknown training variant {variant!r}; expected one of {TRAINING_VARIANTS}")
    if variant in UNCUT_VARIANTS:
        return variant
    if keep_fraction is None:
        raise ValueError(f"{variant} is cut at a keep fraction k: its training sets are {variant}@<k>")
    return f"{variant}{KEEP_FRACTION_SEPARATOR}{float(keep_fraction)!r}"


def parse_training_set_key(key: str) -> tuple[str, float | None]:
    """(variant, keep fraction) of a training-set key; the fraction is None for the variants that keep every
    pair. A key that `training_set_key` would not write is an error naming it."""
    variant, separator, fraction = key.partition(KEEP_FRACTION_SEPARATOR)
    keep_fraction = None
    if separator:
        try:
            keep_fraction = float(fraction)
        except ValueError:
            keep_fraction = math.nan
    try:
        canonical = training_set_key(variant, keep_fraction)
    except ValueError as error:
        raise ValueError(f"training set {key!r}: {error}") from error
    if canonical != key or (keep_fraction is not None and not 0.0 < keep_fraction <= 1.0):
        raise ValueError(
            f"training set {key!r} is not a key: expected `full`, `recap_all`, `recap_mix_p` or "
            f"`<variant>{KEEP_FRACTION_SEPARATOR}<k>` with k in (0, 1], e.g. reward_topk@0.3"
        )
    return variant, keep_fraction


def in_training_set_order(keys: Iterable[str]) -> list[str]:
    """Training-set keys in the report's order: by variant as TRAINING_VARIANTS lists them (full first, the
    method next), then by k. Published JSON is written with sorted keys, so readers order keys with this."""

    def order(key: str) -> tuple[int, float]:
        variant, keep_fraction = parse_training_set_key(key)
        return TRAINING_VARIANTS.index(variant), keep_fraction or 0.0

    return sorted(keys, key=order)


SUBSETS_DIR = "subsets"
SUBSET_MEMBERSHIP_FILE = "membership.parquet"
SUBSET_UIDS_FILE = "uids.txt"
SUBSET_MANIFEST_FILE = "manifest.json"


def subset_prefix(training_set: str, shard: str) -> str:
    """One shard's part of a compressed subset (a `training_set_key`): its tar, uid list, manifest and membership
    table."""
    return f"{SUBSETS_DIR}/{training_set}/{shard}"


def subset_tar_name(shard: str, token: str = "") -> str:
    """The subset's tar; `token` (the run's) keeps a new tar from overwriting one a published manifest names."""
    return f"{shard}.{token}.tar" if token else f"{shard}.tar"


def subset_manifest_key(training_set: str, shard: str) -> str:
    """Counts and the tar's name; published last, it marks the shard's subset complete."""
    return f"{subset_prefix(training_set, shard)}/{SUBSET_MANIFEST_FILE}"


def subset_membership_key(training_set: str, shard: str) -> str:
    """Every downloaded pair of the shard, kept or not (what the DuckDB view `subsets` reads)."""
    return f"{subset_prefix(training_set, shard)}/{SUBSET_MEMBERSHIP_FILE}"


EVALUATION_DIR = "evaluation"
CURRENT_EVALUATION_KEY = f"{EVALUATION_DIR}/{CURRENT_FILE}"  # which evaluation set is current


def evaluation_prefix(version: str) -> str:
    """A downloaded evaluation set (tars, ledger, references), named by the content hash of its file."""
    return f"{EVALUATION_DIR}/{version}"


CLASSIFICATION_DIR = "classification"
CURRENT_CLASSIFICATION_KEY = f"{CLASSIFICATION_DIR}/{CURRENT_FILE}"  # which labelled classification set is current


def classification_prefix(version: str) -> str:
    """A downloaded labelled classification set (tars, ledger, labels), named by the content hash of its file."""
    return f"{CLASSIFICATION_DIR}/{version}"


# The models trained on each training-set variant (and the assets that train them).
CLIP_CHECKPOINT = "clip_checkpoint"
BLIP_CHECKPOINT = "blip_checkpoint"


def trained_model_kind(model: str, training_set: str, seed: int) -> str:
    """Checkpoints of one model (CLIP_CHECKPOINT, BLIP_CHECKPOINT) trained on one training set (a
    `training_set_key`) with one training seed (a report over several seeds trains one model per seed)."""
    return f"{model}/{training_set}/seed-{seed}"


# Each variant's evaluations: retrieval_eval and classification_eval (of its CLIP), captioning_eval (of its BLIP).
RETRIEVAL_REPORT = "retrieval"
CAPTIONING_REPORT = "captioning"
CLASSIFICATION_REPORT = "classification"


def variant_report_key(report: str, training_set: str) -> str:
    """One training set's evaluation report (RETRIEVAL_REPORT, CAPTIONING_REPORT or CLASSIFICATION_REPORT), e.g.
    reports/retrieval/reward_topk@0.3.json."""
    return f"{REPORTS_DIR}/{report}/{training_set}.json"


# DuckDB view name -> glob of the parquet files it reads, relative to the data root (or its local mirror).
VIEW_GLOBS: dict[str, str] = {
    "downloads": f"{DOWNLOADS_DIR}/*/{ROWS_FILE}",
    "scores": f"{SCORES_DIR}/*/*/*.parquet",  # the pool's own pairs (raw captions)
    "subsets": f"{SUBSETS_DIR}/*/*/{SUBSET_MEMBERSHIP_FILE}",
    "synthetic_captions": f"{CAPTIONS_DIR}/*/*.parquet",
    "synthetic_scores": f"{SCORES_DIR}/*/*/{SYNTHETIC_DIR}/*/*.parquet",
    "duplicates": DUPLICATES_KEY,
    "dedup_removals": DEDUP_REMOVALS_KEY,
}
