"""Client side: the asyncio client library, the user's session history and the terminal UI."""

from client.client import (
    ExchangeClient,
    ExchangeConnectionError,
    ExchangeError,
    OrderRejectedError,
)

__all__ = ["ExchangeClient", "ExchangeConnectionError", "ExchangeError", "OrderRejectedError"]
