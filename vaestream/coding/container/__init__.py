"""The vaestream container (format version 2): a compact, self-describing, framed file of entropy-coded records.

Every byte format of vaestream's streams is written and read in this package: the container itself (header
:mod:`~vaestream.coding.container.header`; frames, index, reader and writer
:mod:`~vaestream.coding.container.frames`), the bits-back frame payload (:mod:`~vaestream.coding.container.bitsback`)
and the per-record stream (:mod:`~vaestream.coding.container.per_record`). FORMAT.md specifies every byte.

Layout (FORMAT.md section 2 gives every byte): a header, then frames (record count and payload length as
varints, a CRC32, the payload); an indexed container ends with an index and a footer. Every CRC32 covers the
header's bytes too, so every frame read on its own (random access) also verifies the header, and the header
needs no CRC of its own (a packed container of no frames ends with the CRC32 of its header instead).

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

from vaestream.coding.container.bitsback import (BITSBACK_FORMAT, BITSBACK_RANGE_BITS, BITSBACK_TAG, CONTEXT_FLAG,
                                                 RAMP_SHIFT, BitsBackHead, pack_bitsback, read_bitsback)
from vaestream.coding.container.frames import (ContainerReader, ContainerWriter, frame_bytes, iter_stream, pack,
                                               read_header)
from vaestream.coding.container.header import (END_TAG, FINGERPRINT_BYTES, FLAG_COUNTED, FLAG_INDEXED, FLAG_LOSSLESS,
                                               FLAG_SINGLE, FOOTER, FORMAT_VERSION, FRAME_TAG, INDEX_TAG, LOSSLESS_TAG,
                                               MAGIC, MAX_FRAME_BYTES, MAX_FRAME_RECORDS, MAX_NDIM, MAX_VARINT,
                                               QUALITY_F64, TABLE_ID_BYTES, V1_MAGIC, Header, ladder_quality,
                                               read_varint, varint)
from vaestream.coding.container.per_record import (PER_RECORD_FORMAT, PER_RECORD_MAGIC, PER_RECORD_MAX_STREAMS,
                                                   is_per_record, pack_per_record, read_per_record)

__all__ = ["BITSBACK_FORMAT", "BITSBACK_RANGE_BITS", "BITSBACK_TAG", "CONTEXT_FLAG", "RAMP_SHIFT", "BitsBackHead",
           "pack_bitsback", "read_bitsback", "ContainerReader", "ContainerWriter", "frame_bytes", "iter_stream",
           "pack", "read_header", "END_TAG", "FINGERPRINT_BYTES", "FLAG_COUNTED", "FLAG_INDEXED", "FLAG_LOSSLESS",
           "FLAG_SINGLE", "FOOTER", "FORMAT_VERSION", "FRAME_TAG", "INDEX_TAG", "LOSSLESS_TAG", "MAGIC",
           "MAX_FRAME_BYTES", "MAX_FRAME_RECORDS", "MAX_NDIM", "MAX_VARINT", "QUALITY_F64", "TABLE_ID_BYTES",
           "V1_MAGIC", "Header", "ladder_quality", "read_varint", "varint", "PER_RECORD_FORMAT", "PER_RECORD_MAGIC",
           "PER_RECORD_MAX_STREAMS", "is_per_record", "pack_per_record", "read_per_record"]
