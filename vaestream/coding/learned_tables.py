"""Integer tables of a learned entropy model and the range coder that codes with a table per symbol.

**Tables** (:class:`LearnedTables`, stored once as ``MODEL_DIR/entropy_tables.npz``, built from the trained model by
:func:`build_learned_tables`): integer frequencies >= 1 summing to 2^24 (:mod:`vaestream.coding.tables`' precision
and quantiser), each over a contiguous range of integers plus one *escape* entry for the mass outside:

* the factorised density's tables, one per channel c (the hyper-latent's of a ``hyperprior`` model, the latent's
  of a ``factorized`` one): the integers floor(q_lo_c) .. ceil(q_hi_c) of its learned quantiles (tail mass 2^-8);
* a ``hyperprior`` model's Gaussian tables, indexed by quantised scale as tensorflow-compression's
  ``LocationScaleIndexedEntropyModel``: **64 tables** for the scales s_j = 0.11 exp(0.1231 j), j = 0..63
  (log-uniform over **[0.11, 256]**), table j over -K_j .. K_j, K_j = ceil(6 s_j) + 1 (3 .. 1,538 symbols each side),
  of N(0, s_j^2) integrated over the unit bins.

The tables are computed once in float64 and stored as integers: a decoder uses only the stored integers (and the
exact hyper-synthesis that picks them, :mod:`vaestream.coding.exact_conv`), so it needs no float agreement with
the encoder. Their :meth:`LearnedTables.digest` hashes the integers and the model fingerprint; its first 4 bytes
are the container header's table id, as for the codec's tables.

**Coding** (:class:`IndexedCoder`): an array of integer symbols, each with the index of its table, is coded in one
constriction RangeEncoder stream, grouped by table (tables in increasing index; within a table the symbols in
their array order, which the decoder knows as well, since it knows every symbol's table before decoding); then
the escaped symbols' values in the same order, each as two uniform 16-bit symbols (low, high half of its 32-bit
two's complement). Nothing is ever clipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from pathlib import Path

import numpy as np

from vaestream.binio import atomic_write
from vaestream.coding.range_coder import categorical, stream_module
from vaestream.coding.tables import ESCAPE_BITS, PRECISION, integer_frequencies
from vaestream.errors import BitstreamError, DataError, ModelError

LEARNED_TABLES_FORMAT = 1
"""(The gains joined the tables before any stream was kept: format 1 has them.)"""
ENTROPY_TABLES_FILE = "entropy_tables.npz"


@dataclasses.dataclass(frozen=True)
class LearnedTables:
    """The integer tables of one learned entropy model (module docstring).

    Attributes:
      fingerprint: the model's fingerprint (64 hex).
      kind: the config's ``entropy_model``.
      lo: ``[T]`` int64, the smallest integer of each table (its entry 0); entry ``n_t - 1`` is the escape.
      freqs: ``[T]`` uint32 arrays of frequencies (each summing to 2^24).
      channels: how many of the tables (the first) are the factorised density's, one per channel; the rest are
        the Gaussian scale tables (``hyperprior``).
      gain, inverse_gain: float64 ``[L, C]``, each rate level's gains g_k and g'_k
        (:meth:`vaestream.entropy_models.hyperprior.EntropyModel.gain_values`), stored so that every process uses
        the same numbers.
    """

    fingerprint: str
    kind: str
    lo: np.ndarray
    freqs: tuple
    channels: int
    gain: np.ndarray
    inverse_gain: np.ndarray

    def digest(self) -> bytes:
        """SHA-256 of the format, the model fingerprint and every table's integers."""
        h = hashlib.sha256(f"vaestream learned tables {LEARNED_TABLES_FORMAT} {self.kind} {self.channels}".encode())
        h.update(bytes.fromhex(self.fingerprint))
        h.update(np.ascontiguousarray(self.lo, "<i8").tobytes())
        h.update(np.ascontiguousarray(self.gain, "<f8").tobytes())
        h.update(np.ascontiguousarray(self.inverse_gain, "<f8").tobytes())
        for f in self.freqs:
            h.update(np.int64(len(f)).tobytes())
            h.update(np.ascontiguousarray(f, "<u4").tobytes())
        return h.digest()

    def save(self, path: str | os.PathLike) -> None:
        lengths = np.array([len(f) for f in self.freqs], np.int64)
        buf = io.BytesIO()
        np.savez(buf, format=np.int64(LEARNED_TABLES_FORMAT), fingerprint=np.array(self.fingerprint),
                 kind=np.array(self.kind), channels=np.int64(self.channels), lo=self.lo.astype(np.int64),
                 lengths=lengths, freqs=np.concatenate(self.freqs).astype(np.uint32),
                 gain=self.gain.astype(np.float64), inverse_gain=self.inverse_gain.astype(np.float64))
        atomic_write(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LearnedTables":
        """The tables stored at ``path``; :class:`ModelError` if they are not well-formed."""
        try:
            with np.load(Path(path)) as z:
                if int(z["format"]) != LEARNED_TABLES_FORMAT:
                    raise ModelError(f"{path}: entropy tables format {int(z['format'])}, expected "
                                     f"{LEARNED_TABLES_FORMAT}")
                lengths, flat = z["lengths"], z["freqs"]
                ends = np.cumsum(lengths)
                freqs = tuple(flat[e - n:e] for n, e in zip(lengths, ends))
                t = cls(str(z["fingerprint"]), str(z["kind"]), z["lo"].astype(np.int64), freqs, int(z["channels"]),
                        z["gain"].astype(np.float64), z["inverse_gain"].astype(np.float64))
        except (OSError, KeyError, ValueError) as e:
            raise ModelError(f"{path}: not readable entropy tables ({e})") from e
        if any(len(f) < 2 or int(f.sum(dtype=np.int64)) != 1 << PRECISION or f.min() < 1 for f in t.freqs) or \
                len(t.lo) != len(t.freqs) or t.gain.shape != t.inverse_gain.shape or not np.all(t.inverse_gain > 0):
            raise ModelError(f"{path}: malformed entropy tables (frequencies must be >= 1 and sum to 2^{PRECISION})")
        return t


def build_learned_tables(model) -> LearnedTables:
    """The integer tables of ``model`` (a VAE with ``model.entropy``): see the module docstring."""
    from vaestream.entropy_models.densities import gaussian_pmfs

    em = model.entropy
    lo, pmfs = em.density.pmf()
    los, freqs = list(lo), [integer_frequencies(p) for p in pmfs]
    if em.kind == "hyperprior":
        for p in gaussian_pmfs():
            k = (len(p) - 2) // 2
            los.append(-k)
            freqs.append(integer_frequencies(p))
    gain, inverse_gain = em.gain_values()
    return LearnedTables(model.fingerprint(), em.kind, np.array(los, np.int64), tuple(freqs), len(lo), gain,
                         inverse_gain)


class IndexedCoder:
    """Codes integer symbols each under its own table of a :class:`LearnedTables` (module docstring)."""

    def __init__(self, tables: LearnedTables):
        self.lo = tables.lo
        self.n = np.array([len(f) for f in tables.freqs], np.int64)
        self.models = [categorical(f.astype(np.float64) - 1.0) for f in tables.freqs]
        self.cost = [PRECISION - np.log2(f.astype(np.float64)) for f in tables.freqs]
        self._uniform = stream_module().model.Uniform(1 << 16)

    def _plan(self, table: np.ndarray):
        order = np.argsort(table, kind="stable")
        ts, starts = np.unique(table[order], return_index=True)
        return order, ts, np.append(starts, len(order))

    def _index(self, values: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Symbols -> (entry indices, escaped?)."""
        idx = values - self.lo[table]
        esc = (idx < 0) | (idx >= self.n[table] - 1)
        return np.where(esc, self.n[table] - 1, idx), esc

    def encode(self, values: np.ndarray, table: np.ndarray) -> bytes:
        """int64 symbols ``[M]`` and their table indices ``[M]`` -> payload bytes (whole 32-bit words)."""
        values, table = np.asarray(values, np.int64).ravel(), np.asarray(table, np.int64).ravel()
        if np.any(np.abs(values) >= 1 << 31):
            raise DataError("a latent symbol is beyond the 32-bit range the coder escapes")
        order, ts, starts = self._plan(table)
        idx, esc = self._index(values[order], table[order])
        enc = stream_module().queue.RangeEncoder()
        for i, t in enumerate(ts):
            enc.encode(idx[starts[i]:starts[i + 1]].astype(np.int32), self.models[int(t)])
        raw = values[order][esc]
        if len(raw):
            u = raw.astype(np.int32).view(np.uint32)
            enc.encode(np.stack([u & 0xFFFF, u >> 16], axis=1).reshape(-1).astype(np.int32), self._uniform)
        return enc.get_compressed().astype("<u4").tobytes()

    def decode(self, payload: bytes, table: np.ndarray) -> np.ndarray:
        """Payload bytes -> the int64 symbols ``[M]`` of the tables ``table`` ``[M]``; malformed input raises
        :class:`BitstreamError`."""
        table = np.asarray(table, np.int64).ravel()
        if len(payload) % 4:
            raise BitstreamError(f"payload of {len(payload)} bytes is not a whole number of 32-bit words")
        words = np.frombuffer(payload, "<u4").astype(np.uint32)
        out = np.zeros(len(table), np.int64)
        if len(table) == 0:
            if len(words):
                raise BitstreamError("payload has data where none was expected")
            return out
        order, ts, starts = self._plan(table)
        try:
            dec = stream_module().queue.RangeDecoder(words)
            idx = np.zeros(len(order), np.int64)
            for i, t in enumerate(ts):
                idx[starts[i]:starts[i + 1]] = dec.decode(self.models[int(t)], int(starts[i + 1] - starts[i]))
            tab = table[order]
            esc = idx == self.n[tab] - 1
            vals = idx + self.lo[tab]
            if esc.any():
                raw = np.asarray(dec.decode(self._uniform, 2 * int(esc.sum())), np.int64).reshape(-1, 2)
                vals[esc] = (raw[:, 0] | (raw[:, 1] << 16)).astype(np.uint32).view(np.int32)
            exhausted = dec.maybe_exhausted()
        except BitstreamError:
            raise
        except Exception as e:  # constriction raises ValueError/AssertionError on malformed data
            raise BitstreamError(f"undecodable payload ({type(e).__name__}: {e})") from e
        if not exhausted:
            raise BitstreamError("payload has trailing data after the last symbol (corrupt frame)")
        out[order] = vals
        return out

    def bits(self, values: np.ndarray, table: np.ndarray) -> np.ndarray:
        """The ideal code length of each symbol, float64 (same shape): -log2(f / 2^24) of its entry, plus 32 bits if
        it escapes."""
        values, table = np.asarray(values, np.int64), np.asarray(table, np.int64)
        idx, esc = self._index(values.ravel(), table.ravel())
        cost = np.empty(len(idx), np.float64)
        for t in np.unique(table):
            sel = table.ravel() == t
            cost[sel] = self.cost[int(t)][idx[sel]]
        return (cost + ESCAPE_BITS * esc).reshape(values.shape)
