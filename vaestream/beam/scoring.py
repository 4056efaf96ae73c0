"""Scoring for the streaming encoder: codes, the ELBO of a sample of records and the quantised codes in one
model call.

**The scored sample.** The per-window bound the drift monitor judges is a mean over records, so the streaming
encoder computes the ELBO (a decoder pass) of a sample of them, not of all: a record is scored when
``crc32(key) % score_every == 0`` (:func:`scored_rows`; ``score_every`` 1: every record). The choice depends on
the record's key alone, not on its batch, bundle or position, so a window's scored records are the same
however the runner batched it, and the sample is a hash-uniform 1/``score_every`` of the records (the window's
mean ELBO is an unbiased estimate of the mean over all of them). At ``score_every`` 8 a 1,000-record window
scores ~125 records: the standard error of its mean is ~1/11 of the records' spread, while the encoder pass
(the codes) stays the only per-record model cost.

:class:`ScoringModelHandler` is a :class:`vaestream.beam.VAEModelHandler` (encode mode) whose predictions are
:class:`Scored`. The loaded model is kept in a per-process cache (strong references, keyed by the model
directory's files): Beam's in-process streaming runner tears the ``RunInference`` DoFn down after every bundle,
and ``RunInference``'s ``shared.Shared`` handle only holds the model weakly, so without the cache every bundle
reloaded the model (measured: 27 loads, 9.2 s of a 12 s run; ``benchmarks/RESULTS_streaming.md``).
"""

from __future__ import annotations

import collections
import itertools
import threading
import zlib
from typing import NamedTuple

import numpy as np

from vaestream import beam as vb
from vaestream.beam.elements import KEY_DIGITS, KeyRange
from vaestream.beam.model_handler import dir_stamp

CACHE_SIZE = 2
_CACHE: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()
_CACHE_LOCK = threading.Lock()


def elbo_from_posterior(vae, x, mean, log_scale, seed: int = 0):
    """The export's ``elbo`` estimator (:func:`vaestream.serving.export.elbo_fixed_noise`, L = 1, the same
    shared noise ``eps = stateless_normal([1, 1, Nz], seed)``) from an encoder pass already made:

        elbo(x) = -KL(N(mean, diag exp(log_scale)^2) || p(z)) + log p(x | mean + exp(log_scale) * eps)

    ``x`` ``[B, D]``, ``mean`` / ``log_scale`` ``[B, Nz]``; returns ``[B]`` nats. It reuses the codes' encoder
    pass and decodes in one GEMM per layer, where ``elbo_fixed_noise`` encodes again (twice) and maps 64-row
    blocks one at a time (bit-exact per row; here rows agree with it to float rounding): 5-6x faster on the
    784-200-10 model, which made the ELBO 85 % of the streaming encoder's model time."""
    import tensorflow as tf
    import tensorflow_probability as tfp

    nz = vae.config.latent_dim
    eps = tf.random.stateless_normal([1, 1, nz], seed=tf.constant([seed, 0], tf.int32))[0]
    z = mean + tf.exp(log_scale) * eps
    if vae.config.likelihood == "bernoulli" and not vae.config.hierarchical:
        # log Bernoulli(x | logits) = x logits - softplus(logits), summed over D: TFP's log_prob in 3 elementwise
        # passes instead of 7 (it was more than the decoder's GEMM); equal up to float rounding
        logits = vae.decoder_params(z)["logits"]
        distortion = -tf.reduce_sum(x * logits - tf.nn.softplus(logits), axis=-1)
    else:
        distortion = -vae.decode(z).log_prob(vae.observe(x))
    rate = tfp.distributions.kl_divergence(vae.posterior(mean, log_scale), vae.prior)
    return -(rate + distortion)


_SUFFIXES: tuple[bytes, ...] = ()


def _suffixes(stop: int) -> tuple[bytes, ...]:
    """``b":%09d" % i`` for i in ``[0, >= stop)``: the key suffixes of a :class:`vaestream.beam.KeyRange`."""
    global _SUFFIXES
    suffixes = _SUFFIXES
    if stop > len(suffixes):   # built whole and swapped in: safe across threads
        suffixes = _SUFFIXES = tuple(f":{i:0{KEY_DIGITS}d}".encode() for i in range(max(stop, 1024)))
    return suffixes


