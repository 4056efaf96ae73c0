"""A shard set on disk: the ``tf.train.Example`` wire format, the content hash and the manifest.

A shard set is a directory of TFRecord files of ``tf.train.Example`` records plus a JSON manifest::

    DIR/shard-00000-of-00008.tfrecord    records, each an Example with the features
        key    bytes       a unique record key (e.g. ``train-images-idx3-ubyte.gz:000123``)
        data   bytes       the record's values in its dtype, C order, little-endian (784 bytes for MNIST)
        shape  int64 list  the record's shape (e.g. [28, 28])
        dtype  bytes       the NumPy dtype name (``uint8`` or ``float32``)
    DIR/manifest.json                     see :func:`read_manifest`
    DIR/dead_letter.jsonl                 records the pipeline refused, one JSON object (source, key, reason) a line

Model inputs are ``x = data * scale`` (``scale`` = 1/255 for uint8 images), flattened to ``D`` values.

The same Example layout carries decoded reconstructions with ``--recon_layout record``; by default the decode
job writes record blocks instead, one Example per batch of records (:func:`record_block`, read back by
:func:`parse_record_block`; FORMAT.md §8.1). Latent codes use
``key``, ``mean``, ``log_scale`` (float lists of Nz) and ``fingerprint`` (see :mod:`vaestream.beam`).
:func:`serialize_examples` builds many Examples at once (the constant parts of the wire format are laid out
once per batch with NumPy); it produces bytes identical in meaning to ``tf.train.Example.SerializeToString``
at a fraction of the cost (about 1 µs a record instead of 18), which the Beam jobs need to reach 100k
records/s. This module needs neither TensorFlow nor Beam at import time; the shard set is written by
:mod:`vaestream.beam.shards` (the prepare job) and read for training by :mod:`vaestream.shards`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from vaestream.binio import leb128
from vaestream.example_wire import example_features, leading_records
from vaestream.errors import DataError

FORMAT = "vaestream-shards/1"
MANIFEST = "manifest.json"
DEAD_LETTER = "dead_letter.jsonl"
SHARD_PREFIX = "shard"
SHARD_SUFFIX = ".tfrecord"
KEY_DIGITS = 9
"""Digits of a record key's offset (``NAME:000000123``), as the Beam readers name records."""
RECON_LAYOUTS = ("block", "record")
"""Layouts of records written as TFRecord Examples (the decode job's ``--recon_layout``): one Example per batch
of records (:func:`record_block`) or per record (:func:`record_examples`, the shard layout)."""
RECON_LAYOUT_VERSIONS = {"block": "block/1", "record": "record/1"}
"""The versioned names the decode job's ``summary.json`` records as ``recon_layout`` (absent: ``record/1``)."""


# ---------------------------------------------------------------------------------------------------------
# tf.train.Example wire format, many records at a time
# ---------------------------------------------------------------------------------------------------------
_varint = leb128
"""Protocol-buffer base-128 varint of a non-negative integer."""


def _ld(tag: int, payload: bytes) -> bytes:
    """A length-delimited field: tag byte, varint length, payload."""
    return bytes([tag]) + _varint(len(payload)) + payload


def _entry(name: str, feature: bytes) -> bytes:
    """One ``Features.feature`` map entry (field 1 of Features): {1: name, 2: Feature}."""
    return _ld(0x0A, _ld(0x0A, name.encode()) + _ld(0x12, feature))


entry = _entry


def float_entry_head(name: str, nbytes: int) -> bytes:
    """The bytes before the payload of a ``Features.feature`` map entry ``name`` -> ``Feature{float_list}``
    (packed) of ``nbytes`` bytes of little-endian float32: head + payload is the whole entry."""
    return _entry_head(name, _float_feature_prefix(nbytes), nbytes)


def _float_feature_prefix(length: int) -> bytes:
    """The bytes of a ``Feature{float_list}`` (packed) before its ``length`` bytes of little-endian float32."""
    flist_prefix = b"\x0a" + _varint(length)                                # FloatList.value, packed
    return b"\x12" + _varint(len(flist_prefix) + length) + flist_prefix     # Feature.float_list


