"""`memlayer serve`'s connections send each response at once (TCP_NODELAY), also when the
listening socket is bound with `proto` 0 as uvicorn's multi-worker supervisor binds it."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

pytest.importorskip("fastapi")
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from memlayer.integrations.server.nodelay import NoDelayH11Protocol


async def _accepted_nodelay(protocol: type[H11Protocol]) -> int:
    """TCP_NODELAY of the server side of one connection accepted through `protocol` on a
    listener bound as uvicorn's supervisor binds it (proto 0)."""
    config = Config(app=lambda *args: None, http=protocol, lifespan="off")
    config.load()
    state = ServerState()
    seen: list[int] = []

    class Probe(protocol):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    assert listener.proto == 0
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Probe(config, state, {}), sock=listener)
    _, writer = await asyncio.open_connection(*listener.getsockname())
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.01)
    writer.close()
    server.close()
    await server.wait_closed()
    return seen[0]


def test_the_protocol_turns_nagle_off_on_a_listener_bound_with_proto_0() -> None:
    assert asyncio.run(_accepted_nodelay(H11Protocol)) == 0  # the behaviour it corrects
    assert asyncio.run(_accepted_nodelay(NoDelayH11Protocol)) != 0


def test_serve_runs_uvicorn_with_the_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from memlayer import cli

    ran: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: ran.update(kwargs))
    assert cli.main(["serve", "--workers", "2", "--port", "1"]) == 0
    assert ran["workers"] == 2
    assert ran["http"] == "memlayer.integrations.server.nodelay:NoDelayH11Protocol"
