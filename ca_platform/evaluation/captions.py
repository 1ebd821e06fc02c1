"""CIDEr-D and BLEU-4 as the coco-caption toolkit (pycocoevalcap) computes them, without Java.

The scoring follows coco-caption's `cider_scorer.py` and `bleu_scorer.py`, quirks included, so numbers are
comparable with published ones. Only tokenization differs: coco-caption runs Stanford's Java PTBTokenizer
and then drops punctuation tokens; `caption_tokens` approximates that in Python (see its docstring). On
plain captions the two agree; they can differ on abbreviations ("u.s." keeps its final period in PTB),
brackets (PTB turns "[" into a kept "-lsb-" token) and other rare symbols.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

MAX_N = 4
CIDER_SIGMA = 6.0
# What corpus BLEU-4 pools per item: matched n-grams of orders 1..4, guessed n-grams of orders 1..4, the
# candidate's length and its effective reference length.
BLEU_STATISTICS = 2 * MAX_N + 2

ItemId = TypeVar("ItemId", bound=Hashable)
NGram = tuple[str, ...]

# PTB splits these clitics off their word ("dog's" -> "dog 's", "don't" -> "do n't") and coco-caption keeps them.
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
# A clitic, a word (inner hyphens, apostrophes and periods kept, as in "well-known", "o'clock", "3.5"),
# or any other single symbol.
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-'.]\w+)*|[^\w\s]")
# Symbols whose PTB tokens (quotes become `` and '', brackets -LRB- etc.) coco-caption's PUNCTUATIONS removes.
_DROPPED = frozenset("'\"`.?!,:;-(){}[]")

# bleu_scorer.py's guards against division by zero: an order with no n-grams to guess contributes
# tiny / small = 1e-6 rather than 1, and a perfect match scores 1 - O(1e-10) rather than exactly 1.
_TINY = 1e-15
_SMALL = 1e-9


@dataclass(frozen=True)
class CorpusScore:
    """The corpus score coco-caption reports, and each item's own score; where the corpus score pools counts
    over items rather than averaging their scores (BLEU), each item's counts too, so the corpus score can be
    recomputed on any resample of the items."""

    score: float
    per_item: dict[Hashable, float]
    statistics: dict[Hashable, tuple[int, ...]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"score": self.score, "per_item": {str(item): value for item, value in self.per_item.items()}}


def caption_tokens(text: str) -> list[str]:
    """Lowercased PTB-style tokens without the punctuation coco-caption removes.

    Clitics split as in PTB ("a dog's toy" -> a, dog, 's, toy); already tokenized text maps to itself.
    """
    text = _CLITIC.sub(r" \1", text.lower())
    return [token for token in _TOKEN.findall(text) if token not in _DROPPED]


def cider_d(
    candidates: Mapping[ItemId, str], references: Mapping[ItemId, Sequence[str]], sigma: float = CIDER_SIGMA
) -> CorpusScore:
    """CIDEr-D (coco-caption's "CIDEr"): n-gram tf-idf cosine with clipping and a length penalty, times 10.

    Document frequencies come from the references of this corpus, so a score is only comparable with
    scores over the same reference set; a one-item corpus always scores 0 (every idf is log(1/1)).
    """
    if not sigma > 0:
        raise ValueError(f"the length penalty's sigma must be positive, got {sigma}")
    items = _checked_items(candidates, references)
    reference_counts = {item: [_ngram_counts(caption_tokens(ref)) for ref in references[item]] for item in items}
    document_frequency: Counter[NGram] = Counter()
    for counts in reference_counts.values():
        document_frequency.update(set().union(*counts))
    log_corpus = math.log(len(items))

    def weights(counts: Counter[NGram]) -> _TfIdf:
        return _TfIdf.of(counts, document_frequency, log_corpus)

    per_item = {}
    for item in items:
        candidate = weights(_ngram_counts(caption_tokens(candidates[item])))
        total = 0.0
        for counts in reference_counts[item]:
            reference = weights(counts)
            penalty = math.exp(-((candidate.length - reference.length) ** 2) / (2 * sigma**2))
            total += sum(candidate.clipped_cosine(reference, n) for n in range(MAX_N)) * penalty
        per_item[item] = 10.0 * total / MAX_N / len(reference_counts[item])
    return CorpusScore(sum(per_item.values()) / len(per_item), per_item)


@dataclass(frozen=True)
class _TfIdf:
    vectors: tuple[dict[NGram, float], ...]  # one per n-gram order
    norms: tuple[float, ...]
    length: int  # coco-caption counts 2-grams here (its `n == 1` is the 2-gram index); kept to match its numbers

    @classmethod
    def of(cls, counts: Counter[NGram], document_frequency: Counter[NGram], log_corpus: float) -> _TfIdf:
        vectors: tuple[dict[NGram, float], ...] = tuple({} for _ in range(MAX_N))
        for ngram, count in counts.items():
            # Unseen n-grams get df 1, so they weigh as much as the rarest reference n-gram.
            vectors[len(ngram) - 1][ngram] = count * (log_corpus - math.log(max(1, document_frequency[ngram])))
        norms = tuple(math.sqrt(sum(w * w for w in vector.values())) for vector in vectors)
        return cls(vectors, norms, sum(counts[ngram] for ngram in vectors[1]))

    def clipped_cosine(self, reference: _TfIdf, n: int) -> float:
        """Cosine of order-n vectors with each candidate weight clipped to the reference's (a CIDEr-D change)."""
        ref = reference.vectors[n]
        dot = sum(min(weight, ref.get(ngram, 0.0)) * ref.get(ngram, 0.0) for ngram, weight in self.vectors[n].items())
        if self.norms[n] == 0 or reference.norms[n] == 0:
            return dot
        return dot / (self.norms[n] * reference.norms[n])


def bleu4(candidates: Mapping[ItemId, str], references: Mapping[ItemId, Sequence[str]]) -> CorpusScore:
    """Corpus BLEU-4 as coco-caption's `Bleu` reports it, with each item's sentence BLEU-4 alongside.

    The corpus score pools clipped n-gram matches and lengths over all items before taking the geometric mean
    and brevity penalty, so it is not the mean of the per-item scores. Each item's effective reference length
    is its reference closest in length to the candidate (the shorter one on a tie).
    """
    items = _checked_items(candidates, references)
    statistics: dict[Hashable, tuple[int, ...]] = {}
    for item in items:
        tokens = caption_tokens(candidates[item])
        max_reference_counts: Counter[NGram] = Counter()
        lengths = []
        for reference in references[item]:
            reference_tokens = caption_tokens(reference)
            lengths.append(len(reference_tokens))
            max_reference_counts |= _ngram_counts(reference_tokens)  # | keeps the larger count
        item_correct = [0] * MAX_N
        for ngram, count in _ngram_counts(tokens).items():
            item_correct[len(ngram) - 1] += min(count, max_reference_counts[ngram])
        item_guessed = [max(0, len(tokens) - k) for k in range(MAX_N)]
        closest = min((abs(length - len(tokens)), length) for length in lengths)[1]
        statistics[item] = (*item_correct, *item_guessed, len(tokens), closest)
    rows = np.asarray(list(statistics.values()), dtype=np.float64)
    per_item = dict(zip(statistics, bleu4_of_statistics(rows).tolist()))
    return CorpusScore(float(bleu4_of_statistics(rows.sum(axis=0))), per_item, statistics)


def bleu4_of_statistics(statistics: np.ndarray) -> np.ndarray:
    """BLEU-4 of pooled counts `[..., BLEU_STATISTICS]` (see the constant): the geometric mean of the clipped
    n-gram precisions times the brevity penalty, with bleu_scorer.py's division guards."""
    statistics = np.asarray(statistics, dtype=np.float64)
    if statistics.shape[-1:] != (BLEU_STATISTICS,):
        raise ValueError(f"BLEU-4 statistics must end in {BLEU_STATISTICS} counts, got shape {statistics.shape}")
    correct, guessed = statistics[..., :MAX_N], statistics[..., MAX_N : 2 * MAX_N]
    score = np.prod((correct + _TINY) / (guessed + _SMALL), axis=-1) ** (1.0 / MAX_N)
    ratio = (statistics[..., -2] + _TINY) / (statistics[..., -1] + _SMALL)
    return np.where(ratio < 1, score * np.exp(1 - 1 / ratio), score)


def _ngram_counts(tokens: Sequence[str]) -> Counter[NGram]:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, MAX_N + 1) for i in range(len(tokens) - n + 1))


def _checked_items(candidates: Mapping[ItemId, str], references: Mapping[ItemId, Sequence[str]]) -> list[ItemId]:
    """The item ids in candidate order, after checking each has one candidate string and at least one reference."""
    if not candidates:
        raise ValueError("no candidates to score")
    unreferenced = [item for item in candidates if item not in references]
    if unreferenced:
        raise ValueError(f"candidates {unreferenced[:10]!r} have no references ({len(unreferenced)} in all)")
    uncandidated = [item for item in references if item not in candidates]
    if uncandidated:
        raise ValueError(f"references {uncandidated[:10]!r} have no candidate ({len(uncandidated)} in all)")
    for item, candidate in candidates.items():
        if not isinstance(candidate, str):
            raise TypeError(f"candidate for item {item!r} must be one caption string, got {type(candidate).__name__}")
        captions = references[item]
        if isinstance(captions, str):
            raise TypeError(f"references for item {item!r} must be a sequence of captions, not one string")
        if len(captions) == 0:
            raise ValueError(f"item {item!r} has no reference captions")
        for caption in captions:
            if not isinstance(caption, str):
                raise TypeError(f"a reference for item {item!r} is {type(caption).__name__}, not a caption string")
    return list(candidates)
