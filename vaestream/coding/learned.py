"""The coder of a model with a learned entropy model (``ModelConfig(entropy_model=...)``): ``vaestream.load`` and
:func:`vaestream.coding.open_stream` return a :class:`LearnedCodec` for such a model directory.

    codec = vaestream.load("models/hyper")          # MODEL_DIR/entropy_tables.npz built on first load
    blob = codec.compress(x, quality=codec.qualities[2])
    x_hat = codec.decompress(blob)                  # float32 [B, D], bit-identical on any machine
    bits = codec.bits(x)                            # each record's ideal code length (side stream included)

**Rate levels.** Level k of the model's ``rd_lambdas`` is the quality ``2^(k / 2)`` (1, 1.41, 2, ...; the header's
one-byte ladder codes 127 + k): a larger quality is a coarser level, as on the codec's ladder. ``target_bits``
picks the finest level whose stream fits.

**Encoding** a frame of records at level k (:mod:`vaestream.entropy_models.hyperprior`): y = analysis(x) g_k;
``hyperprior``: z = rint(h_a(y)), (mu, j) = the hyper-synthesis of z, symbols q = rint(y - mu) under Gaussian
table j; ``factorized``: q = rint(y) under its channel's table. **Decoding** needs only the stream, the stored
integer tables and the networks: z, then (mu, j), then q, y_hat = q + mu, the synthesis of y_hat g'_k, clipped to
[0, 1] and rounded once to float32. Every network runs in exact float64 NumPy
(:mod:`vaestream.coding.exact_conv`; TensorFlow only trains), every other step is exact or correctly rounded,
so a record's symbols, its stream bytes and its decoded floats are bit-identical in every process, batch, thread
count and CPU instruction set.

**Beam.** :meth:`LearnedCodec.encode` (each record's side then latent symbols, one row) and
:meth:`LearnedCodec.compress_codes` (those rows -> the container :meth:`compress` writes) are what the Beam encode
job's ``--coder`` calls, as on the codec.

**Other sizes.** The transforms are fully convolutional: records of any H' x W' (same channels) are coded, the
stride-2 SAME convolutions padding them to the stride, and decoded to the header's shape (the sub-pixel steps
crop to it). The header's latent dim is that grid's h w C.

**Frame payload** (FORMAT.md, "Learned entropy model frames"): varint(side length), the side stream (the
hyper-latent's symbols, channel c under table c; empty for ``factorized``), the main stream (the latent's
symbols): each one range-coded stream of :class:`vaestream.coding.learned_tables.IndexedCoder`. Header,
fingerprint, table id (:meth:`LearnedTables.digest`) and frame CRC32s are the container's
(:mod:`vaestream.coding.container`), so a corrupt frame, side stream included, is refused.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np

from vaestream.coding import container
from vaestream.coding.learned_tables import ENTROPY_TABLES_FILE, IndexedCoder, LearnedTables, build_learned_tables
from vaestream.errors import BitstreamError, ConfigError, DataError, ModelError, ModelMismatchError

DEFAULT_FRAME_RECORDS = 1024
_BATCH = 4096


def level_quality(level: int) -> float:
    """The header quality of rate level ``level``: ``2^(level / 2)`` (exactly the container's ladder value)."""
    return container.ladder_quality(127 + int(level))


class LearnedCodec:
    """Compresses records with a model that has a learned entropy model (see the module docstring).

    Args:
      model: the :class:`vaestream.model.VAE` (``model.entropy`` set).
      tables: its :class:`LearnedTables`.
      quality: the default rate level's quality (default: level 0, the finest).
      frame_records: records per container frame.
    """

    def __init__(self, model, tables: LearnedTables, quality: float | None = None,
                 frame_records: int = DEFAULT_FRAME_RECORDS, name: str = "model"):
        from vaestream.coding.exact_conv import ExactAnalysis, ExactHyperSynthesis, ExactSynthesis

        self.model, self.config, self.name = model, model.config, name
        self.fingerprint: str = model.fingerprint()
        if tables.fingerprint != self.fingerprint or tables.kind != self.config.entropy_model:
            raise ModelMismatchError(f"{name}: entropy tables of model {tables.fingerprint[:16]}..., not of this "
                                     f"model ({self.fingerprint[:16]}...); rebuild them (delete {ENTROPY_TABLES_FILE})")
        if not 1 <= frame_records <= container.MAX_FRAME_RECORDS:
            raise ConfigError(f"frame_records must be in [1, {container.MAX_FRAME_RECORDS}], got {frame_records}")
        self.tables, self.frame_records = tables, int(frame_records)
        self._digest = tables.digest()
        self._coder = IndexedCoder(tables)
        em = model.entropy
        self.kind, self.channels = em.kind, em.channels
        self._gain = tables.gain  # [L, C] float64, stored with the tables
        self._hs = ExactHyperSynthesis(em) if self.kind == "hyperprior" else None
        self._synthesis = ExactSynthesis(model, tables.inverse_gain)
        self.picture_channels = 1 if len(self.config.input_shape) == 2 else self.config.input_shape[2]
        self._analysis = ExactAnalysis(model)
        self.quality = quality

    # -- rate levels ---------------------------------------------------------------------------------------------
    @property
    def qualities(self) -> list[float]:
        """The qualities of the model's rate levels, finest first (level k: 2^(k / 2))."""
        return [level_quality(k) for k in range(len(self.config.rd_lambdas))]

    @property
    def quality(self) -> float:
        return self._quality

    @quality.setter
    def quality(self, q: float | None) -> None:
        self._quality = self.qualities[self.level(q)]

    def level(self, quality: float | None) -> int:
        """The rate level of ``quality`` (None: the codec's default); :class:`ConfigError` if not one of
        :attr:`qualities`."""
        if quality is None:
            return self.qualities.index(self._quality) if hasattr(self, "_quality") else 0
        q = float(quality)
        for k, v in enumerate(self.qualities):
            if math.isclose(q, v, rel_tol=1e-9):
                return k
        raise ConfigError(f"quality {quality!r} is not a rate level of this model: {self.qualities} (lambdas "
                          f"{list(self.config.rd_lambdas)})")

    def ladder_quality(self, quality: float | None = None) -> float:
        return self.qualities[self.level(quality)]

    # -- inputs ----------------------------------------------------------------------------------------------
    def model_inputs(self, x, name: str = "input") -> tuple[np.ndarray, bool]:
        """x -> (float32 pictures ``[B, H, W, c]``, whether it was one record). Records of the model's shape may be
        flat; other sizes come as ``[B, H', W']`` (``[B, H', W', c]``); uint8 records are scaled by 1/255."""
        from vaestream.data import validate

        cfg, a = self.config, np.asarray(x)
        if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise DataError(f"{name}: records must be numeric, got dtype {a.dtype}")
        shape, nd = tuple(cfg.input_shape), len(cfg.input_shape)
        if nd == 2 and a.ndim == 4 and a.shape[-1] == 1:  # [B, H, W, 1] pictures of a one-channel model
            a = a[..., 0]
        single = a.shape in ((cfg.input_dim,), shape)
        if single:
            a = a.reshape((1,) + shape)
        elif a.ndim == 2 and a.shape[1] == cfg.input_dim:
            a = a.reshape((len(a),) + shape)
        elif a.ndim != nd + 1 or (nd == 3 and a.shape[-1] != shape[2]) or 0 in a.shape[1:]:
            raise DataError(f"{name}: records of shape {a.shape}; the model takes [B, {cfg.input_dim}] or "
                            f"[B, H, W{', ' + str(shape[2]) if nd == 3 else ''}] pictures ({shape} or other sizes)")
        if len(a) == 0:
            raise DataError(f"{name}: no records")
        scale = validate(a.astype(np.uint8) if a.dtype == bool else a, cfg.likelihood, name)
        out = a.astype(np.float32) * np.float32(scale) if scale != 1.0 else a.astype(np.float32)
        return out.reshape(out.shape[:3] + (self.picture_channels,)), single

    # -- symbols ---------------------------------------------------------------------------------------------
    def symbols(self, images: np.ndarray, level: int) -> tuple[np.ndarray | None, np.ndarray]:
        """Pictures ``[B, H, W, c]`` -> (hyper-latent symbols ``[B, h'', w'', C]`` int64 or None, latent symbols
        ``[B, h, w, C]`` int64) at rate level ``level``."""
        z, q, _ = self._symbols(images, level)
        return z, q

    def _symbols(self, images: np.ndarray, level: int):
        """(z or None, q, each latent symbol's table index) of pictures at ``level``."""
        zs, qs, ts = [], [], []
        for s in range(0, len(images), _BATCH):
            y64 = self._analysis.latent(images[s:s + _BATCH]) * self._gain[level]
            z = None if self._hs is None else self._analysis.hyper_latent(y64)
            mu, t = self._tables_of(z, y64.shape[1:3], len(y64))
            zs.append(z)
            qs.append(np.rint(y64 - mu).astype(np.int64))
            ts.append(t)
        return (None if zs[0] is None else np.concatenate(zs)), np.concatenate(qs), np.concatenate(ts)

    def _tables_of(self, z: np.ndarray | None, grid: tuple[int, int], n: int) -> tuple[np.ndarray, np.ndarray]:
        """(the latent's mean float64 ``[n, h, w, C]``, each latent symbol's table index)."""
        c = self.channels
        if z is None:
            return np.zeros((n,) + grid + (c,)), np.broadcast_to(np.arange(c), (n,) + grid + (c,))
        mu, j = self._hs(z, grid)
        return mu, self.tables.channels + j

    def reconstruct(self, z: np.ndarray | None, q: np.ndarray, level: int, shape: tuple[int, int]) -> np.ndarray:
        """Symbols -> reconstructions float32 ``[B, H * W * c]`` of pictures of ``shape`` (H, W), exactly (module
        docstring): y_hat = q + mu, the exact synthesis of y_hat g'_k, clipped to [0, 1]."""
        mu, _ = self._tables_of(z, q.shape[1:3], len(q))
        return self._reconstruct(q + mu, level, shape)

    def _reconstruct(self, y_hat: np.ndarray, level: int, shape: tuple[int, int]) -> np.ndarray:
        out = [np.clip(self._synthesis(y_hat[s:s + _BATCH], level, shape), 0.0, 1.0).astype(np.float32)
               .reshape(len(y_hat[s:s + _BATCH]), -1) for s in range(0, len(y_hat), _BATCH)]
        return np.concatenate(out) if out else np.zeros((0, int(np.prod(shape)) * self.picture_channels), np.float32)

    def _symbol_bits(self, z, q, tq) -> tuple[np.ndarray, np.ndarray]:
        main = self._coder.bits(q, tq).reshape(len(q), -1).sum(axis=1)
        side = np.zeros(len(q), np.float64)
        if z is not None:
            tz = np.broadcast_to(np.arange(self.channels), z.shape)
            side = self._coder.bits(z, tz).reshape(len(z), -1).sum(axis=1)
        return main, side

    def bits(self, x, quality: float | None = None, side: bool = False):
        """Each record's ideal code length in bits, float64 ``[B]``: -log2 of its symbols' table probabilities,
        side stream included, container not. ``side``: (that, the side stream's part of it)."""
        images, _ = self.model_inputs(x)
        main, side_bits = self._symbol_bits(*self._symbols(images, self.level(quality)))
        return (main + side_bits, side_bits) if side else main + side_bits

    # -- frames --------------------------------------------------------------------------------------------------
    def _payload(self, z: np.ndarray | None, q: np.ndarray, tq: np.ndarray) -> bytes:
        side = b""
        if z is not None:
            side = self._coder.encode(z, np.broadcast_to(np.arange(self.channels), z.shape))
        return container.varint(len(side)) + side + self._coder.encode(q, tq)

    def _decode_payload(self, payload: bytes, n: int, shape: tuple[int, ...], name: str) -> np.ndarray:
        """A frame payload of n records of ``shape`` -> y_hat = q + mu, float64 ``[n, h, w, C]``."""
        from vaestream.config import latent_grid
        from vaestream.entropy_models.hyperprior import hyper_grid

        f = io.BytesIO(payload)
        side_len = container.read_varint(f, bytearray(), name, "side stream length")
        start = f.tell()
        if start + side_len > len(payload):
            raise BitstreamError(f"{name}: corrupt frame (side stream of {side_len} bytes in a payload of "
                                 f"{len(payload)})")
        grid = latent_grid(shape, self.config.channels)
        z = None
        if self._hs is not None:
            zshape = (n,) + hyper_grid(*grid)[1] + (self.channels,)
            tz = np.broadcast_to(np.arange(self.channels), zshape)
            z = self._coder.decode(payload[start:start + side_len], tz).reshape(zshape)
        elif side_len:
            raise BitstreamError(f"{name}: corrupt frame (a side stream in a factorized model's frame)")
        mu, tq = self._tables_of(z, grid, n)
        q = self._coder.decode(payload[start + side_len:], tq).reshape(tq.shape)
        return q + mu

    def _header(self, level: int, shape: tuple[int, ...], single: bool) -> container.Header:
        from vaestream.config import latent_grid

        h, w = latent_grid(shape, self.config.channels)
        stored = tuple(shape) if self.picture_channels == 1 and len(self.config.input_shape) == 2 else \
            tuple(shape) + (self.picture_channels,)
        return container.Header(fingerprint=bytes.fromhex(self.fingerprint)[:container.FINGERPRINT_BYTES],
                                table_hash=self._digest[:container.TABLE_ID_BYTES], quality=level_quality(level),
                                level=level, latent_dim=h * w * self.channels, input_shape=stored, single=single)

    def _frames(self, images: np.ndarray, level: int) -> list[tuple[int, bytes]]:
        z, q, tq = self._symbols(images, level)
        n = self.frame_records
        return [(len(q[s:s + n]), self._payload(None if z is None else z[s:s + n], q[s:s + n], tq[s:s + n]))
                for s in range(0, len(q), n)]

    def encode(self, x, quality: float | None = None, rdo_lmbda: float | None = None) -> np.ndarray:
        """Records of the model's shape -> each record's symbols int64 ``[B, h'' w'' C + h w C]``: its hyper-latent
        symbols (none for ``factorized``) then its latent symbols, each flattened in (h, w, C) order, at
        ``quality``'s level (the codec's :meth:`vaestream.coding.codec.Codec.encode` counterpart: the Beam encode
        job codes these with :meth:`compress_codes`)."""
        if rdo_lmbda is not None:
            raise ConfigError(f"{self.name}: no rate-distortion optimised quantisation for a learned entropy model")
        images, _ = self.model_inputs(x)
        if images.shape[1:3] != tuple(self.config.input_shape[:2]):
            raise DataError(f"{self.name}: encode takes records of the model's shape {self.config.input_shape}")
        z, q = self.symbols(images, self.level(quality))
        parts = ([] if z is None else [z.reshape(len(q), -1)]) + [q.reshape(len(q), -1)]
        return np.concatenate(parts, axis=1)

    def compress_codes(self, symbols: np.ndarray, quality: float | None = None) -> bytes:
        """:meth:`encode`'s symbols ``[B, h'' w'' C + h w C]`` (at ``quality``'s level) -> a container, the bytes
        :meth:`compress` of those records gives."""
        from vaestream.config import latent_grid
        from vaestream.entropy_models.hyperprior import hyper_grid

        level, shape = self.level(quality), tuple(self.config.input_shape[:2])
        grid = latent_grid(shape, self.config.channels)
        s = np.asarray(symbols, np.int64)
        nz = int(np.prod(hyper_grid(*grid)[1])) * self.channels if self._hs is not None else 0
        width = nz + grid[0] * grid[1] * self.channels
        if s.ndim != 2 or s.shape[1] != width or len(s) == 0:
            raise DataError(f"{self.name}: symbols of shape {s.shape}, expected [B, {width}] (encode's)")
        z = s[:, :nz].reshape((len(s),) + hyper_grid(*grid)[1] + (self.channels,)) if nz else None
        q = s[:, nz:].reshape((len(s),) + tuple(grid) + (self.channels,))
        _, tq = self._tables_of(z, tuple(grid), len(s))
        n = self.frame_records
        frames = [(len(q[i:i + n]), self._payload(None if z is None else z[i:i + n], q[i:i + n], tq[i:i + n]))
                  for i in range(0, len(q), n)]
        return container.pack(self._header(level, shape, False), frames)

    def compress(self, x, quality: float | None = None, target_bits: float | None = None,
                 rdo_lmbda: float | None = None, rdo_steps: int | None = None) -> bytes:
        """Records -> a container (bytes) at ``quality`` (a rate level's), or at the finest level whose stream fits
        ``target_bits`` per record (container included). ``rdo_lmbda`` is the codec's and is refused here."""
        if rdo_lmbda is not None:
            raise ConfigError(f"{self.name}: rate-distortion optimised quantisation is not implemented for a learned "
                              "entropy model")
        if quality is not None and target_bits is not None:
            raise ConfigError("give quality or target_bits, not both")
        images, single = self.model_inputs(x)
        shape = images.shape[1:3]
        if target_bits is None:
            level = self.level(quality)
            return container.pack(self._header(level, shape, single), self._frames(images, level))
        if not (isinstance(target_bits, (int, float)) and math.isfinite(target_bits) and target_bits > 0):
            raise ConfigError(f"target_bits must be a positive number, got {target_bits!r}")
        sizes = []
        for level in range(len(self.qualities)):
            blob = container.pack(self._header(level, shape, single), self._frames(images, level))
            sizes.append(8 * len(blob) / len(images))
            if sizes[-1] <= target_bits:
                return blob
        raise ConfigError(f"target of {target_bits:g} bits/record is below what the coarsest level reaches: "
                          f"{sizes[-1]:.1f}")

    def _check_header(self, h: container.Header, name: str) -> tuple[int, tuple[int, int]]:
        """(level, picture (H, W)) of a header this codec decodes; refuses others."""
        from vaestream.config import latent_grid

        if h.lossless:
            raise BitstreamError(f"{name}: a lossless (bits-back) stream, not one of a learned entropy model")
        fp = bytes.fromhex(self.fingerprint)[:container.FINGERPRINT_BYTES]
        if h.fingerprint != fp:
            raise ModelMismatchError(f"{name}: written by model {h.fingerprint.hex()}..., not by this model "
                                     f"({fp.hex()}...)")
        if h.table_hash != self._digest[:container.TABLE_ID_BYTES]:
            raise ModelMismatchError(f"{name}: coded with other entropy tables ({h.table_hash.hex()}...)")
        if h.quality not in self.qualities:
            raise BitstreamError(f"{name}: quality {h.quality!r} is not a rate level of the model")
        nd = len(self.config.input_shape)
        shape = tuple(h.input_shape)
        if len(shape) != nd or (nd == 3 and shape[2] != self.picture_channels) or 0 in shape or \
                h.latent_dim != int(np.prod(latent_grid(shape, self.config.channels))) * self.channels:
            raise BitstreamError(f"{name}: shapes (latent {h.latent_dim}, input {shape}) do not fit the model")
        return self.qualities.index(h.quality), shape[:2]

    def _decode_frames(self, frames, level: int, shape, name: str) -> np.ndarray:
        out = []
        for i, (n, payload) in enumerate(frames):
            try:
                y_hat = self._decode_payload(payload, n, shape, name)
            except BitstreamError as e:
                raise BitstreamError(f"{name}: frame {i}: {e}") from None
            out.append(self._reconstruct(y_hat, level, shape))
        return np.concatenate(out) if out else np.zeros((0, int(np.prod(shape)) * self.picture_channels), np.float32)

    def decompress(self, blob: bytes, name: str = "stream") -> np.ndarray:
        """A container -> reconstructions float32 ``[B, D]`` (D of the stream's record shape; ``[D]`` if one
        record was compressed)."""
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise BitstreamError(f"{name}: expected bytes, got {type(blob).__name__}")
        with container.ContainerReader(bytes(blob), name=name) as r:
            level, shape = self._check_header(r.header, name)
            x = self._decode_frames(r, level, shape, name)
            if r.header.single and len(x) != 1:
                raise BitstreamError(f"{name}: flagged as a single record but holds {len(x)}")
            return x[0] if r.header.single else x

    def stream_shape(self, source) -> tuple[int, ...]:
        """The record shape a stream (bytes or a path) holds, from its header."""
        with container.ContainerReader(source) as r:
            return tuple(r.header.input_shape)

    # -- files ---------------------------------------------------------------------------------------------------
    def write(self, path: str | os.PathLike, x, quality: float | None = None, append: bool = False,
              rdo_lmbda: float | None = None, rdo_steps: int | None = None) -> int:
        """Compress records into the indexed container file ``path`` (``append``: after its records)."""
        if rdo_lmbda is not None:
            raise ConfigError(f"{self.name}: no rate-distortion optimised quantisation for a learned entropy model")
        images, _ = self.model_inputs(x)
        level = self.level(quality)
        with container.ContainerWriter(path, self._header(level, images.shape[1:3], False), append=append) as w:
            for n, payload in self._frames(images, level):
                w.write_frame(n, payload)
            return sum(n for _, n in w.entries)

    def read(self, path: str | os.PathLike, records: int | slice | Sequence[int] | None = None) -> np.ndarray:
        """Reconstructions of ``records`` (an index, a slice, indices; all if None) of a container file, decoding
        only the frames that hold them."""
        name = str(path)
        with container.ContainerReader(path) as r:
            level, shape = self._check_header(r.header, name)
            n = r.num_records
            idx = np.arange(n) if records is None else (np.arange(n)[records] if isinstance(records, slice) else
                                                          np.atleast_1d(np.asarray(records, np.int64)))
            if idx.ndim != 1 or np.any(idx < -n) or np.any(idx >= n):
                raise DataError(f"{name}: record indices {records!r} out of range [0, {n})")
            idx = np.where(idx < 0, idx + n, idx)
            starts = np.array([fr[1] for fr in r.frames], np.int64)
            frame_of = np.searchsorted(starts, idx, side="right") - 1
            out = np.zeros((len(idx), int(np.prod(shape)) * self.picture_channels), np.float32)
            for fi in np.unique(frame_of):
                sel = frame_of == fi
                x = self._decode_frames([r.read_frame(int(fi))], level, shape, f"{name} frame {fi}")
                out[sel] = x[idx[sel] - starts[fi]]
        scalar = records is not None and not isinstance(records, slice) and np.ndim(records) == 0
        return out[0] if scalar else out

    def iter_decompress(self, f: BinaryIO, name: str | None = None) -> Iterator[np.ndarray]:
        """Reconstructions frame by frame from a binary stream read front to back (a pipe, a socket)."""
        name = name or getattr(f, "name", "stream")
        it = container.iter_stream(f, name)
        level, shape = self._check_header(next(it), name)
        for i, frame in enumerate(it):
            yield self._decode_frames([frame], level, shape, f"{name} frame {i}")


def load_learned(path: str | os.PathLike, quality: float | None = None,
                 frame_records: int = DEFAULT_FRAME_RECORDS) -> LearnedCodec:
    """The :class:`LearnedCodec` of a model directory whose config names an entropy model; its integer tables
    (``MODEL_DIR/entropy_tables.npz``) are built and stored on first use (or when the model changed)."""
    from vaestream.store import load_model

    p = Path(path)
    model = load_model(p)
    if not model.config.entropy_model:
        raise ModelError(f"{p}: the model has no learned entropy model; open it with vaestream.coding.codec.load")
    tpath = p / ENTROPY_TABLES_FILE
    tables = LearnedTables.load(tpath) if tpath.is_file() else None
    if tables is None or tables.fingerprint != model.fingerprint():
        tables = build_learned_tables(model)
        tables.save(tpath)
    return LearnedCodec(model, tables, quality, frame_records, name=str(p))
