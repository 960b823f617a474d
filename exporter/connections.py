"""Bounding a server's client connections: at most a given number open, idle ones first out."""

from __future__ import annotations

import asyncio
from typing import Protocol

from aiohttp import web
from aiohttp.web_protocol import RequestHandler


class ConnectionCounts(Protocol):
    """Where a limited server counts its open connections and those it closed at the limit."""

    connections: int
    connections_closed: int


def limit_connections(server: web.Server, limit: int, counters: ConnectionCounts) -> None:
    """Keep at most limit connections open: past it, close the oldest idle one (so idle
    sockets cannot lock a scraper out), or the new one when every other is busy."""
    admit, lose = server.connection_made, server.connection_lost
    # Open and not being closed, oldest first (aiohttp forgets a connection only once its
    # handler task is done, so server.connections lags behind).
    alive: dict[RequestHandler, None] = {}

    def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
        admit(handler, transport)
        alive[handler] = None
        if len(alive) > limit:
            idle = (h for h in alive if h is not handler and _idle(h))
            evicted = next(idle, handler)
            del alive[evicted]
            evicted.force_close()
            counters.connections_closed += 1
        counters.connections = len(alive)

    def connection_lost(handler: RequestHandler, exc: BaseException | None) -> None:
        lose(handler, exc)
        alive.pop(handler, None)
        counters.connections = len(alive)

    # aiohttp's Server has no hook for this: wrap the two methods its handlers call.
    setattr(server, "connection_made", connection_made)  # noqa: B010
    setattr(server, "connection_lost", connection_lost)  # noqa: B010


def _idle(handler: RequestHandler) -> bool:
    # Waiting for the next request: aiohttp's own keep-alive check asks the same. A handler
    # between requests, still writing its answer, has no such waiter and is not cut off.
    waiter = getattr(handler, "_waiter", None)
    return waiter is not None and not waiter.done()
