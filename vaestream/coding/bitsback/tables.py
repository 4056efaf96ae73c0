"""The probability models bits-back coding uses (:mod:`vaestream.coding.bitsback.coder`), as integer-exact tables.

* Format 2 (what the coder writes): the precomputed BetaBinomial(255, alpha, beta) grid over (u, v) =
  (log alpha - log beta, log(alpha + beta)) with each pixel coded as its bin ``n // 16`` and then ``n % 16``
  (:func:`beta_binomial_grid`, :func:`grid_cells`, :func:`bin_rows`, :func:`within_rows`), and the uniform
  latent grid with the scrambled N(0, 1) prior (:func:`latent_step_bits`, :func:`latent_scramble`,
  :func:`latent_prior`). Network outputs are rounded to fixed point (:func:`fixed_point`, 2^-FIX_BITS)
  before anything is built from them, so both sides build the same rows.
* The exact per-pixel pmfs the grid is built from: :func:`beta_binomial_probs`.

**Likelihood tables (format 2).** A beta-binomial pixel is coded in two steps, its bin ``n // 16`` (16 bins) and
then ``n % 16`` given the bin, each a 16-entry :class:`constriction.stream.model.Categorical` row, instead of one
256-entry row per pixel. The rows are not computed per pixel: (log alpha, log beta) are rounded to fixed point
(2^-12), mapped to u = log alpha - log beta (the log-odds of the mean, clipped to [-16, 16], steps of 1/32) and v =
log(alpha + beta) (the log concentration, clipped to [-4, 12], steps of 1/8), and the pixel takes the rows of the
nearest cell of a precomputed 1025 x 129 grid of BetaBinomial(255, alpha, beta) tables (:func:`beta_binomial_grid`,
built once per process in float64, ~76 MB). The grid model is a slightly different model from the network's exact
beta-binomial: it costs 0.01 % of the rate on MNIST and 0.03 % on Fashion-MNIST (reconstruction term at the same
latents: 3.3063 vs 3.3054 bits/dim; bilinear interpolation between cells, tried on an earlier grid, was no better
and 2-4x slower). constriction turns each row deterministically into integer frequencies summing to 2^24 (at least
1 each). Bernoulli pixels use :class:`constriction.stream.model.Bernoulli` with P(1) = sigmoid of the fixed-point
logit.
"""

from __future__ import annotations

import numpy as np

from vaestream.config import DISCRETE_LEVELS

_LOG_CLIP = 30.0  # log alpha and log beta are clipped to [-30, 30] in the exact pmfs


# ------------------------------------------------------------------------------------------------------------
# the exact beta-binomial pmfs the grid is built from
# ------------------------------------------------------------------------------------------------------------
_LOG_BINOM = None


def _log_binom() -> np.ndarray:
    global _LOG_BINOM
    if _LOG_BINOM is None:
        from scipy.special import gammaln

        n = np.arange(DISCRETE_LEVELS + 1, dtype=np.float64)
        _LOG_BINOM = gammaln(DISCRETE_LEVELS + 1.0) - gammaln(n + 1.0) - gammaln(DISCRETE_LEVELS + 1.0 - n)
    return _LOG_BINOM


def _bb_logpmf(log_alpha: np.ndarray, log_beta: np.ndarray) -> np.ndarray:
    """Unnormalised log BetaBinomial(255, alpha, beta) pmfs ``[N, 256]`` (row maximum 0), log alpha and log beta
    clipped to [-30, 30]: ``log C(255, n) + sum_(j<n) log(alpha + j) + sum_(j<255-n) log(beta + j)``."""
    la = np.clip(np.asarray(log_alpha, np.float64).reshape(-1), -_LOG_CLIP, _LOG_CLIP)
    lb = np.clip(np.asarray(log_beta, np.float64).reshape(-1), -_LOG_CLIP, _LOG_CLIP)
    j = np.arange(DISCRETE_LEVELS, dtype=np.float64)
    out = np.empty((la.shape[0], DISCRETE_LEVELS + 1), np.float64)
    out[:, 0] = 0.0
    np.cumsum(np.log(np.exp(la)[:, None] + j), axis=1, out=out[:, 1:])
    cb = np.cumsum(np.log(np.exp(lb)[:, None] + j), axis=1)
    out[:, :DISCRETE_LEVELS] += cb[:, ::-1]
    out += _log_binom()
    out -= out.max(axis=1, keepdims=True)
    return out


