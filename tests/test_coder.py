"""The entropy model: bit-identical quantisation (NumPy and TF), exact integer tables, escapes, inactive dims."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vaestream.coding import range_coder
from vaestream.coding import tables as tables_mod
from vaestream.coding.range_coder import EntropyCoder
from vaestream.coding.tables import PRECISION, TOTAL, CoderTables, build_tables_from_stats, dequantize, quantize, \
    quantize_tf
from vaestream.errors import BitstreamError, ConfigError, DataError, ModelError

FP = "ab" * 32


@pytest.fixture(scope="module")
def posterior(small_model, mnist_train, mnist_test):
    """Posterior (mean, log_scale) of the small MNIST model on 10k training and 2k test records."""
    m = small_model.model

    def enc(x):
        mean, ls = m.encoder_params(tf.constant(x.reshape(len(x), -1).astype(np.float32) / 255))
        return mean.numpy(), ls.numpy()

    return {"train": enc(mnist_train[:10000]), "test": enc(mnist_test[:2000]), "fingerprint": m.fingerprint()}


@pytest.fixture(scope="module")
def tables(posterior):
    mu, ls = posterior["train"]
    return build_tables_from_stats(posterior["fingerprint"], mu, ls)


def test_numpy_and_tensorflow_quantisation_are_bit_identical(tables, posterior):
    rng = np.random.default_rng(0)
    nz = tables.latent_dim
    means = [posterior["test"][0],
             (rng.standard_normal((5000, nz)) * 4).astype(np.float32),
             np.array([[0.0] * nz, [-0.0] * nz, [1e-40] * nz, [3e38] * nz, [-3e38] * nz], np.float32)]
    for q in (tables.qualities[0], 1.0, tables.qualities[-1]):
        lv = tables.level(q)
        # exact ties k + 1/2 in the scaled domain: half to even on both sides
        ties = ((np.arange(-40, 40)[:, None] + 0.5) / tables.inv_delta[lv]).astype(np.float32)
        graph = tf.function(lambda m: quantize_tf(m, tables.as_tensors(q)),
                            input_signature=[tf.TensorSpec([None, nz], tf.float32)])
        for m in means + [ties]:
            a = quantize(m, tables, q)
            b = quantize_tf(tf.constant(m), tables.as_tensors(q)).numpy()
            c = graph(m).numpy()
            assert a.dtype == b.dtype == np.int32
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c)
    assert np.abs(quantize(means[2], tables)).max() == tables_mod.SYMBOL_LIMIT  # clipped, never overflowed


def test_dequantised_codes_are_within_half_a_bin_of_the_posterior_mean(tables, posterior):
    mu = posterior["test"][0]
    for q in tables.qualities:
        z = dequantize(quantize(mu, tables, q), tables, q)
        lv = tables.level(q)
        # half a bin, up to float32 rounding of mu and z (a mean near a bin edge can sit one ulp past it)
        ulp = np.spacing(np.maximum(np.abs(mu), np.abs(z)).astype(np.float32))
        assert np.all(np.abs(z - mu) <= tables.delta[lv] / 2 * (1 + 1e-6) + 2 * ulp)


def test_tables_are_integers_summing_to_two_to_the_precision_and_round_trip_through_npz(tables, tmp_path):
    tables.validate()
    for lv in range(tables.num_levels):
        for d in tables.active_dims:
            f = tables.table(lv, d)
            assert f.dtype == np.uint32 and f.min() >= 1 and int(f.sum(dtype=np.int64)) == TOTAL
            assert len(f) == 2 * tables.half_range[lv, d] + 2  # symbols -K..K and the escape
    path = tmp_path / "t.npz"
    tables.save(path)
    with np.load(path, allow_pickle=False) as z:  # plain arrays, no pickle
        assert "freqs" in z.files
    back = CoderTables.load(path)
    assert back.digest() == tables.digest()
    np.testing.assert_array_equal(back.freqs, tables.freqs)
    np.testing.assert_array_equal(back.inv_delta, tables.inv_delta)
    assert back.fingerprint == tables.fingerprint


def test_corrupt_or_missing_tables_raise_model_error(tables, tmp_path):
    with pytest.raises(ModelError, match="no coder tables"):
        CoderTables.load(tmp_path / "absent.npz")
    good = tmp_path / "t.npz"
    tables.save(good)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ModelError, match="not a readable"):
        CoderTables.load(bad)
    arrays = dict(np.load(good))
    arrays["freqs"] = arrays["freqs"].copy()
    arrays["freqs"][0] += 1  # a table no longer sums to 2^24
    np.savez(tmp_path / "inc.npz", **arrays)
    with pytest.raises(ModelError, match="inconsistent"):
        CoderTables.load(tmp_path / "inc.npz")
    arrays = dict(np.load(good))
    arrays["format"] = np.array([99, PRECISION])
    np.savez(tmp_path / "fmt.npz", **arrays)
    with pytest.raises(ModelError, match="format"):
        CoderTables.load(tmp_path / "fmt.npz")


def test_constriction_codes_with_exactly_the_stored_integers(tables):
    # actual length within [ideal, ideal + 64 bits] for 4096 draws per dimension, at three qualities
    for q in (tables.qualities[0], 1.0, tables.qualities[-1]):
        assert range_coder.check_exact(tables, q) <= 64


@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=2, max_size=300))
@settings(max_examples=60, deadline=None)
def test_integer_frequencies_are_positive_and_sum_exactly(p):
    if sum(p) <= 0:
        p[0] = 1.0
    f = tables_mod.integer_frequencies(np.array(p))
    assert f.min() >= 1 and int(f.sum(dtype=np.int64)) == TOTAL
    # no symbol is ever given less than its share (minus one unit) of the free mass
    free = TOTAL - len(p)
    share = np.array(p) / sum(p) * free
    assert np.all(f.astype(np.float64) >= np.floor(share))


@given(hnp.arrays(np.int32, st.tuples(st.integers(1, 40), st.just(10)),
                  elements=st.one_of(st.integers(-5, 5), st.integers(-2 ** 31, 2 ** 31 - 1))))
@settings(max_examples=60, deadline=None)
def test_any_int32_symbol_round_trips_through_the_escape(sym):
    t = _synthetic_tables(10, inactive=())
    c = EntropyCoder(t, 1.0)
    payload = c.encode(sym)
    np.testing.assert_array_equal(c.decode(payload, len(sym)), sym)
    # bits >= the ideal code length (escapes: escape symbol + 32 raw bits), at most 64 bits over it
    ideal = c.ideal_bits(sym).sum()
    assert ideal - 1e-6 <= 8 * len(payload) <= ideal + 64 + 1e-6


@functools.lru_cache(maxsize=None)
def _synthetic_tables(nz: int, inactive=(1, 3), n: int = 4000, seed: int = 0) -> CoderTables:
    """Tables from synthetic posteriors: dims in ``inactive`` have posterior = prior N(0, 1)."""
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((n, nz)) * 0.9
    ls = np.full((n, nz), math.log(0.3))
    for d in inactive:
        mu[:, d] = 0.0
        ls[:, d] = 0.0
    return build_tables_from_stats(FP, mu, ls)


def test_inactive_dimensions_cost_zero_bits_and_decode_as_the_prior_mean():
    t = _synthetic_tables(6, inactive=(1, 3))
    assert t.active.tolist() == [True, False, True, False, True, True]
    assert np.all(t.kl_bits[[1, 3]] < 1e-9) and np.all(t.kl_bits[[0, 2, 4, 5]] > 1)
    rng = np.random.default_rng(1)
    mean = rng.standard_normal((200, 6)).astype(np.float32)
    sym = quantize(mean, t)
    assert np.all(sym[:, [1, 3]] == 0)
    c = EntropyCoder(t)
    scrambled = sym.copy()
    scrambled[:, [1, 3]] = rng.integers(-1000, 1000, (200, 2))  # whatever is there is not coded
    assert c.encode(scrambled) == c.encode(sym)
    np.testing.assert_array_equal(c.ideal_bits(scrambled), c.ideal_bits(sym))
    z = dequantize(sym, t)
    assert np.all(z[:, [1, 3]] == 0)
    assert all(len(t.table(lv, d)) == 0 for lv in range(t.num_levels) for d in (1, 3))


def test_inactive_dimensions_of_the_real_model_cost_zero_bits(posterior):
    """With the threshold raised above some dims' KL, those dims are dropped: their symbols are 0, their
    bits 0, their z_hat exactly the prior mean, and the rate falls by what their tables used to cost."""
    mu, ls = posterior["train"]
    full = build_tables_from_stats(posterior["fingerprint"], mu, ls)
    kl_sorted = np.sort(full.kl_bits)
    threshold = float(kl_sorted[2] + kl_sorted[3]) / 2  # the 3 least informative dims go
    part = build_tables_from_stats(posterior["fingerprint"], mu, ls, inactive_kl_bits=threshold)
    off = np.flatnonzero(~part.active)
    assert len(off) == 3 and set(off) == set(np.argsort(full.kl_bits)[:3])
    test_mu = posterior["test"][0]
    sym = quantize(test_mu, part)
    assert np.all(sym[:, off] == 0) and np.all(dequantize(sym, part)[:, off] == 0)
    c_part, c_full = EntropyCoder(part), EntropyCoder(full)
    sym_full = quantize(test_mu, full)
    lv = full.level(1.0)

    def cost(d):  # bits of dim d under the full tables: -log2(f / 2^24) of its symbols
        k = int(full.half_range[lv, d])
        assert np.all(np.abs(sym_full[:, d]) <= k)
        return PRECISION - np.log2(full.table(lv, d)[sym_full[:, d] + k].astype(np.float64))

    assert all(cost(d).mean() > 1 for d in off)  # they did cost bits before
    # the active dims keep the same tables, so the saving is exactly what the dropped dims cost
    expect = c_full.ideal_bits(sym_full) - sum(cost(d) for d in off)
    np.testing.assert_allclose(c_part.ideal_bits(sym), expect, rtol=0, atol=1e-6)
    assert 8 * len(c_part.encode(sym)) < 8 * len(c_full.encode(sym_full))


def test_aggregate_model_codes_held_out_data_in_fewer_bits_than_the_prior(posterior):
    mu, ls = posterior["train"]
    agg = build_tables_from_stats(posterior["fingerprint"], mu, ls, model="aggregate")
    pri = build_tables_from_stats(posterior["fingerprint"], mu, ls, model="prior")
    test_mu = posterior["test"][0]
    for q in (0.25, 1.0, 4.0):
        a = EntropyCoder(agg, q).ideal_bits(quantize(test_mu, agg, q)).mean()
        p = EntropyCoder(pri, q).ideal_bits(quantize(test_mu, pri, q)).mean()
        assert a < p, (q, a, p)


def test_rate_falls_with_quality_by_about_one_bit_per_dim_per_halving(tables, posterior):
    mu = posterior["test"][0]
    bits = [EntropyCoder(tables, q).ideal_bits(quantize(mu, tables, q)).mean() for q in tables.qualities]
    assert all(b1 > b2 for b1, b2 in zip(bits, bits[1:]))
    # in the fine regime, doubling the bin width saves ~1 bit per active dimension
    per_octave = (bits[0] - bits[2]) / tables.active.sum()
    assert 0.85 < per_octave < 1.15


def test_rate_against_the_kl_bound(tables, posterior):
    """At quality q the rate of a dim is about h(mu) - log2(q s); KL is about log2(1/s): with
    q = 2^(1/2 log2(2 pi e)) ~ 4.13 the two meet. Check the ordering and the gap at both ends."""
    mu, ls = posterior["test"]
    kl = np.sum(0.5 * (mu.astype(np.float64) ** 2 + np.exp(2.0 * ls) - 1 - 2 * ls), 1).mean() / math.log(2)
    n_active = int(tables.active.sum())
    r1 = EntropyCoder(tables, 1.0).ideal_bits(quantize(mu, tables, 1.0)).mean()
    r8 = EntropyCoder(tables, 8.0).ideal_bits(quantize(mu, tables, 8.0)).mean()
    assert kl < r1 < kl + 2.2 * n_active  # ~ KL + 2.05 bits per active dim at one bin per posterior std
    assert r8 < kl  # coarser than the posterior: fewer bits than the information bound


def test_bad_inputs_raise_named_errors(tables):
    with pytest.raises(DataError, match="NaN"):
        quantize(np.full((3, tables.latent_dim), np.nan, np.float32), tables)
    with pytest.raises(DataError, match="shape"):
        quantize(np.zeros((3, tables.latent_dim + 1), np.float32), tables)
    with pytest.raises(DataError, match="integers"):
        dequantize(np.zeros((3, tables.latent_dim), np.float32), tables)
    with pytest.raises(ConfigError, match="outside"):
        tables.level(100.0)
    with pytest.raises(ConfigError, match="positive"):
        tables.level(-1.0)
    c = EntropyCoder(tables)
    with pytest.raises(BitstreamError, match="32-bit words"):
        c.decode(b"\x01\x02\x03", 1)
    with pytest.raises(DataError):
        build_tables_from_stats(FP, np.zeros((1, 3)), np.zeros((1, 3)))
    with pytest.raises(ConfigError):
        build_tables_from_stats(FP, np.zeros((5, 3)), np.zeros((5, 3)), model="laplace")
