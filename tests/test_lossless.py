"""Lossless bits-back ANS coding (vaestream.lossless) on real MNIST: exact round trips, the rate against the
model's negative ELBO, damaged streams, another process decoding, and the integer tables."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from vaestream.coding import container
from vaestream.errors import BitstreamError, ConfigError, DataError, ModelMismatchError
from vaestream.coding.bitsback.chain import group_sizes
from vaestream.coding.bitsback.coder import (FORMAT, LOSSLESS_TAG, ExactMLP, LosslessCoder, compress_lossless,
                                             decompress_lossless)
from vaestream.coding.bitsback.tables import beta_binomial_grid, beta_binomial_probs, latent_prior, latent_scramble

N_RECORDS = 200
RATE_OVERHEAD = 0.03
"""Bits of a 200-record stream are within 3% of the records' summed negative ELBO (measured: < 1%)."""


@pytest.fixture(scope="session")
def bb_stream(bb_model, mnist_test):
    x = mnist_test[:N_RECORDS]
    return x, compress_lossless(bb_model[0], x)


def _binarised(mnist_test) -> np.ndarray:
    from vaestream.data import make_dataset

    return make_dataset(mnist_test[:N_RECORDS], "bernoulli", "mnist-test", binarize="static").records


# -- exactness ----------------------------------------------------------------------------------------------
def test_beta_binomial_round_trip_is_exact(bb_model, bb_stream):
    x, blob = bb_stream
    y = decompress_lossless(bb_model[0], blob)
    assert y.dtype == np.uint8 and y.shape == x.shape == (N_RECORDS, 28, 28)
    assert np.array_equal(y, x)
    h = container.read_header(io.BytesIO(blob))
    fp = bytes.fromhex(bb_model[0].fingerprint())[:container.FINGERPRINT_BYTES]
    assert h.table_hash == LOSSLESS_TAG and h.fingerprint == fp


def test_bernoulli_round_trip_is_exact(bern_model, mnist_test):
    x = _binarised(mnist_test)
    assert set(np.unique(x)) == {0, 1}
    blob = compress_lossless(bern_model[0], x)
    assert np.array_equal(decompress_lossless(bern_model[0], blob), x)
    # a binary model codes binary images in well under 1 bit per pixel
    assert 8 * len(blob) / x.size < 0.5


def test_layouts_frames_and_small_groups(bb_model, mnist_test):
    m = bb_model[0]
    x = mnist_test[300:307]
    flat = x.reshape(7, -1)
    for records in (flat, x, x[0], flat[0], flat.astype(np.int64)):
        y = decompress_lossless(m, compress_lossless(m, records))
        assert y.shape == records.shape and np.array_equal(y, records)
    # several frames, each its own chain; other group and bucket settings are read from the stream
    blob = compress_lossless(m, flat, latent_bits=8, group=2, frame_records=3)
    with container.ContainerReader(blob) as r:
        assert [fr[2] for fr in r.frames] == [3, 3, 1]
    assert np.array_equal(decompress_lossless(m, blob), flat)
    for empty in (flat[:0], x[:0]):
        y = decompress_lossless(m, compress_lossless(m, empty))
        assert y.shape == empty.shape and y.dtype == np.uint8


def _threads_env(n: int) -> dict:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS=str(n), OPENBLAS_NUM_THREADS=str(n),
                MKL_NUM_THREADS=str(n))


@pytest.mark.parametrize("n", [1, 7, 512])
def test_round_trip_of_mnist_and_fashion_batches_of_several_sizes(bb_model, mnist_test, fashion_dir, n):
    """Exact round trips of 1, 7 and 512 real records (512: two full groups of 256 after the ramp) of MNIST and of
    Fashion-MNIST (coded with the MNIST model: a poor fit, so a higher rate, but still exact)."""
    from vaestream.data import read_idx

    m = bb_model[0]
    fashion = read_idx(fashion_dir / "t10k-images-idx3-ubyte.gz")
    for x in (mnist_test[2000:2000 + n], fashion[:n]):
        blob = compress_lossless(m, x)
        assert np.array_equal(decompress_lossless(m, blob), x)


