"""The vaestream container: a self-describing, framed, appendable file of entropy-coded records.

Layout (all integers little-endian)::

    header   "VAEZ" | version u16 | header length u16 | model fingerprint (16 bytes) | table hash (16 bytes)
             | quality f64 | level u16 | latent dim u16 | flags u16 | ndim u8 | input shape (ndim x u32)
             | CRC32 u32 of all the header bytes before it
    frame*   "VZFR" | records u32 | payload length u32 | CRC32 u32 of (records, length, payload) | payload
    index    "VZIX" | frames u32 | frames x (offset u64, records u32) | CRC32 u32 of the index bytes before it
    footer   index offset u64 | "VZEN"

The header binds the stream to one model (the first 16 bytes of its SHA-256 fingerprint of config and
weights) and one set of coder tables at one quality level (16 bytes of the tables' SHA-256 digest), so a
stream can only be decoded with the model and tables that wrote it. Every frame carries its length and a
CRC32, so truncation and corruption are detected before any payload is decoded. The index at the end
gives random access (the footer points at it); a reader without seeking (a pipe) reads the frames in
order and checks the index against them. Appending rewrites only the index and footer.

Errors: anything malformed raises :class:`vaestream.errors.BitstreamError` naming the source and the
problem; a stream of another model or other tables raises :class:`vaestream.errors.ModelMismatchError`.
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

from vaestream.errors import BitstreamError, ModelMismatchError

MAGIC = b"VAEZ"
FRAME_TAG = b"VZFR"
INDEX_TAG = b"VZIX"
END_TAG = b"VZEN"
FORMAT_VERSION = 1
FINGERPRINT_BYTES = 16
FRAME_HEADER = struct.Struct("<4sIII")      # tag, records, payload length, crc
FOOTER = struct.Struct("<Q4s")              # index offset, tag
INDEX_ENTRY = struct.Struct("<QI")          # frame offset, records
_FIXED = struct.Struct("<4sHH16s16sdHHHB")  # header up to the shape
MAX_FRAME_BYTES = 1 << 30
MAX_FRAME_RECORDS = 1 << 22
"""At most 4M records per frame, so a forged record count cannot make a decoder allocate without bound."""
MAX_NDIM = 8
_CHUNK = 1 << 24


@dataclasses.dataclass(frozen=True)
class Header:
    """What a container says about itself.

    Attributes:
      fingerprint: the first 16 bytes of the model fingerprint (SHA-256 of config and weights).
      table_hash: the first 16 bytes of :meth:`vaestream.coder.CoderTables.digest`.
      quality: the quality the records were coded at; ``level`` its index on the tables' ladder.
      latent_dim: Nz; input_shape: the shape of one record.
      single: the container holds one record given without a batch axis (decompress returns ``[D]``).
      version: the format version.
    """

    fingerprint: bytes
    table_hash: bytes
    quality: float
    level: int
    latent_dim: int
    input_shape: tuple[int, ...]
    single: bool = False
    version: int = FORMAT_VERSION

    def to_bytes(self) -> bytes:
        """The header's bytes, CRC included."""
        if len(self.fingerprint) != FINGERPRINT_BYTES or len(self.table_hash) != FINGERPRINT_BYTES:
            raise ValueError("fingerprint and table hash must be 16 bytes")
        shape = tuple(int(s) for s in self.input_shape)
        length = _FIXED.size + 4 * len(shape) + 4
        body = _FIXED.pack(MAGIC, self.version, length, self.fingerprint, self.table_hash, float(self.quality),
                           self.level, self.latent_dim, int(self.single), len(shape))
        body += struct.pack(f"<{len(shape)}I", *shape)
        return body + struct.pack("<I", zlib.crc32(body))

    def check_compatible(self, other: "Header", name: str) -> None:
        """Raise unless ``other`` (e.g. the header of a file being appended to) codes like this one."""
        if other.fingerprint != self.fingerprint:
            raise ModelMismatchError(f"{name}: written by model {other.fingerprint.hex()}..., not by this model "
                                     f"({self.fingerprint.hex()}...)")
        if other.table_hash != self.table_hash or other.level != self.level:
            raise ModelMismatchError(f"{name}: coded with other coder tables or quality (tables "
                                     f"{other.table_hash.hex()[:12]}..., quality {other.quality:g}; this codec: "
                                     f"{self.table_hash.hex()[:12]}..., quality {self.quality:g})")
        if other.latent_dim != self.latent_dim or other.input_shape != self.input_shape:
            raise BitstreamError(f"{name}: shapes differ (latent {other.latent_dim}, input {other.input_shape})")


