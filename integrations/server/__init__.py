"""`memlayer serve`: the multi-tenant HTTP memory service (FastAPI) over the `Memory` core.

Install with `pip install 'memlayer[server]'`. `create_app()` builds the app; the tenant of
every data call is the one its API key belongs to.
"""

from __future__ import annotations

from memlayer.integrations.server.app import app_from_env, create_app
from memlayer.integrations.server.config import ServerSettings

__all__ = ["ServerSettings", "app_from_env", "create_app"]
