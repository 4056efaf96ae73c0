"""vaestream's one interface to constriction (its only importer): the range coder of the lossy path, symbol
arrays <-> payload bytes with the integer tables of :mod:`vaestream.coding.tables` (:class:`EntropyCoder`: a
RangeEncoder / RangeDecoder; :func:`check_exact`, that constriction codes with exactly those integers), and the
ANS stack and models the bits-back codecs push and pop with (:func:`ans_stack`, :func:`categorical`,
:func:`bernoulli`, :func:`quantized_gaussian`: :mod:`vaestream.coding.bitsback.codecs`). Every model takes
per-symbol parameters as arrays, so a call codes a whole array of symbols."""

from __future__ import annotations

import numpy as np

from vaestream.coding.tables import ESCAPE_BITS, PRECISION, CoderTables
from vaestream.errors import BitstreamError, DataError, ModelError


def stream_module():
    """constriction's ``stream`` module, imported when first needed."""
    import constriction

    return constriction.stream


def ans_stack(words: np.ndarray | None = None):
    """An ANS stack (constriction's ``AnsCoder``: last in, first out; 32-bit words, 64-bit state) holding
    ``words`` (uint32, the last word on top), or an empty one."""
    ans = stream_module().stack.AnsCoder
    return ans() if words is None else ans(np.array(words, np.uint32))


def categorical(row: np.ndarray | None = None):
    """A categorical model with 24-bit integer frequencies (``perfect=False``: each entry at least 1): of the fixed
    probability ``row`` ``[K]``, or (None) one that takes per-symbol rows ``[N, K]`` at each call."""
    m = stream_module().model
    return m.Categorical(perfect=False) if row is None else m.Categorical(row, perfect=False)


def bernoulli():
    """A binary model that takes per-symbol P(1) ``[N]`` at each call."""
    return stream_module().model.Bernoulli(perfect=False)


def quantized_gaussian(lo: int, hi: int):
    """A Gaussian quantised to the integers of [lo, hi] that takes per-symbol means and stds ``[N]`` at each call."""
    return stream_module().model.QuantizedGaussian(int(lo), int(hi))


