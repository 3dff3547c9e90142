"""The terminal client driven for tests: a pipe for a keyboard, plain text for a screen."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path
from typing import Any

from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output.plain_text import PlainTextOutput

from client.tui import ClientOptions, run_client

WAIT = 10.0


class Screen:
    """What the app printed, as plain text, and bounded waits on it."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()
        self.output = PlainTextOutput(self.buffer)

    @property
    def text(self) -> str:
        return self.buffer.getvalue()

    async def wait_for(self, pattern: str, timeout: float = WAIT, after: int = 0) -> re.Match[str]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            match = re.search(pattern, self.text[after:])
            if match:
                return match
            if loop.time() > deadline:
                raise AssertionError(f"{pattern!r} not shown within {timeout} s; screen ends with:\n"
                                     f"{self.text[-3000:]}")
            await asyncio.sleep(0.02)


class Terminal:
    """The TUI running as a task, with a pipe for a keyboard."""

    def __init__(self, server: Any, user: str, data_dir: Path, market: str = "BTC-USD") -> None:
        host, port = server.address
        self.options = ClientOptions(user=user, host=host, port=port, market=market, data_dir=data_dir, timeout=5.0)
        self.screen = Screen()
        self.mark = 0

    async def __aenter__(self) -> Terminal:
        self._pipe_cm = create_pipe_input()
        self.keys = self._pipe_cm.__enter__()
        self.task = asyncio.create_task(
            run_client(self.options, input=self.keys, output=self.screen.output, refresh_interval=0.1)
        )
        await self.screen.wait_for(r"Order history: ")
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self._pipe_cm.__exit__(None, None, None)

    async def type(self, line: str, expect: str, timeout: float = WAIT) -> re.Match[str]:
        """Type a line and wait for ``expect`` to be printed after it."""
        self.mark = len(self.screen.text)
        self.keys.send_text(line + "\r")
        return await self.screen.wait_for(expect, timeout, after=self.mark)

    async def exit_code(self) -> int:
        return await asyncio.wait_for(self.task, WAIT)

    async def assert_still_usable(self) -> None:
        """The session is still running and answers a command."""
        await asyncio.sleep(0.3)
        assert not self.task.done(), f"the client ended (exit {self.task.result()}):\n{self.screen.text[-1500:]}"
        await self.type("markets", r"fees maker/taker")
