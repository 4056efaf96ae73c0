"""The densities of the learned entropy models: a learned non-parametric density per channel (Ballé et al. 2018,
appendix 6.1; tensorflow-compression's ``DeepFactorized``) and the conditional Gaussian of mean-scale coding.

Both give the *likelihood of an interval of width 1*: the probability mass of the quantisation bin around a
value, p(y_tilde) = P(y_tilde - 1/2 < Y <= y_tilde + 1/2), which is the density of Y convolved with U(-1/2, 1/2)
(the additive-uniform-noise proxy of rounding that training uses) and, at an integer, the probability that the
coder gives the rounded symbol. Rates are ``-log2`` of these likelihoods, in bits.

Scales. The Gaussian's scale is carried as a *scale index* u (real-valued in training): s(u) = SCALE_MIN x
exp(u x SCALE_STEP), so the coder's table of a position is simply ``clip(rint(u), 0, SCALE_LEVELS - 1)``: the
index is picked by one correctly rounded operation on the exact hyper-synthesis output, no logarithm. The
SCALE_LEVELS = 64 tables span [SCALE_MIN, SCALE_MAX] = [0.11, 256] log-uniformly (tensorflow-compression's
``LocationScaleIndexedEntropyModel`` defaults); u is bounded to [0, 63] by :func:`bound` (the gradient passes
when it points back inside, as tfc's ``lower_bound``).
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

SCALE_MIN, SCALE_MAX, SCALE_LEVELS = 0.11, 256.0, 64
SCALE_STEP = math.log(SCALE_MAX / SCALE_MIN) / (SCALE_LEVELS - 1)
"""log s grows by this per scale index (0.1231: adjacent tables' scales differ by 13 %)."""
TAIL_MASS = 2.0 ** -8
"""The factorised density's table covers its quantiles TAIL_MASS / 2 and 1 - TAIL_MASS / 2 (the rest escapes)."""
LIKELIHOOD_FLOOR = 1e-9
"""Likelihoods are floored here before the logarithm (a rate of at most 29.9 bits per value in training)."""


@tf.custom_gradient
def _bound(x, lo, hi):
    y = tf.clip_by_value(x, lo, hi)

    def grad(dy):
        # pass the gradient inside the bounds, and outside of them when it points back in (descent: x - dy)
        inside = (x >= lo) & (x <= hi)
        back = ((x < lo) & (dy < 0)) | ((x > hi) & (dy > 0))
        return tf.where(inside | back, dy, tf.zeros_like(dy)), None, None

    return y, grad


def bound(x: tf.Tensor, lo: float, hi: float) -> tf.Tensor:
    """``clip(x, lo, hi)`` whose gradient still flows where it would move ``x`` back into [lo, hi]."""
    return _bound(x, tf.constant(lo, x.dtype), tf.constant(hi, x.dtype))


def scale_of_index(u: tf.Tensor) -> tf.Tensor:
    """The Gaussian scale of a (real) scale index ``u``: SCALE_MIN exp(SCALE_STEP bound(u, 0, 63))."""
    return SCALE_MIN * tf.exp(SCALE_STEP * bound(u, 0.0, SCALE_LEVELS - 1.0))


def gaussian_likelihood(v: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    """P(v - 1/2 < V <= v + 1/2) for V ~ N(0, scale^2), elementwise (``v`` = y - mu): written with |v| and the
    upper tail (erfc) so that it keeps its precision far out (tfc's form)."""
    a = tf.abs(v)
    c = 1.0 / (scale * math.sqrt(2.0))
    return 0.5 * (tf.math.erfc((a - 0.5) * c) - tf.math.erfc((a + 0.5) * c))


def bits(likelihood: tf.Tensor, axis) -> tf.Tensor:
    """-sum log2 max(likelihood, LIKELIHOOD_FLOOR) over ``axis``."""
    return -tf.reduce_sum(tf.math.log(tf.maximum(likelihood, LIKELIHOOD_FLOOR)), axis=axis) / math.log(2.0)


class DeepFactorized(tf.Module):
    """A learned univariate density per channel (Ballé et al. 2018, appendix 6.1): its CDF is
    c(x) = sigmoid(f_K(...f_1(x))) with f_k(x) = g_k(H_k x + b_k), H_k = softplus(M_k) >= 0, g_k(t) = t + tanh(a_k)
    tanh(t) (monotone, since |tanh(a_k)| < 1), of widths 1 -> 3 -> 3 -> 3 -> 1 (``filters``); parameters per
    channel. :meth:`likelihood` is c(y + 1/2) - c(y - 1/2) (evaluated on the side of the median where the
    difference of sigmoids keeps its precision).

    **Quantiles and the auxiliary loss** (tfc): ``quantiles`` [C, 3] are learned so that the logits c^-1 reach
    -t, 0, t at them (t = log(2 / TAIL_MASS - 1)): the TAIL_MASS / 2 quantile, the median and the 1 - TAIL_MASS /
    2 quantile. :meth:`aux_loss` = sum |logits(quantiles) - (-t, 0, t)| with the density's own parameters held
    fixed (its gradient moves only the quantiles); the coder's table of channel c spans
    [floor(q_lo), ceil(q_hi)] (:meth:`table_range`) and values outside escape.
    """

    def __init__(self, channels: int, filters=(3, 3, 3), init_scale: float = 10.0, name: str = "density"):
        super().__init__(name=name)
        f = (1,) + tuple(filters) + (1,)
        scale = init_scale ** (1.0 / (len(f) - 1))
        rng = np.random.default_rng(7)
        self.channels = channels
        self.matrices, self.biases, self.factors = [], [], []
        for i in range(len(f) - 1):
            init = math.log(math.expm1(1.0 / scale / f[i + 1]))
            self.matrices.append(tf.Variable(np.full((channels, f[i + 1], f[i]), init, np.float32), name=f"m{i}"))
            self.biases.append(tf.Variable(rng.uniform(-.5, .5, (channels, f[i + 1], 1)).astype(np.float32),
                                           name=f"b{i}"))
            if i < len(f) - 2:
                self.factors.append(tf.Variable(np.zeros((channels, f[i + 1], 1), np.float32), name=f"a{i}"))
        q = np.tile(np.array([-init_scale, 0.0, init_scale], np.float32), (channels, 1))
        self.quantiles = tf.Variable(q, name="quantiles")

    def logits(self, x: tf.Tensor, stop_gradient: bool = False) -> tf.Tensor:
        """c^-1 ... the pre-sigmoid CDF of ``x`` [C, 1, N] (channel c's values in row c) -> [C, 1, N]."""
        sg = tf.stop_gradient if stop_gradient else (lambda v: v)
        t = x
        for i, m in enumerate(self.matrices):
            t = tf.matmul(tf.nn.softplus(sg(m)), t) + sg(self.biases[i])
            if i < len(self.factors):
                t += tf.tanh(sg(self.factors[i])) * tf.tanh(t)
        return t

    def likelihood(self, y: tf.Tensor) -> tf.Tensor:
        """The mass of [y - 1/2, y + 1/2] under channel c's density, for ``y`` [..., C] -> the same shape."""
        shape, c = tf.shape(y), self.channels
        x = tf.reshape(tf.transpose(tf.reshape(y, [-1, c])), [c, 1, -1])
        lo, hi = self.logits(x - 0.5), self.logits(x + 0.5)
        sign = -tf.sign(lo + hi)  # on the upper side compute 1 - c as sigmoid(-logit): no cancellation
        lik = tf.abs(tf.sigmoid(sign * hi) - tf.sigmoid(sign * lo))
        return tf.reshape(tf.transpose(tf.reshape(lik, [c, -1])), shape)

    def aux_loss(self) -> tf.Tensor:
        """sum_c |logits(quantiles_c) - (-t, 0, t)| with the density's parameters held fixed."""
        t = math.log(2.0 / TAIL_MASS - 1.0)
        target = tf.constant([-t, 0.0, t], tf.float32)
        got = self.logits(tf.reshape(self.quantiles, [self.channels, 1, 3]), stop_gradient=True)
        return tf.reduce_sum(tf.abs(tf.reshape(got, [self.channels, 3]) - target))

    def table_range(self) -> tuple[np.ndarray, np.ndarray]:
        """(lo [C], hi [C]) int64: the integers floor(q_lo) .. ceil(q_hi) each channel's table covers (at least
        -1 .. 1)."""
        q = self.quantiles.numpy().astype(np.float64)
        lo = np.minimum(np.floor(q[:, 0]), -1).astype(np.int64)
        hi = np.maximum(np.ceil(q[:, 2]), 1).astype(np.int64)
        return lo, hi

    def pmf(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """(lo [C], [pmf_c over lo_c .. hi_c plus the mass outside, float64]) for the coder's tables (built once,
        stored as integers: these floats are never needed to decode)."""
        lo, hi = self.table_range()
        out = []
        for c in range(self.channels):
            grid = np.arange(lo[c], hi[c] + 1, dtype=np.float32)
            y = np.zeros((len(grid), self.channels), np.float32)
            y[:, c] = grid
            p = self.likelihood(tf.constant(y)).numpy()[:, c].astype(np.float64)
            p = np.maximum(p, 0.0)
            out.append(np.append(p, max(1.0 - p.sum(), 2.0 ** -20)))
        return lo, out

    def weights(self) -> list[tf.Variable]:
        """Every variable, in a fixed order (for the model fingerprint)."""
        return list(self.matrices) + list(self.biases) + list(self.factors) + [self.quantiles]


def gaussian_pmfs() -> list[np.ndarray]:
    """The Gaussian tables, float64: for each scale index j, the masses of N(0, s_j^2) on the integers -K_j .. K_j
    (K_j = ceil(6 s_j) + 1; s_j = SCALE_MIN exp(j SCALE_STEP)) and the mass outside them (the escape)."""
    from scipy.special import ndtr

    out = []
    for j in range(SCALE_LEVELS):
        s = SCALE_MIN * math.exp(j * SCALE_STEP)
        k = int(math.ceil(6 * s)) + 1
        g = np.arange(-k, k + 1, dtype=np.float64)
        p = ndtr((g + 0.5) / s) - ndtr((g - 0.5) / s)
        out.append(np.append(p, max(1.0 - p.sum(), 2.0 ** -20)))
    return out