def test_frames_decode_one_at_a_time_from_a_file(bb_model, mnist_test, tmp_path):
    """iter_decompress reads a stream of several frames front to back from a binary file, frame by frame (bounded
    memory: one frame of records at a time), and gives the records back in order: the same as decompress. A
    stream cut short yields its whole frames, then raises."""
    m = bb_model[0]
    x = mnist_test[3000:3050]
    coder = LosslessCoder(m, frame_records=16)
    path = tmp_path / "s.vz"
    blob = coder.compress(x)
    path.write_bytes(blob)
    with open(path, "rb") as f:
        parts = list(LosslessCoder(m).iter_decompress(f))
    assert [len(p) for p in parts] == [16, 16, 16, 2]
    assert np.array_equal(np.concatenate(parts), LosslessCoder(m).decompress(blob).reshape(50, -1))
    assert np.array_equal(np.concatenate(parts).reshape(x.shape), x)
    r, w = os.pipe()  # a pipe: no seeking
    with os.fdopen(w, "wb") as out:
        out.write(blob[:-40])
    got = []
    with os.fdopen(r, "rb") as f, pytest.raises(BitstreamError, match="truncated"):
        for part in LosslessCoder(m).iter_decompress(f, name="pipe"):
            got.append(part)
    assert [len(p) for p in got] == [16, 16, 16]


_THREADS_PROC = ("import sys, numpy as np; from vaestream import load_model; "
                 "from vaestream.coding.bitsback.coder import LosslessCoder; "
                 "from vaestream.coding.bitsback.exact_mlp import _openblas; "
                 "m, d = load_model(sys.argv[1]), sys.argv[2]; lib = _openblas(); "
                 "n0 = int(lib[0]()) if lib is not None else -1; "
                 "np.save(d + '/y.npy', LosslessCoder(m, group=64, blas_threads=None).decompress("
                 "open(d + '/here.vz', 'rb').read())); "
                 "open(d + '/s1.vz', 'wb').write(LosslessCoder(m, group=64, blas_threads=1).compress("
                 "np.load(d + '/x.npy'))); print(n0)")
"""In a fresh process started with three BLAS threads: decode ``here.vz`` on them, then compress ``x.npy`` on one
thread (the coder's ``blas_threads=1``); print the thread count the process started with."""


