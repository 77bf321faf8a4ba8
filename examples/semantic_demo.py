"""Semantic memory demo: ingest the Python standard library's documentation, then recall.

Run alone with `python examples/semantic_demo.py [folder]`; `make demo` runs it first.
"""

from __future__ import annotations

import sys
import tempfile
import textwrap
import time
from pathlib import Path

from tqdm import tqdm

from memlayer import Memory
from memlayer.demo_corpus import stdlib_docs

MODULES = (
    "argparse",
    "base64",
    "csv",
    "datetime",
    "gzip",
    "hashlib",
    "heapq",
    "itertools",
    "json",
    "lzma",
    "math",
    "pathlib",
    "pickle",
    "secrets",
    "shutil",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "uuid",
    "zipfile",
    "zlib",
)

QUESTIONS = (
    "how do I parse command-line options and flags?",
    "compress a file with gzip",
    "run a shell command and capture its output",
    "compute a SHA-256 digest of some bytes",
    "generate a cryptographically secure random token",
)


def run(path: Path) -> None:
    """Ingest the docs into a Memory at `path`, search a few questions, print a context."""
    print("== Semantic memory: the Python standard library documentation ==")
    with Memory(path=path) as memory:
        if memory.count(agent_id="stdlib-docs") == 0:
            started = time.perf_counter()
            chunks = 0
            for module, text in tqdm(list(stdlib_docs(MODULES)), desc="  ingest", unit=" module"):
                chunks += memory.ingest(
                    [text], metadata={"module": module}, progress=False, agent_id="stdlib-docs"
                )
            seconds = time.perf_counter() - started
            print(f"  {chunks} chunks in {seconds:.1f} s ({chunks / seconds:.0f} chunks/s)")
        for question in QUESTIONS:
            started = time.perf_counter()
            hits = memory.search(question, k=3, agent_id="stdlib-docs")
            took = (time.perf_counter() - started) * 1000
            print(f"\n? {question}   ({took:.0f} ms)")
            for hit in hits:
                snippet = " ".join(hit.text.split())[:110]
                print(f"  {hit.score:.3f}  [{hit.metadata['module']}] {snippet}")
        only_json = memory.search(
            "read and write data",
            k=2,
            filters={"module": {"$in": ["json", "csv"]}},
            agent_id="stdlib-docs",
        )
        print("\nfiltered to json/csv:", [hit.metadata["module"] for hit in only_json])
        context = memory.context(
            "gzip compression levels", budget_tokens=120, agent_id="stdlib-docs"
        )
        print(f"\ncontext for a prompt ({context.tokens} tokens, ids {context.ids[:2]}...):")
        print(textwrap.indent(textwrap.shorten(context.text, 400), "  "))


if __name__ == "__main__":
    run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="memlayer-")))
