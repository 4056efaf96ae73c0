"""The VAE of Kingma & Welling (2014): MLP recognition model q(z|x), prior N(0, I), MLP decoder p(x|z)
(or, with ``ModelConfig(arch="conv")``, convolutional transforms around the same vector latent:
:mod:`vaestream.conv`). The layers both are built of, and the fixed row blocks of :func:`blocked`, are in
:mod:`vaestream.layers`.

Encoder and decoder return ``tfp.distributions`` objects, so the objective reads like the math
(see :mod:`vaestream.objective`). Records are flat float32 vectors of ``config.input_dim`` values.

Shapes: ``x`` is ``[B, D]``; ``z`` is ``[..., B, Nz]`` (leading sample dimensions are broadcast through
the decoder, so ``decode(q.sample(L))`` has batch shape ``[L, B]``).
"""

from __future__ import annotations

import hashlib

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from vaestream.config import DISCRETE_LEVELS, ModelConfig
from vaestream.conv import ConvDecoder, ConvEncoder
from vaestream.errors import ConfigError
from vaestream.layers import MLP, blocked

tfd = tfp.distributions


class VAE(tf.Module):
    """A variational auto-encoder with diagonal-Gaussian posterior and an Appendix-C MLP decoder.

    * ``encode(x)`` -> q(z|x) = N(mu(x), diag sigma(x)^2), a ``MultivariateNormalDiag`` of batch shape [B].
    * ``prior`` -> p(z) = N(0, I).
    * ``decode(z)`` -> p(x|z): ``Independent(Bernoulli(logits))`` or ``Independent(Normal(mean, sigma))``.

    Args:
      config: the architecture.
      seed: seeds the initial weights (NumPy PCG64, so the same seed gives the same model on any machine).
      init: ``"glorot"`` (default) or ``"paper"`` (every weight and bias from N(0, 0.01^2)).
    """

    def __init__(self, config: ModelConfig, seed: int = 0, init: str = "glorot"):
        super().__init__(name="vae")
        self.config = config
        rng = np.random.default_rng(seed)
        d, nz, hidden = config.input_dim, config.latent_dim, list(config.hidden)
        maps = 1 if config.likelihood == "bernoulli" else 2  # decoder outputs per pixel
        if config.arch == "conv":  # strided convolutions to the same vector latent (vaestream.conv)
            self.encoder = ConvEncoder(config, 2 * nz, rng, init)
            self.decoder = ConvDecoder(config, maps, self.encoder, rng, init)
        else:
            self.encoder = MLP([d] + hidden, 2 * nz, config.activation, rng, init, name="encoder")
            self.decoder = MLP([nz] + hidden[::-1], maps * d, config.activation, rng, init, name="decoder")
        if config.hierarchical:  # drawn after the one-layer weights, so those do not depend on the option
            n2, top = config.top_latent_dim, list(config.top_hidden)
            self.top_encoder = MLP([nz] + top, 2 * n2, config.activation, rng, init, name="top_encoder")
            self.top_decoder = MLP([n2] + top[::-1], 2 * nz, config.activation, rng, init, name="top_decoder")
            # p(z | z2) starts as N(0, I) (a zero output layer): the model starts as the one-layer model whose
            # prior the top layer then learns to refine, instead of from a random prior
            for v in (self.top_decoder.out.w, self.top_decoder.out.b):
                v.assign(tf.zeros_like(v))
        if config.entropy_model:  # a learned entropy model (vaestream.entropy_models), after the transform's weights
            from vaestream.entropy_models.hyperprior import EntropyModel

            self.entropy = EntropyModel(config, rng)

    # -- the recognition model ------------------------------------------------------------------------------
    def encoder_params(self, x: tf.Tensor, blockwise: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
        """x [B, D] -> (mean [B, Nz], log_scale [B, Nz]) of q(z|x); log_scale = log sigma.

        ``blockwise``: ``x`` is ``[nblocks, block, D]``, one GEMM per block (:func:`~vaestream.layers.blocked`)."""
        h = self.encoder(x, blockwise)
        mean, log_scale = tf.split(h, 2, axis=-1)
        return mean, log_scale

    def encoder_params_exact(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """:meth:`encoder_params` run in fixed row blocks (:func:`~vaestream.layers.blocked`): each record's
        (mean, log_scale) is bit-identical however the records are batched. The codec, exports and Beam jobs
        encode with this."""
        return blocked(lambda xb: self.encoder_params(xb, blockwise=True), tf.convert_to_tensor(x, tf.float32),
                       stacked=True)

    def encode(self, x: tf.Tensor) -> tfd.Distribution:
        """q(z|x) = N(mu(x), diag sigma(x)^2), event shape [Nz], batch shape [B]."""
        return self.posterior(*self.encoder_params(x))

    @staticmethod
    def posterior(mean: tf.Tensor, log_scale: tf.Tensor) -> tfd.Distribution:
        """N(mean, diag exp(log_scale)^2) from :meth:`encoder_params`' output (``[B, Nz]`` each): ``encode(x)``
        is ``posterior(*encoder_params(x))``."""
        return tfd.MultivariateNormalDiag(loc=mean, scale_diag=tf.exp(log_scale))

    @property
    def prior(self) -> tfd.Distribution:
        """p(z) = N(0, I) over Nz dimensions. A two-layer model (``config.top_latent_dim > 0``) has no
        closed-form p(z): its prior is :meth:`top_prior` of z2 ~ :attr:`top_latent_prior`, and asking for
        this raises :class:`vaestream.errors.ConfigError`."""
        if self.config.hierarchical:
            raise ConfigError("a two-layer model's p(z) is p(z | z2) p(z2) (VAE.top_prior, VAE.top_latent_prior), "
                              "not N(0, I)")
        nz = self.config.latent_dim
        return tfd.MultivariateNormalDiag(loc=tf.zeros([nz]), scale_diag=tf.ones([nz]))

    # -- the second stochastic layer (config.top_latent_dim > 0) ---------------------------------------------
    def top_posterior_params(self, z: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """z [..., Nz] -> (mean, log_scale) ``[..., N2]`` of q(z2 | z)."""
        return tuple(tf.split(self.top_encoder(z), 2, axis=-1))

    def top_prior_params(self, z2: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """z2 [..., N2] -> (mean, log_scale) ``[..., Nz]`` of p(z | z2)."""
        return tuple(tf.split(self.top_decoder(z2), 2, axis=-1))

    def top_prior(self, z2: tf.Tensor) -> tfd.Distribution:
        """p(z | z2) = N(m(z2), diag s(z2)^2), event shape [Nz]."""
        return self.posterior(*self.top_prior_params(z2))

    @property
    def top_latent_prior(self) -> tfd.Distribution:
        """p(z2) = N(0, I) over N2 dimensions."""
        n2 = self.config.top_latent_dim
        return tfd.MultivariateNormalDiag(loc=tf.zeros([n2]), scale_diag=tf.ones([n2]))

    # -- the generative model -------------------------------------------------------------------------------
    def decoder_params(self, z: tf.Tensor, blockwise: bool = False) -> dict[str, tf.Tensor]:
        """z [..., Nz] -> the decoder's parameters, each [..., D].

        ``blockwise``: ``z`` is ``[nblocks, block, Nz]``, one GEMM per block (:func:`~vaestream.layers.blocked`).

        Bernoulli: ``{"logits", "x_mean"}``; Gaussian: ``{"x_mean", "log_scale"}``; beta-binomial:
        ``{"x_mean", "log_alpha", "log_beta"}`` (x_mean = alpha / (alpha + beta), the mean of n / 255).
        """
        h = self.decoder(z, blockwise)
        cfg = self.config
        if cfg.likelihood == "bernoulli":
            return {"logits": h, "x_mean": tf.sigmoid(h)}
        if cfg.likelihood == "beta_binomial":
            log_alpha, log_beta = tf.split(h, 2, axis=-1)
            return {"x_mean": tf.sigmoid(log_alpha - log_beta), "log_alpha": log_alpha, "log_beta": log_beta}
        raw_mean, raw_log_scale = tf.split(h, 2, axis=-1)
        mean = tf.sigmoid(raw_mean) if cfg.likelihood == "gaussian_sigmoid" else raw_mean
        # A smooth floor on log sigma keeps the density finite on constant pixels.
        log_scale = cfg.min_log_scale + tf.nn.softplus(raw_log_scale - cfg.min_log_scale)
        return {"x_mean": mean, "log_scale": log_scale}

    def decoder_params_exact(self, z: tf.Tensor) -> dict[str, tf.Tensor]:
        """:meth:`decoder_params` of ``z [B, Nz]`` run in fixed row blocks (:func:`~vaestream.layers.blocked`):
        a record's decoded parameters are a pure function of its latent, bit-identical whether it is decoded
        alone, in any batch, by random access, in another process or through the SavedModel. Every
        reconstruction path uses this."""
        return blocked(lambda zb: self.decoder_params(zb, blockwise=True), tf.convert_to_tensor(z, tf.float32),
                       stacked=True)

    def decode(self, z: tf.Tensor) -> tfd.Distribution:
        """p(x|z), event shape [D], batch shape z.shape[:-1]."""
        p = self.decoder_params(z)
        if self.config.likelihood == "bernoulli":
            return tfd.Independent(tfd.Bernoulli(logits=p["logits"], dtype=tf.float32), 1)
        if self.config.likelihood == "beta_binomial":
            return tfd.Independent(tfd.BetaBinomial(float(DISCRETE_LEVELS), tf.exp(p["log_alpha"]),
                                                    tf.exp(p["log_beta"])), 1)
        return tfd.Independent(tfd.Normal(loc=p["x_mean"], scale=tf.exp(p["log_scale"])), 1)

    def observe(self, x: tf.Tensor) -> tf.Tensor:
        """Model inputs x in [0, 1] -> values in the support of p(x|z): x itself, or the counts
        round(255 x) for the beta-binomial decoder."""
        if self.config.likelihood == "beta_binomial":
            return tf.round(x * DISCRETE_LEVELS)
        return x

    # -- identity -------------------------------------------------------------------------------------------
    def weights(self) -> list[tf.Variable]:
        """Every weight, in a fixed order (encoder, decoder, then a two-layer model's top encoder and top decoder;
        layer by layer, W then b)."""
        out = []
        nets = (self.encoder, self.decoder) + ((self.top_encoder, self.top_decoder) if self.config.hierarchical else ())
        for net in nets:
            layers = net.layers() if hasattr(net, "layers") else list(net.hidden) + [net.out]
            for layer in layers:
                out += [layer.w, layer.b]
        if self.config.entropy_model:
            out += self.entropy.weights()
        return out

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the canonical config JSON and every weight's little-endian float32 bytes.

        Two models share a fingerprint only if they have the same architecture and bit-identical weights.
        """
        h = hashlib.sha256()
        h.update(self.config.to_json().encode())
        for v in self.weights():
            a = np.ascontiguousarray(v.numpy(), dtype="<f4")
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
        return h.hexdigest()
