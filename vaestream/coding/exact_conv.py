"""Both coding sides of a learned entropy model in exact float64 NumPy: the analysis and hyper-analysis (the
symbols), the hyper-synthesis (which picks each position's Gaussian table and gives its mean) and the synthesis,
bit-identical in every process, batch, thread count and CPU instruction set.

Every convolution is a patch copy (im2col, exact) and one matrix product whose operands are rounded to integers
first, as :class:`vaestream.coding.bitsback.exact_mlp.ExactMLP` does for dense layers: the weights once per layer
to ``rint(W 2^s)`` of b bits, each patch row to ``rint(h 2^r)`` (r from the row's largest value), with b chosen
so that K 2^(2b) < 2^53 for the K = k k C_in inputs of a row; every partial sum of the product is then an integer
float64 holds exactly, so BLAS's summation order, blocking and threads do not matter, and ``ldexp(., -(r + s))``
(exact) + bias (one correctly rounded addition) gives the same float64 everywhere. The only other operations are
ReLU (a comparison), ``depth_to_space`` and crops (copies), products by the stored gains and ``rint`` (correctly
rounded): no transcendental function, whose SIMD implementations differ across CPUs. That is why these models use
ReLU and a linear decoder mean (``ModelConfig`` checks it). A row's result depends only on its own patch, so a
record's output never depends on its batch.

Speed without changing a bit: a row's max |value| is taken separably over the padded picture (channels, then kx,
then ky; max is exact in any order), the rows are copied and scaled by their power of two (the same correctly
rounded product per element as before), then one in-place ``rint``; chunks are sized in bytes (``CHUNK_BYTES``)
and whole networks run ``RECORDS_PER_PASS`` records at a time (rows are independent); OpenBLAS runs
``BLAS_THREADS`` threads (the integer products are exact in any summation order or blocking); ReLU works in place
on intermediates.
"""

from __future__ import annotations

import numpy as np

from vaestream.coding.bitsback.exact_mlp import quantize_weights
from vaestream.conv import STRIDE
from vaestream.entropy_models.densities import SCALE_LEVELS
from vaestream.entropy_models.hyperprior import hyper_grid


CHUNK_BYTES = 4 << 20
"""Bytes of patch rows (float64 ``[rows, k k C_in]``) per chunk of a convolution, so that they stay in cache
between the scaling, ``rint`` and the product (a speed setting only: each row's result is its own)."""

BLAS_THREADS = 1
"""OpenBLAS threads while an exact convolution runs (restored after; ``None`` leaves BLAS alone). A speed setting
only, since the products are exact in any summation order: on a small shared machine one thread is faster (the
chunks are small and a busy second core makes OpenBLAS's threads wait for each other)."""


def _openblas():
    """(get, set) of the OpenBLAS that NumPy loaded (its thread count), or None where it cannot be found."""
    global _BLAS
    if _BLAS is None:
        _BLAS = ()
        try:
            import ctypes
            with open("/proc/self/maps") as f:
                paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
            for path in paths:
                lib = ctypes.CDLL(path)
                for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"), ("openblas", "")):
                    get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                    put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                    if get is not None and put is not None:
                        _BLAS = (get, put)
                        return _BLAS
        except (OSError, IndexError):
            pass
    return _BLAS or None


_BLAS = None


class _BlasThreads:
    """``with _BlasThreads(n):`` OpenBLAS runs ``n`` threads inside (nothing where ``n`` is None or no OpenBLAS)."""

    def __init__(self, n: int | None):
        self.n, self.before, self.blas = n, None, _openblas() if n else None

    def __enter__(self):
        if self.blas:
            self.before = int(self.blas[0]())
            if self.before != self.n:
                self.blas[1](int(self.n))
        return self

    def __exit__(self, *exc):
        if self.blas and self.before is not None and self.before != self.n:
            self.blas[1](self.before)


