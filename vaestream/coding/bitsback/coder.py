"""Lossless compression with the VAE by bits-back coding with ANS (BB-ANS; Townsend, Bird & Barber, 2019),
vectorised over batches of records (in the manner of craystack; Townsend et al. 2020).

    blob = compress_lossless(model, records)      # bytes: a vaestream container (vaestream.container)
    back = decompress_lossless(model, blob)       # == records, exactly (uint8)
    for x in LosslessCoder(model).iter_decompress(f): ...   # frame by frame from a binary file, bounded memory
    bits = LosslessCoder(model).bits(records)     # each record's code length (the -ELBO), float64 [B]

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
which returns the exact bits the encoder borrowed ("gets the bits back"). The chain is written once, as a
codec (:mod:`vaestream.coding.bitsback.codecs`: ``BitsBack(prior, likelihood, posterior)`` per group, the groups
``serial``; :class:`~vaestream.coding.bitsback.chain.Chain`), and both directions are derived from it; a
frame's parameters (:class:`~vaestream.coding.bitsback.chain.Frame`) and the ANS message are passed to each
step, never kept on the coder, so one coder serves any number of threads.

**Vectorised.** Records are coded in *groups* of up to ``group`` (256) records: one bits-back step per group
on ONE constriction ANS stack (:class:`constriction.stream.stack.AnsCoder`), fed whole-group symbol arrays
with per-symbol model parameters (g x Nz latents, g x D pixels), so every network call, every table look-up
and every ANS call is one array operation over the group; the only Python loop is over groups (the chain's
order). The compressor runs the encoder network once over the whole frame. All groups of a frame form one
chain on one stack, so only the first group has nothing to borrow bits from; the group sizes ramp up 1, 2,
4, ..., ``group`` so that it is a single record (a frame coded with a pixel context model ramps more slowly,
by what its latents' prior code leaves over: :func:`~vaestream.coding.bitsback.chain.chain_ramp`). The stack
starts from ``Nz + 8`` deterministic pseudo-random 32-bit words (:func:`~vaestream.coding.bitsback.chain.seed_words`,
known to both sides); the words of it that the first record did not consume are left at the bottom of the
stack and are not stored (the frame stores how many were cut), so the initial ("clean") bits are paid once
per frame (4,096 records by default), not per record or group: about Nz x (latent_bits - 4) + log2 of the
record's posterior spread, ~10^2 to 10^3 bits per frame, plus the frame's 24-byte header and the ANS state's
final word or two. Decoding must return the stack to exactly
that seed, which is checked: a stream that does not decode back to it raises :class:`BitstreamError`.

**Latents** (a uniform grid, posterior windows, the scrambled prior: :mod:`vaestream.coding.bitsback.latents`)
and **likelihood tables** (a grid of beta-binomial tables: :mod:`vaestream.coding.bitsback.tables`) are
specified and measured in their modules' docstrings.

**Two stochastic layers (Bit-Swap; Kingma, Abbeel & Ho, 2019).** A model with ``config.top_latent_dim > 0``
(x -> z -> z2, prior p(z|z2) p(z2), posterior q(z|x) q(z2|z)) is coded per group as

1. pop z ~ Q(z|x),  2. push x with P(x|z),  3. pop z2 ~ Q(z2|z)  -- from the bits x just wrote,

and after the frame's last group, for the whole frame at once, 4. push every z with P(z|z2) (a
QuantizedGaussian over the whole grid: it is only pushed and popped, never sampled), 5. push every z2 with the
scrambled P(z2). The decoder pops all z2, then all z, then runs the groups backwards: push z2 back with
Q(z2|z), pop x with P(x|z), push z back with Q(z|x). As in Bit-Swap only the first record's z borrows initial
bits (z2 is drawn from pixel bits), so the clean-bits cost does not grow with the depth. Steps 4-5 are held to
the end of the frame because a pop reads the quantile of the last symbol pushed: with z pushed under P(z|z2)
(natural bucket order) on top of the stack after each group, the next group drew its z from those quantiles
and not from Q (measured: standardised offsets of std 1.8, +1.8 % rate); at the end of the frame every z pop
reads pixel bits instead. A two-layer model's z is not held near N(0, I) by a fixed prior, so its grid covers
[-32, 32) (``range_bits`` 5, recorded in each frame) with 2^12 buckets (the same step, 1/64).

**Near-lossless (``levels=K``).** A lossy mode with a guaranteed per-pixel bound, for the high-PSNR end where
a decoder network's reconstruction flattens (the classical near-lossless coding of JPEG-LS, with the VAE as
the probability model). Each count n is first rounded to the nearest of K levels ``round(k 255 / (K - 1))``
(:func:`pixel_levels`; 0 and 255 are levels, so black and white pixels come back exact, and every pixel is
within :func:`max_error` (K) counts: 127, 64, 42, 32, ... 8 at K = 16, 2 at K = 64). The *level image* is then
coded exactly by the chain above, with Q(z | level image) (the encoder sees the level values) and P(level |
z) = the beta-binomial's mass over the level's counts (:func:`level_rows`, K-entry rows precomputed per grid
cell like the lossless tables). So its rate is the -ELBO of the level image under the binned model: the
bits fall with K (the MNIST test set, benchmarks/RESULTS_coder.md: 207 bits at K = 3, 26.4 dB; 277 at
K = 5, 32.1 dB; 1,014 lossless with the same model, first 2,000 records) and
the PSNR is known before coding (:meth:`LosslessCoder.quantize` is what the decoder returns). K is stored
in every frame, so one decoder reads any K. It needs one stochastic layer: in Bit-Swap order each group's z
is popped before any latent is pushed back, paid for by the bits its pixels just wrote, and a level image
writes too few.

**Pixel context models (``contexts=``).** With a :class:`vaestream.coding.bitsback.context.ContextModel` for its K,
the coder replaces P(level | z) by P(level_p | z, the levels before p): a small exact network over each
pixel's causal neighbours (:mod:`vaestream.coding.bitsback.context`; 19-20 % fewer bits on Fashion-MNIST at K = 4
and 6). The encoder pushes a group's pixels position-major in one call; the decoder pops them one position
at a time (``H x W`` network calls per group, so it is ~20-30x slower than without). The frame flags it
(:data:`CONTEXT_FLAG`) and the container's fingerprint is that of the model *with* the context model
(:func:`vaestream.coding.bitsback.context.stream_fingerprint`), so a decoder without it refuses the stream.

**Reconstruction.** The level image fixes which counts a pixel may have; :data:`RECONSTRUCTIONS` says which
one it gets: the level's value (``level``, within :func:`max_error`), E[n | level, z] (``mean``), or the
context model's reconstruction network on the pixel's 7 x 7 neighbourhood of levels and means (``learned``,
:meth:`vaestream.coding.bitsback.context.ContextModel.reconstruct`; about 1 dB over ``mean`` on Fashion-MNIST at
K = 4). The bits are the same for all three; the last two stay within the level's counts.

**Determinism.** Bits-back decoding recomputes Q(z|x) and P(x|z) and must get exactly the encoder's
parameters, or the tables differ and the stream cannot be decoded. The networks run in float64 NumPy with
*exact* matrix products (:class:`ExactMLP`): weights (per layer) and activations (per row) are rounded to
integers of at most 21 bits with power-of-two scales, so every partial sum of every product is an integer
below 2^52, which float64 holds exactly, and the BLAS result is the same whatever its thread count,
blocking, summation order or the number of rows in the call (the compressor's whole-frame encoder call and
the decompressor's per-group calls agree). What remains are elementwise NumPy ufuncs (bias add, the
activation, exp), which compute each element on its own, so they depend only on the NumPy build and CPU
kind; their outputs are then rounded to fixed point before anything is built from them. constriction's
arithmetic is its own (Rust, integer ANS, per-symbol float64 model evaluation), independent of threads.
So a stream decodes in any process with any ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` on the same
NumPy/constriction build and CPU kind (tested); a different build may in principle change the last bit of
an exp and make a stream undecodable, which is detected (the chain does not return to its seed:
:class:`BitstreamError`, never wrong data). The stream carries the model's fingerprint, so a stream
written with another model is refused with :class:`ModelMismatchError` before anything is decoded.

**Stream format** (FORMAT.md section 5). A vaestream container whose header has the model fingerprint and the
LOSSLESS flag; each frame (``frame_records`` records; frames are independent chains, the unit of random access
and of streaming decode) is one chain: a 24-byte "BBAN" head (the chain's settings, the seed words and how many
were cut) and the stored words of its stack, written and read by :mod:`vaestream.coding.container.bitsback`.
Format 1 frames (older vaestream versions) are refused with a :class:`BitstreamError` that names the format;
each frame's CRC32 in the container refuses a truncated or corrupted stream before any decoding.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, BinaryIO, Iterator, Mapping

import numpy as np

from vaestream.coding import container
from vaestream.coding.bitsback import codecs as cs
from vaestream.coding.bitsback.chain import (EXACT_LEVELS, RECONSTRUCTIONS, Chain, Frame, chain_ramp, group_sizes,
                                             seed_words)
from vaestream.coding.bitsback.context import ContextModel, stream_context, stream_fingerprint
from vaestream.coding.bitsback.exact_mlp import ExactMLP, blas_threads  # noqa: F401 (ExactMLP re-exported)
from vaestream.coding.bitsback.latents import posterior_kl_nats
from vaestream.coding.bitsback.tables import (DEFAULT_RANGE_BITS, MAX_LEVELS, MIN_LEVELS, beta_binomial_grid,
                                              level_rows, level_spans, max_error, pixel_levels)
from vaestream.config import DISCRETE_LEVELS
from vaestream.errors import BitstreamError, ConfigError, DataError, ModelMismatchError

FORMAT = container.BITSBACK_FORMAT
LOSSLESS_TAG = container.LOSSLESS_TAG
"""The container header's ``table_hash`` of a lossless stream."""
TWO_LAYER_RANGE_BITS = 5
"""A two-layer model's latent grid covers [-32, 32): its z is not held near N(0, I) by a fixed prior (measured:
16 % of posterior means beyond 6, the largest 17.7, on a 784-200-20-16 model), so [-8, 8) would clip it."""
TWO_LAYER_LATENT_BITS = 12
"""With it, 2^12 buckets keep the one-layer default's step of 1/64."""
DEFAULT_LATENT_BITS = 10
MIN_LATENT_BITS, MAX_LATENT_BITS = 8, 16
DEFAULT_GROUP = 256
DEFAULT_FRAME_RECORDS = 4096
MAX_FRAME_RECORDS = 1 << 24
MAX_RANGE_BITS = 7
LIKELIHOODS = ("beta_binomial", "bernoulli")
_LEARNED = RECONSTRUCTIONS.index("learned")
_ELBO_CHUNK = 1000
"""Records per ELBO call of :meth:`LosslessCoder.bits` (its memory: ``num_samples`` x this x D)."""
CONTEXT_FLAG, RAMP_SHIFT = container.CONTEXT_FLAG, container.RAMP_SHIFT
"""The frame head's bits (:mod:`vaestream.coding.container` writes and reads the head)."""


