"""Column names, dtypes and status words of every table the platform writes: the one place they live.

Each table is a polars schema. Writers cast to it (`conform`), readers and DuckDB views rely on it, so a
column is renamed or retyped here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping

import polars as pl

UID = "uid"
URL = "url"
CAPTION = "caption"
SHARD = "shard"
ROW_INDEX = "row_index"
STATUS = "status"
ERROR = "error"
SKIP_REASON = "skip_reason"  # why a raw row is not sent to download; null for rows that are
LABEL = "label"  # a labelled classification set's class of an image (ca_platform.evaluation.classification_set)
CLASS_NAME = "name"  # its optional readable class name, what the prompts say; default: the label as text

# A validated pool shard: every input row, in input order, with the reason it will not be downloaded. Its parquet
# file carries the pool file's fingerprint under this metadata key, so the download knows what it was made from.
SOURCE_FINGERPRINT_METADATA = "ca_platform.source_fingerprint"
RAW_SHARD: Mapping[str, pl.DataType] = {
    UID: pl.String(),
    SHARD: pl.String(),
    ROW_INDEX: pl.Int64(),
    URL: pl.String(),
    CAPTION: pl.String(),
    SKIP_REASON: pl.String(),
}

# One row per distinct image of a labelled classification set, as staged beside its download ledger.
CLASSIFICATION_LABELS: Mapping[str, pl.DataType] = {
    UID: pl.String(),
    URL: pl.String(),
    LABEL: pl.String(),
    CLASS_NAME: pl.String(),
}

# One row per input row of a shard after download: the per-row ledger that proves nothing was lost.
DOWNLOAD_ROWS: Mapping[str, pl.DataType] = {
    UID: pl.String(),
    SHARD: pl.String(),
    ROW_INDEX: pl.Int64(),
    URL: pl.String(),
    CAPTION: pl.String(),
    STATUS: pl.String(),
    ERROR: pl.String(),
    "tar": pl.String(),
    "key": pl.String(),
    "width": pl.Int32(),
    "height": pl.Int32(),
    "original_width": pl.Int32(),
    "original_height": pl.Int32(),
    "bytes": pl.Int64(),
    "sha256": pl.String(),
}

# Where a pair's caption came from: the pool's own alt-text, or a captioner (ca_platform.captioning).
RAW_CAPTION = "raw"
SYNTHETIC_CAPTION = "synthetic"
MIXED_CAPTION = "mixed"  # a recap_mix_p pair: both captions travel, training draws one
CAPTIONER_VERSION = "captioner_version"
RANK = "rank"  # a synthetic caption's place among its image's candidates, 0 = the captioner's best
CAPTION_RANK = "caption_rank"  # the same in score and subset rows; null for the raw caption
# The json member's key under which a recap_mix_p sample carries its synthetic caption beside its raw one.
SYNTHETIC_CAPTION_META = "synthetic_caption"

# One row per candidate caption a captioner version wrote for a downloaded image.
SYNTHETIC_CAPTIONS: Mapping[str, pl.DataType] = {
    UID: pl.String(),
    SHARD: pl.String(),
    CAPTIONER_VERSION: pl.String(),
    CAPTION: pl.String(),
    RANK: pl.Int32(),
}

# One row per scored pair (a downloaded image with one of its captions) per scoring model version.
SCORES: Mapping[str, pl.DataType] = {
    UID: pl.String(),
    SHARD: pl.String(),
    "scorer": pl.String(),  # one of SCORERS
    "model_version": pl.String(),
    "score": pl.Float64(),
    "score_norm": pl.Float64(),  # (score - mean) / std with the model's own normalisation statistics
    "caption_source": pl.String(),  # RAW_CAPTION or SYNTHETIC_CAPTION
    CAPTIONER_VERSION: pl.String(),  # null for the raw caption
    CAPTION_RANK: pl.Int32(),  # null for the raw caption
}


# Scorers: each kind of scoring model, the name of its checkpoints, scores and `scores.scorer` values.
REWARD_MODEL = "reward_model"  # the Compress & Align reward model, trained on human caption rankings
CLIP_SCORE = "clip_score"  # CLIP cosine similarity (DataComp's baseline)
BLIP_SCORE = "blip_score"  # BLIP image-text matching probability
SCORERS = (REWARD_MODEL, CLIP_SCORE, BLIP_SCORE)
# The reward model's backbone setting that means "start from the current BLIP of the blip_score_model asset".
POOL_BLIP_BACKBONE = f"{BLIP_SCORE}_model"

# Subset variants: which pairs each way of compressing keeps, at the same keep fraction.
REWARD_TOPK = "reward_topk"  # the reward model's top k (the method)
CLIPSCORE_TOPK = "clipscore_topk"  # CLIP score's top k (DataComp's baseline)
RANDOM_TOPK = "random_topk"  # a seeded uniform sample of k
# With recaptioning (ca_platform.captioning), variants that change captions rather than only drop pairs:
RECAP_ALL = "recap_all"  # every image with its best synthetic caption (by CLIP score), nothing dropped
RAW_TOPK_PLUS_RECAP = "raw_topk_plus_recap"  # Nguyen et al.: CLIP top k keep the raw caption, the rest a
# synthetic one, itself kept only above the same CLIP-score threshold
RECAP_MIX = "recap_mix_p"  # Recap-DataComp: every image with both captions, training draws the synthetic one
# with probability p
REWARD_BEST_CAPTION = "reward_best_caption"  # ours: per image the caption the reward model prefers among the raw
# one and the candidates, then the top k by that reward
RECAPTION_VARIANTS = (RECAP_ALL, RAW_TOPK_PLUS_RECAP, RECAP_MIX, REWARD_BEST_CAPTION)
FILTER_VARIANTS = (REWARD_TOPK, CLIPSCORE_TOPK, RANDOM_TOPK)  # keep or drop pairs, captions as they are
SUBSET_VARIANTS = (*FILTER_VARIANTS, *RECAPTION_VARIANTS)
FULL = "full"  # every downloaded pair: what compression is measured against
TRAINING_VARIANTS = (FULL, *SUBSET_VARIANTS)
# Caption variants that keep every image (they change captions, not the count): like `full`, they have no keep
# fraction, so the compression curve has one point of each, not one per k.
KEEP_EVERY_IMAGE = (RECAP_ALL, RECAP_MIX)
UNCUT_VARIANTS = (FULL, *KEEP_EVERY_IMAGE)
# The scorer whose ranking each scored variant keeps the top of (random_topk ranks by a seeded key).
VARIANT_SCORERS: Mapping[str, str] = {
    REWARD_TOPK: REWARD_MODEL,
    CLIPSCORE_TOPK: CLIP_SCORE,
    RECAP_ALL: CLIP_SCORE,
    RAW_TOPK_PLUS_RECAP: CLIP_SCORE,
    RECAP_MIX: CLIP_SCORE,
    REWARD_BEST_CAPTION: REWARD_MODEL,
}

# One row per downloaded pair per subset variant: kept or dropped, with the score that decided it and the
# caption the kept pair carries.
SUBSETS: Mapping[str, pl.DataType] = {
    UID: pl.String(),
    SHARD: pl.String(),
    "variant": pl.String(),  # one of SUBSET_VARIANTS
    "model_version": pl.String(),  # the scorer's version; for random_topk "seed-<n>"
    "keep_fraction": pl.Float64(),
    "score": pl.Float64(),  # the reward / CLIP score, or the uniform random key in [0, 1)
    "kept": pl.Boolean(),
    "caption_source": pl.String(),  # RAW_CAPTION, SYNTHETIC_CAPTION or MIXED_CAPTION
    CAPTIONER_VERSION: pl.String(),  # null when the raw caption is used
    CAPTION_RANK: pl.Int32(),  # the synthetic candidate used; null for the raw caption
    "drop_reason": pl.String(),  # why dedup removed the pair before the cut (DEDUP_REMOVALS' reason), else null
}


# Deduplication (ca_platform.dedup): per downloaded image, what duplicates and evaluation images are found by.
PIXEL_HASH = "pixel_hash"  # sha256 (hex) of the decoded RGB pixels and their size: re-encodes of them match
PHASH = "phash"  # 64-bit DCT perceptual hash (signed int64 bits): robust to resizing and recompression
EMBEDDING = "embedding"  # the CLIP-score model's L2-normalised image embedding, for semantic duplicates
EMBEDDING_MODEL_VERSION = "embedding_model_version"
IMAGE_FINGERPRINTS: Mapping[str, pl.DataType] = {
    UID: pl.String(),
    SHARD: pl.String(),
    PIXEL_HASH: pl.String(),
    PHASH: pl.Int64(),
    EMBEDDING: pl.List(pl.Float32()),
    EMBEDDING_MODEL_VERSION: pl.String(),  # null when fingerprinted without embeddings
}

# How a group member relates to its group's representative, and the distance in that kind's unit.
EXACT_DUPLICATE = "exact"  # same decoded pixels (distance 0)
NEAR_DUPLICATE = "near"  # pHash within the Hamming threshold (distance: differing bits)
SEMANTIC_DUPLICATE = "semantic"  # embeddings within the cosine threshold (distance: 1 - cosine)
DUPLICATE_KINDS = (EXACT_DUPLICATE, NEAR_DUPLICATE, SEMANTIC_DUPLICATE)
# One row per image in a duplicate group of two or more (the representative included, with kind null).
DUPLICATES: Mapping[str, pl.DataType] = {
    UID: pl.String(),
    SHARD: pl.String(),
    "group_id": pl.String(),  # the representative's shard and uid: stable while the group keeps it
    "kind": pl.String(),  # one of DUPLICATE_KINDS; null for the representative
    "representative_uid": pl.String(),
    "distance": pl.Float64(),  # to the representative, in the kind's unit; 0 for the representative
}

# The reasons dedup removes a downloaded pair before any cut: `<reason>:<uid it duplicates or matches>`.
DUPLICATE_OF = "duplicate_of"
EVAL_CONTAMINATION = "eval_contamination"
# One row per pool pair dedup or decontamination removes, with the reason.
DEDUP_REMOVALS: Mapping[str, pl.DataType] = {
    UID: pl.String(),
    SHARD: pl.String(),
    "reason": pl.String(),  # f"{DUPLICATE_OF}:<representative uid>" or f"{EVAL_CONTAMINATION}:<eval uid>"
}


class Status:
    """Outcome words of a pool row; anything but SUCCESS carries an `error` saying why."""

    SUCCESS = "success"
    SKIPPED = "skipped"  # never sent: the input row itself is unusable (no URL, empty caption)
    REFUSED = "refused"  # the download guard refused the URL: scheme or address not allowed
    TOO_LARGE = "too_large"  # body over the byte cap or image over the pixel cap
    OPTED_OUT = "opted_out"  # the server's X-Robots-Tag forbids AI use
    TIMEOUT = "timeout"  # the URL's total deadline (connect + all reads) ran out: a slow host cannot hold a shard
    FAILED_TO_DOWNLOAD = "failed_to_download"  # HTTP error, per-read timeout, connection failure
    FAILED_TO_DECODE = "failed_to_decode"  # the body is not a decodable image

    ALL = (SUCCESS, SKIPPED, REFUSED, TOO_LARGE, OPTED_OUT, TIMEOUT, FAILED_TO_DOWNLOAD, FAILED_TO_DECODE)


DUCKDB_TYPES: Mapping[type[pl.DataType], str] = {
    pl.String: "VARCHAR",
    pl.Int64: "BIGINT",
    pl.Int32: "INTEGER",
    pl.Float64: "DOUBLE",
    pl.Float32: "FLOAT",
    pl.Boolean: "BOOLEAN",
}


def conform(frame: pl.DataFrame, schema: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """Select and cast `frame` to exactly `schema`'s columns, in order; a missing column is an error."""
    missing = [name for name in schema if name not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks columns {missing} (has {frame.columns})")
    return frame.select([pl.col(name).cast(dtype) for name, dtype in schema.items()])


def empty(schema: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """A zero-row frame with `schema`."""
    return pl.DataFrame(schema=dict(schema))


def duckdb_columns(schema: Mapping[str, pl.DataType]) -> str:
    """`CAST(NULL AS T) AS col, ...` for a typed empty DuckDB relation with `schema`."""
    return ", ".join(f"CAST(NULL AS {DUCKDB_TYPES[type(dtype)]}) AS {name}" for name, dtype in schema.items())
