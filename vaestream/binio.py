"""Bytes in files, the helpers every layer shares: exact reads, atomic writes, LEB128 varints, and which
files a poller may pick up.

* :func:`read_exact` reads ``n`` bytes (fewer only at the end of the stream), in bounded pieces, so a
  header that lies about a length costs no more memory than the file holds;
* :func:`atomic_write` writes a whole file under a temporary name in the same folder, flushes and fsyncs
  it, and renames it into place: a reader sees the old file or the new one, and a crash leaves no torn file;
* :func:`leb128` is the unsigned LEB128 varint of the container format and of protocol buffers;
* :func:`is_settled` / :func:`new_files`: the one rule of the file pollers (the streaming encoder's
  ``FileWatcher`` and ``PollFiles``, ``OnlineLearner.follow``): a file still being written -- a dotfile, a
  name with ``.tmp`` in it or ending in ``.part`` -- is not picked up.
"""

from __future__ import annotations

import glob as globmod
import os
from pathlib import Path
from typing import BinaryIO, Iterable

CHUNK = 1 << 24
"""The most bytes :func:`read_exact` asks a stream for at once."""


class Truncated(Exception):
    """A stream broke off (a truncated gzip member): ``data`` holds the bytes read before it did."""

    def __init__(self, data: bytes, why: str):
        super().__init__(why)
        self.data = data


def read_exact(f: BinaryIO, n: int, broken: tuple[type[BaseException], ...] = (EOFError, OSError)) -> bytes:
    """``n`` bytes of ``f``, or fewer at the end of the stream. An exception of a type in ``broken`` raised
    by ``f.read`` (gzip's on a truncated member) becomes :class:`Truncated` with the bytes read so far;
    ``broken=()`` lets every exception through."""
    parts, left = [], n
    while left > 0:
        try:
            b = f.read(min(left, CHUNK))
        except broken as e:
            raise Truncated(b"".join(parts), str(e)) from e
        if not b:
            break
        parts.append(b)
        left -= len(b)
    return b"".join(parts)


def commit(f: BinaryIO, tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Flush, fsync and close ``f`` (open on ``tmp``), then rename ``tmp`` to ``path``."""
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.replace(tmp, path)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (text is UTF-8) to ``path`` atomically and durably: ``PATH.tmp``, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    f = open(tmp, "wb")
    try:
        f.write(data.encode() if isinstance(data, str) else data)
    except BaseException:
        f.close()
        raise
    commit(f, tmp, path)


def leb128(value: int) -> bytes:
    """Unsigned LEB128 of a non-negative ``value`` of any size: 7 bits per byte, low group first, high bit =
    more (also the protocol-buffer varint, see :mod:`vaestream.shardset`)."""
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def is_settled(path: str) -> bool:
    """Whether a poller may pick up ``path``: not a dotfile, no ``.tmp`` in the name, not ending in ``.part``."""
    base = os.path.basename(path)
    return not (base.startswith(".") or ".tmp" in base or base.endswith(".part"))


def new_files(patterns: Iterable[str], seen: Iterable[str] = ()) -> list[str]:
    """The settled regular files matching the glob ``patterns`` and not in ``seen`` (absolute paths),
    oldest mtime first."""
    seen = set(seen)
    found = {os.path.abspath(f) for pat in patterns for f in globmod.glob(pat) if os.path.isfile(f) and is_settled(f)}
    return sorted(found - seen, key=lambda f: (os.stat(f).st_mtime, f))
