"""A long, real, offline text for demos and benchmarks: the Python standard library's docs.

Rendered by pydoc from the modules installed with Python, so it exists on every machine.
"""

from __future__ import annotations

import importlib
import pydoc
from collections.abc import Iterator

DEMO_MODULES = (
    "argparse",
    "asyncio",
    "base64",
    "bisect",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http.client",
    "itertools",
    "json",
    "logging",
    "lzma",
    "math",
    "multiprocessing",
    "os",
    "pathlib",
    "pickle",
    "queue",
    "random",
    "re",
    "secrets",
    "shelve",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "weakref",
    "xml.etree.ElementTree",
    "zipfile",
    "zlib",
)


def stdlib_docs(modules: tuple[str, ...] = DEMO_MODULES) -> Iterator[tuple[str, str]]:
    """Yield (module name, plain-text documentation) for each importable module."""
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        yield name, pydoc.render_doc(module, renderer=pydoc.plaintext)  # type: ignore[attr-defined]
