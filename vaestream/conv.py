"""Convolutional analysis and synthesis transforms for picture records (``ModelConfig(arch="conv")``).

The code is a *vector* (a diagonal Gaussian of ``latent_dim`` dimensions), so the coder, the container,
the tables, SavedModel exports, Beam jobs and serving see the same shapes as with the MLPs; records stay
flat ``[B, D]`` at the API and are reshaped to ``[B, H, W, C]`` here (C = 1 for ``input_shape`` (H, W)).
With ``config.latent_channels`` = C the latent is *spatial*: C maps over the encoder's last feature grid
(h x w), made by a 3 x 3 convolution (no dense layers), flattened in (h, w, c) order to the ``h w C``-vector
the coder codes (one table per position and map); the decoder starts with a 3 x 3 convolution from those maps.
A code dimension then describes a neighbourhood of the picture, not all of it.

* Encoder (analysis): for each ``c`` of ``config.channels``, a 5 x 5 convolution of stride 2 (SAME
  padding) to ``c`` channels and the activation; flatten; the dense layers ``config.hidden``; a linear
  layer to 2 Nz (mean, log sigma) (spatial latent: a 3 x 3 convolution to 2 C maps instead).
* Decoder (synthesis): dense layers ``hidden[::-1]`` from z, a dense layer to the encoder's last feature
  map (``h x w x channels[-1]``) and the activation; then, per stride-2 step, a *sub-pixel* convolution
  (Shi et al. 2016): a 3 x 3 convolution of stride 1 to ``4 c`` channels followed by ``depth_to_space(2)``
  (and a crop back to the encoder's size for odd sizes), the activation between layers; the last one
  gives the decoder's ``k`` output maps (1 for Bernoulli, 2 for the Gaussian/beta-binomial parameters),
  flattened channel-major to ``[..., k D]`` so that :meth:`vaestream.model.VAE.decoder_params` splits them
  as it splits the MLP's output.

A sub-pixel convolution is a transposed convolution of stride 2 written as an ordinary convolution and a
permutation; here that matters, because every layer is then an *exact* patch copy
(``tf.image.extract_patches``), one GEMM and elementwise ops. **Determinism**: with
``blockwise=True`` the patches of every layer are cut into rows of ``k*k*C_in`` values and multiplied in
the stacked fixed 64-row blocks of :func:`vaestream.layers.blocked` (one BatchMatMul of ``[n, 64, K] x
[K, C_out]``); a row's output is then a pure function of its patch, as for the MLP's dense layers, so a
record's reconstruction does not depend on its batch (a oneDNN convolution over N images may differ from
the same image alone; it is not used on that path). Training uses ``tf.nn.conv2d`` (the same function up to
float rounding, much faster).

Nonlinearity: a pointwise activation (``config.activation``; ELU by default for ``vaestream train --arch
conv``), or, for a spatial latent, ``activation="gdn"``: generalised divisive normalisation (Ballé et al. 2016,
:class:`GDN`) after every encoder convolution and its inverse (IGDN) after every decoder convolution but the
last, as in Ballé et al.'s image codecs. GDN Gaussianises the responses of a linear transform of pictures, so
that a factorised entropy model of a *feature map* (the spatial latent, coded one table per position and map)
fits; with a vector latent the dense layers already mix every feature, and the option is refused there. GDN
keeps every layer "patch GEMM + elementwise + a per-pixel channel GEMM", and with ``blockwise=True`` the
channel GEMM runs in the same fixed 64-row blocks, so the determinism argument above holds for it too.
Measured (benchmarks/RESULTS_coder.md; 2 epochs on MNIST, lambda = 1e5, channels 16, 32, 8 maps):
with a linear decoder mean, GDN needed more bits than ELU (BD-rate against tiled WebP +40 % vs +15 %); with the
sigmoid mean its decoder died (10 dB) at lambda 1e5 and 1e6. ELU stays the default.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from vaestream.config import ModelConfig, latent_grid
from vaestream.layers import ACTIVATION_FNS, BLOCK_ROWS, MLP

ENCODER_KERNEL = 5
DECODER_KERNEL = 3
STRIDE = 2


def _picture(config: ModelConfig) -> tuple[int, int, int]:
    s = config.input_shape
    return (s[0], s[1], 1) if len(s) == 2 else (s[0], s[1], s[2])


class Conv(tf.Module):
    """A k x k convolution of stride ``stride`` with SAME padding: ``[N, H, W, C_in] -> [N, H', W', C_out]``,
    H' = ceil(H / stride). The filter is ``[k, k, C_in, C_out]`` (glorot-uniform over the fans k k C)."""

    def __init__(self, k: int, c_in: int, c_out: int, stride: int, rng: np.random.Generator, name: str):
        super().__init__(name=name)
        limit = math.sqrt(6.0 / (k * k * (c_in + c_out)))
        self.k, self.stride = k, stride
        self.w = tf.Variable(rng.uniform(-limit, limit, size=(k, k, c_in, c_out)).astype(np.float32), name="w")
        self.b = tf.Variable(np.zeros((c_out,), np.float32), name="b")

    def __call__(self, x: tf.Tensor, blockwise: bool = False) -> tf.Tensor:
        if not blockwise:
            return tf.nn.conv2d(x, self.w, self.stride, "SAME") + self.b
        k, s = self.k, self.stride
        p = tf.image.extract_patches(x, [1, k, k, 1], [1, s, s, 1], [1, 1, 1, 1], "SAME")  # [N, H', W', kkC]
        kk = k * k * int(self.w.shape[2])
        rows = tf.reshape(p, [-1, BLOCK_ROWS, kk])  # N is a whole number of blocks, so the rows are too
        y = tf.matmul(rows, tf.reshape(self.w, [kk, -1])) + self.b
        return tf.reshape(y, tf.concat([tf.shape(p)[:3], [-1]], 0))