def _entry_head(name: str, feature_prefix: bytes, length: int) -> bytes:
    """The bytes of a ``Features.feature`` map entry ``name`` before the ``length`` payload bytes of its feature
    (``feature_prefix``: the feature's own bytes before that payload)."""
    feature_len = len(feature_prefix) + length
    body_head = b"\x0a" + _varint(len(name.encode())) + name.encode() + b"\x12" + _varint(feature_len)
    return b"\x0a" + _varint(len(body_head) + feature_len) + body_head + feature_prefix


def bytes_feature(values: Sequence[bytes]) -> bytes:
    """A serialized ``Feature{bytes_list}`` (Feature field 1, BytesList.value field 1)."""
    return _ld(0x0A, b"".join(_ld(0x0A, v) for v in values))


def int64_feature(values: Sequence[int]) -> bytes:
    """A serialized ``Feature{int64_list}`` with packed varints (Feature field 3); values must be >= 0."""
    if any(int(v) < 0 for v in values):
        raise ValueError("int64_feature takes non-negative values only")
    return _ld(0x1A, _ld(0x0A, b"".join(_varint(int(v)) for v in values)))


def serialize_examples(keys: Sequence[str | bytes], rows: Mapping[str, np.ndarray] | None = None,
                       floats: Mapping[str, np.ndarray] | None = None,
                       constants: Mapping[str, bytes] | None = None,
                       variable: Mapping[str, Sequence[bytes]] | None = None) -> list[bytes]:
    """Serialize ``n`` ``tf.train.Example`` records at once.

    Args:
      keys: ``n`` keys, stored as the bytes feature ``key``.
      rows: name -> array ``[n, ...]``: each record's row as raw bytes (C order, the array's dtype and byte
        order) in a one-value bytes feature.
      floats: name -> array ``[n, k]``: each row as a float list of ``k`` float32 values.
      constants: name -> a serialized ``Feature`` (from :func:`bytes_feature` / :func:`int64_feature`) that
        every record carries.
      variable: name -> ``n`` byte strings of any length, one-value bytes features.

    Returns:
      ``n`` serialized Examples; ``tf.io.parse_example`` and ``tf.train.Example.FromString`` read them.
    """
    n = len(keys)
    fixed_parts: list[np.ndarray] = []
    for name, arr in (rows or {}).items():
        arr = np.ascontiguousarray(arr)
        if len(arr) != n:
            raise ValueError(f"feature {name!r} has {len(arr)} rows, expected {n}")
        raw = arr.reshape(n, -1).view(np.uint8).reshape(n, -1)
        length = raw.shape[1]
        blist_prefix = b"\x0a" + _varint(length)                       # BytesList.value
        feature_prefix = b"\x0a" + _varint(len(blist_prefix) + length) + blist_prefix  # Feature.bytes_list
        fixed_parts.append(_prefixed(name, feature_prefix, raw))
    for name, arr in (floats or {}).items():
        arr = np.ascontiguousarray(arr, dtype="<f4")
        if arr.ndim != 2 or len(arr) != n:
            raise ValueError(f"float feature {name!r} must be [n={n}, k], got {arr.shape}")
        raw = arr.view(np.uint8).reshape(n, -1)
        length = raw.shape[1]
        fixed_parts.append(_prefixed(name, _float_feature_prefix(length), raw))
    const = b"".join(_entry(name, feat) for name, feat in (constants or {}).items())
    var_items = list((variable or {}).items())
    for name, vals in var_items:
        if len(vals) != n:
            raise ValueError(f"feature {name!r} has {len(vals)} values, expected {n}")
    key_head = b"\x0a\x03key\x12"
    key_rows = key_matrix(keys) if not var_items else None
    if key_rows is None:
        bkeys = [k.encode() if isinstance(k, str) else bytes(k) for k in keys]
        lengths = {len(k) for k in bkeys}
        if n and not var_items and len(lengths) == 1:
            key_rows = np.frombuffer(b"".join(bkeys), np.uint8).reshape(n, lengths.pop())
    if n and key_rows is not None:
        # Every record has the same length: lay the whole batch out as one [n, bytes] matrix.
        klen = key_rows.shape[1]
        bl_prefix = b"\x0a" + _varint(klen)
        feature_prefix = b"\x0a" + _varint(len(bl_prefix) + klen) + bl_prefix
        parts = [_prefixed("key", feature_prefix, key_rows)]
        if fixed_parts:
            parts += fixed_parts
        feats_len = sum(p.shape[1] for p in parts) + len(const)
        head = np.frombuffer(b"\x0a" + _varint(feats_len), np.uint8)
        parts = [np.broadcast_to(head, (n, len(head)))] + parts
        if const:
            parts.append(np.broadcast_to(np.frombuffer(const, np.uint8), (n, len(const))))
        whole = np.concatenate(parts, axis=1)
        buf = whole.tobytes()
        w = whole.shape[1]
        return [buf[i * w:(i + 1) * w] for i in range(n)]
    fixed = (np.concatenate(fixed_parts, axis=1) if len(fixed_parts) > 1 else fixed_parts[0]) if fixed_parts else None
    fixed_rows = [r.tobytes() for r in fixed] if fixed is not None and fixed.shape[1] else [b""] * n
    out = []
    for i in range(n):
        k = bkeys[i]
        bl = b"\x0a" + _varint(len(k)) + k
        feat = b"\x0a" + _varint(len(bl)) + bl
        body = key_head + _varint(len(feat)) + feat
        feats = b"\x0a" + _varint(len(body)) + body + fixed_rows[i] + const
        if var_items:
            feats += b"".join(_entry(name, bytes_feature([vals[i]])) for name, vals in var_items)
        out.append(b"\x0a" + _varint(len(feats)) + feats)
    return out


