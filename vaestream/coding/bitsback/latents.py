"""The latent codes of bits-back coding (:mod:`vaestream.coding.bitsback.coder`): a uniform grid of ``2^latent_bits``
buckets on [-2^range_bits, 2^range_bits), the posterior as windowed QuantizedGaussians (:meth:`LatentModels.pop`,
:meth:`LatentModels.push`), the prior N(0, I) as one Categorical in scrambled bucket order, and a two-layer
model's conditional prior p(z|z2) over the whole grid (:meth:`LatentModels.grid`). Every model is a constriction
model, built once and cached."""

from __future__ import annotations

import numpy as np

from vaestream.coding.bitsback.tables import latent_prior, latent_scramble, latent_step_bits
from vaestream.errors import BitstreamError


class LatentModels:
    """constriction models of latent buckets, cached per grid (see the module docstring)."""

    def __init__(self):
        import constriction

        self._models = constriction.stream.model
        self._cache: dict = {}

    def prior(self, latent_bits: int, range_bits: int):
        """The prior on the ``2^latent_bits`` latent buckets, cached: one fixed Categorical over the *scrambled*
        bucket order (:func:`latent_scramble`)."""
        key = (latent_bits, range_bits)
        if key not in self._cache:
            self._cache[key] = self._models.Categorical(latent_prior(latent_bits, range_bits), perfect=False)
        return self._cache[key]

    def window(self, r: int, half: int):
        """The posterior model on the offsets [-r, r] (the whole grid [-half, half) if r == half): a
        QuantizedGaussian with per-symbol mean and std, cached."""
        key = ("window", r, half)
        if key not in self._cache:
            self._cache[key] = self._models.QuantizedGaussian(-r, r) if r < half else \
                self._models.QuantizedGaussian(-half, half - 1)
        return self._cache[key]

    def grid(self, latent_bits: int):
        """A QuantizedGaussian over the whole bucket grid (per-symbol mean and std): the conditional prior
        p(z | z2), which is only pushed and popped with known symbols, never sampled from, so its 2^-24
        per-symbol floor costs nothing noticeable (see :meth:`windows` for why sampling needs windows)."""
        half = 1 << (latent_bits - 1)
        return self.window(half, half)

    def windows(self, mean: np.ndarray, std: np.ndarray, latent_bits: int):
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

    def pop(self, ans, mean: np.ndarray, std: np.ndarray, latent_bits: int) -> np.ndarray:
        """Pop latent buckets ~ Q(z|x), class by class in ascending order (:meth:`windows`)."""
        k, c, r, classes = self.windows(mean, std, latent_bits)
        half = 1 << (latent_bits - 1)
        zi = np.empty(len(mean), np.int32)
        for cl in classes:
            idx = np.flatnonzero(k == cl)
            rr = int(r[idx[0]])
            model = self.window(rr, half)
            zi[idx] = c[idx] + ans.decode(model, mean[idx] - c[idx], std[idx])
        return zi

    def push(self, ans, zi: np.ndarray, mean: np.ndarray, std: np.ndarray, latent_bits: int) -> None:
        """Push latent buckets with Q(z|x): the exact inverse of :meth:`pop` (classes in descending order)."""
        k, c, r, classes = self.windows(mean, std, latent_bits)
        half = 1 << (latent_bits - 1)
        for cl in classes[::-1]:
            idx = np.flatnonzero(k == cl)
            rr = int(r[idx[0]])
            model = self.window(rr, half)
            d = (zi[idx] - c[idx]).astype(np.int32)
            if rr != half and (np.abs(d) > rr).any():
                raise BitstreamError("corrupt lossless frame (a latent outside its posterior window)")
            ans.encode_reverse(d, model, mean[idx] - c[idx], std[idx])

    def scramble(self, zi: np.ndarray, latent_bits: int) -> np.ndarray:
        a, _ = latent_scramble(latent_bits)
        k = (1 << latent_bits) - 1
        return (((zi.astype(np.int64) + (1 << (latent_bits - 1))) * a) & k).astype(np.int32)

    def unscramble(self, s: np.ndarray, latent_bits: int) -> np.ndarray:
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
