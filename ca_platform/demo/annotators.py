"""Simulated annotators for the demo: shapes-world images with captions ranked as people would rank them.

The demo has no human annotators, so ``write_shapes_preferences`` simulates them on shapes-world images,
whose true content is known: annotators rank captions by accuracy, completeness, detail and context, the
criteria Compress & Align asks people to use, plus per-annotator noise.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ca_platform.demo.shapes_pool import ShapesWorldConfig, pool_scene_keys, scene_key
from ca_platform.demo.shapes_world import (
    BACKGROUND_COLOURS,
    COLOURS,
    PATTERN_WORDS,
    POSITION_PHRASES,
    SHAPES,
    SIZES,
    Scene,
    clean_caption,
    describe,
    normalise_caption,
    other_image_caption,
    perturb_scene,
    render_scene,
    sample_scene,
)
from ca_platform.preferences.files import write_preferences
from ca_platform.preferences.pairs import PreferenceItem

# Stream id of the preference images' RNG, default_rng([seed, 7919]). The pool draws shard k from
# default_rng([pool_seed, k]), so the two share no random stream unless a pool has over 7919 shards. Equal
# scenes can still come from different streams, hence ShapesPreferenceConfig.avoid_pool as well.
PREFERENCE_STREAM = 7919

CAPTION_SOURCES = ("clean", "partial", "wrong_attribute", "two_wrong_attributes", "other_image", "boilerplate")
_NOISY_SOURCES = CAPTION_SOURCES[1:]

# Annotator utility: a complete, correct caption scores 1 and each wrong fact costs half of that,
# because the paper asks annotators to put accuracy before completeness and detail.
_COMPLETENESS_WEIGHT = 0.6
_DETAIL_WEIGHT = 0.25
_CONTEXT_WEIGHT = 0.15
_WRONG_FACT_PENALTY = 0.5

_BOILERPLATE_TOKENS = ("IMG_{}.jpg", "DSC{:05d}.JPG", "stock photo {}", "untitled-{}.png", "image{}.png")
_BOILERPLATE_PHRASES = ("click to enlarge", "image", "thumbnail", "no description available", "photo")


@dataclass(frozen=True)
class ShapesPreferenceConfig:
    """Everything that determines a simulated preference set; equal configs give identical files."""

    seed: int = 1000  # images draw from default_rng([seed, PREFERENCE_STREAM])
    images: int = 300
    captions_per_image: int = 4  # one clean caption and noisy ones of distinct kinds
    image_size: int = 64
    annotators: int = 3
    annotator_noise: float = 0.15
    tie_margin: float = 0.05
    # The pool whose images these must not repeat (so the reward model is never scored on its own
    # training images); None skips the check.
    avoid_pool: ShapesWorldConfig | None = field(default_factory=ShapesWorldConfig)

    def __post_init__(self) -> None:
        if self.images < 1:
            raise ValueError("images must be positive")
        if self.captions_per_image < 2:
            raise ValueError("captions_per_image must be at least 2: one caption orders nothing")
        if self.image_size < 8:
            raise ValueError("image_size must be at least 8")
        if self.annotators < 1:
            raise ValueError("annotators must be positive")
        if self.annotator_noise < 0 or self.tie_margin < 0:
            raise ValueError("annotator_noise and tie_margin must be non-negative")


@dataclass(frozen=True)
class ShapesPreference:
    """One simulated image with its ranked captions, and the ground truth behind the ranking."""

    scene: Scene
    captions: tuple[str, ...]
    sources: tuple[str, ...]  # which of CAPTION_SOURCES made each caption
    utilities: tuple[float, ...]  # noiseless annotator utility of each caption
    ranking: tuple[int, ...]


@dataclass(frozen=True)
class _ObjectClaim:
    """One object as a caption states it; None is an attribute the caption leaves out."""

    shape: str
    size: str | None
    colour: str | None
    position: str | None


@dataclass(frozen=True)
class _Claim:
    """Everything a caption asserts about its image: the provenance the simulated annotators judge."""

    objects: tuple[_ObjectClaim, ...] = ()
    background: tuple[str, str] | None = None  # (colour, pattern)


def _full_claim(scene: Scene) -> _Claim:
    objects = tuple(_ObjectClaim(o.shape, o.size, o.colour, o.position) for o in scene.objects)
    return _Claim(objects, (scene.background_colour, scene.background_pattern))


def _claim_text(claim: _Claim) -> str:
    """The caption stating exactly `claim`, in describe()'s grammar."""
    phrases = []
    for obj in claim.objects:
        noun = " ".join(word for word in (obj.size, obj.colour, obj.shape) if word)
        phrase = ("an " if noun[0] in "aeiou" else "a ") + noun
        phrases.append(f"{phrase} {POSITION_PHRASES[obj.position]}" if obj.position else phrase)
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if claim.background is None:
        return body
    colour, pattern = claim.background
    words = " ".join(word for word in (PATTERN_WORDS[pattern], colour) if word)
    return f"{body}, on {'an' if words[0] in 'aeiou' else 'a'} {words} background"


