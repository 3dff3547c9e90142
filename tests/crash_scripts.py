"""A server in a child process that takes five orders from alice, then is killed (``os._exit(9)``)
at a chosen moment of a snapshot: the crash tests run it with ``python -c``."""

from __future__ import annotations

_TEMPLATE = r'''
import asyncio, os, sys
from pathlib import Path
import orjson
from exchange.server import ExchangeServer, ServerConfig

async def main():
    srv = ExchangeServer(ServerConfig(port=0, data_dir=Path(sys.argv[1]), stats_interval=0,
                                      snapshot_interval=0, snapshot_records=0@CONFIG@))
@SETUP@
    await srv.start()
    r, w = await asyncio.open_connection(*srv.address)
    w.write(b'{"op":"login","user":"alice","id":0}\n')
    await r.readline()
    for i in range(1, 6):
        w.write(b'{"op":"order","id":%d,"market":"BTC-USD","side":"buy","type":"limit",'
                b'"price":"90.00","qty":"0.01"}\n' % i)
        while orjson.loads(await r.readline()).get("id") != i:
            pass
@CRASH@
    await srv.persistence.snapshot()

asyncio.run(main())
'''


def five_orders_then(crash: str, config: str = "", setup: str = "") -> str:
    """The script; ``crash``: lines (indented 4) that arrange the kill before the snapshot,
    ``config``: extra ``ServerConfig`` arguments, ``setup``: lines run before ``start``."""
    return (_TEMPLATE.replace("@CONFIG@", config).replace("@SETUP@\n", setup)
            .replace("@CRASH@\n", crash))
