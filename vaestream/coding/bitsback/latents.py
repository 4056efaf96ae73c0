"""The latent codes of bits-back coding (:mod:`vaestream.coding.bitsback.coder`): a uniform grid of ``2^latent_bits``
buckets on [-2^range_bits, 2^range_bits), as codecs (:mod:`vaestream.coding.bitsback.codecs`): the posterior as
windowed QuantizedGaussians (:func:`posterior`), the prior N(0, I) as one Categorical in scrambled bucket order
(:func:`prior`), and a two-layer model's conditional prior p(z|z2) over the whole grid (:func:`grid`).

**Latents (format 2).** Each latent dimension is cut into ``2^latent_bits`` buckets of equal width ``delta =
2^-(latent_bits - 4)`` covering [-8, 8) (default 10 bits: delta = 1/64; on the MNIST test set 8 to 13 bits code
within 0.04 % of each other, 10 the smallest); bucket j (an integer in [-2^(latent_bits-1), 2^(latent_bits-1)))
stands for z = j delta, which is what the decoder network sees. The posterior is a
:class:`constriction.stream.model.QuantizedGaussian` in bucket units (mean mu/delta, std sigma/delta per symbol; no
per-bucket table) on a window of at least +-8 sigma around its mean (one window size per power of two of
sigma/delta, :func:`windows`): constriction gives every symbol of a model at least 2^-24 of probability, and over
all 4,096 buckets that floor (2.4e-4 per latent) made about one record in 80 draw a latent far from Q and pay
hundreds of bits for it. The prior N(0, 1) over the buckets is one fixed Categorical listed in a *scrambled* bucket
order (:func:`~vaestream.coding.bitsback.tables.latent_scramble`): the next group pops its latents from the bits
the previous group's prior code just wrote, and in natural order each draw would be tied to the previous record's
latent instead of following Q. With both, the latents the chain draws follow Q (tested) and the rate sits at the
model's -ELBO.
"""

from __future__ import annotations

import numpy as np

from vaestream.coding.bitsback import codecs as cs
from vaestream.coding.bitsback.tables import latent_prior, latent_scramble, latent_step_bits
from vaestream.errors import BitstreamError


def prior(n: int, latent_bits: int, range_bits: int) -> cs.Codec:
    """``n`` latent buckets with the prior N(0, I): one fixed Categorical over the *scrambled* bucket order
    (:func:`latent_scramble`), so the symbols coded are :func:`scramble` of the buckets."""
    fixed = cs.Categorical(latent_prior(latent_bits, range_bits), n=n, key=("latent prior", latent_bits, range_bits))
    return cs.mapped(fixed, lambda zi: scramble(zi, latent_bits), lambda s: unscramble(s, latent_bits))


def grid(mean: np.ndarray, std: np.ndarray, latent_bits: int) -> cs.Codec:
    """Latent buckets with a per-symbol QuantizedGaussian over the whole bucket grid: the conditional prior
    p(z | z2), which is only pushed and popped with known symbols, never sampled from, so its 2^-24 per-symbol
    floor costs nothing noticeable (see :func:`windows` for why sampling needs windows)."""
    half = 1 << (latent_bits - 1)
    return cs.mapped(cs.QuantizedGaussian(-half, half - 1, mean, std), lambda zi: zi, lambda z: z.astype(np.int32))


def windows(mean: np.ndarray, std: np.ndarray, latent_bits: int):
    """Per latent symbol: its posterior window class, the window's centre (an integer bucket) and the
    classes present. Class k holds std in [2^k, 2^(k+1)) buckets (k = 0 also below) and codes the offset
    from the centre on [-16 * 2^k, 16 * 2^k], i.e. at least +-8 standard deviations; the top class (std of
    at least 2^(latent_bits - 5) buckets) covers the whole grid. Why: every symbol of a constriction model
    keeps at least 2^-24 of probability, so a posterior over all 2^latent_bits buckets has ~2^(latent_bits -
    24) of its mass spread uniformly over the grid, and a sample drawn there (2.4e-4 per latent at 12 bits:
    one record in 80 with 50 latents) lands far from the posterior and costs hundreds of bits of
    reconstruction (measured: +5 % rate). In a window of +-8 sigma that floor mass is ~100x smaller and its
    draws stay near the posterior. All integer arithmetic on (fixed-point) parameters."""
    half = 1 << (latent_bits - 1)
    top = latent_bits - 5
    _, e = np.frexp(std)
    k = np.clip(e - 1, 0, top)
    r = np.left_shift(16, k)
    r = np.where(k == top, half, r)
    c = np.clip(np.rint(mean).astype(np.int64), -half + r, half - 1 - r)
    c = np.where(k == top, 0, c)
    return k, c, r, np.unique(k)


def posterior(mean: np.ndarray, std: np.ndarray, latent_bits: int) -> cs.Codec:
    """Latent buckets ``[N]`` with Q(z|x) (``mean``, ``std`` in buckets): the offset from each symbol's window
    centre, one QuantizedGaussian per window class (:func:`windows`), pushed in descending class order and so
    popped in ascending order."""
    k, c, r, classes = windows(mean, std, latent_bits)
    half = 1 << (latent_bits - 1)
    parts = []
    for cl in classes[::-1]:
        idx = np.flatnonzero(k == cl)
        rr = int(r[idx[0]])
        lo, hi = (-rr, rr) if rr < half else (-half, half - 1)
        parts.append((idx, rr, cs.QuantizedGaussian(lo, hi, mean[idx] - c[idx], std[idx])))

    def offsets(zi: np.ndarray) -> list:
        out = []
        for idx, rr, _ in parts:
            d = (zi[idx] - c[idx]).astype(np.int32)
            if rr != half and (np.abs(d) > rr).any():
                raise BitstreamError("corrupt lossless frame (a latent outside its posterior window)")
            out.append(d)
        return out

    def buckets(ds: list) -> np.ndarray:
        zi = np.empty(len(mean), np.int32)
        for (idx, _, _), d in zip(parts, ds):
            zi[idx] = c[idx] + d
        return zi

    return cs.mapped(cs.serial([m for _, _, m in parts]), offsets, buckets)


def scramble(zi: np.ndarray, latent_bits: int) -> np.ndarray:
    """Buckets -> their places in the prior's scrambled order (:func:`latent_scramble`)."""
    a, _ = latent_scramble(latent_bits)
    k = (1 << latent_bits) - 1
    return (((zi.astype(np.int64) + (1 << (latent_bits - 1))) * a) & k).astype(np.int32)


def unscramble(s: np.ndarray, latent_bits: int) -> np.ndarray:
    """The inverse of :func:`scramble`."""
    _, a_inv = latent_scramble(latent_bits)
    k = (1 << latent_bits) - 1
    return (((s.astype(np.int64) * a_inv) & k) - (1 << (latent_bits - 1))).astype(np.int32)


def posterior_kl_nats(mean: np.ndarray, std: np.ndarray, latent_bits: int, range_bits: int) -> np.ndarray:
    """KL( N(mu, sigma^2) || N(0, 1) ) of each latent, nats, elementwise: ``mean``, ``std`` in buckets of the
    latent grid (``2^-latent_step_bits`` each, as :meth:`vaestream.coding.bitsback.coder.LosslessCoder._posterior` gives
    them) -> ``mu``, ``sigma``."""
    delta = np.ldexp(1.0, -latent_step_bits(latent_bits, range_bits))
    mu, sigma = np.asarray(mean) * delta, np.asarray(std) * delta
    return 0.5 * (mu * mu + sigma * sigma - 1.0) - np.log(sigma)
