"""The snapshot file: the engine's whole state at one journal position, written atomically.

File format (``snapshot.json``, one JSON document, readable with ``jq``)::

    {"format":"laptop-exchange-snapshot","version":1,"sha256":"<hex>","content":{...}}

``sha256`` is the digest of the exact bytes of ``content``. ``content`` is whatever the
caller stores (the server puts ``exchange.state.export_state`` there with the journal
position it covers); this module knows bytes, files and integrity, not trading rules.

Why each step of the write:

* temporary file in the same directory, so the rename cannot cross file systems;
* fsync of the file before the rename, so the name never points at unwritten data;
* ``os.replace`` (atomic on POSIX): a reader sees the old snapshot or the new one, never a mix;
* fsync of the directory, so the rename itself survives a power cut.

Reading refuses anything doubtful with ``SnapshotError`` naming the file, and never
changes the file: the operator gets to inspect it. Integers may exceed 64 bits (amounts
in minor units), so the fallback encoder and the decoder are the standard library's,
which keeps every integer exact (orjson would turn a big integer into a float).
"""

from __future__ import annotations

import hashlib
import json
import itertools
import os
import re
from pathlib import Path
from typing import Any

import orjson

SNAPSHOT_FILE = "snapshot.json"
FORMAT = "laptop-exchange-snapshot"
VERSION = 1
_CONTENT_KEY = b',"content":'
_LONG_NUMBER = re.compile(rb"\d{19}")


class SnapshotError(Exception):
    """A snapshot that cannot be trusted; the message names the file and says why."""


def dumps(value: Any) -> bytes:
    """Compact JSON; exact for integers of any size."""
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer beyond 64 bits
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def encode(content: dict[str, Any]) -> bytes:
    body = dumps(content)
    header = b'{"format":"%s","version":%d,"sha256":"%s"' % (
        FORMAT.encode(), VERSION, hashlib.sha256(body).hexdigest().encode(),
    )
    return header + _CONTENT_KEY + body + b"}\n"


def fsync_dir(directory: str | Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TMP_SERIAL = itertools.count(1)  # two writes in flight never share a temporary file


def temp_prefix(path: Path) -> str:
    """Temporary files of ``path`` are named this, then the writer's pid and a serial."""
    return f".{path.name}.tmp-"


def remove_leftover_temp_files(path: str | Path) -> list[Path]:
    """Delete temporary files a crash left behind mid-write; returns what was removed.

    Only safe while nobody else writes snapshots here (the caller holds the data
    directory's lock): such a file was never renamed into place, so nothing refers to it.
    """
    path = Path(path)
    removed = []
    for leftover in path.parent.glob(temp_prefix(path) + "*"):
        leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


def write_snapshot(path: str | Path, content: dict[str, Any], durable: bool = True) -> int:
    """Replace ``path`` atomically with a snapshot of ``content``; returns its size in bytes.

    Blocking: call it from a worker thread when the event loop is running.
    """
    data = encode(content)
    replace_file(Path(path), data, durable)
    return len(data)


def replace_file(path: Path, data: bytes, durable: bool = True) -> None:
    """Put ``data`` at ``path`` atomically (a temporary file renamed over it), and durably
    (file and directory fsynced) unless told otherwise: a reader sees the old file or the
    new one, never a part."""
    tmp = path.with_name(f"{temp_prefix(path)}{os.getpid()}-{next(_TMP_SERIAL)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def read_snapshot(path: str | Path) -> dict[str, Any] | None:
    """The stored content, or None when there is no snapshot; ``SnapshotError`` if untrustworthy."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc.strerror or exc}") from None
    where = data.find(_CONTENT_KEY)
    if where < 0 or not data.rstrip().endswith(b"}"):
        raise SnapshotError(f"snapshot {path} is not a snapshot file (bad JSON or truncated)")
    try:
        header = json.loads(data[:where] + b"}")
    except ValueError as exc:
        raise SnapshotError(f"snapshot {path} is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise SnapshotError(f"snapshot {path} is not a snapshot file (format {header.get('format')!r})"
                            if isinstance(header, dict) else f"snapshot {path} is not a snapshot file")
    if header.get("version") != VERSION:
        raise SnapshotError(
            f"snapshot {path} has format version {header.get('version')!r}; this build reads {VERSION}"
        )
    body = data[where + len(_CONTENT_KEY):data.rstrip().rfind(b"}")]
    if hashlib.sha256(body).hexdigest() != header.get("sha256"):
        raise SnapshotError(f"snapshot {path} failed its integrity check (sha256 mismatch): "
                            "it was changed or damaged after it was written")
    try:
        # orjson is several times faster but turns integers beyond 64 bits into floats;
        # the state never holds a float, so use it unless a long run of digits could be one.
        content = json.loads(body) if _LONG_NUMBER.search(body) else orjson.loads(body)
    except ValueError as exc:
        raise SnapshotError(f"snapshot {path} is not valid JSON: {exc}") from None
    if not isinstance(content, dict):
        raise SnapshotError(f"snapshot {path}: content must be a JSON object")
    return content
