"""A learned entropy model of a conv RD model's spatial latent, trained end to end with the transform, at several
rates in one model.

With ``ModelConfig(entropy_model=...)`` the :class:`vaestream.model.VAE` carries an :class:`EntropyModel`
(``model.entropy``) beside its conv analysis (encoder) and synthesis (decoder) of :mod:`vaestream.conv`; the
encoder's mean maps are the latent y ``[B, h, w, C]`` (its log-scale maps go unused).

**Variable rate: gain vectors** (Cui et al. 2021). Level k of the L = ``len(config.rd_lambdas)`` levels has a gain
g_k and an inverse gain g'_k in R^C (per latent map): the coded latent is y g_k and the synthesis sees y_hat g'_k.
Training draws a level per record and minimises R + lambda_k D for it, so one model covers every lambda of
``rd_lambdas``. The gains are learned as logarithms (an Adam step then changes a gain by a *factor*: the levels'
gains end up an order of magnitude apart, which additive steps of 1e-3 took thousands of steps to reach), started
at g_k = (lambda_k / lambda_mid)^(1/2), g'_k = 1 / g_k (lambda_mid their geometric mean: a uniform quantiser's
best step shrinks as lambda^(-1/2) at high rate). The coder uses their float64 values stored with its tables.

**Entropy models.**

* ``factorized``: y_hat = round(y), each map c under its own learned density (:class:`DeepFactorized`).
* ``hyperprior`` (mean-scale, Minnen et al. 2018): the hyper-analysis h_a (3 x 3 stride 1, 5 x 5 stride 2,
  5 x 5 stride 2, ReLU between; HYPER_FILTERS channels, C out) maps y to the hyper-latent z, coded as round(z)
  under a :class:`DeepFactorized` per channel (the side information); the hyper-synthesis h_s (two sub-pixel
  steps of 3 x 3 convolutions and ``depth_to_space(2)``, cropped to y's grid, ReLU between, then a 3 x 3
  convolution to 2C maps) gives each position's mean mu and scale index u. The symbols are round(y - mu), coded
  under N(0, s(u)^2) discretised on the integers; the decoder reconstructs y_hat = round(y - mu) + mu.

**Training** (the AEVB bound with a uniform posterior, Ballé et al. 2018): the rate is -log2 of the likelihoods
of y + U(-1/2, 1/2) (of y + U - mu under the Gaussian) and of z + U(-1/2, 1/2), in bits; the *synthesis* is fed
the rounded latent with a straight-through gradient, y + stop_gradient(round(y - mu) + mu - y) (Minnen & Singh
2020's mixed quantisation: the decoder trains on exactly what it decodes, and the mean is *not* rounded, only the
residual), and h_s is fed round(z) the same way, so h_s trains on the integers the decoder sees. The loss per
record is R + lambda_k MSE, plus the densities' auxiliary quantile loss (which moves only the quantiles).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from vaestream.config import ModelConfig
from vaestream.conv import STRIDE, Conv
from vaestream.entropy_models.densities import DeepFactorized, bits, gaussian_likelihood, scale_of_index

HYPER_FILTERS = 32
"""Channels of the hyper-transforms' hidden layers."""
SCALE_INDEX_INIT = 30.0
"""The hyper-synthesis starts predicting scale index 30 (s = 4.4) everywhere (its last bias)."""


