"""The vaestream container (format version 2): a compact, self-describing, framed file of entropy-coded records.

Layout. Integers marked ``varint`` are unsigned LEB128 (7 bits per byte, low group first, minimal length);
fixed-width integers are little-endian::

    header   "VZ" | version u8 (= 2) | flags u8 | model fingerprint (4 bytes)
             | [lossy only: table id (4 bytes) | quality code u8 [| quality f64 if the code is 255]]
             | latent dim varint | input shape (ndim varints) | [frame count varint, if flag COUNTED]
    frame    ["F", indexed layout only] | records varint | payload length varint | CRC32 u32 | payload
    index    "X" | frames varint | frames x (records varint, payload length varint) | CRC32 u32
    footer   index size u32 (from "X" to its CRC) | "VZ"

    flags    bit 0 SINGLE (one record without a batch axis), bit 1 LOSSLESS (bits-back stream: no table id, no
             quality), bit 2 INDEXED (frames are followed by an index and footer), bit 3 COUNTED (a frame count
             follows the shape; without it a packed container holds exactly one frame), bits 4-7 ndim (<= 8)

Every CRC32 covers the header's bytes too: a frame's CRC32 is that of the header followed by the frame's
record count, length and payload (``zlib.crc32(payload, zlib.crc32(fields, crc32(header)))``), and the
index's CRC32 that of the header followed by the index. So every frame read on its own (random access)
also verifies the header, and the header needs no CRC of its own. A packed container of no frames ends
with the CRC32 of its header instead.

Two layouts share the header and frames:

* **packed** (:func:`pack`, what ``Codec.compress`` returns): header, the frames untagged, nothing else.
  The header holds the frame count unless there is exactly one frame (the common case: a batch of up to
  ``frame_records`` records). Random access rebuilds the frame table by skipping frames by their lengths
  (a few bytes read per frame); a stream reader knows the end from the count.
* **indexed** (:class:`ContainerWriter` files): each frame tagged ``"F"``, then an index of (records,
  length) per frame and a footer that locates it from the end of the file; frame offsets follow from the
  lengths. Appending truncates the index and footer, writes frames, and writes them again; a reader of a
  pipe reads frames until the ``"X"`` of the index and checks the index against them.

Overhead. A batch of 1,000 records of a lossy codec on 28 x 28 inputs (latent dim < 128) in one frame
whose payload is under 16 KiB costs 24 bytes: header 16 (magic 2, version 1, flags 1, fingerprint 4,
table id 4, quality 1, latent dim 1, shape 2) and frame 8 (records 2, length 2, CRC32 4). Version 1 spent
119 (a 67-byte header with 16-byte hashes, f64 quality, u16/u32 fields and its own CRC32; 16 bytes per
frame; an index and footer in every blob). Further frames of a packed container cost 1 byte of count plus
about 8 bytes each; the indexed layout adds 1 byte per frame of tag, about 4 per frame of index, and 11.

Design choices.

* **Model binding: 4 bytes of fingerprint + 4 bytes of table id.** The table id is the first 4 bytes of
  :meth:`vaestream.coding.tables.CoderTables.digest`, which hashes the tables *and the whole 32-byte model
  fingerprint*. A lossy stream is accepted only if both match, so a stream of another model passes with
  probability 2^-64 (5e-20) per pair of models, and one coded with another table build of the same model
  (other calibration data or ladder) with probability 2^-32 (2e-10) per pair of builds -- the same odds as a
  zstd frame's 32-bit dictionary id, which plays the same role. The fingerprint prefix also names the
  model for lookup (:meth:`vaestream.online.registry.Registry.find`): two versions of one registry share a 32-bit
  prefix with probability ~N^2 / 2^33 (1e-6 for 100 versions), and then the table id refuses the other one
  with :class:`ModelMismatchError`, never with wrong data. A lossless stream has no tables: it carries the
  fingerprint alone (2^-32), and its bits-back chain refuses a wrong model's decode (the chain does not
  return to its seed). Eight more bytes of fingerprint would cost 0.6 % of a coarse 1,000-record batch.
* **Quality: one byte.** The codec only codes at qualities of its tables' ladder, but a ladder can be any
  list of floats (``build_tables(qualities=...)``), and readers without the tables (the CLI, the registry)
  report the quality, so the header keeps the float itself, compactly: code c in 0..254 means
  ``2^((c - 127) / 2)`` (the default ladder is 2^(k/2), k = -12..6), computed exactly as ``sqrt(2)`` or 1
  times a power of two; any other quality is code 255 and its f64. The level is not stored: the codec
  finds it in its tables by the exact quality (:attr:`Header.level` reads back as None).
* **Lengths, counts and shape as varints**: 1 byte below 128, 2 below 16,384.
* **No separate header CRC** (see above): the header is verified by the first CRC-bearing item after it.
  :func:`read_header` on a seekable file reads that item and seeks back, so a header it returns is
  verified; on a pipe it cannot look ahead, and :func:`iter_stream` yields the header only once the first
  frame (or the index) has verified it.
* **Magic "VZ" + version byte** (2 + 1 bytes, like gzip's): a random file starts with it with odds 2^-24,
  and then fails the CRC. Version-1 containers (magic "VAEZ") are refused with a clear wrong-version error.

Errors: anything malformed raises :class:`vaestream.errors.BitstreamError` naming the source and the
problem; a stream of another model or other tables raises :class:`vaestream.errors.ModelMismatchError`.
No payload is returned before its CRC32 (which covers the header) has been checked.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import io
import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

from vaestream.binio import commit, leb128, read_exact
from vaestream.errors import BitstreamError, ModelMismatchError

MAGIC = b"VZ"
V1_MAGIC = b"VAEZ"
"""The magic of format version 1 (refused with a wrong-version error)."""
FORMAT_VERSION = 2
FINGERPRINT_BYTES = 4
"""Bytes of the model fingerprint a header keeps (see the module docstring for the odds)."""
TABLE_ID_BYTES = 4
"""Bytes of the coder tables' digest a lossy header keeps."""
LOSSLESS_TAG = hashlib.sha256(b"vaestream lossless: bits-back ANS (BB-ANS), format 1").digest()[:16]
"""The :attr:`Header.table_hash` of a lossless stream (flag LOSSLESS on the wire; equals
``vaestream.coding.bitsback.coder.LOSSLESS_TAG``)."""
FRAME_TAG = b"F"
INDEX_TAG = b"X"
END_TAG = b"VZ"
FOOTER = struct.Struct("<I2s")  # index size, end tag
_CRC = struct.Struct("<I")
_F64 = struct.Struct("<d")
FLAG_SINGLE, FLAG_LOSSLESS, FLAG_INDEXED, FLAG_COUNTED = 1, 2, 4, 8
QUALITY_F64 = 255
"""The quality code that says an f64 quality follows."""
MAX_FRAME_BYTES = 1 << 30
MAX_FRAME_RECORDS = 1 << 22
"""At most 4M records per frame, so a forged record count cannot make a decoder allocate without bound."""
MAX_NDIM = 8
MAX_VARINT = (1 << 32) - 1
"""Varints hold at most 32 bits (5 bytes)."""