class GDN(tf.Module):
    """Generalised divisive normalisation over channels (Ballé, Laparra & Simoncelli 2016) and its inverse:

        GDN:   y_i = x_i / sqrt(beta_i + sum_j gamma_ji x_j^2)        IGDN:  y_i = x_i * sqrt(...)

    at every pixel of ``[N, H, W, C]``, with ``beta_i >= BETA_MIN`` and ``gamma >= 0`` kept so by the
    parametrisation ``beta = b^2 + BETA_MIN``, ``gamma = w^2`` (``w`` ``[C, C]``, ``b`` ``[C]``, the names
    :meth:`vaestream.model.VAE.weights` orders by). Initialised to ``beta = 1``, ``gamma = 0.1 I``, near the
    identity. ``blockwise=True`` computes the channel sum ``x^2 @ gamma`` in the fixed 64-row blocks of the
    convolutions, so a pixel's output is a pure function of that pixel's input.
    """

    BETA_MIN = 1e-6

    def __init__(self, channels: int, inverse: bool, name: str):
        super().__init__(name=name)
        self.inverse = inverse
        self.w = tf.Variable((math.sqrt(0.1) * np.eye(channels)).astype(np.float32), name="w")
        self.b = tf.Variable(np.full((channels,), math.sqrt(1.0 - self.BETA_MIN), np.float32), name="b")

    def __call__(self, x: tf.Tensor, blockwise: bool = False) -> tf.Tensor:
        gamma, beta = tf.square(self.w), tf.square(self.b) + self.BETA_MIN
        c = int(self.w.shape[0])
        if blockwise:
            rows = tf.reshape(tf.square(x), [-1, BLOCK_ROWS, c])
            norm = tf.reshape(tf.matmul(rows, gamma), tf.shape(x)) + beta
        else:
            norm = tf.nn.conv2d(tf.square(x), gamma[None, None], 1, "VALID") + beta
        return x * tf.sqrt(norm) if self.inverse else x / tf.sqrt(norm)


def _flatten_leading(x: tf.Tensor):
    """``[..., n]`` -> (``[N, n]``, a function that restores the leading dims on ``[N, m]``)."""
    lead = tf.shape(x)[:-1]
    flat = tf.reshape(x, [-1, tf.shape(x)[-1]])
    return flat, (lambda y: tf.reshape(y, tf.concat([lead, tf.shape(y)[-1:]], 0)))


class ConvEncoder(tf.Module):
    """``x [..., D]`` -> ``[..., n_out]``: strided convolutions, flatten, the dense :class:`vaestream.layers.MLP`."""

    def __init__(self, config: ModelConfig, n_out: int, rng: np.random.Generator, init: str, name: str = "encoder"):
        super().__init__(name=name)
        self.shape = _picture(config)
        c_in = [self.shape[2]] + list(config.channels[:-1])
        self.convs = [Conv(ENCODER_KERNEL, a, b, STRIDE, rng, name=f"conv{i}")
                      for i, (a, b) in enumerate(zip(c_in, config.channels))]
        self.norms = ([GDN(c, False, name=f"gdn{i}") for i, c in enumerate(config.channels)]
                      if config.activation == "gdn" else None)
        self.act = None if self.norms else ACTIVATION_FNS[config.activation]
        h, w = latent_grid(self.shape, config.channels)
        c = config.channels[-1]
        self.feature_shape = (h, w, c)
        self.latent_shape = config.latent_shape
        if self.latent_shape is None:
            self.dense = MLP([h * w * c] + list(config.hidden), n_out, config.activation, rng, init, name="dense")
        else:  # a spatial latent: a 3 x 3 convolution to the mean and log sigma maps
            self.head = Conv(DECODER_KERNEL, c, 2 * self.latent_shape[2], 1, rng, name="latent")

    def __call__(self, x: tf.Tensor, blockwise: bool = False) -> tf.Tensor:
        x = tf.convert_to_tensor(x, tf.float32)
        flat, restore = _flatten_leading(x)
        t = tf.reshape(flat, (-1,) + self.shape)
        for i, conv in enumerate(self.convs):
            t = conv(t, blockwise)
            t = self.norms[i](t, blockwise) if self.norms else self.act(t)
        h, w, c = self.feature_shape
        if self.latent_shape is None:
            return self.dense(restore(tf.reshape(t, [-1, h * w * c])), blockwise)
        mean, log_scale = tf.split(self.head(t, blockwise), 2, axis=-1)  # [N, h, w, C] each, flattened (h, w, c)
        nz = h * w * self.latent_shape[2]
        return restore(tf.concat([tf.reshape(mean, [-1, nz]), tf.reshape(log_scale, [-1, nz])], axis=-1))

    def layers(self) -> list[tf.Module]:
        convs = [m for pair in zip(self.convs, self.norms) for m in pair] if self.norms else list(self.convs)
        if self.latent_shape is not None:
            return convs + [self.head]
        return convs + list(self.dense.hidden) + [self.dense.out]


