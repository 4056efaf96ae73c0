"""The container format (version 2): layouts, overhead, index, append, streaming, and every kind of damage."""

from __future__ import annotations

import io
import math
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vaestream.coding import container
from vaestream.coding.container import ContainerReader, ContainerWriter, Header, iter_stream, pack, read_header
from vaestream.errors import BitstreamError, ModelMismatchError

HEADER = Header(fingerprint=bytes(range(32)), table_hash=bytes(range(32, 64)), quality=1.0, level=12,
                latent_dim=10, input_shape=(28, 28))
FRAMES = [(3, b"abcdefgh"), (1, b"\x00\x01\x02\x03"), (5, bytes(range(40)))]
# pack(HEADER, [(3, b"abcdefgh")]) as format version 1 wrote it (before this format): refused by name
V1_BLOB = bytes.fromhex(
    "5641455a01004300000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f000000000000f03f0c000a000000"
    "021c0000001c000000bee17fd2565a46520300000008000000607cb2086162636465666768565a495801000000430000000000000003"
    "000000d8413e685b00000000000000565a454e")


class _Pipe(io.RawIOBase):
    """A non-seekable binary stream over bytes (like a pipe or a socket)."""

    def __init__(self, data: bytes):
        self._b = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self._b.readinto(b)


def _read_all(blob: bytes) -> list[tuple[int, bytes]]:
    with ContainerReader(blob) as r:
        return list(r)


def _indexed(tmp_path, frames, header=HEADER) -> bytes:
    path = tmp_path / "i.vz"
    with ContainerWriter(path, header) as w:
        for n, payload in frames:
            w.write_frame(n, payload)
    return path.read_bytes()


def test_header_keeps_4_byte_model_and_table_ids_and_reads_back():
    assert HEADER.fingerprint == bytes(range(4)) and HEADER.table_hash == bytes(range(32, 36))
    raw = HEADER.to_bytes()
    # magic 2, version 1, flags 1, fingerprint 4, table id 4, quality 1, latent 1, shape 2
    assert raw == b"VZ\x02\x20" + bytes(range(4)) + bytes(range(32, 36)) + bytes([127, 10, 28, 28])
    h = read_header(io.BytesIO(pack(HEADER, FRAMES[:1])))
    assert h == HEADER and h.level is None and h.version == 2 and not h.lossless
    with pytest.raises(ValueError):
        Header(fingerprint=b"abc", table_hash=bytes(4), quality=1.0, level=0, latent_dim=1, input_shape=(1,))
    with pytest.raises(ValueError):
        Header(fingerprint=bytes(4), table_hash=bytes(4), quality=1.0, level=0, latent_dim=1, input_shape=(1,) * 9)
    with pytest.raises(ValueError):
        Header(**{**HEADER.__dict__, "version": 1}).to_bytes()


def test_pack_and_read_back_with_random_access_and_stream():
    blob = pack(HEADER, FRAMES)
    with ContainerReader(blob) as r:
        assert r.header == HEADER and not r.indexed
        assert len(r) == 9 and [fr[1:] for fr in r.frames] == [(0, 3), (3, 1), (4, 5)]
        assert r.read_frame(2) == FRAMES[2]
        assert r.frame_of(0) == 0 and r.frame_of(3) == 1 and r.frame_of(8) == 2
        with pytest.raises(IndexError):
            r.frame_of(9)
        assert list(r) == FRAMES
    for f in (io.BytesIO(blob), _Pipe(blob)):
        items = list(iter_stream(f))
        assert items[0] == HEADER and items[1:] == FRAMES
    # a container without frames is valid too (it ends with its header's CRC32)
    empty = pack(HEADER, [])
    assert len(empty) == len(HEADER.to_bytes(frames=0)) + 4
    assert _read_all(empty) == [] and list(iter_stream(io.BytesIO(empty))) == [HEADER]


