"""The container's frames, index and footer (FORMAT.md sections 2.2-2.3): :func:`pack` of a packed container in
memory, :class:`ContainerReader` (random access), :func:`iter_stream` (front to back, a pipe) and
:class:`ContainerWriter` (an indexed file, appendable)."""

from __future__ import annotations

import bisect
import io
import os
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

from vaestream.binio import commit
from vaestream.coding.container.header import (CRC, END_TAG, FOOTER, FRAME_TAG, INDEX_TAG, MAX_FRAME_BYTES,
                                               MAX_FRAME_RECORDS, Head, Header, parse_header, read_checked,
                                               read_varint, varint)
from vaestream.errors import BitstreamError


def frame_bytes(n_records: int, payload: bytes, header_bytes: bytes = b"", tagged: bool = False) -> bytes:
    """One frame: records varint, payload length varint, CRC32, payload (``tagged``: after an ``"F"``, as in an
    indexed file). The CRC32 is that of ``header_bytes`` (the header the frame follows) + fields + payload."""
    return _frame(n_records, payload, zlib.crc32(header_bytes), tagged)


def _frame(n_records: int, payload: bytes, seed: int, tagged: bool) -> bytes:
    if not 0 <= n_records <= MAX_FRAME_RECORDS or len(payload) > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {n_records} records and {len(payload)} bytes is too large")
    fields = varint(n_records) + varint(len(payload))
    crc = zlib.crc32(payload, zlib.crc32(fields, seed))
    return (FRAME_TAG if tagged else b"") + fields + CRC.pack(crc) + payload


def _frame_size(n_records: int, length: int, tagged: bool) -> int:
    return int(tagged) + len(varint(n_records)) + len(varint(length)) + 4 + length


def _read_fields(f: BinaryIO, name: str) -> tuple[int, int, bytes]:
    fields = bytearray()
    n = read_varint(f, fields, name, "frame header")
    length = read_varint(f, fields, name, "frame header")
    if length > MAX_FRAME_BYTES or n > MAX_FRAME_RECORDS:
        raise BitstreamError(f"{name}: corrupt frame header ({n} records, payload length {length})")
    return n, length, bytes(fields)


def _read_frame(f: BinaryIO, name: str, seed: int, expect: tuple[int, int] | None = None) -> tuple[int, bytes]:
    """Read one frame (after its tag, if any) and check its CRC32; ``expect``: (records, length) of the index."""
    n, length, fields = _read_fields(f, name)
    if expect is not None and (n, length) != tuple(expect):
        raise BitstreamError(f"{name}: frame holds {n} records in {length} bytes, the index says {expect[0]} in "
                             f"{expect[1]}")
    (crc,) = CRC.unpack(read_checked(f, 4, name, "frame header"))
    payload = read_checked(f, length, name, "frame payload")
    if zlib.crc32(payload, zlib.crc32(fields, seed)) != crc:
        raise BitstreamError(f"{name}: corrupt frame (CRC mismatch)")
    return n, payload


def _index_bytes(entries: list[tuple[int, int]], seed: int) -> bytes:
    """Index and footer for frames of (records, payload length)."""
    body = INDEX_TAG + varint(len(entries)) + b"".join(varint(n) + varint(length) for n, length in entries)
    body += CRC.pack(zlib.crc32(body, seed))
    return body + FOOTER.pack(len(body), END_TAG)


def _read_index(f: BinaryIO, name: str, seed: int, expect_count: int | None = None) -> list[tuple[int, int]]:
    """Read an index after its "X" tag (up to and including its CRC) and check it."""
    raw = bytearray(INDEX_TAG)
    count = read_varint(f, raw, name, "index")
    if expect_count is not None and count != expect_count:
        raise BitstreamError(f"{name}: corrupt index ({count} frames, the stream had {expect_count})")
    entries = []
    for _ in range(count):
        n = read_varint(f, raw, name, "index")
        length = read_varint(f, raw, name, "index")
        if n > MAX_FRAME_RECORDS or length > MAX_FRAME_BYTES:
            raise BitstreamError(f"{name}: corrupt index (a frame of {n} records, {length} bytes)")
        entries.append((n, length))
    (crc,) = CRC.unpack(read_checked(f, 4, name, "index"))
    if zlib.crc32(raw, seed) != crc:
        raise BitstreamError(f"{name}: corrupt index or header (CRC mismatch)")
    return entries


def _verify_first(f: BinaryIO, head: Head, name: str) -> tuple[int, bytes] | list[tuple[int, int]] | None:
    """Read the first CRC-bearing item after the header (which verifies the header): a frame ``(records,
    payload)``, the index of an indexed file without frames (its entries), or (packed, no frames) the
    header's own CRC32 (None)."""
    if head.indexed:
        tag = f.read(1)
        if tag == FRAME_TAG:
            return _read_frame(f, name, head.seed)
        if tag == INDEX_TAG:
            return _read_index(f, name, head.seed)
        if not tag:
            raise BitstreamError(f"{name}: truncated stream (ends after the header)")
        raise BitstreamError(f"{name}: corrupt stream (expected a frame or the index, found {tag!r})")
    if head.frames == 0:
        (crc,) = CRC.unpack(read_checked(f, 4, name, "header CRC"))
        if crc != head.seed:
            raise BitstreamError(f"{name}: corrupt header (CRC mismatch)")
        return None
    return _read_frame(f, name, head.seed)


