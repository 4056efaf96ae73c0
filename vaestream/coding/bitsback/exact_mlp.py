"""Networks whose matrix products are exact in float64, so their outputs do not depend on BLAS, its thread
count or the batch shape (:class:`ExactMLP`), and a context that runs OpenBLAS on a fixed number of threads
(:class:`blas_threads`). Used by bits-back coding (:mod:`vaestream.coding.bitsback.coder`), whose decoder must
recompute exactly the encoder's network outputs.
"""

from __future__ import annotations

import numpy as np

# ------------------------------------------------------------------------------------------------------------
# networks whose matrix products are exact (hence independent of BLAS, threads and batch shape)
# ------------------------------------------------------------------------------------------------------------
_NP_ACTIVATIONS = {
    "tanh": np.tanh,
    "relu": lambda v: np.maximum(v, 0.0),
    "softplus": lambda v: np.logaddexp(0.0, v),
    "elu": lambda v: np.where(v > 0, v, np.expm1(np.minimum(v, 0.0))),
    "sigmoid": lambda v: 0.5 * (1.0 + np.tanh(0.5 * v)),
}
OPERAND_BITS = 21
"""Matrix product operands are integers of at most 21 bits (weights per layer, activations per row), so every
partial sum of a product over K <= 1024 inputs is an integer below 2^52: exact in float64 whatever the order."""


def _operand_bits(k: int) -> int:
    return min(OPERAND_BITS, (53 - max(1, (k - 1).bit_length())) // 2)


def activation(name: str):
    """The elementwise NumPy activation ``name`` (one of :class:`ExactMLP`'s)."""
    return _NP_ACTIVATIONS[name]


def quantize_weights(w: np.ndarray) -> tuple[np.ndarray, int, int]:
    """A layer's weights ``[K, n]`` -> (``rint(W 2^s)`` float64, s, b): integers of at most b bits, b chosen so
    that ``K 2^(2b) < 2^53`` (exact products over the K inputs, see :class:`ExactMLP`)."""
    w = np.asarray(w, np.float64)
    bits = _operand_bits(w.shape[0])
    _, e = np.frexp(np.max(np.abs(w)) if w.size else 0.0)
    s = bits - int(e)
    return np.ascontiguousarray(np.rint(np.ldexp(w, s))), s, bits


class ExactMLP:
    """A :class:`vaestream.model.MLP` evaluated in float64 NumPy with *exact* matrix products.

    Each layer's weights are rounded once to integers ``W_q = rint(W * 2^s)`` of at most ``b`` bits (``s`` per
    layer from max |W|), and each row of the layer's input to integers ``h_q = rint(h * 2^r)`` (``r`` per row from
    the row's max |h|); ``b`` is chosen so that ``K * 2^(2b) < 2^53`` for the layer's K inputs. Then every product
    and partial sum of ``h_q @ W_q`` is an integer float64 represents exactly, so the BLAS result does not depend
    on its summation order, blocking, thread count or the number of rows, and ``ldexp(h_q @ W_q, -(r + s))``
    (exact) + bias gives the same floats in any process. The activations are elementwise NumPy ufuncs (each
    element on its own). The relative rounding (2^-21 of a row's or layer's largest value) is far below what the
    rate can see.
    """

    def __init__(self, mlp, activation: str):
        self._build([(layer.w.numpy(), layer.b.numpy()) for layer in list(mlp.hidden) + [mlp.out]], activation)

    @classmethod
    def from_layers(cls, layers, activation: str) -> "ExactMLP":
        """The network of ``layers`` = ``[(W [n_in, n_out], b [n_out]), ...]`` (arrays; ``activation`` between
        them, none after the last)."""
        net = cls.__new__(cls)
        net._build(layers, activation)
        return net

    def _build(self, layers, activation: str) -> None:
        self.act = _NP_ACTIVATIONS[activation]
        self.layers = []
        for w, b in layers:
            wq, s, bits = quantize_weights(w)
            self.layers.append((wq, s, np.asarray(b, np.float64), bits))

    def __call__(self, xq: np.ndarray, x_exp: int = 0, divisor: float = 1.0, real_input: bool = False) -> np.ndarray:
        """The network on integer-valued inputs ``xq * 2^-x_exp / divisor`` (``xq`` float64 ``[g, K]`` of at
        most 2^16 in magnitude: pixel counts, or latent bucket indices) -> float64 outputs. The first layer's
        products are exact too: 2^16 x 2^b x K stays below 2^53 (b, the weight bits, shrinks as K grows).
        ``real_input``: ``xq`` is any float64 array, rounded per row like a hidden layer's activations."""
        h = xq
        for i, (wq, s, b, bits) in enumerate(self.layers):
            if i == 0 and not real_input:
                y = np.ldexp(xq @ wq, -(x_exp + s))
                if divisor != 1.0:
                    y /= divisor
            else:
                _, e = np.frexp(np.max(np.abs(h), axis=1, keepdims=True))
                r = bits - e
                y = np.ldexp(np.rint(np.ldexp(h, r)) @ wq, -(r + s))
            y += b
            h = self.act(y) if i < len(self.layers) - 1 else y
        return h


_BLAS = []


def _openblas():
    """NumPy's bundled OpenBLAS (its ``set/get_num_threads``), or None where it cannot be found."""
    if not _BLAS:
        lib = None
        try:
            import ctypes
            import glob
            import os

            root = os.path.dirname(os.path.dirname(np.__file__))
            for path in glob.glob(os.path.join(root, "numpy.libs", "*openblas*")):
                cand = ctypes.CDLL(path)
                for suffix in ("64_", ""):
                    get = getattr(cand, f"scipy_openblas_get_num_threads{suffix}", None)
                    put = getattr(cand, f"scipy_openblas_set_num_threads{suffix}", None)
                    if get is not None and put is not None:
                        put.argtypes = [ctypes.c_int]
                        lib = (get, put)
                        break
                if lib:
                    break
        except OSError:
            lib = None
        _BLAS.append(lib)
    return _BLAS[0]


class blas_threads:
    """Context manager: NumPy's OpenBLAS runs on ``n`` threads inside (best effort; a no-op where the library is
    not NumPy's bundled OpenBLAS, or for ``n`` None). Only speed depends on it: the coder's products are exact.
    The coder's products are ~256 x 500 matrices, for which extra BLAS threads gain little on an idle machine
    and lose badly on a busy one (measured on 2 shared cores: 5,000 images/s on one thread, 800-1,250 on two)."""

    def __init__(self, n: int | None):
        self.n, self.old = n, None

    def __enter__(self):
        lib = _openblas() if self.n else None
        if lib is not None:
            self.old = int(lib[0]())
            if self.old != self.n:
                lib[1](int(self.n))
            else:
                self.old = None
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            _openblas()[1](self.old)
        return False