def scored_rows(keys, score_every: int) -> np.ndarray:
    """Indices (int32, ascending) of the records of ``keys`` whose ELBO is computed: ``crc32(key) % score_every
    == 0`` (all of them for ``score_every`` 1; none for 0). See the module docstring. Keys that are a
    :class:`vaestream.beam.KeyRange` (``NAME:`` + offset) are hashed without a string a key: the CRC of
    ``NAME`` once, continued over each cached suffix (``crc32(a + b) == crc32(b, crc32(a))``)."""
    if score_every <= 1:
        return np.arange(len(keys) if score_every == 1 else 0, dtype=np.int32)
    if isinstance(keys, KeyRange):
        head = zlib.crc32(keys.name.encode())
        sufs = _suffixes(keys.stop)[keys.start:keys.stop]
        crc = np.fromiter(map(zlib.crc32, sufs, itertools.repeat(head, len(sufs))), np.uint32, len(sufs))
        return np.flatnonzero(crc % np.uint32(score_every) == 0).astype(np.int32)
    return np.fromiter((i for i, k in enumerate(keys) if zlib.crc32(k.encode()) % score_every == 0), np.int32)


class Scored(NamedTuple):
    """The codes of one RecordBatch, the ELBO (nats) of its scored records (``[m]``, ``m <= n``: those of
    :func:`scored_rows`, in order) and, when the model has coder tables, its quantised codes (int32 ``[n, Nz]``,
    :func:`vaestream.coding.tables.quantize` of ``codes.mean``; else None). The pane writer entropy-codes a
    pane's symbols as one container (:class:`vaestream.beam.panes.WriteWindowFn`): one container per pane, not
    one per batch packed again (a container's frames and index cost per call, ~1.8 us a record at 100 records
    a broker message)."""

    codes: vb.CodeBatch
    elbo: np.ndarray
    symbols: np.ndarray | None


class ScoredBatch(tuple):
    """The :class:`Scored` of one model call (a broker step's messages of one window): one element through the
    pane's GroupByKey, whose per-element costs (windowing, triggers) would otherwise be paid per message."""