def read_header(f: BinaryIO, name: str = "stream") -> Header:
    """Read a container header from the current position of ``f``, leaving ``f`` just after it.

    On a seekable ``f`` the header is verified (by the CRC32 of the first frame, or of the index, which covers
    it) before it is returned; on a pipe only its form is checked (:func:`iter_stream` verifies it).
    """
    head = parse_header(f, name)
    seekable = False
    try:
        seekable = f.seekable()
    except (AttributeError, OSError, ValueError):
        pass
    if seekable:
        pos = f.tell()
        _verify_first(f, head, name)
        f.seek(pos)
    return head.header


def pack(header: Header, frames: list[tuple[int, bytes]]) -> bytes:
    """A complete packed container (header and frames) in memory; ``frames`` are (records, payload)."""
    raw = header.to_bytes(frames=len(frames))
    seed = zlib.crc32(raw)
    out = bytearray(raw)
    for n, payload in frames:
        out += _frame(n, payload, seed, tagged=False)
    if not frames:
        out += CRC.pack(seed)
    return bytes(out)


# -- readers -------------------------------------------------------------------------------------------------
class ContainerReader:
    """Random access to a container (packed or indexed).

    Args:
      source: a path, ``bytes``, or a seekable binary file object (the container starts at offset 0).

    Attributes:
      header: the :class:`Header` (verified).
      frames: ``[(offset, first_record, records)]``, from the index or (packed) by skipping frames.
      num_records: the total number of records.
      indexed: whether the container has an index (a :class:`ContainerWriter` file).
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
        head = parse_header(f, name)
        self._head = head
        self.header = head.header
        self.indexed = head.indexed
        start = len(head.raw)
        size = f.seek(0, io.SEEK_END)
        entries: list[tuple[int, int]] = []
        if head.indexed:
            if size < start + 1 + FOOTER.size:
                raise BitstreamError(f"{name}: truncated stream (no index; {size} bytes)")
            f.seek(size - FOOTER.size)
            index_size, tag = FOOTER.unpack(f.read(FOOTER.size))
            index_offset = size - FOOTER.size - index_size
            if tag != END_TAG:
                raise BitstreamError(f"{name}: truncated or corrupt stream (no end marker)")
            if not start <= index_offset <= size - FOOTER.size - 6:
                raise BitstreamError(f"{name}: corrupt footer (index of {index_size} bytes)")
            f.seek(index_offset)
            if f.read(1) != INDEX_TAG:
                raise BitstreamError(f"{name}: corrupt index (no index at offset {index_offset})")
            entries = _read_index(f, name, head.seed)  # its CRC verifies the header
            if f.tell() != size - FOOTER.size:
                raise BitstreamError(f"{name}: corrupt index ({len(entries)} frames do not fill {index_size} bytes)")
            offset = start
            for n, length in entries:
                offset += _frame_size(n, length, True)
            if offset != index_offset:
                raise BitstreamError(f"{name}: corrupt stream (frames end at {offset}, the index starts at "
                                     f"{index_offset})")
            end = index_offset
        else:
            f.seek(start)
            _verify_first(f, head, name)  # verifies the header
            offset = start
            for i in range(head.frames):
                f.seek(offset)
                n, length, fields = _read_fields(f, name)
                entries.append((n, length))
                offset += len(fields) + 4 + length
                if offset > size:
                    raise BitstreamError(f"{name}: truncated stream (frame {i} of {head.frames}: ends at {offset}, "
                                         f"the stream at {size})")
            if head.frames == 0:
                offset += 4
            if offset != size:
                raise BitstreamError(f"{name}: unexpected data after the end of the container ({size - offset} "
                                     "bytes)")
            end = size
        frames, first_record, offset = [], 0, start
        for n, length in entries:
            frames.append((offset, first_record, n))
            first_record += n
            offset += _frame_size(n, length, head.indexed)
        self.frames = frames
        self._entries = entries
        self.num_records = first_record
        self.index_offset = end
        self._starts = [fr[1] for fr in frames]

    def __len__(self) -> int:
        return self.num_records

    def read_frame(self, i: int) -> tuple[int, bytes]:
        """(records, payload) of frame ``i``, CRC-checked (the CRC covers the header too)."""
        offset, _, _ = self.frames[i]
        f = self._f
        f.seek(offset)
        if self.indexed and f.read(1) != FRAME_TAG:
            raise BitstreamError(f"{self.name}: corrupt stream (no frame at offset {offset})")
        return _read_frame(f, self.name, self._head.seed, self._entries[i])

    def frame_of(self, record: int) -> int:
        """The index of the frame holding ``record``."""
        if not 0 <= record < self.num_records:
            raise IndexError(f"{self.name}: record {record} out of range [0, {self.num_records})")
        return bisect.bisect_right(self._starts, record) - 1

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

    Yields the :class:`Header` first -- once the first frame (or the index, or the header's CRC) has verified
    it -- then ``(records, payload)`` per frame as it arrives. A packed container ends after the frames its
    header counts; an indexed one with its index (checked against the frames seen) and footer. Nothing may
    follow. A stream that ends early raises :class:`BitstreamError` (after yielding the frames that were
    whole).
    """
    name = name or getattr(f, "name", "stream")
    head = parse_header(f, name)
    first = _verify_first(f, head, name)
    yield head.header
    if not head.indexed:
        if first is not None:
            yield first
            for _ in range(head.frames - 1):
                yield _read_frame(f, name, head.seed)
    else:
        seen: list[tuple[int, int]] = []
        item = first
        while isinstance(item, tuple):
            seen.append((item[0], len(item[1])))
            yield item
            tag = f.read(1)
            if tag == FRAME_TAG:
                item = _read_frame(f, name, head.seed)
            elif tag == INDEX_TAG:
                item = _read_index(f, name, head.seed, expect_count=len(seen))
            elif not tag:
                raise BitstreamError(f"{name}: truncated stream (ends after {len(seen)} frames, no index)")
            else:
                raise BitstreamError(f"{name}: corrupt stream (expected a frame or the index, found {tag!r})")
        if item != seen:
            raise BitstreamError(f"{name}: corrupt index (does not match the frames)")
        index_size = len(_index_bytes(seen, 0)) - FOOTER.size
        size, tag = FOOTER.unpack(read_checked(f, FOOTER.size, name, "footer"))
        if tag != END_TAG or size != index_size:
            raise BitstreamError(f"{name}: corrupt footer")
    if f.read(1):
        raise BitstreamError(f"{name}: unexpected data after the end of the container")