def _vary_surface(text: str, rng: np.random.Generator) -> str:
    """Casing and trailing punctuation varied like every other caption, so they say nothing of quality."""
    style = int(rng.integers(4))
    capitalised = text[0].upper() + text[1:]
    return (text, capitalised, capitalised + ".", text + ".")[style]


def _partial_claim(scene: Scene, rng: np.random.Generator) -> _Claim:
    """A true but incomplete claim: some objects, attributes or the background left out."""
    objects = list(scene.objects)
    if len(objects) > 1 and rng.random() < 0.5:
        keep = sorted(int(i) for i in rng.choice(len(objects), size=int(rng.integers(1, len(objects))), replace=False))
        objects = [objects[i] for i in keep]
    claims = tuple(
        _ObjectClaim(
            o.shape,
            o.size if rng.random() >= 0.4 else None,
            o.colour if rng.random() >= 0.4 else None,
            o.position if rng.random() >= 0.4 else None,
        )
        for o in objects
    )
    background = (scene.background_colour, scene.background_pattern) if rng.random() >= 0.5 else None
    claim = _Claim(claims, background)
    return _Claim(claims, None) if claim == _full_claim(scene) else claim


def _boilerplate_token(rng: np.random.Generator) -> str:
    n = int(rng.integers(1, 10_000))
    if rng.random() < 0.5:
        return _BOILERPLATE_TOKENS[int(rng.integers(len(_BOILERPLATE_TOKENS)))].format(n)
    return _BOILERPLATE_PHRASES[int(rng.integers(len(_BOILERPLATE_PHRASES)))]


@dataclass(frozen=True)
class _Assessment:
    correct: int  # facts stated rightly (object attributes, background colour and pattern)
    wrong: int  # facts stated wrongly, including every fact about an object the image lacks
    detail: int  # correct size, colour and position words
    background_right: bool


def _assess(claim: _Claim, scene: Scene) -> _Assessment:
    """Compare a claim with the truth, reading it as charitably as an annotator would: each stated
    object is matched to the true object it agrees with most."""
    truth = scene.objects
    best: tuple[int, int, int] | None = None
    for assignment in itertools.permutations(range(max(len(claim.objects), len(truth))), len(claim.objects)):
        correct = wrong = detail = 0
        for stated, index in zip(claim.objects, assignment):
            actual = truth[index] if index < len(truth) else None
            for name in ("shape", "size", "colour", "position"):
                value = getattr(stated, name)
                if value is None:
                    continue
                if actual is not None and value == getattr(actual, name):
                    correct += 1
                    detail += name != "shape"
                else:
                    wrong += 1
        if best is None or correct - wrong > best[0] - best[1]:
            best = (correct, wrong, detail)
    correct, wrong, detail = best or (0, 0, 0)
    background_right = False
    if claim.background is not None:
        colour_right = claim.background[0] == scene.background_colour
        pattern_right = claim.background[1] == scene.background_pattern
        correct += colour_right + pattern_right
        wrong += (not colour_right) + (not pattern_right)
        background_right = colour_right and pattern_right
    return _Assessment(correct, wrong, detail, background_right)