class ScoringModelHandler(vb.VAEModelHandler):
    """:class:`vaestream.beam.VAEModelHandler` (encode mode) that also returns the ELBO (estimator B with fixed
    noise, as the export's ``elbo`` signature) of the records :func:`scored_rows` picks (one in
    ``score_every``) and, when the model has coder tables, the batch's quantised codes: predictions are
    :class:`Scored`."""

    def __init__(self, model_dir: str | None = None, saved_model: str | None = None, max_records: int = vb.CHUNK,
                 coder: bool | None = None, quality: float | None = None, score_every: int = 1):
        super().__init__(model_dir, saved_model, "encode", max_records, coder=False)
        if int(score_every) != score_every or int(score_every) < 0:
            from vaestream.errors import ConfigError

            raise ConfigError(f"score_every must be a non-negative integer (0: no ELBO), got {score_every}")
        self.use_coder, self.quality, self.score_every = coder, quality, int(score_every)

    def load_model(self):
        """The scoring model: from this process's cache when the same model (same directory files, same
        coder settings) was loaded before, else loaded (and cached, the ``CACHE_SIZE`` latest kept)."""
        stamp = dir_stamp(self.model_dir if self.model_dir is not None else self.saved_model)
        key = None if stamp is None else (self.model_dir, self.saved_model, self.use_coder, self.quality) + stamp
        with _CACHE_LOCK:
            if key is not None and key in _CACHE:
                _CACHE.move_to_end(key)
                return _CACHE[key]
        model = self._load()
        if key is not None:
            with _CACHE_LOCK:
                _CACHE[key] = model
                while len(_CACHE) > CACHE_SIZE:
                    _CACHE.popitem(last=False)
        return model

    def _load(self):
        import tensorflow as tf

        from vaestream.coding import codec as codec_mod
        from vaestream.errors import ModelError

        model = super().load_model()
        d = model.config.input_dim
        if model.vae is not None:
            vae = model.vae

            def scored(x, rows):  # the codes of every record, the ELBO of x[rows]
                mean, log_scale = vae.encoder_params_exact(x)
                return mean, log_scale, elbo_from_posterior(vae, tf.gather(x, rows), tf.gather(mean, rows),
                                                            tf.gather(log_scale, rows))

            # one trace for every batch size (no XLA: a recompilation per padded size costs seconds)
            rows_spec = tf.TensorSpec([None], tf.int32)
            score = tf.function(scored, input_signature=[tf.TensorSpec([None, d], tf.float32), rows_spec],
                                autograph=False)

            # uint8 records go in as they are stored (a quarter of the bytes to copy) and become model inputs in
            # the graph: float32(count) * float32(scale), one IEEE multiply, the same values as
            # RecordBatch.inputs()
            @tf.function(input_signature=[tf.TensorSpec([None, d], tf.uint8), tf.TensorSpec([], tf.float32),
                                          rows_spec], autograph=False)
            def score_counts(counts, scale, rows):
                return scored(tf.cast(counts, tf.float32) * scale, rows)

            def score_fn(x, rows, scale=None):
                rows = tf.constant(rows, tf.int32)
                if x.dtype == np.uint8 and scale is not None:
                    m, ls, e = score_counts(tf.constant(x), tf.constant(scale, tf.float32), rows)
                else:
                    m, ls, e = score(tf.constant(x if scale is None else x * np.float32(scale), tf.float32), rows)
                return m.numpy(), ls.numpy(), e.numpy()
        else:
            saved = model.saved

            def score_fn(x, rows, scale=None):
                if scale is not None:
                    x = np.asarray(x, np.float32) * np.float32(scale)
                if hasattr(saved, "encode") and hasattr(saved, "elbo"):  # a vaestream.serving.export.ExportedModel
                    m, ls = saved.encode(x)
                    return m, ls, saved.elbo(x[rows])["elbo"] if len(rows) else np.zeros(0, np.float32)
                m, ls = model.encode(x, 1.0)
                e = (saved.signatures["elbo"](x=tf.constant(x[rows]))["elbo"].numpy() if len(rows)
                     else np.zeros(0, np.float32))
                return m, ls, e
        model.score_fn = score_fn
        # build the traces now, before the first window's records wait on them
        score_fn(np.zeros((1, d), np.float32), np.zeros(1, np.int32))
        score_fn(np.zeros((1, d), np.uint8), np.zeros(1, np.int32), 1.0 / 255.0)
        model.codec = None
        if self.use_coder is not False:
            try:
                model.codec = codec_mod.load(self.model_dir or self.saved_model, quality=self.quality)
            except ModelError:
                if self.use_coder:
                    raise
            if model.codec is not None and model.codec.fingerprint != model.fingerprint:
                raise ModelError(f"{self.model_dir or self.saved_model}: coder tables of another model")
        return model

    def run_inference(self, batch, model, inference_args=None) -> list:
        from vaestream.coding.tables import quantize

        if not batch:
            return []
        picked = [scored_rows(b.keys, self.score_every) for b in batch]
        starts = np.cumsum([0] + [len(b) for b in batch])
        rows = np.concatenate([p + s for p, s in zip(picked, starts)]).astype(np.int32)
        scale = batch[0].scale if batch[0].scale is not None else 1.0
        if all(b.records.dtype == np.uint8 and (b.scale if b.scale is not None else 1.0) == scale for b in batch):
            d = model.config.input_dim   # stored counts, converted in the graph
            x = batch[0].records.reshape(-1, d) if len(batch) == 1 else \
                np.concatenate([b.records.reshape(-1, d) for b in batch])
            outs = model.score_fn(x, rows, scale)
        else:
            outs = model.score_fn(batch[0].inputs() if len(batch) == 1 else
                                  np.concatenate([b.inputs() for b in batch]), rows)
        mean, log_scale, elbo = (np.asarray(a, np.float32) for a in outs)
        # quantised once for the call (the same values row by row as per batch: an elementwise map)
        sym = quantize(mean, model.codec.tables, model.codec.quality) if model.codec is not None else None
        out, e = [], 0
        for b, p, s in zip(batch, picked, starts):
            n = len(b)
            cb = vb.CodeBatch(b.source, b.keys, mean[s:s + n], log_scale[s:s + n], model.fingerprint, None,
                              int(b.records.nbytes))
            out.append(Scored(cb, elbo[e:e + len(p)], None if sym is None else sym[s:s + n]))
            e += len(p)
        return out
