"""Each training variant's models on the same clean held-out set: its CLIP's retrieval recall and its BLIP's
captions, written as one report per variant and evaluation.

The models (torch, transformers) are imported where a variant is evaluated, not with the module: every Dagster
process loads the definitions, and most evaluate nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ca_platform import layout
from ca_platform.evaluation.captions import bleu4, cider_d
from ca_platform.evaluation.evaluation_set import current_evaluation_set
from ca_platform.evaluation.intervals import BLEU4, RATIO
from ca_platform.scoring.registry import current_model
from ca_platform.storage import DataStore, fetch_folder, write_json

if TYPE_CHECKING:
    from ca_platform.evaluation.retrieval import RetrievalHits, RetrievalRecall


def _checkpoint_folder(
    store: DataStore, model: str, variant: str, seed: int, cache: Path, scratch: Path
) -> tuple[str, Path]:
    """The current version of `model` trained on `variant` with `seed`, and its local folder."""
    kind = layout.trained_model_kind(model, variant, seed)
    version = current_model(store, kind, scratch)["version"]
    return version, fetch_folder(store, layout.model_prefix(kind, version), cache)


def across_seeds(per_seed: Mapping[int, Mapping[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Each metric's mean over the seeds' models and its spread (sample standard deviation; 0 for one seed), so a
    report can tell a difference between variants from the noise of training."""
    names = next(iter(per_seed.values())).keys()
    values = {name: np.array([float(metrics[name]) for metrics in per_seed.values()]) for name in names}
    mean = {name: float(v.mean()) for name, v in values.items()}
    spread = {name: float(v.std(ddof=1)) if v.size > 1 else 0.0 for name, v in values.items()}
    return mean, spread


