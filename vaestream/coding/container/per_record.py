"""The per-record stream ("VM", FORMAT.md section 7): a head (each stream's record count and size, the record
map's ANS words, a CRC32) followed by ordinary containers, written by :func:`pack_per_record` and read by
:func:`read_per_record`."""

from __future__ import annotations

import io
import zlib

from vaestream.coding.container.header import CRC, MAX_FRAME_RECORDS, read_varint, varint
from vaestream.errors import BitstreamError

PER_RECORD_MAGIC = b"VM"
PER_RECORD_FORMAT = 1
PER_RECORD_MAX_STREAMS = 4096


def is_per_record(blob) -> bool:
    """Whether ``blob`` (bytes) is a per-record stream (starts with :data:`PER_RECORD_MAGIC`)."""
    return bytes(blob[:2]) == PER_RECORD_MAGIC


def pack_per_record(shape: tuple[int, ...], n: int, streams: list[tuple[int, bytes]], code: bytes) -> bytes:
    """A per-record stream: ``n`` records of ``shape``, ``streams`` ``[(records, container bytes), ...]`` and
    ``code``, the record map's ANS words (empty for one stream)."""
    head = PER_RECORD_MAGIC + bytes([PER_RECORD_FORMAT, len(shape)]) + b"".join(varint(s) for s in shape)
    head += varint(n) + varint(len(streams)) + b"".join(varint(int(c)) + varint(len(s)) for c, s in streams)
    head += varint(len(code)) + code
    return head + CRC.pack(zlib.crc32(head)) + b"".join(s for _, s in streams)


def read_per_record(blob, name: str = "stream") -> tuple[tuple[int, ...], int, list[tuple[int, bytes]], bytes]:
    """Parse and verify a per-record stream: ``(a record's shape, records, [(records, container bytes), ...],
    the record map's words)``. Raises :class:`BitstreamError` naming ``name`` for anything malformed, truncated or
    corrupt (the record map itself is the reader's to check)."""
    blob = bytes(blob)
    if not is_per_record(blob):
        raise BitstreamError(f"{name}: not a mixed vaestream stream (magic {blob[:2]!r}, expected "
                             f"{PER_RECORD_MAGIC!r})")
    r = io.BytesIO(blob)
    r.seek(len(PER_RECORD_MAGIC))

    def uvar() -> int:
        return read_varint(r, bytearray(), name, "mixed stream header")

    fixed = r.read(2)
    if len(fixed) < 2:
        raise BitstreamError(f"{name}: truncated mixed stream header")
    fmt, ndim = fixed
    if fmt != PER_RECORD_FORMAT or ndim not in (1, 2):
        raise BitstreamError(f"{name}: mixed stream format {fmt}, record ndim {ndim}: this reader knows format "
                             f"{PER_RECORD_FORMAT} of 1- or 2-d records")
    shape = tuple(uvar() for _ in range(ndim))
    n, m = uvar(), uvar()
    if not (1 <= m <= min(PER_RECORD_MAX_STREAMS, n)) or n > MAX_FRAME_RECORDS:
        raise BitstreamError(f"{name}: corrupt mixed stream header ({n} records in {m} streams)")
    sizes = [(uvar(), uvar()) for _ in range(m)]
    code = r.read(uvar())
    crc = r.read(CRC.size)
    if len(crc) < CRC.size:
        raise BitstreamError(f"{name}: truncated mixed stream header")
    if CRC.unpack(crc)[0] != zlib.crc32(blob[:r.tell() - CRC.size]):
        raise BitstreamError(f"{name}: mixed stream header fails its CRC32 (corrupt)")
    if sum(c for c, _ in sizes) != n or len(code) % 4 or (m > 1) != bool(code):
        raise BitstreamError(f"{name}: corrupt mixed stream header (the counts do not add up to {n} records)")
    streams = []
    for i, (c, size) in enumerate(sizes):
        s = r.read(size)
        if len(s) < size:
            raise BitstreamError(f"{name}: truncated: stream {i} of {m} has {len(s)} of its {size} bytes")
        streams.append((c, s))
    if r.read(1):
        raise BitstreamError(f"{name}: trailing bytes after the last of {m} streams")
    return shape, n, streams, code
