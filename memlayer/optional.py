"""Import optional dependencies where they are used, with an error naming the extra.

Part of the ground: `import memlayer` stays light, and a missing extra says what to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from memlayer.errors import MissingExtraError


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, or raise `MissingExtraError` naming `pip install memlayer[extra]`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(module, extra) from exc
