"""The bits-back chain of a frame (:mod:`vaestream.coding.bitsback.coder`): its schedule (group sizes, the slower
ramp a frame coded with a pixel context model needs, the deterministic initial stack it starts from), and its one
description as codecs (:class:`Chain`: the networks' Q(z|x), P(x|z), ... as :mod:`~vaestream.coding.bitsback.codecs`,
a :func:`~vaestream.coding.bitsback.codecs.BitsBack` step per group), with the parameters of a frame
(:class:`Frame`) passed to every step."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from typing import TYPE_CHECKING

import numpy as np

from vaestream.coding.bitsback import codecs as cs
from vaestream.coding.bitsback import latents
from vaestream.coding.bitsback.latents import posterior_kl_nats
from vaestream.coding.bitsback.tables import (BIN, FIX_BITS, bin_rows, fixed_point, grid_cells, latent_step_bits,
                                              level_means, level_rows, pixel_levels, within_rows)
from vaestream.config import DISCRETE_LEVELS
from vaestream.errors import ModelError

if TYPE_CHECKING:
    from vaestream.coding.bitsback.context import ContextModel

EXACT_LEVELS = DISCRETE_LEVELS + 1
"""``levels`` of exact (lossless) coding: every count 0..255 is its own level (stored as 0 in a frame header)."""
RECONSTRUCTIONS = ("level", "mean", "learned")
"""How a near-lossless decoder turns a level into a count: ``level``, its value (every pixel within
``max_error(K)``); ``mean``, E[n | level, z] under the model (the MMSE count within the level's counts, for the
z the chain drew: more PSNR at the same bits, within the level's counts but not within ``max_error``);
``learned``, the context model's reconstruction network on the pixel's neighbourhood of levels and means
(:meth:`vaestream.coding.bitsback.context.ContextModel.reconstruct`: more PSNR again, still within the level's counts;
needs a context model that has one, and codes with it)."""
_MEAN, _LEARNED = RECONSTRUCTIONS.index("mean"), RECONSTRUCTIONS.index("learned")


def group_sizes(n: int, group: int, ramp: int = 0) -> list[int]:
    """The chain's group sizes for ``n`` records: a ramp from 1 up to ``group``, then ``group`` (the last one
    shorter): only the first group, one record, borrows initial bits. Each ramp step grows the size ``s`` by
    ``max(1, s >> ramp)``: ``ramp`` 0 doubles it (1, 2, 4, ...), ``ramp`` r by a factor of about 1 + 2^-r
    (:func:`chain_ramp` says why a chain may need that)."""
    sizes, s, left = [], 1, n
    while left > 0:
        k = min(s, left)
        sizes.append(k)
        left -= k
        s = min(s + max(1, s >> ramp), group)
    return sizes


MAX_RAMP = 7
"""The slowest ramp a frame may ask for: sizes grow by 1/128 per group."""


def chain_ramp(mean: np.ndarray, std: np.ndarray, latent_bits: int, range_bits: int, margin: float = 0.75) -> int:
    """The ramp (:func:`group_sizes`) a frame coded with a pixel context model needs, from its posteriors
    (``mean``, ``std`` in buckets, ``[n * Nz]`` each, as
    :meth:`vaestream.coding.bitsback.coder.LosslessCoder._posterior` gives them).

    Group ``t + 1`` pops its latents from the top of the stack: first the ~``g_t (H + KL)`` bits group ``t``'s
    latents wrote with the prior (``H`` the posterior's entropy on the grid, ``KL`` its divergence from the
    prior, bits per record), then group ``t``'s pixels. A context model pushes a picture's first (background)
    positions, position-major, within 2^-20 of probability 1: thousands of symbols that add almost no bits and
    leave the ANS state's low bits unmixed, so latents popped there miss Q (Fashion-MNIST, K = 3, doubling
    groups: z-scores spread 1.6-2.2, 315 instead of 292 bits per image). So a group may outgrow the previous
    one only by what the prior code leaves over, ``g_{t+1} H <= g_t (H + KL)``: a factor ``1 + 2^-r <= 1 +
    margin KL / H``. Returns the smallest such ``r`` (0 when doubling is safe, at most :data:`MAX_RAMP`)."""
    kl = float(np.sum(posterior_kl_nats(mean, std, latent_bits, range_bits))) / np.log(2.0)
    h = float(np.sum(np.maximum(np.log2(np.asarray(std) * np.sqrt(2.0 * np.pi * np.e)), 0.0)))
    if h <= 0.0 or margin * kl >= h:
        return 0
    return int(min(MAX_RAMP, np.ceil(np.log2(h / (margin * max(kl, 1e-9))))))


def seed_words(count: int) -> np.ndarray:
    """The deterministic initial ANS stack: ``count`` uint32 words, SHA-256 in counter mode over a fixed label
    (the same on every machine and NumPy version), each with its lowest bit set so none is zero."""
    blocks = (hashlib.sha256(b"vaestream lossless seed" + struct.pack("<I", i)).digest()
              for i in range((count + 7) // 8))
    words = np.frombuffer(b"".join(blocks), "<u4")[:count].astype(np.uint32)
    return words | np.uint32(1)


@dataclasses.dataclass(frozen=True)
class Frame:
    """The parameters of one frame's chain: the coder's own when writing, the frame head's when reading (passed
    to every step, never kept on the coder)."""

    latent_bits: int
    range_bits: int
    levels: int
    """:data:`EXACT_LEVELS` (lossless) or K (near-lossless: the records are level indices)."""
    recon: int
    """The index of the reconstruction in :data:`RECONSTRUCTIONS`."""
    context: ContextModel | None
    group: int
    ramp: int = 0

    @property
    def values(self) -> np.ndarray:
        """The K levels' counts (near-lossless frames)."""
        return pixel_levels(self.levels)[0]

    @property
    def step_bits(self) -> int:
        """log2 of 1 / the latent grid's step."""
        return latent_step_bits(self.latent_bits, self.range_bits)