def _utility(claim: _Claim, scene: Scene) -> float:
    """The paper's criteria: accuracy first, then completeness, vividness (detail) and context."""
    found = _assess(claim, scene)
    completeness = found.correct / (4 * len(scene.objects) + 2)
    detail = found.detail / (3 * len(scene.objects))
    return (
        _COMPLETENESS_WEIGHT * completeness
        + _DETAIL_WEIGHT * detail
        + _CONTEXT_WEIGHT * found.background_right
        - _WRONG_FACT_PENALTY * found.wrong
    )


def _alternatives(words: object) -> str:
    """A regex alternation of `words`, longest first, so "at the top left" wins over "at the top"."""
    return "|".join(re.escape(word) for word in sorted(words, key=len, reverse=True))  # type: ignore[arg-type]


_POSITION_OF_PHRASE = {phrase: position for position, phrase in POSITION_PHRASES.items()}
_PATTERN_OF_WORD = {word: pattern for pattern, word in PATTERN_WORDS.items() if word}
_OBJECT_PHRASE = re.compile(
    rf"\ban? (?:(?P<size>{_alternatives(SIZES)}) )?(?:(?P<colour>{_alternatives(COLOURS)}) )?"
    rf"(?P<shape>{_alternatives(SHAPES)})\b(?: (?P<position>{_alternatives(_POSITION_OF_PHRASE)})\b)?"
)
_BACKGROUND_PHRASE = re.compile(
    rf"\bon an? (?:(?P<pattern>{_alternatives(_PATTERN_OF_WORD)}) )?(?P<colour>{_alternatives(BACKGROUND_COLOURS)})"
    r" background\b"
)


def claim_of_caption(caption: str) -> _Claim:
    """What a caption in the world's grammar asserts, read back from its text (boilerplate asserts nothing).

    Pool captions carry no record of their claims, so judging a kept pool pair as the annotators would
    (`caption_utility`) needs the claim recovered from the words; the grammar is regular, so this is exact.
    """
    text = normalise_caption(caption)
    background_match = _BACKGROUND_PHRASE.search(text)
    background = None
    if background_match:
        pattern = _PATTERN_OF_WORD.get(background_match["pattern"] or "", "plain")
        background = (background_match["colour"], pattern)
        text = text[: background_match.start()] + text[background_match.end() :]
    objects = tuple(
        _ObjectClaim(match["shape"], match["size"], match["colour"], _POSITION_OF_PHRASE.get(match["position"] or ""))
        for match in _OBJECT_PHRASE.finditer(text)
    )
    return _Claim(objects, background)


def caption_utility(caption: str, scene: Scene) -> float:
    """The simulated annotators' noiseless utility of `caption` for `scene`: what they rank captions by."""
    return _utility(claim_of_caption(caption), scene)


def _competition_ranking(scores: np.ndarray, tie_margin: float) -> tuple[int, ...]:
    """Ranks 1.. by descending score; a score within `tie_margin` of its group's best shares the rank.

    A row where everything ties would order no pair, so it keeps the strict order instead.
    """
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranks = [0] * len(scores)
    leader, rank = order[0], 1
    for position, index in enumerate(order):
        if scores[leader] - scores[index] >= tie_margin:
            leader, rank = index, position + 1
        ranks[index] = rank
    if len(set(ranks)) == 1 and tie_margin > 0:
        return _competition_ranking(scores, 0.0)
    return tuple(ranks)


def _noisy_caption(kind: str, scene: Scene, other: Scene, rng: np.random.Generator) -> tuple[str, _Claim] | None:
    """A caption of `kind` for `scene` and what it claims; None when this draw is unusable."""
    if kind == "partial":
        claim = _partial_claim(scene, rng)
        return _vary_surface(_claim_text(claim), rng), claim
    if kind in ("wrong_attribute", "two_wrong_attributes"):
        wrong_scene = perturb_scene(scene, rng)
        if kind == "two_wrong_attributes":
            wrong_scene = perturb_scene(wrong_scene, rng)
        claim = _full_claim(wrong_scene)
        if _assess(claim, scene).wrong != (1 if kind == "wrong_attribute" else 2):
            return None  # the second change undid or overwrote the first
        return clean_caption(wrong_scene, rng), claim
    if kind == "other_image":
        return other_image_caption(scene, rng, other), _full_claim(other)
    if kind == "boilerplate":
        token = _boilerplate_token(rng)
        if rng.random() >= 0.3:
            return token, _Claim()
        claim = _partial_claim(scene, rng)
        separator = (" - ", " | ", " ")[int(rng.integers(3))]
        text = _claim_text(claim)
        return (f"{token}{separator}{text}" if rng.random() < 0.5 else f"{text}{separator}{token}"), claim
    raise ValueError(f"unknown caption source {kind!r}")


