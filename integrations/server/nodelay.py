"""uvicorn's HTTP/1.1 protocol with Nagle's algorithm off on every connection.

asyncio turns TCP_NODELAY on only for accepted sockets that report `proto == IPPROTO_TCP`.
uvicorn's multi-worker supervisor binds the listening socket itself with `proto` 0
(Kludex/uvicorn#3149), so with `--workers 2` or more every keep-alive response waited for
the client's delayed ACK: 44 ms a request at one client on loopback, against 1 ms with one
worker (RESULTS.md, "Memory service under load"). This protocol sets the option itself.
"""

from __future__ import annotations

import asyncio
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol


class NoDelayH11Protocol(H11Protocol):
    """`H11Protocol` that sends each response at once, whatever the listener's `proto`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