def hyper_grid(h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The grids of h_a for a latent of h x w: (after the first stride-2 step, the hyper-latent's)."""
    h1, w1 = -(-h // STRIDE), -(-w // STRIDE)
    return (h1, w1), (-(-h1 // STRIDE), -(-w1 // STRIDE))


class EntropyModel(tf.Module):
    """Gains and (``hyperprior``) hyper-transforms and the hyper-latent's density, or (``factorized``) the latent's
    density; see the module docstring. Built by :class:`vaestream.model.VAE` after the transform's weights."""

    def __init__(self, config: ModelConfig, rng: np.random.Generator, name: str = "entropy"):
        super().__init__(name=name)
        c, levels = config.latent_channels, len(config.rd_lambdas)
        self.kind, self.channels = config.entropy_model, c
        self.lambdas = tf.constant(config.rd_lambdas, tf.float32)
        lams = np.asarray(config.rd_lambdas, np.float64)
        init = np.tile((0.5 * (np.log(lams) - np.log(lams).mean()))[:, None], (1, c)).astype(np.float32)
        self.log_gain = tf.Variable(init, name="log_gain")
        self.log_inverse_gain = tf.Variable(-init, name="log_inverse_gain")
        n = HYPER_FILTERS
        if self.kind == "hyperprior":
            self.ha = [Conv(3, c, n, 1, rng, "ha0"), Conv(5, n, n, STRIDE, rng, "ha1"),
                       Conv(5, n, c, STRIDE, rng, "ha2")]
            self.hs = [Conv(3, c, 4 * n, 1, rng, "hs0"), Conv(3, n, 4 * n, 1, rng, "hs1"),
                       Conv(3, n, 2 * c, 1, rng, "hs2")]
            self.hs[-1].b.assign(np.concatenate([np.zeros(c), np.full(c, SCALE_INDEX_INIT)]).astype(np.float32))
        else:
            self.ha, self.hs = [], []
        self.density = DeepFactorized(c)

    # -- the transforms ------------------------------------------------------------------------------------------
    def hyper_analysis(self, y: tf.Tensor) -> tf.Tensor:
        """y ``[B, h, w, C]`` -> z ``[B, h'', w'', C]`` (the grid of :func:`hyper_grid`)."""
        t = tf.nn.relu(self.ha[0](y))
        t = tf.nn.relu(self.ha[1](t))
        return self.ha[2](t)

    def hyper_synthesis(self, z: tf.Tensor, grid: tuple[int, int]) -> tuple[tf.Tensor, tf.Tensor]:
        """z ``[B, h'', w'', C]`` -> (mu, scale index u), each ``[B, h, w, C]`` for the latent grid ``grid``."""
        (h1, w1), _ = hyper_grid(*grid)
        t = tf.nn.relu(tf.nn.depth_to_space(self.hs[0](z), STRIDE)[:, :h1, :w1, :])
        t = tf.nn.relu(tf.nn.depth_to_space(self.hs[1](t), STRIDE)[:, :grid[0], :grid[1], :])
        mu, u = tf.split(self.hs[2](t), 2, axis=-1)
        return mu, u

    def gains(self, levels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(g, g') ``[B, 1, 1, C]`` of each record's level ``levels`` ``[B]`` (int)."""
        g = tf.exp(tf.gather(self.log_gain, levels))[:, None, None, :]
        return g, tf.exp(tf.gather(self.log_inverse_gain, levels))[:, None, None, :]

    def gain_values(self) -> tuple[np.ndarray, np.ndarray]:
        """(g, g') float64 ``[L, C]``: the gains the coder stores once with its tables (so that every process
        uses the same numbers, whatever its exp)."""
        return tuple(np.exp(v.numpy().astype(np.float64)) for v in (self.log_gain, self.log_inverse_gain))

    def weights(self) -> list[tf.Variable]:
        """Every variable in a fixed order (the model fingerprint hashes them after the transform's)."""
        out = [self.log_gain, self.log_inverse_gain]
        for conv in self.ha + self.hs:
            out += [conv.w, conv.b]
        return out + self.density.weights()


def analysis(model, images: tf.Tensor, blockwise: bool = False) -> tf.Tensor:
    """The encoder's mean maps y ``[B, h, w, C]`` of pictures ``[B, H, W, channels]`` of any size (stride-2 SAME
    convolutions: h = ceil(H / 2^k)); the model's own shape is not assumed."""
    enc = model.encoder
    t = images
    for i, conv in enumerate(enc.convs):
        t = conv(t, blockwise)
        t = enc.norms[i](t, blockwise) if enc.norms else enc.act(t)
    mean, _ = tf.split(enc.head(t, blockwise), 2, axis=-1)
    return mean


def synthesis_mean(model, y_hat: tf.Tensor) -> tf.Tensor:
    """The decoder mean ``[B, D]`` of latent maps ``[B, h, w, C]`` (the model's record shape)."""
    return model.decoder_params(tf.reshape(y_hat, [tf.shape(y_hat)[0], -1]))["x_mean"]


def rd_loss(model, x: tf.Tensor, seed: tf.Tensor, levels: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
    """The variable-rate training objective per record (module docstring): each record of ``x`` ``[B, D]`` at a
    level drawn uniformly (stateless, from ``seed`` [2]) or at ``levels`` ``[B]`` (int32); returns
    ``{"loss", "rate", "distortion", "side"}`` ``[B]`` (rates in bits, side = the hyper-latent's part) and ``"aux"``
    (a scalar, already inside ``loss``' mean)."""
    em = model.entropy
    picture = list(model.config.input_shape) + ([] if len(model.config.input_shape) == 3 else [1])
    shape = tf.concat([[-1], picture], 0)
    b = tf.shape(x)[0]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    if levels is None:
        levels = tf.random.stateless_uniform([b], seeds[0], 0, int(em.log_gain.shape[0]), dtype=tf.int32)
    g, ig = em.gains(levels)
    y = analysis(model, tf.reshape(x, shape)) * g
    y_noisy = y + tf.random.stateless_uniform(tf.shape(y), seeds[1], -0.5, 0.5)
    if em.kind == "hyperprior":
        z = em.hyper_analysis(y)
        z_noisy = z + tf.random.stateless_uniform(tf.shape(z), seeds[2], -0.5, 0.5)
        z_hat = z + tf.stop_gradient(tf.round(z) - z)
        mu, u = em.hyper_synthesis(z_hat, (y.shape[1], y.shape[2]))
        rate_y = bits(gaussian_likelihood(y_noisy - mu, scale_of_index(u)), [1, 2, 3])
        side = bits(em.density.likelihood(z_noisy), [1, 2, 3])
    else:
        mu = tf.zeros_like(y)
        rate_y = bits(em.density.likelihood(y_noisy), [1, 2, 3])
        side = tf.zeros_like(rate_y)
    y_hat = y + tf.stop_gradient(tf.round(y - mu) + mu - y)
    mse = tf.reduce_mean(tf.square(x - synthesis_mean(model, y_hat * ig)), axis=-1)
    rate = rate_y + side
    aux = em.density.aux_loss()
    loss = rate + tf.gather(em.lambdas, levels) * mse + aux  # aux: once per minibatch in the mean
    return {"loss": loss, "rate": rate, "distortion": mse, "side": side, "aux": aux}
