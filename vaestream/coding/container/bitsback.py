"""The bits-back frame payload ("BBAN", FORMAT.md section 5): its 24-byte head (:class:`BitsBackHead`) and the
stored words of its ANS stack, written by :func:`pack_bitsback` and read by :func:`read_bitsback`."""

from __future__ import annotations

import dataclasses
import struct

from vaestream.errors import BitstreamError

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
