"""Recall@K on hand-ranked similarity matrices: several captions per image, pessimistic ties, bad shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ca_platform.evaluation.retrieval import RetrievalRecall, cosine_similarity_matrix, retrieval_hits, retrieval_recall

# 4 images, 6 captions; caption j describes image CAPTION_IMAGE[j].
CAPTION_IMAGE = [0, 0, 1, 2, 2, 3]
SIMILARITY = np.array(
    [
        # c0   c1   c2   c3   c4   c5
        [0.9, 0.1, 0.5, 0.2, 0.3, 0.4],  # image 0, right {c0, c1}: best c0 0.9, no wrong caption >= 0.9 -> rank 0
        [0.6, 0.2, 0.5, 0.7, 0.1, 0.3],  # image 1, right {c2} 0.5: wrong c0 0.6, c3 0.7 ahead -> rank 2
        [0.1, 0.8, 0.3, 0.2, 0.7, 0.0],  # image 2, right {c3, c4}: best c4 0.7, wrong c1 0.8 ahead -> rank 1
        [0.4, 0.4, 0.4, 0.4, 0.4, 0.4],  # image 3, right {c5} 0.4: all 5 wrong captions tie, ahead -> rank 5
    ]
)
# i2t ranks [0, 2, 1, 5]: R@1 = 1/4, R@5 = 3/4, R@10 = 4/4.
# t2i, per column (own image's score vs wrong images scoring >= it):
#   c0 own 0.9, none -> 0;   c1 own 0.1, images 1 (0.2), 2 (0.8), 3 (0.4) -> 3;   c2 own 0.5, image 0 ties -> 1;
#   c3 own 0.2, image 0 ties, 1 (0.7), 3 (0.4) -> 3;   c4 own 0.7, none -> 0;   c5 own 0.4, image 0 ties -> 1.
# t2i ranks [0, 3, 1, 3, 0, 1]: R@1 = 2/6, R@5 = 6/6, R@10 = 6/6.
EXPECTED = RetrievalRecall(
    i2t_r1=1 / 4, i2t_r5=3 / 4, i2t_r10=1.0, t2i_r1=2 / 6, t2i_r5=1.0, t2i_r10=1.0, num_images=4, num_captions=6
)


def test_several_captions_per_image_and_ties_ranked_pessimistically() -> None:
    assert retrieval_recall(SIMILARITY, CAPTION_IMAGE) == EXPECTED


def test_hits_per_image_are_what_the_recall_is_made_of() -> None:
    # i2t ranks [0, 2, 1, 5]; t2i ranks [0, 3, 1, 3, 0, 1] for captions of images [0, 0, 1, 2, 2, 3].
    hits = retrieval_hits(SIMILARITY, CAPTION_IMAGE)
    assert hits.i2t[1].tolist() == [True, False, False, False] and hits.i2t[5].tolist() == [True, True, True, False]
    assert hits.t2i[1].tolist() == [1, 0, 1, 0] and hits.t2i[5].tolist() == [2, 1, 2, 1]  # captions within K
    assert hits.captions.tolist() == [2, 1, 2, 1]
    assert hits.recall() == EXPECTED


def test_torch_tensors_in_any_float_dtype_give_the_same_recall() -> None:
    for dtype in (torch.float32, torch.float64):
        result = retrieval_recall(torch.tensor(SIMILARITY, dtype=dtype), torch.tensor(CAPTION_IMAGE))
        assert result == EXPECTED
    # bfloat16 rounds 0.9/0.8/0.7/0.6 etc. differently, but keeps their order and ties.
    assert retrieval_recall(torch.tensor(SIMILARITY).bfloat16(), torch.tensor(CAPTION_IMAGE)) == EXPECTED


def test_recall_at_1_5_10_on_a_staircase() -> None:
    # 12 images, one caption each. Image i's own caption scores 0.5; a wrong caption j scores 1 when j > i and 0
    # when j < i. t2i: caption j is beaten by the images i < j -> rank j, so R@K = K/12 (j < K).
    # i2t: image i is beaten by captions j > i -> rank 11 - i, so also R@K = K/12 (i > 11 - K).
    n = 12
    similarity = np.triu(np.ones((n, n)), k=1) + 0.5 * np.eye(n)
    result = retrieval_recall(similarity, np.arange(n))
    assert (result.i2t_r1, result.i2t_r5, result.i2t_r10) == pytest.approx((1 / 12, 5 / 12, 10 / 12))
    assert (result.t2i_r1, result.t2i_r5, result.t2i_r10) == pytest.approx((1 / 12, 5 / 12, 10 / 12))


def test_a_constant_model_does_not_get_perfect_recall() -> None:
    # 12 images x 2 captions, every score 0. t2i: 11 wrong images tie ahead of the own one -> rank 11, never
    # within 10. i2t: 22 wrong captions tie ahead of both right ones -> rank 22.
    result = retrieval_recall(np.zeros((12, 24)), np.repeat(np.arange(12), 2))
    assert result.as_json() == {
        "i2t_r1": 0.0,
        "i2t_r5": 0.0,
        "i2t_r10": 0.0,
        "t2i_r1": 0.0,
        "t2i_r5": 0.0,
        "t2i_r10": 0.0,
        "num_images": 12,
        "num_captions": 24,
    }


def test_a_perfect_model_with_several_captions_per_image() -> None:
    caption_image = np.repeat(np.arange(20), 5)
    similarity = (caption_image[None, :] == np.arange(20)[:, None]).astype(np.float32)
    result = retrieval_recall(similarity, caption_image)
    assert (result.i2t_r1, result.t2i_r1) == (1.0, 1.0)


def test_cosine_similarity_matrix_normalises_both_sides() -> None:
    images = np.array([[3.0, 0.0], [1.0, 1.0]])
    texts = torch.tensor([[0.0, 2.0], [5.0, 5.0], [-1.0, 0.0]])
    expected = np.array([[0.0, 1 / np.sqrt(2), -1.0], [1 / np.sqrt(2), 1.0, -1 / np.sqrt(2)]])
    np.testing.assert_allclose(cosine_similarity_matrix(images, texts), expected, atol=1e-6)


def test_cosine_similarity_matrix_rejects_zero_vectors_and_width_mismatch() -> None:
    with pytest.raises(ValueError, match=r"text_embeddings rows \[1\]"):
        cosine_similarity_matrix(np.ones((2, 3)), np.array([[1.0, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="widths differ: images 3, texts 4"):
        cosine_similarity_matrix(np.ones((2, 3)), np.ones((2, 4)))


@pytest.mark.parametrize(
    ("similarity", "caption_image", "message"),
    [
        (np.zeros(3), [0, 1, 2], "non-empty 2-D"),
        (np.zeros((2, 3)), [0, 1], r"one image index per caption \(3 similarity columns\)"),
        (np.zeros((2, 3)), [0, 1, 2], "caption 2 names image 2, outside 0..1"),
        (np.zeros((3, 3)), [0, 0, 2], r"images \[1\] have no caption"),
        (np.array([[0.0, 1.0], [np.nan, 0.0]]), [0, 1], r"NaN at \(image, caption\) \(1, 0\)"),
    ],
)
def test_bad_shapes_and_indices_are_named(similarity: np.ndarray, caption_image: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        retrieval_recall(similarity, caption_image)


def test_caption_image_must_be_integers() -> None:
    with pytest.raises(TypeError, match="integer image indices"):
        retrieval_recall(np.zeros((2, 2)), [0.0, 1.0])