def _check_settings(cfg, latent_bits: int, range_bits: int, group: int, frame_records: int, levels: int,
                    reconstruction: str) -> None:
    """Raise :class:`ConfigError` unless a :class:`LosslessCoder` of these settings can code with a model of ``cfg``."""
    if not DEFAULT_RANGE_BITS <= int(range_bits) <= MAX_RANGE_BITS or int(latent_bits) - 1 - int(range_bits) < 2:
        raise ConfigError(f"range_bits must be in [{DEFAULT_RANGE_BITS}, {MAX_RANGE_BITS}] and leave a latent step "
                          f"of at most 1/4 (latent_bits - 1 - range_bits >= 2), got {range_bits} with "
                          f"latent_bits {latent_bits}")
    if cfg.likelihood not in LIKELIHOODS:
        raise ConfigError(f"lossless coding needs a discrete likelihood {LIKELIHOODS}; this model's is "
                          f"{cfg.likelihood!r} (train with ModelConfig(likelihood='beta_binomial') for 8-bit "
                          "data or 'bernoulli' for binary data)")
    if cfg.arch != "mlp":
        raise ConfigError(f"lossless (bits-back) coding runs the paper's MLPs exactly; this model's arch is "
                          f"{cfg.arch!r}")
    if not MIN_LATENT_BITS <= int(latent_bits) <= MAX_LATENT_BITS:
        raise ConfigError(f"latent_bits must be in [{MIN_LATENT_BITS}, {MAX_LATENT_BITS}], got {latent_bits}")
    if not 1 <= int(group) <= 4096:
        raise ConfigError(f"group must be in [1, 4096], got {group}")
    if not 1 <= frame_records <= MAX_FRAME_RECORDS:
        raise ConfigError(f"frame_records must be in [1, {MAX_FRAME_RECORDS}], got {frame_records}")
    if int(levels) != EXACT_LEVELS:
        if not MIN_LEVELS <= int(levels) <= MAX_LEVELS or int(levels) != levels:
            raise ConfigError(f"levels must be {EXACT_LEVELS} (lossless) or in [{MIN_LEVELS}, {MAX_LEVELS}] "
                              f"(near-lossless), got {levels}")
        if cfg.likelihood != "beta_binomial":
            raise ConfigError(f"near-lossless coding (levels {levels}) quantises 8-bit pixels: it needs the "
                              f"beta_binomial likelihood, not {cfg.likelihood!r}")
        if reconstruction not in RECONSTRUCTIONS:
            raise ConfigError(f"reconstruction {reconstruction!r} is not one of {RECONSTRUCTIONS}")
        if cfg.hierarchical:
            raise ConfigError(f"near-lossless coding (levels {levels}) needs a model with one stochastic layer: "
                              "in Bit-Swap order each record's z is popped before any latent is pushed back, "
                              "paid for by the bits its pixels just wrote, and a level image writes too few (its "
                              "z would cost -log2 P(z) without bits back)")
    if reconstruction != "level" and int(levels) == EXACT_LEVELS:
        raise ConfigError(f"reconstruction {reconstruction!r} is for near-lossless coding (levels < {EXACT_LEVELS})")


