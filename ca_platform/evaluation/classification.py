"""Zero-shot classification as CLIP and DataComp report it: top-1 and top-5 accuracy from embeddings.

Each class is a text embedding: its name in every prompt template ("a photo of a {}."), each prompt's embedding
normalised, their mean normalised again (CLIP's prompt ensembling). An image is classified by the cosine of its
normalised embedding with every class. Ties are broken pessimistically as in retrieval (a wrong class tied with
the right one ranks ahead of it), so a constant model scores chance or worse, never perfect; with fewer classes
than K every image is right at K, as any ranking holds every class in its top K.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ca_platform.evaluation.retrieval import ArrayLike, cosine_similarity_matrix, unit_rows

TOP_K = (1, 5)
PLACEHOLDER = "{}"


class TemplateError(ValueError):
    """A prompt template that does not hold the class name's place exactly once."""


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """The templates, each with exactly one `{}` where the class name goes; at least one."""
    if not templates:
        raise TemplateError("no prompt templates: give at least one, e.g. 'a photo of a {}.'")
    bad = [t for t in templates if t.count(PLACEHOLDER) != 1 or t.replace(PLACEHOLDER, "").count("{") > 0]
    if bad:
        raise TemplateError(f"prompt templates {bad} must each hold '{{}}' exactly once (where the class name goes)")
    return tuple(templates)


def class_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every class's name in every template, class after class (the order `class_embeddings` reads)."""
    checked = check_templates(templates)
    return [template.replace(PLACEHOLDER, name) for name in class_names for template in checked]


def class_embeddings(prompt_embeddings: ArrayLike, classes: int) -> np.ndarray:
    """[classes, d]: per class the normalised mean of its templates' normalised prompt embeddings, from the
    [classes * templates, d] embeddings of `class_prompts`."""
    prompts = np.asarray(prompt_embeddings, dtype=np.float64)  # float32 CPU tensors, as embed_pairs gives
    if prompts.ndim != 2 or classes < 1 or prompts.shape[0] % classes:
        raise ValueError(f"{prompts.shape} prompt embeddings are not `templates` rows for each of {classes} classes")
    unit = unit_rows(prompts, "prompt_embeddings")
    mean = unit.reshape(classes, prompts.shape[0] // classes, prompts.shape[1]).mean(axis=1)
    return unit_rows(mean, "class embeddings (templates' mean)")


@dataclass(frozen=True)
class ZeroShotAccuracy:
    """Fractions of images whose class is within the top K, with every image's outcome (for intervals later)."""

    top1: float
    top5: float
    correct: dict[int, np.ndarray]  # K -> bool per image
    predicted: np.ndarray  # per image the top-ranked class (lowest index among ties)
    num_images: int
    num_classes: int


def zero_shot_accuracy(image_embeddings: ArrayLike, class_embedding: ArrayLike, labels: ArrayLike) -> ZeroShotAccuracy:
    """Top-1 and top-5 accuracy of classifying each image as its most similar class; `labels[i]` is the index
    (into the classes' rows) of image i's class."""
    similarity = cosine_similarity_matrix(image_embeddings, class_embedding)
    truth = np.asarray(labels)
    if truth.shape != (similarity.shape[0],) or not np.issubdtype(truth.dtype, np.integer):
        raise ValueError(f"labels must be one integer class index per image ({similarity.shape[0]}), got {truth.shape}")
    outside = np.flatnonzero((truth < 0) | (truth >= similarity.shape[1]))
    if outside.size:
        i = int(outside[0])
        raise ValueError(f"image {i} has class {int(truth[i])}, outside 0..{similarity.shape[1] - 1}")
    if truth.size == 0:
        raise ValueError("no images to classify")
    own = similarity[np.arange(similarity.shape[0]), truth]
    rank = (similarity >= own[:, None]).sum(axis=1) - 1  # the classes at least as similar as its own, but its own
    correct = {k: rank < k for k in TOP_K}
    return ZeroShotAccuracy(
        top1=float(correct[1].mean()),
        top5=float(correct[5].mean()),
        correct=correct,
        predicted=similarity.argmax(axis=1),
        num_images=similarity.shape[0],
        num_classes=similarity.shape[1],
    )
