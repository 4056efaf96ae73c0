"""The container format: framing, index, append, streaming, and every kind of damage detected."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vaestream import container
from vaestream.container import ContainerReader, ContainerWriter, Header, iter_stream, pack
from vaestream.errors import BitstreamError, ModelMismatchError

HEADER = Header(fingerprint=bytes(range(16)), table_hash=bytes(range(16, 32)), quality=1.0, level=12,
                latent_dim=10, input_shape=(28, 28))
FRAMES = [(3, b"abcdefgh"), (1, b"\x00\x01\x02\x03"), (5, bytes(range(40)))]


def _read_all(blob: bytes) -> list[tuple[int, bytes]]:
    with ContainerReader(blob) as r:
        return list(r)


def test_pack_and_read_back_with_index_and_stream():
    blob = pack(HEADER, FRAMES)
    with ContainerReader(blob) as r:
        assert r.header == HEADER
        assert len(r) == 9 and [fr[1:] for fr in r.frames] == [(0, 3), (3, 1), (4, 5)]
        assert r.read_frame(2) == FRAMES[2]
        assert r.frame_of(0) == 0 and r.frame_of(3) == 1 and r.frame_of(8) == 2
        with pytest.raises(IndexError):
            r.frame_of(9)
        assert list(r) == FRAMES
    items = list(iter_stream(io.BytesIO(blob)))
    assert items[0] == HEADER and items[1:] == FRAMES
    # a container without frames is valid too
    assert _read_all(pack(HEADER, [])) == []


def test_overhead_is_a_fixed_header_index_and_16_bytes_per_frame():
    blob = pack(HEADER, FRAMES)
    payload = sum(len(p) for _, p in FRAMES)
    header = len(HEADER.to_bytes())
    assert header == 67  # magic..shape + CRC for a 2-d input shape
    assert len(blob) == header + payload + 16 * len(FRAMES) + (8 + 12 * len(FRAMES) + 4) + 12


def test_writer_appends_and_refuses_another_model_or_quality(tmp_path):
    path = tmp_path / "c.vz"
    with ContainerWriter(path, HEADER) as w:
        w.write_frame(*FRAMES[0])
    with ContainerWriter(path, HEADER, append=True) as w:
        w.write_frame(*FRAMES[1])
        w.write_frame(*FRAMES[2])
    assert path.read_bytes() == pack(HEADER, FRAMES)
    other = Header(**{**HEADER.__dict__, "fingerprint": b"\xff" * 16})
    with pytest.raises(ModelMismatchError, match="written by model"):
        ContainerWriter(path, other, append=True)
    other = Header(**{**HEADER.__dict__, "level": 3, "quality": 0.125})
    with pytest.raises(ModelMismatchError, match="quality"):
        ContainerWriter(path, other, append=True)
    assert path.read_bytes() == pack(HEADER, FRAMES)  # a refused append leaves the file as it was
    single = tmp_path / "s.vz"
    single.write_bytes(pack(Header(**{**HEADER.__dict__, "single": True}), FRAMES[:1]))
    with pytest.raises(BitstreamError, match="single record"):
        ContainerWriter(single, Header(**{**HEADER.__dict__, "single": True}), append=True)


def test_every_single_bit_flip_is_detected():
    blob = pack(HEADER, FRAMES)
    for i in range(len(blob)):
        for bit in range(8):
            bad = bytearray(blob)
            bad[i] ^= 1 << bit
            with pytest.raises(BitstreamError):
                _read_all(bytes(bad))
            with pytest.raises(BitstreamError):
                list(iter_stream(io.BytesIO(bytes(bad))))


def test_every_truncation_is_detected_by_both_readers():
    blob = pack(HEADER, FRAMES)
    for n in range(len(blob)):
        with pytest.raises(BitstreamError):
            _read_all(blob[:n])
        got = []
        with pytest.raises(BitstreamError):
            for item in iter_stream(io.BytesIO(blob[:n])):
                got.append(item)
        assert got[1:] == FRAMES[:max(len(got) - 1, 0)]  # whole frames before the cut, never a partial one


def test_wrong_version_and_foreign_files_are_named():
    blob = bytearray(pack(HEADER, FRAMES))
    blob[4:6] = struct.pack("<H", 7)
    with pytest.raises(BitstreamError, match="version 7"):
        _read_all(bytes(blob))
    with pytest.raises(BitstreamError, match="not a vaestream container"):
        _read_all(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(BitstreamError, match="truncated"):
        _read_all(b"VA")
    with pytest.raises(BitstreamError, match="after the end"):
        list(iter_stream(io.BytesIO(pack(HEADER, FRAMES) + b"x")))
    with pytest.raises(BitstreamError, match="no such file"):
        ContainerReader("/nonexistent/file.vz")


def test_a_forged_record_count_with_a_valid_crc_is_refused():
    n = container.MAX_FRAME_RECORDS + 1
    payload = b"\0\0\0\0"
    crc = zlib.crc32(payload, zlib.crc32(struct.pack("<II", n, len(payload))))
    frame = container.FRAME_HEADER.pack(container.FRAME_TAG, n, len(payload), crc) + payload
    blob = HEADER.to_bytes() + frame + container._index_bytes([(67, n)], 67 + len(frame))
    with pytest.raises(BitstreamError, match="records"):
        _read_all(blob)
    with pytest.raises(BitstreamError, match="records"):
        list(iter_stream(io.BytesIO(blob)))
    with pytest.raises(ValueError):
        container.frame_bytes(n, payload)


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_random_bytes_raise_only_bitstream_errors(data):
    for candidate in (data, container.MAGIC + data, HEADER.to_bytes() + data):
        with pytest.raises(BitstreamError):
            _read_all(candidate)
        with pytest.raises(BitstreamError):
            list(iter_stream(io.BytesIO(candidate)))


@given(st.lists(st.tuples(st.integers(0, 10 ** 6), st.binary(max_size=64)), max_size=6),
       st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=4))
@settings(max_examples=200, deadline=None)
def test_overwritten_bytes_anywhere_raise_bitstream_error(frames, edits):
    original = pack(HEADER, frames)
    blob = bytearray(original)
    for pos, value in edits:
        blob[pos % len(blob)] = value
    if bytes(blob) == original:
        assert _read_all(bytes(blob)) == frames
        return
    with pytest.raises(BitstreamError):
        _read_all(bytes(blob))