class Chain:
    """The VAE's networks as the codecs of a bits-back chain: Q(z|x), P(x|z) and, with two stochastic layers,
    q(z2|z) and p(z|z2), run exactly (:class:`~vaestream.coding.bitsback.exact_mlp.ExactMLP`), and the chain of a
    frame built from them (:meth:`_chain`). A base of :class:`~vaestream.coding.bitsback.coder.LosslessCoder`,
    which sets ``config``, ``frame()`` and the networks ``_enc``, ``_dec``, ``_top_enc``, ``_top_dec``; nothing here
    changes after that."""

    # -- model parameters ------------------------------------------------------------------------------------
    def _posterior(self, x: np.ndarray, f: Frame | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Q(z | x) of int records ``[g, D]`` (levels, for a near-lossless frame ``f``; default: this coder's
        frames) on the latent grid: (mean, std) in units of buckets, float64 ``[g * Nz]`` each, from fixed-point
        network outputs (one encoder call)."""
        f = f or self.frame()
        div = float(DISCRETE_LEVELS) if self.config.likelihood == "beta_binomial" else 1.0
        if f.levels != EXACT_LEVELS:  # near-lossless: x holds levels; the encoder sees their counts
            x = f.values[x]
        return self._gaussian(self._enc(x.astype(np.float64), 0, div), f, "encoder")

    def _gaussian(self, h: np.ndarray, f: Frame, net: str) -> tuple[np.ndarray, np.ndarray]:
        """Network outputs ``[g, 2n]`` = (mean, log sigma) -> (mean, std) in units of buckets, float64 ``[g * n]``
        each, through fixed point (mean clipped to [-64, 64], log sigma to [-14, 4])."""
        if not np.isfinite(h).all():
            raise ModelError(f"the {net} produced non-finite Gaussian parameters; cannot code losslessly")
        n = h.shape[1] // 2
        k = f.step_bits
        mean = np.ldexp(fixed_point(np.clip(h[:, :n], -64.0, 64.0)).astype(np.float64), k - FIX_BITS)
        log_scale = np.ldexp(fixed_point(np.clip(h[:, n:], -14.0, 4.0)).astype(np.float64), -FIX_BITS)
        std = np.ldexp(np.exp(log_scale), k)
        return mean.reshape(-1), std.reshape(-1)

    def _top_posterior(self, zi: np.ndarray, f: Frame) -> tuple[np.ndarray, np.ndarray]:
        """q(z2 | z) of the buckets ``zi`` ``[g * Nz]`` (the value z = bucket x delta): (mean, std) in buckets,
        ``[g * N2]`` each (one top-encoder call)."""
        zq = zi.reshape(-1, self.config.latent_dim).astype(np.float64)
        return self._gaussian(self._top_enc(zq, f.step_bits), f, "top encoder")

    def _top_prior(self, z2: np.ndarray, f: Frame) -> tuple[np.ndarray, np.ndarray]:
        """p(z | z2) of the buckets ``z2`` ``[g * N2]``: (mean, std) in buckets, ``[g * Nz]`` each."""
        zq = z2.reshape(-1, self.config.top_latent_dim).astype(np.float64)
        return self._gaussian(self._top_dec(zq, f.step_bits), f, "top decoder")

    def _likelihood(self, zi: np.ndarray, f: Frame | None = None):
        """P(x | z) of bucket indices ``[g * Nz]`` (one decoder call): beta-binomial -> grid cells ``[g * D]``,
        bernoulli -> P(1) ``[g * D]`` float64."""
        f = f or self.frame()
        zq = zi.reshape(-1, self.config.latent_dim).astype(np.float64)
        h = self._dec(zq, f.step_bits)
        if not np.isfinite(h).all():
            raise ModelError("the decoder produced non-finite likelihood parameters; cannot code losslessly")
        d = self.config.input_dim
        if self.config.likelihood == "beta_binomial":
            return grid_cells(h[:, :d].reshape(-1), h[:, d:].reshape(-1))
        from scipy.special import expit

        lg = np.ldexp(fixed_point(np.clip(h.reshape(-1), -30.0, 30.0)).astype(np.float64), -FIX_BITS)
        return np.clip(expit(lg), 1e-9, 1.0 - 1e-9)

    # -- codecs ----------------------------------------------------------------------------------------------
    def _pixels(self, cells, g: int, f: Frame) -> cs.Codec:
        """P(x | z) as a codec of int records ``[g, D]``, given the pixels' likelihood parameters ``cells``."""
        d = self.config.input_dim
        if self.config.likelihood == "bernoulli":
            flat = cs.Bernoulli(cells)
        elif f.context is not None:  # the level given z and the pixels before it (position-major)
            base = level_rows(cells, f.levels)
            return cs.Autoregressive(lambda x: f.context.rows_all(base, x.reshape(-1)),
                                     lambda pop: f.context.decode_group(base, g, pop).reshape(g, d))
        elif f.levels != EXACT_LEVELS:  # the level, with the mass of its counts
            flat = cs.Categorical(lambda: level_rows(cells, f.levels))
        else:  # the count's bin (popped first), then the count within it
            flat = cs.dependent(cs.Categorical(lambda: bin_rows(cells)),
                                lambda b: cs.Categorical(lambda: within_rows(cells, b)),
                                lambda x: (x >> 4, x & (BIN - 1)), lambda b, w: b * BIN + w)
        return cs.mapped(flat, lambda x: x.reshape(-1), lambda x: x.reshape(g, d))

    def _output(self, x: np.ndarray, cells, f: Frame) -> np.ndarray:
        """Decoded symbols ``[g, D]`` -> uint8 counts ``[g, D]``: themselves (lossless), their level's value, or
        E[n | level, z] (``cells``: the pixels' grid cells), or the learned reconstruction."""
        if f.levels == EXACT_LEVELS:
            return x.astype(np.uint8)
        flat = x.reshape(-1)
        if f.recon == _MEAN:
            return level_means(cells, flat, f.levels).reshape(x.shape)
        if f.recon == _LEARNED:
            return f.context.reconstruct(flat, level_means(cells, flat, f.levels)).reshape(x.shape)
        return f.values[x]

    def _latent_posterior(self, mean: np.ndarray, std: np.ndarray, f: Frame) -> cs.Codec:
        """Q as a codec of latent buckets (:func:`vaestream.coding.bitsback.latents.posterior`)."""
        return latents.posterior(mean, std, f.latent_bits)

    def _chain(self, f: Frame, sizes: list[int], out: np.ndarray | None,
               q: tuple[np.ndarray, np.ndarray] | None = None) -> cs.Codec:
        """A frame's bits-back chain as one codec of its groups of records (a list of int ``[g, D]``): each group
        is a :func:`~vaestream.coding.bitsback.codecs.BitsBack` step, the groups in series. One layer: z pushed
        with the prior after each group. Two layers (Bit-Swap): the prior of z is itself a bits-back step, z2
        drawn from Q(z2|z) with z and z2 held aside, and the frame's held latents pushed after its last group
        with P(z|z2) and P(z2), in one call each. ``out`` (uint8 ``[n, D]``), if given, receives each group's
        output (what the decoder returns) whenever the group is pushed or popped. ``q``: the frame's Q(z|x)
        (mean, std) when the records to push are known, computed in one call (the same numbers per group)."""
        ends = np.cumsum(sizes)
        nz = self.config.latent_dim

        def posterior(t: int):
            if q is None:
                return lambda x: self._latent_posterior(*self._posterior(x, f), f)
            sl = slice((int(ends[t]) - sizes[t]) * nz, int(ends[t]) * nz)
            return lambda x: self._latent_posterior(q[0][sl], q[1][sl], f)

        def likelihood(t: int):
            start, end = int(ends[t]) - sizes[t], int(ends[t])

            def codec(zi):
                cells = self._likelihood(zi, f)
                pixels = self._pixels(cells, sizes[t], f)
                if out is None:
                    return pixels

                def keep(x):
                    out[start:end] = self._output(x, cells, f)
                    return x

                return cs.Codec(lambda msg, x: pixels.push(msg, keep(x)),
                                lambda msg: (lambda m, x: (m, keep(x)))(*pixels.pop(msg)))
            return codec

        def step(prior: cs.Codec, t: int) -> cs.Codec:
            bb = cs.BitsBack(prior, likelihood(t), posterior(t))
            # with ``out``, a group's records are kept there; pop drops them at once (memory: one group at a time)
            return bb if out is None else cs.mapped(bb, lambda x: x, lambda x: None)

        if self._top_enc is None:
            return cs.serial([step(latents.prior(g * nz, f.latent_bits, f.range_bits), t)
                              for t, g in enumerate(sizes)])
        top = cs.BitsBack(cs.Hold, lambda z2: cs.Hold,
                          lambda zi: self._latent_posterior(*self._top_posterior(zi, f), f))
        groups = cs.serial([step(top, t) for t in range(len(sizes))])
        if not sizes:
            return groups
        n = int(ends[-1])
        frame_prior = cs.dependent(latents.prior(n * self.config.top_latent_dim, f.latent_bits, f.range_bits),
                                   lambda z2: latents.grid(*self._top_prior(z2, f), f.latent_bits),
                                   lambda held: (np.concatenate(held[1::2]), np.concatenate(held[0::2])),
                                   lambda z2, zi: self._held(zi, z2, sizes))
        return cs.released(groups, frame_prior)

    def _held(self, zi: np.ndarray, z2: np.ndarray, sizes: list[int]) -> tuple:
        """A frame's latents ``[n * Nz]`` and ``[n * N2]`` -> the held tuple (z, z2 of group 0, z, z2 of group 1,
        ...) that its groups take back."""
        cut = np.cumsum(sizes)[:-1]
        zs = np.split(zi, cut * self.config.latent_dim)
        z2s = np.split(z2, cut * self.config.top_latent_dim)
        return tuple(a for pair in zip(zs, z2s) for a in pair)