# -- small encodings -----------------------------------------------------------------------------------------
def varint(value: int) -> bytes:
    """A container varint: :func:`leb128` of ``value``, which must be in [0, 2^32)."""
    if not 0 <= value <= MAX_VARINT:
        raise ValueError(f"varint out of range: {value}")
    return leb128(value)


def read_varint(f: BinaryIO, raw: bytearray, name: str, what: str) -> int:
    """Read one minimal varint from ``f``, appending its bytes to ``raw``; :class:`BitstreamError` naming ``name``
    and ``what`` if it is truncated, not minimal or over 32 bits."""
    value = 0
    for i in range(5):
        b = f.read(1)
        if not b:
            raise BitstreamError(f"{name}: truncated stream ({what})")
        raw += b
        value |= (b[0] & 0x7F) << (7 * i)
        if not b[0] & 0x80:
            if (b[0] == 0 and i > 0) or value > MAX_VARINT:
                raise BitstreamError(f"{name}: corrupt {what} (malformed varint)")
            return value
    raise BitstreamError(f"{name}: corrupt {what} (varint longer than 5 bytes)")


def ladder_quality(code: int) -> float:
    """The quality of code ``c`` (0..254): ``2^((c - 127) / 2)``, exact (1 or sqrt(2) times a power of 2)."""
    k = code - 127
    return math.ldexp(1.0, k // 2) if k % 2 == 0 else math.ldexp(math.sqrt(2.0), (k - 1) // 2)


def _quality_bytes(q: float) -> bytes:
    if not (math.isfinite(q) and q > 0):
        raise ValueError(f"quality must be a positive finite number, got {q!r}")
    c = round(2 * math.log2(q)) + 127
    if 0 <= c < QUALITY_F64 and ladder_quality(c) == q:
        return bytes([c])
    return bytes([QUALITY_F64]) + _F64.pack(q)


def _read_exact(f: BinaryIO, n: int, name: str, what: str) -> bytes:
    data = read_exact(f, n, broken=())
    if len(data) != n:
        raise BitstreamError(f"{name}: truncated stream ({what}: {len(data)} of {n} bytes)")
    return data


# -- header --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Header:
    """What a container says about itself.

    Attributes:
      fingerprint: the model fingerprint (SHA-256 of config and weights); its first
        :data:`FINGERPRINT_BYTES` bytes are kept (a longer value is cut).
      table_hash: the coder tables' digest (:meth:`vaestream.coding.tables.CoderTables.digest`), of which the first
        :data:`TABLE_ID_BYTES` bytes are kept; or :data:`LOSSLESS_TAG` for a lossless (bits-back) stream.
      quality: the quality the records were coded at (0.0 for a lossless stream).
      level: its index on the writer's ladder; not stored (a header read back has None, or 0 if lossless)
        and not compared: the codec finds the level in its tables from the exact quality.
      latent_dim: Nz; input_shape: the shape of one record.
      single: the container holds one record given without a batch axis (decompress returns ``[D]``).
      version: the format version.
    """

    fingerprint: bytes
    table_hash: bytes
    quality: float
    level: int | None = dataclasses.field(compare=False)
    latent_dim: int
    input_shape: tuple[int, ...]
    single: bool = False
    version: int = FORMAT_VERSION

    def __post_init__(self):
        fp, th = bytes(self.fingerprint), bytes(self.table_hash)
        if len(fp) < FINGERPRINT_BYTES:
            raise ValueError(f"fingerprint must have at least {FINGERPRINT_BYTES} bytes, got {len(fp)}")
        if th != LOSSLESS_TAG:
            if len(th) < TABLE_ID_BYTES:
                raise ValueError(f"table hash must have at least {TABLE_ID_BYTES} bytes, got {len(th)}")
            th = th[:TABLE_ID_BYTES]
        shape = tuple(int(s) for s in self.input_shape)
        if len(shape) > MAX_NDIM or any(not 0 <= s <= MAX_VARINT for s in shape):
            raise ValueError(f"input shape {shape}: at most {MAX_NDIM} dimensions of < 2^32")
        if not 0 <= int(self.latent_dim) <= MAX_VARINT:
            raise ValueError(f"latent dim {self.latent_dim} out of range")
        object.__setattr__(self, "fingerprint", fp[:FINGERPRINT_BYTES])
        object.__setattr__(self, "table_hash", th)
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "latent_dim", int(self.latent_dim))
        object.__setattr__(self, "quality", float(self.quality))
        object.__setattr__(self, "single", bool(self.single))

    @property
    def lossless(self) -> bool:
        """Whether this is the header of a lossless (bits-back) stream."""
        return self.table_hash == LOSSLESS_TAG

    def to_bytes(self, frames: int | None = 1) -> bytes:
        """The header's bytes: of a packed container of ``frames`` frames, or (None) of an indexed file."""
        if self.version != FORMAT_VERSION:
            raise ValueError(f"this vaestream writes container format version {FORMAT_VERSION}, not {self.version}")
        counted = frames is not None and frames != 1
        flags = (int(self.single) * FLAG_SINGLE | int(self.lossless) * FLAG_LOSSLESS
                 | int(frames is None) * FLAG_INDEXED | int(counted) * FLAG_COUNTED | len(self.input_shape) << 4)
        out = bytearray(MAGIC + bytes([FORMAT_VERSION, flags]) + self.fingerprint)
        if not self.lossless:
            out += self.table_hash + _quality_bytes(self.quality)
        out += varint(self.latent_dim) + b"".join(varint(s) for s in self.input_shape)
        if counted:
            out += varint(frames)
        return bytes(out)

    def check_compatible(self, other: "Header", name: str) -> None:
        """Raise unless ``other`` (e.g. the header of a file being appended to) codes like this one."""
        if other.fingerprint != self.fingerprint:
            raise ModelMismatchError(f"{name}: written by model {other.fingerprint.hex()}..., not by this model "
                                     f"({self.fingerprint.hex()}...)")
        if other.table_hash != self.table_hash or other.quality != self.quality:
            raise ModelMismatchError(f"{name}: coded with other coder tables or quality (tables "
                                     f"{other.table_hash.hex()[:12]}..., quality {other.quality:g}; this codec: "
                                     f"{self.table_hash.hex()[:12]}..., quality {self.quality:g})")
        if other.latent_dim != self.latent_dim or other.input_shape != self.input_shape:
            raise BitstreamError(f"{name}: shapes differ (latent {other.latent_dim}, input {other.input_shape})")


