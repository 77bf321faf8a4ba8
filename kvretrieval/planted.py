"""Planted facts in long contexts: (question, page holding the answer) pairs.

A context is prose (the topics of Python's own documentation, `pydoc_data.topics`, which
ships with Python) with short facts planted at spread depths, each about its own subject:
"The amber heron's secret number is 40317." A question names one subject, so retrieving
its page needs the question's content, not only the facts' shared pattern. Topics are split
in two disjoint halves ("train" and "eval"), so a retriever trained on one is evaluated on
contexts it never saw. For tiny random models, `token_context` builds the same task from
token ids. Seeds are fixed by the caller; everything here is deterministic.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

COLOURS = (
    "amber",
    "azure",
    "crimson",
    "golden",
    "indigo",
    "ivory",
    "jade",
    "lilac",
    "olive",
    "scarlet",
    "silver",
    "violet",
)
ANIMALS = (
    "badger",
    "falcon",
    "ferret",
    "heron",
    "lynx",
    "marmot",
    "otter",
    "panther",
    "pelican",
    "raven",
    "salmon",
    "walrus",
)
Split = Literal["train", "eval"]


@dataclass(frozen=True)
class PlantedFact:
    """A planted fact: the question's ids as `KVSession.ask` runs them with `chat=False` (a
    newline, then the question), its text (None for token contexts), the expected answer,
    and where the answer's first token sits in the context's ids."""

    question_ids: list[int]
    question: str | None
    answer: str
    position: int


@dataclass(frozen=True)
class PlantedContext:
    """A context's token ids and the facts planted in it."""

    ids: list[int]
    facts: list[PlantedFact]


def prose_topics(split: Split) -> list[str]:
    """The documentation topics of one half: alternate topics in name order."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    return [topics[name] for name in names[(0 if split == "train" else 1) :: 2]]


def text_context(
    encode: Callable[[str], list[int]],
    tokens: int,
    facts: int,
    seed: int,
    split: Split = "eval",
    *,
    low: float = 0.1,
    high: float = 0.85,
) -> PlantedContext:
    """About `tokens` tokens of prose from `split`'s topics with `facts` facts planted
    between paragraphs at depths spread over [low, high]; `encode` is the tokenizer's text
    to ids without special tokens."""
    rng = random.Random(seed)
    topics = prose_topics(split)
    rng.shuffle(topics)
    paragraphs: list[list[int]] = []
    count = 0
    for paragraph in (p for topic in topics for p in topic.split("\n\n") if p.strip()):
        if count >= tokens:
            break
        paragraphs.append(encode(paragraph + "\n\n"))
        count += len(paragraphs[-1])
    subjects = rng.sample([(c, a) for c in COLOURS for a in ANIMALS], facts)
    depths = [low + (high - low) * i / max(facts - 1, 1) for i in range(facts)]
    at = {min(int(d * len(paragraphs)), len(paragraphs) - 1): i for i, d in enumerate(depths)}
    ids: list[int] = []
    planted = []
    for index, paragraph_ids in enumerate(paragraphs):
        if index in at:
            colour, animal = subjects[at[index]]
            number = str(rng.randint(10_000, 99_999))
            subject = f"The {colour} {animal}'s secret number is"
            ids += encode(subject)
            position = len(ids)
            ids += encode(" " + number) + encode(".\n\n")
            question = f"What is the {colour} {animal}'s secret number? {subject}"
            planted.append(PlantedFact(encode("\n") + encode(question), question, number, position))
        ids += paragraph_ids
    return PlantedContext(ids, planted)


# token contexts: 0 marks a fact, 1 a question; subjects and values are ids 2..vocab/2
FACT, ASK, FIRST_SUBJECT = 0, 1, 2


def token_context(vocab: int, tokens: int, facts: int, seed: int) -> PlantedContext:
    """Random filler ids (upper half of the vocabulary) with `facts` facts [FACT, subject,
    value, value] at random depths; a question is [ASK, subject], its answer the first
    value (as a decimal string of the id)."""
    rng = random.Random(seed)
    middle = vocab // 2
    subjects = rng.sample(range(FIRST_SUBJECT, middle), facts)
    ids = [rng.randrange(middle, vocab) for _ in range(tokens)]
    slots = sorted(rng.sample(range(tokens // 10, tokens * 9 // 10), facts))
    planted = []
    for shift, (slot, subject) in enumerate(zip(slots, subjects, strict=True)):
        value = rng.randrange(FIRST_SUBJECT, middle)
        at = slot + 4 * shift  # earlier facts moved the slot on
        ids[at:at] = [FACT, subject, value, value]
        planted.append(PlantedFact([ASK, subject], None, str(value), at + 2))
    return PlantedContext(ids, planted)
