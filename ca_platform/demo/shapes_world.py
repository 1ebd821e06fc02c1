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
from dataclasses import dataclass
from typing import Literal

import numpy as np
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
