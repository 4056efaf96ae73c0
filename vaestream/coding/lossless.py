"""Lossless compression with the VAE by bits-back coding with ANS (BB-ANS; Townsend, Bird & Barber, 2019).

    blob = compress_lossless(model, records)      # bytes: a vaestream container (vaestream.container)
    back = decompress_lossless(model, blob)       # == records, exactly (uint8)

``model`` is a :class:`vaestream.model.VAE` with a discrete likelihood: ``beta_binomial`` for 8-bit data
(records are pixel counts n in {0..255}, uint8 or any integer type) or ``bernoulli`` for binary data
(records in {0, 1}, e.g. statically binarised MNIST). A batch is ``[B, D]`` or ``[B, *input_shape]``;
one record (``[D]`` or ``input_shape``) gives one record back. The decoded records are uint8 in the shape
that was compressed.

**Bits back.** Each record x is coded with a latent z drawn *from the compressed stream itself*:
with an ANS stack (last in, first out) holding earlier data,

1. pop z ~ Q(z | x) (decode with the discretised posterior: takes about -log2 Q(z|x) bits off the stack),
2. push x with P(x | z) (the decoder's likelihood: adds -log2 P(x|z) bits),
3. push z with P(z) (the discretised prior: adds -log2 P(z) bits),

so each record costs ``-log2 P(x|z) - log2 P(z) + log2 Q(z|x)`` bits, whose expectation over Q is the
negative ELBO of the discretised model. The decoder runs the steps backwards in reverse order of records:
pop z with P(z), pop x with P(x|z), run the encoder on the x it now has and push z back with Q(z|x),
which returns the exact bits the encoder borrowed ("gets the bits back").

**Latent discretisation.** Every latent dimension is cut into ``2^latent_bits`` buckets of equal mass
under the prior N(0, 1), with edges ``e_j = Phi^-1(j / 2^latent_bits)`` (e_0 = -inf, e_K = +inf) and
centres ``c_j = Phi^-1((j + 1/2) / 2^latent_bits)``. The prior on bucket indices is therefore exactly
uniform (``latent_bits`` bits per dimension, :class:`constriction.stream.model.Uniform`); the posterior of
dimension i is ``Q(j) = Phi((e_(j+1) - mu_i) / sigma_i) - Phi((e_j - mu_i) / sigma_i)`` on the same
buckets (computed on whichever side of the mean keeps the difference accurate), and the decoder
network sees the centres ``z = c_j``.

**Integer tables.** Posterior and likelihood tables are handed to constriction's vectorised categorical
model (``Categorical(perfect=False)`` with one row of probabilities per symbol), which turns each row
deterministically into integer frequencies out of 2^24 that sum exactly to 2^24 and gives every symbol
at least frequency 1, so every value (every pixel count, every bucket) can always be coded. The
beta-binomial row of a pixel with parameters (alpha, beta) is

    log P(n) = log C(255, n) + sum_(j<n) log(alpha + j) + sum_(j<255-n) log(beta + j) + const,

(the pmf of BetaBinomial(255, alpha, beta) up to its normaliser, which constriction supplies), computed
in float64 with cumulative sums; the Bernoulli row is ``(sigmoid(-l), sigmoid(l))`` of the logit l.

**Batching and chaining.** Records are coded in *groups*: a group of g records is one bits-back step
with a latent of g x Nz buckets and g x D pixels (the model factorises over records, so the cost is the
same as coding them one by one), which takes one encoder and one decoder call per group. All groups of
a frame form one chain on one ANS stack, so only the first group has nothing to borrow bits from; the
group sizes ramp up 1, 2, 4, ..., ``group`` so that it is a single record. The stack starts from
``Nz + 8`` deterministic pseudo-random 32-bit words (:func:`seed_words`, known to both sides);
the words of it that the first record did not consume are left at the bottom of the stack and are not
stored (the frame stores how many were cut), so the initial bits cost only what the first record's
posterior took, -log2 Q(z|x) = Nz * latent_bits - log2(Q(z|x) / P(z)): about Nz * latent_bits minus the
record's KL, ~10^2 bits per frame (plus the frame's 24-byte header and the ANS state's final word or
two). Decoding must return the stack to exactly that seed, which is checked: a stream that does not
decode back to it raises :class:`BitstreamError`.

**Determinism requirement.** Bits-back decoding recomputes the encoder's posterior Q(z|x) and the
decoder's likelihood P(x|z) from floats, and they must be bit-identical to the floats the compressor
used, or the tables differ and the stream cannot be decoded. Both sides therefore evaluate the networks
on exactly the same batches (the same groups, same shapes, same order), in float64 NumPy on a snapshot of
the weights (not through TensorFlow, whose CPU kernels promise no bit-exactness across processes, thread
pools and load), and build the tables with the same NumPy/SciPy code. This holds when compressor and
decompressor run the *same build* of NumPy (and its BLAS), SciPy and constriction on the *same kind of
CPU*: a different build or machine may change the last bits of a matmul or an exp and make the stream
undecodable (detected: the chain does not return to its seed, so
:class:`BitstreamError`, never wrong data). The stream carries the model's fingerprint, so a stream
written with another model (other weights or architecture) is refused with
:class:`ModelMismatchError` before anything is decoded.

**Stream format.** A vaestream container (:mod:`vaestream.container`) whose header has the model
fingerprint, ``table_hash = LOSSLESS_TAG`` (a fixed 16-byte marker that says "lossless, bits-back
format 1" instead of a hash of coder tables), quality 0 and level 0. Each frame (``frame_records``
records by default; frames are independent chains, the unit of random access) holds, little-endian::

    "BBAN" | version u8 | latent_bits u8 | group u16 | layout u8 | reserved u8 x 3
    | seed words u32 | cut words u32 | stored words u32 | stored words x u32

Each frame has a length and a CRC32 in the container, so truncated or corrupted streams raise
:class:`BitstreamError` before any decoding.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Any

import numpy as np

from vaestream.coding import container
from vaestream.config import DISCRETE_LEVELS
from vaestream.errors import BitstreamError, ConfigError, DataError, ModelError, ModelMismatchError

FORMAT = 1
LOSSLESS_TAG = container.LOSSLESS_TAG
"""The container header's ``table_hash`` of a lossless stream."""
FRAME_TAG = b"BBAN"
_FRAME_HEAD = struct.Struct("<4sBBHB3xIII")
DEFAULT_LATENT_BITS = 10
DEFAULT_GROUP = 32
DEFAULT_FRAME_RECORDS = 4096
MAX_FRAME_RECORDS = 1 << 24
LIKELIHOODS = ("beta_binomial", "bernoulli")
_LOG_CLIP = 30.0  # log alpha and log beta are clipped to [-30, 30] (finite tables for any network output)
_ROWS = 4096      # likelihood rows per block (bounds the float64 temporaries; blocks run on a thread pool)


