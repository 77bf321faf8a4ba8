"""Clustered context (CRAG), runnable as is: many overlapping reviews packed into a small
prompt, one compact representative per cluster, each part naming the memories it came from."""

from memlayer import CragContext, Memory

REVIEWS = [
    "Battery easily lasts 30 hours. Delivery took 9 days.",
    "I measured about 30 hours of battery life.",
    "30 hours on a single charge, more than I need. Paid $149.",
    "It arrived after 9 days, packed well.",
    "Mine is the sage green one and it looks great.",
    "For $149 you get a lot. Five stars from me.",
    "After a month the left hinge started to wobble.",
    "The battery lasts 30 hours, as advertised. Would recommend it.",
    "Shipping was slow: 9 days from order to doorstep.",
    "The sage green finish hides fingerprints.",
]

with Memory(path="./crag-memory") as memory:
    memory.delete_scope(user_id="shop")  # start clean when run twice
    memory.add_many(REVIEWS, user_id="shop")
    question = "What do reviewers say about these headphones?"

    crag = memory.context(question, budget_tokens=60, strategy="crag", user_id="shop")
    print(f"{crag.tokens} tokens (MiniLM's tokenizer):\n{crag.text}\n")
    for part in crag.parts:  # which memories each part came from
        print(len(part.ids), "memories ->", part.text[:60])

    # Abstractive: any callable (texts, max_tokens) -> str, an LLM included; its summaries
    # are cached per cluster content, so asking again costs no summarizer call.
    def first_sentence(texts: list[str], max_tokens: int) -> str:
        return texts[0].split(". ")[0]

    summaries = CragContext(summarizer=first_sentence)
    print(memory.context(question, budget_tokens=60, strategy=summaries, user_id="shop").text)
