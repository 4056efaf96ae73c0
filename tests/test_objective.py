"""The SGVB estimators, the analytic KL, the reparameterisation gradients and the importance-sampled bound."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from vaestream import VAE, ModelConfig
from vaestream.errors import ConfigError
from vaestream.objective import (CLOSED_FORM_LIKELIHOODS, bits_per_dim, elbo, gaussian_kl_to_standard,
                                 log_likelihood, neg_log_likelihood)

tfd = tfp.distributions


@pytest.fixture(scope="module")
def x_real(mnist_test):
    return (mnist_test[:64].reshape(64, -1) / 255.0).astype(np.float32)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian_sigmoid", "gaussian"])
def test_estimators_A_and_B_agree_in_expectation(likelihood, x_real):
    model = VAE(ModelConfig(latent_dim=5, hidden=(64,), likelihood=likelihood), seed=3)
    x = tf.constant(x_real[:16])
    a = elbo(model, x, estimator="A", num_samples=4000, seed=1)
    b = elbo(model, x, estimator="B", num_samples=4000, seed=2)
    # Same expectation: per-record difference well within Monte-Carlo error of 4000 samples.
    np.testing.assert_allclose(a["elbo"].numpy(), b["elbo"].numpy(), rtol=0, atol=0.05 * np.abs(b["elbo"]).max())
    assert abs(float(tf.reduce_mean(a["elbo"] - b["elbo"]))) < 0.5


def test_analytic_kl_matches_monte_carlo_kl(x_real):
    model = VAE(ModelConfig(latent_dim=8, hidden=(32,)), seed=0)
    q = model.encode(tf.constant(x_real[:8] * 3.0))  # a posterior far from the prior
    analytic = tfd.kl_divergence(q, model.prior).numpy()
    z = q.sample(200_000, seed=(7, 7))
    mc = tf.reduce_mean(q.log_prob(z) - model.prior.log_prob(z), axis=0).numpy()
    np.testing.assert_allclose(mc, analytic, rtol=0.02, atol=0.01)
    # and the closed form 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2)
    mean, log_scale = model.encoder_params(tf.constant(x_real[:8] * 3.0))
    closed = 0.5 * np.sum(mean ** 2 + np.exp(2 * log_scale) - 1 - 2 * log_scale, axis=-1)
    np.testing.assert_allclose(analytic, closed, rtol=1e-5)


def _terms_and_grads(model, x, jit, **kw):
    def f(x):
        with tf.GradientTape() as tape:
            t = elbo(model, x, seed=tf.constant([5, 9], tf.int32), **kw)
            obj = tf.reduce_mean(t["elbo"])
        return t, tape.gradient(obj, model.trainable_variables)
    t, g = tf.function(f, jit_compile=True)(x) if jit else f(x)
    return {k: v.numpy() for k, v in t.items()}, [v.numpy() for v in g]


@pytest.mark.parametrize("likelihood,num_samples,jit", [
    ("bernoulli", 1, True), ("bernoulli", 3, False), ("gaussian_sigmoid", 1, True), ("gaussian", 2, False)])
def test_closed_form_terms_and_gradients_equal_the_tfp_distributions(likelihood, num_samples, jit, x_real):
    """The training step's closed forms (KL to N(0, I), Bernoulli/Gaussian -log p(x|z)) against the TFP objects:
    same samples, same per-record terms, same gradients for every weight."""
    model = VAE(ModelConfig(latent_dim=6, hidden=(48,), likelihood=likelihood), seed=4)
    x = tf.constant(x_real[:32])
    ref, ref_g = _terms_and_grads(model, x, jit, num_samples=num_samples)
    got, got_g = _terms_and_grads(model, x, jit, num_samples=num_samples, closed_form=True)
    for k in ("elbo", "rate", "distortion"):
        np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=1e-3)
    assert np.abs(ref["rate"]).min() > 1e-3 and np.abs(ref["distortion"]).min() > 1.0  # non-trivial terms
    for a, b in zip(got_g, ref_g):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * np.abs(b).max())


def test_closed_form_pieces_match_tfp_directly(x_real):
    model = VAE(ModelConfig(latent_dim=5, hidden=(32,)), seed=1)
    x = tf.constant(x_real[:8])
    mean, log_scale = model.encoder_params(x * 3.0)
    np.testing.assert_allclose(gaussian_kl_to_standard(mean, log_scale).numpy(),
                               tfd.kl_divergence(model.posterior(mean, log_scale), model.prior).numpy(), rtol=1e-5)
    z = model.encode(x).sample(2, seed=(1, 2))
    np.testing.assert_allclose(neg_log_likelihood(model, z, x).numpy(), -model.decode(z).log_prob(x).numpy(),
                               rtol=1e-5)


def test_closed_form_is_ignored_where_none_is_written(x_real):
    """Estimator A and the beta-binomial decoder keep the TFP path (bit-identical with closed_form=True)."""
    x = tf.constant(x_real[:8])
    model = VAE(ModelConfig(latent_dim=3, hidden=(16,), likelihood="beta_binomial"), seed=0)
    assert "beta_binomial" not in CLOSED_FORM_LIKELIHOODS
    for m, est in ((model, "B"), (VAE(ModelConfig(latent_dim=3, hidden=(16,)), seed=0), "A")):
        a = elbo(m, x, estimator=est, seed=1, closed_form=True)["elbo"].numpy()
        b = elbo(m, x, estimator=est, seed=1)["elbo"].numpy()
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="beta_binomial"):
        neg_log_likelihood(model, tf.zeros([8, 3]), x)


@pytest.mark.parametrize("estimator", ["A", "B"])
def test_gradients_flow_through_the_reparameterisation(estimator, x_real):
    model = VAE(ModelConfig(latent_dim=4, hidden=(32,)), seed=0)
    x = tf.constant(x_real[:8])
    with tf.GradientTape() as tape:
        # distortion alone depends on the encoder only through z = mu + sigma * eps
        d = tf.reduce_mean(elbo(model, x, estimator=estimator, seed=3)["distortion"])
    grads = tape.gradient(d, model.encoder.trainable_variables)
    assert all(g is not None for g in grads)
    assert all(float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads)


def test_elbo_terms_add_up_and_are_per_record(x_real):
    model = VAE(ModelConfig(latent_dim=3, hidden=(16,)), seed=0)
    t = elbo(model, tf.constant(x_real[:5]), estimator="B", num_samples=3, seed=0)
    assert t["elbo"].shape == (5,)
    np.testing.assert_allclose(t["elbo"], -(t["rate"] + t["distortion"]), rtol=1e-6)
    assert (t["rate"].numpy() >= 0).all()


def test_same_seed_gives_same_estimate(x_real):
    model = VAE(ModelConfig(latent_dim=3, hidden=(16,)), seed=0)
    e1 = elbo(model, x_real[:5], estimator="A", num_samples=2, seed=11)["elbo"].numpy()
    e2 = elbo(model, x_real[:5], estimator="A", num_samples=2, seed=11)["elbo"].numpy()
    np.testing.assert_array_equal(e1, e2)


def test_unknown_estimator_is_a_config_error(x_real):
    with pytest.raises(ConfigError, match="estimator"):
        elbo(VAE(ModelConfig(latent_dim=2, hidden=(8,))), tf.constant(x_real[:2]), estimator="C")


def test_importance_sampled_bound_is_above_the_elbo_and_grows_with_k(small_model, mnist_test):
    model = small_model.model
    x = (mnist_test[:200].reshape(200, -1) / 255.0).astype(np.float32)
    elbo_b = elbo(model, x, estimator="B", num_samples=50, seed=0)["elbo"].numpy().mean()
    ll = {k: log_likelihood(model, x, k=k, seed=5).mean() for k in (1, 10, 100, 1000)}
    assert abs(ll[1] - elbo_b) < 2.0  # k = 1 is the ELBO (estimator A) in expectation
    assert ll[10] > elbo_b and ll[100] > ll[10] and ll[1000] > ll[100]
    assert ll[1000] - elbo_b < 30  # a tighter bound, not a different quantity


def test_log_likelihood_memory_bound_chunks_the_samples_without_changing_the_answer(small_model, mnist_test):
    model = small_model.model
    x = (mnist_test[:3].reshape(3, -1) / 255.0).astype(np.float32)
    small_chunks = log_likelihood(model, x, k=300, seed=2, max_floats=784 * 3 * 16 * 2)  # 10 chunks of 32
    one_chunk = log_likelihood(model, x, k=300, seed=2)
    np.testing.assert_allclose(small_chunks, one_chunk, rtol=1e-6)
    other_seed = log_likelihood(model, x, k=300, seed=3)
    assert not np.allclose(other_seed, one_chunk, rtol=1e-6)  # the samples do come from the seed
    np.testing.assert_allclose(other_seed, one_chunk, atol=3.0)  # ... and estimate the same quantity


def test_bits_per_dim():
    assert bits_per_dim(784 * np.log(2.0), 784) == pytest.approx(1.0)
