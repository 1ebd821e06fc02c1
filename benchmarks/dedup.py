"""Deduplication: is per-shard fingerprinting as fast as bare hashing, and how does grouping scale?

Three parts, each in a fresh process so its peak memory is its own:
1. fingerprints: on tars of photo-like JPEGs written as downloads write them (`jpg`, `txt`, `json` with the
   uid), B = bare hashing (read, decode, sha256 of the pixels) against F = `fingerprint_tars` (the same plus the
   pixel hash's size header, the pHash and the frame), both images/s over --repeats rounds, alternated tar by
   tar. Goal: F / B >= 0.85. The tiny CLIP's image embedding rate through `fingerprint_tars` is printed for
   information.
2. exact + near grouping: `deduplicate` (semantic off) on --rows synthetic fingerprints, random 64-bit pHashes
   and sha256 pixel hashes with 1% planted exact copies and 1% planted near copies (1 to near_max_bits bits
   flipped), plus a score per image: seconds, peak RSS, and the planted links recovered (all, as the search is
   exact).
3. semantic grouping: `duplicate_groups` (exact + near + semantic) on --semantic-rows synthetic fingerprints
   with clustered unit embeddings of --dimensions and 1% planted near-identical copies (cosine ~0.999):
   seconds, peak RSS, and the planted pairs recovered (pairs split by a cluster boundary are missed by design).

    .venv/bin/python benchmarks/dedup.py [--images 3000] [--image-size 256] [--repeats 5] [--rows 10000000]
        [--semantic-rows 1000000] [--dimensions 64] [--parts fingerprints,grouping,semantic]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import webdataset as wds
from PIL import Image, ImageDraw

from ca_platform import schemas
from ca_platform.dedup.fingerprints import clip_image_embedder, fingerprint_tars
from ca_platform.dedup.groups import DedupSettings, deduplicate, duplicate_groups
from ca_platform.ingest.webdataset_io import decode_sample, iter_samples

PLANTED_FRACTION = 0.01
SHARD_ROWS = 10_000  # synthetic pools are spread over shards of this many images, as downloads are
EMBED_IMAGES = 500
JPEG_QUALITY = 95  # what the platform's downloads encode with (ca_platform.ingest.download)
TAR_IMAGES = 250  # part 1's images per tar: B and F alternate tar by tar
BUSY_LOAD = 0.5  # 1-minute load average per core, before the run, above which the machine counts as busy


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth multi-scale colour field with a few shapes and sensor-like noise: a photo's spectrum and a
    photo's JPEG size (about 25 KB at 256 px, quality 95), so decoding costs what a downloaded image does."""
    field = np.zeros((height, width, 3), dtype=np.float32)
    for cells, amplitude in ((2, 1.0), (4, 0.6), (8, 0.35), (16, 0.2), (32, 0.1)):
        grid = rng.uniform(-1, 1, (cells, cells, 3)).astype(np.float32)
        channels = [Image.fromarray(grid[..., c]).resize((width, height), Image.Resampling.BICUBIC) for c in range(3)]
        field += amplitude * np.stack([np.asarray(channel) for channel in channels], axis=-1)
    field += rng.normal(0, 0.06, field.shape).astype(np.float32)
    image = Image.fromarray(np.clip(128 + 60 * field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        left, top = rng.uniform(0, 0.7, 2) * (width, height)
        extent = rng.uniform(0.15, 0.5, 2) * (width, height)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        box = [left, top, left + extent[0], top + extent[1]]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def write_shard(folder: Path, images: int, size: int, per_tar: int) -> list[Path]:
    """`images` JPEG samples laid out as downloads write them, `per_tar` to a tar."""
    rng = np.random.default_rng(0)
    tars = []
    for start in range(0, images, per_tar):
        tars.append(folder / f"{len(tars):05d}.tar")
        with wds.TarWriter(str(tars[-1])) as writer:
            for row in range(start, min(images, start + per_tar)):
                # as img2dataset's keep_ratio leaves a web image: the shorter side at `size`, aspect up to 3:2
                longer = int(rng.integers(size, size * 3 // 2 + 1))
                width, height = (longer, size) if rng.random() < 0.5 else (size, longer)
                buffer = io.BytesIO()
                photo_like(rng, width, height).save(buffer, format="JPEG", quality=JPEG_QUALITY)
                writer.write(
                    {
                        "__key__": f"{row:09d}",
                        "jpg": buffer.getvalue(),
                        "txt": f"a photo {row}",
                        "json": json.dumps({"uid": f"u{row}"}).encode(),
                    }
                )
    return tars


def bare_hashing(tar: Path) -> int:
    """What any pipeline pays to hash a shard's images: read, decode, sha256 of the pixels."""
    count = 0
    for sample in iter_samples([tar]):
        _, image, _ = decode_sample(tar, sample)
        hashlib.sha256(image.tobytes()).hexdigest()
        count += 1
    return count


def seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fingerprint_part(images: int, size: int, repeats: int) -> dict[str, Any]:
    """B and F over the same tars, alternated tar by tar (250 images each), so load from a neighbour on a shared
    machine falls on both alike; a round is one pass of each over all the tars."""
    from ca_platform.models.clip import build_clip
    from ca_platform.scoring.clip_score import ClipScorer

    with tempfile.TemporaryDirectory(prefix="ca-bench-dedup-") as scratch:
        tars = write_shard(Path(scratch), images, size, TAR_IMAGES)
        tar_bytes = sum(tar.stat().st_size for tar in tars)
        bare, fingerprinted = [], []
        for _ in range(repeats):
            bare_seconds = fingerprint_seconds = 0.0
            for tar in tars:
                bare_seconds += seconds(lambda tar=tar: bare_hashing(tar))
                fingerprint_seconds += seconds(lambda tar=tar: fingerprint_tars([tar], "s0"))
            bare.append(images / bare_seconds)
            fingerprinted.append(images / fingerprint_seconds)
        model, preprocessor = build_clip("tiny", 64)
        scorer = ClipScorer(model, preprocessor, "bench", None)
        embed = clip_image_embedder(scorer)
        embed_tars = tars[: max(1, EMBED_IMAGES // TAR_IMAGES)]
        embedded_images = sum(1 for _ in iter_samples(embed_tars))
        embedded = embedded_images / seconds(lambda: fingerprint_tars(embed_tars, "s0", embed, scorer.version))
    return {
        "bare": bare,
        "fingerprinted": fingerprinted,
        "embedded": embedded,
        "device": str(scorer.device),
        "tar_kib_per_image": tar_bytes / images / 1024,
        "peak_rss_mib": peak_rss_mib(),
    }


def random_pixel_hashes(rng: np.random.Generator, rows: int) -> pl.Series:
    """`rows` sha256-like hex strings (64 characters), made without a Python loop."""
    table = np.array([f"{byte:02x}".encode() for byte in range(256)], dtype="S2")
    digests = rng.integers(0, 256, size=(rows, 32), dtype=np.uint8)
    hexed = table[digests].view("S64").ravel()
    return pl.Series(schemas.PIXEL_HASH, hexed).cast(pl.String)


def synthetic_pool(
    rows: int, near_max_bits: int, seed: int, embeddings: np.ndarray | None = None
) -> tuple[pl.DataFrame, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fingerprints of `rows` images with 1% exact copies and 1% near copies (1..near_max_bits bits flipped)
    of other rows; returns the frame and the (copy, source) rows of each kind."""
    rng = np.random.default_rng(seed)
    planted = int(rows * PLANTED_FRACTION)
    order = rng.permutation(rows)
    exact_copies, near_copies = order[:planted], order[planted : 2 * planted]
    sources = order[2 * planted :]
    exact_sources = sources[rng.integers(0, len(sources), planted)]
    near_sources = sources[rng.integers(0, len(sources), planted)]
    phashes = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, rows, dtype=np.int64, endpoint=True)
    flips = np.zeros(planted, dtype=np.uint64)
    bits_flipped = rng.integers(1, near_max_bits + 1, planted)  # at most that many: a bit drawn twice flips once
    for bit_count in range(1, near_max_bits + 1):
        chosen = np.flatnonzero(bits_flipped == bit_count)
        for _ in range(bit_count):
            flips[chosen] |= np.uint64(1) << rng.integers(0, 64, len(chosen)).astype(np.uint64)
    phashes[near_copies] = (phashes[near_sources].view(np.uint64) ^ flips).view(np.int64)
    phashes[exact_copies] = phashes[exact_sources]
    pixel_hashes = random_pixel_hashes(rng, rows)
    pixel_hashes = pixel_hashes.scatter(exact_copies, pixel_hashes.gather(exact_sources))
    index = pl.int_range(rows, dtype=pl.Int64, eager=True)
    if embeddings is None:
        embedding = pl.Series(schemas.EMBEDDING, [None] * rows, dtype=pl.List(pl.Float32))
        version = pl.Series(schemas.EMBEDDING_MODEL_VERSION, [None] * rows, dtype=pl.String)
    else:
        embedding = pl.Series(schemas.EMBEDDING, embeddings).cast(pl.List(pl.Float32))
        version = pl.Series(schemas.EMBEDDING_MODEL_VERSION, ["synthetic"] * rows, dtype=pl.String)
    frame = pl.DataFrame(
        [
            # uids in no particular order within a shard, as a shard's pool rows have them
            ("u" + pl.Series(rng.permutation(rows)).cast(pl.String).str.zfill(9)).alias(schemas.UID),
            ("part-" + (index // SHARD_ROWS).cast(pl.String).str.zfill(5)).alias(schemas.SHARD),
            pixel_hashes,
            pl.Series(schemas.PHASH, phashes),
            embedding,
            version,
        ]
    )
    return frame, exact_copies, exact_sources, near_copies, near_sources


def scores_of(pool: pl.DataFrame, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pool.select(schemas.UID, schemas.SHARD).with_columns(pl.Series("score", rng.standard_normal(pool.height)))


def recovered(duplicates: pl.DataFrame, pool: pl.DataFrame, copies: np.ndarray, sources: np.ndarray) -> int:
    """How many planted (copy, source) rows ended in one group."""
    keys = pool.select(schemas.SHARD, schemas.UID)
    groups = duplicates.select(schemas.SHARD, schemas.UID, "group_id")
    copy_groups = keys[copies].join(groups, on=[schemas.SHARD, schemas.UID], how="left", maintain_order="left")
    source_groups = keys[sources].join(groups, on=[schemas.SHARD, schemas.UID], how="left", maintain_order="left")
    same = copy_groups["group_id"] == source_groups["group_id"]
    return int(same.fill_null(False).sum())


def grouping_part(rows: int, seed: int) -> dict[str, Any]:
    settings = DedupSettings(semantic_min_cosine=None)
    pool, exact_copies, exact_sources, near_copies, near_sources = synthetic_pool(rows, settings.near_max_bits, seed)
    scores = scores_of(pool, seed)
    before = peak_rss_mib()
    start = time.perf_counter()
    result = deduplicate(pool, scores, None, settings)
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    return {
        "rows": rows,
        "seconds": seconds,
        "peak_before_mib": before,
        "peak_mib": peak,
        "counts": result.counts(),
        "exact_recovered": recovered(result.duplicates, pool, exact_copies, exact_sources),
        "near_recovered": recovered(result.duplicates, pool, near_copies, near_sources),
        "planted": len(exact_copies),
    }


def clustered_embeddings(rng: np.random.Generator, rows: int, dimensions: int) -> np.ndarray:
    """Unit vectors around 1,000 topics, as image embeddings cluster by content."""
    topics = rng.standard_normal((1000, dimensions)).astype(np.float32)
    embeddings = np.empty((rows, dimensions), dtype=np.float32)
    for start in range(0, rows, 1 << 18):
        count = min(1 << 18, rows - start)
        block = topics[rng.integers(0, 1000, count)] + 0.5 * rng.standard_normal((count, dimensions), np.float32)
        embeddings[start : start + count] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return embeddings


def semantic_part(rows: int, dimensions: int, seed: int) -> dict[str, Any]:
    settings = DedupSettings()
    rng = np.random.default_rng(seed + 1)
    embeddings = clustered_embeddings(rng, rows, dimensions)
    planted = int(rows * PLANTED_FRACTION)
    order = rng.permutation(rows)
    copies, sources = order[:planted], order[planted : 2 * planted]
    noisy = embeddings[sources] + 0.005 * rng.standard_normal((planted, dimensions), np.float32)
    embeddings[copies] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    pool, *_ = synthetic_pool(rows, settings.near_max_bits, seed, embeddings)
    del embeddings
    scores = scores_of(pool, seed)
    before = peak_rss_mib()
    start = time.perf_counter()
    duplicates = duplicate_groups(pool, scores, settings)
    seconds = time.perf_counter() - start
    return {
        "rows": rows,
        "dimensions": dimensions,
        "seconds": seconds,
        "peak_before_mib": before,
        "peak_mib": peak_rss_mib(),
        "semantic_recovered": recovered(duplicates, pool, copies, sources),
        "planted": planted,
        "semantic_members": duplicates.filter(pl.col("kind") == schemas.SEMANTIC_DUPLICATE).height,
    }


def in_fresh_process(function: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run a part in a new process (spawned: no inherited thread pools), so its peak RSS is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def fmt(rates: list[float]) -> str:
    return ", ".join(f"{value:.0f}" for value in rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000, help="JPEGs in the shard tar of part 1")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument(
        "--repeats", type=int, default=5, help="rounds of B and F, alternated tar by tar; rates are over all rounds"
    )
    parser.add_argument("--rows", type=int, default=10_000_000, help="synthetic fingerprints for exact + near")
    parser.add_argument("--semantic-rows", type=int, default=1_000_000, help="synthetic fingerprints with embeddings")
    parser.add_argument("--dimensions", type=int, default=64, help="embedding width for the semantic part")
    parser.add_argument("--parts", default="fingerprints,grouping,semantic")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    load_before = os.getloadavg()[0]
    print(f"{os.cpu_count()} cores, load average before the run {load_before:.2f}")
    if load_before > BUSY_LOAD * (os.cpu_count() or 1):
        print("warning: the cores were busy before the run started; rates may be unreliable, run again when idle")

    if "fingerprints" in parts:
        result = in_fresh_process(fingerprint_part, args.images, args.image_size, args.repeats)
        rounds = list(zip(result["bare"], result["fingerprinted"]))
        bare, fingerprinted = (len(rounds) / sum(1 / rate for rate in rates) for rates in zip(*rounds))
        print(
            f"\n1. fingerprints: {args.images} JPEGs, shorter side {args.image_size} px "
            f"({result['tar_kib_per_image']:.1f} KiB each) in tars of {TAR_IMAGES}, B and F alternated tar by tar, "
            f"{args.repeats} rounds"
        )
        print(f"B  read + decode + sha256 of the pixels:   {bare:8.1f} images/s   (rounds: {fmt(result['bare'])})")
        print(
            f"F  fingerprint_tars (pixel hash + pHash):  {fingerprinted:8.1f} images/s   (rounds: "
            f"{fmt(result['fingerprinted'])})"
        )
        ratios = ", ".join(f"{f / b:.2f}" for b, f in rounds)
        goal = "met" if fingerprinted / bare >= 0.85 else "NOT met"
        print(f"F / B over all rounds: {fingerprinted / bare:.2f}   (goal >= 0.85: {goal}; per round: {ratios})")
        print(
            f"for information: fingerprint_tars with the tiny CLIP's image embedding ({result['device']}): "
            f"{result['embedded']:.1f} images/s; peak RSS {result['peak_rss_mib']:.0f} MiB"
        )

    if "grouping" in parts:
        result = in_fresh_process(grouping_part, args.rows, args.seed)
        counts = result["counts"]
        print(f"\n2. exact + near grouping (deduplicate, semantic off) of {result['rows']:,} fingerprints")
        print(
            f"{result['seconds']:.1f} s ({result['rows'] / result['seconds']:,.0f} rows/s); peak RSS "
            f"{result['peak_mib']:.0f} MiB ({result['peak_before_mib']:.0f} MiB holding the pool and scores before)"
        )
        print(
            f"planted links recovered: exact {result['exact_recovered']}/{result['planted']}, near "
            f"{result['near_recovered']}/{result['planted']}; counts {counts}"
        )

    if "semantic" in parts:
        result = in_fresh_process(semantic_part, args.semantic_rows, args.dimensions, args.seed)
        print(
            f"\n3. exact + near + semantic grouping (duplicate_groups) of {result['rows']:,} fingerprints with "
            f"{result['dimensions']}-d embeddings"
        )
        print(
            f"{result['seconds']:.1f} s ({result['rows'] / result['seconds']:,.0f} rows/s); peak RSS "
            f"{result['peak_mib']:.0f} MiB ({result['peak_before_mib']:.0f} MiB holding the pool and scores before)"
        )
        share = result["semantic_recovered"] / max(result["planted"], 1)
        print(
            f"planted near-identical pairs in one group: {result['semantic_recovered']}/{result['planted']} "
            f"({share:.3f}); semantic members {result['semantic_members']}"
        )
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
