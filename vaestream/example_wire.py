"""The ``tf.train.Example`` wire format read in Python, without TensorFlow: the features of one Example
(:func:`example_features`) and the record count a block Example leads with (:func:`leading_records`).

Protocol buffers: a message is a sequence of fields, each a varint tag (field number << 3 | wire type) then
a varint (wire type 0), a varint length and that many bytes (2), or 8 / 4 fixed bytes (1 / 5).
``Example.features`` = 1; ``Features.feature`` = 1, map entries {1: name, 2: Feature};
``Feature.bytes_list`` = 1, ``float_list`` = 2, ``int64_list`` = 3, each a message whose field 1 holds the
values (packed or not). Used by :mod:`vaestream.shardset` to read record blocks (one Example holding many
records) with the payload as a view of the bytes read, no copy.
"""

from __future__ import annotations

import numpy as np


def _read_varint(buf, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def _fields(buf, start: int, end: int):
    """(field number, wire type, value) of the protobuf message ``buf[start:end]``: a varint's value, or the
    (start, end) span of a length-delimited or fixed-width field."""
    i = start
    while i < end:
        tag, i = _read_varint(buf, i)
        wt = tag & 7
        if wt == 0:
            v, i = _read_varint(buf, i)
            yield tag >> 3, wt, v
            continue
        if wt == 2:
            length, i = _read_varint(buf, i)
        elif wt in (1, 5):
            length = 8 if wt == 1 else 4
        else:
            raise ValueError(f"wire type {wt} at byte {i}")
        if i + length > end:
            raise ValueError(f"a field of {length} bytes at byte {i} runs past its message (byte {end})")
        yield tag >> 3, wt, (i, i + length)
        i += length
    if i != end:
        raise ValueError(f"the last field runs past its message (byte {end})")


def example_features(raw: bytes | memoryview) -> dict[str, tuple[str, list]]:
    """The features of one serialized ``tf.train.Example``, parsed in Python (no TensorFlow): name ->
    (``"bytes"``, [memoryview of each value]) | (``"int64"``, [int]) | (``"float"``, float32 array: a view of
    ``raw`` where the values are one packed field) | (``"none"``, []).
    Raises ValueError on bytes that are not such a message."""
    buf = memoryview(raw).cast("B") if not isinstance(raw, bytes) else memoryview(raw)
    out: dict[str, tuple[str, list]] = {}
    for field, wt, span in _fields(buf, 0, len(buf)):
        if field != 1 or wt != 2:
            continue
        for ef, ewt, entry_span in _fields(buf, *span):
            if ef != 1 or ewt != 2:
                continue
            name, feature = None, None
            for kf, kwt, kv in _fields(buf, *entry_span):
                if kf == 1 and kwt == 2:
                    name = bytes(buf[kv[0]:kv[1]]).decode()
                elif kf == 2 and kwt == 2:
                    feature = kv
            if name is None:
                raise ValueError("a feature map entry without a name")
            out[name] = _feature_values(buf, feature)
    return out


def _feature_values(buf, span) -> tuple[str, list | np.ndarray]:
    kind: tuple[str, list | np.ndarray] = ("none", [])
    for f, wt, v in _fields(buf, *span) if span is not None else ():
        if wt != 2 or f not in (1, 2, 3):
            continue
        if f == 1:
            kind = ("bytes", [buf[a:b] for ff, w, (a, b) in _fields(buf, *v) if ff == 1 and w == 2])
        elif f == 2:  # float32 values: a view of the bytes (one packed field) or their concatenation
            parts = [np.frombuffer(buf[x[0]:x[1]], "<f4") for ff, w, x in _fields(buf, *v) if ff == 1 and w in (2, 5)]
            kind = ("float", parts[0] if len(parts) == 1 else np.concatenate(parts or [np.zeros(0, "<f4")]))
        else:
            values: list = []
            for ff, w, x in _fields(buf, *v):
                if ff == 1 and w == 0:
                    values.append(x)
                elif ff == 1 and w == 2:
                    i = x[0]
                    while i < x[1]:
                        val, i = _read_varint(buf, i)
                        values.append(val)
            kind = ("int64", [val - (1 << 64) if val >= 1 << 63 else val for val in values])
    return kind


def leading_records(head: bytes) -> int | None:
    """n of a serialized Example whose first feature is ``records`` (int64), as :func:`record_block` and the
    block code layout write it, from its first bytes (64 are enough); None for any other start."""
    try:
        i = 0
        for _ in range(3):  # Example.features, Features.feature (the map entry), its key
            if head[i] != 0x0A:
                return None
            _, i = _read_varint(head, i + 1)
        if head[i - 1] != 7 or head[i:i + 7] != b"records" or head[i + 7] != 0x12:
            return None
        _, i = _read_varint(head, i + 8)  # the Feature
        if head[i] != 0x1A:  # int64_list
            return None
        _, i = _read_varint(head, i + 1)
        if head[i] == 0x08:  # Int64List.value, one unpacked varint
            return _read_varint(head, i + 1)[0]
        if head[i] != 0x0A:  # packed
            return None
        _, i = _read_varint(head, i + 1)
        return _read_varint(head, i)[0]
    except (IndexError, ValueError):
        return None
