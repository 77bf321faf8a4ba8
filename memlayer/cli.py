"""The `memlayer` command: add, search, ingest and inspect a memory from the shell."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from memlayer.errors import MemlayerError
from memlayer.types import SCOPE_FIELDS


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--path", type=Path, help="memory folder (default: user data dir)")
    common.add_argument("--url", help="database URL instead of a folder (SQLAlchemy form)")
    common.add_argument("--embedder", default=None, help="'minilm' (default), 'hash' or a folder")
    for name in SCOPE_FIELDS:
        common.add_argument(f"--{name.replace('_', '-')}", dest=name, help=f"scope: {name}")
    parser = argparse.ArgumentParser(
        prog="memlayer", description="Semantic memory for agents: add, search, ingest, stats."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    add = commands.add_parser("add", parents=[common], help="remember one text")
    add.add_argument("text")
    add.add_argument("--id", help="record id (an existing id is updated)")
    add.add_argument("--metadata", type=json.loads, help="JSON object")

    search = commands.add_parser(
        "search", parents=[common], help="recall the best matches for a query"
    )
    search.add_argument("query")
    search.add_argument("-k", type=int, default=5)
    search.add_argument("--mode", choices=("hybrid", "vector", "keyword"), default="hybrid")
    search.add_argument("--filters", type=json.loads, help="Mongo-style JSON filter")
    search.add_argument("--json", action="store_true", help="print JSON lines")

    ingest = commands.add_parser(
        "ingest", parents=[common], help="chunk and remember a text file ('-' = stdin)"
    )
    ingest.add_argument("file")
    ingest.add_argument("--no-progress", action="store_true")

    commands.add_parser("stats", parents=[common], help="counts and locations")
    return parser


def _read_lazily(name: str, block: int = 1 << 20) -> Iterator[str]:
    handle = sys.stdin if name == "-" else open(name, encoding="utf-8", errors="replace")  # noqa: SIM115
    try:
        while piece := handle.read(block):
            yield piece
    finally:
        if handle is not sys.stdin:
            handle.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `memlayer` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    scope = {name: getattr(args, name) for name in SCOPE_FIELDS if getattr(args, name)}
    try:
        from memlayer.memory import Memory

        with Memory(path=args.path, url=args.url, embedder=args.embedder) as memory:
            return _run(memory, args, scope)
    except MemlayerError as exc:
        print(f"memlayer: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"memlayer: error: {exc}", file=sys.stderr)
        return 2


def _run(memory: Any, args: argparse.Namespace, scope: dict[str, str]) -> int:
    if args.command == "add":
        print(memory.add(args.text, id=args.id, metadata=args.metadata, **scope))
    elif args.command == "search":
        hits = memory.search(args.query, k=args.k, mode=args.mode, filters=args.filters, **scope)
        for hit in hits:
            if args.json:
                row = {"id": hit.id, "score": hit.score, "text": hit.text, "metadata": hit.metadata}
                print(json.dumps(row))
            else:
                print(f"{hit.score:.4f}  {hit.id}  {' '.join(hit.text.split())[:120]}")
    elif args.command == "ingest":
        if args.file != "-" and not Path(args.file).is_file():
            raise FileNotFoundError(f"{args.file} is not a file")
        stored = memory.ingest(
            _read_lazily(args.file),
            metadata={"source": args.file},
            progress=not args.no_progress,
            **scope,
        )
        print(f"stored {stored} chunks from {args.file}")
    else:
        for key, value in memory.stats().items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
