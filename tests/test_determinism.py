"""Decoding is a pure function of the bitstream: the same bytes give the same float32 pixels, bit for bit,
however the records are batched, framed, read or served, and in another process with another thread count.

The mechanism (vaestream.layers.blocked): the networks run on blocks of a fixed number of rows, so a record
always goes through a GEMM of the same shape, whatever else is in its batch. (Encoding is batch-invariant
too; its outputs may differ with the thread count, which the codes then record: decoding never does.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import tensorflow as tf

from vaestream.coding import codec
from vaestream.serving import export
from vaestream.coding.tables import dequantize
from vaestream.layers import BLOCK_ROWS, blocked


@pytest.fixture(scope="module", params=["mlp", "conv", "spatial"])
def coded_dir(request):
    """The session's coded MLP model, a convolutional one (vaestream.conv) and a convolutional one with a
    spatial latent: every test runs on all three."""
    return request.getfixturevalue(_KINDS[request.param])


_KINDS = {"mlp": "coded_model_dir", "conv": "coded_conv_model_dir", "spatial": "coded_spatial_model_dir"}


@pytest.fixture(scope="module")
def built() -> dict:
    """Each model directory's stream and export, made once in this module and shared by the per-kind tests and
    the fresh-process test that decodes every kind."""
    return {}


def _stream_of(built: dict, coded_dir, mnist_test):
    key = ("stream", str(coded_dir))
    if key not in built:
        cdc = codec.load(coded_dir)
        blob = cdc.compress(mnist_test[:1000])
        built[key] = (cdc, blob, cdc.decompress(blob))
    return built[key]


def _export_of(built: dict, coded_dir, tmp_path_factory):
    key = ("export", str(coded_dir))
    if key not in built:
        built[key] = export.export(coded_dir, tmp_path_factory.mktemp("exports"), quality=1.0)
    return built[key]


@pytest.fixture(scope="module")
def stream(coded_dir, mnist_test, built):
    """A 1,000-record stream of real MNIST test images and its reference reconstruction (one batch)."""
    return _stream_of(built, coded_dir, mnist_test)


@pytest.fixture(scope="module")
def exported(coded_dir, tmp_path_factory, built):
    """A SavedModel export of the model (quality 1)."""
    return _export_of(built, coded_dir, tmp_path_factory)


def _batched(fn, a: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([fn(a[s:s + size]) for s in range(0, len(a), size)])


def test_the_blocked_decoder_does_not_depend_on_the_batch_where_a_plain_gemm_may(stream):
    """The failure this guards against, on the real decoder: a plain GEMM's float32 output for a record may
    change with the batch length (it did on the AVX-512 machine this was found on: 480-1,351 of 64 x 784
    values; on an AMX machine fewer shapes differ), so that is reported, not asserted: it is a fact about the
    BLAS kernels, not about vaestream. Run in fixed blocks the output never depends on it, on any machine."""
    cdc, blob, _ = stream
    model = cdc._backend.model
    z = tf.constant(np.random.default_rng(0).normal(size=(4096, model.config.latent_dim)).astype(np.float32))
    plain = tf.function(lambda t: model.decoder_params(t)["x_mean"])
    exact = tf.function(lambda t: model.decoder_params_exact(t)["x_mean"])
    full = plain(z[:64]).numpy()
    changed = [b for b in (1, 2, 7, 8, 32, 63) if np.any(plain(z[:b]).numpy() != full[:b])]
    changed += [4096] * bool(np.any(plain(z).numpy()[:64] != full))
    if not changed:
        warnings.warn("the plain decoder gave the same bits at every batch length tried on this machine")
    ref = exact(z).numpy()
    for b in (1, 2, 7, 8, 32, 63, 64, BLOCK_ROWS + 1, 1000):
        assert exact(z[:b]).numpy().tobytes() == ref[:b].tobytes(), f"batch length {b}"
    assert exact(z[1000:2000]).numpy().tobytes() == ref[1000:2000].tobytes()


def test_decoded_bytes_are_identical_for_batch_sizes_1_7_64_and_1000(stream):
    cdc, blob, ref = stream
    codes, _ = cdc.decompress_codes(blob)
    for size in (7, 64, 1000):
        assert _batched(cdc.decode, codes, size).tobytes() == ref.tobytes(), f"batch size {size}"
    n = 3 * 64 + 5  # one record at a time: across three blocks' worth of records
    assert _batched(cdc.decode, codes[:n], 1).tobytes() == ref[:n].tobytes(), "batch size 1"
    one = cdc.decompress(cdc.compress_codes(codes[417], single=True))
    assert one.tobytes() == ref[417].tobytes()


def test_a_record_decodes_the_same_at_every_position_of_its_block(stream):
    cdc, blob, ref = stream
    codes, _ = cdc.decompress_codes(blob)
    for shift in range(BLOCK_ROWS):
        out = np.roll(cdc.decode(np.roll(codes[:BLOCK_ROWS], shift, axis=0)), -shift, axis=0)
        assert out.tobytes() == ref[:BLOCK_ROWS].tobytes(), f"shift {shift}"


def test_codes_are_identical_for_any_batching_of_the_records(stream, mnist_test):
    cdc, blob, _ = stream
    codes, _ = cdc.decompress_codes(blob)
    x = mnist_test[:1000]
    for size in (7, 64, 333):
        np.testing.assert_array_equal(_batched(cdc.encode, x, size), codes)
    n = 3 * 64 + 5  # one record at a time: across three blocks' worth of records
    np.testing.assert_array_equal(_batched(cdc.encode, x[:n], 1), codes[:n])


def test_random_access_and_frame_by_frame_reads_decode_the_same_bytes(stream, coded_dir, mnist_test, tmp_path):
    cdc, _, ref = stream
    framed = codec.load(coded_dir, frame_records=100)
    path = tmp_path / "c.vz"
    framed.write(path, mnist_test[:600])
    framed.write(path, mnist_test[600:1000], append=True)
    idx = [0, 1, 99, 100, 101, 517, 998, 999]
    assert framed.read(path, idx).tobytes() == ref[idx].tobytes()
    for i in (5, 640):
        assert framed.read(path, i).tobytes() == ref[i].tobytes()
    with open(path, "rb") as f:
        assert np.concatenate(list(framed.iter_decompress(f))).tobytes() == ref.tobytes()


def test_the_savedmodel_decode_and_reconstruct_signatures_give_the_same_bytes(stream, exported, mnist_test):
    cdc, blob, ref = stream
    path = exported
    em = export.load_export(path)
    codes, _ = cdc.decompress_codes(blob)
    z_hat = dequantize(codes, cdc.tables)
    for size in (1, 7, 1000):  # the request's batch: the signature blocks inside
        assert _batched(lambda z: em.decode(z)["x_mean"], z_hat, size).tobytes() == ref.tobytes()
    x = mnist_test[:1000].reshape(1000, -1).astype(np.float32) * np.float32(1 / 255)
    assert _batched(em.reconstruct, x, 64).tobytes() == ref.tobytes()
    served = codec.load(path)  # the codec backed by the export alone
    assert served.decompress(blob).tobytes() == ref.tobytes()


@pytest.mark.parametrize("threads", [1, 8])
def test_a_fresh_process_with_another_thread_count_decodes_the_same_bytes(request, built, mnist_test,
                                                                          tmp_path_factory, tmp_path, threads):
    """compress (here) -> decompress and SavedModel decode in a fresh process with another thread count: one
    process per thread count decodes every model kind (MLP, convolutional, spatial latent)."""
    jobs = []
    for kind, fixture in _KINDS.items():
        coded_dir = request.getfixturevalue(fixture)
        _, blob, ref = _stream_of(built, coded_dir, mnist_test)
        path = _export_of(built, coded_dir, tmp_path_factory)
        (tmp_path / f"{kind}.blob").write_bytes(blob)
        jobs.append((kind, str(coded_dir), str(path), ref))
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads({threads})
        tf.config.threading.set_inter_op_parallelism_threads({threads})
        from vaestream.coding import codec
        for kind, coded_dir, exported in {[(k, d, e) for k, d, e, _ in jobs]!r}:
            c = codec.load(coded_dir)
            blob = open({str(tmp_path)!r} + f"/{{kind}}.blob", 'rb').read()
            codes, _ = c.decompress_codes(blob)
            parts = [c.decode(codes[s:s + 13]) for s in range(0, len(codes), 13)]
            np.save({str(tmp_path)!r} + f"/{{kind}}-a.npy", c.decompress(blob))
            np.save({str(tmp_path)!r} + f"/{{kind}}-b.npy", np.concatenate(parts))
            np.save({str(tmp_path)!r} + f"/{{kind}}-c.npy", codec.load(exported).decompress(blob))
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    for kind, _, _, ref in jobs:
        for name in ("a", "b", "c"):
            assert np.load(tmp_path / f"{kind}-{name}.npy").tobytes() == ref.tobytes(), (kind, name)


def test_blocked_keeps_structure_rows_and_dtype():
    f = lambda t: {"twice": 2.0 * t, "sum": tf.reduce_sum(t, axis=1)}
    for n in (0, 1, BLOCK_ROWS, BLOCK_ROWS + 3):
        t = tf.reshape(tf.range(n * 3, dtype=tf.float32), [n, 3])
        out = blocked(f, t)
        np.testing.assert_array_equal(out["twice"].numpy(), 2.0 * t.numpy())
        np.testing.assert_array_equal(out["sum"].numpy(), t.numpy().sum(axis=1))
        assert out["sum"].shape == (n,)


def test_stacked_blocks_give_each_block_its_own_rows_and_keep_the_structure():
    f = lambda t: {"twice": 2.0 * t, "sum": tf.reduce_sum(t, axis=-1)}  # t: [nblocks, BLOCK_ROWS, 3]
    for n in (0, 1, BLOCK_ROWS, 3 * BLOCK_ROWS + 5):
        t = tf.reshape(tf.range(n * 3, dtype=tf.float32), [n, 3])
        out = blocked(f, t, stacked=True)
        np.testing.assert_array_equal(out["twice"].numpy(), 2.0 * t.numpy())
        np.testing.assert_array_equal(out["sum"].numpy(), t.numpy().sum(axis=1))
        assert out["sum"].shape == (n,)
