"""Import optional dependencies where they are used, with an error naming the extra.

Part of the ground: `import memlayer` stays light, and a missing extra says what to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from memlayer.errors import MissingExtraError

# FAISS comes in two builds that install the same `faiss` module: memlayer depends on the CPU
# one, and a CUDA machine swaps in the other; an environment that lost both gets this advice
FAISS_INSTALL = (
    "pip install faiss-cpu (memlayer's own dependency), or on a CUDA machine "
    "faiss-gpu>=1.15 (FAISS's CUDA build); never both"
)


def require_faiss() -> ModuleType:
    """FAISS, or `MissingExtraError` naming the two builds that bring it."""
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
