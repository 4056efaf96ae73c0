"""Learned entropy models (vaestream.entropy_models, vaestream.coding.learned) on a tiny conv model trained briefly on
real MNIST: one variable-rate mean-scale hyperprior model, its codec's rates and real bytes, exact decoding in fresh
processes under other CPU instruction sets, thread counts and batchings, the side stream's CRC, other record sizes,
and the command line (train --entropy-model, compress, decompress)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

MNIST = Path("/work/shared/data/mnist")
LAMBDAS = (3e4, 3e3, 3e2)
pytestmark = pytest.mark.skipif(not MNIST.is_dir(), reason="needs the MNIST files")


def _config(kind: str = "hyperprior", **kw):
    from vaestream import ModelConfig

    base = dict(input_dim=784, input_shape=(28, 28), latent_dim=7 * 7 * 8, hidden=(), activation="relu",
                likelihood="gaussian", arch="conv", channels=(16, 32), latent_channels=8, entropy_model=kind,
                rd_lambdas=LAMBDAS)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(hyperprior_trained):
    """(model dir, 300 MNIST test records): a hyperprior model of :func:`_config` trained 300 steps on 6,000 MNIST
    training records (conftest's session fixture, shared with test_learned_integration)."""
    return hyperprior_trained


@pytest.fixture(scope="module")
def codec(trained):
    import vaestream

    return vaestream.load(trained[0], frame_records=64)


def _psnr(x: np.ndarray, x_hat: np.ndarray) -> float:
    mse = float(np.mean((x.reshape(len(x), -1).astype(np.float64) / 255.0 - x_hat) ** 2))
    return 10 * np.log10(1.0 / mse)


def test_config_and_fingerprint(trained, codec):
    """config.json records the entropy model and the rate levels; the fingerprint covers the entropy model's
    weights; the configs a learned entropy model cannot decode exactly are refused."""
    from vaestream.errors import ConfigError

    cfg = json.loads((trained[0] / "config.json").read_text())
    assert cfg["entropy_model"] == "hyperprior" and cfg["rd_lambdas"] == list(LAMBDAS)
    fp = codec.model.fingerprint()
    g = codec.model.entropy.log_gain
    old = g.numpy()
    g.assign(old + 0.5)
    assert codec.model.fingerprint() != fp
    g.assign(old)
    assert codec.model.fingerprint() == fp
    for bad in (dict(activation="elu"), dict(likelihood="gaussian_sigmoid"), dict(rd_lambdas=(3e2, 3e3)),
                dict(rd_lambdas=())):
        with pytest.raises(ConfigError):
            _config(**bad)


def test_bits_fall_as_lambda_falls(trained, codec):
    """At each rate level (lambda 3e4, 3e3, 3e2) the real stream's bits per record fall, stay within 2 % + the
    container of the ideal code length (side stream included), and the side stream's cost is part of them."""
    x = trained[1]
    real, ideal, psnr = [], [], []
    for q in codec.qualities:
        blob = codec.compress(x, quality=q)
        real.append(8 * len(blob) / len(x))
        ideal.append(float(np.mean(codec.bits(x, quality=q))))
        psnr.append(_psnr(x, codec.decompress(blob)))
    assert real[0] > real[1] > real[2] > 10, real
    for r, i in zip(real, ideal):
        assert i <= r <= 1.02 * i + 8 * 40 / 64, (real, ideal)  # + header and frames' bytes per record
    assert psnr[0] > psnr[2] and min(psnr) > 12, psnr
    z, _ = codec.symbols(codec.model_inputs(x)[0], 0)
    assert z.shape == (len(x), 2, 2, 8)


def _fresh_run(model_dir: Path, stream: Path, out: Path, env: dict, records: str = "") -> dict:
    """In a fresh process with ``env``: decode ``stream`` (``records``: comma-separated indices, or all) into
    ``out`` (.npy), and compress ``out.with_suffix('.x.npy')``'s records at the stream's quality into
    ``out.with_suffix('.vz')``; returns the NumPy CPU features that process had."""
    code = ("import sys, io, json, numpy as np, vaestream; from pathlib import Path; "
            "from vaestream.coding.container import read_header; "
            "c = vaestream.load(sys.argv[1], frame_records=64); "
            "r = sys.argv[4]; idx = None if not r else [int(v) for v in r.split(',')]; out = Path(sys.argv[3]); "
            "np.save(out, c.read(sys.argv[2], idx)); q = read_header(open(sys.argv[2], 'rb')).quality; "
            "out.with_suffix('.vz').write_bytes(c.compress(np.load(out.with_suffix('.x.npy')), quality=q)); "
            "from numpy._core._multiarray_umath import __cpu_features__ as f; print(json.dumps(f))")
    r = subprocess.run([sys.executable, "-c", code, str(model_dir), str(stream), str(out), records],
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_bit_identical_in_fresh_processes(trained, codec, tmp_path):
    """A file of 300 records (5 frames) decodes to the same float32 bits as in this process, and the records
    compress to the same bytes: in fresh processes with oneDNN limited to AVX2 / SSE4.1, NumPy's AVX-512 dispatch
    off, one, two or four BLAS threads, and records read in another batching (random access to a scattered subset);
    a record's symbols do not depend on its batch."""
    from numpy._core._multiarray_umath import __cpu_dispatch__

    model_dir, x = trained
    stream = tmp_path / "x.vz"
    q = codec.qualities[1]
    codec.write(stream, x, quality=q)
    want = codec.read(stream)
    blob = codec.compress(x, quality=q)
    assert want.dtype == np.float32 and want.shape == (300, 784)
    off = " ".join(f for f in ("X86_V4", "AVX512_ICL", "AVX512_SPR", "AVX512_SKX", "AVX512F") if f in __cpu_dispatch__)
    runs = {"avx2": ({"ONEDNN_MAX_CPU_ISA": "AVX2", "NPY_DISABLE_CPU_FEATURES": off, "OPENBLAS_NUM_THREADS": "1"},
                     ""),
            "sse41": ({"ONEDNN_MAX_CPU_ISA": "SSE41", "NPY_DISABLE_CPU_FEATURES": off, "OPENBLAS_NUM_THREADS": "4",
                       "TF_NUM_INTRAOP_THREADS": "1"}, "")}
    subset = [299, 3, 64, 65, 200, 0]
    runs["subset"] = ({"OPENBLAS_NUM_THREADS": "2"}, ",".join(map(str, subset)))
    for name, (env, records) in runs.items():
        out = tmp_path / f"{name}.npy"
        np.save(out.with_suffix(".x.npy"), x)
        cpu = _fresh_run(model_dir, stream, out, env, records)
        assert not any(cpu.get(f) for f in env.get("NPY_DISABLE_CPU_FEATURES", "").split()), (name, cpu)
        got = np.load(out)
        expect = want[subset] if records else want
        assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), expect.view(np.uint32)), name
        assert out.with_suffix(".vz").read_bytes() == blob, name
    images, _ = codec.model_inputs(x)
    z7, q7 = codec.symbols(images[:7], 1)
    z, q_all = codec.symbols(images, 1)
    assert np.array_equal(z7, z[:7]) and np.array_equal(q7, q_all[:7])
    assert np.array_equal(codec.decompress(codec.compress(x[:7], quality=q)), codec.read(stream, list(range(7))))


