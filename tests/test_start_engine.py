"""`run/start_engine.py` as a real subprocess: it starts, serves, stops cleanly, refuses bad input.

Every wait is bounded; a process still running when a test ends is killed.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from client import ExchangeClient

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run" / "start_engine.py"
T = 10.0  # a cold interpreter start on a slow machine can take a few seconds
LISTENING = re.compile(r"Exchange listening on (\S+):(\d+)")


@pytest.fixture
async def engine(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[tuple[asyncio.subprocess.Process, str, int]]]]:
    """``await engine(*args)``: start the script on port 0, return (process, host, port)."""
    procs: list[asyncio.subprocess.Process] = []

    async def _start(*args: str) -> tuple[asyncio.subprocess.Process, str, int]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPT),
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "data"),
            *args,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), T)).decode()
        match = LISTENING.search(line)
        assert match, f"unexpected first line {line!r}"
        return proc, match.group(1), int(match.group(2))

    yield _start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), T)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_serves_and_stops_cleanly_on_a_signal(
    engine, tmp_path: Path, sig: signal.Signals
) -> None:
    proc, host, port = await engine()
    assert host == "127.0.0.1" and 0 < port < 65536  # loopback unless told otherwise
    client = ExchangeClient(host, port, timeout=T)
    await asyncio.wait_for(client.connect(), T)
    try:
        assert (await asyncio.wait_for(client.ping(), T))["type"] == "pong"
        await asyncio.wait_for(client.login("alice"), T)
        new = await asyncio.wait_for(client.sell("BTC-USD", "1", "100.00"), T)
        assert new["exec_type"] == "new"

        proc.send_signal(sig)
        assert await asyncio.wait_for(proc.wait(), T) == 0
        # Connected clients are told why before the connection closes.
        events = []
        while (ev := await asyncio.wait_for(client.next_event(T), T)) is not None:
            events.append(ev)
        assert events[-1] == {
            "type": "error",
            "code": "shutting_down",
            "message": "the exchange is shutting down",
        }
    finally:
        await asyncio.wait_for(client.close(), T)
    assert proc.stdout is not None and proc.stderr is not None
    out = (await asyncio.wait_for(proc.stdout.read(), T)).decode()
    err = (await asyncio.wait_for(proc.stderr.read(), T)).decode()
    assert "Exchange stopped cleanly." in out
    assert "Traceback" not in err
    # What was buffered was written on the way out.
    log = (tmp_path / "data" / "logs" / "alice.log").read_text(encoding="utf-8")
    assert f"PLACED order {new['order_id']} " in log


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--port", "0", *args],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=T,
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"{not json", "is not valid JSON"),
        (
            json.dumps({"assets": {"USD": 2}, "markets": []}).encode(),
            "'markets' must be a non-empty list",
        ),
        (
            json.dumps(
                {
                    "assets": {"USD": 2, "BTC": 8},
                    "markets": [
                        {
                            "symbol": "BTC-USD",
                            "base": "BTC",
                            "quote": "EUR",
                            "tick_size": "0.01",
                            "lot_size": "1",
                        },
                    ],
                }
            ).encode(),
            "unknown asset",
        ),
        (b"\xff\xfe\x00", "is not UTF-8 text"),
        (None, "cannot read markets file"),
    ],
    ids=["bad-json", "no-markets", "unknown-asset", "not-utf8", "missing"],
)
def test_a_bad_markets_file_is_refused_clearly(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    path = tmp_path / "markets.json"
    if content is not None:
        path.write_bytes(content)
    result = run_script("--data-dir", str(tmp_path / "data"), "--markets", str(path))
    assert result.returncode != 0
    assert str(path) in result.stderr and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "listening" not in result.stdout


def test_keys_mode_without_an_accounts_file_is_refused(tmp_path: Path) -> None:
    result = run_script("--data-dir", str(tmp_path / "data"), "--auth", "keys")
    assert result.returncode != 0
    assert "--auth keys needs --accounts FILE" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_negative_rate_limit_is_refused(tmp_path: Path) -> None:
    result = run_script("--data-dir", str(tmp_path / "data"), "--rate-limit", "-5")
    assert result.returncode != 0
    assert "--rate-limit must be 0" in result.stderr
    assert "Traceback" not in result.stderr and "listening" not in result.stdout


def test_a_data_dir_that_cannot_be_a_directory_is_refused_clearly(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    for where in (afile, afile / "data"):
        result = run_script("--data-dir", str(where))
        assert result.returncode == 2, result.stderr
        assert f"cannot use {where} as the data directory" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and "listening" not in result.stdout


def test_a_port_in_use_is_refused_before_the_data_directory_is_touched(tmp_path: Path) -> None:
    """Recovery writes a snapshot; a start that cannot listen must not have done it."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        result = run_script("--data-dir", str(tmp_path / "data"), "--port", str(port))
    finally:
        busy.close()
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "snapshot.json").exists()
    again = run_script("--data-dir", str(tmp_path / "data"), "--snapshot-interval", "-5")
    assert again.returncode == 2 and "--snapshot-interval must be 0" in again.stderr, again.stderr