def test_overhead_of_a_1000_record_batch_is_24_bytes():
    """The issue's target: < 2 % on 1,000 records; a coarse Fashion-MNIST batch has ~1,376 payload bytes."""
    payload = bytes(1376)
    blob = pack(HEADER, [(1000, payload)])
    assert len(blob) - len(payload) == 24  # header 16 + records 2 + length 2 + CRC32 4
    assert (len(blob) - len(payload)) / len(payload) < 0.02
    # more frames: a count byte, then per frame its varints and CRC32
    blob = pack(HEADER, FRAMES)
    payload = sum(len(p) for _, p in FRAMES)
    assert len(blob) == 16 + 1 + payload + 6 * len(FRAMES)
    # a single record, a lossless header (no table id, no quality), an off-ladder quality (code 255 + f64)
    assert len(Header(**{**HEADER.__dict__, "single": True}).to_bytes()) == 16
    lossless = Header(**{**HEADER.__dict__, "table_hash": container.LOSSLESS_TAG, "quality": 0.0, "level": 0})
    assert len(lossless.to_bytes()) == 11
    assert len(Header(**{**HEADER.__dict__, "quality": 0.3}).to_bytes()) == 16 + 8


def test_quality_codes_are_exact_on_the_default_ladder_and_f64_otherwise():
    from vaestream.coding.tables import DEFAULT_QUALITIES

    for q in list(DEFAULT_QUALITIES) + [2.0 ** 40, 2.0 ** -40.5]:
        raw = Header(**{**HEADER.__dict__, "quality": q}).to_bytes()
        assert len(raw) == 16
        assert read_header(io.BytesIO(pack(Header(**{**HEADER.__dict__, "quality": q}), []))).quality == q
    for q in (0.3, math.pi, 1e-300, 2.0 ** 70, math.nextafter(1.0, 2.0)):
        h = Header(**{**HEADER.__dict__, "quality": q})
        assert len(h.to_bytes()) == 24 and read_header(io.BytesIO(pack(h, FRAMES))).quality == q
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            Header(**{**HEADER.__dict__, "quality": bad}).to_bytes()


def test_lossless_headers_carry_the_tag_and_match_the_lossless_module():
    from vaestream.coding.bitsback.coder import LOSSLESS_TAG

    assert container.LOSSLESS_TAG == LOSSLESS_TAG
    h = Header(**{**HEADER.__dict__, "table_hash": LOSSLESS_TAG, "quality": 0.0, "level": 0})
    back = read_header(io.BytesIO(pack(h, FRAMES)))
    assert back == h and back.lossless and back.table_hash == LOSSLESS_TAG and back.level == 0
    # a lossy header whose table id happens to start like the tag is still lossy (a flag, not a value)
    lossy = Header(**{**HEADER.__dict__, "table_hash": LOSSLESS_TAG[:4]})
    assert not read_header(io.BytesIO(pack(lossy, FRAMES))).lossless


def test_varints_are_minimal_leb128():
    for v in (0, 1, 127, 128, 300, 16383, 16384, 2 ** 32 - 1):
        b = container.varint(v)
        assert len(b) == max(1, math.ceil(v.bit_length() / 7))
        assert container.read_varint(io.BytesIO(b), bytearray(), "s", "x") == v
    for bad in (b"\x80\x00", b"\xff\xff\xff\xff\x7f", b"\x80\x80\x80\x80\x80\x01"):
        with pytest.raises(BitstreamError, match="varint"):
            container.read_varint(io.BytesIO(bad), bytearray(), "s", "x")
    with pytest.raises(ValueError):
        container.varint(2 ** 32)


