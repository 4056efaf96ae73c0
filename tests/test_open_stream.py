"""One way to open a stream (``vaestream.coding.open_stream``) on real MNIST models: a lossy, a lossless, a
near-lossless context-coded and a per-record stream, from bytes, from a path, with the model directory and with
the family directory, each decoded by the coder its head names; foreign streams refused naming the stream; and the
lossy codec, the command line and the bits-back coder agree on near-lossless coding with a context model."""

from __future__ import annotations

import io
import json
import re
import shutil

import numpy as np
import pytest

import vaestream
from vaestream.coding import bitsback_coder, codec as codec_mod, open_stream, streams
from vaestream.coding.bitsback.coder import LosslessCoder
from vaestream.coding.family import OperatingPoint
from vaestream.coding.per_record import PerRecordCoder
from vaestream.errors import BitstreamError, ConfigError, ModelError, ModelMismatchError

K = 4


@pytest.fixture(scope="module")
def fam(tmp_path_factory, coded_model_dir, recon_member):
    """A family: the session's lossy model and its bits-back member with a K = 4 context model and a
    reconstruction network."""
    root = tmp_path_factory.mktemp("open") / "family"
    shutil.copytree(coded_model_dir, root / "lossy")
    shutil.copytree(recon_member[1], root / "bitsback", ignore=shutil.ignore_patterns(codec_mod.TABLES_FILE))
    return root


@pytest.fixture(scope="module")
def x(mnist_test):
    return mnist_test[:40]


def _sources(blob: bytes, tmp_path, name: str = "s.vz"):
    (tmp_path / name).write_bytes(blob)
    return [blob, bytearray(blob), tmp_path / name, str(tmp_path / name)]


def test_a_lossy_stream_opens_to_its_codec(fam, x, tmp_path):
    c = codec_mod.load(fam / "lossy")
    blob = c.compress(x, quality=2.0)
    want = c.decompress(blob)
    for src in _sources(blob, tmp_path):
        for root in (fam / "lossy", fam):
            dec = open_stream(src, root)
            assert isinstance(dec, codec_mod.Codec) and dec.fingerprint == c.fingerprint
            np.testing.assert_array_equal(dec.decompress(blob), want)
    np.testing.assert_array_equal(streams.decompress(tmp_path / "s.vz", fam), want)
    assert streams.stream_kind(blob) == "lossy"
    # the same verbs: frame by frame from a file, and each record's bits under the tables
    frames = list(c.iter_decompress(io.BytesIO(blob)))
    np.testing.assert_array_equal(np.concatenate(frames), want)
    bits = c.bits(x, quality=2.0)
    assert bits.shape == (len(x),) and bits.dtype == np.float64
    assert np.array_equal(bits, c.ideal_bits(c.encode(x, 2.0), 2.0))
    assert 0 < bits.sum() <= 8 * len(blob) < bits.sum() + 8 * 200  # the container adds its header and frames


def test_a_lossless_stream_opens_to_the_bits_back_coder(fam, x, tmp_path):
    d = fam / "bitsback"
    blob = bitsback_coder(d).compress(x)
    assert streams.stream_kind(blob) == "bitsback"
    for src in _sources(blob, tmp_path):
        for root in (d, fam):
            dec = open_stream(src, root)
            assert isinstance(dec, LosslessCoder) and dec.levels == 256
            assert np.array_equal(dec.decompress(blob), x)
    assert np.array_equal(streams.decompress(str(tmp_path / "s.vz"), fam), x)
    assert np.array_equal(np.concatenate(list(dec.iter_decompress(io.BytesIO(blob)))).reshape(x.shape), x)


def test_a_context_coded_near_lossless_stream_opens_with_the_directorys_context_models(fam, x, tmp_path):
    d = fam / "bitsback"
    coder = bitsback_coder(d, K)
    assert coder.context is not None  # levels=K codes with the directory's context model for K
    blob = coder.compress(x)
    want = coder.quantize(x)
    model = open_stream(blob, d).model
    with pytest.raises(ModelMismatchError, match="context"):  # a coder without the context models cannot read it
        LosslessCoder(model).decompress(blob)
    for src in _sources(blob, tmp_path):
        for root in (d, fam):
            assert np.array_equal(open_stream(src, root).decompress(blob), want)
    assert np.array_equal(streams.decompress(tmp_path / "s.vz", d), want)