def _read_exact(f: BinaryIO, n: int, name: str, what: str) -> bytes:
    parts, left = [], n
    while left > 0:
        b = f.read(min(left, _CHUNK))
        if not b:
            break
        parts.append(b)
        left -= len(b)
    data = b"".join(parts)
    if len(data) != n:
        raise BitstreamError(f"{name}: truncated stream ({what}: {len(data)} of {n} bytes)")
    return data


def read_header(f: BinaryIO, name: str = "stream") -> Header:
    """Read and check a container header from the current position of ``f``."""
    head = f.read(_FIXED.size)
    if len(head) < 4 or head[:4] != MAGIC:
        if len(head) < 4 and MAGIC.startswith(head):
            raise BitstreamError(f"{name}: truncated stream ({len(head)} bytes, no complete header)")
        raise BitstreamError(f"{name}: not a vaestream container (magic {head[:4]!r}, expected {MAGIC!r})")
    if len(head) >= 6:
        (version,) = struct.unpack_from("<H", head, 4)
        if version != FORMAT_VERSION:
            raise BitstreamError(f"{name}: container format version {version}; this vaestream reads version "
                                 f"{FORMAT_VERSION}")
    if len(head) < _FIXED.size:
        raise BitstreamError(f"{name}: truncated stream (header: {len(head)} of {_FIXED.size}+ bytes)")
    _, version, length, fp, th, quality, level, nz, flags, ndim = _FIXED.unpack(head)
    if ndim > MAX_NDIM or length != _FIXED.size + 4 * ndim + 4:
        raise BitstreamError(f"{name}: corrupt header (length {length}, {ndim} dimensions)")
    rest = _read_exact(f, length - _FIXED.size, name, "header")
    (crc,) = struct.unpack_from("<I", rest, len(rest) - 4)
    if zlib.crc32(head + rest[:-4]) != crc:
        raise BitstreamError(f"{name}: corrupt header (CRC mismatch)")
    shape = struct.unpack(f"<{ndim}I", rest[:-4])
    if flags & ~1:
        raise BitstreamError(f"{name}: unknown header flags 0x{flags:04x}")
    return Header(fingerprint=fp, table_hash=th, quality=quality, level=level, latent_dim=nz,
                  input_shape=tuple(shape), single=bool(flags & 1), version=version)


def frame_bytes(n_records: int, payload: bytes) -> bytes:
    """One frame: tag, record count, payload length, CRC32, payload."""
    if not 0 <= n_records <= MAX_FRAME_RECORDS or len(payload) > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {n_records} records and {len(payload)} bytes is too large")
    crc = zlib.crc32(payload, zlib.crc32(struct.pack("<II", n_records, len(payload))))
    return FRAME_HEADER.pack(FRAME_TAG, n_records, len(payload), crc) + payload


def _index_bytes(entries: list[tuple[int, int]], index_offset: int) -> bytes:
    body = INDEX_TAG + struct.pack("<I", len(entries)) + b"".join(INDEX_ENTRY.pack(o, n) for o, n in entries)
    return body + struct.pack("<I", zlib.crc32(body)) + FOOTER.pack(index_offset, END_TAG)


def pack(header: Header, frames: list[tuple[int, bytes]]) -> bytes:
    """A complete container (header, frames, index, footer) in memory; ``frames`` are (records, payload)."""
    out = bytearray(header.to_bytes())
    entries = []
    for n, payload in frames:
        entries.append((len(out), n))
        out += frame_bytes(n, payload)
    out += _index_bytes(entries, len(out))
    return bytes(out)


