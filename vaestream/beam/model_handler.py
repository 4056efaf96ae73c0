"""The model in a Beam job: :class:`LoadedVAE` (a model directory or a SavedModel export, batch-polymorphic
compiled functions) and :class:`VAEModelHandler`, the ``ModelHandler`` that ``RunInference`` loads once per worker."""

from __future__ import annotations

import json
import os
import weakref
from typing import Any, Sequence

import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelHandler

from vaestream.beam.elements import CHUNK, CODERS, CodeBatch, RecordBatch
from vaestream.errors import DataError, ModelError, ModelMismatchError


class LoadedVAE:
    """A VAE ready for batched inference, from a model directory or a SavedModel export.

    * ``encode(records [n, ...], scale) -> (mean [n, Nz], log_scale [n, Nz])`` float32: the parameters of
      q(z|x) for x = records * scale (records may stay uint8: the cast happens inside the compiled function).
    * ``decode(z [n, Nz]) -> x_mean [n, D]`` float32: the mean of p(x|z) (Bernoulli: sigmoid(logits)).
    * ``fingerprint``: the model's 64-hex SHA-256 (:meth:`vaestream.model.VAE.fingerprint`).
    * ``config``: its :class:`vaestream.config.ModelConfig`.

    A SavedModel written by :func:`vaestream.serving.export.export` (a version directory, or an export base whose
    latest version is taken) is read through :class:`vaestream.serving.export.ExportedModel`: its ``encode`` and
    ``decode`` signatures, ``assets/config.json`` and ``assets/fingerprint.txt``. Any other SavedModel must
    provide ``encode`` and ``decode`` (as attributes or signatures; outputs a dict
    with ``mean``/``log_scale`` and ``x_mean``, or tensors in that order) and its fingerprint as an attribute
    ``fingerprint`` (a string tensor/variable or a function returning one) or as ``"fingerprint"`` in a
    ``vaestream.json``/``metadata.json`` next to ``saved_model.pb`` or under ``assets/``; the model config as
    ``config.json`` there, or inside that JSON under ``"config"``.
    """

    def __init__(self, config, fingerprint: str, encode_fn, decode_fn, source: str):
        self.config = config
        self.fingerprint = fingerprint
        self._encode = encode_fn
        self._decode = decode_fn
        self.source = source

    def encode(self, records: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
        import tensorflow as tf

        x = np.asarray(records).reshape(len(records), -1)
        if x.dtype not in (np.uint8, np.float32):
            x = x.astype(np.float32)
        mean, log_scale = self._encode(tf.constant(x), tf.constant(scale, tf.float32))
        return np.asarray(mean, np.float32), np.asarray(log_scale, np.float32)

    def decode(self, z: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        return np.asarray(self._decode(tf.constant(np.asarray(z, np.float32))), np.float32)

    def decode_uint8(self, z: np.ndarray) -> np.ndarray:
        """``z [n, Nz] -> uint8 [n, D]``: :meth:`decode`'s x_mean stored as round(255 x), clipped to 0..255
        (rounding half to even), bit for bit :func:`round_uint8` of :meth:`decode`. A model directory rounds
        inside its compiled decoder (one TensorFlow call, no float32 copy of the batch in NumPy); other
        models round the decoded floats in NumPy."""
        import tensorflow as tf

        fused = getattr(self, "_decode_uint8", None)
        if fused is None:
            return round_uint8(self.decode(z))
        return np.asarray(fused(tf.constant(np.asarray(z, np.float32))))

    @classmethod
    def load(cls, model_dir: str | None = None, saved_model: str | None = None, reuse: bool = False
             ) -> "LoadedVAE":
        """Load a model directory or a SavedModel export (exactly one).

        ``reuse``: return the LoadedVAE of the same local directory that is still alive in this process (held
        by someone else, e.g. a job's fingerprint check while the job's workers load the model), if the
        directory's files (names, sizes, modification times) are unchanged since it was loaded; otherwise load
        it (and remember it, weakly: it goes when its last holder drops it).
        """
        if (model_dir is None) == (saved_model is None):
            raise ModelError("give exactly one of model_dir, saved_model")
        key = dir_stamp(model_dir if model_dir is not None else saved_model) if reuse else None
        if key is not None:
            key = (model_dir, saved_model) + key
            live = _LIVE_MODELS.get(key)
            if live is not None:
                return live
        model = cls.from_model_dir(model_dir) if model_dir is not None else cls.from_saved_model(saved_model)
        if key is not None:
            _LIVE_MODELS[key] = model
        return model

    @property
    def vae(self):
        """The :class:`vaestream.model.VAE` when loaded from a model directory, else None."""
        return getattr(self, "_model", None)

    @property
    def saved(self):
        """The loaded SavedModel (an ``ExportedModel`` for a vaestream export) when loaded from one, else None."""
        return getattr(self, "_saved", None)

    @classmethod
    def from_model_dir(cls, model_dir: str, jit: bool = False) -> "LoadedVAE":
        """Load a model directory; the encoder and decoder run as compiled ``tf.function`` graphs (with
        ``jit``, XLA-compiled, batches padded to powers of two to bound recompilation; on CPU the plain graph
        is as fast and needs no compilation time)."""
        import tensorflow as tf

        from vaestream.store import load_model

        model = load_model(model_dir)

        # Without jit the networks run in fixed row blocks (vaestream.layers.blocked): codes and reconstructions
        # are bit-identical to the codec's and the SavedModel's for any batching. XLA (jit) compiles other
        # kernels: its outputs are deterministic per shape but not those bits.
        @tf.function(jit_compile=jit, reduce_retracing=True, autograph=False)
        def enc(x, scale):
            x = tf.cast(x, tf.float32) * scale
            return model.encoder_params(x) if jit else model.encoder_params_exact(x)

        @tf.function(jit_compile=jit, reduce_retracing=True, autograph=False)
        def dec(z):
            return (model.decoder_params(z) if jit else model.decoder_params_exact(z))["x_mean"]

        if jit:
            pad = _pad_rows
        else:
            # one trace per input dtype, for any batch length ([None, D]): a job's short last batch neither
            # retraces nor reuses a shape-specialised graph
            pad = (lambda t: t)
            enc = _batch_polymorphic(enc, tf.TensorSpec([], tf.float32))
            dec = _batch_polymorphic(dec)

        def encode_fn(x, s):
            n = int(x.shape[0])
            mean, log_scale = enc(pad(x), s)
            return mean.numpy()[:n], log_scale.numpy()[:n]

        def decode_fn(z):
            n = int(z.shape[0])
            return dec(pad(z)).numpy()[:n]

        out = cls(model.config, model.fingerprint(), encode_fn, decode_fn, str(model_dir))
        out._model = model
        if not jit:  # (XLA's kernels give other bits: the jit decoder rounds in NumPy)
            @tf.function(reduce_retracing=True, autograph=False)
            def dec_u8(z):
                return round_uint8_tf(model.decoder_params_exact(z)["x_mean"])

            dec_u8 = _batch_polymorphic(dec_u8)
            out._decode_uint8 = lambda z: dec_u8(z).numpy()
        return out

    @classmethod
    def from_saved_model(cls, path: str) -> "LoadedVAE":
        import tensorflow as tf

        from vaestream.config import ModelConfig

        exported = _vaestream_export(path)
        if exported is not None:
            em = exported
            enc_sig, dec_sig = em.signatures["encode"], em.signatures["decode"]
            enc_arg = list(enc_sig.structured_input_signature[1])[0]
            dec_arg = list(dec_sig.structured_input_signature[1])[0]

            def encode_fn(x, scale):
                out = enc_sig(**{enc_arg: tf.cast(x, tf.float32) * scale})
                return out["mean"].numpy(), out["log_scale"].numpy()

            def decode_fn(z):
                return dec_sig(**{dec_arg: z})["x_mean"].numpy()

            out = cls(em.config, em.fingerprint, encode_fn, decode_fn, str(em.path))
            out._saved = em
            return out
        try:
            obj = tf.saved_model.load(path)
        except (OSError, tf.errors.OpError, ValueError) as e:
            raise ModelError(f"{path}: not a loadable SavedModel ({e})") from e
        meta = {}
        for name in ("vaestream.json", "metadata.json", "assets/vaestream.json", "assets/metadata.json"):
            p = f"{path.rstrip('/')}/{name}"
            if FileSystems.exists(p):
                with FileSystems.open(p) as f:
                    meta = json.loads(f.read().decode())
                break
        config = None
        for name in ("config.json", "assets/config.json"):
            p = f"{path.rstrip('/')}/{name}"
            if FileSystems.exists(p):
                with FileSystems.open(p) as f:
                    config = ModelConfig.from_json(f.read().decode())
                break
        if config is None and isinstance(meta.get("config"), dict):
            config = ModelConfig.from_dict(meta["config"])
        if config is None:
            raise ModelError(f"{path}: SavedModel has no config.json (nor 'config' in vaestream.json)")
        fp = meta.get("fingerprint")
        if fp is None and hasattr(obj, "fingerprint"):
            v = obj.fingerprint
            v = v() if callable(v) else v
            fp = v.numpy().decode() if hasattr(v, "numpy") else str(v)
        if not fp:
            raise ModelError(f"{path}: SavedModel carries no model fingerprint")
        enc = _saved_fn(obj, "encode", path)
        dec = _saved_fn(obj, "decode", path)

        def encode_fn(x, scale):
            xf = tf.cast(x, tf.float32) * scale
            out = enc(xf)
            if isinstance(out, dict):
                return out["mean"].numpy(), out["log_scale"].numpy()
            return out[0].numpy(), out[1].numpy()

        def decode_fn(z):
            out = dec(z)
            if isinstance(out, dict):
                out = out["x_mean"]
            elif isinstance(out, (list, tuple)):
                out = out[0]
            return out.numpy()

        out = cls(config, fp, encode_fn, decode_fn, str(path))
        out._saved = obj  # the restored functions hold their variables weakly: keep the object alive
        return out


def round_uint8(x: np.ndarray) -> np.ndarray:
    """Float reconstructions x in [0, 1] -> uint8 round(255 x) (half to even), clipped to 0..255: the decode
    job's ``--output_dtype uint8``."""
    return np.clip(np.round(np.asarray(x, np.float32) * 255.0), 0, 255).astype(np.uint8)


def round_uint8_tf(x):
    """:func:`round_uint8` as TensorFlow ops (the same float32 product, rounding half to even, clip and cast:
    the same bits), for use inside a compiled function."""
    import tensorflow as tf

    return tf.cast(tf.clip_by_value(tf.round(x * tf.constant(255.0, tf.float32)), 0.0, 255.0), tf.uint8)


def _batch_polymorphic(fn, *rest_specs):
    """``fn(t, *rest)`` (a ``tf.function``) traced once per dtype and record shape of ``t``, for batches of any
    length (``TensorSpec([None, ...])``); ``rest_specs`` are the specs of the other arguments."""
    import tensorflow as tf

    traced: dict = {}

    def call(t, *rest):
        key = (t.dtype, tuple(t.shape[1:]))
        f = traced.get(key)
        if f is None:
            f = traced[key] = fn.get_concrete_function(tf.TensorSpec([None, *key[1]], t.dtype), *rest_specs)
        return f(t, *rest)

    return call


_LIVE_MODELS: "weakref.WeakValueDictionary[tuple, LoadedVAE]" = weakref.WeakValueDictionary()


def dir_stamp(path: str) -> tuple | None:
    """(relative name, size, mtime in ns) of every file under a local directory, sorted; None for a remote or
    missing path (never reused)."""
    if "://" in str(path) or not os.path.isdir(path):
        return None
    out = []
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except OSError:
                return None
            out.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return (os.path.abspath(path),) + tuple(sorted(out))


def _vaestream_export(path: str):
    """``vaestream.serving.export.ExportedModel`` of ``path`` (a version directory or an export base whose latest
    version is taken) when it is in that layout (``assets/config.json`` + ``assets/fingerprint.txt``), else
    None."""
    try:
        from vaestream.serving.export import ExportedModel, resolve_export
    except ModuleNotFoundError:
        return None
    try:
        version_dir = resolve_export(path)
    except ModelError:
        return None
    if not (version_dir / "assets" / "fingerprint.txt").is_file():
        return None
    from vaestream.serving.learned_export import refuse_learned_export

    refuse_learned_export(version_dir, "a Beam model handler (--saved_model)")  # one rate level, not the coder
    return ExportedModel(version_dir)


def _pad_rows(x):
    """Pad ``x`` [n, ...] with zero rows to the next power of two (at least 64), so the XLA-compiled model
    sees a handful of batch shapes instead of one per distinct batch length."""
    import tensorflow as tf

    n = int(x.shape[0])
    size = max(64, 1 << max(0, (n - 1).bit_length()))
    if size == n:
        return x
    return tf.concat([x, tf.zeros([size - n] + list(x.shape[1:]), x.dtype)], 0)


def _saved_fn(obj, name: str, path: str):
    fn = getattr(obj, name, None)
    if callable(fn):
        return fn
    sig = getattr(obj, "signatures", {}).get(name)
    if sig is not None:
        arg = list(sig.structured_input_signature[1].keys())[0]
        return lambda t: sig(**{arg: t})
    raise ModelError(f"{path}: SavedModel has no '{name}' function or signature")


def read_model_config(model_dir: str | None = None, saved_model: str | None = None):
    """The ModelConfig of a model directory or SavedModel export, without loading weights."""
    from vaestream.config import ModelConfig
    from vaestream.store import read_config

    if model_dir is not None:
        return read_config(model_dir)
    try:
        from vaestream.serving.export import resolve_export

        saved_model = str(resolve_export(saved_model))
    except (ModuleNotFoundError, ModelError):
        pass
    for name in ("config.json", "assets/config.json"):
        p = f"{str(saved_model).rstrip('/')}/{name}"
        if FileSystems.exists(p):
            with FileSystems.open(p) as f:
                return ModelConfig.from_json(f.read().decode())
    for name in ("vaestream.json", "metadata.json", "assets/vaestream.json", "assets/metadata.json"):
        p = f"{str(saved_model).rstrip('/')}/{name}"
        if FileSystems.exists(p):
            with FileSystems.open(p) as f:
                meta = json.loads(f.read().decode())
            if isinstance(meta.get("config"), dict):
                return ModelConfig.from_dict(meta["config"])
    raise ModelError(f"{saved_model}: no model config found")


class VAEModelHandler(ModelHandler):
    """A Beam ``ModelHandler`` for :class:`LoadedVAE`: elements are :class:`RecordBatch` (``mode="encode"``,
    predictions :class:`CodeBatch`) or :class:`CodeBatch` (``mode="decode"``, predictions
    :class:`RecordBatch` of reconstructions x_mean, float32 ``[n, *input_shape]``).

    ``RunInference`` loads the model once per worker process (``load_model``) and hands ``run_inference``
    lists of elements (``BatchElements`` up to ``max_records`` records a call); each call concatenates them
    into one TF call and splits the result back. In decode mode every element's fingerprint must equal the
    model's, else :class:`vaestream.errors.ModelMismatchError`.

    Args:
      coder: encode mode: ``None``/``False`` returns float codes. ``"lossy"`` (or ``True``) entropy-codes the
        latents: ``vaestream.coding.codec.load(model)`` quantises each element's posterior means (one model
        call, ``codec.encode``) and codes them into one container per element (``codec.compress_codes``); needs
        the model's coder tables (``coder_tables.npz``, see :func:`vaestream.coding.codec.write_tables`).
        ``"lossless"`` codes each element's records exactly by bits-back ANS
        (:class:`vaestream.coding.bitsback.coder.LosslessCoder`, the vectorised coder; one container per element);
        needs a model directory with a discrete likelihood (``beta_binomial``: counts 0..255, ``bernoulli``:
        0/1) and records validated as uint8 counts (:func:`lossless_validate`). Either way the element becomes
        a coded :class:`CodeBatch`. Decode mode reads coded batches whatever this flag says: the container's
        header says which coder wrote it (lossless streams decode to the exact uint8 counts).
      levels, reconstruction: with ``coder="lossless"``: near-lossless coding, each pixel rounded to the
        nearest of ``levels`` (2..64) levels first (:class:`vaestream.coding.bitsback.coder.LosslessCoder`); None:
        exact. Decode mode reads them from the stream.
      rdo_lmbda: with ``coder="lossy"`` (a model directory): rate-distortion optimised codes
        (:mod:`vaestream.coding.rdo`, ``codec.encode(..., rdo_lmbda=)``): ordinary streams, slower encoding.
      output_dtype: decode mode: ``"uint8"`` decodes float codes straight to uint8 round(255 x)
        (:meth:`LoadedVAE.decode_uint8`: the rounding inside the compiled decoder; records scaled 1/255, as
        :func:`vaestream.beam.transforms.quantize_batch` makes them); ``"float32"``: x_mean as float32.
    """

    def __init__(self, model_dir: str | None = None, saved_model: str | None = None, mode: str = "encode",
                 max_records: int = CHUNK, coder: bool = False, levels: int | None = None,
                 reconstruction: str = "level", rdo_lmbda: float | None = None, output_dtype: str = "float32"):
        # BatchElements sizes batches by the sum of element_size_fn: records, not elements.
        super().__init__(min_batch_size=1, max_batch_size=max(1, max_records), element_size_fn=len)
        if mode not in ("encode", "decode"):
            raise ModelError(f"mode {mode!r} is not one of encode, decode")
        if (model_dir is None) == (saved_model is None):
            raise ModelError("give exactly one of model_dir, saved_model")
        coder = coder_kind(coder)
        if coder == "lossless" and model_dir is None:
            raise ModelError(f"{saved_model}: lossless coding needs the model directory (its exact float64 "
                             "networks), not a SavedModel export")
        if levels is not None and coder != "lossless":
            raise ModelError(f"levels {levels} (near-lossless) is for the lossless coder, not {coder!r}")
        if rdo_lmbda is not None:
            from vaestream.coding.rdo import check_lmbda

            check_lmbda(rdo_lmbda)
            if coder != "lossy" or model_dir is None:
                raise ModelError("rdo_lmbda (rate-distortion optimised codes) is for the lossy coder of a model "
                                 "directory")
        self.model_dir, self.saved_model, self.mode, self.coder = model_dir, saved_model, mode, coder
        self.levels, self.reconstruction, self.rdo_lmbda = levels, reconstruction, rdo_lmbda
        if output_dtype not in ("float32", "uint8"):
            raise DataError(f"output dtype {output_dtype!r} is not one of float32, uint8")
        self.output_dtype = output_dtype

    def key(self) -> tuple:
        """What identifies the model this handler loads (the ``shared.Shared`` tag)."""
        return (self.model_dir, self.saved_model, self.mode, self.coder, self.levels, self.reconstruction,
                self.rdo_lmbda)

    def load_model(self) -> LoadedVAE:
        """The model (with its coder when ``coder``); reuses one that is alive in this process for the same,
        unchanged directory (``LoadedVAE.load(reuse=True)``), e.g. the decode job's fingerprint check's."""
        import copy

        # a shallow copy: the weights and compiled functions are shared, the coder is this handler's own
        model = copy.copy(LoadedVAE.load(self.model_dir, self.saved_model, reuse=True))
        model.codec = None
        model.lossless = None
        if self.coder == "lossy":
            _attach_codec(model, self.model_dir)
        elif self.coder == "lossless":
            _attach_lossless(model, self.levels, self.reconstruction, self.model_dir)
        return model

    def run_inference(self, batch: Sequence[Any], model: LoadedVAE, inference_args=None) -> list:
        if not batch:
            return []
        if self.mode == "encode":
            return self.encode_batches(batch, model)
        return self.decode_batches(batch, model)

    def encode_batches(self, batch: Sequence[RecordBatch], model: LoadedVAE) -> list[CodeBatch]:
        """Record batches -> code batches (one model call per distinct dtype and scale, or per batch with a coder)."""
        if self.coder == "lossless":  # the records themselves, exactly: one bits-back container per element
            return [CodeBatch(b.source, b.keys, None, None, model.fingerprint,
                              model.lossless.compress(b.records, name=f"{b.source} {b.keys[0]}.."),
                              int(b.records.nbytes)) for b in batch]
        if self.coder == "lossy":  # one model call per element (the codec's), one container per element
            coded = []
            for b in batch:
                symbols = np.asarray(model.codec.encode(b.inputs(), rdo_lmbda=self.rdo_lmbda)).reshape(len(b), -1)
                coded.append(CodeBatch(b.source, b.keys, None, None, model.fingerprint,
                                       bytes(model.codec.compress_codes(symbols)), int(b.records.nbytes)))
            return coded
        groups: dict[tuple, list[int]] = {}
        for i, b in enumerate(batch):
            groups.setdefault((b.records.dtype.str, b.scale), []).append(i)
        results: dict[int, CodeBatch] = {}
        for (_, scale), idx in groups.items():
            # (one element: its records as read, no copy)
            recs = (batch[idx[0]].records.reshape(len(batch[idx[0]]), -1) if len(idx) == 1 else
                    np.concatenate([batch[i].records.reshape(len(batch[i]), -1) for i in idx]))
            mean, log_scale = model.encode(recs, 1.0 if scale is None else scale)
            s = 0
            for i in idx:
                b = batch[i]
                n = len(b)
                results[i] = CodeBatch(b.source, b.keys, mean[s:s + n], log_scale[s:s + n], model.fingerprint, None,
                                       int(b.records.nbytes))
                s += n
        out = [results[i] for i in range(len(batch))]
        return out

    def decode_batches(self, batch: Sequence[CodeBatch], model: LoadedVAE) -> list[RecordBatch]:
        """Code batches -> reconstructions, refusing codes of another model. Each container is opened as
        :func:`vaestream.coding.open_stream` opens it (one :class:`~vaestream.coding.streams.StreamOpener` per
        loaded model: the decoder of each kind of stream is built once)."""
        for b in batch:
            if b.fingerprint != model.fingerprint:
                raise ModelMismatchError(
                    f"{b.source}: codes were written by model {b.fingerprint[:16]}..., the model given "
                    f"({model.source}) is {model.fingerprint[:16]}...; decode them with the model that encoded them")
        from vaestream.coding.bitsback.coder import LosslessCoder
        from vaestream.coding.streams import StreamOpener

        shape = tuple(model.config.input_shape)
        floats = [b for b in batch if not b.coded]
        z = (floats[0].mean if len(floats) == 1 else np.concatenate([b.mean for b in floats])) if floats else None
        as_uint8 = getattr(self, "output_dtype", "float32") == "uint8"
        x = (model.decode_uint8(z) if as_uint8 else model.decode(z)) if floats else None
        x_scale = 1.0 / 255.0 if as_uint8 else 1.0
        out, s = [], 0
        for b in batch:
            n = len(b)
            if b.coded:
                name = f"{b.source} {b.keys[0] if n else ''}.."
                if getattr(model, "opener", None) is None:
                    model.opener = StreamOpener(self.model_dir if self.model_dir is not None else model.source)
                coder = model.opener.open(b.container, name=name)
                rec = np.asarray(coder.decompress(b.container, name=name))
                if isinstance(coder, LosslessCoder):  # the exact counts; scale: the model's input scaling
                    scale = 1.0 / 255.0 if model.config.likelihood == "beta_binomial" else 1.0
                else:
                    rec, scale = rec.astype(np.float32), 1.0
                if len(rec) != n:
                    raise DataError(f"{b.source}: a coded batch lists {n} keys but its container holds "
                                    f"{len(rec)} records")
                out.append(RecordBatch(b.source, b.keys, rec.reshape((n,) + shape), scale))
                continue
            out.append(RecordBatch(b.source, b.keys, x[s:s + n].reshape((n,) + shape), x_scale))
            s += n
        return out

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return int(sum(b.records.nbytes if isinstance(b, RecordBatch) else b.nbytes for b in batch))

    def get_metrics_namespace(self) -> str:
        return "vaestream.RunInference"


def _attach_codec(model: LoadedVAE, model_dir: str | None) -> None:
    """Give ``model`` its coder (``model.codec``), checked to belong to the same model."""
    from vaestream.coding import codec

    model.codec = codec.load(model_dir if model_dir is not None else model.source)
    if getattr(model.codec, "fingerprint", model.fingerprint) != model.fingerprint:
        raise ModelMismatchError(f"{model.source}: the coder tables belong to another model")


def coder_kind(coder: bool | str | None) -> str | None:
    """The encode job's ``--coder`` value -> ``None`` (float codes), ``"lossy"`` or ``"lossless"``
    (``True``, the flag given alone, is ``"lossy"``: the flag's meaning before lossless coding)."""
    if coder is None or coder is False:
        return None
    if coder is True:
        return "lossy"
    if coder not in CODERS:
        raise ModelError(f"coder {coder!r} is not one of {', '.join(CODERS)}")
    return coder


def lossless_validate(likelihood: str) -> dict:
    """The :func:`vaestream.beam.validate_batch` arguments that make records fit for lossless coding: stored
    as uint8 counts (whole numbers 0..255), and at most 1 for a ``bernoulli`` model (binary records)."""
    from vaestream.coding.bitsback.coder import LIKELIHOODS

    if likelihood not in LIKELIHOODS:
        raise ModelError(f"lossless coding needs a discrete likelihood ({', '.join(LIKELIHOODS)}); this model's "
                         f"is {likelihood}")
    return {"dtype": "uint8", "levels": 255 if likelihood == "beta_binomial" else 1}


def _attach_lossless(model: LoadedVAE, levels: int | None = None, reconstruction: str = "level",
                     model_dir: str | None = None) -> None:
    """Give ``model`` its bits-back coder (``model.lossless``; near-lossless with ``levels``), built as
    :func:`vaestream.coding.open_stream` builds it (:func:`vaestream.coding.family.bitsback_coder`: with the
    pixel context models of the model directory, so context-coded streams decode too); it needs the model
    directory's VAE."""
    from vaestream.coding.family import bitsback_coder

    if model.vae is None:
        raise ModelError(f"{model.source}: lossless coding needs the model directory, not a SavedModel export")
    model.lossless = bitsback_coder(model_dir if model_dir is not None else model.source, levels, reconstruction,
                                    model=model.vae)