def test_writer_appends_in_place_and_refuses_another_model_or_quality(tmp_path):
    path = tmp_path / "c.vz"
    with ContainerWriter(path, HEADER) as w:
        w.write_frame(*FRAMES[0])
    with ContainerWriter(path, HEADER, append=True) as w:
        w.write_frame(*FRAMES[1])
        w.write_frame(*FRAMES[2])
        assert [n for _, n in w.entries] == [3, 1, 5]
    blob = path.read_bytes()
    assert blob == _indexed(tmp_path, FRAMES)  # the same bytes as writing all frames at once
    tags = 3
    index = 1 + 1 + 2 * len(FRAMES) + 4
    assert len(blob) == 16 + tags + 6 * len(FRAMES) + sum(len(p) for _, p in FRAMES) + index + 6
    with ContainerReader(path) as r:
        assert r.indexed and r.header == HEADER and list(r) == FRAMES
        assert [fr[1:] for fr in r.frames] == [(0, 3), (3, 1), (4, 5)] and r.read_frame(1) == FRAMES[1]
    for f in (io.BytesIO(blob), _Pipe(blob)):
        assert list(iter_stream(f)) == [HEADER] + FRAMES
    other = Header(**{**HEADER.__dict__, "fingerprint": b"\xff" * 8})
    with pytest.raises(ModelMismatchError, match="written by model"):
        ContainerWriter(path, other, append=True)
    other = Header(**{**HEADER.__dict__, "level": 3, "quality": 0.125})
    with pytest.raises(ModelMismatchError, match="quality"):
        ContainerWriter(path, other, append=True)
    assert path.read_bytes() == blob  # a refused append leaves the file as it was
    single = tmp_path / "s.vz"
    single.write_bytes(pack(Header(**{**HEADER.__dict__, "single": True}), FRAMES[:1]))
    with pytest.raises(BitstreamError, match="single record"):
        ContainerWriter(single, Header(**{**HEADER.__dict__, "single": True}), append=True)
    # an indexed file without frames
    empty = _indexed(tmp_path, [])
    assert _read_all(empty) == [] and list(iter_stream(io.BytesIO(empty))) == [HEADER]


def test_appending_to_a_packed_blob_rewrites_it_as_an_indexed_file(tmp_path):
    path = tmp_path / "p.vz"
    path.write_bytes(pack(HEADER, FRAMES[:2]))
    with ContainerWriter(path, HEADER, append=True) as w:
        w.write_frame(*FRAMES[2])
    assert path.read_bytes() == _indexed(tmp_path, FRAMES)
    assert not (tmp_path / "p.vz.tmp").exists()
    path.write_bytes(pack(HEADER, FRAMES[:2]))
    with pytest.raises(ModelMismatchError):
        ContainerWriter(path, Header(**{**HEADER.__dict__, "quality": 2.0}), append=True)
    assert path.read_bytes() == pack(HEADER, FRAMES[:2]) and not (tmp_path / "p.vz.tmp").exists()


def _blobs(tmp_path) -> dict[str, bytes]:
    return {"packed": pack(HEADER, FRAMES), "one frame": pack(HEADER, FRAMES[2:]), "empty": pack(HEADER, []),
            "indexed": _indexed(tmp_path, FRAMES), "indexed, empty": _indexed(tmp_path, [])}


def test_every_single_bit_flip_is_detected(tmp_path):
    for kind, blob in _blobs(tmp_path).items():
        for i in range(len(blob)):
            for bit in range(8):
                bad = bytearray(blob)
                bad[i] ^= 1 << bit
                with pytest.raises(BitstreamError):
                    _read_all(bytes(bad))
                with pytest.raises(BitstreamError):
                    list(iter_stream(io.BytesIO(bytes(bad))))


def test_every_truncation_is_detected_by_both_readers(tmp_path):
    for kind, blob in _blobs(tmp_path).items():
        frames = FRAMES if "empty" not in kind else []
        frames = frames[2:] if kind == "one frame" else frames
        for n in range(len(blob)):
            with pytest.raises(BitstreamError):
                _read_all(blob[:n])
            got = []
            with pytest.raises(BitstreamError):
                for item in iter_stream(_Pipe(blob[:n])):
                    got.append(item)
            assert got[:1] in ([], [HEADER])
            assert got[1:] == frames[:max(len(got) - 1, 0)]  # whole frames before the cut, never a partial one