def same_padding(size: int, k: int, stride: int) -> tuple[int, int, int]:
    """TF's SAME padding: (output size ceil(size / stride), padding before, padding after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return out, total // 2, total - total // 2


class ExactConv:
    """A k x k convolution of stride 1 or 2, TF's SAME padding, on float64 ``[N, H, W, C_in]`` with exact
    products."""

    def __init__(self, conv):
        w = conv.w.numpy().astype(np.float64)
        self.k, c_in, self.c_out = int(w.shape[0]), int(w.shape[2]), int(w.shape[3])
        self.stride = int(conv.stride)
        self.wq, self.s, self.bits = quantize_weights(w.reshape(self.k * self.k * c_in, self.c_out))
        self.b = conv.b.numpy().astype(np.float64)

    def __call__(self, t: np.ndarray) -> np.ndarray:
        n, h, w, _ = t.shape
        ho, wo = same_padding(h, self.k, self.stride)[0], same_padding(w, self.k, self.stride)[0]
        step = max(1, CHUNK_BYTES // (8 * ho * wo * self.wq.shape[0]))  # records per chunk
        out = np.empty((n, ho, wo, self.c_out), np.float64)
        with _BlasThreads(BLAS_THREADS):
            for s in range(0, n, step):
                out[s:s + step] = self._rows(t[s:s + step])
        return out

    def _patch_max(self, pad: np.ndarray, ho: int, wo: int) -> np.ndarray:
        """``[n, ho, wo]``: each patch's largest |value| (the max over its k x k padded pixels of their max over
        channels). Max is exact in any order, so it is computed separably: channels, then kx, then ky."""
        k, st = self.k, self.stride
        a = np.abs(pad)
        pixel = a[..., 0].copy()
        for ch in range(1, a.shape[-1]):
            np.maximum(pixel, a[..., ch], out=pixel)
        across = pixel[:, :, 0:st * (wo - 1) + 1:st].copy()  # [n, Hp, wo]: max over kx
        for j in range(1, k):
            np.maximum(across, pixel[:, :, j:j + st * (wo - 1) + 1:st], out=across)
        out = across[:, 0:st * (ho - 1) + 1:st].copy()  # [n, ho, wo]: then over ky
        for i in range(1, k):
            np.maximum(out, across[:, i:i + st * (ho - 1) + 1:st], out=out)
        return out

    def _rows(self, t: np.ndarray) -> np.ndarray:
        """One chunk: ``[n, H, W, C_in]`` -> ``[n, ho, wo, C_out]``.

        Each patch row is built already scaled: its exponent ``r`` comes from the patch's largest |value|, which is
        the max over the k x k taps of each padded pixel's max |value| over channels (max is exact in any order,
        so this is the same number as the max over the row), and each tap's pixels are written into the row as
        ``pixel * 2^r`` (the same correctly rounded product as scaling the copied row), then one in-place ``rint``.
        The rows hold exactly the integers ``rint(h 2^r)`` of the plain im2col, so the product, ``ldexp`` and bias
        give the same bits; only the number of passes over the rows differs (one write, one ``rint``, one read)."""
        n, h, w, c = t.shape
        k, st = self.k, self.stride
        (ho, top, bottom), (wo, left, right) = same_padding(h, k, st), same_padding(w, k, st)
        pad = np.zeros((n, h + top + bottom, w + left + right, c), np.float64)
        pad[:, top:top + h, left:left + w] = t
        taps = [(i, j) for i in range(k) for j in range(k)]  # (ky, kx): the filter [k, k, C_in, C_out]'s order

        def tap(a: np.ndarray, i: int, j: int) -> np.ndarray:
            return a[:, i:i + st * (ho - 1) + 1:st, j:j + st * (wo - 1) + 1:st]

        _, e = np.frexp(self._patch_max(pad, ho, wo))
        r = np.minimum(self.bits - e, 960)  # (bounded: 2^r stays finite for subnormal rows)
        scale = np.ldexp(1.0, r)[..., None]  # [n, ho, wo, 1], a power of two: the products are exact
        if c == 1:  # one channel: the taps write single elements, so scale them on the way
            rows = np.empty((n, ho, wo, k * k), np.float64)
            for m, (i, j) in enumerate(taps):
                np.multiply(tap(pad[..., 0], i, j), scale[..., 0], out=rows[..., m])
        else:  # contiguous copies of C_in values, then one scaling pass
            rows = np.concatenate([tap(pad, i, j) for i, j in taps], axis=-1)
            rows *= scale
        rows = rows.reshape(-1, k * k * c)
        np.rint(rows, out=rows)
        y = rows @ self.wq
        y *= np.ldexp(1.0, -(r + self.s)).reshape(-1, 1)
        y += self.b
        return y.reshape(n, ho, wo, self.c_out)


def relu(t: np.ndarray) -> np.ndarray:
    return np.maximum(t, 0.0)


def _relu_(t: np.ndarray) -> np.ndarray:
    """ReLU in place (``t`` is an intermediate the caller owns): the same comparison, one pass less."""
    return np.maximum(t, 0.0, out=t)


RECORDS_PER_PASS = 256
"""Records that go through a whole network together (a speed setting only: every record's result is its own, see
the module docstring), so that each layer's output is still in cache when the next layer reads it."""


def _by_records(fn, n: int, *arrays: np.ndarray):
    """``fn(*arrays)`` evaluated RECORDS_PER_PASS records at a time along axis 0 and joined (a tuple result joins
    element by element); one BLAS thread setting for all of it."""
    with _BlasThreads(BLAS_THREADS):
        if n <= RECORDS_PER_PASS:
            return fn(*arrays)
        parts = [fn(*(a[s:s + RECORDS_PER_PASS] for a in arrays)) for s in range(0, n, RECORDS_PER_PASS)]
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate(p) for p in zip(*parts))
    return np.concatenate(parts)


