"""The exact convolution's fast path (patch rows scaled from separable patch maxima, chunks by bytes, whole
networks per group of records, one BLAS thread) gives bit for bit what the plain im2col definition gives, for
every chunking, record grouping and BLAS thread setting."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from vaestream.conv import Conv  # noqa: E402
from vaestream.coding import exact_conv as exact  # noqa: E402


def _plain(conv: exact.ExactConv, t: np.ndarray) -> np.ndarray:
    """The definition: concatenated im2col rows, each row scaled by 2^r from its own max |value|, rint, product."""
    n, h, w, c = t.shape
    k, st = conv.k, conv.stride
    (ho, top, bottom), (wo, left, right) = exact.same_padding(h, k, st), exact.same_padding(w, k, st)
    pad = np.zeros((n, h + top + bottom, w + left + right, c), np.float64)
    pad[:, top:top + h, left:left + w] = t
    rows = np.concatenate([pad[:, i:i + st * (ho - 1) + 1:st, j:j + st * (wo - 1) + 1:st]
                           for i in range(k) for j in range(k)], axis=-1).reshape(-1, k * k * c)
    _, e = np.frexp(np.max(np.abs(rows), axis=1, keepdims=True))
    r = np.minimum(conv.bits - e, 960)
    rows = np.rint(rows * np.ldexp(1.0, r))
    y = (rows @ conv.wq) * np.ldexp(1.0, -(r + conv.s)) + conv.b
    return y.reshape(n, ho, wo, conv.c_out)


def _inputs(rng: np.random.Generator, n: int, h: int, w: int, c: int) -> np.ndarray:
    t = rng.normal(size=(n, h, w, c)) * np.exp(rng.normal(size=(n, 1, 1, 1)) * 3)
    t[0] = 0.0  # a record of zeros (r from frexp(0))
    t[1, : h // 2] = 0.0  # patches wholly in zeros beside others
    t[2] *= 1e-310  # subnormal rows (r bounded at 960)
    t[3] = np.maximum(t[3], 0.0)  # ReLU-like
    return t


@pytest.mark.parametrize("k,c_in,c_out,stride,h,w", [(5, 1, 16, 2, 28, 28), (5, 16, 32, 2, 14, 13),
                                                     (3, 32, 64, 1, 7, 7), (3, 8, 32, 1, 2, 3), (5, 3, 8, 2, 5, 9)])
def test_exact_conv_matches_plain_im2col_for_any_chunking(k, c_in, c_out, stride, h, w, monkeypatch):
    rng = np.random.default_rng(k * 100 + c_in)
    layer = Conv(k, c_in, c_out, stride, rng, "conv")
    layer.b.assign(rng.normal(size=c_out).astype(np.float32))
    conv = exact.ExactConv(layer)
    t = _inputs(rng, 37, h, w, c_in)
    want = _plain(conv, t)
    assert np.isfinite(want).all() and np.any(want != want[0])
    for chunk_bytes, threads in [(exact.CHUNK_BYTES, exact.BLAS_THREADS), (1, None), (8 * k * k * c_in * 5, 2),
                                 (1 << 30, 1)]:
        monkeypatch.setattr(exact, "CHUNK_BYTES", chunk_bytes)
        monkeypatch.setattr(exact, "BLAS_THREADS", threads)
        got = conv(t)
        assert got.dtype == np.float64 and got.shape == want.shape
        assert got.tobytes() == want.tobytes(), (chunk_bytes, threads)
        assert conv(t[5:6]).tobytes() == want[5:6].tobytes()  # a record alone: the same bits


def test_blas_threads_restored():
    blas = exact._openblas()
    if blas is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS found in this process")
    before = int(blas[0]())
    with exact._BlasThreads(1):
        assert int(blas[0]()) == 1
    assert int(blas[0]()) == before


def test_by_records_joins_groups(monkeypatch):
    monkeypatch.setattr(exact, "RECORDS_PER_PASS", 3)
    x = np.arange(20.0).reshape(10, 2)
    assert np.array_equal(exact._by_records(lambda a: a * 2, 10, x), x * 2)
    a, b = exact._by_records(lambda a: (a + 1, a[:, :1]), 10, x)
    assert np.array_equal(a, x + 1) and np.array_equal(b, x[:, :1])
