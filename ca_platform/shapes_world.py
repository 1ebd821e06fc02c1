"""The shapes world: an embedded, procedurally drawn demo web pool.

The platform filters noisy web image-text pools, and a realistic demo of that needs
images whose true content is known exactly. Here every image is drawn from a small
compositional grammar (shapes with a colour, a size and a position on a patterned
background), so its true caption is known, and web-like alt-text noise and broken
links are injected on purpose and recorded as ground truth. Everything is
deterministic given a seed and needs no internet.

The building blocks (``sample_scene``, ``render_scene``, ``describe``, the per-kind
caption corruptions) are public so that preference data and clean evaluation sets
can be built from the same world.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 215, 40),
    "green": (40, 165, 60),
    "blue": (40, 90, 220),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}

BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "white": COLOURS["white"],
    "black": COLOURS["black"],
    "yellow": COLOURS["yellow"],
    "blue": COLOURS["blue"],
    "green": COLOURS["green"],
}

BACKGROUND_PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted")

SIZES: tuple[str, ...] = ("small", "large")

# Coarse 3x3 grid: position word -> (column, row).
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}

POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}

PATTERN_WORDS: dict[str, str] = {"plain": "", "striped": "striped", "dotted": "dotted"}

NoiseKind = Literal["clean", "other_image", "wrong_attribute", "partial", "boilerplate"]
LinkKind = Literal["ok", "missing", "corrupt"]

NOISE_KINDS: tuple[str, ...] = ("clean", "other_image", "wrong_attribute", "partial", "boilerplate")
LINK_KINDS: tuple[str, ...] = ("ok", "missing", "corrupt")

POOL_COLUMNS: tuple[str, ...] = ("url", "caption")
TRUTH_COLUMNS: tuple[str, ...] = ("url", "true_caption", "noise_kind", "link_kind", "scene_json")

_SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; every field is a word of the caption grammar."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}")


@dataclass(frozen=True)
class Scene:
    """A whole image: objects in distinct grid cells over a background."""

    objects: tuple[SceneObject, ...]
    background_colour: str
    background_pattern: str

    def __post_init__(self) -> None:
        if not self.objects:
            raise ValueError("a scene needs at least one object")
        positions = [obj.position for obj in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"objects share a position: {positions}")
        if self.background_colour not in BACKGROUND_COLOURS:
            raise ValueError(f"unknown background colour {self.background_colour!r}")
        if self.background_pattern not in BACKGROUND_PATTERNS:
            raise ValueError(f"unknown background pattern {self.background_pattern!r}")


def scene_to_json(scene: Scene) -> str:
    """Serialise a scene canonically (sorted keys, compact) so equal scenes give equal text."""
    return json.dumps(dataclasses.asdict(scene), sort_keys=True, separators=(",", ":"))


def scene_from_json(text: str) -> Scene:
    """Inverse of ``scene_to_json``, used to re-render or re-caption ground truth."""
    data = json.loads(text)
    return Scene(
        objects=tuple(SceneObject(**obj) for obj in data["objects"]),
        background_colour=data["background_colour"],
        background_pattern=data["background_pattern"],
    )


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, max_objects: int = 3) -> Scene:
    """Draw a random scene with 1..max_objects objects in distinct cells.

    Object colours never equal the background colour, so every object is visible.
    """
    if not 1 <= max_objects <= len(POSITIONS):
        raise ValueError(f"max_objects must be in 1..{len(POSITIONS)}")
    background_colour = _pick(rng, tuple(BACKGROUND_COLOURS))
    background_pattern = _pick(rng, BACKGROUND_PATTERNS)
    count = int(rng.integers(1, max_objects + 1))
    position_names = tuple(POSITIONS)
    cells = rng.choice(len(position_names), size=count, replace=False)
    object_colours = [c for c in COLOURS if c != background_colour]
    objects = tuple(
        SceneObject(
            shape=_pick(rng, SHAPES),
            colour=_pick(rng, object_colours),
            size=_pick(rng, SIZES),
            position=position_names[int(cell)],
        )
        for cell in cells
    )
    return Scene(objects, background_colour, background_pattern)


def _shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """A nearby tone for pattern details: darker on light colours, lighter on dark ones."""
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    target = 0 if luminance > 90 else 255
    r, g, b = (round(c + 0.3 * (target - c)) for c in rgb)
    return (r, g, b)


def _polygon(cx: float, cy: float, radius: float, shape: str) -> list[tuple[float, float]]:
    def ring(count: int, radii: tuple[float, ...], start_deg: float) -> list[tuple[float, float]]:
        points = []
        for i in range(count):
            angle = math.radians(start_deg + 360.0 * i / count)
            r = radii[i % len(radii)]
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        return points

    if shape == "square":
        h = 0.8 * radius
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return ring(3, (radius,), -90.0)
    if shape == "star":
        return ring(10, (radius, 0.45 * radius), -90.0)
    if shape == "diamond":
        return [(cx, cy - radius), (cx + 0.75 * radius, cy), (cx, cy + radius), (cx - 0.75 * radius, cy)]
    if shape == "cross":
        a, w = radius, 0.35 * radius
        return [
            (cx - w, cy - a),
            (cx + w, cy - a),
            (cx + w, cy - w),
            (cx + a, cy - w),
            (cx + a, cy + w),
            (cx + w, cy + w),
            (cx + w, cy + a),
            (cx - w, cy + a),
            (cx - w, cy + w),
            (cx - a, cy + w),
            (cx - a, cy - w),
            (cx - w, cy - w),
        ]
    raise ValueError(f"no polygon for shape {shape!r}")


def render_scene(scene: Scene, size: int = 64) -> Image.Image:
    """Draw a scene as an RGB image of ``size`` x ``size`` pixels.

    Drawing happens at 4x and is downsampled, so small images keep smooth edges.
    The result depends only on the scene and size, never on a random state.
    """
    if size < 8:
        raise ValueError("image size must be at least 8 pixels")
    canvas = size * _SUPERSAMPLE
    base = BACKGROUND_COLOURS[scene.background_colour]
    image = Image.new("RGB", (canvas, canvas), base)
    draw = ImageDraw.Draw(image)
    detail = _shade(base)
    if scene.background_pattern == "striped":
        band = canvas / 8
        for i in range(1, 8, 2):
            draw.rectangle((0, i * band, canvas, (i + 1) * band - 1), fill=detail)
    elif scene.background_pattern == "dotted":
        step = canvas / 6
        dot = step * 0.15
        for row in range(6):
            for col in range(6):
                x, y = (col + 0.5) * step, (row + 0.5) * step
                draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=detail)

    cell = canvas / 3
    for obj in scene.objects:
        col, row = POSITIONS[obj.position]
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        radius = cell * (0.45 if obj.size == "large" else 0.25)
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        else:
            draw.polygon(_polygon(cx, cy, radius, obj.shape), fill=fill)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _with_article(noun_phrase: str) -> str:
    article = "an" if noun_phrase[0] in "aeiou" else "a"
    return f"{article} {noun_phrase}"


def _object_phrase(obj: SceneObject, *, size: bool = True, colour: bool = True, position: bool = True) -> str:
    words = [w for w, keep in ((obj.size, size), (obj.colour, colour)) if keep]
    phrase = _with_article(" ".join([*words, obj.shape]))
    if position:
        phrase = f"{phrase} {POSITION_PHRASES[obj.position]}"
    return phrase


def _background_phrase(scene: Scene) -> str:
    words = " ".join(w for w in (PATTERN_WORDS[scene.background_pattern], scene.background_colour) if w)
    return f"on {_with_article(words)} background"


def _compose(object_phrases: list[str], background: str | None) -> str:
    if len(object_phrases) == 1:
        body = object_phrases[0]
    else:
        body = ", ".join(object_phrases[:-1]) + " and " + object_phrases[-1]
    return f"{body}, {background}" if background else body


def describe(scene: Scene) -> str:
    """The true caption: every object with size, colour and position, then the background."""
    return _compose([_object_phrase(obj) for obj in scene.objects], _background_phrase(scene))


def describe_objects(scene: Scene) -> str:
    """A shorter true caption: the objects only, as a second annotator might write it."""
    return _compose([_object_phrase(obj) for obj in scene.objects], None)


def normalise_caption(text: str) -> str:
    """Lower-case, collapse spaces and drop trailing punctuation, for comparing captions."""
    return " ".join(text.lower().split()).rstrip(".!").strip()


def _surface(text: str, rng: np.random.Generator) -> str:
    """Harmless web-style variation in casing and trailing punctuation."""
    style = int(rng.integers(4))
    if style == 1:
        return text[0].upper() + text[1:]
    if style == 2:
        return text[0].upper() + text[1:] + "."
    if style == 3:
        return text + "."
    return text


def clean_caption(scene: Scene, rng: np.random.Generator) -> str:
    """The true caption, with only casing / trailing punctuation varied."""
    return _surface(describe(scene), rng)


def other_image_caption(scene: Scene, rng: np.random.Generator, other: Scene | None = None) -> str:
    """The caption of a different scene (a mismatched alt text).

    ``other`` is normally another row's scene; when it is missing or happens to read
    the same as ``scene``, fresh scenes are sampled until the captions differ.
    """
    true_caption = describe(scene)
    while other is None or describe(other) == true_caption:
        other = sample_scene(rng)
    return _surface(describe(other), rng)


def perturb_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """Return a copy of ``scene`` with exactly one attribute changed to a wrong value.

    The attribute is one object's shape, colour, size or position, or the background
    colour; a new position is always a free cell, so the result is a valid scene whose
    caption differs from the original's. Applying it repeatedly gives captions with
    more errors, which is useful for ranked preference data.
    """
    choices = [(i, attr) for i in range(len(scene.objects)) for attr in ("shape", "colour", "size", "position")]
    choices.append((-1, "background_colour"))
    index, attr = choices[int(rng.integers(len(choices)))]
    if attr == "background_colour":
        options = [c for c in BACKGROUND_COLOURS if c != scene.background_colour]
        return dataclasses.replace(scene, background_colour=_pick(rng, options))
    obj = scene.objects[index]
    if attr == "shape":
        new_obj = dataclasses.replace(obj, shape=_pick(rng, [s for s in SHAPES if s != obj.shape]))
    elif attr == "colour":
        new_obj = dataclasses.replace(obj, colour=_pick(rng, [c for c in COLOURS if c != obj.colour]))
    elif attr == "size":
        new_obj = dataclasses.replace(obj, size=_pick(rng, [s for s in SIZES if s != obj.size]))
    else:
        taken = {o.position for o in scene.objects}
        new_obj = dataclasses.replace(obj, position=_pick(rng, [p for p in POSITIONS if p not in taken]))
    objects = scene.objects[:index] + (new_obj,) + scene.objects[index + 1 :]
    return dataclasses.replace(scene, objects=objects)


def wrong_attribute_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A fluent caption with one attribute wrong: the hardest noise to spot."""
    return _surface(describe(perturb_scene(scene, rng)), rng)