def depth_to_space(t: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """TF's ``depth_to_space(t, 2)`` (NHWC: out[n, 2h + a, 2w + b, c] = t[n, h, w, (2a + b) C + c]), cropped."""
    n, h, w, c4 = t.shape
    c = c4 // (STRIDE * STRIDE)
    out = t.reshape(n, h, w, STRIDE, STRIDE, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h * STRIDE, w * STRIDE, c)
    return out[:, :crop[0], :crop[1]]


class ExactHyperSynthesis:
    """z_hat ``[N, h'', w'', C]`` (integers) -> (mu float64, table index int64), each ``[N, h, w, C]``: the
    model's hyper-synthesis (:meth:`EntropyModel.hyper_synthesis`), the index ``clip(rint(u), 0, 63)``."""

    def __init__(self, entropy):
        self.convs = [ExactConv(c) for c in entropy.hs]

    def __call__(self, z_hat: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        z_hat = np.asarray(z_hat)
        return _by_records(lambda z: self._pass(z, grid), len(z_hat), z_hat)

    def _pass(self, z_hat: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        (h1, w1), _ = hyper_grid(*grid)
        t = _relu_(depth_to_space(self.convs[0](np.asarray(z_hat, np.float64)), (h1, w1)))
        t = _relu_(depth_to_space(self.convs[1](t), grid))
        out = self.convs[2](t)
        c = out.shape[-1] // 2
        idx = np.clip(np.rint(out[..., c:]), 0, SCALE_LEVELS - 1).astype(np.int64)
        return out[..., :c], idx


class ExactAnalysis:
    """Pictures ``[N, H, W, c]`` (float64) -> (the latent y ``[N, h, w, C]``, and with ``entropy`` the hyper-latent
    symbols ``rint(h_a(y g))``) in exact float64: the encoder's stride-2 convolutions, ReLU, its head's mean maps
    (:func:`vaestream.entropy_models.hyperprior.analysis`) and the hyper-analysis. Encoding with it makes a
    record's symbols as machine-independent as its decoding."""

    def __init__(self, model):
        enc = model.encoder
        self.convs = [ExactConv(c) for c in enc.convs]
        self.head = ExactConv(enc.head)
        self.ha = [ExactConv(c) for c in model.entropy.ha]

    def latent(self, images: np.ndarray) -> np.ndarray:
        """The latent y ``[N, h, w, C]`` float64 of ``images`` ``[N, H, W, c]``."""
        images = np.asarray(images)
        return _by_records(self._latent, len(images), images)

    def _latent(self, images: np.ndarray) -> np.ndarray:
        t = np.asarray(images, np.float64)
        for conv in self.convs:
            t = _relu_(conv(t))
        out = self.head(t)
        return out[..., :out.shape[-1] // 2]

    def hyper_latent(self, y: np.ndarray) -> np.ndarray:
        """rint(h_a(y)) int64 ``[N, h'', w'', C]`` of the gained latent ``y``."""
        y = np.asarray(y)
        return _by_records(self._hyper_latent, len(y), y)

    def _hyper_latent(self, y: np.ndarray) -> np.ndarray:
        t = _relu_(self.ha[0](y))
        t = _relu_(self.ha[1](t))
        return np.rint(self.ha[2](t)).astype(np.int64)


class ExactSynthesis:
    """Latent maps y_hat ``[N, h, w, C]`` (float64, before the inverse gains ``inverse_gain`` [L, C]) -> the
    decoder mean ``[N, H, W, c]`` (float64) of the model's conv decoder (ReLU, linear mean) for pictures of ``shape``
    (H, W) (each sub-pixel step doubles and crops to the encoder's size at that step)."""

    def __init__(self, model, inverse_gain: np.ndarray):
        dec = model.decoder
        self.head = ExactConv(dec.head)
        self.convs = [ExactConv(c) for c in dec.convs]
        self.maps, self.picture_channels = dec.maps, dec.picture_channels
        self.inverse_gain = np.asarray(inverse_gain, np.float64)  # [L, C], the stored g'_k

    def __call__(self, y_hat: np.ndarray, level: int, shape: tuple[int, int]) -> np.ndarray:
        y_hat = np.asarray(y_hat)
        return _by_records(lambda y: self._pass(y, level, shape), len(y_hat), y_hat)

    def _pass(self, y_hat: np.ndarray, level: int, shape: tuple[int, int]) -> np.ndarray:
        sizes = [tuple(shape)]
        for _ in self.convs[:-1]:
            sizes.append((-(-sizes[-1][0] // STRIDE), -(-sizes[-1][1] // STRIDE)))
        t = _relu_(self.head(y_hat * self.inverse_gain[level]))
        for i, (conv, hw) in enumerate(zip(self.convs, sizes[::-1])):
            t = depth_to_space(conv(t), hw)
            if i < len(self.convs) - 1:
                t = _relu_(t)
        n, h, w, _ = t.shape
        return t.reshape(n, h, w, self.maps, self.picture_channels)[..., 0, :]
