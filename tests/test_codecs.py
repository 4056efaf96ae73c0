"""The codec core of bits-back coding (vaestream.coding.bitsback.codecs): every codec's pop inverts its push on
real ANS messages, the combinators keep their order, and BitsBack's two directions are each other's mirror."""

from __future__ import annotations

import numpy as np
import pytest

from vaestream.coding.bitsback import codecs as cs

SEED = (np.arange(1, 41, dtype=np.uint32) * 2654435761) | np.uint32(1)


def _rows(rng, n, k):
    return rng.uniform(0.01, 1.0, (n, k)).astype(np.float32)


def _round_trip(codec, x):
    msg = codec.push(cs.message(SEED.copy()), x)
    pushed = cs.words(msg)
    msg, back = codec.pop(cs.message(pushed.copy()))
    np.testing.assert_array_equal(cs.words(msg), SEED)
    return pushed, back


def test_primitives_pop_what_they_pushed_and_restore_the_message():
    rng = np.random.default_rng(0)
    rows = _rows(rng, 500, 7)
    x = rng.integers(0, 7, 500).astype(np.int32)
    pushed, back = _round_trip(cs.Categorical(rows), x)
    np.testing.assert_array_equal(back, x)
    assert len(pushed) > len(SEED)  # it wrote bits
    fixed = np.array([0.5, 0.25, 0.125, 0.125])
    y = rng.integers(0, 4, 300).astype(np.int32)
    _, back = _round_trip(cs.Categorical(fixed, n=300, key="test fixed"), y)
    np.testing.assert_array_equal(back, y)
    p1 = rng.uniform(0.05, 0.95, 200)
    b = (rng.uniform(size=200) < p1).astype(np.int32)
    _, back = _round_trip(cs.Bernoulli(p1), b)
    np.testing.assert_array_equal(back, b)
    mean, std = rng.normal(0, 5, 100), rng.uniform(0.5, 4, 100)
    z = np.clip(np.rint(mean + std * rng.normal(size=100)), -20, 20).astype(np.int32)
    _, back = _round_trip(cs.QuantizedGaussian(-20, 20, mean, std), z)
    np.testing.assert_array_equal(back, z)


def test_a_codec_writes_what_one_constriction_call_writes():
    import constriction

    rng = np.random.default_rng(1)
    rows = _rows(rng, 64, 5)
    x = rng.integers(0, 5, 64).astype(np.int32)
    ans = constriction.stream.stack.AnsCoder(SEED.copy())
    ans.encode_reverse(x, constriction.stream.model.Categorical(perfect=False), rows)
    got = cs.words(cs.Categorical(rows).push(cs.message(SEED.copy()), x))
    np.testing.assert_array_equal(got, np.asarray(ans.get_compressed(), np.uint32))


def test_serial_pushes_in_order_and_pops_in_reverse():
    rng = np.random.default_rng(2)
    parts = [rng.integers(0, 3, n).astype(np.int32) for n in (5, 9, 1)]
    codecs = [cs.Categorical(_rows(rng, len(p), 3)) for p in parts]
    pushed, back = _round_trip(cs.serial(codecs), parts)
    for a, b in zip(back, parts):
        np.testing.assert_array_equal(a, b)
    by_hand = cs.message(SEED.copy())
    for c, p in zip(codecs, parts):
        by_hand = c.push(by_hand, p)
    np.testing.assert_array_equal(cs.words(by_hand), pushed)
    with pytest.raises(ValueError, match="2 symbol arrays for 3 codecs"):
        cs.serial(codecs).push(cs.message(SEED.copy()), parts[:2])


def test_dependent_mapped_and_autoregressive():
    rng = np.random.default_rng(3)
    n = 200
    x = rng.integers(0, 64, n).astype(np.int32)
    head_rows, tail_rows = _rows(rng, n, 8), _rows(rng, 8, 8)
    codec = cs.dependent(cs.Categorical(head_rows), lambda h: cs.Categorical(tail_rows[h]),
                         lambda v: (v >> 3, v & 7), lambda h, t: h * 8 + t)
    _, back = _round_trip(codec, x)
    np.testing.assert_array_equal(back, x)
    perm = rng.permutation(64)
    inv = np.argsort(perm)
    _, back = _round_trip(cs.mapped(codec, lambda v: perm[v].astype(np.int32), lambda v: inv[v]), x)
    np.testing.assert_array_equal(back, x)
    # a first-order Markov chain along P positions: rows of position p depend on the symbol at p - 1
    trans = _rows(rng, 4, 4)
    start = _rows(rng, 1, 4)[0]
    seqs = rng.integers(0, 4, (30, 12)).astype(np.int32)

    def rows_of(s):
        prev = np.concatenate([np.full((len(s), 1), -1), s[:, :-1]], axis=1)
        return np.where(prev[..., None] < 0, start, trans[np.maximum(prev, 0)])

    def decode(pop_position):
        out = np.empty((30, 12), np.int32)
        for p in range(12):
            out[:, p] = pop_position(np.tile(start, (30, 1)) if p == 0 else trans[out[:, p - 1]])
        return out

    _, back = _round_trip(cs.Autoregressive(rows_of, decode), seqs)
    np.testing.assert_array_equal(back, seqs)