def _read_frame_at(f: BinaryIO, name: str, expect_records: int | None = None) -> tuple[int, bytes]:
    head = _read_exact(f, FRAME_HEADER.size, name, "frame header")
    tag, n, length, crc = FRAME_HEADER.unpack(head)
    if tag != FRAME_TAG:
        raise BitstreamError(f"{name}: corrupt stream (expected a frame, found {tag!r})")
    if length > MAX_FRAME_BYTES or n > MAX_FRAME_RECORDS:
        raise BitstreamError(f"{name}: corrupt frame header ({n} records, payload length {length})")
    if expect_records is not None and n != expect_records:
        raise BitstreamError(f"{name}: frame holds {n} records, the index says {expect_records}")
    payload = _read_exact(f, length, name, "frame payload")
    if zlib.crc32(payload, zlib.crc32(struct.pack("<II", n, length))) != crc:
        raise BitstreamError(f"{name}: corrupt frame (CRC mismatch)")
    return n, payload


def _parse_index(data: bytes, name: str, index_offset: int) -> list[tuple[int, int]]:
    if len(data) < 12 or data[:4] != INDEX_TAG:
        raise BitstreamError(f"{name}: corrupt index (no index at offset {index_offset})")
    (count,) = struct.unpack_from("<I", data, 4)
    size = 8 + count * INDEX_ENTRY.size
    if len(data) != size + 4:
        raise BitstreamError(f"{name}: corrupt index ({count} frames do not fit {len(data)} bytes)")
    (crc,) = struct.unpack_from("<I", data, size)
    if zlib.crc32(data[:size]) != crc:
        raise BitstreamError(f"{name}: corrupt index (CRC mismatch)")
    return [INDEX_ENTRY.unpack_from(data, 8 + i * INDEX_ENTRY.size) for i in range(count)]


class ContainerReader:
    """Random access to a container through its index.

    Args:
      source: a path, ``bytes``, or a seekable binary file object.

    Attributes:
      header: the :class:`Header`.
      frames: ``[(offset, first_record, records)]`` from the index.
      num_records: the total number of records.
    """

    def __init__(self, source: str | os.PathLike | bytes | bytearray | BinaryIO, name: str | None = None):
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._f: BinaryIO = io.BytesIO(bytes(source))
            self.name = name or "stream"
            self._own = True
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise BitstreamError(f"{path}: no such file")
            self._f = open(path, "rb")
            self.name = name or str(path)
            self._own = True
        else:
            self._f = source
            self.name = name or getattr(source, "name", "stream")
            self._own = False
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        f, name = self._f, self.name
        f.seek(0)
        self.header = read_header(f, name)
        self._data_start = f.tell()
        size = f.seek(0, io.SEEK_END)
        if size < self._data_start + FOOTER.size:
            raise BitstreamError(f"{name}: truncated stream (no index; {size} bytes)")
        f.seek(size - FOOTER.size)
        index_offset, tag = FOOTER.unpack(f.read(FOOTER.size))
        if tag != END_TAG:
            raise BitstreamError(f"{name}: truncated or corrupt stream (no end marker)")
        if not self._data_start <= index_offset <= size - FOOTER.size - 12:
            raise BitstreamError(f"{name}: corrupt footer (index offset {index_offset})")
        f.seek(index_offset)
        entries = _parse_index(f.read(size - FOOTER.size - index_offset), name, index_offset)
        frames, first, expect = [], 0, self._data_start
        for offset, n in entries:
            if offset != expect:  # frames are contiguous: each starts where the previous one ended
                raise BitstreamError(f"{name}: corrupt index (frame offset {offset}, expected {expect})")
            f.seek(offset + 8)
            (length,) = struct.unpack("<I", _read_exact(f, 4, name, "frame header"))
            frames.append((offset, first, n))
            first += n
            expect = offset + FRAME_HEADER.size + length
        if expect != index_offset:
            raise BitstreamError(f"{name}: corrupt stream (frames end at {expect}, the index starts at "
                                 f"{index_offset})")
        self.frames = frames
        self.num_records = first
        self.index_offset = index_offset

    def __len__(self) -> int:
        return self.num_records

    def read_frame(self, i: int) -> tuple[int, bytes]:
        """(records, payload) of frame ``i``, CRC-checked."""
        offset, _, n = self.frames[i]
        self._f.seek(offset)
        return _read_frame_at(self._f, self.name, n)

    def frame_of(self, record: int) -> int:
        """The index of the frame holding ``record``."""
        import bisect

        if not 0 <= record < self.num_records:
            raise IndexError(f"{self.name}: record {record} out of range [0, {self.num_records})")
        return bisect.bisect_right([fr[1] for fr in self.frames], record) - 1

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        for i in range(len(self.frames)):
            yield self.read_frame(i)

    def close(self) -> None:
        if self._own:
            self._f.close()

    def __enter__(self) -> "ContainerReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_stream(f: BinaryIO, name: str | None = None) -> Iterator[Header | tuple[int, bytes]]:
    """Read a container front to back without seeking (e.g. from a pipe).

    Yields the :class:`Header` first, then ``(records, payload)`` per frame as it arrives; after the last
    frame the index and footer are read and checked against the frames seen, and nothing may follow.
    A stream that ends early raises :class:`BitstreamError` (after yielding the frames that were whole).
    """
    name = name or getattr(f, "name", "stream")
    header = read_header(f, name)
    yield header
    pos = len(header.to_bytes())
    seen: list[tuple[int, int]] = []
    while True:
        tag = f.read(4)
        if len(tag) < 4:
            raise BitstreamError(f"{name}: truncated stream (ends after {len(seen)} frames, no index)")
        if tag == FRAME_TAG:
            rest = _read_exact(f, FRAME_HEADER.size - 4, name, "frame header")
            n, length, crc = struct.unpack("<III", rest)
            if length > MAX_FRAME_BYTES or n > MAX_FRAME_RECORDS:
                raise BitstreamError(f"{name}: corrupt frame header ({n} records, payload length {length})")
            payload = _read_exact(f, length, name, "frame payload")
            if zlib.crc32(payload, zlib.crc32(struct.pack("<II", n, length))) != crc:
                raise BitstreamError(f"{name}: corrupt frame (CRC mismatch)")
            seen.append((pos, n))
            pos += FRAME_HEADER.size + length
            yield n, payload
        elif tag == INDEX_TAG:
            count_b = _read_exact(f, 4, name, "index")
            (count,) = struct.unpack("<I", count_b)
            if count != len(seen):
                raise BitstreamError(f"{name}: corrupt index ({count} frames, the stream had {len(seen)})")
            body = tag + count_b + _read_exact(f, count * INDEX_ENTRY.size + 4, name, "index")
            entries = _parse_index(body, name, pos)
            if [tuple(e) for e in entries] != seen:
                raise BitstreamError(f"{name}: corrupt index (does not match the frames)")
            footer = _read_exact(f, FOOTER.size, name, "footer")
            index_offset, end = FOOTER.unpack(footer)
            if end != END_TAG or index_offset != pos:
                raise BitstreamError(f"{name}: corrupt footer")
            if f.read(1):
                raise BitstreamError(f"{name}: unexpected data after the end of the container")
            return
        else:
            raise BitstreamError(f"{name}: corrupt stream (expected a frame or the index, found {tag!r})")