# ------------------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------------------
def bucket_edges(latent_bits: int) -> np.ndarray:
    """The ``2^latent_bits + 1`` bucket edges ``Phi^-1(j / 2^latent_bits)`` (float64, -inf and +inf at the ends)."""
    from scipy.special import ndtri

    k = 1 << latent_bits
    return ndtri(np.arange(k + 1, dtype=np.float64) / k)


def bucket_centres(latent_bits: int) -> np.ndarray:
    """The ``2^latent_bits`` bucket centres ``Phi^-1((j + 1/2) / 2^latent_bits)``, float32 (the decoder's z)."""
    from scipy.special import ndtri

    k = 1 << latent_bits
    return ndtri((np.arange(k, dtype=np.float64) + 0.5) / k).astype(np.float32)


def posterior_probs(mean: np.ndarray, log_scale: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Q(bucket j) of N(mean, exp(log_scale)^2) on the buckets ``edges``: ``[N, K]`` float64 for ``[N]`` inputs.

    ``Q(j) = Phi(t_(j+1)) - Phi(t_j)`` with ``t = (edges - mean) / sigma``, evaluated as
    ``Phi(-t_j) - Phi(-t_(j+1))`` where ``t_j >= 0`` (no cancellation in the upper tail).
    """
    from scipy.special import ndtr

    mu = np.asarray(mean, np.float64).reshape(-1, 1)
    sigma = np.exp(np.asarray(log_scale, np.float64).reshape(-1, 1))
    t = (edges[None, :] - mu) / sigma
    lower = ndtr(t)
    upper = ndtr(-t)
    p = np.where(t[:, :-1] >= 0.0, upper[:, :-1] - upper[:, 1:], lower[:, 1:] - lower[:, :-1])
    return np.maximum(p, 0.0)


_LOG_BINOM = None


def _log_binom() -> np.ndarray:
    global _LOG_BINOM
    if _LOG_BINOM is None:
        from scipy.special import gammaln

        n = np.arange(DISCRETE_LEVELS + 1, dtype=np.float64)
        _LOG_BINOM = gammaln(DISCRETE_LEVELS + 1.0) - gammaln(n + 1.0) - gammaln(DISCRETE_LEVELS + 1.0 - n)
    return _LOG_BINOM


def beta_binomial_probs(log_alpha: np.ndarray, log_beta: np.ndarray) -> np.ndarray:
    """Unnormalised BetaBinomial(255, alpha, beta) pmfs: ``[N, 256]`` float64 (row maximum 1) for ``[N]`` inputs.

    ``log P(n) = log C(255, n) + sum_(j<n) log(alpha + j) + sum_(j<255-n) log(beta + j)`` (+ a constant per row,
    removed by subtracting the row maximum), with log alpha and log beta clipped to [-30, 30].
    """
    la = np.clip(np.asarray(log_alpha, np.float64).reshape(-1), -_LOG_CLIP, _LOG_CLIP)
    lb = np.clip(np.asarray(log_beta, np.float64).reshape(-1), -_LOG_CLIP, _LOG_CLIP)
    out = np.empty((la.shape[0], DISCRETE_LEVELS + 1), np.float64)
    blocks = [slice(s, s + _ROWS) for s in range(0, la.shape[0], _ROWS)]
    if len(blocks) > 1 and _threads() > 1:  # NumPy releases the GIL: blocks in parallel, same results
        list(_pool().map(lambda sl: _bb_block(la[sl], lb[sl], out[sl]), blocks))
    else:
        for sl in blocks:
            _bb_block(la[sl], lb[sl], out[sl])
    return out


def _bb_block(la: np.ndarray, lb: np.ndarray, blk: np.ndarray) -> None:
    j = np.arange(DISCRETE_LEVELS, dtype=np.float64)
    a = np.exp(la)[:, None]
    b = np.exp(lb)[:, None]
    # sum_(j<n) log(alpha + j) for n = 0..255 (cumsum of 255 terms, 0 for n = 0)
    blk[:, 0] = 0.0
    np.cumsum(np.log(a + j), axis=1, out=blk[:, 1:])
    # sum_(j<255-n) log(beta + j): the same cumsum for beta, read backwards
    cb = np.cumsum(np.log(b + j), axis=1)
    blk[:, :DISCRETE_LEVELS] += cb[:, ::-1]
    blk += _log_binom()
    blk -= blk.max(axis=1, keepdims=True)
    np.exp(blk, out=blk)


_POOL = None

_NP_ACTIVATIONS = {
    "tanh": np.tanh,
    "relu": lambda v: np.maximum(v, 0.0),
    "softplus": lambda v: np.logaddexp(0.0, v),
    "elu": lambda v: np.where(v > 0, v, np.expm1(np.minimum(v, 0.0))),
    "sigmoid": lambda v: 0.5 * (1.0 + np.tanh(0.5 * v)),
}


def _snapshot(mlp) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (W, b) of every layer of a :class:`vaestream.model.MLP`, as float64 arrays."""
    return [(layer.w.numpy().astype(np.float64), layer.b.numpy().astype(np.float64))
            for layer in list(mlp.hidden) + [mlp.out]]


def _mlp(layers: list[tuple[np.ndarray, np.ndarray]], activation: str, x: np.ndarray) -> np.ndarray:
    """The MLP in float64: hidden layers with ``activation``, then the linear output layer."""
    act = _NP_ACTIVATIONS[activation]
    h = np.asarray(x, np.float64)
    for w, b in layers[:-1]:
        h = act(h @ w + b)
    w, b = layers[-1]
    return h @ w + b


def _threads() -> int:
    import os

    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="vaestream-lossless")
    return _POOL


