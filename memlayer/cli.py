"""The `memlayer` command: add, get, delete, search, ingest and inspect a memory from the shell.

Scope flags follow the Python API's rules (an empty value is refused, not ignored), and every
error a user can cause (bad JSON, a missing, unreadable, empty or non-UTF-8 file, invalid
input) prints one line and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from memlayer.errors import InvalidInputError, MemlayerError, NotFoundError
from memlayer.retrievers.search import MODES
from memlayer.types import SCOPE_FIELDS, Hit, Scope


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
    add.add_argument("--id", help="record id (an existing id in the tenant is replaced)")
    add.add_argument("--metadata", help="JSON object")

    get = commands.add_parser("get", parents=[common], help="print one record of the scope")
    get.add_argument("id")

    delete = commands.add_parser("delete", parents=[common], help="forget one record of the scope")
    delete.add_argument("id")

    count = commands.add_parser("count", parents=[common], help="how many records the scope has")
    count.add_argument("--filters", help="Mongo-style JSON filter")

    search = commands.add_parser(
        "search", parents=[common], help="recall the best matches for a query"
    )
    search.add_argument("query")
    search.add_argument("-k", type=int, default=5)
    search.add_argument("--mode", choices=MODES, default="hybrid")
    search.add_argument("--filters", help="Mongo-style JSON filter")
    search.add_argument("--json", action="store_true", help="print JSON lines")

    ingest = commands.add_parser(
        "ingest", parents=[common], help="chunk and remember a text file ('-' = stdin)"
    )
    ingest.add_argument("file")
    ingest.add_argument("--no-progress", action="store_true")

    commands.add_parser("stats", parents=[common], help="counts and locations")

    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--path", type=Path, help="memory folder (default: user data dir)")
    where.add_argument("--url", help="database URL instead of a folder (SQLAlchemy form)")
    db = commands.add_parser("db", help="the database's schema revision")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("current", parents=[where], help="print the schema revision")
    upgrade = db_commands.add_parser(
        "upgrade", parents=[where], help="apply the schema revisions the database lacks"
    )
    upgrade.add_argument(
        "--embedder", default=None, help="for a new database: 'minilm' (default), 'hash', a folder"
    )

    serve = commands.add_parser(
        "serve", help="run the multi-tenant HTTP memory service (needs memlayer[server])"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--db", help="database URL, or a memory folder (default: MEMLAYER_URL, else the data dir)"
    )
    serve.add_argument("--workers", type=int, default=1, help="worker processes")
    serve.add_argument("--embedder", default=None, help="'minilm' (default), 'hash' or a folder")
    return parser


def _read_lazily(name: str, block: int = 1 << 20) -> Iterator[str]:
    handle = sys.stdin if name == "-" else open(name, encoding="utf-8")  # noqa: SIM115
    try:
        while piece := handle.read(block):
            yield piece
    finally:
        if handle is not sys.stdin:
            handle.close()


def _check_readable(name: str, block: int = 1 << 20) -> None:
    """Refuse, before anything is stored, a file that is missing, unreadable, empty or not
    UTF-8 text (standard input is read as it comes)."""
    if name == "-":
        return
    path = Path(name)
    if not path.is_file():
        raise InvalidInputError("file", "must be an existing file", name)
    decoder = codecs.getincrementaldecoder("utf-8")()
    read = 0
    with open(path, "rb") as handle:
        while piece := handle.read(block):
            try:
                decoder.decode(piece)
            except UnicodeDecodeError as exc:
                raise InvalidInputError(
                    "file", f"must be UTF-8 text (bad byte at offset {read + exc.start})", name
                ) from exc
            read += len(piece)
    decoder.decode(b"", final=True)
    if read == 0:
        raise InvalidInputError("file", "must not be empty", name)


def _json(value: str | None, field: str) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(field, f"must be valid JSON ({exc})", value) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `memlayer` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "db":
        return _db(args)
    if args.command == "serve":
        return _serve(args)
    scope = {name: getattr(args, name) for name in SCOPE_FIELDS if getattr(args, name) is not None}
    try:
        Scope.of(scope)
        from memlayer.memory import Memory

        with Memory(path=args.path, url=args.url, embedder=args.embedder) as memory:
            return _run(memory, args, scope)
    except (MemlayerError, OSError) as exc:
        print(f"memlayer: error: {exc}", file=sys.stderr)
        return 2


def _run(memory: Any, args: argparse.Namespace, scope: dict[str, str]) -> int:
    if args.command == "add":
        metadata = _json(args.metadata, "metadata")
        print(memory.add(args.text, id=args.id, metadata=metadata, **scope))
    elif args.command == "get":
        hit = memory.get(args.id, **scope)
        if hit is None:
            raise NotFoundError("record", args.id)
        print(json.dumps(_row(hit)))
    elif args.command == "delete":
        memory.delete(args.id, **scope)
        print(f"deleted {args.id}")
    elif args.command == "count":
        print(memory.count(filters=_json(args.filters, "filters"), **scope))
    elif args.command == "search":
        filters = _json(args.filters, "filters")
        hits = memory.search(args.query, k=args.k, mode=args.mode, filters=filters, **scope)
        for hit in hits:
            if args.json:
                print(json.dumps(_row(hit)))
            else:
                print(f"{hit.score:.4f}  {hit.id}  {' '.join(hit.text.split())[:120]}")
    elif args.command == "ingest":
        _check_readable(args.file)
        stored = memory.ingest(
            _read_lazily(args.file),
            metadata={"source": args.file},
            progress=not args.no_progress,
            **scope,
        )
        if stored == 0:
            raise InvalidInputError("file", "holds no text to ingest", args.file)
        print(f"stored {stored} chunks from {args.file}")
    else:
        for key, value in memory.stats().items():
            print(f"{key}: {value}")
    return 0


def _db(args: argparse.Namespace) -> int:
    from memlayer.schema import schema_status, upgrade_schema

    try:
        if args.db_command == "current":
            status = schema_status(args.path, url=args.url)
            print(f"{status.revision or 'none'} (head: {status.head})")
            return 0
        status = upgrade_schema(args.path, url=args.url, embedder=args.embedder)
    except (MemlayerError, OSError) as exc:
        print(f"memlayer: error: {exc}", file=sys.stderr)
        return 2
    if status.revision == status.head:
        print(f"already at {status.head}")
    else:
        print(f"upgraded {status.revision or 'none'} -> {status.head}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Run the service with uvicorn. Workers are separate processes that open the database
    named here through the environment (`MEMLAYER_URL` or `MEMLAYER_DATA_DIR`), so they all
    serve one store; the app is named by import path, as uvicorn needs for several workers."""
    import os

    from memlayer.optional import require

    try:
        require("fastapi", "server")
        require("prometheus_client", "server")
        uvicorn = require("uvicorn", "server")
    except MemlayerError as exc:
        print(f"memlayer: error: {exc}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("memlayer: error: --workers: must be at least 1", file=sys.stderr)
        return 2
    if args.db:
        if "://" in args.db:
            os.environ["MEMLAYER_URL"] = args.db
        else:
            os.environ.pop("MEMLAYER_URL", None)
            os.environ["MEMLAYER_DATA_DIR"] = str(Path(args.db).resolve())
    if args.embedder:
        os.environ["MEMLAYER_EMBEDDER"] = args.embedder
    uvicorn.run(
        "memlayer.integrations.server.app:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        http="memlayer.integrations.server.nodelay:NoDelayH11Protocol",
        timeout_graceful_shutdown=10,
    )
    return 0


def _row(hit: Hit) -> dict[str, Any]:
    return {
        "id": hit.id,
        "score": hit.score,
        "text": hit.text,
        "metadata": hit.metadata,
        **hit.scope.as_dict(),
    }


if __name__ == "__main__":
    sys.exit(main())