def _partial_text(scene: Scene, rng: np.random.Generator) -> str:
    objects = list(scene.objects)
    if len(objects) > 1 and rng.random() < 0.5:
        keep = int(rng.integers(1, len(objects)))
        chosen = sorted(int(i) for i in rng.choice(len(objects), size=keep, replace=False))
        objects = [objects[i] for i in chosen]
    phrases = [
        _object_phrase(obj, size=rng.random() >= 0.4, colour=rng.random() >= 0.4, position=rng.random() >= 0.4)
        for obj in objects
    ]
    background = _background_phrase(scene) if rng.random() >= 0.5 else None
    text = _compose(phrases, background)
    if text == describe(scene):
        text = _compose(phrases, None)
    return text


def partial_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A true but incomplete caption: some objects, attributes or the background dropped."""
    return _surface(_partial_text(scene, rng), rng)


def _boilerplate_token(rng: np.random.Generator) -> str:
    n = int(rng.integers(1, 10_000))
    templates = (
        f"IMG_{1000 + n % 9000}.jpg",
        f"DSC{n:05d}.JPG",
        "click to enlarge",
        f"stock photo {n}",
        "image",
        f"untitled-{n % 50}.png",
        "thumbnail",
        f"image{n % 1000:03d}.png",
        "no description available",
        f"photo {n % 20 + 1} of {n % 20 + 21}",
    )
    return templates[int(rng.integers(len(templates)))]


def boilerplate_caption(scene: Scene, rng: np.random.Generator) -> str:
    """File names and page chrome instead of a description, sometimes glued to a partial caption."""
    token = _boilerplate_token(rng)
    if rng.random() < 0.3:
        separator = _pick(rng, (" - ", " | ", " "))
        text = _partial_text(scene, rng)
        return f"{token}{separator}{text}" if rng.random() < 0.5 else f"{text}{separator}{token}"
    return token


def make_noisy_caption(scene: Scene, kind: str, rng: np.random.Generator, other: Scene | None = None) -> str:
    """Dispatch to the caption corruption for ``kind`` (one of ``NOISE_KINDS``)."""
    if kind == "clean":
        return clean_caption(scene, rng)
    if kind == "other_image":
        return other_image_caption(scene, rng, other)
    if kind == "wrong_attribute":
        return wrong_attribute_caption(scene, rng)
    if kind == "partial":
        return partial_caption(scene, rng)
    if kind == "boilerplate":
        return boilerplate_caption(scene, rng)
    raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISE_KINDS}")


@dataclass(frozen=True)
class NoiseMix:
    """Relative weights of the caption noise kinds (normalised, need not sum to 1)."""

    clean: float = 0.35
    other_image: float = 0.15
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

    seed: int = 0
    shards: int = 4
    rows_per_shard: int = 200
    image_size: int = 64
    noise: NoiseMix = field(default_factory=NoiseMix)
    missing_fraction: float = 0.05
    corrupt_fraction: float = 0.03
    image_format: Literal["png", "jpg"] = "png"

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
        if link_kind == "ok":
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
