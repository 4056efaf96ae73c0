"""The codec: records -> quantised latent codes -> entropy-coded bytes, and back.

    codec = vaestream.coding.codec.load(model_dir_or_export)
    codes = codec.encode(x)          # int32 [B, Nz]: round(mu(x) / delta), see vaestream.coding.tables
    x_hat = codec.decode(codes)      # float32 [B, D]: the decoder mean at z_hat = codes * delta
    blob = codec.compress(x)         # bytes: a self-describing container (vaestream.coding.container)
    x_hat = codec.decompress(blob)   # == codec.decode(codec.encode(x)), bit for bit

Determinism: decoding is a pure function of the bitstream. The codes decode to the same integers on any
machine, since the entropy model is the stored integer tables; the pixels are then the decoder network's
float32 output at z_hat = codes * delta, evaluated in fixed blocks of ``vaestream.model.BLOCK_ROWS`` rows
(:func:`vaestream.model.blocked`), so a record's reconstruction is bit-identical whether it is decoded
alone, in any batch, by random access, by the Beam decode job, through the SavedModel's ``decode`` /
``reconstruct`` signatures or in another process with another thread count (same TensorFlow build and CPU
kind). Encoding runs the same way, so a record's codes do not depend on its batch either.

``x`` is one record (``[D]`` or ``input_shape``) or a batch (``[B, D]`` or ``[B, *input_shape]``); uint8
records are scaled by 1/255 like the training data. Single records give single results.

A codec is backed by either a model directory (``config.json`` + ``ckpt/``; the coder tables live in
``MODEL_DIR/coder_tables.npz``, built once by :func:`write_tables` from calibration records) or a
SavedModel export (``saved_model.pb`` with signatures ``encode(x) -> {mean, log_scale}`` and
``decode(z) -> {x_mean, ...}`` and assets ``config.json``, ``fingerprint.txt``, ``coder_tables.npz``), which
needs no model code.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np

from vaestream.coding import container, rdo
from vaestream.coding.range_coder import EntropyCoder
from vaestream.coding.tables import DEFAULT_QUALITIES, CoderTables, build_tables_from_stats, dequantize, quantize
from vaestream.config import ModelConfig
from vaestream.errors import BitstreamError, ConfigError, DataError, ModelError, ModelMismatchError

TABLES_FILE = "coder_tables.npz"
DEFAULT_FRAME_RECORDS = 1024
_BATCH = 4096


class _ModelBackend:
    """A VAE in this process (from a model directory)."""

    def __init__(self, model):
        import tensorflow as tf

        self.model = model
        self.config: ModelConfig = model.config
        self.fingerprint: str = model.fingerprint()
        d, nz = self.config.input_dim, self.config.latent_dim
        # blocked (vaestream.model.blocked): a record's codes and reconstruction never depend on its batch
        self._enc = tf.function(model.encoder_params_exact, input_signature=[tf.TensorSpec([None, d], tf.float32)])
        self._dec = tf.function(lambda z: model.decoder_params_exact(z)["x_mean"],
                                input_signature=[tf.TensorSpec([None, nz], tf.float32)])

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, log_scale = self._enc(x)
        return mean.numpy(), log_scale.numpy()

    def decode(self, z: np.ndarray) -> np.ndarray:
        return self._dec(z).numpy()


class _SavedModelBackend:
    """A SavedModel export: signatures ``encode`` and ``decode`` and the assets, no model code."""

    def __init__(self, path: Path):
        import tensorflow as tf

        assets = path / "assets"
        for name in ("config.json", "fingerprint.txt", TABLES_FILE):
            if not (assets / name).is_file():
                raise ModelError(f"{path}: SavedModel export lacks assets/{name}")
        self.config = ModelConfig.from_json((assets / "config.json").read_text())
        self.fingerprint = (assets / "fingerprint.txt").read_text().strip()
        if len(self.fingerprint) != 64 or any(c not in "0123456789abcdef" for c in self.fingerprint):
            raise ModelError(f"{path}: assets/fingerprint.txt is not 64 hex digits")
        try:
            self._obj = tf.saved_model.load(str(path))
        except Exception as e:  # TF raises many kinds on a broken export
            raise ModelError(f"{path}: not a loadable SavedModel ({e})") from e
        sigs = self._obj.signatures
        for name in ("encode", "decode"):
            if name not in sigs:
                raise ModelError(f"{path}: SavedModel has no '{name}' signature (has {sorted(sigs)})")
        self._enc, self._dec = sigs["encode"], sigs["decode"]
        self._enc_arg = next(iter(self._enc.structured_input_signature[1]))
        self._dec_arg = next(iter(self._dec.structured_input_signature[1]))

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import tensorflow as tf

        out = self._enc(**{self._enc_arg: tf.constant(x, tf.float32)})
        return out["mean"].numpy(), out["log_scale"].numpy()

    def decode(self, z: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        return self._dec(**{self._dec_arg: tf.constant(z, tf.float32)})["x_mean"].numpy()


class Codec:
    """Compresses records with a VAE and its coder tables (see the module docstring).

    Args:
      backend: the model (internal; use :func:`load`).
      tables: the :class:`vaestream.coding.tables.CoderTables` of this model.
      quality: the default quality (a step of the tables' ladder; 1.0 if None).
      frame_records: records per container frame (the unit of random access).
    """

    def __init__(self, backend, tables: CoderTables, quality: float | None = None,
                 frame_records: int = DEFAULT_FRAME_RECORDS, name: str = "model"):
        if tables.fingerprint != backend.fingerprint:
            raise ModelMismatchError(f"{name}: coder tables were built for model {tables.fingerprint[:16]}..., not "
                                     f"this model ({backend.fingerprint[:16]}...); rebuild them "
                                     "(vaestream.coding.codec.write_tables)")
        if tables.latent_dim != backend.config.latent_dim:
            raise ModelError(f"{name}: coder tables have {tables.latent_dim} latent dims, the model "
                             f"{backend.config.latent_dim}")
        if not 1 <= frame_records <= container.MAX_FRAME_RECORDS:
            raise ConfigError(f"frame_records must be in [1, {container.MAX_FRAME_RECORDS}], got {frame_records}")
        self._backend = backend
        self.tables = tables
        self.name = name
        self.frame_records = int(frame_records)
        self._digest = tables.digest()
        self._coders: dict[int, EntropyCoder] = {}
        self._rdo: dict[int, rdo.Optimizer] = {}
        self.quality = quality  # validated by the setter

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """The model's 64-hex fingerprint (SHA-256 of its config and weights)."""
        return self._backend.fingerprint

    @property
    def config(self) -> ModelConfig:
        return self._backend.config

    @property
    def quality(self) -> float:
        """The default quality: bin width delta_i = quality * s_i (a step of the tables' ladder)."""
        return self._quality

    @quality.setter
    def quality(self, q: float | None) -> None:
        self._quality = float(self.tables.qualities[self.tables.level(q)])

    @property
    def qualities(self) -> list[float]:
        """The qualities available (the tables' ladder)."""
        return [float(q) for q in self.tables.qualities]

    def ladder_quality(self, quality: float | None = None) -> float:
        """The ladder step that ``quality`` (default: the codec's quality) is coded at."""
        return self._coder(quality).quality

    def _coder(self, quality: float | None) -> EntropyCoder:
        lv = self.tables.level(self._quality if quality is None else quality)
        if lv not in self._coders:
            self._coders[lv] = EntropyCoder(self.tables, float(self.tables.qualities[lv]))
        return self._coders[lv]

    # -- inputs ---------------------------------------------------------------------------------------------
    def model_inputs(self, x, name: str = "input") -> tuple[np.ndarray, bool]:
        """x -> (float32 [B, D] model inputs, whether it was a single record)."""
        from vaestream.data import validate

        cfg = self.config
        a = np.asarray(x)
        if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise DataError(f"{name}: records must be numeric, got dtype {a.dtype}")
        d = cfg.input_dim
        single = a.shape == (d,) or (a.shape == tuple(cfg.input_shape) and a.ndim > 1)
        if single:
            a = a.reshape(1, d)
        elif a.ndim >= 2 and int(np.prod(a.shape[1:])) == d:
            a = a.reshape(len(a), d)
        else:
            raise DataError(f"{name}: records of shape {a.shape}; the model takes [{d}], {tuple(cfg.input_shape)}, "
                            f"[B, {d}] or [B, *{tuple(cfg.input_shape)}]")
        if len(a) == 0:
            return np.zeros((0, d), np.float32), False
        if a.dtype == bool:
            a = a.astype(np.uint8)
        scale = validate(a, cfg.likelihood, name)
        out = a.astype(np.float32)
        if scale != 1.0:
            out *= np.float32(scale)
        return out, single

    def posterior(self, x) -> tuple[np.ndarray, np.ndarray]:
        """(mean, log_scale) of q(z|x), float32 ``[B, Nz]`` each (``[Nz]`` for a single record)."""
        xs, single = self.model_inputs(x)
        means, logs = [], []
        for s in range(0, len(xs), _BATCH):
            m, ls = self._backend.encode(xs[s:s + _BATCH])
            means.append(m)
            logs.append(ls)
        nz = self.config.latent_dim
        mean = np.concatenate(means) if means else np.zeros((0, nz), np.float32)
        log_scale = np.concatenate(logs) if logs else np.zeros((0, nz), np.float32)
        return (mean[0], log_scale[0]) if single else (mean, log_scale)

    # -- codes ----------------------------------------------------------------------------------------------
    def encode(self, x, quality: float | None = None, rdo_lmbda: float | None = None,
               rdo_steps: int = rdo.DEFAULT_STEPS) -> np.ndarray:
        """Records -> int32 codes ``[B, Nz]`` (``[Nz]`` for one record): ``quantize(mu(x))`` at ``quality``; with
        ``rdo_lmbda``, the codes of rate-distortion optimised quantisation instead (:mod:`vaestream.coding.rdo`:
        per record, about ``argmin_q bits(q) + rdo_lmbda MSE(decode(q), x)``; ``rdo_steps`` Adam steps)."""
        xs, single = self.model_inputs(x)
        mean, _ = self.posterior(xs)
        codes = self.codes_of(xs, mean, self._coder(quality).quality, rdo_lmbda, rdo_steps)
        return codes[0] if single else codes

    def codes_of(self, xs: np.ndarray, mean: np.ndarray, quality: float, rdo_lmbda: float | None = None,
                 rdo_steps: int = rdo.DEFAULT_STEPS) -> np.ndarray:
        """The int32 codes ``[B, Nz]`` of model inputs ``xs [B, D]`` whose posterior means are ``mean [B, Nz]``
        (from :meth:`posterior`), at a ``quality`` of the ladder: the rounded means, or with ``rdo_lmbda`` the
        rate-distortion optimised codes (:func:`vaestream.coding.rdo.optimize_codes`). For callers that reuse
        one posterior across several settings (:func:`vaestream.coding.family.operating_points`)."""
        if rdo_lmbda is None:
            return quantize(mean, self.tables, quality)
        return rdo.optimize_codes(self, xs, mean, quality, rdo_lmbda, rdo_steps)

    def rdo_optimizer(self, quality: float | None = None) -> "rdo.Optimizer":
        """The compiled RDOQ search of this model at ``quality`` (:class:`vaestream.coding.rdo.Optimizer`)."""
        if not isinstance(self._backend, _ModelBackend):
            raise ConfigError(f"{self.name}: rate-distortion optimised quantisation differentiates the decoder; "
                              "load the codec from its model directory, not a SavedModel")
        level = self._coder(quality).level
        if level not in self._rdo:
            self._rdo[level] = rdo.Optimizer(self._backend.model, self.tables, level)
        return self._rdo[level]

    def decode(self, codes, quality: float | None = None) -> np.ndarray:
        """Codes ``[B, Nz]`` (or ``[Nz]``) -> reconstructions float32 ``[B, D]`` (or ``[D]``): the decoder mean
        E[x | z_hat] at z_hat = dequantize(codes)."""
        c = np.asarray(codes)
        single = c.ndim == 1
        z = dequantize(c.reshape(-1, self.config.latent_dim) if single else c, self.tables,
                       self._coder(quality).quality)
        if z.ndim != 2:
            raise DataError(f"codes of shape {c.shape}, expected [B, {self.config.latent_dim}]")
        out = [self._backend.decode(z[s:s + _BATCH]) for s in range(0, len(z), _BATCH)]
        x_hat = np.concatenate(out) if out else np.zeros((0, self.config.input_dim), np.float32)
        return x_hat[0] if single else x_hat

    def kl_bits(self, x) -> np.ndarray:
        """KL(q(z|x) || p(z)) of each record in bits, ``[B]``: the information the model says a code carries."""
        mean, ls = self.posterior(x)
        mean, ls = np.atleast_2d(mean).astype(np.float64), np.atleast_2d(ls).astype(np.float64)
        return np.sum(0.5 * (mean ** 2 + np.exp(2 * ls) - 1 - 2 * ls), axis=1) / math.log(2)

    def ideal_bits(self, codes, quality: float | None = None) -> np.ndarray:
        """The ideal code length of each record, ``[B]``: -log2 of its table probabilities (no overhead)."""
        return self._coder(quality).ideal_bits(np.atleast_2d(np.asarray(codes)))

    def bits(self, x, quality: float | None = None, rdo_lmbda: float | None = None,
             rdo_steps: int = rdo.DEFAULT_STEPS) -> np.ndarray:
        """Each record's ideal code length under this codec at ``quality``, float64 ``[B]``: the table cost of the
        codes :meth:`compress` writes for ``x`` (:meth:`ideal_bits` of :meth:`encode`), without the container."""
        codes = self.encode(x, quality, rdo_lmbda, rdo_steps)
        return self.ideal_bits(codes, quality).astype(np.float64)

    # -- bytes ----------------------------------------------------------------------------------------------
    def _header(self, coder: EntropyCoder, single: bool) -> container.Header:
        return container.Header(fingerprint=bytes.fromhex(self.fingerprint)[:container.FINGERPRINT_BYTES],
                                table_hash=self._digest[:container.TABLE_ID_BYTES], quality=coder.quality,
                                level=coder.level, latent_dim=self.config.latent_dim,
                                input_shape=tuple(self.config.input_shape), single=single)

    def _frames(self, codes: np.ndarray, coder: EntropyCoder) -> list[tuple[int, bytes]]:
        n = self.frame_records
        return [(len(codes[s:s + n]), coder.encode(codes[s:s + n])) for s in range(0, len(codes), n)]

    def compress_codes(self, codes, quality: float | None = None, single: bool = False) -> bytes:
        """Codes ``[B, Nz]`` -> a container (bytes)."""
        coder = self._coder(quality)
        c = np.atleast_2d(np.asarray(codes))
        if c.ndim != 2 or c.shape[1] != self.config.latent_dim or not np.issubdtype(c.dtype, np.integer):
            raise DataError(f"codes of shape {c.shape} and dtype {c.dtype}, expected int [B, {self.config.latent_dim}]")
        return container.pack(self._header(coder, single), self._frames(c.astype(np.int32), coder))

    def compress(self, x, quality: float | None = None, target_bits: float | None = None,
                 rdo_lmbda: float | None = None, rdo_steps: int = rdo.DEFAULT_STEPS) -> bytes:
        """Records -> a self-describing container (bytes). Lossy only: lossless and near-lossless coding is the
        bits-back coder's (:func:`vaestream.coding.family.bitsback_coder`).

        Args:
          x: one record or a batch (see the module docstring).
          quality: the quality (default: the codec's); or
          target_bits: the budget in bits per record (container included): the finest quality of the ladder
            whose stream fits it is used (:class:`ConfigError` if even the coarsest does not).
          rdo_lmbda: rate-distortion optimised quantisation (:mod:`vaestream.coding.rdo`): each record's codes
            chosen for ``bits + rdo_lmbda MSE`` (``lambda``'s units in training) by ``rdo_steps`` Adam steps
            through the decoder, instead of the rounded posterior mean. The stream is an ordinary one of the
            model: only encoding costs more.
        """
        if quality is not None and target_bits is not None:
            raise ConfigError("give quality or target_bits, not both")
        xs, single = self.model_inputs(x)
        mean, _ = self.posterior(xs)
        if target_bits is not None:
            return self._compress_to_target(xs, mean, single, target_bits, rdo_lmbda, rdo_steps)
        coder = self._coder(quality)
        codes = self.codes_of(xs, mean, coder.quality, rdo_lmbda, rdo_steps)
        return container.pack(self._header(coder, single), self._frames(codes, coder))

    def choose_quality(self, x, target_bits: float) -> float:
        """The finest quality of the ladder at which ``x`` compresses to at most ``target_bits`` per record."""
        xs, single = self.model_inputs(x)
        mean, _ = self.posterior(xs)
        blob = self._compress_to_target(xs, mean, single, target_bits)
        return container.read_header(io.BytesIO(blob)).quality

    def _compress_to_target(self, xs: np.ndarray, mean: np.ndarray, single: bool, target_bits: float,
                            rdo_lmbda: float | None = None, rdo_steps: int = rdo.DEFAULT_STEPS) -> bytes:
        if not (isinstance(target_bits, (int, float)) and math.isfinite(target_bits) and target_bits > 0):
            raise ConfigError(f"target_bits must be a positive number, got {target_bits!r}")
        n = max(len(mean), 1)
        best, sizes = None, {}
        lo, hi = 0, self.tables.num_levels - 1  # bits fall as the level (quality) rises: bisect for the finest fit
        while lo <= hi:
            mid = (lo + hi) // 2
            coder = self._coder(float(self.tables.qualities[mid]))
            blob = container.pack(self._header(coder, single),
                                  self._frames(self.codes_of(xs, mean, coder.quality, rdo_lmbda, rdo_steps), coder))
            sizes[mid] = 8 * len(blob) / n
            if sizes[mid] <= target_bits:
                best, hi = blob, mid - 1
            else:
                lo = mid + 1
        if best is None:
            raise ConfigError(f"target of {target_bits:g} bits/record is below what the coarsest quality "
                              f"({self.tables.qualities[-1]:g}) reaches: {sizes[self.tables.num_levels - 1]:.1f}")
        return best

    def _check_header(self, h: container.Header, name: str) -> EntropyCoder:
        if h.lossless:
            raise BitstreamError(f"{name}: a lossless or near-lossless (bits-back) stream, not a lossy one: open "
                                 "it with vaestream.coding.open_stream")
        fp = bytes.fromhex(self.fingerprint)[:container.FINGERPRINT_BYTES]
        if h.fingerprint != fp:
            raise ModelMismatchError(f"{name}: written by model {h.fingerprint.hex()}..., not by this model "
                                     f"({fp.hex()}...)")
        if h.table_hash != self._digest[:container.TABLE_ID_BYTES]:
            raise ModelMismatchError(f"{name}: coded with other coder tables ({h.table_hash.hex()}..., these "
                                     f"are {self._digest[:container.TABLE_ID_BYTES].hex()}...); decode it with the "
                                     "tables that wrote it")
        try:  # the header stores the quality, not the level: find it on the ladder, exactly
            level = self.tables.level(h.quality)
        except ConfigError:
            level = None
        if level is None or self.tables.qualities[level] != h.quality:
            raise BitstreamError(f"{name}: quality {h.quality!r} is not on the tables' ladder")
        if h.latent_dim != self.config.latent_dim or tuple(h.input_shape) != tuple(self.config.input_shape):
            raise BitstreamError(f"{name}: shapes (latent {h.latent_dim}, input {h.input_shape}) do not match the "
                                 "model")
        return self._coder(h.quality)

    def _decode_frames(self, frames, coder: EntropyCoder, name: str) -> np.ndarray:
        out = []
        for i, (n, payload) in enumerate(frames):
            try:
                out.append(coder.decode(payload, n))
            except BitstreamError as e:
                raise BitstreamError(f"{name}: frame {i}: {e}") from None
        return np.concatenate(out) if out else np.zeros((0, self.config.latent_dim), np.int32)

    def decompress_codes(self, blob: bytes, name: str = "stream") -> tuple[np.ndarray, container.Header]:
        """A container -> (int32 codes ``[B, Nz]``, its header)."""
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise BitstreamError(f"{name}: expected bytes, got {type(blob).__name__}")
        with container.ContainerReader(bytes(blob), name=name) as r:
            coder = self._check_header(r.header, name)
            codes = self._decode_frames(r, coder, name)
            if r.header.single and len(codes) != 1:
                raise BitstreamError(f"{name}: flagged as a single record but holds {len(codes)}")
            return codes, r.header

    def decompress(self, blob: bytes, name: str = "stream") -> np.ndarray:
        """A lossy container -> reconstructions float32 ``[B, D]`` (``[D]`` if one record was compressed). A
        bits-back or per-record stream raises :class:`BitstreamError` (open it with
        :func:`vaestream.coding.open_stream`)."""
        if isinstance(blob, (bytes, bytearray, memoryview)) and container.is_per_record(blob):
            raise BitstreamError(f"{name}: a per-record stream of a family, not a lossy one: open it with "
                                 "vaestream.coding.open_stream(blob, FAMILY_DIR)")
        codes, h = self.decompress_codes(blob, name)
        x_hat = self.decode(codes, h.quality)
        return x_hat[0] if h.single else x_hat

    # -- files ----------------------------------------------------------------------------------------------
    def write(self, path: str | os.PathLike, x, quality: float | None = None, append: bool = False,
              rdo_lmbda: float | None = None, rdo_steps: int = rdo.DEFAULT_STEPS) -> int:
        """Compress records into the container file ``path`` (``append``: after its records; ``rdo_lmbda``: as in
        :meth:`compress`). Returns the number of records now in the file."""
        coder = self._coder(quality)
        xs, _ = self.model_inputs(x)
        codes = self.codes_of(xs, self.posterior(xs)[0], coder.quality, rdo_lmbda, rdo_steps)
        with container.ContainerWriter(path, self._header(coder, False), append=append) as w:
            for n, payload in self._frames(codes, coder):
                w.write_frame(n, payload)
            return sum(n for _, n in w.entries)

    def read(self, path: str | os.PathLike, records: int | slice | Sequence[int] | None = None) -> np.ndarray:
        """Reconstructions of ``records`` (an index, a slice, indices; all if None) of a container file, decoding
        only the frames that hold them (random access through the index)."""
        name = str(path)
        with container.ContainerReader(path) as r:
            coder = self._check_header(r.header, name)
            n = r.num_records
            if records is None:
                idx = np.arange(n)
            elif isinstance(records, slice):
                idx = np.arange(n)[records]
            else:
                idx = np.atleast_1d(np.asarray(records, np.int64))
                if idx.ndim != 1 or np.any(idx < -n) or np.any(idx >= n):
                    raise DataError(f"{name}: record indices {records!r} out of range [0, {n})")
                idx = np.where(idx < 0, idx + n, idx)
            codes = np.zeros((len(idx), self.config.latent_dim), np.int32)
            starts = np.array([fr[1] for fr in r.frames], np.int64)
            frame_of = np.searchsorted(starts, idx, side="right") - 1
            for fi in np.unique(frame_of):
                sel = frame_of == fi
                fc = self._decode_frames([r.read_frame(int(fi))], coder, f"{name} frame {fi}")
                codes[sel] = fc[idx[sel] - starts[fi]]
        x_hat = self.decode(codes, coder.quality)
        scalar = records is not None and not isinstance(records, slice) and np.ndim(records) == 0
        return x_hat[0] if scalar else x_hat

    def iter_decompress(self, f: BinaryIO, name: str | None = None) -> Iterator[np.ndarray]:
        """Reconstructions frame by frame from a binary stream read front to back (a pipe, a socket)."""
        name = name or getattr(f, "name", "stream")
        it = container.iter_stream(f, name)
        coder = self._check_header(next(it), name)
        for i, frame in enumerate(it):
            yield self.decode(self._decode_frames([frame], coder, f"{name} frame {i}"), coder.quality)


# -------------------------------------------------------------------------------------------------------------
# tables and loading
# -------------------------------------------------------------------------------------------------------------
def _records_to_inputs(config: ModelConfig, records, name: str) -> np.ndarray:
    from vaestream.data import Dataset, validate

    if isinstance(records, Dataset):
        return records.to_float()
    a = np.asarray(records)
    if a.ndim < 2 or int(np.prod(a.shape[1:])) != config.input_dim:
        raise DataError(f"{name}: calibration records of shape {a.shape}, expected [N, {config.input_dim}] or "
                        f"[N, *{config.input_shape}]")
    a = a.reshape(len(a), -1)
    scale = validate(a, config.likelihood, name)
    return (a.astype(np.float32) * np.float32(scale)) if scale != 1.0 else a.astype(np.float32)


def build_tables(model, records, qualities: Sequence[float] = DEFAULT_QUALITIES, model_kind: str = "aggregate",
                 inactive_kl_bits: float = 0.1, max_records: int = 20000) -> CoderTables:
    """Derive the coder tables of ``model`` (a :class:`vaestream.VAE`) from calibration ``records``.

    Args:
      model: the VAE.
      records: calibration records ``[N, D]`` / ``[N, *input_shape]`` (uint8 scaled by 1/255) or a
        ``vaestream.data.Dataset`` — typically (part of) the training set. At most ``max_records`` are used
        (an evenly spaced subset).
      qualities: the quality ladder (see :mod:`vaestream.coding.tables`).
      model_kind: ``"aggregate"`` (KDE of the calibration posterior means) or ``"prior"`` (N(0, 1)).
      inactive_kl_bits: dimensions whose mean KL is below this are not coded.
    """
    x = _records_to_inputs(model.config, records, "calibration")
    if len(x) < 2:
        raise DataError(f"calibration: need at least 2 records, got {len(x)}")
    if len(x) > max_records:
        x = x[np.linspace(0, len(x) - 1, max_records).astype(np.int64)]
    backend = _ModelBackend(model)
    means, logs = [], []
    for s in range(0, len(x), _BATCH):
        m, ls = backend.encode(x[s:s + _BATCH])
        means.append(m)
        logs.append(ls)
    return build_tables_from_stats(backend.fingerprint, np.concatenate(means), np.concatenate(logs),
                                   qualities=qualities, model=model_kind, inactive_kl_bits=inactive_kl_bits)


def write_tables(model_dir: str | os.PathLike, records, **kwargs) -> Path:
    """Build the tables of the model in ``model_dir`` from calibration ``records`` and store them as
    ``MODEL_DIR/coder_tables.npz``; returns the path. ``kwargs`` go to :func:`build_tables`."""
    from vaestream.store import load_model

    model = load_model(model_dir)
    tables = build_tables(model, records, **kwargs)
    path = Path(model_dir) / TABLES_FILE
    tables.save(path)
    return path


def load(path: str | os.PathLike, calibration=None, quality: float | None = None,
         frame_records: int = DEFAULT_FRAME_RECORDS) -> Codec:
    """Open a codec on a model directory or a SavedModel export.

    Args:
      path: a model directory (``config.json`` + ``ckpt/``) or a SavedModel export (``saved_model.pb``).
      calibration: records to build the coder tables from when a model directory has none (or has tables of
        an earlier state of the model); they are then written to ``MODEL_DIR/coder_tables.npz``.
      quality: the codec's default quality.
      frame_records: records per container frame.

    A model with a learned entropy model (``config.entropy_model``) gives a
    :class:`vaestream.coding.learned.LearnedCodec` instead (same verbs; ``calibration`` unused).

    Raises:
      ModelError: no model at ``path``, or no coder tables and no ``calibration`` to build them.
    """
    p = Path(path)
    if (p / "saved_model.pb").is_file():
        from vaestream.serving.learned_export import refuse_learned_export

        refuse_learned_export(p, "vaestream.load")  # a learned entropy model's export: refused, naming what to use
        backend = _SavedModelBackend(p)
        tables = CoderTables.load(p / "assets" / TABLES_FILE)
        return Codec(backend, tables, quality, frame_records, name=str(p))
    if not (p / "config.json").is_file():
        raise ModelError(f"{p}: neither a vaestream model directory (config.json) nor a SavedModel export "
                         "(saved_model.pb)")
    from vaestream.store import load_model, read_config

    if read_config(p).entropy_model:  # a learned entropy model: its own coder (calibration is not needed)
        from vaestream.coding.learned import load_learned

        return load_learned(p, quality, frame_records)
    backend = _ModelBackend(load_model(p))
    tpath = p / TABLES_FILE
    tables = CoderTables.load(tpath) if tpath.is_file() else None
    if tables is None or tables.fingerprint != backend.fingerprint:
        if calibration is None:
            why = "has no coder tables" if tables is None else "has coder tables of another state of the model"
            raise ModelError(f"{p}: {why}; build them from calibration records (e.g. the training set): "
                             f"vaestream build-tables --model {p} --data DATA, or "
                             "vaestream.coding.codec.load(path, calibration=records)")
        tables = build_tables(backend.model, calibration)
        tables.save(tpath)
    return Codec(backend, tables, quality, frame_records, name=str(p))
