"""The demo's labelled set for zero-shot classification: shapes-world scenes whose largest object is the class.

Each image has exactly one large object (and up to two small ones as distractors); its class is that object's
colour and shape, e.g. "red circle": 48 classes, so top-5 accuracy is not the near-certainty it would be with the
six shapes alone. Labels are class numbers with a readable `name` column, as a user's ImageNet-style file has.
No image is a scene of the pool or of the preference set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ca_platform.demo.shapes_pool import scene_key
from ca_platform.demo.shapes_world import COLOURS, SHAPES, Scene, render_scene, sample_scene
from ca_platform.schemas import CLASS_NAME, LABEL, URL

# RNG stream of the labelled scenes, default_rng([seed, CLASSIFICATION_STREAM]); the pool's shards use streams
# 0..shards-1, the preferences 7919 and the evaluation set 104729.
CLASSIFICATION_STREAM = 130363
CLASSIFICATION_IMAGES_DIR = "class-images"
CLASSIFICATION_FILE = "classes.parquet"
CLASS_NAMES: tuple[str, ...] = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
# Prompts in the words the demo's captions use ("a large red circle at the top left, on a ..."): a tiny CLIP
# trained on them knows no "photo of"; a user's templates, too, suit what their model was trained on.
DEMO_CLASS_TEMPLATES: tuple[str, ...] = ("a large {}", "a large {} on a background", "an image of a large {}")


def largest_object_class(scene: Scene) -> str | None:
    """The class of a scene with exactly one large object (its colour and shape), else None (no single largest)."""
    large = [obj for obj in scene.objects if obj.size == "large"]
    return f"{large[0].colour} {large[0].shape}" if len(large) == 1 else None


def sample_labelled_scenes(
    images: int, seed: int = 0, avoid: set[tuple[str, str, frozenset]] | None = None
) -> list[tuple[Scene, str]]:
    """`images` distinct scenes with a single largest object, none of them in `avoid`, each with its class."""
    rng = np.random.default_rng([seed, CLASSIFICATION_STREAM])
    taken = set(avoid or ())
    scenes: list[tuple[Scene, str]] = []
    while len(scenes) < images:
        scene = sample_scene(rng)
        name = largest_object_class(scene)
        if name is not None and scene_key(scene) not in taken:
            taken.add(scene_key(scene))
            scenes.append((scene, name))
    return scenes


def write_shapes_classification_set(
    out_dir: Path,
    base_url: str,
    images: int = 300,
    seed: int = 0,
    avoid: set[tuple[str, str, frozenset]] | None = None,
    image_size: int = 64,
) -> Path:
    """Render `sample_labelled_scenes` (`avoid`: the pool's and the preference set's scenes) under
    `out_dir/class-images/`, served at `base_url`, and write `out_dir/classes.parquet` with columns url, label
    (the class number) and name; returns the parquet path."""
    images_dir = out_dir / CLASSIFICATION_IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    urls, labels = [], []
    for index, (scene, name) in enumerate(sample_labelled_scenes(images, seed, avoid)):
        file = f"class-{index:05d}.png"
        render_scene(scene, image_size).save(images_dir / file, format="PNG")
        urls.append(f"{base_url.rstrip('/')}/{CLASSIFICATION_IMAGES_DIR}/{file}")
        labels.append(CLASS_NAMES.index(name))
    path = out_dir / CLASSIFICATION_FILE
    table = pa.table(
        {
            URL: pa.array(urls, pa.string()),
            LABEL: pa.array(labels, pa.int32()),
            CLASS_NAME: pa.array([CLASS_NAMES[label] for label in labels], pa.string()),
        }
    )
    pq.write_table(table, path)
    return path