class ConvDecoder(tf.Module):
    """``z [..., Nz]`` -> ``[..., maps * D]``: dense layers, reshape, sub-pixel convolutions (module docstring)."""

    def __init__(self, config: ModelConfig, maps: int, encoder: ConvEncoder, rng: np.random.Generator, init: str,
                 name: str = "decoder"):
        super().__init__(name=name)
        self.feature_shape = encoder.feature_shape
        h, w, c = self.feature_shape
        self.latent_shape = config.latent_shape
        if self.latent_shape is None:
            self.dense = MLP([config.latent_dim] + list(config.hidden[::-1]), h * w * c, config.activation, rng,
                             init, name="dense")
        else:  # from the latent maps: a 3 x 3 convolution to the encoder's last feature map
            self.head = Conv(DECODER_KERNEL, self.latent_shape[2], c, 1, rng, name="latent")
        # the spatial sizes the encoder went through, largest first: each sub-pixel step doubles and crops to one
        sizes = [_picture(config)[:2]]
        for _ in config.channels[:-1]:
            sizes.append((-(-sizes[-1][0] // STRIDE), -(-sizes[-1][1] // STRIDE)))
        self.sizes = sizes[::-1]
        self.maps, self.picture_channels = maps, _picture(config)[2]
        outs = list(config.channels[:-1])[::-1] + [maps * self.picture_channels]
        self.convs = [Conv(DECODER_KERNEL, c_in, 4 * c_out, 1, rng, name=f"subpixel{i}")
                      for i, (c_in, c_out) in enumerate(zip([c] + outs[:-1], outs))]
        # IGDN after the first layer (the head) and after every sub-pixel convolution but the last
        self.norms = ([GDN(n, True, name=f"igdn{i}") for i, n in enumerate([c] + outs[:-1])]
                      if config.activation == "gdn" else None)
        self.act = None if self.norms else ACTIVATION_FNS[config.activation]

    def _act(self, i: int, t: tf.Tensor, blockwise: bool) -> tf.Tensor:
        return self.norms[i](t, blockwise) if self.norms else self.act(t)

    def __call__(self, z: tf.Tensor, blockwise: bool = False) -> tf.Tensor:
        z = tf.convert_to_tensor(z, tf.float32)
        if self.latent_shape is None:
            t = self.act(self.dense(z, blockwise))
            flat, restore = _flatten_leading(t)
            t = tf.reshape(flat, (-1,) + self.feature_shape)
        else:
            flat, restore = _flatten_leading(z)
            t = self._act(0, self.head(tf.reshape(flat, (-1,) + self.latent_shape), blockwise), blockwise)
        for i, (conv, (h, w)) in enumerate(zip(self.convs, self.sizes)):
            t = tf.nn.depth_to_space(conv(t, blockwise), STRIDE)[:, :h, :w, :]
            if i < len(self.convs) - 1:
                t = self._act(i + 1, t, blockwise)
        # [N, H, W, maps * C] -> map-major [N, maps * H * W * C] (each map in the records' (H, W, C) order)
        s = tf.shape(t)
        t = tf.reshape(t, [s[0], s[1], s[2], self.maps, self.picture_channels])
        t = tf.reshape(tf.transpose(t, [0, 3, 1, 2, 4]), [s[0], -1])
        return restore(t)

    def layers(self) -> list[tf.Module]:
        if self.latent_shape is None:
            return list(self.dense.hidden) + [self.dense.out] + list(self.convs)
        if not self.norms:
            return [self.head] + list(self.convs)
        return [self.head] + [m for pair in zip(self.norms, self.convs) for m in pair]