def bernoulli_probs(logits: np.ndarray) -> np.ndarray:
    """``[N, 2]`` float64 rows ``(sigmoid(-l), sigmoid(l))`` = (P(0), P(1)) for ``[N]`` logits."""
    from scipy.special import expit

    lg = np.asarray(logits, np.float64).reshape(-1, 1)
    return np.concatenate([expit(-lg), expit(lg)], axis=1)


def group_sizes(n: int, group: int) -> list[int]:
    """The chain's group sizes for ``n`` records: 1, 2, 4, ... up to ``group``, then ``group`` (the last one
    shorter): only the first group, one record, borrows initial bits."""
    sizes, s, left = [], 1, n
    while left > 0:
        k = min(s, left)
        sizes.append(k)
        left -= k
        s = min(2 * s, group)
    return sizes


def seed_words(count: int) -> np.ndarray:
    """The deterministic initial ANS stack: ``count`` uint32 words, SHA-256 in counter mode over a fixed label
    (the same on every machine and NumPy version), each with its lowest bit set so none is zero."""
    blocks = (hashlib.sha256(b"vaestream lossless seed" + struct.pack("<I", i)).digest()
              for i in range((count + 7) // 8))
    words = np.frombuffer(b"".join(blocks), "<u4")[:count].astype(np.uint32)
    return words | np.uint32(1)


# ------------------------------------------------------------------------------------------------------------
# the coder
# ------------------------------------------------------------------------------------------------------------
class LosslessCoder:
    """Bits-back ANS coding of discrete records with one VAE (see the module docstring).

    Args:
      model: a :class:`vaestream.model.VAE` whose likelihood is ``beta_binomial`` or ``bernoulli``.
      latent_bits: log2 of the number of equal-prior-mass buckets per latent dimension (6..16).
      group: the largest number of records per bits-back step (one encoder and one decoder call each).
      frame_records: records per container frame (each frame is an independent chain).
    """

    def __init__(self, model, latent_bits: int = DEFAULT_LATENT_BITS, group: int = DEFAULT_GROUP,
                 frame_records: int = DEFAULT_FRAME_RECORDS):
        cfg = model.config
        if cfg.likelihood not in LIKELIHOODS:
            raise ConfigError(f"lossless coding needs a discrete likelihood {LIKELIHOODS}; this model's is "
                              f"{cfg.likelihood!r} (train with ModelConfig(likelihood='beta_binomial') for 8-bit "
                              "data or 'bernoulli' for binary data)")
        if not 6 <= int(latent_bits) <= 16:
            raise ConfigError(f"latent_bits must be in [6, 16], got {latent_bits}")
        if not 1 <= int(group) <= 4096:
            raise ConfigError(f"group must be in [1, 4096], got {group}")
        if not 1 <= frame_records <= MAX_FRAME_RECORDS:
            raise ConfigError(f"frame_records must be in [1, {MAX_FRAME_RECORDS}], got {frame_records}")
        self.model = model
        self.config = cfg
        self.latent_bits = int(latent_bits)
        self.group = int(group)
        self.frame_records = int(frame_records)
        self.fingerprint = model.fingerprint()
        self._buckets: dict[int, tuple[np.ndarray, np.ndarray, Any]] = {}
        # The networks run here in float64 NumPy on a snapshot of the weights, not through TensorFlow: the
        # bits-back decoder must recompute the encoder's and decoder's outputs bit for bit, and TensorFlow's
        # CPU kernels (oneDNN / Eigen thread pools) give no such promise across processes and loads.
        self._enc_layers = _snapshot(model.encoder)
        self._dec_layers = _snapshot(model.decoder)
        import constriction

        self._constriction = constriction
        self._cat = constriction.stream.model.Categorical(perfect=False)
        self._ans = constriction.stream.stack.AnsCoder

    def _bucket_tables(self, latent_bits: int) -> tuple[np.ndarray, np.ndarray, Any]:
        """(edges, centres, uniform prior model) of ``2^latent_bits`` buckets, cached."""
        if latent_bits not in self._buckets:
            self._buckets[latent_bits] = (bucket_edges(latent_bits), bucket_centres(latent_bits),
                                          self._constriction.stream.model.Uniform(1 << latent_bits))
        return self._buckets[latent_bits]

    # -- inputs ----------------------------------------------------------------------------------------------
    def _records(self, records: Any, name: str) -> tuple[np.ndarray, int]:
        """records -> (int32 ``[B, D]``, layout) with layout 0: ``[B, D]``, 1: ``[B, *shape]``, 2: ``[D]``,
        3: ``input_shape`` (one record)."""
        cfg = self.config
        a = np.asarray(records)
        shape = tuple(a.shape)
        if shape == (cfg.input_dim,):
            layout = 2
        elif shape == tuple(cfg.input_shape) and len(shape) > 1:
            layout = 3
        elif len(shape) == 2 and shape[1] == cfg.input_dim:
            layout = 0
        elif len(shape) == 1 + len(cfg.input_shape) and shape[1:] == tuple(cfg.input_shape):
            layout = 1
        else:
            raise DataError(f"{name}: records of shape {shape}; the model takes [B, {cfg.input_dim}], "
                            f"[B, *{tuple(cfg.input_shape)}] or one record")
        a = a.reshape(-1, cfg.input_dim)
        top = DISCRETE_LEVELS if cfg.likelihood == "beta_binomial" else 1
        what = "8-bit counts 0..255" if top == DISCRETE_LEVELS else "binary values 0/1"
        if a.dtype == np.bool_:
            a = a.astype(np.uint8)
        if np.issubdtype(a.dtype, np.floating):
            with np.errstate(invalid="ignore"):
                bad = ~(np.isfinite(a) & (a == np.round(a)))
            if bad.any():
                i = int(np.argmax(bad.any(axis=1)))
                raise DataError(f"{name}: record {i} has non-integer values; lossless coding takes {what} "
                                f"(integer arrays, e.g. uint8), not model inputs scaled to [0, 1]")
        elif not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{name}: records of dtype {a.dtype}; lossless coding takes {what}")
        if a.size:
            bad = (a < 0) | (a > top)
            if bad.any():
                i = int(np.argmax(bad.any(axis=1)))
                raise DataError(f"{name}: record {i} has values outside {what} (min {a[i].min()}, max {a[i].max()}) "
                                f"for the {cfg.likelihood} likelihood")
        return a.astype(np.int32), layout

    def _inputs(self, x: np.ndarray) -> np.ndarray:
        """int records ``[g, D]`` -> the float32 model inputs (counts scaled by float32(1/255), as in training)."""
        xf = x.astype(np.float32)
        if self.config.likelihood == "beta_binomial":
            xf *= np.float32(1.0 / DISCRETE_LEVELS)
        return xf

    # -- tables ----------------------------------------------------------------------------------------------
    def _posterior(self, x: np.ndarray, edges: np.ndarray) -> np.ndarray:
        """Q(bucket | x) rows ``[g * Nz, K]`` for int records ``[g, D]`` (one encoder call)."""
        h = _mlp(self._enc_layers, self.config.activation, self._inputs(x))
        mean, log_scale = np.split(h, 2, axis=-1)
        q = posterior_probs(mean, log_scale, edges)
        if not np.isfinite(q).all():
            raise ModelError("the encoder produced non-finite posterior parameters; cannot code losslessly")
        return q

    def _likelihood(self, zi: np.ndarray, g: int, centres: np.ndarray) -> np.ndarray:
        """P(x | z) rows ``[g * D, levels]`` for bucket indices ``[g * Nz]`` (one decoder call)."""
        z = centres[zi].reshape(g, self.config.latent_dim)
        h = _mlp(self._dec_layers, self.config.activation, z)
        out = np.split(h, 2, axis=-1) if self.config.likelihood == "beta_binomial" else [h]
        if self.config.likelihood == "beta_binomial":
            p = beta_binomial_probs(out[0], out[1])
        else:
            p = bernoulli_probs(out[0])
        if not np.isfinite(p).all():
            raise ModelError("the decoder produced non-finite likelihood parameters; cannot code losslessly")
        return p

    # -- one frame -------------------------------------------------------------------------------------------
    def _seed_count(self) -> int:
        # the first group is one record: it pops Nz symbols of at most 24 bits each
        return self.config.latent_dim + 8

    def encode_frame(self, x: np.ndarray, layout: int = 0) -> bytes:
        """int32 records ``[n, D]`` -> one frame payload (one bits-back chain)."""
        edges, centres, uniform = self._bucket_tables(self.latent_bits)
        seed = seed_words(self._seed_count())
        ans = self._ans(seed.copy())
        start = 0
        for g in group_sizes(len(x), self.group):
            xg = x[start:start + g]
            start += g
            zi = ans.decode(self._cat, self._posterior(xg, edges))                  # pop z ~ Q(z|x)
            ans.encode_reverse(xg.reshape(-1), self._cat, self._likelihood(zi, g, centres))  # push x, P(x|z)
            ans.encode_reverse(zi, uniform)                                         # push z with P(z)
        words = np.asarray(ans.get_compressed(), np.uint32)
        m = min(len(words), len(seed))
        diff = np.flatnonzero(words[:m] != seed[:m])
        cut = int(diff[0]) if len(diff) else m
        stored = words[cut:]
        head = _FRAME_HEAD.pack(FRAME_TAG, FORMAT, self.latent_bits, self.group, layout, len(seed), cut,
                                len(stored))
        return head + stored.astype("<u4").tobytes()

    def decode_frame(self, payload: bytes, n: int, name: str = "stream") -> tuple[np.ndarray, int]:
        """One frame payload of ``n`` records -> (uint8 records ``[n, D]``, layout)."""
        if len(payload) < _FRAME_HEAD.size:
            raise BitstreamError(f"{name}: lossless frame of {len(payload)} bytes is shorter than its header")
        tag, fmt, latent_bits, group, layout, n_seed, cut, n_stored = _FRAME_HEAD.unpack_from(payload)
        if tag != FRAME_TAG:
            raise BitstreamError(f"{name}: not a lossless frame (tag {tag!r}, expected {FRAME_TAG!r})")
        if fmt != FORMAT:
            raise BitstreamError(f"{name}: lossless frame format {fmt}; this vaestream reads format {FORMAT}")
        if not 6 <= latent_bits <= 16 or group < 1 or layout > 3 or n_seed != self._seed_count() or cut > n_seed:
            raise BitstreamError(f"{name}: corrupt lossless frame header (layout {layout}, seed {n_seed}, cut {cut})")
        if n > MAX_FRAME_RECORDS:
            raise BitstreamError(f"{name}: frame claims {n} records (at most {MAX_FRAME_RECORDS})")
        if len(payload) != _FRAME_HEAD.size + 4 * n_stored:
            raise BitstreamError(f"{name}: lossless frame holds {len(payload) - _FRAME_HEAD.size} bytes of words, "
                                 f"its header says {4 * n_stored}")
        edges, centres, uniform = self._bucket_tables(latent_bits)
        seed = seed_words(n_seed)
        words = np.concatenate([seed[:cut], np.frombuffer(payload, "<u4", offset=_FRAME_HEAD.size).astype(np.uint32)])
        if len(words) == 0 or words[-1] == 0:
            raise BitstreamError(f"{name}: corrupt lossless frame (invalid ANS state)")
        d, nz = self.config.input_dim, self.config.latent_dim
        out = np.empty((n, d), np.uint8)
        sizes = group_sizes(n, group)
        ends = np.cumsum(sizes)
        try:
            ans = self._ans(words)
            for g, end in zip(reversed(sizes), ends[::-1]):
                zi = ans.decode(uniform, g * nz)                                    # pop z with P(z)
                xg = ans.decode(self._cat, self._likelihood(zi, g, centres)).reshape(g, d)  # pop x, P(x|z)
                out[end - g:end] = xg
                ans.encode_reverse(zi, self._cat, self._posterior(xg, edges))       # push z, Q(z|x): bits back
            rest = np.asarray(ans.get_compressed(), np.uint32)
        except (ValueError, AssertionError, RuntimeError, OverflowError) as e:  # constriction on bad data
            raise BitstreamError(f"{name}: corrupt lossless frame ({e})") from None
        if not np.array_equal(rest, seed):
            raise BitstreamError(f"{name}: the bits-back chain did not return to its initial state: the stream is "
                                 "corrupt, or was written where the model computes different floats (another "
                                 "TensorFlow build or CPU kind); the decoded records are not trusted")
        return out, int(layout)

    # -- containers ------------------------------------------------------------------------------------------
    def header(self, single: bool = False) -> container.Header:
        """The container header of this coder's streams."""
        cfg = self.config
        return container.Header(fingerprint=bytes.fromhex(self.fingerprint)[:container.FINGERPRINT_BYTES],
                                table_hash=LOSSLESS_TAG, quality=0.0, level=0, latent_dim=cfg.latent_dim,
                                input_shape=tuple(cfg.input_shape), single=single)

    def compress(self, records: Any, name: str = "input") -> bytes:
        """Records (see the module docstring) -> a container of bits-back coded frames."""
        x, layout = self._records(records, name)
        # at least one frame (an empty batch is one empty chain, so its layout survives the round trip)
        frames = [(len(x[s:s + self.frame_records]), self.encode_frame(x[s:s + self.frame_records], layout))
                  for s in range(0, max(len(x), 1), self.frame_records)]
        return container.pack(self.header(single=layout >= 2), frames)

    def check_header(self, h: container.Header, name: str = "stream") -> None:
        """Raise unless the container header ``h`` is of a lossless stream of this model."""
        fp = bytes.fromhex(self.fingerprint)[:container.FINGERPRINT_BYTES]
        if h.fingerprint != fp:
            raise ModelMismatchError(f"{name}: written by model {h.fingerprint.hex()}..., not by this model "
                                     f"({fp.hex()}...)")
        if h.table_hash != LOSSLESS_TAG:
            raise BitstreamError(f"{name}: not a lossless stream (a lossy vaestream stream: decode it with "
                                 "vaestream.codec.Codec.decompress)")
        if h.latent_dim != self.config.latent_dim or tuple(h.input_shape) != tuple(self.config.input_shape):
            raise BitstreamError(f"{name}: shapes (latent {h.latent_dim}, input {h.input_shape}) do not match the "
                                 "model")

    def decompress(self, blob: bytes, name: str = "stream") -> np.ndarray:
        """A container written by :meth:`compress` -> the records, uint8, exactly as compressed."""
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise BitstreamError(f"{name}: expected bytes, got {type(blob).__name__}")
        cfg = self.config
        parts, layouts = [], set()
        with container.ContainerReader(bytes(blob), name=name) as r:
            self.check_header(r.header, name)
            for i, (n, payload) in enumerate(r):
                x, layout = self.decode_frame(payload, n, f"{name} frame {i}")
                parts.append(x)
                layouts.add(layout)
            single = r.header.single
        if len(layouts) > 1 or (layouts and (min(layouts) >= 2) != single):
            raise BitstreamError(f"{name}: frames disagree about the record layout")
        x = np.concatenate(parts) if parts else np.zeros((0, cfg.input_dim), np.uint8)
        layout = layouts.pop() if layouts else 0
        if single and len(x) != 1:
            raise BitstreamError(f"{name}: flagged as a single record but holds {len(x)}")
        if layout == 0:
            return x
        if layout == 1:
            return x.reshape((-1,) + tuple(cfg.input_shape))
        if layout == 2:
            return x[0]
        return x[0].reshape(cfg.input_shape)


def compress_lossless(model, records: Any, latent_bits: int = DEFAULT_LATENT_BITS, group: int = DEFAULT_GROUP,
                      frame_records: int = DEFAULT_FRAME_RECORDS) -> bytes:
    """Compress discrete records losslessly by bits-back ANS with ``model`` (see the module docstring).

    Args:
      model: a VAE with likelihood ``beta_binomial`` (records: counts 0..255) or ``bernoulli`` (records: 0/1).
      records: ``[B, D]``, ``[B, *input_shape]`` or one record (``[D]`` / ``input_shape``), integer or bool.
      latent_bits, group, frame_records: see :class:`LosslessCoder` (recorded in the stream; the
        decompressor needs only the model).

    Returns:
      a container; its size is about the records' summed negative ELBO (in bits) plus ~500 bits per frame
      and the container's header and index (~100 bytes).
    """
    return LosslessCoder(model, latent_bits, group, frame_records).compress(records)


def decompress_lossless(model, blob: bytes, name: str = "stream") -> np.ndarray:
    """The exact records of a stream written by :func:`compress_lossless` with the same ``model``: uint8, in
    the shape that was compressed (latent_bits and group are read from the stream). Raises :class:`BitstreamError` on a truncated or corrupt stream and
    :class:`ModelMismatchError` on a stream of another model."""
    return LosslessCoder(model).decompress(blob, name)


def ideal_bits(model, records: Any, num_samples: int = 16, seed: int = 0) -> np.ndarray:
    """The model's negative ELBO per record in bits (estimator B, ``num_samples`` z samples): the rate bits-back
    coding approaches. float64 ``[B]``."""
    coder = LosslessCoder(model)
    x, _ = coder._records(records, "records")
    out = []
    for s in range(0, len(x), 1000):
        e = model.elbo(coder._inputs(x[s:s + 1000]), estimator="B", num_samples=num_samples, seed=seed)["elbo"]
        out.append(-e.numpy().astype(np.float64) / math.log(2.0))
    return np.concatenate(out) if out else np.zeros((0,), np.float64)