async def test_a_port_taken_during_recovery_leaves_no_socket_and_no_lock(tmp_path: Path) -> None:
    """The port is bound before recovery but listened on only after it; another socket bound
    with SO_REUSEADDR may start listening on it in between (a second exchange started at the
    same moment on another data directory). The start fails, and must close its socket and
    give the data directory back."""
    from exchange.server import ExchangeServer, ServerConfig, StartupError

    rival = socket.socket()
    rival.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    rival.bind(("127.0.0.1", 0))
    port = rival.getsockname()[1]
    data = tmp_path / "data"
    first = ExchangeServer(ServerConfig(port=port, data_dir=data, writer="inline", stats_interval=0))
    recover = first.persistence.recover

    def rival_listens_meanwhile(*args: object, **kwargs: object) -> object:
        rival.listen()
        return recover(*args, **kwargs)  # type: ignore[arg-type]

    first.persistence.recover = rival_listens_meanwhile  # type: ignore[method-assign]
    try:
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}"):
            await asyncio.wait_for(first.start(), T)
        assert first._server is None
        second = ExchangeServer(ServerConfig(port=0, data_dir=data, writer="inline", stats_interval=0))
        await asyncio.wait_for(second.start(), T)  # the directory was given back
        await asyncio.wait_for(second.stop(), T)
    finally:
        rival.close()


async def test_a_markets_file_without_the_demo_assets_starts_and_funds_what_it_has(
    tmp_path: Path, engine: Callable[..., Awaitable[tuple[asyncio.subprocess.Process, str, int]]],
) -> None:
    """The built-in demo balances name BTC and ACME; a file with only ETH-USD must still start."""
    path = tmp_path / "markets.json"
    path.write_text(json.dumps({
        "assets": {"USD": 6, "ETH": 4},
        "markets": [{"symbol": "ETH-USD", "base": "ETH", "quote": "USD", "tick_size": "0.01",
                     "lot_size": "0.001", "min_qty": "0.001"}],
    }))
    proc, host, port = await engine("--markets", str(path))
    async with ExchangeClient(host, port, timeout=T) as client:
        await client.login("alice")
        balances = await client.balances()
        assert balances["USD"]["available"] == "100000.000000" and balances["ETH"]["available"] == "0.0000"
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), T) == 0

    refused = run_script("--data-dir", str(tmp_path / "data2"), "--markets", str(path),
                         "--demo-balances", "USD=10,BTC=1")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "--demo-balances: the markets have no asset 'BTC' (they have ETH, USD)" in refused.stderr


@pytest.mark.parametrize("script", ["start_engine.py", "start_client.py", "start_simulation.py"])
def test_a_bad_option_is_one_line_not_the_usage_block(script: str) -> None:
    extra = ["--user", "alice"] if script == "start_client.py" else []
    for bad in (["--bogus"], ["--port", "seven"]):
        result = subprocess.run([sys.executable, str(ROOT / "run" / script), *extra, *bad], check=False,
                                cwd=ROOT, capture_output=True, text=True, timeout=T, stdin=subprocess.DEVNULL)
        assert result.returncode == 2, result
        assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"{script}: error: "), result.stderr
        assert result.stderr.endswith(" (see --help)\n") and "usage" not in result.stderr