def _seeded_document(
    variant: str,
    versions: Mapping[int, str],
    per_seed: Mapping[int, Mapping[str, float]],
    items: Sequence[str],
    per_item: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """What every variant report holds: the models evaluated (one per seed), each figure's mean over seeds with
    its spread and every seed's figures, and each item's outcome per seed in `items` order."""
    mean, spread = across_seeds(per_seed)
    first = next(iter(versions))
    return {
        "variant": variant,
        "model_version": versions[first],
        "model_versions": {str(seed): version for seed, version in versions.items()},
        **mean,
        "spread": spread,
        "per_seed": {str(seed): metrics for seed, metrics in per_seed.items()},
        "items": list(items),
        "per_item": per_item,
    }


@dataclass(frozen=True)
class RetrievalEvaluation:
    model_versions: dict[int, str]  # seed -> the CLIP evaluated
    recall: RetrievalRecall  # of the first seed's model
    document: dict[str, Any]  # as written to the variant's retrieval report: means over seeds, spreads, per seed


RETRIEVAL_METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
# How the per-item results of a report make its figures (intervals.item_tables); a metric not named here is the
# mean of one value per item. Text->image recall pools each image's captions: (hits, captions) per image.
RETRIEVAL_ITEM_STATISTICS = {f"t2i_r{k}": RATIO for k in (1, 5, 10)}
CAPTIONING_ITEM_STATISTICS = {"bleu4": BLEU4}  # pooled n-gram counts per image (captions.BLEU_STATISTICS)


def _retrieval_per_item(hits: RetrievalHits) -> dict[str, list[Any]]:
    """Per image: 0/1 for image->text, [hits, captions] for text->image, at each K."""
    per_item: dict[str, list[Any]] = {f"i2t_r{k}": hit.astype(int).tolist() for k, hit in hits.i2t.items()}
    for k, found in hits.t2i.items():
        per_item[f"t2i_r{k}"] = np.stack([found, hits.captions], axis=1).tolist()
    return {name: per_item[name] for name in RETRIEVAL_METRICS}


def evaluate_retrieval(
    store: DataStore,
    variant: str,
    seeds: Sequence[int],
    batch_size: int,
    device: str | None,
    cache: Path,
    scratch: Path,
) -> RetrievalEvaluation:
    """Image->text and text->image Recall@1/5/10 of the variant's CLIP of each seed on the current evaluation set
    (cosine of the normalised embeddings; an image counts as found by any of its references), written to its
    report as the mean over seeds with each metric's spread, every seed's figures and each image's hits (for the
    report's intervals over images)."""
    from ca_platform.evaluation.retrieval import cosine_similarity_matrix, retrieval_hits
    from ca_platform.models.clip import embed_pairs
    from ca_platform.training.clip import load_trained_clip

    evaluation_version, dataset = current_evaluation_set(store, cache, scratch)
    captions, owner = dataset.captions
    versions, recalls, per_item = {}, {}, {}
    for seed in seeds:
        versions[seed], folder = _checkpoint_folder(store, layout.CLIP_CHECKPOINT, variant, seed, cache, scratch)
        model, preprocessor = load_trained_clip(folder, device=device)
        images, texts = embed_pairs(model, preprocessor, dataset.images, captions, batch_size=batch_size, device=device)
        hits = retrieval_hits(cosine_similarity_matrix(images, texts), owner)
        recalls[seed], per_item[str(seed)] = hits.recall(), _retrieval_per_item(hits)
    per_seed = {seed: {name: getattr(r, name) for name in RETRIEVAL_METRICS} for seed, r in recalls.items()}
    first = recalls[seeds[0]]
    document = {
        **_seeded_document(variant, versions, per_seed, dataset.uids, per_item),
        "evaluation_version": evaluation_version,
        "images_not_downloaded": dataset.not_downloaded,
        "num_images": first.num_images,
        "num_captions": first.num_captions,
        "item_statistics": RETRIEVAL_ITEM_STATISTICS,
    }
    write_json(store, layout.variant_report_key(layout.RETRIEVAL_REPORT, variant), document, scratch)
    return RetrievalEvaluation(versions, first, document)


@dataclass(frozen=True)
class CaptioningEvaluation:
    model_versions: dict[int, str]  # seed -> the BLIP evaluated
    cider: float  # mean over seeds
    bleu4: float
    examples: list[tuple[str, str]]  # (a reference, the first seed's caption) of the first few images
    document: dict[str, Any]  # as written to the variant's captioning report


def evaluate_captioning(
    store: DataStore,
    variant: str,
    seeds: Sequence[int],
    batch_size: int,
    max_new_tokens: int,
    device: str | None,
    cache: Path,
    scratch: Path,
) -> CaptioningEvaluation:
    """CIDEr-D and BLEU-4 (coco-caption's definitions, in Python) of the variant's BLIP of each seed, greedy
    decoding, against every reference of each evaluation image; written to its report as the mean over seeds
    with the spread, every seed's scores with each image's share of them (for the report's intervals over images)
    and the first seed's captions."""
    from ca_platform.models.blip import generate_captions
    from ca_platform.training.captioner import load_trained_captioner

    evaluation_version, dataset = current_evaluation_set(store, cache, scratch)
    references = dict(zip(dataset.uids, dataset.references))
    versions, per_seed, captions, per_item = {}, {}, {}, {}
    for seed in seeds:
        versions[seed], folder = _checkpoint_folder(store, layout.BLIP_CHECKPOINT, variant, seed, cache, scratch)
        model, preprocessor = load_trained_captioner(folder, device=device)
        generated = generate_captions(
            model, preprocessor, dataset.images, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device
        )
        captions[seed] = dict(zip(dataset.uids, generated))
        cider, bleu = cider_d(captions[seed], references), bleu4(captions[seed], references)
        per_seed[seed] = {"cider": cider.score, "bleu4": bleu.score}
        per_item[str(seed)] = {
            "cider": [cider.per_item[uid] for uid in dataset.uids],  # CIDEr-D is the mean of these
            "bleu4": [list(bleu.statistics[uid]) for uid in dataset.uids],
        }
    first = captions[seeds[0]]
    document = {
        **_seeded_document(variant, versions, per_seed, dataset.uids, per_item),
        "evaluation_version": evaluation_version,
        "images_not_downloaded": dataset.not_downloaded,
        "item_statistics": CAPTIONING_ITEM_STATISTICS,
        "captions": first,
    }
    write_json(store, layout.variant_report_key(layout.CAPTIONING_REPORT, variant), document, scratch)
    examples = [(refs[0], first[uid]) for uid, refs in list(references.items())[:5]]
    return CaptioningEvaluation(versions, document["cider"], document["bleu4"], examples, document)


@dataclass(frozen=True)
class ClassificationEvaluation:
    model_versions: dict[int, str]  # seed -> the CLIP evaluated
    document: dict[str, Any]  # as written to the variant's classification report


def evaluate_classification(
    store: DataStore,
    variant: str,
    seeds: Sequence[int],
    templates: Sequence[str],
    batch_size: int,
    device: str | None,
    cache: Path,
    scratch: Path,
) -> ClassificationEvaluation:
    """Zero-shot top-1 and top-5 accuracy of the variant's CLIP of each seed on the current labelled set (each
    class the normalised mean of its names in every template), written to its report as the mean over seeds
    with the spread, every seed's figures, each class's top-1 and every image's outcome per seed (`items`,
    `per_item`: what an interval over the images is computed from)."""
    from ca_platform.evaluation.classification import class_embeddings, class_prompts, zero_shot_accuracy
    from ca_platform.evaluation.classification_set import current_classification_set
    from ca_platform.models.clip import embed_pairs
    from ca_platform.training.clip import load_trained_clip

    classification_version, dataset = current_classification_set(store, cache, scratch)
    prompts = class_prompts(dataset.class_names, templates)
    versions, per_seed, per_item, right = {}, {}, {}, {}
    for seed in seeds:
        versions[seed], folder = _checkpoint_folder(store, layout.CLIP_CHECKPOINT, variant, seed, cache, scratch)
        model, preprocessor = load_trained_clip(folder, device=device)
        images, texts = embed_pairs(model, preprocessor, dataset.images, prompts, batch_size=batch_size, device=device)
        accuracy = zero_shot_accuracy(images, class_embeddings(texts, len(dataset.class_names)), dataset.classes)
        per_seed[seed] = {"top1": accuracy.top1, "top5": accuracy.top5}
        per_item[str(seed)] = {f"top{k}": correct.astype(int).tolist() for k, correct in accuracy.correct.items()}
        right[seed] = accuracy.correct[1]
    classes = np.asarray(dataset.classes)
    top1 = np.mean([right[seed] for seed in seeds], axis=0)  # per image, over seeds
    document = {
        **_seeded_document(variant, versions, per_seed, dataset.uids, per_item),
        "classification_version": classification_version,
        "images_not_downloaded": dataset.not_downloaded,
        "num_images": len(dataset.uids),
        "num_classes": len(dataset.class_names),
        "templates": list(templates),
        "per_class": {
            name: {"images": int((classes == c).sum()), "top1": float(top1[classes == c].mean())}
            for c, name in enumerate(dataset.class_names)
            if (classes == c).any()
        },
    }
    write_json(store, layout.variant_report_key(layout.CLASSIFICATION_REPORT, variant), document, scratch)
    return ClassificationEvaluation(versions, document)
