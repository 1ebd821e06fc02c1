"""The shapes-world pool: shards of web-like alt-text over procedurally drawn images, with ground truth.

Caption noise and broken links are injected in set proportions and recorded per row, so every curation
result on the demo can be checked against what each pair really shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ca_platform.demo.shapes_world import (
    NOISE_KINDS,
    Scene,
    SceneObject,
    describe,
    make_noisy_caption,
    render_scene,
    sample_scene,
    scene_to_json,
)


@dataclass(frozen=True)
class NoiseMix:
    """Relative weights of the caption noise kinds (normalised, need not sum to 1)."""

    clean: float = 0.35  # the true description
    other_image: float = 0.15  # a caption of another image of the pool
    wrong_attribute: float = 0.20
    partial: float = 0.15
    boilerplate: float = 0.15

    def __post_init__(self) -> None:
        weights = self.weights().values()
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError("noise weights must be non-negative with a positive sum")

    def weights(self) -> dict[str, float]:
        return {kind: float(getattr(self, kind)) for kind in NOISE_KINDS}

    def fractions(self) -> dict[str, float]:
        """Weights normalised to sum to 1."""
        weights = self.weights()
        total = sum(weights.values())
        return {kind: w / total for kind, w in weights.items()}


@dataclass(frozen=True)
class ShapesWorldConfig:
    """Everything that determines a generated pool; equal configs give identical files."""

    seed: int = 0  # shard k draws from default_rng([seed, k])
    shards: int = 4
    rows_per_shard: int = 200
    image_size: int = 64
    noise: NoiseMix = field(default_factory=NoiseMix)
    missing_fraction: float = 0.05
    corrupt_fraction: float = 0.03
    image_format: Literal["png", "jpg"] = "png"
    # Rows whose image copies another row's of the same shard, as web pools repeat themselves: the same pixels,
    # a JPEG re-encode, or a larger rendering (downloads resize it back): what dedup must find.
    duplicate_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.shards < 1 or self.rows_per_shard < 1:
            raise ValueError("shards and rows_per_shard must be positive")
        if self.image_size < 8:
            raise ValueError("image_size must be at least 8")
        if self.missing_fraction < 0 or self.corrupt_fraction < 0:
            raise ValueError("failure fractions must be non-negative")
        if self.missing_fraction + self.corrupt_fraction > 1:
            raise ValueError("missing_fraction + corrupt_fraction must not exceed 1")
        if self.image_format not in ("png", "jpg"):
            raise ValueError("image_format must be 'png' or 'jpg'")
        if not 0 <= self.duplicate_fraction <= 0.5:
            raise ValueError("duplicate_fraction must be within [0, 0.5]")

    @property
    def rows(self) -> int:
        return self.shards * self.rows_per_shard


@dataclass(frozen=True)
class ShapesWorldPool:
    """Where a generated pool lives; ``shard_paths`` are the web-pool parquet files."""

    root: Path
    pool_dir: Path
    truth_dir: Path
    images_dir: Path
    shard_paths: tuple[Path, ...]
    rows: int

    @property
    def truth_paths(self) -> tuple[Path, ...]:
        """Ground-truth shards, row-aligned with ``shard_paths``."""
        return tuple(self.truth_dir / path.name for path in self.shard_paths)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _quota_labels(fractions: dict[str, float], n: int, rng: np.random.Generator) -> list[str]:
    """Exactly-proportioned labels (largest remainder), shuffled, so small shards keep the mix."""
    exact = {k: f * n for k, f in fractions.items()}
    counts = {k: int(math.floor(v)) for k, v in exact.items()}
    by_remainder = sorted(exact, key=lambda k: (-(exact[k] - counts[k]), list(exact).index(k)))
    for k in by_remainder[: n - sum(counts.values())]:
        counts[k] += 1
    labels = [k for k in fractions for _ in range(counts[k])]
    return [labels[int(i)] for i in rng.permutation(n)]


def _link_kinds(config: ShapesWorldConfig, n: int, rng: np.random.Generator) -> list[str]:
    missing = _round_half_up(config.missing_fraction * n)
    corrupt = min(_round_half_up(config.corrupt_fraction * n), n - missing)
    labels = ["missing"] * missing + ["corrupt"] * corrupt + ["ok"] * (n - missing - corrupt)
    return [labels[int(i)] for i in rng.permutation(n)]


# RNG stream of the planted copies, default_rng([seed, shard, DUPLICATE_STREAM]): apart from the shard's own
# stream, so a pool without copies is the same as before they existed.
DUPLICATE_STREAM = 15485863
COPY_KINDS = ("exact", "reencoded", "resized")


def _planted_copies(config: ShapesWorldConfig, shard: int, link_kinds: list[str]) -> dict[int, tuple[int, str]]:
    """Copy row -> (the row it copies, how): `duplicate_fraction` of the shard's rows, each copying a row with a
    working link that is not itself a copy, the kinds in turn."""
    count = _round_half_up(config.duplicate_fraction * len(link_kinds))
    if not count:
        return {}
    rng = np.random.default_rng([config.seed, shard, DUPLICATE_STREAM])
    working = [row for row, kind in enumerate(link_kinds) if kind == "ok"]
    picked = [working[int(i)] for i in rng.permutation(len(working))[: 2 * count]]
    sources, copies = picked[:count], picked[count:]
    return {copy: (source, COPY_KINDS[k % len(COPY_KINDS)]) for k, (source, copy) in enumerate(zip(sources, copies))}


def _corrupt_body(rng: np.random.Generator) -> bytes:
    """What a broken image link returns: an HTML error page or random bytes."""
    if rng.random() < 0.5:
        return (
            b"<!DOCTYPE html><html><head><title>Image unavailable</title></head>"
            b"<body><h1>Sorry, this image is no longer available.</h1></body></html>\n"
        )
    return rng.bytes(int(rng.integers(64, 2048)))


def _save_image(image: Image.Image, path: Path, image_format: str) -> None:
    if image_format == "jpg":
        image.save(path, format="JPEG", quality=90)
    else:
        image.save(path, format="PNG")


def _clear_previous_output(pool_dir: Path, truth_dir: Path, images_dir: Path) -> None:
    """Remove files an earlier run wrote, so a smaller re-run leaves no stale shards or images."""
    for directory in (pool_dir, truth_dir):
        for path in directory.glob("shard-*.parquet"):
            path.unlink()
    for pattern in ("*.png", "*.jpg"):
        for path in images_dir.glob(pattern):
            path.unlink()


def _write_shard(
    shard: int, config: ShapesWorldConfig, base_url: str, pool_dir: Path, truth_dir: Path, images_dir: Path
) -> Path:
    rng = np.random.default_rng([config.seed, shard])
    n = config.rows_per_shard
    scenes = [sample_scene(rng) for _ in range(n)]
    noise_kinds = _quota_labels(config.noise.fractions(), n, rng)
    link_kinds = _link_kinds(config, n, rng)
    copies = _planted_copies(config, shard, link_kinds)
    for copy, (source, _) in copies.items():
        scenes[copy] = scenes[source]

    urls: list[str] = []
    captions: list[str] = []
    true_captions: list[str] = []
    scene_jsons: list[str] = []
    for row, (scene, noise_kind, link_kind) in enumerate(zip(scenes, noise_kinds, link_kinds)):
        name = f"{shard:05d}-{row:06d}.{config.image_format}"
        urls.append(f"{base_url}/images/{name}")
        other = None
        if n > 1:
            other_row = int(rng.integers(n - 1))
            other = scenes[other_row + 1 if other_row >= row else other_row]
        captions.append(make_noisy_caption(scene, noise_kind, rng, other))
        true_captions.append(describe(scene))
        scene_jsons.append(scene_to_json(scene))
        copy_kind = copies.get(row, (None, None))[1]
        if copy_kind == "reencoded":
            render_scene(scene, config.image_size).save(images_dir / name, format="JPEG", quality=60)
        elif copy_kind == "resized":
            _save_image(render_scene(scene, config.image_size * 3 // 2), images_dir / name, config.image_format)
        elif link_kind == "ok":
            _save_image(render_scene(scene, config.image_size), images_dir / name, config.image_format)
        elif link_kind == "corrupt":
            (images_dir / name).write_bytes(_corrupt_body(rng))

    file_name = f"shard-{shard:05d}.parquet"
    pool_path = pool_dir / file_name
    pool_table = pa.table({"url": pa.array(urls, pa.string()), "caption": pa.array(captions, pa.string())})
    pq.write_table(pool_table, pool_path)
    truth_table = pa.table(
        {
            "url": pa.array(urls, pa.string()),
            "true_caption": pa.array(true_captions, pa.string()),
            "noise_kind": pa.array(noise_kinds, pa.string()),
            "link_kind": pa.array(link_kinds, pa.string()),
            "scene_json": pa.array(scene_jsons, pa.string()),
            "copy_of": pa.array([urls[copies[row][0]] if row in copies else None for row in range(n)], pa.string()),
            "copy_kind": pa.array([copies[row][1] if row in copies else None for row in range(n)], pa.string()),
        }
    )
    pq.write_table(truth_table, truth_dir / file_name)
    return pool_path


def generate_pool(out_dir: Path, base_url: str, config: ShapesWorldConfig = ShapesWorldConfig()) -> ShapesWorldPool:
    """Write images, web-pool shards and ground-truth shards under ``out_dir``.

    Layout: ``images/<id>.<ext>`` (missing links are simply not written, corrupt ones
    hold non-image bytes), ``pool/shard-NNNNN.parquet`` with only ``url`` and
    ``caption`` (what the platform ingests), and ``truth/shard-NNNNN.parquet`` with the
    same rows plus the true caption, noise kind, link kind and scene JSON, kept apart so
    the pipeline cannot peek at it. Each shard has its own RNG stream seeded from
    ``(seed, shard)``, so output is byte-identical for an equal config and base URL.
    """
    out_dir = Path(out_dir)
    base_url = base_url.rstrip("/")
    pool_dir, truth_dir, images_dir = out_dir / "pool", out_dir / "truth", out_dir / "images"
    for directory in (pool_dir, truth_dir, images_dir):
        directory.mkdir(parents=True, exist_ok=True)
    _clear_previous_output(pool_dir, truth_dir, images_dir)
    shard_paths = tuple(
        _write_shard(shard, config, base_url, pool_dir, truth_dir, images_dir) for shard in range(config.shards)
    )
    return ShapesWorldPool(
        root=out_dir,
        pool_dir=pool_dir,
        truth_dir=truth_dir,
        images_dir=images_dir,
        shard_paths=shard_paths,
        rows=config.rows,
    )


def read_truth(truth_dir: Path) -> pl.DataFrame:
    """All ground-truth shards of a pool as one frame, in shard and row order."""
    paths = sorted(Path(truth_dir).glob("shard-*.parquet"))
    if not paths:
        raise FileNotFoundError(f"no ground-truth shards under {truth_dir}")
    return pl.concat([pl.read_parquet(path) for path in paths])


def scene_key(scene: Scene) -> tuple[str, str, frozenset[SceneObject]]:
    """Equal for scenes that render the same image (object order does not matter)."""
    return scene.background_colour, scene.background_pattern, frozenset(scene.objects)


def pool_scene_keys(config: ShapesWorldConfig) -> set[tuple[str, str, frozenset[SceneObject]]]:
    """The scenes of a shapes-world pool, without rendering it: generate_pool draws each shard's scenes
    first from default_rng([seed, shard])."""
    keys = set()
    for shard in range(config.shards):
        rng = np.random.default_rng([config.seed, shard])
        keys.update(scene_key(sample_scene(rng)) for _ in range(config.rows_per_shard))
    return keys