@dataclasses.dataclass(frozen=True)
class _Head:
    """A parsed header and its layout: the raw bytes (whose CRC32 seeds every other CRC) and the frame count."""

    header: Header
    raw: bytes
    indexed: bool
    frames: int | None  # packed: the frame count; indexed: None
    seed: int


def _parse_header(f: BinaryIO, name: str) -> _Head:
    head = f.read(4)
    if head[:2] != MAGIC:
        if head == V1_MAGIC:
            v = f.read(2)
            version = struct.unpack("<H", v)[0] if len(v) == 2 else 1
            raise BitstreamError(f"{name}: container format version {version} (an older vaestream); this vaestream "
                                 f"reads version {FORMAT_VERSION}: compress the records again")
        if len(head) < 2 and MAGIC.startswith(head):
            raise BitstreamError(f"{name}: truncated stream ({len(head)} bytes, no complete header)")
        raise BitstreamError(f"{name}: not a vaestream container (magic {head[:4]!r}, expected {MAGIC!r})")
    if len(head) >= 3 and head[2] != FORMAT_VERSION:
        raise BitstreamError(f"{name}: container format version {head[2]}; this vaestream reads version "
                             f"{FORMAT_VERSION}")
    if len(head) < 4:
        raise BitstreamError(f"{name}: truncated stream ({len(head)} bytes, no complete header)")
    raw = bytearray(head)
    flags = head[3]
    ndim = flags >> 4
    indexed, counted = bool(flags & FLAG_INDEXED), bool(flags & FLAG_COUNTED)
    if ndim > MAX_NDIM or (indexed and counted):
        raise BitstreamError(f"{name}: corrupt header (flags 0x{flags:02x})")
    fp = _read_exact(f, FINGERPRINT_BYTES, name, "header")
    raw += fp
    if flags & FLAG_LOSSLESS:
        table, quality, level = LOSSLESS_TAG, 0.0, 0
    else:
        tq = _read_exact(f, TABLE_ID_BYTES + 1, name, "header")
        raw += tq
        table, code, level = tq[:TABLE_ID_BYTES], tq[-1], None
        if code == QUALITY_F64:
            b = _read_exact(f, 8, name, "header")
            raw += b
            (quality,) = _F64.unpack(b)
            if not (math.isfinite(quality) and quality > 0):
                raise BitstreamError(f"{name}: corrupt header (quality {quality!r})")
        else:
            quality = ladder_quality(code)
    nz = read_varint(f, raw, name, "header")
    shape = tuple(read_varint(f, raw, name, "header") for _ in range(ndim))
    frames = read_varint(f, raw, name, "header") if counted else (None if indexed else 1)
    h = Header(fingerprint=fp, table_hash=table, quality=quality, level=level, latent_dim=nz,
               input_shape=shape, single=bool(flags & FLAG_SINGLE))
    return _Head(h, bytes(raw), indexed, frames, zlib.crc32(raw))


