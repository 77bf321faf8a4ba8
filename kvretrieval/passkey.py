"""The passkey retrieval task: a 5-digit key hidden at a given depth in filler text.

The classic haystack repeats one block of five sentences; the varied one draws every
sentence at random from a pool of distinct ones, so the needle does not stand out as the
only text that differs from one repeated block.
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
VARIED_FILLERS = (
    "The river bends twice before it reaches the old mill. ",
    "A heron waited on one leg among the reeds. ",
    "Fresh bread was cooling on the kitchen window sill. ",
    "The train to the coast left under a grey morning sky. ",
    "Children chalked a long hopscotch grid along the pavement. ",
    "The library smelled of dust, glue and old paper. ",
    "A cold wind rattled the shutters of the empty farmhouse. ",
    "The market stalls were stacked with pears and plums. ",
    "Somebody left a red umbrella leaning against the gate. ",
    "The choir practised the same hymn until it was perfect. ",
    "Moss had crept over the stones of the garden wall. ",
    "The ferry horn sounded as the fog began to lift. ",
    "A tabby cat slept on the warm bonnet of the van. ",
    "The baker whistled while he shaped the morning loaves. ",
    "Snow settled softly on the roofs of the village. ",
    "The hikers stopped to refill their bottles at the spring. ",
    "An old clock ticked loudly in the quiet hallway. ",
    "The gardener pruned the roses before the first frost. ",
    "Lanterns swayed along the harbour as the boats came in. ",
    "The museum guard yawned beside a painting of a storm. ",
    "Bees drifted from one lavender bush to the next. ",
    "The potter shaped a tall jug on his spinning wheel. ",
    "Rain drummed on the tin roof of the bus shelter. ",
    "A pair of swans glided slowly past the boathouse. ",
)
CHARS_PER_TOKEN = 4.4  # SmolLM2's tokenizer on the varied fillers, measured
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeySample:
    """One prompt: the haystack with the needle, the question, and the expected answer."""

    context: str
    question: str
    answer: str
    depth: float
    needle: str


def make_sample(
    tokens: int, depth: float, seed: int, tokens_per_filler: int = 23, varied: bool = False
) -> PasskeySample:
    """A haystack of about `tokens` tokens with the key at `depth` (0..1).

    Classic: `FILLER` repeated (about `tokens_per_filler` tokens each); varied: sentences
    drawn at random from `VARIED_FILLERS`.
    """
    rng = random.Random(seed)
    key = str(rng.randint(10_000, 99_999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    pieces = _varied(tokens, rng) if varied else [FILLER] * max(1, tokens // tokens_per_filler)
    before = int(len(pieces) * depth)
    context = INTRO + "".join(pieces[:before]) + needle + "".join(pieces[before:])
    return PasskeySample(context=context, question=QUESTION, answer=key, depth=depth, needle=needle)


def _varied(tokens: int, rng: random.Random) -> list[str]:
    """Sentences drawn at random from the pool until about `tokens` tokens."""
    pieces: list[str] = []
    chars = 0
    while chars < tokens * CHARS_PER_TOKEN:
        pieces.append(rng.choice(VARIED_FILLERS))
        chars += len(pieces[-1])
    return pieces


def samples(
    tokens: int,
    count: int,
    seed: int = 0,
    low: float = 0.05,
    high: float = 0.95,
    varied: bool = False,
) -> list[PasskeySample]:
    """`count` samples with depths spread evenly over [low, high]."""
    if count == 1:
        depths = [(low + high) / 2]
    else:
        depths = [low + (high - low) * i / (count - 1) for i in range(count)]
    return [
        make_sample(tokens, depth, seed * 1000 + i, varied=varied) for i, depth in enumerate(depths)
    ]


def is_correct(answer: str, sample: PasskeySample) -> bool:
    """The expected key appears in the model's answer."""
    return sample.answer in answer