def test_a_per_record_stream_opens_to_the_family_coder(fam, x, tmp_path):
    points = [OperatingPoint(model=fam / "lossy", quality=1.0),
              OperatingPoint(model=fam / "bitsback", levels=K, reconstruction="learned")]
    assert [p.kind for p in points] == ["lossy", "near_lossless"]
    j = np.arange(len(x)) % 2
    r = PerRecordCoder(fam, points=points).encode(x, j)
    assert r.streams == [{"model": str(fam / "lossy"), "quality": 1.0, "levels": None, "reconstruction": None,
                          "records": 20},
                         {"model": str(fam / "bitsback"), "quality": None, "levels": K, "reconstruction": "learned",
                          "records": 20}]
    assert streams.stream_kind(r.blob) == "per_record"
    for src in _sources(r.blob, tmp_path, "s.vm"):
        dec = open_stream(src, fam)
        assert isinstance(dec, PerRecordCoder)
        y = dec.decompress(r.blob)
        assert y.dtype == np.uint8 and y.shape == x.shape
        assert np.array_equal(y.reshape(len(x), -1), r.reconstruction)
    assert np.array_equal(streams.decompress(tmp_path / "s.vm", fam), y)
    with open(tmp_path / "s.vm", "rb") as f:  # the same verb as the other coders: read front to back
        assert np.array_equal(np.concatenate(list(dec.iter_decompress(f))), y)
    with pytest.raises(ConfigError, match="family"):  # several models: a model directory cannot open it
        open_stream(tmp_path / "s.vm", fam / "lossy")
    with pytest.raises(BitstreamError, match="per-record stream"):  # nor can the lossy codec
        codec_mod.load(fam / "lossy").decompress(r.blob)


def test_a_foreign_or_corrupt_stream_is_refused_naming_it(fam, x, coded_model_dir, tmp_path):
    junk = b"PK\x03\x04 not a vaestream stream at all"
    (tmp_path / "junk.bin").write_bytes(junk)
    with pytest.raises(BitstreamError, match="^stream: "):
        open_stream(junk, fam)
    with pytest.raises(BitstreamError, match="junk.bin"):
        open_stream(tmp_path / "junk.bin", fam / "lossy")
    with pytest.raises(BitstreamError, match="^mine.vz: "):
        open_stream(junk, fam, name="mine.vz")
    with pytest.raises(BitstreamError, match="missing.vz: no such file"):
        open_stream(tmp_path / "missing.vz", fam)
    lossless = bitsback_coder(fam / "bitsback").compress(x[:4])
    from vaestream.coding.container import read_header

    hexfp = read_header(io.BytesIO(lossless)).fingerprint.hex()
    with pytest.raises(ModelMismatchError, match=f"^other.vz: written by model {hexfp}"):  # another model's dir
        open_stream(lossless, coded_model_dir, name="other.vz")
    lossy = codec_mod.load(coded_model_dir).compress(x[:4])
    alone = tmp_path / "alone"
    shutil.copytree(fam / "bitsback", alone / "bitsback")
    hexfp = read_header(io.BytesIO(lossy)).fingerprint.hex()
    with pytest.raises(ModelError, match=f"^lossy.vz: written by model {hexfp}.*not a member of"):
        open_stream(lossy, alone, name="lossy.vz")


def test_the_lossy_codec_refuses_a_context_coded_stream_and_open_stream_decodes_it(recon_member, mnist_train, x,
                                                                                  tmp_path):
    """``vaestream.load(d).decompress`` of a bits-back stream used to reach a coder without the context models; now
    the lossy codec is lossy only and says where to go."""
    d = tmp_path / "bitsback"
    shutil.copytree(recon_member[1], d, ignore=shutil.ignore_patterns(codec_mod.TABLES_FILE))
    c = codec_mod.load(d, calibration=mnist_train[:500])  # the bits-back model with lossy tables too
    blob = bitsback_coder(d, K).compress(x)
    with pytest.raises(BitstreamError, match="vaestream.coding.open_stream"):
        c.decompress(blob)
    assert np.array_equal(vaestream.open_stream(blob, d).decompress(blob), bitsback_coder(d, K).quantize(x))
    assert vaestream.open_stream is open_stream


def test_the_command_line_and_the_python_coder_write_the_same_context_coded_stream(fam, x, tmp_path, capsys):
    """``compress --levels K`` and ``bitsback_coder(d, levels=K)`` both code with the directory's context model."""
    from vaestream.cli import main

    d = fam / "bitsback"
    np.save(tmp_path / "x.npy", x)
    assert main(["compress", str(tmp_path / "x.npy"), str(tmp_path / "x.vz"), "--model", str(d),
                 "--levels", str(K)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["context"] is True
    assert (tmp_path / "x.vz").read_bytes() == bitsback_coder(d, K).compress(x)
    assert main(["decompress", str(tmp_path / "x.vz"), str(tmp_path / "y.npy"), "--model", str(d)]) == 0
    assert np.array_equal(np.load(tmp_path / "y.npy"), bitsback_coder(d, K).quantize(x))


def test_learned_reconstruction_codes_where_the_directory_has_the_network_and_names_it_where_not(
        fam, ctx_member, x, tmp_path):
    d = fam / "bitsback"
    blob, want = bitsback_coder(d, K, "learned").compress_and_reconstruct(x)
    assert np.array_equal(open_stream(blob, d).decompress(blob).reshape(len(x), -1), want)
    assert OperatingPoint(model=d, levels=K, reconstruction="learned").compress(x) == blob
    plain = ctx_member[1]  # a context model for K, no reconstruction network
    with pytest.raises(ConfigError, match=f"^{re.escape(str(plain))}: reconstruction 'learned'.*no reconstruction"):
        bitsback_coder(plain, K, "learned")
    with pytest.raises(ConfigError, match="does not exist"):
        bitsback_coder(d, K + 1, "learned")
