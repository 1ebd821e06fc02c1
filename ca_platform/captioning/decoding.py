"""How candidate captions are decoded: the strategies Nguyen et al. (2023) compare for recaptioning.

Beam search gives the model's most likely captions, close to one another; nucleus and top-k sampling give more
diverse ones, which the paper finds help CLIP training more than their lower likelihood costs. Several
candidates per image let a later step (a reward model, CLIP score) pick the caption to keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STRATEGIES = ("greedy", "beam", "nucleus", "top_k")
SAMPLING_STRATEGIES = ("nucleus", "top_k")


@dataclass(frozen=True)
class DecodingSettings:
    """How candidate captions are decoded (Nguyen et al. compare greedy, beam and nucleus/top-k sampling)."""

    strategy: str = "beam"  # "greedy" | "beam" | "nucleus" | "top_k"
    candidates: int = 3  # captions per image; greedy allows 1 only; beam: <= num_beams
    max_new_tokens: int = 20
    num_beams: int = 3
    top_p: float = 0.9
    top_k: int = 50
    temperature: float = 1.0
    seed: int = 0  # sampling strategies: generation is seeded, so the same inputs give the same captions

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"decoding strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be at least 1, not {self.candidates}")
        if self.strategy == "greedy" and self.candidates != 1:
            raise ValueError(
                f"greedy decoding gives one caption per image, not {self.candidates}: use beam or a sampling strategy"
            )
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, not {self.num_beams}")
        if self.strategy == "beam" and self.candidates > self.num_beams:
            raise ValueError(
                f"beam search returns at most num_beams captions per image: candidates {self.candidates} > "
                f"num_beams {self.num_beams}"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, not {self.top_k}")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be positive, not {self.temperature}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, not {self.seed}")

    @property
    def sampled(self) -> bool:
        """Whether captions are drawn at random (and so depend on the seed)."""
        return self.strategy in SAMPLING_STRATEGIES

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers' `generate()`, with the KV cache on.

        Each sampling strategy switches the other's filter off explicitly (top_k 0, top_p 1.0), so a model's own
        generation defaults (transformers' top_k of 50, say) do not narrow the distribution behind its back.
        """
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "num_return_sequences": self.candidates,
            "use_cache": True,
        }
        if self.strategy == "greedy":
            return {**kwargs, "do_sample": False, "num_beams": 1}
        if self.strategy == "beam":
            return {**kwargs, "do_sample": False, "num_beams": self.num_beams}
        sampling = {"do_sample": True, "num_beams": 1, "temperature": self.temperature}
        if self.strategy == "nucleus":
            return {**kwargs, **sampling, "top_p": self.top_p, "top_k": 0}
        return {**kwargs, **sampling, "top_k": self.top_k, "top_p": 1.0}
