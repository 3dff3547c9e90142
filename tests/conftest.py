"""Shared fixtures: a real exchange server on 127.0.0.1 with an ephemeral port and a temp data dir."""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import pytest

from client import ExchangeClient
from exchange.server import ExchangeServer, ServerConfig


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ExchangeServer]:
    srv = ExchangeServer(ServerConfig(port=0, data_dir=tmp_path / "data", stats_interval=0))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
def connect(server: ExchangeServer):
    """``await connect("alice")``: a logged-in client (or anonymous with None), closed after the test."""
    clients: list[ExchangeClient] = []

    async def _connect(user: str | None = None, timeout: float = 5.0) -> ExchangeClient:
        assert server.address is not None
        client = ExchangeClient(server.address[0], server.address[1], timeout=timeout)
        await client.connect()
        clients.append(client)
        if user is not None:
            await client.login(user)
        return client

    yield _connect
    # Closing is synchronous enough for the fixture's teardown: abort the transports.
    for client in clients:
        client.abort()