def beta_binomial_probs(log_alpha: np.ndarray, log_beta: np.ndarray) -> np.ndarray:
    """Unnormalised BetaBinomial(255, alpha, beta) pmfs: ``[N, 256]`` float64 (row maximum 1) for ``[N]`` inputs.

    ``log P(n) = log C(255, n) + sum_(j<n) log(alpha + j) + sum_(j<255-n) log(beta + j)`` (+ a constant per row,
    removed by subtracting the row maximum), with log alpha and log beta clipped to [-30, 30]. (A reference: the
    coder reads these pmfs from the precomputed grid of :func:`beta_binomial_grid`.)
    """
    return np.exp(_bb_logpmf(log_alpha, log_beta))


# ------------------------------------------------------------------------------------------------------------
# format 2: the precomputed beta-binomial grid and the uniform latent grid
# ------------------------------------------------------------------------------------------------------------
GRID_U = (-16.0, 16.0, 5)
"""The grid's first axis: u = log alpha - log beta (the log-odds of the pixel's mean), clipped to [-16, 16], in
steps of 2^-5 (1/16 cost Fashion-MNIST 0.02 % more; MNIST cannot tell them apart)."""
GRID_V = (-4.0, 12.0, 3)
"""The grid's second axis: v = log(alpha + beta) (the log concentration), clipped to [-4, 12], in steps of
2^-3 (above 12 the pmf is the binomial's to ~1e-3, below -4 all but ~2 % of the mass sits on 0 and 255)."""
FIX_BITS = 12
"""Network outputs are rounded to multiples of 2^-FIX_BITS (fixed point) before anything is built from them."""
WITHIN_ONE = 65535.0
BIN = 16
"""Pixel counts are coded in two steps: the bin ``n // 16`` (16 bins), then ``n % 16`` given the bin."""
_GRID_CACHE: dict = {}


def grid_axis(spec: tuple) -> np.ndarray:
    lo, hi, bits = spec
    return lo + np.arange(int(round((hi - lo) * (1 << bits))) + 1, dtype=np.float64) / (1 << bits)


def grid_shape() -> tuple[int, int]:
    return len(grid_axis(GRID_U)), len(grid_axis(GRID_V))


def _grid_params() -> tuple[np.ndarray, np.ndarray]:
    """(log alpha, log beta) of every grid cell, float64 ``[cells]`` each, in cell order ``i_u * 129 + i_v``."""
    u, v = grid_axis(GRID_U), grid_axis(GRID_V)
    uu, vv = np.repeat(u, len(v)), np.tile(v, len(u))
    return vv - np.logaddexp(0.0, -uu), vv - np.logaddexp(0.0, uu)


def beta_binomial_grid() -> tuple[np.ndarray, np.ndarray]:
    """The beta-binomial tables on the grid of (u, v) = (log alpha - log beta, log(alpha + beta)) of
    :data:`GRID_U` x :data:`GRID_V` (1025 x 129 cells; alpha = e^v sigmoid(u), beta = e^v sigmoid(-u)):
    ``(bins [cells, 16] float32, within [cells * 16, 16] uint16)``, where ``bins[c, b]`` is P(n // 16 = b) and
    ``within[16 c + b, k] / 65535`` is P(n = 16 b + k | n // 16 = b) in cell ``c = i_u * 129 + i_v`` (a row's
    largest entry is at least 65535 / 16, so no row is all zeros; constriction gives a zero entry its smallest
    frequency). 8.5 + 67.7 MB, built once per process in float64 (~1 s), normalised in log space so that no
    bin's conditional underflows."""
    if "bb" not in _GRID_CACHE:
        la, lb = _grid_params()
        bins = np.empty((len(la), BIN), np.float32)
        within = np.empty((len(la), BIN, BIN), np.uint16)
        for s in range(0, len(la), 2048):
            lp = _bb_logpmf(la[s:s + 2048], lb[s:s + 2048]).reshape(-1, BIN, BIN)
            m = lp.max(axis=2, keepdims=True)
            e = np.exp(lp - m)
            tot = e.sum(axis=2, keepdims=True)
            within[s:s + 2048] = np.rint(e * (WITHIN_ONE / tot))
            lbin = (m + np.log(tot))[..., 0]
            pb = np.exp(lbin - lbin.max(axis=1, keepdims=True))
            bins[s:s + 2048] = pb / pb.sum(axis=1, keepdims=True)
        _GRID_CACHE["bb"] = (bins, within.reshape(len(la) * BIN, BIN))
    return _GRID_CACHE["bb"]


def fixed_point(v: np.ndarray) -> np.ndarray:
    """float64 -> int64 fixed point in units of 2^-FIX_BITS (round half to even)."""
    return np.rint(np.ldexp(v, FIX_BITS)).astype(np.int64)


