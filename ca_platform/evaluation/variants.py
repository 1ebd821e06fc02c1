"""Each training variant's models on the same clean held-out set: its CLIP's retrieval recall and its BLIP's
captions, written as one report per variant and evaluation.

The models (torch, transformers) are imported where a variant is evaluated, not with the module: every Dagster
process loads the definitions, and most evaluate nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ca_platform import layout
from ca_platform.evaluation.captions import bleu4, cider_d
from ca_platform.evaluation.evaluation_set import current_evaluation_set
from ca_platform.scoring.registry import current_model
from ca_platform.storage import DataStore, fetch_folder, write_json

if TYPE_CHECKING:
    from ca_platform.evaluation.retrieval import RetrievalRecall


def _checkpoint_folder(store: DataStore, model: str, variant: str, cache: Path, scratch: Path) -> tuple[str, Path]:
    """The current version of `model` trained on `variant`, and its local folder."""
    kind = layout.trained_model_kind(model, variant)
    version = current_model(store, kind, scratch)["version"]
    return version, fetch_folder(store, layout.model_prefix(kind, version), cache)


@dataclass(frozen=True)
class RetrievalEvaluation:
    model_version: str
    recall: RetrievalRecall
    document: dict[str, Any]  # as written to the variant's retrieval report


def evaluate_retrieval(
    store: DataStore, variant: str, batch_size: int, device: str | None, cache: Path, scratch: Path
) -> RetrievalEvaluation:
    """Image->text and text->image Recall@1/5/10 of the variant's CLIP on the current evaluation set (cosine of
    the normalised embeddings; an image counts as found by any of its references), written to its report."""
    from ca_platform.evaluation.retrieval import cosine_similarity_matrix, retrieval_recall
    from ca_platform.models.clip import embed_pairs
    from ca_platform.training.clip import load_trained_clip

    evaluation_version, dataset = current_evaluation_set(store, cache, scratch)
    version, folder = _checkpoint_folder(store, layout.CLIP_CHECKPOINT, variant, cache, scratch)
    model, preprocessor = load_trained_clip(folder, device=device)
    captions, owner = dataset.captions
    images, texts = embed_pairs(model, preprocessor, dataset.images, captions, batch_size=batch_size, device=device)
    recall = retrieval_recall(cosine_similarity_matrix(images, texts), owner)
    document = {
        "variant": variant,
        "model_version": version,
        "evaluation_version": evaluation_version,
        "images_not_downloaded": dataset.not_downloaded,
        **recall.as_json(),
    }
    write_json(store, layout.variant_report_key(layout.RETRIEVAL_REPORT, variant), document, scratch)
    return RetrievalEvaluation(version, recall, document)


@dataclass(frozen=True)
class CaptioningEvaluation:
    model_version: str
    cider: float
    bleu4: float
    examples: list[tuple[str, str]]  # (a reference, the generated caption) of the first few images
    document: dict[str, Any]  # as written to the variant's captioning report


def evaluate_captioning(
    store: DataStore,
    variant: str,
    batch_size: int,
    max_new_tokens: int,
    device: str | None,
    cache: Path,
    scratch: Path,
) -> CaptioningEvaluation:
    """CIDEr-D and BLEU-4 (coco-caption's definitions, in Python) of the variant's BLIP captions, greedy
    decoding, against every reference of each evaluation image; written to its report."""
    from ca_platform.models.blip import generate_captions
    from ca_platform.training.captioner import load_trained_captioner

    evaluation_version, dataset = current_evaluation_set(store, cache, scratch)
    version, folder = _checkpoint_folder(store, layout.BLIP_CHECKPOINT, variant, cache, scratch)
    model, preprocessor = load_trained_captioner(folder, device=device)
    generated = generate_captions(
        model, preprocessor, dataset.images, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device
    )
    candidates = dict(zip(dataset.uids, generated))
    references = dict(zip(dataset.uids, dataset.references))
    cider, bleu = cider_d(candidates, references), bleu4(candidates, references)
    document = {
        "variant": variant,
        "model_version": version,
        "evaluation_version": evaluation_version,
        "images_not_downloaded": dataset.not_downloaded,
        "cider": cider.score,
        "bleu4": bleu.score,
        "captions": candidates,
    }
    write_json(store, layout.variant_report_key(layout.CAPTIONING_REPORT, variant), document, scratch)
    examples = [(r[0], g) for r, g in zip(dataset.references[:5], generated[:5])]
    return CaptioningEvaluation(version, cider.score, bleu.score, examples, document)
