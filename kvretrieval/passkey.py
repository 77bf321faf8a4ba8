"""The passkey retrieval task: a 5-digit key hidden at a given depth in repeated filler text.

Used by the tests and `benchmarks/passkey.py`, always with fixed seeds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there.\n"
)
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeySample:
    """One prompt: the haystack with the key, the question, and the expected answer."""

    context: str
    question: str
    answer: str
    depth: float


def make_sample(tokens: int, depth: float, seed: int, tokens_per_filler: int = 23) -> PasskeySample:
    """A haystack of about `tokens` tokens with the key at `depth` (0..1)."""
    rng = random.Random(seed)
    key = str(rng.randint(10_000, 99_999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    repeats = max(1, tokens // tokens_per_filler)
    before = int(repeats * depth)
    context = INTRO + FILLER * before + needle + FILLER * (repeats - before)
    return PasskeySample(context=context, question=QUESTION, answer=key, depth=depth)


def samples(
    tokens: int, count: int, seed: int = 0, low: float = 0.05, high: float = 0.95
) -> list[PasskeySample]:
    """`count` samples with depths spread evenly over [low, high]."""
    if count == 1:
        depths = [(low + high) / 2]
    else:
        depths = [low + (high - low) * i / (count - 1) for i in range(count)]
    return [make_sample(tokens, depth, seed * 1000 + i) for i, depth in enumerate(depths)]


def is_correct(answer: str, sample: PasskeySample) -> bool:
    """The expected key appears in the model's answer."""
    return sample.answer in answer