def _sample_preference(
    scene: Scene, other: Scene, config: ShapesPreferenceConfig, rng: np.random.Generator
) -> ShapesPreference:
    """Captions from distinct sources for one scene, shuffled, ranked by noisy simulated annotators."""
    extra = config.captions_per_image - 1
    kinds = [_NOISY_SOURCES[int(i)] for i in rng.permutation(len(_NOISY_SOURCES))[:extra]]
    kinds += [_NOISY_SOURCES[int(i)] for i in rng.integers(len(_NOISY_SOURCES), size=extra - len(kinds))]
    captions, sources, claims = [clean_caption(scene, rng)], ["clean"], [_full_claim(scene)]
    seen = {normalise_caption(captions[0])}
    for kind in kinds:
        for _ in range(100):
            drawn = _noisy_caption(kind, scene, other, rng)
            if drawn is not None and normalise_caption(drawn[0]) not in seen:
                break
        else:
            raise RuntimeError(f"no fresh {kind} caption for {describe(scene)!r} in 100 draws")
        seen.add(normalise_caption(drawn[0]))
        captions.append(drawn[0])
        sources.append(kind)
        claims.append(drawn[1])
    order = [int(i) for i in rng.permutation(len(captions))]
    utilities = np.array([_utility(claims[i], scene) for i in order])
    noise = rng.normal(0.0, config.annotator_noise, size=(config.annotators, len(order)))
    judged = (utilities + noise).mean(axis=0)
    return ShapesPreference(
        scene=scene,
        captions=tuple(captions[i] for i in order),
        sources=tuple(sources[i] for i in order),
        utilities=tuple(float(u) for u in utilities),
        ranking=_competition_ranking(judged, config.tie_margin),
    )


def sample_shapes_preferences(config: ShapesPreferenceConfig = ShapesPreferenceConfig()) -> list[ShapesPreference]:
    """Simulated preference rows on distinct shapes-world scenes, none of them a scene of `avoid_pool`."""
    rng = np.random.default_rng([config.seed, PREFERENCE_STREAM])
    taken = pool_scene_keys(config.avoid_pool) if config.avoid_pool is not None else set()
    scenes: list[Scene] = []
    while len(scenes) < config.images:
        scene = sample_scene(rng)
        if scene_key(scene) not in taken:
            taken.add(scene_key(scene))
            scenes.append(scene)
    rows = []
    for index, scene in enumerate(scenes):
        if len(scenes) > 1:
            other = scenes[(index + 1 + int(rng.integers(len(scenes) - 1))) % len(scenes)]
        else:
            other = sample_scene(rng)
            while scene_key(other) == scene_key(scene):
                other = sample_scene(rng)
        rows.append(_sample_preference(scene, other, config, rng))
    return rows


def write_shapes_preferences(out_dir: Path, config: ShapesPreferenceConfig = ShapesPreferenceConfig()) -> Path:
    """Write ``images/pref-NNNNNN.png`` and ``preferences.jsonl`` (paths relative to `out_dir`).

    Each row also carries ``sources``, where each caption came from, for analyses by caption kind.
    Returns the JSONL path.
    """
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for stale in images_dir.glob("pref-*.png"):
        stale.unlink()
    rows = sample_shapes_preferences(config)
    items = []
    for number, row in enumerate(rows):
        name = f"images/pref-{number:06d}.png"
        render_scene(row.scene, config.image_size).save(out_dir / name, format="PNG")
        items.append(PreferenceItem(image=name, captions=row.captions, ranking=row.ranking, row=number + 1))
    return write_preferences(items, out_dir / "preferences.jsonl", [{"sources": list(row.sources)} for row in rows])


def preference_scene_keys(config: ShapesPreferenceConfig) -> set[tuple[str, str, frozenset]]:
    """The scenes a preference set of `config` shows, without rendering it: what other held-out sets avoid."""
    return {scene_key(row.scene) for row in sample_shapes_preferences(config)}