# -- frames and index ----------------------------------------------------------------------------------------
def frame_bytes(n_records: int, payload: bytes, header_bytes: bytes = b"", tagged: bool = False) -> bytes:
    """One frame: records varint, payload length varint, CRC32, payload (``tagged``: after an ``"F"``, as in an
    indexed file). The CRC32 is that of ``header_bytes`` (the header the frame follows) + fields + payload."""
    return _frame(n_records, payload, zlib.crc32(header_bytes), tagged)


def _frame(n_records: int, payload: bytes, seed: int, tagged: bool) -> bytes:
    if not 0 <= n_records <= MAX_FRAME_RECORDS or len(payload) > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {n_records} records and {len(payload)} bytes is too large")
    fields = varint(n_records) + varint(len(payload))
    crc = zlib.crc32(payload, zlib.crc32(fields, seed))
    return (FRAME_TAG if tagged else b"") + fields + _CRC.pack(crc) + payload


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
    (crc,) = _CRC.unpack(_read_exact(f, 4, name, "frame header"))
    payload = _read_exact(f, length, name, "frame payload")
    if zlib.crc32(payload, zlib.crc32(fields, seed)) != crc:
        raise BitstreamError(f"{name}: corrupt frame (CRC mismatch)")
    return n, payload


def _index_bytes(entries: list[tuple[int, int]], seed: int) -> bytes:
    """Index and footer for frames of (records, payload length)."""
    body = INDEX_TAG + varint(len(entries)) + b"".join(varint(n) + varint(length) for n, length in entries)
    body += _CRC.pack(zlib.crc32(body, seed))
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
    (crc,) = _CRC.unpack(_read_exact(f, 4, name, "index"))
    if zlib.crc32(raw, seed) != crc:
        raise BitstreamError(f"{name}: corrupt index or header (CRC mismatch)")
    return entries


