"""Rate-distortion optimised quantisation (RDOQ): each record's codes chosen for bits + lambda MSE.

Plain quantisation codes the encoder's posterior mean rounded to the grid, ``q = round(mu(x) / delta)``
(:func:`vaestream.coding.tables.quantize`). That is neither the cheapest code for its distortion nor the
least distortion for its bits. The encoder is amortised: one network infers every record's latent, and the
gap between its guess and the best latent of each record is the *amortisation gap*. And rounding looks at
neither the coder's tables nor the decoder. RDOQ solves, per record ``x`` (``D_x`` values in [0, 1]),

    q*(x) = argmin_q  R(q) + lambda D(q, x),
    R(q) = sum_i -log2 P_i(q_i)                          bits under the coder's integer tables,
    D(q, x) = 1/D_x sum_d (x_d - m_d(q delta))^2          the MSE of the decoder mean (as in rd_loss),

the objective the model was trained on (:func:`vaestream.objective.rd_loss`, ``lambda`` in the same units),
with the coder's real rate in place of the KL. The search is the relaxation of neural image codecs'
encoder-side optimisation (Campos et al., 2019; Yang et al., 2020), over the *active* dimensions:

* ``t`` (real, in bins; ``[B, A]``) starts at ``mu / delta``;
* ``R(t)``: the table cost ``-log2 P_i`` interpolated linearly between neighbouring bins (beyond the table's
  range: the escape's cost);
* ``D`` at ``round(t)``, differentiated straight through the rounding, so the distortion optimised is the
  one the quantised code has;
* Adam on ``t`` for ``steps`` steps; then ``q = round(t)``.

Last, per record, the better of ``q`` and the plain codes under the exact objective (ideal bits from the
tables, the MSE of the exact decoder): RDOQ never does worse on its own objective than rounding.

**Nothing changes for the decoder.** The stream holds ordinary codes of the model at an ordinary quality of
its ladder; decoding is the same pure function of the bitstream, and any decoder of the model (codec,
SavedModel, Beam, serving) reads it. Only encoding costs more: ``steps`` forward and backward passes of the
decoder per record.

Measured over RD families on the full MNIST / Fashion-MNIST test sets (``benchmarks/RESULTS_coder.md``):
at 20 dB 47.5 / 53.6 bits per image instead of 55.6 / 61.2, at 24 dB 115 / 312 instead of 155 / 418; the
lossy members' top PSNR rises from 25.8 to 27.7 dB (MNIST); encoding 480-660 records/s (rounding: 7-13k).
"""

from __future__ import annotations

import math

import numpy as np

from vaestream.coding.tables import ESCAPE_BITS, PRECISION, SYMBOL_LIMIT, CoderTables, quantize
from vaestream.errors import ConfigError

DEFAULT_STEPS = 20
"""Adam steps per record (measured on MNIST at 20 dB: 10 steps give most of the gain, 20 nearly all of 60)."""
DEFAULT_LR = 0.05
"""Adam's step size, in bins."""
BATCH = 1024
"""Records optimised together (the relaxation is per record; batching only shares the passes)."""


def check_lmbda(lmbda) -> float:
    """``lmbda`` as a float; :class:`ConfigError` unless it is a positive finite number."""
    if isinstance(lmbda, bool) or not isinstance(lmbda, (int, float, np.floating)) or not (
            math.isfinite(lmbda) and lmbda > 0):
        raise ConfigError(f"rdo_lmbda must be a positive number (bits per unit of MSE), got {lmbda!r}")
    return float(lmbda)


def cost_table(tables: CoderTables, level: int) -> tuple[np.ndarray, int]:
    """The code length in bits of every bin of every active dimension at ladder ``level``: float32
    ``[A, 2 K + 3]`` with ``K`` the largest half range; column ``K + 1 + k`` is bin ``k``, and the columns
    past a dimension's own range (and the first and last) hold its escape cost (the escape symbol + 32 bits).
    Returns ``(cost, K)``."""
    dims = tables.active_dims
    half = tables.half_range[level]
    k_max = int(half[dims].max()) if len(dims) else 0
    cost = np.zeros((len(dims), 2 * k_max + 3), np.float64)
    for j, d in enumerate(dims):
        k = int(half[d])
        bits = PRECISION - np.log2(tables.table(level, int(d)).astype(np.float64))
        cost[j, :] = bits[2 * k + 1] + ESCAPE_BITS
        cost[j, k_max + 1 - k:k_max + 2 + k] = bits[:2 * k + 1]
    return cost.astype(np.float32), k_max