class EntropyCoder:
    """Range-codes symbol arrays with the integer tables of one ladder level (constriction's RangeEncoder).

    Payload layout (one range-coded stream of uint32 little-endian words): for each active dimension in
    increasing order, the B symbol indices of that dimension (column by column); then, for every escaped
    symbol in the same order, its value as two uniform 16-bit symbols (low half, high half).
    """

    def __init__(self, tables: CoderTables, quality: float | None = None):
        self.tables = tables
        self.level = tables.level(quality)
        self.quality = float(tables.qualities[self.level])
        self.dims = tables.active_dims
        self.half = tables.half_range[self.level]
        self.models = {}
        for d in self.dims:
            f = tables.table(self.level, d).astype(np.float64)
            self.models[int(d)] = categorical(f - 1.0)
        self._uniform = stream_module().model.Uniform(1 << 16)

    def _column(self, symbols: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dimension ``d``'s symbols -> (their table indices, the escape symbol 2k+1 where out of range; where they
        escape; the symbols, int64)."""
        k = int(self.half[d])
        s = symbols[:, d].astype(np.int64)
        out = (s < -k) | (s > k)
        return np.where(out, 2 * k + 1, s + k), out, s

    def _indices(self, symbols: np.ndarray) -> tuple[dict[int, np.ndarray], np.ndarray]:
        cols, escapes = {}, []
        for d in self.dims:
            idx, out, s = self._column(symbols, d)
            cols[int(d)] = idx.astype(np.int32)
            escapes.append(s[out])
        esc = np.concatenate(escapes) if escapes else np.zeros(0, np.int64)
        u = esc.astype(np.int32).view(np.uint32)
        raw = np.stack([u & 0xFFFF, u >> 16], axis=1).reshape(-1).astype(np.int32)
        return cols, raw

    def encode(self, symbols: np.ndarray) -> bytes:
        """int32 symbols ``[B, Nz]`` -> payload bytes (a whole number of 32-bit words)."""
        symbols = np.asarray(symbols)
        if symbols.ndim != 2 or symbols.shape[1] != self.tables.latent_dim:
            raise DataError(f"codes have shape {symbols.shape}, expected [B, {self.tables.latent_dim}]")
        cols, raw = self._indices(symbols)
        enc = stream_module().queue.RangeEncoder()
        for d in self.dims:
            if len(cols[int(d)]):
                enc.encode(cols[int(d)], self.models[int(d)])
        if len(raw):
            enc.encode(raw, self._uniform)
        return enc.get_compressed().astype("<u4").tobytes()

    def decode(self, payload: bytes, n: int) -> np.ndarray:
        """Payload bytes of ``n`` records -> int32 symbols ``[n, Nz]``; malformed input raises BitstreamError."""
        nz = self.tables.latent_dim
        out = np.zeros((n, nz), np.int32)
        if len(payload) % 4:
            raise BitstreamError(f"payload of {len(payload)} bytes is not a whole number of 32-bit words")
        words = np.frombuffer(payload, "<u4").astype(np.uint32)
        if n == 0 or len(self.dims) == 0:
            if len(words):
                raise BitstreamError("payload has data where none was expected")
            return out
        try:
            dec = stream_module().queue.RangeDecoder(words)
            n_esc = 0
            esc_at = []
            for d in self.dims:
                idx = np.asarray(dec.decode(self.models[int(d)], n), np.int64)
                k = int(self.half[d])
                out[:, d] = (idx - k).astype(np.int32)
                e = np.flatnonzero(idx == 2 * k + 1)
                esc_at.append((int(d), e))
                n_esc += len(e)
            if n_esc:
                raw = np.asarray(dec.decode(self._uniform, 2 * n_esc), np.int64).reshape(-1, 2)
                vals = (raw[:, 0] | (raw[:, 1] << 16)).astype(np.uint32).view(np.int32)
                i = 0
                for d, e in esc_at:
                    out[e, d] = vals[i:i + len(e)]
                    i += len(e)
            exhausted = dec.maybe_exhausted()
        except BitstreamError:
            raise
        except Exception as e:  # constriction raises ValueError/AssertionError on malformed data
            raise BitstreamError(f"undecodable payload ({type(e).__name__}: {e})") from e
        if not exhausted:
            raise BitstreamError("payload has trailing data after the last symbol (corrupt frame)")
        return out

    def ideal_bits(self, symbols: np.ndarray) -> np.ndarray:
        """The ideal code length of each record, float64 ``[B]``: sum over active dims of -log2(f / 2^24)
        of its symbol (escapes: the escape symbol's cost + 32 bits)."""
        symbols = np.asarray(symbols)
        bits = np.zeros(len(symbols), np.float64)
        for d in self.dims:
            f = self.tables.table(self.level, d).astype(np.float64)
            idx, out, _ = self._column(symbols, d)
            bits += PRECISION - np.log2(f[idx]) + ESCAPE_BITS * out
        return bits


def check_exact(tables: CoderTables, quality: float | None = None, n: int = 4096, seed: int = 0) -> float:
    """Check that constriction codes with exactly the stored integers: draws ``n`` symbols from the table of
    each active dimension, codes them and compares the length to the ideal one from the integers
    (a range coder spends the ideal length plus at most 64 bits). Returns the largest excess in bits;
    raises ModelError if any length falls outside [ideal, ideal + 64]."""
    coder = EntropyCoder(tables, quality)
    rng = np.random.default_rng(seed)
    worst = 0.0
    for d in coder.dims:
        f = tables.table(coder.level, d).astype(np.float64)
        idx = rng.choice(len(f), size=n, p=f / f.sum())
        sym = np.zeros((n, tables.latent_dim), np.int32)
        sym[:, d] = idx - int(coder.half[d])
        sym[idx == len(f) - 1, d] = 0  # keep the check on regular symbols
        ideal = float(coder.ideal_bits(sym).sum())
        actual = 8 * len(coder.encode(sym))
        if not ideal - 1e-6 <= actual <= ideal + 64 + 1e-6:
            raise ModelError(f"dimension {d}: coded {actual} bits, the integer table says {ideal:.1f}")
        worst = max(worst, actual - ideal)
    return worst