def _verify_first(f: BinaryIO, head: _Head, name: str) -> tuple[int, bytes] | list[tuple[int, int]] | None:
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
        (crc,) = _CRC.unpack(_read_exact(f, 4, name, "header CRC"))
        if crc != head.seed:
            raise BitstreamError(f"{name}: corrupt header (CRC mismatch)")
        return None
    return _read_frame(f, name, head.seed)


def read_header(f: BinaryIO, name: str = "stream") -> Header:
    """Read a container header from the current position of ``f``, leaving ``f`` just after it.

    On a seekable ``f`` the header is verified (by the CRC32 of the first frame, or of the index, which covers
    it) before it is returned; on a pipe only its form is checked (:func:`iter_stream` verifies it).
    """
    head = _parse_header(f, name)
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


# -- the bits-back frame payload ("BBAN", FORMAT.md section 5) -------------------------------------------------
BITSBACK_TAG = b"BBAN"
BITSBACK_FORMAT = 2
"""The version of the bits-back frame payload (format 1, equal-prior-mass buckets, is refused)."""
_BITSBACK_HEAD = struct.Struct("<4sBBHBBBBIII")
BITSBACK_RANGE_BITS = 3
"""The range_bits byte stores range_bits - 3."""
CONTEXT_FLAG = 0x80
"""Set in the reconstruction byte when the frame's pixels are coded with a pixel context model."""
RAMP_SHIFT = 4
"""A context frame's ramp (0..7) sits in bits 4-6 of the reconstruction byte; the reconstruction in bits 0-3."""


