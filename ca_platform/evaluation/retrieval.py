"""Image-text retrieval Recall@K (K = 1, 5, 10) as COCO and Flickr30K report it, from a similarity matrix.

`similarity[i, j]` scores image i against caption j, and caption j describes image `caption_image[j]`; an
image may have several captions. Image->text retrieval hits at K when any of the image's captions is among
its top K; text->image retrieval hits at K when the caption's own image is among its top K. Ties are broken
pessimistically (a wrong item tied with a right one ranks ahead of it), so the result does not depend on
sort stability and a constant model cannot score perfect recall.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

RECALL_AT = (1, 5, 10)

ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]


@dataclass(frozen=True)
class RetrievalRecall:
    """Fractions in [0, 1] of queries whose right answer is within the top K."""

    i2t_r1: float
    i2t_r5: float
    i2t_r10: float
    t2i_r1: float
    t2i_r5: float
    t2i_r10: float
    num_images: int
    num_captions: int

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _as_numpy(values: ArrayLike, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.dtype in (torch.float16, torch.bfloat16):
            values = values.float()  # numpy has no bfloat16; float32 holds both exactly
        values = values.numpy()
    array = np.asarray(values)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    return array


def cosine_similarity_matrix(image_embeddings: ArrayLike, text_embeddings: ArrayLike) -> np.ndarray:
    """`[i, j]` = cosine of image i and text j: both sides are L2-normalised here, so raw embeddings are fine."""
    images = _as_numpy(image_embeddings, "image_embeddings")
    texts = _as_numpy(text_embeddings, "text_embeddings")
    for name, array in (("image_embeddings", images), ("text_embeddings", texts)):
        if array.ndim != 2:
            raise ValueError(f"{name} must be 2-D (rows, dim), got shape {array.shape}")
    if images.shape[1] != texts.shape[1]:
        raise ValueError(f"embedding widths differ: images {images.shape[1]}, texts {texts.shape[1]}")
    dtype = np.result_type(images.dtype, texts.dtype, np.float32)
    return unit_rows(images.astype(dtype), "image_embeddings") @ unit_rows(texts.astype(dtype), "text_embeddings").T


def unit_rows(array: np.ndarray, name: str) -> np.ndarray:
    """Each row L2-normalised; a row of zero or non-finite norm (no direction to compare) is an error naming
    `name` and the rows."""
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    bad = np.flatnonzero(~(np.isfinite(norms[:, 0]) & (norms[:, 0] > 0)))
    if bad.size:
        raise ValueError(f"{name} rows {bad[:10].tolist()} have zero or non-finite norm; cosine is undefined")
    return array / norms


@dataclass(frozen=True)
class RetrievalHits:
    """Per image, what the recall figures are made of, so an interval can resample images: whether it found one
    of its captions within K (image->text), and how many of its captions found it within K (text->image).

    Text->image hits are counted per image rather than per caption because an image's captions share the image
    and its embedding: resampling captions one by one would treat them as independent and narrow the interval.
    """

    i2t: dict[int, np.ndarray]  # K -> bool per image
    t2i: dict[int, np.ndarray]  # K -> per image, its captions that ranked it within K
    captions: np.ndarray  # per image, its caption count

    def recall(self) -> RetrievalRecall:
        i2t = [float(np.mean(self.i2t[k])) for k in RECALL_AT]
        t2i = [float(self.t2i[k].sum() / self.captions.sum()) for k in RECALL_AT]
        return RetrievalRecall(*i2t, *t2i, num_images=self.captions.size, num_captions=int(self.captions.sum()))


def retrieval_hits(similarity: ArrayLike, caption_image: ArrayLike) -> RetrievalHits:
    """Each image's hits at K = 1, 5, 10 both ways; `caption_image[j]` is the index of the image caption j
    describes."""
    scores, owners = _checked(similarity, caption_image)
    i2t = _image_to_text_ranks(scores, owners)
    t2i = _text_to_image_ranks(scores, owners)
    images = scores.shape[0]
    return RetrievalHits(
        i2t={k: i2t < k for k in RECALL_AT},
        t2i={k: np.bincount(owners, weights=t2i < k, minlength=images).astype(np.int64) for k in RECALL_AT},
        captions=np.bincount(owners, minlength=images),
    )


def retrieval_recall(similarity: ArrayLike, caption_image: ArrayLike) -> RetrievalRecall:
    """Recall@1/5/10 both ways; `caption_image[j]` is the index of the image caption j describes."""
    return retrieval_hits(similarity, caption_image).recall()


def _checked(similarity: ArrayLike, caption_image: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    scores = _as_numpy(similarity, "similarity")
    owners = _as_numpy(caption_image, "caption_image")
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"similarity must be a non-empty 2-D (images, captions) matrix, got shape {scores.shape}")
    if owners.shape != (scores.shape[1],):
        raise ValueError(
            f"caption_image must be 1-D with one image index per caption ({scores.shape[1]} similarity columns), "
            f"got shape {owners.shape}"
        )
    if not np.issubdtype(owners.dtype, np.integer):
        raise TypeError(f"caption_image must hold integer image indices, got dtype {owners.dtype}")
    outside = np.flatnonzero((owners < 0) | (owners >= scores.shape[0]))
    if outside.size:
        j = int(outside[0])
        raise ValueError(f"caption {j} names image {int(owners[j])}, outside 0..{scores.shape[0] - 1}")
    uncaptioned = np.flatnonzero(np.bincount(owners, minlength=scores.shape[0]) == 0)
    if uncaptioned.size:
        raise ValueError(
            f"images {uncaptioned[:10].tolist()} have no caption, so image->text recall is undefined for them"
        )
    nan = np.argwhere(np.isnan(scores)) if np.issubdtype(scores.dtype, np.floating) else np.empty((0, 2))
    if len(nan):
        raise ValueError(f"similarity has NaN at (image, caption) {tuple(int(x) for x in nan[0])}")
    return scores, owners.astype(np.intp)


def _text_to_image_ranks(scores: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """Per caption: the images scored at least as high as its own, other than its own (0 = retrieved first)."""
    own = scores[owners, np.arange(scores.shape[1])]
    return (scores >= own[None, :]).sum(axis=0) - 1


def _image_to_text_ranks(scores: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """Per image: the wrong captions scored at least as high as its best right caption."""
    own = scores[owners, np.arange(scores.shape[1])]
    best = np.full(scores.shape[0], -np.inf)
    np.maximum.at(best, owners, own)
    right_at_best = np.bincount(owners[own >= best[owners]], minlength=scores.shape[0])
    return (scores >= best[:, None]).sum(axis=1) - right_at_best
