"""The demo's clean evaluation set: shapes-world images the pool never shows, with true captions.

Each image has two references, as COCO has several: the full description and the objects-only one.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ca_platform.demo.shapes_pool import ShapesWorldConfig, ShapesWorldPool, pool_scene_keys, read_truth, scene_key
from ca_platform.demo.shapes_world import describe, describe_objects, render_scene, sample_scene

# RNG stream of the evaluation scenes, default_rng([seed, EVALUATION_STREAM]); the pool's shards use
# streams 0..shards-1 and the preferences 7919.
EVALUATION_STREAM = 104729
EVALUATION_IMAGES_DIR = "eval-images"
EVALUATION_FILE = "evaluation.parquet"


def write_shapes_evaluation_set(
    out_dir: Path,
    base_url: str,
    images: int = 200,
    seed: int = 0,
    avoid_pool: ShapesWorldConfig | None = None,
    image_size: int = 64,
    leaked: Sequence[tuple[Path, str]] = (),
) -> Path:
    """Render `images` distinct scenes (none a scene of `avoid_pool`) under `out_dir/eval-images/`, served at
    `base_url`, and write `out_dir/evaluation.parquet` with columns url, caption; returns the parquet path.

    `leaked` pool images (file, true caption) join the set too, alternately as exact copies and JPEG re-encodes:
    evaluation images that also sit in the pool, as web pools hold copies of well-known test sets, which
    decontamination must remove from the pool before any training."""
    rng = np.random.default_rng([seed, EVALUATION_STREAM])
    taken = pool_scene_keys(avoid_pool) if avoid_pool is not None else set()
    images_dir = out_dir / EVALUATION_IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    urls, captions = [], []
    index = 0
    while index < images:
        scene = sample_scene(rng)
        if scene_key(scene) in taken:
            continue
        taken.add(scene_key(scene))
        name = f"eval-{index:05d}.png"
        render_scene(scene, image_size).save(images_dir / name, format="PNG")
        for caption in dict.fromkeys([describe(scene), describe_objects(scene)]):
            urls.append(f"{base_url.rstrip('/')}/{EVALUATION_IMAGES_DIR}/{name}")
            captions.append(caption)
        index += 1
    for number, (source, caption) in enumerate(leaked):
        name = f"eval-leaked-{number:05d}" + (".png" if number % 2 == 0 else ".jpg")
        if number % 2 == 0:
            shutil.copyfile(source, images_dir / name)
        else:
            Image.open(source).convert("RGB").save(images_dir / name, format="JPEG", quality=70)
        urls.append(f"{base_url.rstrip('/')}/{EVALUATION_IMAGES_DIR}/{name}")
        captions.append(caption)
    path = out_dir / EVALUATION_FILE
    pq.write_table(pa.table({"url": pa.array(urls, pa.string()), "caption": pa.array(captions, pa.string())}), path)
    return path


def pool_images_to_leak(world: ShapesWorldPool, count: int) -> list[tuple[Path, str]]:
    """`count` pool images that download (working links, not themselves planted copies) with their true
    captions: the first rows of the pool, for `write_shapes_evaluation_set(leaked=...)`."""
    truth = read_truth(world.truth_dir)
    if "copy_of" in truth.columns:
        truth = truth.filter(pl.col("copy_of").is_null())
    rows = truth.filter(pl.col("link_kind") == "ok").head(count)
    return [
        (world.images_dir / url.rsplit("/", 1)[1], caption)
        for url, caption in rows.select("url", "true_caption").rows()
    ]
