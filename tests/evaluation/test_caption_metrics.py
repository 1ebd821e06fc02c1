"""CIDEr-D and BLEU-4 against numbers worked out by hand from coco-caption's formulas.

Every expected number below was also cross-checked once (outside the suite, pycocoevalcap is not a
dependency) by running pycocoevalcap 1.2's `Cider` and `Bleu(4)` on the same captions pre-tokenized by
`caption_tokens`: corpus and per-item scores agreed to 1e-12, as they did on 400 random small corpora.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from ca_platform.evaluation.captions import CorpusScore, bleu4, caption_tokens, cider_d

# CIDEr-D worked example: two images, two references each (raw text, so the tokenizer is exercised too).
CIDER_REFERENCES = {"A": ["A cat.", "A black cat!"], "B": ["A dog", "a dog runs."]}
# Two images, so the idf of an n-gram is log(2) - log(df): "a" is in both images' references (df 2) and weighs 0;
# every other n-gram, and any n-gram absent from all references (df taken as 1), weighs L = log 2.
# Each (candidate, reference) pair contributes its per-order cosines (orders 1..4) times the length penalty
# g(d) = exp(-d^2 / (2 * 6^2)); an item scores 10 * (sum over references of the order cosines) / 4 / #references.
G1 = math.exp(-1 / 72)  # penalty for a length difference of one word
SQRT2 = math.sqrt(2)
# A "a cat": 1-grams {a: 0, cat: L}, 2-grams {a cat: L}; norms L, L, 0, 0.
#   vs "a cat": identical -> cosines [1, 1, 0, 0], same length.
#   vs "a black cat": 1-grams {a: 0, black: L, cat: L} (norm L*sqrt2) -> cat gives L*L / (L * L*sqrt2) = 1/sqrt2;
#     "a cat" is not one of its 2-grams -> 0; the candidate has no 3-grams -> 0. One word longer: times G1.
SCORE_A = 10 * ((1 + 1) + G1 / SQRT2) / 4 / 2
# B "dog runs": 1-grams {dog: L, runs: L} (norm L*sqrt2), 2-grams {dog runs: L}.
#   vs "a dog": 1-grams {a: 0, dog: L} -> L*L / (L*sqrt2 * L) = 1/sqrt2; no 2-gram shared; same length.
#   vs "a dog runs": 1-grams {a: 0, dog: L, runs: L} -> 2L^2 / (L*sqrt2)^2 = 1; 2-grams {a dog: L, dog runs: L}
#     -> L*L / (L * L*sqrt2) = 1/sqrt2; one word longer: times G1.
SCORE_B = 10 * (1 / SQRT2 + G1 * (1 + 1 / SQRT2)) / 4 / 2


def test_cider_d_worked_example() -> None:
    result = cider_d({"A": "a cat", "B": "Dog runs"}, CIDER_REFERENCES)
    assert result.per_item == pytest.approx({"A": SCORE_A, "B": SCORE_B}, rel=1e-12)
    assert result.score == pytest.approx((SCORE_A + SCORE_B) / 2, rel=1e-12)
    assert (SCORE_A, SCORE_B) == pytest.approx((3.3716922, 2.9883346), abs=1e-7)


def test_cider_d_clips_repeated_words_to_the_reference_count() -> None:
    # "cat cat": 1-grams {cat: 2L} (norm 2L), 2-grams {cat cat: L}. Clipping counts min(2L, L) * L = L^2,
    # not 2L * L: vs "a cat" (norm L) -> L^2 / (2L * L) = 1/2; vs "a black cat" (norm L*sqrt2) -> 1/(2*sqrt2) * G1.
    result = cider_d({"A": "cat cat", "B": "dog runs"}, CIDER_REFERENCES)
    assert result.per_item["A"] == pytest.approx(10 * (1 / 2 + G1 / (2 * SQRT2)) / 4 / 2, rel=1e-12)
    assert result.per_item["B"] == pytest.approx(SCORE_B, rel=1e-12)  # idf depends on references only


def test_cider_d_identical_captions_reach_the_maximum_of_ten() -> None:
    # Every reference equals the candidate and every order has an n-gram unique to its image, so all four cosines
    # are 1 with no length penalty: 10 * 4 / 4. No candidate can score more (each clipped cosine is <= 1).
    captions = {1: "a red car parked on the street", 2: "two dogs play in the snow", 3: "a man rides a horse"}
    references = {item: [caption, caption.upper()] for item, caption in captions.items()}
    result = cider_d(captions, references)
    assert result.score == pytest.approx(10.0, rel=1e-12)
    assert all(score == pytest.approx(10.0, rel=1e-12) for score in result.per_item.values())
    others = cider_d({1: "a man rides a horse", 2: "a red car", 3: "the snow"}, references)
    assert all(score < 10.0 for score in others.per_item.values())


def test_cider_d_is_zero_without_shared_ngrams_and_for_a_one_image_corpus() -> None:
    assert cider_d({"A": "zebra giraffe", "B": "dog runs"}, CIDER_REFERENCES).per_item["A"] == 0.0
    assert cider_d({"A": "", "B": "dog runs"}, CIDER_REFERENCES).per_item["A"] == 0.0
    # One image: every reference n-gram has df 1 = the corpus size, so every idf is log(1) - log(1) = 0.
    assert cider_d({"A": "a cat"}, {"A": ["a cat"]}).score == 0.0


# BLEU-4 worked example: two images with two references each.
BLEU_CANDIDATES = {1: "A man rides a horse", 2: "two dogs play in the snow"}
BLEU_REFERENCES = {
    1: ["A man rides a brown horse.", "A man is riding a horse"],
    2: ["Two dogs play in snow", "Dogs are playing in the snow."],
}
# Image 1, "a man rides a horse" (5 words; references 6 and 6 words -> closest 6):
#   1-grams: a x2 (refs hold "a" twice), man, rides, horse -> 5/5;  2-grams: a man, man rides, rides a (ref 1),
#   a horse (ref 2) -> 4/4;  3-grams: a man rides, man rides a match, rides a horse does not -> 2/3;
#   4-grams: a man rides a matches, man rides a horse does not -> 1/2.
# Image 2, "two dogs play in the snow" (6 words; references 5 and 6 -> closest 6):
#   1-grams 6/6;  2-grams: two dogs, dogs play, play in (ref 1), in the, the snow (ref 2) -> 5/5;
#   3-grams: two dogs play, dogs play in (ref 1), in the snow (ref 2); play in the is in neither -> 3/4;
#   4-grams: two dogs play in (ref 1) only -> 1/3.
# Corpus: precisions 11/11, 9/9, 5/7, 2/5; length 11 against 12 -> brevity penalty exp(1 - 12/11).
BLEU_CORPUS = (1 * 1 * (5 / 7) * (2 / 5)) ** (1 / 4) * math.exp(1 - 12 / 11)
BLEU_ITEM_1 = (1 * 1 * (2 / 3) * (1 / 2)) ** (1 / 4) * math.exp(1 - 6 / 5)
BLEU_ITEM_2 = (1 * 1 * (3 / 4) * (1 / 3)) ** (1 / 4)


def test_bleu4_worked_example() -> None:
    result = bleu4(BLEU_CANDIDATES, BLEU_REFERENCES)
    # coco-caption's 1e-15 / 1e-9 division guards move the scores by ~1e-10.
    assert result.score == pytest.approx(BLEU_CORPUS, rel=1e-8)
    assert result.per_item == pytest.approx({1: BLEU_ITEM_1, 2: BLEU_ITEM_2}, rel=1e-8)
    assert result.score == pytest.approx(0.6675775, abs=1e-7)
    assert result.score != pytest.approx(sum(result.per_item.values()) / 2, abs=1e-3)  # pooled, not averaged
    # what each image adds to the pool: matched and guessed n-grams of orders 1..4, its length, the closest reference's
    assert result.statistics == {1: (5, 4, 2, 1, 5, 4, 3, 2, 5, 6), 2: (6, 5, 3, 1, 6, 5, 4, 3, 6, 6)}


def test_bleu4_of_a_perfect_match_is_one() -> None:
    result = bleu4({1: "A man rides a horse."}, {1: ["a man is riding a horse", "a man rides a horse"]})
    assert result.score == pytest.approx(1.0, abs=1e-9)


def test_bleu4_is_zero_without_shared_ngrams() -> None:
    result = bleu4({1: "zebra giraffe elephant lion"}, {1: ["a man rides a horse"]})
    assert result.score == pytest.approx(0.0, abs=1e-12)


def test_bleu4_closest_reference_length_prefers_the_shorter_on_a_tie() -> None:
    # 4 words between references of 3 and 5 words: the 3-word one counts, so no brevity penalty applies,
    # and every n-gram of "a b c d" is in the 5-word reference -> 1.
    assert bleu4({1: "a b c d"}, {1: ["x y z", "a b c d e"]}).score == pytest.approx(1.0, abs=1e-9)
    # Against 5 and 7 words, 5 is closest: penalty exp(1 - 5/4).
    result = bleu4({1: "a b c d"}, {1: ["a b c d e", "q r s t u v w"]})
    assert result.score == pytest.approx(math.exp(1 - 5 / 4), rel=1e-8)


def test_tokenizer_lowercases_and_drops_ptb_punctuation() -> None:
    tokens = caption_tokens("A dog's toy -- \"well-known\", isn't it?")
    assert " ".join(tokens) == "a dog 's toy well-known is n't it"
    assert caption_tokens("a dog 's toy costs $ 3.50") == ["a", "dog", "'s", "toy", "costs", "$", "3.50"]


@pytest.mark.parametrize("metric", [cider_d, bleu4])
def test_bad_corpora_are_named(metric: Callable[..., CorpusScore]) -> None:
    with pytest.raises(ValueError, match=r"candidates \['B'\] have no references"):
        metric({"A": "a cat", "B": "a dog"}, {"A": ["a cat"]})
    with pytest.raises(ValueError, match=r"references \['B'\] have no candidate"):
        metric({"A": "a cat"}, {"A": ["a cat"], "B": ["a dog"]})
    with pytest.raises(ValueError, match="item 'B' has no reference captions"):
        metric({"A": "a cat", "B": "a dog"}, {"A": ["a cat"], "B": []})
    with pytest.raises(TypeError, match="references for item 'A' must be a sequence of captions"):
        metric({"A": "a cat"}, {"A": "a cat"})
    with pytest.raises(TypeError, match="candidate for item 'A' must be one caption string"):
        metric({"A": ["a cat"]}, {"A": ["a cat"]})
    with pytest.raises(ValueError, match="no candidates"):
        metric({}, {})


def test_scores_serialise_with_string_ids() -> None:
    assert cider_d({7: "a cat", 8: "a cat"}, {7: ["a cat"], 8: ["a dog"]}).as_json()["per_item"].keys() == {"7", "8"}