def _toy_model(rng, nx=6, nz=4):
    """A latent variable model on tables: P(z), P(x|z), Q(z|x) (Q deliberately not the true posterior)."""
    pz = rng.uniform(0.1, 1, nz)
    px = rng.uniform(0.05, 1, (nz, nx))
    qz = rng.uniform(0.05, 1, (nx, nz))
    return pz / pz.sum(), px / px.sum(1, keepdims=True), qz / qz.sum(1, keepdims=True)


def test_bits_back_directions_are_mirrors_and_cost_the_negative_elbo():
    rng = np.random.default_rng(4)
    pz, px, qz = _toy_model(rng)
    n = 2000
    x = rng.integers(0, 6, n).astype(np.int32)
    bb = cs.BitsBack(cs.Categorical(pz, n=n, key="toy prior"), lambda z: cs.Categorical(px[z]),
                     lambda v: cs.Categorical(qz[v]))
    seed = (rng.integers(1, 2 ** 32, 4000, dtype=np.uint64)).astype(np.uint32) | np.uint32(1)
    msg = bb.push(cs.message(seed.copy()), x)
    pushed = cs.words(msg)
    msg, back = bb.pop(cs.message(pushed.copy()))
    np.testing.assert_array_equal(back, x)
    np.testing.assert_array_equal(cs.words(msg), seed)  # the borrowed bits came back exactly
    # the net cost is the negative ELBO: E_Q[-log2 P(x|z) - log2 P(z) + log2 Q(z|x)], summed
    neg_elbo = float(np.sum(qz[x] * (-np.log2(px.T[x]) - np.log2(pz) + np.log2(qz[x]))))
    assert abs(32 * (len(pushed) - len(seed)) - neg_elbo) < 0.05 * neg_elbo + 64
    # push is pop posterior, push likelihood, push prior: the same words as the three calls by hand
    m = cs.message(seed.copy())
    m, z = cs.Categorical(qz[x]).pop(m)
    m = cs.Categorical(px[z]).push(m, x)
    m = cs.Categorical(pz, n=n, key="toy prior").push(m, z)
    np.testing.assert_array_equal(cs.words(m), pushed)


def test_held_latents_are_released_through_their_own_prior():
    """Two groups, each holding its latent; the frame's prior codes both at once after the last group."""
    rng = np.random.default_rng(5)
    pz, px, qz = _toy_model(rng)
    groups = [rng.integers(0, 6, n).astype(np.int32) for n in (1, 50, 300)]
    sizes = [len(g) for g in groups]
    step = [cs.BitsBack(cs.Hold, lambda z: cs.Categorical(px[z]), lambda v: cs.Categorical(qz[v])) for _ in groups]

    def split(z):
        return tuple(np.split(z, np.cumsum(sizes)[:-1]))

    frame_prior = cs.mapped(cs.Categorical(pz, n=sum(sizes), key="toy prior"), np.concatenate, split)
    frame = cs.released(cs.serial(step), frame_prior)
    seed = (np.arange(1, 200, dtype=np.uint32) * 40503) | np.uint32(1)
    msg = frame.push(cs.message(seed.copy()), groups)
    assert msg.held == ()
    msg, back = frame.pop(cs.message(cs.words(msg).copy()))
    for a, b in zip(back, groups):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(cs.words(msg), seed)
    with pytest.raises(ValueError, match="nothing held"):
        cs.Hold.pop(cs.message(seed.copy()))


def test_one_coder_decodes_streams_of_four_kinds_from_four_threads_at_once(ctx_member, mnist_test):
    """A LosslessCoder keeps no per-frame state: one instance decodes, at the same time from 4 threads, a lossless
    stream, a K = 4 stream coded with its pixel context model, a K = 8 one and a K = 4 one without the context
    model with the ``mean`` reconstruction (each frame's levels, grid and context model passed, not stored), each
    to exactly what it decodes to alone, while a fifth thread compresses with it."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from vaestream.coding.bitsback.coder import LosslessCoder

    model, _, cm = ctx_member
    shared = LosslessCoder(model, levels=4, contexts={4: cm}, frame_records=12)
    xs = [mnist_test[30 * i:30 * i + 30] for i in range(5)]
    writers = [LosslessCoder(model, frame_records=12), shared, LosslessCoder(model, levels=8, frame_records=12),
               LosslessCoder(model, levels=4, reconstruction="mean", use_context=False, frame_records=12)]
    blobs = [w.compress(x) for w, x in zip(writers, xs)]
    want = [shared.decompress(b) for b in blobs]
    np.testing.assert_array_equal(want[0], xs[0])
    np.testing.assert_array_equal(want[2], writers[2].quantize(xs[2]))
    want_blob = shared.compress(xs[4])
    barrier = threading.Barrier(5)

    def decode(b):
        barrier.wait()
        return shared.decompress(b)

    def compress(x):
        barrier.wait()
        return shared.compress(x)

    with ThreadPoolExecutor(5) as ex:
        for _ in range(2):
            futures = [ex.submit(decode, b) for b in blobs] + [ex.submit(compress, xs[4])]
            for f, w in zip(futures, want):
                np.testing.assert_array_equal(f.result(), w)
            assert futures[-1].result() == want_blob