def grid_cells(log_alpha: np.ndarray, log_beta: np.ndarray) -> np.ndarray:
    """Network outputs -> the nearest grid cell of each pixel, int64 ``[N]``. log alpha and log beta are rounded
    to fixed point (2^-12) first; u = their difference is then exact integer arithmetic, v = logaddexp of the
    rounded values is rounded to fixed point again, and the cells follow by integer shifts."""
    la = fixed_point(np.clip(log_alpha, -1e4, 1e4))
    lb = fixed_point(np.clip(log_beta, -1e4, 1e4))
    vq = fixed_point(np.logaddexp(np.ldexp(la.astype(np.float64), -FIX_BITS),
                                  np.ldexp(lb.astype(np.float64), -FIX_BITS)))
    idx = []
    for q, (lo, hi, bits) in ((la - lb, GRID_U), (vq, GRID_V)):
        shift = FIX_BITS - bits
        lo_q, hi_q = int(lo * (1 << FIX_BITS)), int(hi * (1 << FIX_BITS))
        idx.append((np.clip(q, lo_q, hi_q) - lo_q + (1 << (shift - 1))) >> shift)
    nu, nv = grid_shape()
    return np.minimum(idx[0], nu - 1) * nv + np.minimum(idx[1], nv - 1)


def bin_rows(cells: np.ndarray) -> np.ndarray:
    """The bin probabilities of each pixel's cell: float32 ``[N, 16]``."""
    return np.take(beta_binomial_grid()[0], cells, axis=0)


def within_rows(cells: np.ndarray, b: np.ndarray) -> np.ndarray:
    """P(n % 16 | bin b) of each pixel's cell: float32 ``[N, 16]``."""
    return np.take(beta_binomial_grid()[1], cells * BIN + b, axis=0).astype(np.float32)


# ------------------------------------------------------------------------------------------------------------
# near-lossless: pixels quantised to K levels, coded with the beta-binomial's mass over each level's cell
# ------------------------------------------------------------------------------------------------------------
MIN_LEVELS, MAX_LEVELS = 2, 64
"""Near-lossless coding takes K = 2..64 pixel levels (K = 256, every count, is lossless coding)."""


def pixel_levels(levels: int) -> tuple[np.ndarray, np.ndarray]:
    """The K = ``levels`` reconstruction values ``round(k 255 / (K - 1))``, k = 0..K-1 (uint8; 0 and 255 are
    among them, so black and white pixels come back exact), and the level of each count 0..255 (int32 [256]:
    the nearest value, ties to the lower). Each count is then within ``max_error(K)`` of its value."""
    k = int(levels)
    if not MIN_LEVELS <= k <= MAX_LEVELS:
        raise ValueError(f"levels must be in [{MIN_LEVELS}, {MAX_LEVELS}], got {levels}")
    values = np.rint(np.arange(k, dtype=np.float64) * (DISCRETE_LEVELS / (k - 1))).astype(np.int64)
    n = np.arange(DISCRETE_LEVELS + 1, dtype=np.int64)
    cell = np.argmin(np.abs(n[:, None] - values[None, :]), axis=1).astype(np.int32)
    return values.astype(np.uint8), cell