def test_flipped_bit_in_side_stream_refused(trained, codec):
    """A flipped bit in a frame's side stream (the hyper-latent), or in its length, is refused with a
    BitstreamError naming the stream; so is a truncated stream and one of another rate level's header."""
    from vaestream.coding import container
    from vaestream.errors import BitstreamError

    x = trained[1][:50]
    blob = codec.compress(x)
    with container.ContainerReader(blob) as r:
        (_, payload), = list(r)
    at = blob.index(payload)
    side_len = payload[0]
    assert 0 < side_len < len(payload)
    for i in (at, at + 1, at + 1 + side_len // 2, at + side_len):
        for bit in (1, 64):
            bad = bytearray(blob)
            bad[i] ^= bit
            with pytest.raises(BitstreamError, match="side.vz"):
                codec.decompress(bytes(bad), name="side.vz")
    with pytest.raises(BitstreamError):
        codec.decompress(blob[:-3])
    assert np.array_equal(codec.decompress(blob), codec.decompress(bytes(blob)))


def test_other_size_round_trip(trained, codec):
    """28 x 20 records (an MNIST crop) go through the 28 x 28-trained model: the header keeps their shape, the
    decoder crops to it, and the reconstruction is as good as the full-size one's (within 3 dB)."""
    from vaestream.coding import container
    import io

    x = trained[1][:100]
    crop = np.ascontiguousarray(x[:, :, 4:24])
    blob = codec.compress(crop, quality=codec.qualities[0])
    h = container.read_header(io.BytesIO(blob))
    assert h.input_shape == (28, 20) and h.latent_dim == 7 * 5 * 8
    x_hat = codec.decompress(blob)
    assert x_hat.shape == (100, 560)
    full = _psnr(x, codec.decompress(codec.compress(x, quality=codec.qualities[0])))
    assert _psnr(crop, x_hat) > full - 3, (_psnr(crop, x_hat), full)


def test_cli_train_compress_decompress(tmp_path, capsys):
    """``vaestream train --objective rd --arch conv --entropy-model factorized --lmbdas ...`` writes a model whose
    config names it; ``vaestream compress`` / ``decompress`` round-trip records through it (the same floats as the
    Python API); ``vaestream rd --model`` sweeps its rate levels."""
    from vaestream.cli import main
    from vaestream.data import load_records

    model = tmp_path / "fact"
    assert main(["train", "--data", str(MNIST), "--out", str(model), "--objective", "rd", "--arch", "conv",
                 "--channels", "16", "32", "--latent-channels", "4", "--entropy-model", "factorized",
                 "--lmbdas", "300", "3000", "--steps", "40", "--no-progress"]) == 0
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["entropy_model"] == "factorized" and cfg["rd_lambdas"] == [3000.0, 300.0]
    assert cfg["activation"] == "relu" and cfg["likelihood"] == "gaussian"
    x = load_records(str(MNIST), "test")[:40]
    np.save(tmp_path / "x.npy", x)
    assert main(["compress", str(tmp_path / "x.npy"), str(tmp_path / "x.vz"), "--model", str(model),
                 "--quality", "1.4142135623730951"]) == 0
    assert main(["decompress", str(tmp_path / "x.vz"), str(tmp_path / "y.npy"), "--model", str(model)]) == 0
    import vaestream

    c = vaestream.load(model)
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (40, 28, 28)
    assert np.array_equal(y.reshape(40, -1), c.decompress((tmp_path / "x.vz").read_bytes()))
    assert c.level(1.4142135623730951) == 1
    capsys.readouterr()
    assert main(["rd", "--model", str(model), "--data", str(MNIST), "--n", "40"]) == 0
    rows = json.loads(capsys.readouterr().out)["rd"]
    assert [r["lmbda"] for r in rows] == [3000.0, 300.0]
    assert all(r["bits_per_record"] >= r["ideal_bits_per_record"] > 0 and r["side_bits_per_record"] == 0
               for r in rows)


# -- the SavedModel export and vaestream serve -------------------------------------------------------------------
@pytest.fixture(scope="module")
def hyper_export(trained, tmp_path_factory):
    """An export of the trained model at its middle rate level (the export's base directory)."""
    from vaestream.coding.learned import level_quality
    from vaestream.serving.export import export

    base = tmp_path_factory.mktemp("hyper_export")
    export(trained[0], base, quality=level_quality(1))
    return base


def test_export_equals_codec_in_fresh_process(trained, codec, hyper_export, tmp_path):
    """Loaded in a fresh process (oneDNN limited to AVX2), the export's ``reconstruct`` gives the float32 bits of
    the codec's decompress at the exported level, ``quantize`` its symbols, side symbols and table indices, and
    ``decode`` of those symbols the same pictures; export.json records the level."""
    from vaestream.coding.learned import level_quality

    x = trained[1][:40]
    xf = x.reshape(len(x), -1).astype(np.float32) * np.float32(1 / 255)
    np.save(tmp_path / "x.npy", xf)
    code = ("import sys, numpy as np; from vaestream.serving.export import ExportedModel; "
            "m = ExportedModel(sys.argv[1]); x = np.load(sys.argv[2]); q = m.run('quantize', x=x); "
            "d = m.run('decode', symbols=q['symbols'], side_symbols=q['side_symbols'])['x_hat']; "
            "np.savez(sys.argv[3], x_hat=m.reconstruct(x), decoded=d, **q)")
    r = subprocess.run([sys.executable, "-c", code, str(hyper_export), str(tmp_path / "x.npy"),
                        str(tmp_path / "out.npz")], capture_output=True, text=True,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    want = codec.decompress(codec.compress(x, quality=level_quality(1)))
    assert got["x_hat"].dtype == np.float32 and np.array_equal(got["x_hat"].view(np.uint32), want.view(np.uint32))
    assert np.array_equal(got["decoded"].view(np.uint32), want.view(np.uint32))
    z, q, tq = codec._symbols(codec.model_inputs(x)[0], 1)
    assert np.array_equal(got["symbols"], q.reshape(len(x), -1))
    assert np.array_equal(got["side_symbols"], z.reshape(len(x), -1))
    assert np.array_equal(got["table_index"], tq.reshape(len(x), -1))
    assert len(np.unique(tq)) > 3 and np.abs(q).max() > 0
    info = json.loads((hyper_export / "1" / "assets" / "export.json").read_text())
    assert info["level"] == 1 and info["entropy_model"] == "hyperprior" and info["quality"] == level_quality(1)


def test_serve_answers_learned_export(trained, codec, hyper_export):
    """``vaestream serve`` on the export answers a REST predict of ``reconstruct`` with the codec's pictures and
    of ``quantize`` with its symbols."""
    from tests.test_serve import post, start_serve, stop_serve
    from vaestream.coding.learned import level_quality

    x = trained[1][:5]
    xf = x.reshape(len(x), -1).astype(np.float32) * np.float32(1 / 255)
    want = codec.decompress(codec.compress(x, quality=level_quality(1)))
    proc, info = start_serve(hyper_export)
    try:
        url = f"http://127.0.0.1:{info['rest_api_port']}"
        status, body = post(url, {"signature_name": "reconstruct", "instances": xf.tolist()})
        assert status == 200, body
        assert np.array_equal(np.asarray(body["predictions"], np.float32), want)
        status, body = post(url, {"signature_name": "quantize", "inputs": {"x": xf.tolist()}})
        assert status == 200, body
        _, q = codec.symbols(codec.model_inputs(x)[0], 1)
        assert np.array_equal(np.asarray(body["outputs"]["symbols"]), q.reshape(len(x), -1))
    finally:
        stop_serve(proc)


def test_factorized_export(trained, tmp_path):
    """A ``factorized`` model (trained a few steps) exports too: ``quantize`` gives its codec's symbols and each
    channel's table, no side symbols; ``reconstruct`` and ``decode`` its decompressed pictures, bit for bit; an
    export with the same model, level and settings is not written twice (``skip_unchanged``)."""
    import vaestream
    from vaestream.data import make_dataset
    from vaestream.serving.export import ExportedModel, export
    from vaestream.training import TrainConfig, train

    d = tmp_path / "fact"
    x = trained[1][:30]
    train(make_dataset(trained[1], "gaussian", "mnist test[:300]"), d, _config("factorized"),
          TrainConfig(objective="rd", steps=20, eval_records=100, seed=2), progress=False)
    c = vaestream.load(d)
    path = export(d, tmp_path / "exports", quality=c.qualities[2])
    assert export(d, tmp_path / "exports", quality=c.qualities[2], skip_unchanged=True) == path
    m = ExportedModel(path)
    xf = x.reshape(len(x), -1).astype(np.float32) * np.float32(1 / 255)
    q = m.run("quantize", x=xf)
    _, want_q, tq = c._symbols(c.model_inputs(x)[0], 2)
    assert q["side_symbols"].shape == (len(x), 0) and np.array_equal(q["symbols"], want_q.reshape(len(x), -1))
    assert np.array_equal(q["table_index"], tq.reshape(len(x), -1))
    want = c.decompress(c.compress(x, quality=c.qualities[2]))
    assert np.array_equal(m.reconstruct(xf).view(np.uint32), want.view(np.uint32))
    got = m.run("decode", symbols=q["symbols"], side_symbols=q["side_symbols"])["x_hat"]
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_beam_encode_decode_with_coder(trained, codec, hyper_export, tmp_path):
    """The Beam encode job with ``--coder`` on the model writes containers the codec decodes to its own
    reconstructions (the bytes ``compress`` gives for those records), and the decode job's pictures are the same
    float32 bits; ``--rdo-lmbda`` and ``--coder lossless`` are refused."""
    import pyarrow.parquet as pq

    from vaestream import beam as vb
    from vaestream.beam.jobs import decode, encode
    from vaestream.errors import ConfigError

    model_dir, x = trained[0], trained[1][:70]
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "codes"
    s = encode.run(["--input", str(tmp_path / "x.npy"), "--model", str(model_dir), "--output", str(out),
                    "--coder", "--chunk_size", "32"])
    assert s["records"] == 70 and s["dead_lettered"] == 0 and s["coder"] == "lossy"
    coded = [item for f in sorted(out.glob("codes-*.tfrecord")) for item in vb.read_codes(str(f))]
    assert sum(len(item) for item in coded) == 70
    for item in coded:
        idx = [int(k.rsplit(":", 1)[1]) for k in item.keys]
        assert item.container == codec.compress(x[idx], quality=codec.qualities[0])
    d = decode.run(["--input", str(out), "--model", str(model_dir), "--output", str(tmp_path / "rec"),
                    "--output_format", "parquet"])
    assert d["records"] == 70 and d["dead_lettered"] == 0
    back = {}
    for f in (tmp_path / "rec").glob("recon-*.parquet"):
        t = pq.read_table(f).to_pydict()
        back.update(zip(t["key"], t["data"]))
    want = codec.decompress(codec.compress(x, quality=codec.qualities[0]))
    got = np.stack([np.asarray(back[f"x.npy:{i:09d}"], np.float32).reshape(-1) for i in range(70)])
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    with pytest.raises(ConfigError):
        encode.run(["--input", str(tmp_path / "x.npy"), "--model", str(model_dir), "--output", str(out),
                    "--coder", "--rdo-lmbda", "0.1"])
    with pytest.raises(ConfigError, match="learned entropy model"):
        encode.run(["--input", str(tmp_path / "x.npy"), "--model", str(model_dir), "--output", str(out),
                    "--coder", "lossless"])
    with pytest.raises(ConfigError, match="needs --model"):
        encode.run(["--input", str(tmp_path / "x.npy"), "--saved_model", str(hyper_export), "--output", str(out),
                    "--coder"])