def test_other_processes_with_other_thread_counts_agree_bit_for_bit(bb_model, mnist_test, tmp_path):
    """This long-lived pytest process (the machine's default threads, with the coder's own blas_threads=None: left
    as it is) and a fresh process on one BLAS thread write byte-identical streams of 300 real MNIST records (groups
    of 64, so the compressor's whole-frame encoder call and the decompressor's per-group calls differ in shape);
    the fresh process, started with three threads, first decodes this process's stream exactly on them. The
    networks' matrix products are exact (ExactMLP), so no BLAS blocking or thread split can change a table."""
    _, model_dir = bb_model
    x = mnist_test[1000:1300]
    np.save(tmp_path / "x.npy", x)
    here = LosslessCoder(bb_model[0], group=64, blas_threads=None).compress(x)
    (tmp_path / "here.vz").write_bytes(here)
    r = subprocess.run([sys.executable, "-c", _THREADS_PROC, str(model_dir), str(tmp_path)], capture_output=True,
                       text=True, env=_threads_env(3), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    started = int(r.stdout.split()[-1])  # OpenBLAS caps 3 at the cores it sees; -1: not NumPy's bundled OpenBLAS
    assert started == -1 or started > 1 or os.cpu_count() == 1, started
    assert np.array_equal(np.load(tmp_path / "y.npy"), x)
    assert (tmp_path / "s1.vz").read_bytes() == here


def test_exact_products_do_not_depend_on_how_the_batch_is_split(bb_model, mnist_test):
    """ExactMLP gives bit-identical outputs for a record whatever batch it is computed in (1, 7, 64 or 500 rows,
    odd offsets), and stays within ~1e-5 of the plain float64 network."""
    m = bb_model[0]
    x = mnist_test[:500].reshape(500, -1).astype(np.float64)
    enc = ExactMLP(m.encoder, m.config.activation)
    full = enc(x, 0, 255.0)
    for step in (1, 7, 64, 333):
        parts = np.concatenate([enc(x[s:s + step], 0, 255.0) for s in range(0, 500, step)])
        assert np.array_equal(parts.view(np.uint64), full.view(np.uint64)), step
    assert np.array_equal(enc(x[3:4].copy(), 0, 255.0), full[3:4])
    ref = m.encoder(x.astype(np.float32) / np.float32(255.0)).numpy()
    np.testing.assert_allclose(full, ref, atol=2e-4, rtol=1e-4)


# -- the rate -----------------------------------------------------------------------------------------------
def test_bits_are_close_to_the_negative_elbo(bb_model, bb_stream):
    x, blob = bb_stream
    neg_elbo = LosslessCoder(bb_model[0]).bits(x, num_samples=16).sum()
    bits = 8 * len(blob)
    assert bits < (1 + RATE_OVERHEAD) * neg_elbo, (bits, neg_elbo)
    assert bits > 0.97 * neg_elbo, (bits, neg_elbo)  # a code cannot beat the model's bound by much


def test_bits_are_each_records_code_length_within_a_few_bits(bb_model, bb_stream):
    """``bits`` per record (lossless: the -ELBO; near-lossless: the level image's estimate) is within a few bits
    per record of what the real stream spends on it, on average over 200 records, the stream's fixed costs
    (frame head, initial bits, container) included; more bits for the records that the stream codes dearer."""
    m = bb_model[0]
    x, blob = bb_stream
    for coder, stream in ((LosslessCoder(m), blob), (LosslessCoder(m, levels=5), None)):
        bits = coder.bits(x)
        assert bits.shape == (N_RECORDS,) and bits.dtype == np.float64 and np.all(bits > 0)
        real = 8 * len(stream or coder.compress(x)) / N_RECORDS
        assert abs(real - bits.mean()) < 8, (coder.levels, real, bits.mean())
        cheap, dear = x[np.argsort(bits)[:N_RECORDS // 2]], x[np.argsort(bits)[N_RECORDS // 2:]]
        assert len(coder.compress(cheap)) < len(coder.compress(dear))
    # the same records as images or flat rows: the same estimate (TensorFlow's float32 sums may differ in the last
    # ulps between calls on some CPUs, so not bit for bit)
    np.testing.assert_allclose(LosslessCoder(m).bits(x[:7]), LosslessCoder(m).bits(x[:7].reshape(7, -1)), rtol=1e-6)


def test_the_chain_draws_its_latents_from_the_posterior(bb_model, mnist_test):
    """The latents the chain pops (from bits the previous records wrote) follow Q(z|x): their standardised
    offsets from the posterior mean have mean ~0 and std ~1 and hardly any lies far out (the scrambled prior order and
    the +-8 sigma posterior windows, see bitsback.latents.windows and latent_scramble)."""
    m = bb_model[0]
    x = mnist_test[4000:4400].reshape(400, -1).astype(np.int32)
    coder = LosslessCoder(m)
    seen, orig = [], coder._likelihood
    coder._likelihood = lambda zi, f=None: (seen.append(zi.copy()), orig(zi, f))[1]
    coder.encode_frame(x)
    mean, std = coder._posterior(x)
    r = (np.concatenate(seen) - mean) / std
    far = float((np.abs(r) > 5).mean())   # a Gaussian: 6e-7; the 2^-24 floor of a +-16 bucket window: ~2e-6 each
    assert abs(r.mean()) < 0.05 and 0.9 < r.std() < 1.1 and far < 1e-3, (r.mean(), r.std(), far)


def test_initial_bits_amortise(bb_model, bb_stream):
    """A lone record pays for the latent it borrowed from the seed (at most Nz * latent_bits bits) and a
    frame's fixed costs; in a chain of 200 only the first record does, so the overhead per record over the
    negative ELBO falls to a few bits."""
    m = bb_model[0]
    x, blob = bb_stream
    neg = LosslessCoder(m).bits(x, num_samples=16)
    one = np.array([8 * len(compress_lossless(m, x[i:i + 1])) for i in range(3)])
    over_one = float(np.mean(one - neg[:3]))
    over_chain = (8 * len(blob) - neg.sum()) / len(x)
    assert over_one < m.config.latent_dim * 10 + 8 * 300, over_one  # the container's header, index, framing
    assert over_chain < 0.01 * neg.mean() + 8 * 300 / len(x), over_chain
    assert over_chain < over_one - 150, (over_chain, over_one)


# -- errors -------------------------------------------------------------------------------------------------
def test_truncated_and_corrupted_streams_raise(bb_model, bb_stream):
    m = bb_model[0]
    _, blob = bb_stream
    for cut in (0, 3, 20, len(blob) // 2, len(blob) - 13, len(blob) - 1):
        with pytest.raises(BitstreamError):
            decompress_lossless(m, blob[:cut])
    for pos in (10, 60, len(blob) // 3, len(blob) - 30):
        bad = bytearray(blob)
        bad[pos] ^= 0x10
        with pytest.raises(BitstreamError):
            decompress_lossless(m, bytes(bad))
    with pytest.raises(BitstreamError):
        decompress_lossless(m, "not bytes")


def _frames(blob: bytes) -> tuple[container.Header, list[tuple[int, bytes]]]:
    with container.ContainerReader(blob) as r:
        return r.header, list(r)


def test_damage_behind_a_valid_crc_is_caught_by_the_chain(bb_model, mnist_test):
    """A payload altered and re-framed with a correct CRC (or a wrong record count) never decodes to wrong
    records: the chain does not return to its seed."""
    m = bb_model[0]
    x = mnist_test[500:530]
    header, [(n, payload)] = _frames(compress_lossless(m, x))
    for pos in (40, len(payload) // 2, len(payload) - 5):
        bad = bytearray(payload)
        bad[pos] ^= 0x01
        with pytest.raises(BitstreamError, match="initial state|corrupt"):
            decompress_lossless(m, container.pack(header, [(n, bytes(bad))]))
    with pytest.raises(BitstreamError):
        decompress_lossless(m, container.pack(header, [(n - 1, payload)]))
    with pytest.raises(BitstreamError, match="format"):
        decompress_lossless(m, container.pack(header, [(n, payload[:4] + b"\x09" + payload[5:])]))
    assert payload[4] == FORMAT == 2
    with pytest.raises(BitstreamError, match="format 1 .*older vaestream"):   # a stream of the old coder
        decompress_lossless(m, container.pack(header, [(n, payload[:4] + b"\x01" + payload[5:])]))


def test_stream_of_another_model_is_refused(bb_model, bern_model, bb_stream, mnist_test):
    _, blob = bb_stream
    with pytest.raises(ModelMismatchError):
        decompress_lossless(bern_model[0], blob)
    # a lossy container of this model (other table hash) is not a lossless stream
    header, frames = _frames(blob)
    import dataclasses

    lossy = dataclasses.replace(header, table_hash=b"\x01" * 16, quality=1.0)
    with pytest.raises(BitstreamError, match="not a lossless stream"):
        decompress_lossless(bb_model[0], container.pack(lossy, frames))


def test_bad_records_and_models_raise(bb_model, bern_model, mnist_test):
    from vaestream import VAE, ModelConfig

    m = bb_model[0]
    with pytest.raises(ConfigError, match="discrete likelihood"):
        LosslessCoder(VAE(ModelConfig(latent_dim=4, hidden=(8,), likelihood="gaussian_sigmoid")))
    with pytest.raises(DataError, match="record 1 has non-integer"):
        compress_lossless(m, np.stack([np.zeros(784), np.full(784, 0.5)]))
    with pytest.raises(DataError, match="record 0 has values outside"):
        compress_lossless(m, np.full((1, 784), 256, np.int16))
    with pytest.raises(DataError, match="shape"):
        compress_lossless(m, np.zeros((2, 783), np.uint8))
    with pytest.raises(DataError, match="record 0 has values outside binary"):
        compress_lossless(bern_model[0], mnist_test[:1])
    # records are checked (and converted) a frame at a time: the index named is the input's, not the frame's
    x = np.array(mnist_test[:7], np.int16)
    x[5, 3] = -1
    with pytest.raises(DataError, match="record 5 has values outside"):
        LosslessCoder(m, frame_records=2).compress(x)
    xf = mnist_test[:7].astype(np.float64)
    xf[6, 0] = np.nan
    with pytest.raises(DataError, match="record 6 has non-integer"):
        LosslessCoder(m, frame_records=4).compress(xf)
    with pytest.raises(DataError, match="dtype"):
        compress_lossless(m, np.zeros((1, 784), np.complex64))
    with pytest.raises(ConfigError):
        LosslessCoder(m, latent_bits=20)


# -- tables -------------------------------------------------------------------------------------------------
def test_beta_binomial_pmfs_match_scipy():
    from scipy.stats import betabinom

    la, lb = np.log([0.3, 5.0, 40.0, 1e-6]), np.log([0.7, 2.0, 1e4, 3.0])
    p = beta_binomial_probs(la, lb)
    assert p.shape == (4, 256) and np.all(p >= 0) and np.allclose(p.max(1), 1.0)
    p /= p.sum(1, keepdims=True)
    k = np.arange(256)
    ref = np.stack([betabinom.pmf(k, 255, np.exp(a), np.exp(b)) for a, b in zip(la, lb)])
    np.testing.assert_allclose(p, ref, rtol=1e-8, atol=1e-300)
    assert np.all(np.isfinite(beta_binomial_probs(np.array([1e9, -1e9]), np.array([-1e9, 1e9]))))


def test_beta_binomial_grid_matches_scipy_and_the_latent_prior_is_scrambled():
    """The grid's bin x within-bin tables reproduce scipy's BetaBinomial(255, a, b) at grid points; the latent
    prior is N(0, 1) over the buckets, listed in a scrambled order that is a bijection."""
    from scipy.stats import betabinom, norm

    from vaestream.coding.bitsback import tables as L

    bins, within = beta_binomial_grid()
    nu, nv = L.grid_shape()
    assert (nu, nv) == (1025, 129) and bins.shape == (nu * nv, 16) and within.shape == (nu * nv * 16, 16)
    u, v = L.grid_axis(L.GRID_U), L.grid_axis(L.GRID_V)
    k = np.arange(256)
    for iu, iv in ((0, 0), (200, 20), (512, 64), (600, 128), (1024, 128), (540, 40)):
        c = iu * nv + iv
        w = within[c * 16:(c + 1) * 16].astype(np.float64)
        p = (bins[c].astype(np.float64)[:, None] * w / w.sum(1, keepdims=True)).reshape(-1)
        a, b = np.exp(v[iv]) / (1 + np.exp(-u[iu])), np.exp(v[iv]) / (1 + np.exp(u[iu]))
        np.testing.assert_allclose(p, betabinom.pmf(k, 255, a, b), atol=5e-5)
    # the nearest cell of (log alpha, log beta): u = la - lb, v = logaddexp(la, lb), clipped to the grid
    la, lb = np.array([-99.0, 0.3, 50.0]), np.array([0.0, 0.3 - 3 / 32 - 1e-3, -50.0])
    c = L.grid_cells(la, lb)
    assert list(c // nv) == [0, 512 + 3, nu - 1]
    assert list(c % nv)[1] == int(round((np.logaddexp(la[1], lb[1]) - L.GRID_V[0]) * 8))
    a, a_inv = latent_scramble(12)
    assert (a * a_inv) % 4096 == 1 and abs(a / 4096 - 0.618) < 0.001
    p = latent_prior(12)
    j = ((np.arange(4096) * a_inv) % 4096) - 2048
    np.testing.assert_allclose(p, norm.cdf((j + 0.5) / 256) - norm.cdf((j - 0.5) / 256), atol=1e-15)


def test_group_sizes_ramp_up_and_cover():
    assert group_sizes(0, 32) == []
    assert group_sizes(1, 32) == [1]
    assert group_sizes(100, 32) == [1, 2, 4, 8, 16, 32, 32, 5]
    assert sum(group_sizes(12345, 7)) == 12345 and max(group_sizes(12345, 7)) == 7
    # a slower ramp (a context frame's, bitsback_coder.chain_ramp): +1 while s < 2^r, then a factor of ~1 + 2^-r
    assert group_sizes(100, 32, 2) == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 18, 9]
    assert group_sizes(100, 32, 0) == group_sizes(100, 32)
    assert sum(group_sizes(4096, 256, 4)) == 4096 and max(group_sizes(4096, 256, 4)) <= 256


def test_codec_and_cli_compress_lossless_round_trip_exactly(bb_model, mnist_train, mnist_test, tmp_path, capsys):
    """The public doors: the model directory's bits-back coder (``vaestream.coding.bitsback_coder``), read back by
    ``vaestream.coding.open_stream``, and ``vaestream compress --lossless``; the lossy codec refuses the stream."""
    import json

    from vaestream.coding import bitsback_coder, codec as vcodec, open_stream

    model, model_dir = bb_model
    c = vcodec.load(model_dir, calibration=mnist_train[:2000])
    x = mnist_test[:100]
    blob = bitsback_coder(model_dir).compress(x)
    out = open_stream(blob, model_dir).decompress(blob)
    assert out.dtype == np.uint8 and np.array_equal(out, x)
    with pytest.raises(BitstreamError, match="open_stream"):
        c.decompress(blob)

    np.save(tmp_path / "x.npy", x)
    from vaestream.cli import main

    assert main(["compress", str(tmp_path / "x.npy"), str(tmp_path / "x.vaez"), "--model", str(model_dir),
                 "--lossless"]) == 0  # the CLI's main here; a fresh process decodes
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bits_per_dim"] < 3.0
    run = [sys.executable, "-m", "vaestream.cli"]
    done = subprocess.run(run + ["decompress", str(tmp_path / "x.vaez"), str(tmp_path / "y.npy"), "--model",
                                 str(model_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "y.npy"), x)


def test_the_beam_encode_job_codes_records_losslessly_and_the_decode_job_returns_them_exactly(
        bb_model, mnist_test, tmp_path):
    """``pipelines/encode.py --coder lossless``: one bits-back container per batch of records (the vectorised
    coder); ``pipelines/decode.py --output_dtype uint8`` gives every record back bit for bit, and float32 gives
    counts / 255 (the model's inputs). Records that are not whole counts go to the dead-letter output with
    the reason, and the counts add up. A lossy model directory's streams and a SavedModel are refused."""
    import json

    import pyarrow.parquet as pq

    from vaestream import beam as vb
    from vaestream.beam.jobs import decode, encode

    model, model_dir = bb_model
    x = mnist_test[2000:2300]
    np.save(tmp_path / "counts.npy", x)
    # float model inputs counts / 255 are counts too (float32 rounding and all); 2 of these 7 are not: half
    # counts, within the support [0, 1] (a value outside it is refused for that reason first)
    inputs = x[:7].astype(np.float32) * np.float32(1 / 255)
    inputs[5:7] += np.where(x[5:7] < 255, np.float32(0.5 / 255), np.float32(0))
    np.save(tmp_path / "halves.npy", inputs)
    out = tmp_path / "codes"
    s = encode.run(["--input", f"{tmp_path}/counts.npy,{tmp_path}/halves.npy", "--model", str(model_dir),
                    "--output", str(out), "--coder", "lossless", "--chunk_size", "128"])
    assert s["coder"] == "lossless"
    assert s["records"] == 300 + 5 and s["dead_lettered"] == 2 and s["records_in"] == 307
    dead = [json.loads(line) for line in (out / "dead_letter.jsonl").read_text().splitlines()]
    assert sorted(d["key"] for d in dead) == ["halves.npy:000000005", "halves.npy:000000006"]
    assert all("whole numbers" in d["reason"] for d in dead)
    coded = [item for f in sorted(out.glob("codes-*.tfrecord")) for item in vb.read_codes(str(f))]
    assert all(item.coded and item.mean is None for item in coded)
    assert sum(len(item) for item in coded) == 305
    # the rate is that of the vectorised coder: well under lzma's ~1.38 bits/dim on these 300 MNIST digits
    bits = 8 * sum(len(item.container) for item in coded if item.source.endswith("counts.npy"))
    assert bits / (300 * 784) < 1.6
    for dtype in ("uint8", "float32"):
        rec = tmp_path / f"rec-{dtype}"
        d = decode.run(["--input", str(out), "--model", str(model_dir), "--output", str(rec),
                        "--output_dtype", dtype, "--output_format", "parquet"])
        assert d["records"] == 305 and d["dead_lettered"] == 0
        back = {}
        for f in rec.glob("recon-*.parquet"):
            t = pq.read_table(f).to_pydict()
            back.update(zip(t["key"], t["data"]))
        want = {f"counts.npy:{i:09d}": x[i] for i in range(300)}
        want.update({f"halves.npy:{i:09d}": x[i] for i in range(5)})
        assert sorted(back) == sorted(want)
        for k, v in want.items():
            got = np.asarray(back[k]).reshape(v.shape)
            if dtype == "uint8":
                assert np.array_equal(got, v), k
            else:
                np.testing.assert_array_equal(got, v.astype(np.float32) * np.float32(1 / 255))
    with pytest.raises(ConfigError, match="model directory"):
        encode.run(["--input", f"{tmp_path}/counts.npy", "--saved_model", str(tmp_path / "export"),
                    "--output", str(tmp_path / "x"), "--coder", "lossless"])