def level_spans(levels: int) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and the highest count of each of the K = ``levels`` levels: int64 ``[K]`` each (a decoded
    ``mean`` or ``learned`` count stays within them)."""
    cell = pixel_levels(levels)[1]
    starts = np.flatnonzero(np.diff(np.concatenate([[-1], cell])))
    return starts.astype(np.int64), np.append(starts[1:] - 1, len(cell) - 1).astype(np.int64)


def max_error(levels: int) -> int:
    """The largest |count - reconstruction| that K = ``levels`` pixel levels allow (the L-infinity bound)."""
    values, cell = pixel_levels(levels)
    return int(np.max(np.abs(np.arange(DISCRETE_LEVELS + 1) - values[cell].astype(np.int64))))


def level_grid(levels: int) -> tuple[np.ndarray, np.ndarray]:
    """On every cell of the (u, v) grid (:func:`beta_binomial_grid`), for K = ``levels``:

    * P(level k) = the BetaBinomial(255, alpha, beta) mass of the counts whose nearest level is k: float32
      ``[cells, K]``, rows summing to 1;
    * E[n | level k], the count's conditional mean within its level's counts, rounded to a count: uint8
      ``[cells, K]`` (the level's value where the cell gives the level no mass in float64).

    Built once per process and K in float64 from the same pmfs as the lossless grid (~1.3 s; several K at
    once, in one pass over the pmfs: :func:`level_grids`)."""
    return level_grids([levels])[0]


def level_grids(levels_list) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`level_grid` of each K in ``levels_list``; the ones not built yet are built together, in one pass
    over the grid's pmfs (their cost is the pmfs', ~1.3 s, plus ~0.1 s per K), with the same values as one
    at a time."""
    todo = sorted({int(k) for k in levels_list if ("levels", int(k)) not in _GRID_CACHE})
    if todo:
        la, lb = _grid_params()
        n = np.arange(DISCRETE_LEVELS + 1, dtype=np.float64)
        built = {}
        for k in todo:
            values, cell = pixel_levels(k)
            starts = np.flatnonzero(np.diff(np.concatenate([[-1], cell])))  # first count of each level
            built[k] = (values, starts, np.empty((len(la), k), np.float32), np.empty((len(la), k), np.uint8))
        for s in range(0, len(la), 2048):
            lp = _bb_logpmf(la[s:s + 2048], lb[s:s + 2048])
            e = np.exp(lp)  # the row maximum is 0: no overflow, and the largest level's mass is >= 1/256
            en = e * n
            for k, (values, starts, probs, means) in built.items():
                m = np.add.reduceat(e, starts, axis=1)
                probs[s:s + 2048] = m / m.sum(axis=1, keepdims=True)
                mom = np.add.reduceat(en, starts, axis=1)
                with np.errstate(invalid="ignore", divide="ignore"):
                    cm = np.where(m > 0, mom / m, values[None, :].astype(np.float64))
                means[s:s + 2048] = np.rint(cm).astype(np.uint8)
        for k, (_, _, probs, means) in built.items():
            _GRID_CACHE[("levels", k)] = (probs, means)
    return [_GRID_CACHE[("levels", int(k))] for k in levels_list]


def level_rows(cells: np.ndarray, levels: int) -> np.ndarray:
    """P(level) of each pixel's grid cell: float32 ``[N, K]``."""
    return np.take(level_grid(levels)[0], cells, axis=0)


def level_means(cells: np.ndarray, level: np.ndarray, levels: int) -> np.ndarray:
    """E[n | level] of each pixel (its grid cell and its level, ``[N]`` each): uint8 ``[N]``, within the
    level's counts."""
    k = int(levels)
    return level_grid(k)[1].reshape(-1)[np.asarray(cells, np.int64) * k + level]


DEFAULT_RANGE_BITS = 3
"""The latent grid covers [-2^range_bits, 2^range_bits): [-8, 8) by default (one stochastic layer, prior N(0, I))."""


def latent_step_bits(latent_bits: int, range_bits: int = DEFAULT_RANGE_BITS) -> int:
    """The latent grid's step is 2^-latent_step_bits: ``2^latent_bits`` buckets cover
    [-2^range_bits, 2^range_bits) (default [-8, 8))."""
    return int(latent_bits) - 1 - int(range_bits)


def latent_scramble(latent_bits: int) -> tuple[int, int]:
    """(a, a^-1 mod 2^latent_bits): the prior codes bucket ``j`` as the symbol ``s = (j + 2^(latent_bits-1)) a
    mod 2^latent_bits``, an odd multiplier near 0.618 x 2^latent_bits, so neighbouring buckets get far-apart
    symbols. Why: in the chain the next group pops its posterior samples from the bits the previous group's
    prior code just wrote, and the quantile a pop reads is the previous latent's prior CDF position; with the
    buckets in their natural order that couples each sample to the previous record's latent, and a model whose
    aggregate posterior is not exactly the prior then draws its samples off Q (measured: up to +5 % rate on an
    under-trained model, erratic in latent_bits). In scrambled order the quantile read is ~uniform whatever
    the previous latent was, so the samples follow Q. The prior's cost per symbol is unchanged."""
    k = 1 << latent_bits
    a = int(0.6180339887498949 * k) | 1
    return a, pow(a, -1, k)


def latent_prior(latent_bits: int, range_bits: int = DEFAULT_RANGE_BITS) -> np.ndarray:
    """The prior N(0, 1) integrated over each latent bucket ``[(j - 1/2) delta, (j + 1/2) delta)``, listed in
    scrambled symbol order (:func:`latent_scramble`), float64, rounded to multiples of 2^-60 so that the fixed
    Categorical constriction builds from it does not hang on the last bit of ``ndtr``."""
    key = ("prior", latent_bits, range_bits)
    if key not in _GRID_CACHE:
        from scipy.special import ndtr

        k = 1 << latent_bits
        half = k >> 1
        j = np.arange(k, dtype=np.float64) - half
        edges = np.ldexp(np.concatenate([j - 0.5, [half - 0.5]]), -latent_step_bits(latent_bits, range_bits))
        edges[0], edges[-1] = -np.inf, np.inf
        c = ndtr(edges)
        p = np.maximum(c[1:] - c[:-1], 0.0)
        p = np.ldexp(np.rint(np.ldexp(p, 60)), -60)
        a, a_inv = latent_scramble(latent_bits)
        s = np.arange(k, dtype=np.int64)
        _GRID_CACHE[key] = np.ascontiguousarray(p[(s * a_inv) & (k - 1)])
    return _GRID_CACHE[key]