def _checked_contexts(contexts: Mapping[int, ContextModel] | None, cfg, fingerprint: str) -> dict[int, ContextModel]:
    """The pixel context models by K, checked against the model (its input shape and ``fingerprint``)."""
    out = dict(contexts or {})
    for k, cm in out.items():
        if cm.levels != k or tuple(cm.shape) != tuple(cfg.input_shape):
            raise ConfigError(f"context model for K = {cm.levels} on {cm.shape} pictures given as K = {k} for a "
                              f"model of {tuple(cfg.input_shape)}")
        if cm.meta.get("model_fingerprint", fingerprint) != fingerprint:
            raise ModelMismatchError(f"the context model for K = {k} was trained for model "
                                     f"{cm.meta['model_fingerprint'][:16]}..., not this one ({fingerprint[:16]}...)")
    return out


# ------------------------------------------------------------------------------------------------------------
# the coder
# ------------------------------------------------------------------------------------------------------------
class LosslessCoder(Chain):
    """Bits-back ANS coding of discrete records with one VAE (see the module docstring).

    Args:
      model: a :class:`vaestream.model.VAE` whose likelihood is ``beta_binomial`` or ``bernoulli``, with one
        stochastic layer or two (``config.top_latent_dim > 0``: coded in Bit-Swap order, see the module docstring).
      latent_bits: log2 of the number of latent buckets per dimension (8..16; default 10 for one layer, 12 for
        two).
      range_bits: the grid covers [-2^range_bits, 2^range_bits) (3..7; default 3 for one layer, 5 for two).
      group: the largest number of records per bits-back step (one encoder and one decoder call each).
      frame_records: records per container frame (each frame is an independent chain).
      blas_threads: OpenBLAS threads while coding (default 1, see :class:`blas_threads`; None: leave as is).
        The stream does not depend on it.
      reconstruction: near-lossless only, one of :data:`RECONSTRUCTIONS` (recorded in each frame).
      levels: None or 256 (:data:`EXACT_LEVELS`): lossless. K in [2, 64]: **near-lossless**, each pixel is first
        quantised to the nearest of K levels ``round(k 255 / (K - 1))`` (0 and 255 among them), so every pixel
        comes back within :func:`vaestream.coding.bitsback.tables.max_error` (K) of its count (127 at K = 2, 8 at
        16, 2 at 64), and the level image is coded exactly, by the same bits-back chain, with
        P(level | z) = the beta-binomial's mass over the level's counts (:func:`level_rows`) and Q(z | level
        image). Rate: the -ELBO of the level image under that binned likelihood. Recorded in each frame; the
        decoder needs only the model.
    """

    def __init__(self, model, latent_bits: int | None = None, group: int = DEFAULT_GROUP,
                 frame_records: int = DEFAULT_FRAME_RECORDS, blas_threads: int | None = 1,
                 range_bits: int | None = None, levels: int | None = None, reconstruction: str = "level",
                 contexts: Mapping[int, ContextModel] | None = None, use_context: bool = True):
        cfg = model.config
        if latent_bits is None:
            latent_bits = TWO_LAYER_LATENT_BITS if cfg.hierarchical else DEFAULT_LATENT_BITS
        if range_bits is None:
            range_bits = TWO_LAYER_RANGE_BITS if cfg.hierarchical else DEFAULT_RANGE_BITS
        levels = EXACT_LEVELS if levels is None else levels
        _check_settings(cfg, latent_bits, range_bits, group, frame_records, levels, reconstruction)
        self.model = model
        self.config = cfg
        self.latent_bits = int(latent_bits)
        self.range_bits = int(range_bits)
        self.group = int(group)
        self.frame_records = int(frame_records)
        self.levels = int(levels)
        self.reconstruction = reconstruction
        self.blas_threads = blas_threads
        self.model_fingerprint = model.fingerprint()
        # pixel context models (vaestream.coding.bitsback.context), by K: this coder writes with the one of its K
        # (unless use_context is False) and reads a stream written with any of them
        self.contexts = _checked_contexts(contexts, cfg, self.model_fingerprint)
        self.context = self.contexts.get(self.levels) if use_context and self.levels != EXACT_LEVELS else None
        if reconstruction == "learned" and (self.context is None or not self.context.has_reconstruction):
            raise ConfigError(f"reconstruction 'learned' needs a pixel context model for K = {levels} with a "
                              "reconstruction network (MODEL_DIR/context/, vaestream train-context), used for coding")
        self.fingerprint = (stream_fingerprint(self.model_fingerprint, self.context, reconstruction == "learned")
                            if self.context is not None
                            else self.model_fingerprint)
        # The networks run here in float64 NumPy with exact matrix products (ExactMLP), not through TensorFlow:
        # the bits-back decoder must recompute the encoder's and decoder's outputs bit for bit.
        self._enc = ExactMLP(model.encoder, cfg.activation)
        self._dec = ExactMLP(model.decoder, cfg.activation)
        # two stochastic layers (Bit-Swap): q(z2 | z) and p(z | z2)
        self._top_enc = ExactMLP(model.top_encoder, cfg.activation) if cfg.hierarchical else None
        self._top_dec = ExactMLP(model.top_decoder, cfg.activation) if cfg.hierarchical else None
        if cfg.likelihood == "beta_binomial":
            beta_binomial_grid()

    def frame(self) -> Frame:
        """The parameters of the frames this coder writes (before the ramp, which depends on the frame)."""
        return Frame(self.latent_bits, self.range_bits, self.levels, RECONSTRUCTIONS.index(self.reconstruction),
                     self.context, self.group)

    @property
    def max_error(self) -> int:
        """The largest |decoded - original| count of this coder's streams: 0 when lossless; with
        ``reconstruction="mean"`` or ``"learned"`` the bound is the widest level's span instead (a decoded count
        stays among its level's counts)."""
        if self.levels == EXACT_LEVELS:
            return 0
        if self.reconstruction != "level":
            lo, hi = level_spans(self.levels)
            return int(np.max(hi - lo))
        return max_error(self.levels)

    def quantize(self, records: Any, name: str = "input") -> np.ndarray:
        """What :meth:`decompress` returns for ``records``: each count replaced by its nearest level (the
        records themselves, as uint8, when lossless), in the records' shape. No model call. With
        ``reconstruction="mean"`` the output depends on the latents the chain draws: use
        :meth:`compress_and_reconstruct`."""
        if self.reconstruction != "level":
            raise ConfigError(f"with reconstruction {self.reconstruction!r} the decoded counts depend on the latents "
                              "the chain draws: "
                              "use compress_and_reconstruct(records)")
        x, _ = self._records(records, name)
        if self.levels == EXACT_LEVELS:
            out = x.astype(np.uint8)
        else:
            values, cell = pixel_levels(self.levels)
            out = values[cell[x.astype(np.int64)]]
        return out.reshape(np.shape(records))

    # -- inputs ----------------------------------------------------------------------------------------------
    def _records(self, records: Any, name: str) -> tuple[np.ndarray, int]:
        """records -> (checked ``[B, D]`` view in their own dtype, layout) with layout 0: ``[B, D]``, 1:
        ``[B, *shape]``, 2: ``[D]``, 3: ``input_shape`` (one record). Every record is checked, ``frame_records``
        at a time, so the check's masks are bounded by a frame; callers convert a frame (or chunk) at a time."""
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
        floating = np.issubdtype(a.dtype, np.floating)
        if not (floating or a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer)):
            raise DataError(f"{name}: records of dtype {a.dtype}; lossless coding takes {what}")
        for s in range(0, len(a), self.frame_records):
            c = a[s:s + self.frame_records]
            if floating:
                with np.errstate(invalid="ignore"):
                    bad = ~(np.isfinite(c) & (c == np.round(c)))
                if bad.any():
                    i = int(np.argmax(bad.any(axis=1)))
                    raise DataError(f"{name}: record {s + i} has non-integer values; lossless coding takes {what} "
                                    f"(integer arrays, e.g. uint8), not model inputs scaled to [0, 1]")
            if c.size and c.dtype != np.bool_:
                bad = (c < 0) | (c > top)
                if bad.any():
                    i = int(np.argmax(bad.any(axis=1)))
                    raise DataError(f"{name}: record {s + i} has values outside {what} (min {c[i].min()}, max "
                                    f"{c[i].max()}) for the {cfg.likelihood} likelihood")
        return a, layout

    def _inputs(self, x: np.ndarray) -> np.ndarray:
        """int records ``[g, D]`` -> the float32 model inputs (counts scaled by float32(1/255), as in training)."""
        xf = x.astype(np.float32)
        if self.config.likelihood == "beta_binomial":
            xf *= np.float32(1.0 / DISCRETE_LEVELS)
        return xf

    # -- one frame -------------------------------------------------------------------------------------------
    def _seed_count(self) -> int:
        # the first group is one record: it pops Nz symbols of at most 24 bits each
        return self.config.latent_dim + 8

    def encode_frame(self, x: np.ndarray, layout: int = 0, out: np.ndarray | None = None) -> bytes:
        """int32 records ``[n, D]`` -> one frame payload (one bits-back chain). Near-lossless: the records are
        level indices (of the counts' nearest levels), as :meth:`compress` passes them. ``out`` (uint8 ``[n, D]``), if
        given, receives what the decoder will return for each record."""
        f = self.frame()
        q = self._posterior(x, f) if len(x) else None  # all of the frame in one call
        if f.context is not None and len(x):
            f = dataclasses.replace(f, ramp=chain_ramp(*q, f.latent_bits, f.range_bits))
        sizes = group_sizes(len(x), f.group, f.ramp)
        seed = seed_words(self._seed_count())
        groups = np.split(x, np.cumsum(sizes)[:-1]) if sizes else []
        words = cs.words(self._chain(f, sizes, out, q).push(cs.message(seed.copy()), groups))
        m = min(len(words), len(seed))
        diff = np.flatnonzero(words[:m] != seed[:m])
        cut = int(diff[0]) if len(diff) else m
        head = container.BitsBackHead(f.latent_bits, f.group, layout, f.range_bits, f.levels % EXACT_LEVELS, f.recon,
                                      f.ramp, f.context is not None, len(seed), cut)
        return container.pack_bitsback(head, words[cut:])

    def _read_frame_head(self, payload: bytes, n: int, name: str, context: ContextModel | None) -> tuple:
        """A frame payload's head, checked -> (Frame, layout, seed words, cut, the stored words' bytes)."""
        h, stored = container.read_bitsback(payload, name)
        lv, recon, ramp, with_context = h.levels, h.reconstruction, h.ramp, h.context
        if (not MIN_LATENT_BITS <= h.latent_bits <= MAX_LATENT_BITS or h.group < 1 or h.layout > 3
                or h.range_bits > MAX_RANGE_BITS or h.latent_bits - 1 - h.range_bits < 2
                or h.seed != self._seed_count() or h.cut > h.seed
                or (lv and not MIN_LEVELS <= lv <= MAX_LEVELS)
                or (lv and self.config.likelihood != "beta_binomial") or recon >= len(RECONSTRUCTIONS)
                or (recon and not lv)):
            raise BitstreamError(f"{name}: corrupt lossless frame header (layout {h.layout}, seed {h.seed}, cut "
                                 f"{h.cut}, levels {lv or EXACT_LEVELS}, reconstruction {recon}, ramp {ramp})")
        if ramp and not with_context:
            raise BitstreamError(f"{name}: corrupt lossless frame header (a ramp of {ramp} without a pixel context "
                                 "model)")
        if with_context != (context is not None) or (with_context and context.levels != lv):
            raise BitstreamError(f"{name}: the frame is coded {'with' if with_context else 'without'} a pixel context "
                                 f"model (levels {lv or EXACT_LEVELS}) and the stream's header says otherwise")
        if recon == _LEARNED and not (with_context and context.has_reconstruction):
            raise BitstreamError(f"{name}: the frame asks for the learned reconstruction and its stream's context "
                                 "model has no reconstruction network")
        if n > MAX_FRAME_RECORDS:
            raise BitstreamError(f"{name}: frame claims {n} records (at most {MAX_FRAME_RECORDS})")
        f = Frame(h.latent_bits, h.range_bits, lv or EXACT_LEVELS, recon, context, h.group, ramp)
        return f, h.layout, h.seed, h.cut, stored

    def decode_frame(self, payload: bytes, n: int, name: str = "stream",
                     context: ContextModel | None = None) -> tuple[np.ndarray, int]:
        """One frame payload of ``n`` records -> (uint8 records ``[n, D]``, layout). ``context``: the pixel context
        model the stream's header names (:meth:`check_header`), None for a plain stream."""
        f, layout, n_seed, cut, stored = self._read_frame_head(payload, n, name, context)
        seed = seed_words(n_seed)
        words = np.concatenate([seed[:cut], np.frombuffer(stored, "<u4").astype(np.uint32)])
        if len(words) == 0 or words[-1] == 0:
            raise BitstreamError(f"{name}: corrupt lossless frame (invalid ANS state)")
        out = np.empty((n, self.config.input_dim), np.uint8)
        try:
            msg, _ = self._chain(f, group_sizes(n, f.group, f.ramp), out).pop(cs.message(words))
            rest = cs.words(msg)
        except (ValueError, AssertionError, RuntimeError, OverflowError, IndexError) as e:  # constriction on bad data
            raise BitstreamError(f"{name}: corrupt lossless frame ({e})") from None
        if not np.array_equal(rest, seed):
            raise BitstreamError(f"{name}: the bits-back chain did not return to its initial state: the stream is "
                                 "corrupt, or was written where the model computes different floats (another "
                                 "NumPy build or CPU kind); the decoded records are not trusted")
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
        return self._compress(records, name, False)[0]

    def compress_and_reconstruct(self, records: Any, name: str = "input") -> tuple[bytes, np.ndarray]:
        """(:meth:`compress` (records), what :meth:`decompress` will return for it: uint8 ``[B, D]``), the second
        computed while coding (needed for ``reconstruction="mean"``, whose counts depend on the chain's z)."""
        return self._compress(records, name, True)

    def bits(self, records: Any, name: str = "input", num_samples: int = 16, seed: int = 0) -> np.ndarray:
        """Each record's net code length under this coder in bits, float64 ``[B]``: the rate the chain approaches.

        Lossless: the model's negative ELBO (estimator B, ``num_samples`` z samples from ``seed``;
        :func:`vaestream.objective.elbo`). Near-lossless: the code length of the record's level image ``l``
        estimated on its own, ``KL( Q(z | l) || N(0, I) ) + sum_p -log2 P(l_p | z, l_<p)`` at z = Q's mean, with
        the rows this coder pushes (its context model's, if it codes this K with one); the chain pays about the
        sum (the z it pops varies around the mean): what a per-record choice of operating point weighs
        (:mod:`vaestream.coding.per_record`). A frame's fixed cost (its head and the initial bits, ~10^2 to 10^3
        bits) and the container's are not included."""
        x, _ = self._records(records, name)
        out, step = [], _ELBO_CHUNK if self.levels == EXACT_LEVELS else self.frame_records
        for s in range(0, len(x), step):
            chunk = x[s:s + step]
            out.append(self._elbo_bits(chunk, num_samples, seed) if self.levels == EXACT_LEVELS
                       else self._level_bits(pixel_levels(self.levels)[1][chunk.astype(np.int64)]))
        return np.concatenate(out) if out else np.zeros((0,), np.float64)

    def _elbo_bits(self, x: np.ndarray, num_samples: int, seed: int) -> np.ndarray:
        """The negative ELBO of int records ``[g, D]`` in bits, float64 ``[g]``."""
        from vaestream.objective import elbo  # TensorFlow: imported when first needed

        e = elbo(self.model, self._inputs(x), estimator="B", num_samples=num_samples, seed=seed)["elbo"]
        return -e.numpy().astype(np.float64) / math.log(2.0)

    def _level_bits(self, lv: np.ndarray) -> np.ndarray:
        """The code length estimate of level images ``[g, D]`` in bits, float64 ``[g]`` (see :meth:`bits`)."""
        f, g = self.frame(), len(lv)
        mean, std = self._posterior(lv, f)
        kl = posterior_kl_nats(mean, std, f.latent_bits, f.range_bits).reshape(g, -1).sum(axis=1) / math.log(2.0)
        lik = self._likelihood(np.rint(mean).astype(np.int64), f)
        rows = (self.context.rows_all(level_rows(lik, self.levels), lv.reshape(-1)) if self.context is not None
                else level_rows(lik, self.levels).astype(np.float64)).reshape(g, -1, self.levels)
        p = np.take_along_axis(rows, lv.reshape(g, -1, 1), axis=2)[..., 0]
        return kl - np.log2(np.maximum(p, 2.0 ** -60)).sum(axis=1)

    def _compress(self, records: Any, name: str, reconstruct: bool) -> tuple[bytes, np.ndarray | None]:
        x, layout = self._records(records, name)
        recon = np.empty(x.shape, np.uint8) if reconstruct else None
        # at least one frame (an empty batch is one empty chain, so its layout survives the round trip); each
        # frame is converted to int32 on its own, so memory is bounded by a frame, not by the input
        with blas_threads(self.blas_threads):
            frames = []
            for s in range(0, max(len(x), 1), self.frame_records):
                f = x[s:s + self.frame_records].astype(np.int32)
                if self.levels != EXACT_LEVELS:
                    f = pixel_levels(self.levels)[1][f]  # each count -> the index of its nearest level
                frames.append((len(f), self.encode_frame(f, layout, None if recon is None else recon[s:s + len(f)])))
        return container.pack(self.header(single=layout >= 2), frames), recon

    def accepts(self, fingerprint: bytes) -> bool:
        """Whether a stream whose header carries ``fingerprint`` was written by this model (plain, or with one of
        this coder's context models)."""
        return stream_context(fingerprint, self.model_fingerprint, self.contexts)[0]

    def check_header(self, h: container.Header, name: str = "stream") -> ContextModel | None:
        """Raise unless the container header ``h`` is of a lossless stream of this model; return the pixel context
        model it names (None: the model alone), which :meth:`decode_frame` takes."""
        known, context = stream_context(h.fingerprint, self.model_fingerprint, self.contexts)
        if not known:
            raise ModelMismatchError(f"{name}: written by model {h.fingerprint.hex()}..., not by this model "
                                     f"({self.model_fingerprint[:2 * container.FINGERPRINT_BYTES]}...) alone nor with "
                                     f"one of the {len(self.contexts)} pixel context models given to this coder (a "
                                     "stream coded with a context model needs it: MODEL_DIR/context/)")
        if h.table_hash != LOSSLESS_TAG:
            raise BitstreamError(f"{name}: not a lossless stream (a lossy vaestream stream: decode it with "
                                 "vaestream.codec.Codec.decompress)")
        if h.latent_dim != self.config.latent_dim or tuple(h.input_shape) != tuple(self.config.input_shape):
            raise BitstreamError(f"{name}: shapes (latent {h.latent_dim}, input {h.input_shape}) do not match the "
                                 "model")
        return context

    def _decoded(self, f: BinaryIO, name: str) -> Iterator:
        """Yields a lossless container's header, then ``(uint8 records [n, D], layout)`` of each frame, reading the
        binary file ``f`` front to back (:func:`vaestream.coding.container.iter_stream`), one frame at a time."""
        it = container.iter_stream(f, name)
        h = next(it)
        context = self.check_header(h, name)
        yield h
        for i, (n, payload) in enumerate(it):
            with blas_threads(self.blas_threads):
                frame = self.decode_frame(payload, n, f"{name} frame {i}", context)
            yield frame

    def iter_decompress(self, f: BinaryIO, name: str | None = None) -> Iterator[np.ndarray]:
        """Records frame by frame from a lossless container read front to back from the binary file ``f`` (a pipe,
        a socket; bytes are read from memory): uint8 ``[n, D]`` per frame, so memory stays bounded by one frame
        whatever the stream's length."""
        name = name or getattr(f, "name", None)
        name = name if isinstance(name, str) else "stream"  # a pipe's file object is named by its descriptor
        if isinstance(f, (bytes, bytearray, memoryview)):
            f = io.BytesIO(bytes(f))
        elif not hasattr(f, "read"):
            raise BitstreamError(f"{name}: expected a binary file or bytes, got {type(f).__name__}")
        frames = self._decoded(f, name)
        next(frames)
        for x, _ in frames:
            yield x

    def decompress(self, blob: bytes, name: str = "stream") -> np.ndarray:
        """A container written by :meth:`compress` -> the records, uint8, exactly as compressed."""
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise BitstreamError(f"{name}: expected bytes, got {type(blob).__name__}")
        cfg = self.config
        frames = self._decoded(io.BytesIO(bytes(blob)), name)
        single = next(frames).single
        parts, layouts = [], set()
        for x, layout in frames:
            parts.append(x)
            layouts.add(layout)
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


def compress_lossless(model, records: Any, latent_bits: int | None = None, group: int = DEFAULT_GROUP,
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
    the shape that was compressed (latent_bits and group are read from the stream). Raises
    :class:`BitstreamError` on a truncated or corrupt stream and :class:`ModelMismatchError` on a stream of another
    model."""
    return LosslessCoder(model).decompress(blob, name)