def test_read_header_verifies_on_a_seekable_file_and_the_stream_reader_before_it_yields(tmp_path):
    blob = bytearray(pack(HEADER, FRAMES))
    blob[5] ^= 0x01  # the fingerprint: well formed, wrong
    f = io.BytesIO(bytes(blob))
    with pytest.raises(BitstreamError, match="CRC"):
        read_header(f)
    assert read_header(_Pipe(bytes(blob))).fingerprint != HEADER.fingerprint  # a pipe cannot look ahead ...
    it = iter_stream(_Pipe(bytes(blob)))
    with pytest.raises(BitstreamError, match="CRC"):  # ... but the stream reader checks before yielding it
        next(it)
    good = pack(HEADER, FRAMES)
    f = io.BytesIO(good)
    assert read_header(f) == HEADER and f.tell() == 17  # left just after the header (and its frame count)


def test_wrong_version_and_foreign_files_are_named():
    with pytest.raises(BitstreamError, match="format version 1 .*reads version 2"):
        _read_all(V1_BLOB)
    with pytest.raises(BitstreamError, match="format version 1"):
        list(iter_stream(io.BytesIO(V1_BLOB)))
    blob = bytearray(pack(HEADER, FRAMES))
    blob[2] = 7
    with pytest.raises(BitstreamError, match="version 7"):
        _read_all(bytes(blob))
    with pytest.raises(BitstreamError, match="not a vaestream container"):
        _read_all(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(BitstreamError, match="truncated"):
        _read_all(b"V")
    with pytest.raises(BitstreamError, match="truncated"):
        _read_all(b"VZ\x02")
    with pytest.raises(BitstreamError, match="after the end"):
        list(iter_stream(io.BytesIO(pack(HEADER, FRAMES) + b"x")))
    with pytest.raises(BitstreamError, match="after the end"):
        _read_all(pack(HEADER, FRAMES) + b"x")
    with pytest.raises(BitstreamError, match="no such file"):
        ContainerReader("/nonexistent/file.vz")


def test_a_forged_record_count_with_a_valid_crc_is_refused(tmp_path):
    n = container.MAX_FRAME_RECORDS + 1
    payload = b"\0\0\0\0"
    raw = HEADER.to_bytes()
    fields = container.varint(n) + container.varint(len(payload))
    frame = fields + zlib.crc32(payload, zlib.crc32(fields, zlib.crc32(raw))).to_bytes(4, "little") + payload
    blob = raw + frame
    with pytest.raises(BitstreamError, match="records"):
        _read_all(blob)
    with pytest.raises(BitstreamError, match="records"):
        list(iter_stream(io.BytesIO(blob)))
    with pytest.raises(ValueError):
        container.frame_bytes(n, payload)
    assert container.frame_bytes(3, b"abcdefgh", raw) == pack(HEADER, FRAMES[:1])[len(raw):]


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_random_bytes_raise_only_bitstream_errors(data):
    for candidate in (data, container.MAGIC + data, b"VZ\x02" + data, HEADER.to_bytes() + data,
                      HEADER.to_bytes(frames=None) + data):
        with pytest.raises(BitstreamError):
            _read_all(candidate)
        with pytest.raises(BitstreamError):
            list(iter_stream(io.BytesIO(candidate)))


@given(st.lists(st.tuples(st.integers(0, 10 ** 6), st.binary(max_size=64)), max_size=6),
       st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=4),
       st.booleans())
@settings(max_examples=200, deadline=None)
def test_overwritten_bytes_anywhere_raise_bitstream_error(tmp_path_factory, frames, edits, indexed):
    original = _indexed(tmp_path_factory.mktemp("o"), frames) if indexed else pack(HEADER, frames)
    blob = bytearray(original)
    for pos, value in edits:
        blob[pos % len(blob)] = value
    if bytes(blob) == original:
        assert _read_all(bytes(blob)) == frames
        return
    with pytest.raises(BitstreamError):
        _read_all(bytes(blob))
    with pytest.raises(BitstreamError):
        list(iter_stream(io.BytesIO(bytes(blob))))
