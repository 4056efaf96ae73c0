"""The entropy model: quantised latent codes and their integer probability tables
(:mod:`vaestream.coding.range_coder` codes symbols with them).

A record ``x`` is coded by the mean of its posterior, mu(x) = E[z | x] (shape ``[Nz]``), quantised per
latent dimension ``i`` with a uniform bin of width

    delta_i = quality * s_i,      s_i = sqrt(mean_n sigma_i(x_n)^2)   (the RMS posterior std, calibration set)

so ``quality = 1`` puts one bin per posterior standard deviation (quantisation noise variance
delta^2 / 12 = s^2 / 12, well inside the posterior's own uncertainty); smaller is finer (near-lossless in
latent space), larger is coarser. The symbol of dimension ``i`` is ``q_i = round(mu_i / delta_i)``,
computed as ``rint(mu_i * (1 / delta_i))`` in float32 with the reciprocal stored as float32, so NumPy
(:func:`quantize`) and TensorFlow (:func:`quantize_tf`) give bit-identical integers on any IEEE machine
(one correctly-rounded multiply, round-half-to-even). The reconstruction is ``z_hat_i = q_i * delta_i``.

**Inactive dimensions.** A dimension whose mean KL(q(z_i|x) || N(0, 1)) over the calibration set is below
``inactive_kl_bits`` carries (almost) no information (posterior ~ prior). It is not coded at all (0 bits)
and decodes as the prior mean, 0.

**The probability model** of an active dimension is the aggregate distribution of its posterior means over
the calibration records, p_i(u) = (1 - eps) * KDE_h(u; {mu_i(x_n)}) + eps * N(u; mean, (4 std)^2): a
Gaussian kernel density estimate (Silverman bandwidth h) of the very quantity that is coded, plus a wide
Gaussian tail so that no value, however unusual, has a vanishing probability. Integrated over the bins
[(k - 1/2) delta, (k + 1/2) delta] for k in [-K, K] (K chosen so the mass outside is below 2^-16), plus
one *escape* symbol for the mass outside, and quantised to integer frequencies f_k >= 1 that sum to
exactly 2^24 (constriction's precision). The prior N(0, 1) is the alternative (``model="prior"``); it is
well defined too, but the posterior means of a trained VAE are not N(0, 1) (their variance is
1 - E[sigma^2] and their marginal is multi-modal), so the aggregate model codes real data in fewer bits
(see benchmarks/RESULTS_coder.md).

**Escapes.** A symbol outside [-K, K] is coded as the escape symbol followed by its 32-bit two's-complement
value in two uniform 16-bit symbols: nothing is ever clipped silently.

**Bit-exactness.** Decoding uses only the stored integers: the table is handed to
``constriction.stream.model.Categorical(f - 1, perfect=False)``, whose fast quantiser then computes the
left cumulative of symbol k as ``floor(C_k * scale) + k`` with ``C_k = sum_{j<k} (f_j - 1)`` and
``scale = (2^24 - n) / sum_j (f_j - 1) = 1`` exactly; every operand is an integer below 2^53, so the
model constriction uses is exactly ``f`` on every machine (checked by :func:`vaestream.coding.range_coder.check_exact`).

**Quality ladder.** A :class:`CoderTables` holds tables for a ladder of qualities (by default
2^(k/2), k = -12 ... 6, i.e. 1/64 ... 8), all derived once from the model and calibration data, so rate
control (a quality or a target number of bits) needs no calibration data at coding time.

Shapes: ``mean`` and ``symbols`` are ``[B, Nz]``; a ladder of L levels gives ``delta`` of shape ``[L, Nz]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vaestream.binio import atomic_write
from vaestream.errors import ConfigError, DataError, ModelError

TABLES_FORMAT = 1
PRECISION = 24
"""Probabilities are integers out of 2^PRECISION (constriction's default coders use 24-bit models)."""
TOTAL = 1 << PRECISION
SYMBOL_LIMIT = 1 << 30
"""Quantised symbols are clipped to [-2^30, 2^30] (only reachable with |mu| / delta > 10^9)."""
MAX_HALF_RANGE = 1 << 15
"""At most 2^16 + 1 regular symbols per dimension; values beyond them are escaped."""
TAIL_MASS = 2.0 ** -16
"""The half range K of a dimension is the smallest with modelled mass outside [-K, K] below this."""
DEFAULT_QUALITIES = tuple(2.0 ** (k / 2) for k in range(-12, 7))
DEFAULT_QUALITY = 1.0
ESCAPE_BITS = 32


@dataclasses.dataclass(frozen=True)
class CoderTables:
    """Integer entropy-coding tables of one model, for a ladder of qualities.

    Attributes:
      fingerprint: the 64-hex fingerprint of the model they were built for.
      scale: s, float32 ``[Nz]``: RMS posterior standard deviation per dimension (calibration set).
      active: bool ``[Nz]``: dimensions that are coded (mean KL >= the threshold).
      kl_bits: float64 ``[Nz]``: mean KL(q(z_i|x) || p(z_i)) per dimension over the calibration set, in bits.
      qualities: float64 ``[L]``: the ladder, increasing (coarser).
      delta: float32 ``[L, Nz]``: bin widths delta = quality * s (1 for inactive dimensions).
      inv_delta: float32 ``[L, Nz]``: float32(1 / delta), what quantisation multiplies by.
      half_range: int32 ``[L, Nz]``: K; regular symbols are -K..K (index k + K), index 2K + 1 is the escape.
        0 for inactive dimensions.
      offsets: int64 ``[L, Nz + 1]``: where each dimension's frequencies start in ``freqs`` (level-major).
      freqs: uint32 ``[sum]``: the frequencies, each >= 1, summing to 2^24 per (level, active dimension).
      model: ``"aggregate"`` or ``"prior"`` (how the frequencies were made; informative only).
      inactive_kl_bits: the threshold used.
    """

    fingerprint: str
    scale: np.ndarray
    active: np.ndarray
    kl_bits: np.ndarray
    qualities: np.ndarray
    delta: np.ndarray
    inv_delta: np.ndarray
    half_range: np.ndarray
    offsets: np.ndarray
    freqs: np.ndarray
    model: str = "aggregate"
    inactive_kl_bits: float = 0.1

    # -- shape and lookup -----------------------------------------------------------------------------------
    @property
    def latent_dim(self) -> int:
        return int(self.scale.shape[0])

    @property
    def num_levels(self) -> int:
        return int(self.qualities.shape[0])

    @property
    def active_dims(self) -> np.ndarray:
        """Indices of the coded dimensions, increasing."""
        return np.flatnonzero(self.active)

    def level(self, quality: float | None) -> int:
        """The ladder index of ``quality`` (None: the default quality 1.0, or the level nearest to it).

        A quality between ladder steps is taken to the nearest step in log scale (``qualities[level]`` is
        what is used); a quality outside the ladder raises :class:`ConfigError`.
        """
        q = DEFAULT_QUALITY if quality is None else quality
        if not (isinstance(q, (int, float, np.floating, np.integer)) and math.isfinite(q) and q > 0):
            raise ConfigError(f"quality must be a positive number, got {quality!r}")
        lq = np.log(self.qualities)
        i = int(np.argmin(np.abs(lq - math.log(q))))
        step = float(np.max(np.diff(lq))) if len(lq) > 1 else 0.0
        if abs(lq[i] - math.log(q)) > step / 2 + 1e-9:
            raise ConfigError(f"quality {q:g} is outside the tables' ladder [{self.qualities[0]:g}, "
                              f"{self.qualities[-1]:g}] (rebuild the tables with build_tables(qualities=...))")
        return i

    def table(self, level: int, dim: int) -> np.ndarray:
        """The uint32 frequencies of (level, dim): ``2K + 2`` entries (symbols -K..K, then the escape)."""
        return self.freqs[self.offsets[level, dim]:self.offsets[level, dim + 1]]

    # -- identity -------------------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "format": np.array([TABLES_FORMAT, PRECISION], np.int64),
            "fingerprint": np.frombuffer(bytes.fromhex(self.fingerprint), np.uint8),
            "scale": np.ascontiguousarray(self.scale, "<f4"),
            "active": np.ascontiguousarray(self.active, np.uint8),
            "kl_bits": np.ascontiguousarray(self.kl_bits, "<f8"),
            "qualities": np.ascontiguousarray(self.qualities, "<f8"),
            "delta": np.ascontiguousarray(self.delta, "<f4"),
            "inv_delta": np.ascontiguousarray(self.inv_delta, "<f4"),
            "half_range": np.ascontiguousarray(self.half_range, "<i4"),
            "offsets": np.ascontiguousarray(self.offsets, "<i8"),
            "freqs": np.ascontiguousarray(self.freqs, "<u4"),
            "model": np.frombuffer(self.model.encode(), np.uint8),
            "inactive_kl_bits": np.array([self.inactive_kl_bits], "<f8"),
        }

    def digest(self) -> bytes:
        """SHA-256 (32 bytes) of everything that decoding depends on (the container stores 16 of them)."""
        h = hashlib.sha256(b"vaestream-coder-tables")
        arrays = self._arrays()
        for name in ("format", "fingerprint", "active", "qualities", "delta", "half_range", "offsets", "freqs"):
            a = arrays[name]
            h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.tobytes())
        return h.digest()

    # -- storage --------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the tables to ``path`` as a compressed ``.npz`` (plain arrays, no pickle), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez_compressed(buf, **self._arrays())
        atomic_write(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CoderTables":
        """Read tables written by :meth:`save`; a missing, corrupt or inconsistent file raises ModelError."""
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: no coder tables (build them with vaestream.coding.codec.write_tables)")
        try:
            with np.load(path, allow_pickle=False) as z:
                a = {k: z[k] for k in z.files}
        except Exception as e:  # zipfile/ValueError/OSError on a corrupt file
            raise ModelError(f"{path}: not a readable coder-tables .npz ({e})") from e
        try:
            fmt = a["format"]
            if int(fmt[0]) != TABLES_FORMAT or int(fmt[1]) != PRECISION:
                raise ModelError(f"{path}: coder tables format {fmt.tolist()}, this vaestream reads "
                                 f"[{TABLES_FORMAT}, {PRECISION}]")
            t = cls(fingerprint=bytes(a["fingerprint"].astype(np.uint8)).hex(),
                    scale=a["scale"].astype(np.float32), active=a["active"].astype(bool),
                    kl_bits=a["kl_bits"].astype(np.float64), qualities=a["qualities"].astype(np.float64),
                    delta=a["delta"].astype(np.float32), inv_delta=a["inv_delta"].astype(np.float32),
                    half_range=a["half_range"].astype(np.int32), offsets=a["offsets"].astype(np.int64),
                    freqs=a["freqs"].astype(np.uint32), model=bytes(a["model"].astype(np.uint8)).decode(),
                    inactive_kl_bits=float(a["inactive_kl_bits"][0]))
        except KeyError as e:
            raise ModelError(f"{path}: coder tables lack array {e}") from e
        t.validate(str(path))
        return t

    def validate(self, name: str = "coder tables") -> None:
        """Check shapes and that every (level, active dim) table is >= 1 everywhere and sums to 2^24."""
        nz, nl = self.latent_dim, self.num_levels
        try:
            assert len(self.fingerprint) == 64
            assert self.active.shape == (nz,) and self.kl_bits.shape == (nz,)
            for arr in (self.delta, self.inv_delta, self.half_range):
                assert arr.shape == (nl, nz)
            assert self.offsets.shape == (nl, nz + 1)
            assert np.all(np.diff(self.qualities) > 0)
            flat = self.offsets.reshape(-1)
            assert flat[0] == 0 and flat[-1] == len(self.freqs) and np.all(np.diff(flat) >= 0)
            assert np.all(np.isfinite(self.delta)) and np.all(self.delta > 0)
            for lv in range(nl):
                for d in range(nz):
                    f = self.table(lv, d)
                    if self.active[d]:
                        k = int(self.half_range[lv, d])
                        assert 1 <= k <= MAX_HALF_RANGE and len(f) == 2 * k + 2
                        assert f.min() >= 1 and int(f.sum(dtype=np.int64)) == TOTAL
                    else:
                        assert len(f) == 0
        except AssertionError:
            raise ModelError(f"{name}: inconsistent coder tables (corrupt file?)") from None

    # -- for TensorFlow -------------------------------------------------------------------------------------
    def as_tensors(self, quality: float | None = None) -> dict[str, Any]:
        """The quantisation parameters of one ladder level as TF constants, for :func:`quantize_tf`.

        Returns ``{"inv_delta": float32 [Nz], "active": bool [Nz]}``.
        """
        import tensorflow as tf

        lv = self.level(quality)
        return {"inv_delta": tf.constant(self.inv_delta[lv], tf.float32),
                "active": tf.constant(self.active, tf.bool)}


# ---------------------------------------------------------------------------------------------------------
# quantisation
# ---------------------------------------------------------------------------------------------------------
def quantize(mean: np.ndarray, tables: CoderTables, quality: float | None = None) -> np.ndarray:
    """Symbols ``q = clip(rint(float32(mean) * inv_delta), +-2^30)`` as int32 ``[B, Nz]``; 0 where inactive.

    ``mean`` is ``[B, Nz]`` (or ``[Nz]``, giving ``[Nz]``). Non-finite means raise :class:`DataError`.
    """
    m = np.asarray(mean, dtype=np.float32)
    if m.shape[-1:] != (tables.latent_dim,):
        raise DataError(f"latent means have shape {m.shape}, expected [..., {tables.latent_dim}]")
    if not np.all(np.isfinite(m)):
        bad = np.argwhere(~np.isfinite(m.reshape(-1, tables.latent_dim)).all(axis=1))
        raise DataError(f"record {int(bad[0, 0])}: latent mean is NaN or infinite (input out of range?)")
    lv = tables.level(quality)
    with np.errstate(over="ignore"):
        v = np.rint(m * tables.inv_delta[lv])
    v = np.clip(v, -SYMBOL_LIMIT, SYMBOL_LIMIT).astype(np.int32)
    return np.where(tables.active, v, np.int32(0)).astype(np.int32)


def quantize_tf(mean, tables: Mapping[str, Any]):
    """TensorFlow twin of :func:`quantize`: int32 symbols bit-identical to the NumPy version.

    Args:
      mean: float32 tensor ``[..., Nz]`` (the encoder's posterior mean).
      tables: ``{"inv_delta": float32 [Nz], "active": bool [Nz]}`` (see :meth:`CoderTables.as_tensors`).

    Returns:
      int32 ``[..., Nz]``: ``clip(round_half_even(mean * inv_delta), +-2^30)``, 0 where inactive. A NaN
      mean gives 0 (the NumPy version raises on it instead); an infinite one is clipped like in NumPy.
    """
    import tensorflow as tf

    m = tf.convert_to_tensor(mean, tf.float32)
    v = tf.round(m * tf.cast(tables["inv_delta"], tf.float32))  # tf.round: half to even, like np.rint
    v = tf.where(tf.math.is_nan(v), tf.zeros_like(v), v)  # +-inf (overflow) is clipped like in NumPy
    v = tf.clip_by_value(v, -float(SYMBOL_LIMIT), float(SYMBOL_LIMIT))
    v = tf.cast(v, tf.int32)
    return tf.where(tf.cast(tables["active"], tf.bool), v, tf.zeros_like(v))


def dequantize(symbols: np.ndarray, tables: CoderTables, quality: float | None = None) -> np.ndarray:
    """``z_hat = float32(symbols) * delta`` (float32 ``[B, Nz]``); exactly 0 (the prior mean) where inactive."""
    s = np.asarray(symbols)
    if s.shape[-1:] != (tables.latent_dim,) or not np.issubdtype(s.dtype, np.integer):
        raise DataError(f"codes have shape {s.shape} and dtype {s.dtype}, expected integers [..., "
                        f"{tables.latent_dim}]")
    lv = tables.level(quality)
    z = s.astype(np.float32) * tables.delta[lv]
    return np.where(tables.active, z, np.float32(0)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# building the tables
# ---------------------------------------------------------------------------------------------------------
def integer_frequencies(p: np.ndarray) -> np.ndarray:
    """Probabilities (>= 0, any sum) -> uint32 frequencies >= 1 summing to exactly 2^24.

    Each symbol gets 1 plus floor(p * free) of the free mass (free = 2^24 - n); the remainder goes to the
    largest fractional parts (ties: lower index first), so the result is deterministic.
    """
    p = np.asarray(p, np.float64)
    p = p / p.sum()
    n = len(p)
    free = TOTAL - n
    x = p * free
    f = np.floor(x).astype(np.int64)
    rest = free - int(f.sum())
    if rest > 0:
        order = np.lexsort((np.arange(n), -(x - f)))
        f[order[:rest]] += 1
    f += 1
    assert f.sum() == TOTAL and f.min() >= 1
    return f.astype(np.uint32)


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    from scipy.special import ndtr

    return ndtr(x)


class _Density:
    """p(u) = (1 - eps) KDE_h(u; samples) + eps N(u; center, wide^2), with a tabulated KDE CDF."""

    def __init__(self, samples: np.ndarray, eps: float = 1e-3, grid: int = 1 << 14):
        x = np.asarray(samples, np.float64)
        n = len(x)
        std = float(np.std(x)) or 1e-3
        iqr = float(np.subtract(*np.percentile(x, [75, 25]))) / 1.349
        spread = min(std, iqr) if iqr > 0 else std
        self.h = max(0.9 * spread * n ** (-0.2), 1e-4)
        self.center = float(np.mean(x))
        self.wide = 4.0 * max(std, 1e-3)
        self.eps = eps
        lo, hi = float(x.min()) - 8 * self.h, float(x.max()) + 8 * self.h
        self.edges = np.linspace(lo, hi, grid + 1)
        counts, _ = np.histogram(x, bins=self.edges)
        step = self.edges[1] - self.edges[0]
        # smooth the histogram with the Gaussian kernel (in grid cells), then integrate to a CDF
        half = int(math.ceil(6 * self.h / step))
        t = np.arange(-half, half + 1) * step
        kern = np.exp(-0.5 * (t / self.h) ** 2)
        kern /= kern.sum()
        from scipy.signal import fftconvolve

        dens = np.maximum(fftconvolve(counts.astype(np.float64), kern, mode="same"), 0.0)
        self.cdf_grid = np.concatenate([[0.0], np.cumsum(dens)])
        self.cdf_grid /= self.cdf_grid[-1]

    def cdf(self, u: np.ndarray) -> np.ndarray:
        kde = np.interp(u, self.edges, self.cdf_grid, left=0.0, right=1.0)
        return (1 - self.eps) * kde + self.eps * _normal_cdf((u - self.center) / self.wide)


class _Prior:
    def cdf(self, u: np.ndarray) -> np.ndarray:
        return _normal_cdf(u)


def _bin_table(density, delta: float) -> tuple[int, np.ndarray]:
    """(K, probabilities of bins -K..K and of the escape) for bins [(k -+ 1/2) delta]."""
    k = 1
    while True:  # grow K until the modelled mass outside [-(K+1/2) delta, (K+1/2) delta] is small
        lo, hi = density.cdf(np.array([-(k + 0.5) * delta, (k + 0.5) * delta]))
        if lo + (1 - hi) < TAIL_MASS or k >= MAX_HALF_RANGE:
            break
        k = min(2 * k, MAX_HALF_RANGE)
    # shrink back to the smallest K that still satisfies the tail bound (binary search over [k/2, k])
    lo_k, hi_k = max(1, k // 2), k
    while lo_k < hi_k:
        mid = (lo_k + hi_k) // 2
        a, b = density.cdf(np.array([-(mid + 0.5) * delta, (mid + 0.5) * delta]))
        if a + (1 - b) < TAIL_MASS:
            hi_k = mid
        else:
            lo_k = mid + 1
    k = hi_k
    edges = (np.arange(-k, k + 2) - 0.5) * delta
    c = density.cdf(edges)
    p = np.diff(c)
    escape = c[0] + (1 - c[-1])
    return k, np.append(np.maximum(p, 0.0), max(escape, 0.0))


def build_tables_from_stats(fingerprint: str, means: np.ndarray, log_scales: np.ndarray,
                            qualities: Sequence[float] = DEFAULT_QUALITIES, model: str = "aggregate",
                            inactive_kl_bits: float = 0.1) -> CoderTables:
    """Build :class:`CoderTables` from the posterior parameters of calibration records.

    Args:
      fingerprint: the model's 64-hex fingerprint (bound into the tables and every stream).
      means, log_scales: ``[N, Nz]`` posterior means and log standard deviations of the calibration records.
      qualities: the ladder (positive, any order; stored sorted).
      model: ``"aggregate"`` (KDE of the calibration means, see the module docstring) or ``"prior"``
        (N(0, 1) integrated over the bins).
      inactive_kl_bits: dimensions with mean KL below this many bits are not coded.
    """
    mu = np.asarray(means, np.float64)
    ls = np.asarray(log_scales, np.float64)
    if mu.ndim != 2 or mu.shape != ls.shape or len(mu) < 2:
        raise DataError(f"calibration posteriors must be [N >= 2, Nz], got {mu.shape} and {ls.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(ls))):
        raise DataError("calibration posteriors have NaN or infinite values")
    if model not in ("aggregate", "prior"):
        raise ConfigError(f"model {model!r} is not one of ('aggregate', 'prior')")
    qs = np.array(sorted(float(q) for q in qualities), np.float64)
    if len(qs) == 0 or not np.all(qs > 0) or np.any(np.diff(qs) <= 0):
        raise ConfigError(f"qualities must be distinct positive numbers, got {list(qualities)}")
    nz = mu.shape[1]
    sigma2 = np.exp(2 * ls)
    # KL(N(mu, s^2) || N(0, 1)) = (mu^2 + s^2 - 1 - log s^2) / 2 nats
    kl_bits = np.mean(0.5 * (mu ** 2 + sigma2 - 1.0 - 2 * ls), axis=0) / math.log(2)
    active = kl_bits >= inactive_kl_bits
    scale = np.sqrt(np.mean(sigma2, axis=0)).astype(np.float32)
    delta = np.ones((len(qs), nz), np.float32)
    for lv, q in enumerate(qs):
        delta[lv] = np.where(active, (np.float32(q) * scale).astype(np.float32), np.float32(1))
    inv_delta = (np.float32(1) / delta).astype(np.float32)
    half = np.zeros((len(qs), nz), np.int32)
    tables: list[np.ndarray] = []
    offsets = np.zeros((len(qs), nz + 1), np.int64)
    pos = 0
    densities = {d: (_Density(mu[:, d]) if model == "aggregate" else _Prior()) for d in np.flatnonzero(active)}
    for lv in range(len(qs)):
        for d in range(nz):
            offsets[lv, d] = pos
            if active[d]:
                k, p = _bin_table(densities[d], float(delta[lv, d]))
                f = integer_frequencies(p)
                half[lv, d] = k
                tables.append(f)
                pos += len(f)
        offsets[lv, nz] = pos
    # offsets are level-major: the end of (lv, Nz-1) is the start of (lv+1, 0)
    freqs = np.concatenate(tables) if tables else np.zeros(0, np.uint32)
    t = CoderTables(fingerprint=fingerprint, scale=scale, active=active, kl_bits=kl_bits, qualities=qs,
                    delta=delta, inv_delta=inv_delta, half_range=half, offsets=offsets,
                    freqs=freqs.astype(np.uint32), model=model, inactive_kl_bits=float(inactive_kl_bits))
    t.validate()
    return t