def key_matrix(keys: Sequence[str | bytes]) -> np.ndarray | None:
    """``[n, L]`` uint8: the UTF-8 bytes of ``keys`` when they are a range of record keys (``NAME:`` then the
    offset in ``digits`` zero-padded digits; an object with ``name``, ``start``, ``stop`` and ``digits``
    attributes, e.g. :class:`vaestream.beam.elements.KeyRange`), built with NumPy instead of key by key;
    None for any other sequence (or offsets wider than ``digits``)."""
    name, start, stop, digits = (getattr(keys, a, None) for a in ("name", "start", "stop", "digits"))
    if name is None or start is None or stop is None or digits is None or stop <= start or stop > 10 ** digits:
        return None
    head = np.frombuffer(f"{name}:".encode(), np.uint8)
    idx = np.arange(start, stop, dtype=np.int64)
    pow10 = 10 ** np.arange(digits - 1, -1, -1, dtype=np.int64)
    out = np.empty((stop - start, len(head) + digits), np.uint8)
    out[:, :len(head)] = head
    out[:, len(head):] = (idx[:, None] // pow10) % 10 + 48
    return out


def _prefixed(name: str, feature_prefix: bytes, raw: np.ndarray) -> np.ndarray:
    """``[n, P + L]`` uint8: the constant map-entry header of ``name`` then each row's ``L`` payload bytes."""
    n, length = raw.shape
    head = _entry_head(name, feature_prefix, length)
    out = np.empty((n, len(head) + length), np.uint8)
    out[:, :len(head)] = np.frombuffer(head, np.uint8)
    out[:, len(head):] = raw
    return out


def record_examples(keys: Sequence[str], records: np.ndarray) -> list[bytes]:
    """Shard-format Examples (key, data, shape, dtype) of ``records`` ``[n, *shape]``."""
    records = _little_endian(records)
    return serialize_examples(keys, rows={"data": records},
                              constants={"shape": int64_feature(records.shape[1:]),
                                         "dtype": bytes_feature([records.dtype.name.encode()])})


def _little_endian(records: np.ndarray) -> np.ndarray:
    records = np.asarray(records)
    dt = records.dtype.newbyteorder("<") if records.dtype.byteorder == ">" else records.dtype
    return np.ascontiguousarray(records, dtype=dt)


def recon_examples(keys: Sequence[str], records: np.ndarray, layout: str = "record") -> list[bytes]:
    """Serialized Examples of ``records`` ``[n, *shape]`` in ``layout``: ``record``, one shard-format Example a
    record (:func:`record_examples`); ``block``, one Example for all n (:func:`record_block`; none for n = 0)."""
    if layout == "record":
        return record_examples(keys, records)
    if layout != "block":
        raise DataError(f"record layout {layout!r} is not one of {', '.join(RECON_LAYOUTS)}")
    return [record_block(keys, records)] if len(records) else []


def record_block(keys: Sequence[str], records: np.ndarray) -> bytes:
    """One serialized Example holding ``n`` records ``[n, *shape]`` (the block record layout, FORMAT.md §9.1),
    its features in this order: ``records`` int64 = n; ``shape`` int64 list (one record's); ``dtype`` bytes (the
    NumPy name); the keys as ``key_name`` bytes + ``key_start`` int64 when ``keys`` is a range of record keys
    (an object with ``name``, ``start``, ``stop`` and ``digits`` = 9, e.g. :class:`vaestream.beam.KeyRange`:
    key i = ``NAME:`` + the offset start + i in 9 digits), else ``keys`` bytes x n; ``data`` bytes, the n
    records' values C order, little-endian (n x prod(shape) x itemsize bytes), copied once into the result."""
    records = _little_endian(records)
    n = len(records)
    if len(keys) != n:
        raise ValueError(f"{len(keys)} keys for {n} records")
    parts = [_entry("records", int64_feature([n])), _entry("shape", int64_feature(records.shape[1:])),
             _entry("dtype", bytes_feature([records.dtype.name.encode()]))]
    name, start, digits = (getattr(keys, a, None) for a in ("name", "start", "digits"))
    if name is not None and start is not None and digits == KEY_DIGITS:
        parts += [_entry("key_name", bytes_feature([str(name).encode()])),
                  _entry("key_start", int64_feature([int(start)]))]
    else:
        parts.append(_entry("keys", bytes_feature([k.encode() if isinstance(k, str) else bytes(k) for k in keys])))
    length = records.nbytes
    blist_prefix = b"\x0a" + _varint(length)
    feature_prefix = b"\x0a" + _varint(len(blist_prefix) + length) + blist_prefix
    parts += [_entry_head("data", feature_prefix, length), memoryview(records.reshape(-1)).cast("B")]
    body = sum(len(p) for p in parts)
    return b"".join([b"\x0a" + _varint(body)] + parts)


@dataclasses.dataclass
class RecordBlock:
    """One parsed record block (:func:`parse_record_block`): ``records`` ``[n, *shape]`` (native byte order, a
    view of the block's bytes where it can be) and its keys, either listed (``keys``, n strings) or a range
    (``key_name`` and ``key_start``: key i = ``key_name:`` + the offset ``key_start + i`` in 9 digits)."""

    records: np.ndarray
    keys: list[str] | None = None
    key_name: str | None = None
    key_start: int | None = None

    def __len__(self) -> int:
        return len(self.records)

    def key_list(self) -> list[str]:
        """The n keys as strings."""
        if self.keys is not None:
            return list(self.keys)
        return [f"{self.key_name}:{self.key_start + i:0{KEY_DIGITS}d}" for i in range(len(self))]


def is_record_block(features: Mapping[str, tuple[str, list]]) -> bool:
    """Whether parsed Example ``features`` (:func:`example_features`) are a record block (``records`` and
    ``data``, no per-record ``key``) rather than one shard-format record."""
    return "records" in features and "data" in features and "key" not in features


def parse_record_block(raw: bytes | memoryview, where: str) -> RecordBlock:
    """The records and keys of one serialized record block (:func:`record_block`). Raises :class:`DataError`
    naming ``where`` (the file and block) when the bytes are not a block: not an Example, a feature missing or
    of the wrong kind, n < 1, a dtype that is not numeric, ``data`` not n x prod(shape) x itemsize bytes, or
    keys neither a name + start nor n listed."""
    try:
        f = example_features(raw)
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not a record block (malformed Example: {e})") from None

    def one(name: str, kind: str):
        k, vals = f.get(name, ("none", []))
        if k != kind or len(vals) != 1:
            raise DataError(f"{where}: not a record block (feature {name!r}: need one {kind} value)")
        return vals[0]

    n = one("records", "int64")
    kind, shape = f.get("shape", ("none", []))
    if kind not in ("int64", "none") or any(s < 0 for s in shape) or n < 1:
        raise DataError(f"{where}: record block of {n} records of shape {shape}: need n >= 1 and a shape")
    try:
        dtype = np.dtype(bytes(one("dtype", "bytes")).decode())
    except (TypeError, UnicodeDecodeError):
        dtype = np.dtype(object)
    if dtype.kind not in "biuf":
        raise DataError(f"{where}: record block of dtype {dtype}: not a numeric dtype")
    data = one("data", "bytes")
    want = n * int(np.prod(shape)) * dtype.itemsize
    if len(data) != want:
        raise DataError(f"{where}: record block of {n} records of shape {tuple(shape)} {dtype.name} holds {len(data)} "
                        f"data bytes, expected {want}")
    records = np.frombuffer(data, dtype.newbyteorder("<")).reshape((n,) + tuple(shape))
    records = records.astype(dtype.newbyteorder("="), copy=False)
    if "key_name" in f and "key_start" in f:
        start = one("key_start", "int64")
        if start < 0:
            raise DataError(f"{where}: record block with key_start {start}")
        return RecordBlock(records, None, bytes(one("key_name", "bytes")).decode(), start)
    kind, keys = f.get("keys", ("none", []))
    if kind != "bytes" or len(keys) != n:
        raise DataError(f"{where}: record block of {n} records lists {len(keys)} keys and no key_name + key_start")
    return RecordBlock(records, [bytes(k).decode() for k in keys])


# ---------------------------------------------------------------------------------------------------------
# content hash and manifest
# ---------------------------------------------------------------------------------------------------------
_MOD = 1 << 256


def record_hash_sum(keys: Sequence[str], records: np.ndarray) -> int:
    """Sum over records of SHA-256(key || 0x00 || record bytes), as an integer mod 2^256.

    A sum of per-record hashes is a hash of the multiset of records: independent of record order and of how
    records are split among shards and bundles, so a distributed job computes it by summing partial sums.
    """
    flat = np.ascontiguousarray(records).reshape(len(records), -1)
    total = 0
    for k, row in zip(keys, flat):
        h = hashlib.sha256(k.encode() if isinstance(k, str) else k)
        h.update(b"\x00")
        h.update(row.tobytes())
        total += int.from_bytes(h.digest(), "big")
    return total % _MOD


@dataclasses.dataclass
class Manifest:
    """What ``manifest.json`` says about a shard set.

    Attributes:
      records: N, the number of records in all shards together.
      shape: the shape of one record; ``dim`` = prod(shape) = D.
      dtype: NumPy dtype name of the stored values.
      scale: model input = stored value * scale.
      value_min, value_max: the range of the stored values.
      shards: ``[{"path": relative path, "records": n, "bytes": size, "sha256": file hash}]``.
      content_hash: hex of :func:`record_hash_sum` over every record (order-independent).
      dead_lettered: records refused by the pipeline (listed in ``dead_letter.jsonl``).
      sources: the inputs the pipeline read.
      path: where the manifest was read from (not stored).
    """

    records: int
    shape: tuple[int, ...]
    dtype: str
    scale: float
    value_min: float
    value_max: float
    shards: list[dict]
    content_hash: str
    dead_lettered: int = 0
    sources: list[str] = dataclasses.field(default_factory=list)
    format: str = FORMAT
    created: str = ""
    path: str | None = None

    @property
    def dim(self) -> int:
        return int(np.prod(self.shape))

    def shard_paths(self) -> list[str]:
        """Absolute (or remote) paths of the shard files."""
        base = str(self.path).rsplit("/", 1)[0] if self.path and "/" in str(self.path) else "."
        return [p["path"] if "://" in p["path"] or p["path"].startswith("/") else f"{base}/{p['path']}"
                for p in self.shards]

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("path")
        d["shape"] = list(self.shape)
        return json.dumps(d, indent=2, sort_keys=True) + "\n"


def read_manifest(path: str | Path) -> Manifest:
    """Read ``manifest.json`` (or the manifest of a shard directory); raises :class:`DataError` if invalid."""
    from apache_beam.io.filesystems import FileSystems

    p = str(path)
    if not p.endswith(".json"):
        p = p.rstrip("/") + "/" + MANIFEST
    try:
        with FileSystems.open(p) as f:
            d = json.loads(f.read().decode())
    except (OSError, IOError) as e:
        raise DataError(f"{p}: cannot read shard manifest ({e})") from e
    except Exception as e:  # Beam raises BeamIOError, json raises JSONDecodeError
        raise DataError(f"{p}: not a shard manifest ({e})") from e
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise DataError(f"{p}: not a {FORMAT} manifest (format {d.get('format') if isinstance(d, dict) else d!r})")
    try:
        m = Manifest(**{k: v for k, v in d.items()})
    except TypeError as e:
        raise DataError(f"{p}: malformed manifest ({e})") from e
    m.shape = tuple(int(s) for s in m.shape)
    m.path = p
    return m


def is_shard_spec(spec: str) -> bool:
    """Whether ``spec`` names a shard set (a ``manifest.json`` or a directory holding one)."""
    s = str(spec)
    if "://" not in s:  # a local path: no need to import Beam
        p = Path(s)
        return p.is_file() if p.name == MANIFEST else (p / MANIFEST).is_file()
    from apache_beam.io.filesystems import FileSystems

    if s.endswith(MANIFEST):
        return FileSystems.exists(s)
    return FileSystems.exists(s.rstrip("/") + "/" + MANIFEST)


def count_records(paths: Iterable[str], blocks: bool = False) -> dict[str, int]:
    """Records in each TFRecord file, from the framing alone (each record is an 8-byte little-endian length,
    a 4-byte CRC, the data and a 4-byte CRC): the file is read in 4 MiB blocks, not parsed. A file whose last
    record runs past its end raises :class:`DataError` (truncated). ``blocks``: a file whose first Example is a
    block (an int64 ``records`` feature: record blocks, block codes) counts the sum of each Example's
    ``records``, read from its first bytes where it leads with it (:func:`leading_records`; the payloads are
    skipped); else its Examples."""
    import struct

    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    out = {}
    for p in paths:
        meta = FileSystems.match([p])[0].metadata_list
        if not meta:
            raise DataError(f"{p}: no such file")
        size = meta[0].size_in_bytes
        n, pos, buf, buf_start = 0, 0, b"", 0
        with FileSystems.open(p, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            if blocks and size:
                counted = _count_blocks(p, f, size)
                if counted is not None:
                    out[p] = counted
                    continue
                f.seek(0)
            while pos < size:
                if pos + 12 > buf_start + len(buf):  # the next header is not in the buffer: refill from pos
                    f.seek(pos)
                    buf, buf_start = f.read(1 << 22), pos
                    if len(buf) < 12:
                        raise DataError(f"{p}: corrupt or truncated TFRecord file (a record header is cut at byte "
                                        f"{pos} of {size})")
                (length,) = struct.unpack_from("<Q", buf, pos - buf_start)
                pos += 16 + length
                n += 1
        if pos != size:
            raise DataError(f"{p}: corrupt or truncated TFRecord file (record {n - 1} ends at byte {pos}, the file "
                            f"has {size})")
        out[p] = n
    return out



def _records_feature(raw: bytes) -> int | None:
    """The ``records`` count of a block Example (one int64 ``records``, no per-record ``key``), else None."""
    try:
        f = example_features(raw)
    except (ValueError, IndexError, UnicodeDecodeError):
        return None
    kind, values = f.get("records", ("none", []))
    return values[0] if kind == "int64" and len(values) == 1 and "key" not in f else None


def _count_blocks(path: str, f, size: int) -> int | None:
    """Records in the open TFRecord file ``f`` of ``size`` bytes when its first Example is a block (has an int64
    ``records`` feature): the sum of every Example's, each read from its first 64 bytes where it leads with
    ``records`` (as the vaestream writers write it; else from the whole Example); None when the first is not a
    block. Raises
    :class:`DataError` naming the file for a cut or corrupt one, or an Example that is not a block."""
    import struct

    total, pos, index = 0, 0, 0
    while pos < size:
        f.seek(pos)
        head = f.read(12 + 64)
        if len(head) < 12:
            raise DataError(f"{path}: corrupt or truncated TFRecord file (a record header is cut at byte {pos} of "
                            f"{size})")
        (length,) = struct.unpack_from("<Q", head)
        n = leading_records(head[12:12 + min(length, 64)])
        if n is None:  # written by another writer (features in another order): parse the whole Example
            f.seek(pos + 12)
            n = _records_feature(f.read(length))
        if n is None:
            if index == 0:
                return None
            raise DataError(f"{path}: record {index} is not a block (no records feature), the file's first is (a "
                            "file of blocks holds blocks only)")
        if pos + 16 + length > size:
            raise DataError(f"{path}: corrupt or truncated TFRecord file (block {index} ends at byte "
                            f"{pos + 16 + length}, the file has {size})")
        total += n
        pos += 16 + length
        index += 1
    return total
