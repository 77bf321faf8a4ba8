"""KV memory demo: SmolLM2-135M reads ~16K tokens (twice its 8K window) and answers from the start.

A fact is stated once at the very beginning of a long real text (Python stdlib docs); the
model streams the whole text into paged KV memory and then answers a question about the
fact, attending to only ~1.2K tokens per step. Run alone: `python examples/kv_session_demo.py`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from memlayer import KVSession
from memlayer.demo_corpus import stdlib_docs
from memlayer.kvretrieval.model import load_smollm2

FACT = "Important: the access code of the archive room is 58142. Remember it.\n\n"
QUESTION = "What is the access code of the archive room? The access code of the archive room is"
MODULES = (
    "json",
    "csv",
    "gzip",
    "textwrap",
    "heapq",
    "bisect",
    "secrets",
    "string",
    "uuid",
    "shlex",
    "fnmatch",
    "glob",
    "base64",
    "statistics",
    "difflib",
    "queue",
)


def long_text(tokenizer: object, target_tokens: int) -> str:
    """The fact, then stdlib documentation until about `target_tokens` tokens."""
    parts, total = [FACT], 0
    for _, doc in stdlib_docs(MODULES):
        parts.append(doc)
        total += len(tokenizer(doc)["input_ids"])  # type: ignore[operator]
        if total >= target_tokens:
            break
    return "".join(parts)


def run(path: Path, target_tokens: int = 16_000) -> None:
    """Feed the long text, ask about its first line, save the session under `path`."""
    print("\n== KV memory: SmolLM2-135M (8K window) reading past its window ==")
    started = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"  model loaded in {time.perf_counter() - started:.1f} s (converted copy is cached)")
    session = KVSession(model, tokenizer, chat=False)
    text = long_text(tokenizer, target_tokens)
    started = time.perf_counter()
    fed = session.feed(text)
    took = time.perf_counter() - started
    print(f"  fed {fed} tokens in {took:.0f} s ({fed / took:.0f} tok/s)")
    answer = session.ask(QUESTION, max_new_tokens=8)
    stats = session.stats()
    print(f"  Q: {QUESTION}\n  A: {answer}")
    print(
        f"  {'correct' if '58142' in answer else 'WRONG'}: the fact sat {fed} tokens back; "
        f"each step attended to at most {stats['attention_span']} tokens "
        f"({stats['pages']} pages of {session.config.block_size} tokens across layers)"
    )
    session.save(path)
    print(f"  session saved to {path}")


if __name__ == "__main__":
    run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("kv-session"))