# -- writer --------------------------------------------------------------------------------------------------
class ContainerWriter:
    """Write (or append to) an indexed container file frame by frame; the index and footer are written on close.

    Args:
      path: the file. With ``append=True`` and an existing file, its header must match ``header`` (else
        :class:`ModelMismatchError`), and new frames go after the existing ones. An indexed file is extended
        in place (its index and footer are cut and written again on close); a packed one (from
        :func:`pack`, e.g. a saved ``Codec.compress`` output) is rewritten as an indexed file, atomically on
        close.
      header: the :class:`Header` of the stream.

    Attributes:
      entries: ``[(offset, records)]`` of the frames in the file.
    """

    def __init__(self, path: str | os.PathLike, header: Header, append: bool = False):
        self.path = Path(path)
        self.header = header
        self.entries: list[tuple[int, int]] = []
        self._lengths: list[int] = []
        self._tmp: Path | None = None
        raw = header.to_bytes(frames=None)
        if append and self.path.exists() and self.path.stat().st_size > 0:
            with ContainerReader(self.path) as r:
                header.check_compatible(r.header, str(self.path))
                if r.header.single:
                    raise BitstreamError(f"{self.path}: holds a single record; cannot append to it")
                if r.indexed:
                    raw = r._head.raw
                    self._seed = r._head.seed
                    self.entries = [(o, n) for o, _, n in r.frames]
                    self._lengths = [length for _, length in r._entries]
                    end = r.index_offset
                    self._f = open(self.path, "r+b")
                    self._f.seek(end)
                    self._f.truncate()
                else:  # packed: copy its frames into a new indexed file, which replaces it on close
                    self._tmp = self.path.with_name(self.path.name + ".tmp")
                    self._f = open(self._tmp, "wb")
                    self._seed = zlib.crc32(raw)
                    try:
                        self._f.write(raw)
                        for n, payload in r:
                            self.write_frame(n, payload)
                    except BaseException:
                        self._f.close()
                        self._tmp.unlink(missing_ok=True)
                        raise
        else:
            self._f = open(self.path, "wb")
            self._f.write(raw)
            self._seed = zlib.crc32(raw)
        self._closed = False

    def write_frame(self, n_records: int, payload: bytes) -> None:
        """Append one frame of ``n_records`` records."""
        frame = _frame(n_records, payload, self._seed, tagged=True)
        self.entries.append((self._f.tell(), n_records))
        self._lengths.append(len(payload))
        self._f.write(frame)

    def close(self) -> None:
        """Write the index and footer and close the file."""
        if self._closed:
            return
        self._f.write(_index_bytes([(n, length) for (_, n), length in zip(self.entries, self._lengths)],
                                   self._seed))
        if self._tmp is not None:
            commit(self._f, self._tmp, self.path)  # fsync, then rename into place
        else:
            self._f.close()
        self._closed = True

    def __enter__(self) -> "ContainerWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
