"""Import optional dependencies where they are used, with an error naming the extra.

Part of the ground: `import memlayer` stays light, and a missing extra says what to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from memlayer.errors import MissingExtraError

# FAISS comes in two builds that install the same `faiss` module, so each has its own extra
# and an environment holds one of them, never both
FAISS_INSTALL = (
    "pip install 'memlayer[cpu]' (FAISS's CPU build, faiss-cpu), "
    "or 'memlayer[gpu]' for its CUDA build (faiss-gpu); never both"
)


def require_faiss() -> ModuleType:
    """FAISS, or `MissingExtraError` naming the two extras that bring it."""
    try:
        return importlib.import_module("faiss")
    except ImportError as exc:
        raise MissingExtraError("faiss", install=FAISS_INSTALL) from exc


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, or raise `MissingExtraError` naming `pip install memlayer[extra]`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(module, extra) from exc