class ContainerWriter:
    """Write (or append to) a container file frame by frame; the index and footer are written on close.

    Args:
      path: the file. With ``append=True`` and an existing file, its header must match ``header`` (else
        :class:`ModelMismatchError`), and new frames go after the existing ones.
      header: the :class:`Header` of the stream.
    """

    def __init__(self, path: str | os.PathLike, header: Header, append: bool = False):
        self.path = Path(path)
        self.header = header
        self.entries: list[tuple[int, int]] = []
        if append and self.path.exists() and self.path.stat().st_size > 0:
            with ContainerReader(self.path) as r:
                header.check_compatible(r.header, str(self.path))
                if r.header.single:
                    raise BitstreamError(f"{self.path}: holds a single record; cannot append to it")
                self.entries = [(o, n) for o, _, n in r.frames]
                end = r.index_offset
            self._f = open(self.path, "r+b")
            self._f.seek(end)
            self._f.truncate()
        else:
            self._f = open(self.path, "wb")
            self._f.write(header.to_bytes())
        self._closed = False

    def write_frame(self, n_records: int, payload: bytes) -> None:
        """Append one frame of ``n_records`` records."""
        self.entries.append((self._f.tell(), n_records))
        self._f.write(frame_bytes(n_records, payload))

    def close(self) -> None:
        """Write the index and footer and close the file."""
        if self._closed:
            return
        self._f.write(_index_bytes(self.entries, self._f.tell()))
        self._f.close()
        self._closed = True

    def __enter__(self) -> "ContainerWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
