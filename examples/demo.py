"""The main demo (`make demo`): semantic memory on the embedded offline default.

Ingests the Python standard library's documentation (a few MB of real text rendered by
pydoc), recalls answers to natural questions, and packs a prompt context.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import semantic_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--path", type=Path, default=None, help="keep the demo's data here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="memlayer-demo-") as tmp:
        semantic_demo.run((args.path or Path(tmp)) / "semantic")


if __name__ == "__main__":
    main()
