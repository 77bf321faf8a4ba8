"""The main demo (`make demo`): semantic memory, then KV memory, on the embedded offline default.

1. Semantic memory: ingest the Python standard library's documentation, recall, pack a context.
2. KV memory: SmolLM2-135M reads ~16K tokens, twice its 8K window, and answers a question
   about the first line from retrieved KV pages.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import kv_session_demo
import semantic_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--path", type=Path, default=None, help="keep the demo's data here")
    parser.add_argument("--skip-kv", action="store_true", help="run only the semantic part")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="memlayer-demo-") as tmp:
        root = args.path or Path(tmp)
        semantic_demo.run(root / "semantic")
        if not args.skip_kv:
            kv_session_demo.run(root / "kv")


if __name__ == "__main__":
    main()
