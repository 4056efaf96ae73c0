"""The container's header (:class:`Header`, FORMAT.md section 2.1) and the small encodings every byte format of
:mod:`vaestream.coding.container` shares: varints, the quality code, CRC32 fields, checked reads."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
import zlib
from typing import BinaryIO

from vaestream.binio import leb128, read_exact
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
CRC = struct.Struct("<I")
"""A CRC32 field (little-endian u32)."""
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


def read_checked(f: BinaryIO, n: int, name: str, what: str) -> bytes:
    """``n`` bytes of ``f``; :class:`BitstreamError` naming ``name`` and ``what`` if fewer are left."""
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
class Head:
    """A parsed header and its layout: the raw bytes (whose CRC32 seeds every other CRC) and the frame count."""

    header: Header
    raw: bytes
    indexed: bool
    frames: int | None  # packed: the frame count; indexed: None
    seed: int


def parse_header(f: BinaryIO, name: str) -> Head:
    """Read a header's bytes from ``f`` and parse them (not yet verified: the first CRC after it covers it)."""
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
    fp = read_checked(f, FINGERPRINT_BYTES, name, "header")
    raw += fp
    if flags & FLAG_LOSSLESS:
        table, quality, level = LOSSLESS_TAG, 0.0, 0
    else:
        tq = read_checked(f, TABLE_ID_BYTES + 1, name, "header")
        raw += tq
        table, code, level = tq[:TABLE_ID_BYTES], tq[-1], None
        if code == QUALITY_F64:
            b = read_checked(f, 8, name, "header")
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
    return Head(h, bytes(raw), indexed, frames, zlib.crc32(raw))