@dataclasses.dataclass(frozen=True)
class BitsBackHead:
    """The head of a bits-back frame payload: the chain's grid (``latent_bits``, ``range_bits``), its largest
    ``group``, the records' ``layout``, ``levels`` (0: lossless), ``reconstruction`` (an index), ``ramp``,
    ``context`` (coded with a pixel context model), and its stack: ``seed`` initial words, of which the first
    ``cut`` are not stored."""

    latent_bits: int
    group: int
    layout: int
    range_bits: int
    levels: int
    reconstruction: int
    ramp: int
    context: bool
    seed: int
    cut: int


def pack_bitsback(head: BitsBackHead, words) -> bytes:
    """A bits-back frame payload: ``head`` and the stored stack ``words`` (uint32, bottom first)."""
    h = head
    flags = h.reconstruction | h.ramp << RAMP_SHIFT | (CONTEXT_FLAG if h.context else 0)
    return _BITSBACK_HEAD.pack(BITSBACK_TAG, BITSBACK_FORMAT, h.latent_bits, h.group, h.layout,
                               h.range_bits - BITSBACK_RANGE_BITS, h.levels, flags, h.seed, h.cut,
                               len(words)) + words.astype("<u4").tobytes()


def read_bitsback(payload: bytes, name: str = "stream") -> tuple[BitsBackHead, bytes]:
    """A bits-back frame payload -> (its head, the stored words' bytes, little-endian uint32). Checks the tag, the
    version and the length; what the values may be is the coder's to check."""
    if len(payload) < _BITSBACK_HEAD.size:
        raise BitstreamError(f"{name}: lossless frame of {len(payload)} bytes is shorter than its header")
    tag, fmt, lbits, group, layout, rb, lv, flags, n_seed, cut, n_stored = _BITSBACK_HEAD.unpack_from(payload)
    if tag != BITSBACK_TAG:
        raise BitstreamError(f"{name}: not a lossless frame (tag {tag!r}, expected {BITSBACK_TAG!r})")
    if fmt != BITSBACK_FORMAT:
        old = " (written by an older vaestream; decode it with that version)" if fmt < BITSBACK_FORMAT else ""
        raise BitstreamError(f"{name}: lossless frame format {fmt}{old}; this vaestream reads format "
                             f"{BITSBACK_FORMAT}")
    if len(payload) != _BITSBACK_HEAD.size + 4 * n_stored:
        raise BitstreamError(f"{name}: lossless frame holds {len(payload) - _BITSBACK_HEAD.size} bytes of words, "
                             f"its header says {4 * n_stored}")
    head = BitsBackHead(lbits, group, layout, rb + BITSBACK_RANGE_BITS, lv, flags & 0x0F, (flags >> RAMP_SHIFT) & 7,
                        bool(flags & CONTEXT_FLAG), n_seed, cut)
    return head, payload[_BITSBACK_HEAD.size:]


# -- the per-record stream ("VM", FORMAT.md section 7) ----------------------------------------------------------
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
    return head + _CRC.pack(zlib.crc32(head)) + b"".join(s for _, s in streams)


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
    crc = r.read(_CRC.size)
    if len(crc) < _CRC.size:
        raise BitstreamError(f"{name}: truncated mixed stream header")
    if _CRC.unpack(crc)[0] != zlib.crc32(blob[:r.tell() - _CRC.size]):
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


def pack(header: Header, frames: list[tuple[int, bytes]]) -> bytes:
    """A complete packed container (header and frames) in memory; ``frames`` are (records, payload)."""
    raw = header.to_bytes(frames=len(frames))
    seed = zlib.crc32(raw)
    out = bytearray(raw)
    for n, payload in frames:
        out += _frame(n, payload, seed, tagged=False)
    if not frames:
        out += _CRC.pack(seed)
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
        head = _parse_header(f, name)
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
    head = _parse_header(f, name)
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
        size, tag = FOOTER.unpack(_read_exact(f, FOOTER.size, name, "footer"))
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
