"""The AEVB objective: the SGVB estimators of the evidence lower bound, and importance-sampled log p(x).

For one record x, with z^(l) = mu + sigma * eps^(l), eps^(l) ~ N(0, I), l = 1..L (the reparameterisation
trick, so gradients flow to the encoder):

* estimator A (the paper's eq. 6):  L_A = 1/L sum_l [ log p(x, z^(l)) - log q(z^(l)|x) ]
* estimator B (eq. 7):              L_B = -KL(q(z|x) || p(z)) + 1/L sum_l log p(x|z^(l))

Both are returned as named terms, in nats per record:
``rate = KL(q || p)`` (analytic for B, the Monte-Carlo average of log q - log p for A),
``distortion = -E_q log p(x|z)`` and ``elbo = -(rate + distortion)``.

:func:`elbo` evaluates the terms through the ``tfp.distributions`` objects the model returns (the reference,
and what every caller but the training step uses). The compiled training step passes ``closed_form=True``:
estimator B's rate and the decoder's log-likelihood then come from the closed forms those distributions reduce
to (:func:`gaussian_kl_to_standard`, :func:`neg_log_likelihood`), which XLA compiles to fewer, cheaper passes
(about 5% of a 784-500-20 training step); the z samples are still ``q.sample`` (the same draws), and
``tests/test_objective.py`` checks that values and gradients equal the TFP ones.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from vaestream.errors import ConfigError

tfd = tfp.distributions

ESTIMATORS = ("A", "B")


def _seed(seed) -> tf.Tensor | None:
    if seed is None:
        return None
    if isinstance(seed, int):
        return tf.constant([seed, 0], tf.int32)
    return tf.cast(seed, tf.int32)


CLOSED_FORM_LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_sigmoid")
"""Decoders whose log-likelihood :func:`neg_log_likelihood` writes in closed form."""

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def gaussian_kl_to_standard(mean: tf.Tensor, log_scale: tf.Tensor) -> tf.Tensor:
    """KL(N(mu, diag sigma^2) || N(0, I)) = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - 2 log sigma_j), in nats.

    ``mean``, ``log_scale`` (log sigma): ``[..., Nz]``; returns ``[...]``. Equals
    ``tfd.kl_divergence(model.encode(x), model.prior)``.
    """
    return 0.5 * tf.reduce_sum(tf.square(mean) + tf.exp(2.0 * log_scale) - 1.0 - 2.0 * log_scale, axis=-1)


def neg_log_likelihood(model, z: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """-log p(x|z) in closed form, summed over the D dimensions; equals ``-model.decode(z).log_prob(x)``.

    * Bernoulli with logits l: ``sum_d softplus(l_d) - x_d l_d`` (the sigmoid cross-entropy, for x in [0, 1]).
    * Gaussian N(m, s^2): ``sum_d 1/2 ((x_d - m_d) / s_d)^2 + log s_d + 1/2 log 2 pi``.

    ``z``: ``[..., B, Nz]``, ``x``: ``[B, D]`` (model inputs); returns ``[..., B]``. Raises
    :class:`ConfigError` for a decoder not in :data:`CLOSED_FORM_LIKELIHOODS`.
    """
    likelihood = model.config.likelihood
    if likelihood not in CLOSED_FORM_LIKELIHOODS:
        raise ConfigError(f"no closed-form log-likelihood for the {likelihood!r} decoder")
    p = model.decoder_params(z)
    if likelihood == "bernoulli":
        logits = p["logits"]
        labels = tf.broadcast_to(x, tf.shape(logits))
        return tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits), axis=-1)
    log_scale = p["log_scale"]
    u = (x - p["x_mean"]) * tf.exp(-log_scale)
    return tf.reduce_sum(0.5 * tf.square(u) + log_scale + _HALF_LOG_2PI, axis=-1)


def elbo(model, x: tf.Tensor, estimator: str = "B", num_samples: int = 1, seed=None,
         closed_form: bool = False, rng_alg: str | None = None) -> dict[str, tf.Tensor]:
    """The SGVB estimate of the ELBO for each record.

    Args:
      model: a :class:`vaestream.model.VAE`.
      x: ``[B, D]`` records (model inputs; an array or tensor, taken as float32).
      estimator: ``"A"`` or ``"B"`` (see the module docstring).
      num_samples: L, the number of z samples per record.
      seed: an int or a ``[2]`` int tensor (a stateless seed: the same seed gives the same samples), or None.
      closed_form: compute estimator B's KL and the decoder's log-likelihood from their closed forms
        (:func:`gaussian_kl_to_standard`, :func:`neg_log_likelihood`) instead of through the distribution
        objects: the same values and gradients (to float rounding) in fewer compiled passes. Ignored for
        estimator A and for decoders without a closed form here (beta-binomial).
      rng_alg: None: z is ``q.sample(L, seed)`` (TFP's sampler). A TF stateless algorithm (``"philox"``,
        ``"threefry"``, needs a seed): z = mu + sigma * eps with eps ~ N(0, I) drawn by
        ``tf.random.stateless_normal(..., alg=rng_alg)`` -- the same reparameterisation; the training step
        uses ``"threefry"`` under XLA, where it is ~4x cheaper than Philox on CPU.

    Returns:
      ``{"elbo", "rate", "distortion"}``, each ``[B]``, in nats per record.
    """
    if estimator not in ESTIMATORS:
        raise ConfigError(f"estimator {estimator!r} is not one of {ESTIMATORS}")
    x = tf.convert_to_tensor(x, tf.float32)
    if model.config.hierarchical:
        return elbo_two_layers(model, x, estimator, num_samples, seed, rng_alg)
    closed_form = closed_form and estimator == "B" and model.config.likelihood in CLOSED_FORM_LIKELIHOODS
    mean, log_scale = model.encoder_params(x)
    q = model.posterior(mean, log_scale)  # = model.encode(x)
    prior = model.prior
    if rng_alg is None:
        z = q.sample(num_samples, seed=_seed(seed))  # [L, B, Nz], reparameterised
    else:
        if seed is None:
            raise ConfigError(f"rng_alg={rng_alg!r} draws stateless samples: give a seed")
        shape = tf.concat([[num_samples], tf.shape(mean)], axis=0)
        z = mean + tf.exp(log_scale) * tf.random.stateless_normal(shape, seed=_seed(seed), alg=rng_alg)
    if closed_form:
        rate = gaussian_kl_to_standard(mean, log_scale)
        distortion = tf.reduce_mean(neg_log_likelihood(model, z, x), axis=0)
        return {"elbo": -(rate + distortion), "rate": rate, "distortion": distortion}
    p_x_given_z = model.decode(z)  # batch shape [L, B]
    distortion = -tf.reduce_mean(p_x_given_z.log_prob(model.observe(x)), axis=0)
    if estimator == "B":
        rate = tfd.kl_divergence(q, prior)
    else:
        rate = tf.reduce_mean(q.log_prob(z) - prior.log_prob(z), axis=0)
    return {"elbo": -(rate + distortion), "rate": rate, "distortion": distortion}


def _normal_log_prob(z: tf.Tensor, mean: tf.Tensor, log_scale: tf.Tensor) -> tf.Tensor:
    """log N(z; mean, diag exp(log_scale)^2), summed over the last axis."""
    u = (z - mean) * tf.exp(-log_scale)
    return -tf.reduce_sum(0.5 * tf.square(u) + log_scale + _HALF_LOG_2PI, axis=-1)


def _draw(mean: tf.Tensor, log_scale: tf.Tensor, num_samples: int, seed, rng_alg: str | None) -> tf.Tensor:
    """``[L, *mean.shape[-2:]]`` (or ``mean``'s shape when it already has the sample axis) reparameterised draws
    mean + sigma * eps from a stateless seed (or TF's global generator when ``seed`` is None)."""
    shape = tf.shape(mean) if num_samples is None else tf.concat([[num_samples], tf.shape(mean)], axis=0)
    if seed is None:
        eps = tf.random.normal(shape)
    else:
        eps = tf.random.stateless_normal(shape, seed=_seed(seed), alg=rng_alg or "auto_select")
    return mean + tf.exp(log_scale) * eps


def elbo_two_layers(model, x: tf.Tensor, estimator: str = "B", num_samples: int = 1, seed=None,
                    rng_alg: str | None = None) -> dict[str, tf.Tensor]:
    """The ELBO of a two-layer model x -> z -> z2 (``config.top_latent_dim > 0``), per record, in nats.

    With p(x, z, z2) = p(x|z) p(z|z2) p(z2) and q(z, z2 | x) = q(z|x) q(z2|z), z^(l) ~ q(z|x) and
    z2^(l) ~ q(z2|z^(l)) (both reparameterised)::

        distortion = -1/L sum_l log p(x | z^(l))
        rate (A)   =  1/L sum_l [log q(z^(l)|x) + log q(z2^(l)|z^(l)) - log p(z^(l)|z2^(l)) - log p(z2^(l))]
        rate (B)   = -H[q(z|x)] + 1/L sum_l [KL(q(z2|z^(l)) || N(0, I)) - log p(z^(l)|z2^(l))]

    (B uses the closed-form entropy and top KL, A only samples.) ``rate`` is the KL of the coded latents that
    bits-back coding pays for (:mod:`vaestream.coding.bitsback.coder`, Bit-Swap order), ``elbo = -(rate + distortion)``.
    The z2 draws use the seed ``seed + [0, 1]``. Shapes as :func:`elbo`.
    """
    mean, log_scale = model.encoder_params(x)
    z = _draw(mean, log_scale, num_samples, seed, rng_alg)                     # [L, B, Nz]
    m2, l2 = model.top_posterior_params(z)                                     # [L, B, N2]
    z2 = _draw(m2, l2, None, None if seed is None else _seed(seed) + tf.constant([0, 1], tf.int32), rng_alg)
    pm, pl = model.top_prior_params(z2)                                        # [L, B, Nz]
    distortion = -tf.reduce_mean(model.decode(z).log_prob(model.observe(x)), axis=0)
    log_p_z = _normal_log_prob(z, pm, pl)
    if estimator == "B":
        neg_entropy = -tf.reduce_sum(0.5 + _HALF_LOG_2PI + log_scale, axis=-1)
        rate = neg_entropy + tf.reduce_mean(gaussian_kl_to_standard(m2, l2) - log_p_z, axis=0)
    else:
        zeros = tf.zeros_like(z2)
        rate = tf.reduce_mean(_normal_log_prob(z, mean, log_scale) + _normal_log_prob(z2, m2, l2) - log_p_z
                              - _normal_log_prob(z2, zeros, zeros), axis=0)
    return {"elbo": -(rate + distortion), "rate": rate, "distortion": distortion}


RD_LIKELIHOODS = ("gaussian", "gaussian_sigmoid")
"""Decoders the rate-distortion objective trains (it uses their mean; the log-scale output goes unused)."""


def rd_loss(model, x: tf.Tensor, lmbda: float, seed=None, rng_alg: str | None = None) -> dict[str, tf.Tensor]:
    """The rate-distortion objective ``loss = R + lambda D`` per record, R in bits, D the MSE (Ballé et al.).

    * ``rate`` R = KL(q(z|x) || N(0, I)) / ln 2, in bits (:func:`gaussian_kl_to_standard`).
    * ``distortion`` D = 1/D_x sum_d (x_d - m_d(z))^2 with z = mu + sigma eps, eps ~ N(0, I) (one
      reparameterised sample), m the decoder mean (``decoder_params(z)["x_mean"]``), D_x = ``input_dim``.

    Why the KL is the rate the coder pays: :mod:`vaestream.coding.tables` codes q_i = round(mu_i / Delta_i)
    with Delta_i = quality x s_i (s_i the RMS posterior std) under the aggregate density of mu_i. For a
    bin well below the spread of mu_i that costs h(mu_i) - log2 Delta_i bits; with the marginal of mu_i
    ~ N(0, 1 - sigma_i^2) and Delta_i = sqrt(2 pi e) sigma_i (quality ~ 4.13) it is 1/2 log2((1 -
    sigma_i^2) / sigma_i^2), while the mean KL of that dimension is -log2 sigma_i + O(sigma_i^2): the
    same to first order, and measured 1.02x (MNIST) / 0.94x (Fashion) of the KL at quality 4
    (benchmarks/RESULTS_coder.md). The distortion is trained under posterior noise of variance sigma^2,
    and the quantisation error of that bin is uniform with variance Delta^2 / 12 = (2 pi e / 12) sigma^2
    ~ 1.42 sigma^2: the sample z is the additive-noise proxy of quantisation (as Ballé et al.'s uniform
    noise), so lambda trades the quantities the coder realises. Finer qualities spend more bits than the
    KL for a little less distortion; ``vaestream compress --psnr`` picks among them.

    Exact scaling as a beta-VAE: ``loss / lambda = D + beta R`` with beta = 1 / lambda. Equivalently, times
    ln 2 it is the negative ELBO of a decoder N(m(z), s^2 I) with fixed s^2 = D_x / (2 lambda ln 2), up
    to the constant D_x log(s sqrt(2 pi)): KL + D_x D / (2 s^2) = ln 2 (R + lambda D).

    ``x`` is ``[B, D_x]``; returns ``{"loss", "rate", "distortion"}``, each ``[B]`` (loss and rate in bits).
    Raises :class:`ConfigError` for a decoder not in :data:`RD_LIKELIHOODS`.
    """
    if model.config.likelihood not in RD_LIKELIHOODS:
        raise ConfigError(f"the rate-distortion objective trains a Gaussian decoder {RD_LIKELIHOODS}, not "
                          f"{model.config.likelihood!r}")
    if model.config.hierarchical:
        raise ConfigError("the rate-distortion objective codes one stochastic layer (prior N(0, I)); this model "
                          f"has a second one (top_latent_dim {model.config.top_latent_dim})")
    mean, log_scale = model.encoder_params(x)
    eps_shape = tf.shape(mean)
    if rng_alg is None:
        eps = tf.random.normal(eps_shape) if seed is None else tf.random.stateless_normal(eps_shape, _seed(seed))
    else:
        eps = tf.random.stateless_normal(eps_shape, seed=_seed(seed), alg=rng_alg)
    z = mean + tf.exp(log_scale) * eps
    rate = gaussian_kl_to_standard(mean, log_scale) / math.log(2.0)
    distortion = tf.reduce_mean(tf.square(x - model.decoder_params(z)["x_mean"]), axis=-1)
    return {"loss": rate + lmbda * distortion, "rate": rate, "distortion": distortion}


SAMPLE_BLOCK = 16
"""Importance samples are drawn in blocks of this many, block j of a record batch from its own stateless seed,
so :func:`log_likelihood`'s answer does not depend on how its memory bound chunks the k samples."""


def _log_weights_at(model, x: tf.Tensor, q, z: tf.Tensor) -> tf.Tensor:
    if model.config.hierarchical:
        raise ConfigError("importance-sampled log p(x) is implemented for one stochastic layer; a two-layer "
                          "model's bound is its ELBO (vaestream.objective.elbo_two_layers)")
    """log p(x|z) + log p(z) - log q(z|x) for samples ``z`` ``[k, B, Nz]`` of ``q``; ``[k, B]``."""
    return model.decode(z).log_prob(model.observe(x)) + model.prior.log_prob(z) - q.log_prob(z)


def log_weights(model, x: tf.Tensor, k: int, seed=None) -> tf.Tensor:
    """Importance weights log p(x, z_i) - log q(z_i|x), z_i ~ q(z|x), i = 1..k; shape ``[k, B]``."""
    q = model.encode(x)
    return _log_weights_at(model, x, q, q.sample(k, seed=_seed(seed)))


@tf.function(reduce_retracing=True)
def _block_log_weights(model, x, first_block, num_blocks, k, seed):
    """Weights of samples ``[first_block * G, first_block * G + k)`` (G = :data:`SAMPLE_BLOCK`): block j's
    noise eps ``[G, B, Nz]`` is ``stateless_normal(seed=(seed, j))``, z = mu + sigma * eps. Returns ``[k, B]``."""
    mean, log_scale = model.encoder_params(x)
    q = model.posterior(mean, log_scale)
    shape = tf.concat([[SAMPLE_BLOCK], tf.shape(mean)], axis=0)
    eps = tf.map_fn(lambda j: tf.random.stateless_normal(shape, seed=tf.stack([seed, j])),
                    first_block + tf.range(num_blocks), fn_output_signature=tf.float32)  # [nb, G, B, Nz]
    eps = tf.reshape(eps, tf.concat([[-1], tf.shape(mean)], axis=0))[:k]
    return _log_weights_at(model, x, q, mean + tf.exp(log_scale) * eps)


def log_likelihood(model, x, k: int = 5000, batch_size: int = 100, seed: int = 0,
                   max_floats: int = 2**25, on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """Importance-sampled estimate of log p(x) per record, in nats (Burda et al.'s bound, IWAE-k):

        log p(x) >= log 1/k sum_i p(x, z_i) / q(z_i|x),  z_i ~ q(z|x)

    For k = 1 it is the ELBO estimator A in expectation; it grows towards log p(x) as k grows. Records go
    through in batches of ``batch_size`` and samples in chunks so that no tensor holds more than about
    ``max_floats`` floats (at least ``SAMPLE_BLOCK * batch_size * D``): memory stays bounded whatever k is.
    The samples are a function of ``(seed, batch_size)`` only, so the chunking never changes the answer.

    Args:
      x: ``[N, D]`` float32 records.
      on_batch: called with the number of records after each batch of them (e.g. a progress bar's update).
    Returns:
      ``[N]`` float64 estimates of log p(x), nats.
    """
    x = np.asarray(x, np.float32)
    d = x.shape[1]
    g = SAMPLE_BLOCK
    out = np.empty(len(x), np.float64)
    for start in range(0, len(x), batch_size):
        xb = tf.constant(x[start:start + batch_size])
        b = int(xb.shape[0])
        blocks_per_chunk = max(1, min(-(-k // g), max_floats // max(1, b * d * g)))
        parts = []
        for first in range(0, -(-k // g), blocks_per_chunk):
            kc = min(blocks_per_chunk * g, k - first * g)
            nb = -(-kc // g)
            parts.append(_block_log_weights(model, xb, tf.constant(first), tf.constant(nb), tf.constant(kc),
                                            tf.constant(seed * 1_000_003 + start, tf.int32)).numpy()
                         .astype(np.float64))
        lw = np.concatenate(parts, axis=0)  # [k, b]
        m = lw.max(axis=0)
        out[start:start + b] = m + np.log(np.exp(lw - m).mean(axis=0))
        if on_batch is not None:
            on_batch(b)
    return out


def bits_per_dim(nats, input_dim: int):
    """Convert nats per record to bits per dimension: nats / (D ln 2)."""
    return nats / (input_dim * math.log(2.0))