class Optimizer:
    """The relaxed search of one model at one ladder level (a compiled TF function, reused across calls).

    Args:
      model: the :class:`vaestream.model.VAE` (its ``decoder_params`` are differentiated).
      tables: the model's :class:`CoderTables`.
      level: the ladder level (quality) the codes are for.
    """

    def __init__(self, model, tables: CoderTables, level: int):
        import tensorflow as tf

        self.tables, self.level = tables, int(level)
        dims = tables.active_dims
        cost, k_max = cost_table(tables, self.level)
        width = cost.shape[1]
        nz = tables.latent_dim
        cost_flat = tf.constant(cost.reshape(-1))
        row0 = tf.constant((np.arange(len(dims)) * width)[None, :], tf.int32)
        delta = tf.constant(tables.delta[self.level][dims], tf.float32)
        scatter = tf.constant(np.eye(nz, dtype=np.float32)[dims])  # [A, Nz]: active dims -> full latent

        def rate(t):  # [B, A] bins -> [B] bits, linear between bins
            u = tf.clip_by_value(t + (k_max + 1), 0.0, float(width - 1) - 1e-3)
            i0 = tf.floor(u)
            a = u - i0
            i0 = tf.cast(i0, tf.int32) + row0
            c0, c1 = tf.gather(cost_flat, i0), tf.gather(cost_flat, i0 + 1)
            return tf.reduce_sum((1.0 - a) * c0 + a * c1, axis=1)

        def objective(t, x, lmbda):
            tq = t + tf.stop_gradient(tf.round(t) - t)  # straight through the rounding
            x_hat = model.decoder_params(tf.matmul(tq * delta, scatter))["x_mean"]
            return rate(t) + lmbda * tf.reduce_mean(tf.square(x - x_hat), axis=1)

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32),
                                      tf.TensorSpec([None, len(dims)], tf.float32), tf.TensorSpec([], tf.float32),
                                      tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.float32)])
        def run(x, t0, lmbda, steps, lr):
            b1, b2, eps = 0.9, 0.999, 1e-8

            def body(i, t, m, v):
                with tf.GradientTape() as tape:
                    tape.watch(t)
                    loss = tf.reduce_sum(objective(t, x, lmbda))
                g = tape.gradient(loss, t)
                m = b1 * m + (1 - b1) * g
                v = b2 * v + (1 - b2) * tf.square(g)
                k = tf.cast(i + 1, tf.float32)
                step = lr * (m / (1 - b1 ** k)) / (tf.sqrt(v / (1 - b2 ** k)) + eps)
                return i + 1, t - step, m, v

            z = tf.zeros_like(t0)
            _, t, _, _ = tf.while_loop(lambda i, *_: i < steps, body, (tf.constant(0), t0, z, z))
            return t

        self._run = run

    def codes(self, x: np.ndarray, mean: np.ndarray, lmbda: float, steps: int = DEFAULT_STEPS,
              lr: float = DEFAULT_LR) -> np.ndarray:
        """Relaxed-optimised codes, int32 ``[B, Nz]`` (0 where inactive), for records ``x [B, D]`` (float32 in
        [0, 1]) whose posterior means are ``mean [B, Nz]``. Not yet compared with the plain codes (see
        :func:`optimize_codes`)."""
        t = self.tables
        dims = t.active_dims
        out = np.zeros(mean.shape, np.int32)
        if len(dims) == 0 or len(x) == 0:
            return out
        t0 = (mean[:, dims].astype(np.float32) * t.inv_delta[self.level][dims]).astype(np.float32)
        for s in range(0, len(x), BATCH):
            r = self._run(x[s:s + BATCH], t0[s:s + BATCH], np.float32(lmbda), np.int32(steps), np.float32(lr))
            out[s:s + BATCH, dims] = np.clip(np.rint(r.numpy()), -SYMBOL_LIMIT, SYMBOL_LIMIT).astype(np.int32)
        return out


def optimize_codes(codec, x: np.ndarray, mean: np.ndarray, quality: float, lmbda: float,
                   steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR) -> np.ndarray:
    """RDOQ codes of ``codec``'s model (see the module docstring): int32 ``[B, Nz]``.

    Args:
      codec: a :class:`vaestream.coding.codec.Codec` loaded from a model directory (the search differentiates
        the decoder, which a SavedModel backend does not expose).
      x: the records as model inputs, float32 ``[B, D]`` in [0, 1].
      mean: their posterior means, float32 ``[B, Nz]``.
      quality: a quality of the codec's ladder.
      lmbda: the weight of the MSE, in bits per unit of MSE (the training ``lambda``'s units).
      steps, lr: Adam's steps and step size (bins).

    Each record gets the one of (the optimised codes, the plain ``quantize(mean)``) with the lower
    ``ideal_bits + lmbda MSE``.
    """
    lmbda = check_lmbda(lmbda)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ConfigError(f"rdo_steps must be a non-negative integer, got {steps!r}")
    opt = codec.rdo_optimizer(quality)
    q = float(opt.tables.qualities[opt.level])
    plain = quantize(mean, codec.tables, q)
    if steps == 0 or len(x) == 0:
        return plain
    tuned = opt.codes(x, mean, lmbda, int(steps), float(lr))

    def objective(codes):
        mse = np.mean((x - codec.decode(codes, q)) ** 2, axis=1)
        return codec.ideal_bits(codes, q) + lmbda * mse

    better = objective(tuned) < objective(plain)
    return np.where(better[:, None], tuned, plain).astype(np.int32)
