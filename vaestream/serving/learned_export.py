"""The SavedModel of a model with a learned entropy model (``ModelConfig(entropy_model=...)``): what
:func:`vaestream.serving.export.export` writes for such a model, in TF Serving's layout.

The export is made at **one rate level**: ``quality`` (default the finest level's, 1.0; see
:mod:`vaestream.coding.learned`), recorded with its level in ``assets/export.json`` (``"quality"``, ``"level"``,
``"entropy_model"``); export one version per level a TF Serving user needs. ``assets/entropy_tables.npz`` holds
the codec's integer tables (with the gains), so a client can range-code the symbols itself.

Signatures (float32 records ``x[B, D]`` scaled as the codec scales them — floats in [0, 1], 8-bit counts times
float32(1/255); the model's own record shape; (h, w) the latent grid, (h'', w'') the hyper-latent's, C channels):

* ``quantize(x) -> {symbols[B, h w C] int32, side_symbols[B, h'' w'' C] int32, table_index[B, h w C] int32}``:
  the latent symbols the codec codes (``LearnedCodec.symbols``, flattened in (h, w, C) order), the hyper-latent's
  (``hyperprior``; ``[B, 0]`` for ``factorized``) and each latent symbol's table in ``entropy_tables.npz``
  (``factorized``: its channel; ``hyperprior``: channels + the Gaussian scale index). Side symbol (i, j, c) is
  coded under table c.
* ``decode(symbols, side_symbols) -> {x_hat[B, D]}``: the decoder: the pictures the codec's ``decompress`` gives
  for those symbols.
* ``reconstruct(x) -> {x_hat[B, D]}`` = ``decode(quantize(x))``: bit-identical to ``vaestream decompress`` of
  ``vaestream compress`` at the export's level. ``serving_default`` is the same function.

**Exact in the graph.** Every network runs as :mod:`vaestream.coding.exact_conv` runs it in NumPy, with stock
float64 ops only (no custom op): each convolution is a patch copy (pad + strided slices + concat), each patch row
is rounded to ``rint(h 2^r)`` (r from the row's largest magnitude, read from its float64 exponent bits), one
float64 ``MatMul`` by the constant ``rint(W 2^s)``, times the power of two ``2^-(r + s)`` (built from its exponent
bits: exact) plus the bias. Every partial sum is an integer below 2^53, so Eigen's GEMM gives the NumPy result
whatever its order; ``rint``, ReLU, ``depth_to_space``, crops, the gain products and the final float32 cast are
exact or correctly rounded. A record's outputs do not depend on its batch.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from vaestream.errors import ModelError

TABLES_ASSET = "entropy_tables.npz"
CONFIG_ASSET, FINGERPRINT_ASSET, INFO_ASSET = "config.json", "fingerprint.txt", "export.json"
"""(The asset names :class:`vaestream.serving.export.ExportedModel` reads; that module imports this one.)"""


def learned_export_info(path: str | Path) -> dict[str, Any] | None:
    """``assets/export.json`` of the version directory ``path`` when it is a learned entropy model's export (its
    ``"entropy_model"``, ``"level"``, ``"quality"``), else None (another export, or no such file)."""
    try:
        info = json.loads((Path(path) / "assets" / INFO_ASSET).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("entropy_model") else None


def refuse_learned_export(path: str | Path, user: str) -> None:
    """Raise :class:`ModelError` naming ``path`` when it is a learned entropy model's export (one rate level; its
    coder needs the model directory): ``user`` names what was asked to open it (``vaestream.load``)."""
    info = learned_export_info(path)
    if info is None:
        return
    raise ModelError(f"{path}: the SavedModel export of a model with a learned entropy model ({info['entropy_model']}"
                     f", rate level {info.get('level')}, quality {info.get('quality')}): {user} cannot code with it. "
                     "Open the model directory it was exported from (config.json + ckpt/; vaestream.load(MODEL_DIR), "
                     "--model MODEL_DIR): its coder runs the exact networks with the entropy tables at every rate "
                     "level. The export serves the quantize / decode / reconstruct signatures (vaestream serve, "
                     "vaestream.serving.export.ExportedModel).")


def refuse_learned_saved_model(config, saved_model: str | None, job: str) -> None:
    """Raise :class:`ConfigError` when a Beam ``job`` (``encode`` / ``decode``) is given ``--saved_model`` of a
    model with a learned entropy model (``config``, read from it): its export holds one rate level's signatures,
    not the coder the job runs; the job takes the model directory (``--model``)."""
    from vaestream.errors import ConfigError

    if saved_model is None or not config.entropy_model:
        return
    raise ConfigError(f"--saved_model {saved_model}: the export of a model with a learned entropy model "
                      f"({config.entropy_model}); the {job} job codes such a model from its model directory: it "
                      "needs --model MODEL_DIR (the exact networks and entropy tables at every rate level)")


def _versions(base: Path) -> list[int]:
    """The numeric entries of ``base`` (complete versions or not: a new version number is above all of them)."""
    return sorted(int(p.name) for p in base.iterdir() if p.name.isdigit() and p.name.isascii())


def _pow2(e: tf.Tensor) -> tf.Tensor:
    """2^e float64 for int64 ``e`` in [-1022, 1023], exactly (from its exponent bits)."""
    return tf.bitcast(tf.bitwise.left_shift(e + 1023, tf.constant(52, tf.int64)), tf.float64)


def _exponent(m: tf.Tensor) -> tf.Tensor:
    """NumPy's ``frexp(m)[1]`` int64 of float64 ``m >= 0`` (normal numbers; 0 and subnormals give -1022, which
    the caller clamps to the same r as NumPy)."""
    bits = tf.bitcast(m, tf.int64)
    return tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, tf.constant(52, tf.int64)), 0x7FF) - 1022


class TFExactConv:
    """:class:`vaestream.coding.exact_conv.ExactConv` in float64 TF ops (static spatial sizes)."""

    def __init__(self, conv):
        self.k, self.stride, self.bits, self.s = conv.k, conv.stride, int(conv.bits), int(conv.s)
        self.wq, self.b = conv.wq, conv.b

    def __call__(self, t: tf.Tensor) -> tf.Tensor:
        from vaestream.coding.exact_conv import same_padding

        h, w, c = (int(v) for v in t.shape[1:])
        k, st = self.k, self.stride
        (ho, top, bottom), (wo, left, right) = same_padding(h, k, st), same_padding(w, k, st)
        pad = tf.pad(t, [[0, 0], [top, bottom], [left, right], [0, 0]])
        rows = tf.concat([pad[:, i:i + st * (ho - 1) + 1:st, j:j + st * (wo - 1) + 1:st]
                          for i in range(k) for j in range(k)], axis=-1)
        rows = tf.reshape(rows, [-1, k * k * c])
        e = _exponent(tf.reduce_max(tf.abs(rows), axis=1, keepdims=True))
        r = tf.minimum(self.bits - e, 960)
        rows = tf.math.rint(rows * _pow2(r))
        y = tf.matmul(rows, tf.constant(self.wq, tf.float64)) * _pow2(-(r + self.s))
        y = y + tf.constant(self.b, tf.float64)
        return tf.reshape(y, [-1, ho, wo, self.wq.shape[1]])


def _d2s(t: tf.Tensor, crop: tuple[int, int]) -> tf.Tensor:
    from vaestream.conv import STRIDE

    return tf.nn.depth_to_space(t, STRIDE)[:, :crop[0], :crop[1], :]


class LearnedServingModule(tf.Module):
    """The saved module of a :class:`vaestream.coding.learned.LearnedCodec` at rate level ``level`` (module
    docstring)."""

    def __init__(self, codec, level: int, assets: dict[str, Path]):
        super().__init__(name="vaestream_learned_export")
        from vaestream.config import latent_grid
        from vaestream.entropy_models.hyperprior import hyper_grid

        cfg = codec.config
        self.assets = {name: tf.saved_model.Asset(str(p)) for name, p in assets.items()}
        self.shape = tuple(cfg.input_shape[:2])
        self.pc, self.c, self.kind, self.nt = codec.picture_channels, codec.channels, codec.kind, codec.tables.channels
        self.grid = tuple(latent_grid(self.shape, cfg.channels))
        self.hgrid = hyper_grid(*self.grid)
        zgrid = self.hgrid[1] if self.kind == "hyperprior" else (0, 0)
        self.nq, self.nz = self.grid[0] * self.grid[1] * self.c, zgrid[0] * zgrid[1] * self.c
        an = codec._analysis
        self.enc = [TFExactConv(v) for v in an.convs] + [TFExactConv(an.head)]
        self.ha = [TFExactConv(v) for v in an.ha] if self.kind == "hyperprior" else []
        self.hs = [TFExactConv(v) for v in codec._hs.convs] if codec._hs is not None else []
        syn = codec._synthesis
        self.dec = [TFExactConv(syn.head)] + [TFExactConv(v) for v in syn.convs]
        self.maps = syn.maps
        self.gain = np.asarray(codec._gain[level], np.float64)
        self.inverse_gain = np.asarray(syn.inverse_gain[level], np.float64)
        x = tf.TensorSpec([None, cfg.input_dim], tf.float32, name="x")
        q = tf.TensorSpec([None, self.nq], tf.int32, name="symbols")
        z = tf.TensorSpec([None, self.nz], tf.int32, name="side_symbols")
        self.quantize = tf.function(self._quantize, input_signature=[x])
        self.decode = tf.function(self._decode, input_signature=[q, z])
        self.reconstruct = tf.function(self._reconstruct, input_signature=[x])

    def _mean_and_table(self, z: tf.Tensor | None, n: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(mu float64, table index int64), each ``[n, h, w, C]``."""
        if z is None:
            shape = tf.stack([n, self.grid[0], self.grid[1], self.c])
            return tf.zeros(shape, tf.float64), tf.broadcast_to(tf.range(self.c, dtype=tf.int64), shape)
        t = tf.nn.relu(_d2s(self.hs[0](z), self.hgrid[0]))
        t = tf.nn.relu(_d2s(self.hs[1](t), self.grid))
        out = self.hs[2](t)
        idx = tf.clip_by_value(tf.math.rint(out[..., self.c:]), 0.0, 63.0)
        return out[..., :self.c], self.nt + tf.cast(idx, tf.int64)

    def _symbols(self, x: tf.Tensor):
        n = tf.shape(x)[0]
        t = tf.reshape(tf.cast(x, tf.float64), [-1, self.shape[0], self.shape[1], self.pc])
        for conv in self.enc[:-1]:
            t = tf.nn.relu(conv(t))
        y = self.enc[-1](t)[..., :self.c] * tf.constant(self.gain)
        z = None
        if self.ha:
            t = tf.nn.relu(self.ha[0](y))
            t = tf.nn.relu(self.ha[1](t))
            z = tf.math.rint(self.ha[2](t))
        mu, table = self._mean_and_table(z, n)
        return z, tf.math.rint(y - mu), mu, table

    def _quantize(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        z, q, _, table = self._symbols(x)
        n = tf.shape(x)[0]
        side = tf.zeros([n, 0], tf.int32) if z is None else tf.reshape(tf.cast(z, tf.int32), [n, self.nz])
        return {"symbols": tf.reshape(tf.cast(q, tf.int32), [n, self.nq]), "side_symbols": side,
                "table_index": tf.reshape(tf.cast(table, tf.int32), [n, self.nq])}

    def _synthesis(self, y_hat: tf.Tensor) -> tf.Tensor:
        from vaestream.conv import STRIDE

        sizes = [self.shape]
        for _ in self.dec[1:-1]:
            sizes.append((-(-sizes[-1][0] // STRIDE), -(-sizes[-1][1] // STRIDE)))
        t = tf.nn.relu(self.dec[0](y_hat * tf.constant(self.inverse_gain)))
        for i, (conv, hw) in enumerate(zip(self.dec[1:], sizes[::-1])):
            t = _d2s(conv(t), hw)
            if i < len(self.dec) - 2:
                t = tf.nn.relu(t)
        t = tf.reshape(t, [-1, self.shape[0], self.shape[1], self.maps, self.pc])[..., 0, :]
        x_hat = tf.cast(tf.clip_by_value(t, 0.0, 1.0), tf.float32)
        return tf.reshape(x_hat, [-1, self.shape[0] * self.shape[1] * self.pc])

    def _decode(self, symbols: tf.Tensor, side_symbols: tf.Tensor) -> dict[str, tf.Tensor]:
        n = tf.shape(symbols)[0]
        z = None
        if self.hs:
            z = tf.reshape(tf.cast(side_symbols, tf.float64), [-1, self.hgrid[1][0], self.hgrid[1][1], self.c])
        mu, _ = self._mean_and_table(z, n)
        q = tf.reshape(tf.cast(symbols, tf.float64), [-1, self.grid[0], self.grid[1], self.c])
        return {"x_hat": self._synthesis(q + mu)}

    def _reconstruct(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        _, q, mu, _ = self._symbols(x)
        return {"x_hat": self._synthesis(q + mu)}

    def signatures(self) -> dict[str, Any]:
        out = {name: getattr(self, name).get_concrete_function() for name in ("quantize", "decode", "reconstruct")}
        out["serving_default"] = out["reconstruct"]
        return out


def _tables(model, source: str | None):
    """The model's :class:`LearnedTables`: ``SOURCE/entropy_tables.npz`` when it is this model's, else built."""
    from vaestream.coding.learned_tables import ENTROPY_TABLES_FILE, LearnedTables, build_learned_tables

    if source and (Path(source) / ENTROPY_TABLES_FILE).is_file():
        tables = LearnedTables.load(Path(source) / ENTROPY_TABLES_FILE)
        if tables.fingerprint == model.fingerprint():
            return tables
    return build_learned_tables(model)


def export_learned(model, export_base: str | Path, version: int | None = None, *, quality: float | None = None,
                   verify: bool = True, source: str | None = None, skip_unchanged: bool = False) -> Path:
    """Export an in-memory model with a learned entropy model as ``export_base/version/`` at the rate level of
    ``quality`` (module docstring); arguments as :func:`vaestream.serving.export.export`. ``verify``: the
    reloaded ``reconstruct`` equals the codec's reconstructions of a probe bit for bit.

    Raises:
      ModelError: the version exists, or verification failed.  ConfigError: ``quality`` is not a rate level.
    """
    from vaestream.coding.learned import LearnedCodec

    codec = LearnedCodec(model, _tables(model, source), name=source or "model")
    level = codec.level(quality)
    base = Path(export_base)
    info = {"format": 1, "fingerprint": codec.fingerprint, "entropy_model": codec.kind, "level": level,
            "quality": float(codec.qualities[level])}
    base.mkdir(parents=True, exist_ok=True)
    if version is None:
        existing = [v for v in _versions(base) if (base / str(v) / "saved_model.pb").is_file()]
        if skip_unchanged and existing and _same_info(base / str(existing[-1]), info):
            return base / str(existing[-1])
        version = max(_versions(base), default=0) + 1
    final = base / str(int(version))
    if int(version) < 0:
        raise ModelError(f"{base}: version must be a non-negative integer, got {version}")
    if final.exists():
        if skip_unchanged and _same_info(final, info):
            return final
        raise ModelError(f"{final}: version {version} already exists (versions are immutable; pick another)")
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=base) as staging:
        src = Path(staging) / "assets_src"
        src.mkdir()
        (src / CONFIG_ASSET).write_text(model.config.to_json() + "\n")
        (src / FINGERPRINT_ASSET).write_text(codec.fingerprint + "\n")
        (src / INFO_ASSET).write_text(json.dumps(info, sort_keys=True) + "\n")
        codec.tables.save(src / TABLES_ASSET)
        module = LearnedServingModule(codec, level, {p.name: p for p in src.iterdir()})
        out = Path(staging) / str(int(version))
        tf.saved_model.save(module, str(out), signatures=module.signatures())
        if verify:
            _verify(out, codec, level)
        os.replace(out, final)
    return final


def _same_info(path: Path, info: dict[str, Any]) -> bool:
    try:
        return json.loads((path / "assets" / "export.json").read_text()) == json.loads(json.dumps(info))
    except (OSError, ValueError):
        return False


def _verify(path: Path, codec, level: int) -> None:
    x = np.random.default_rng(12345).uniform(0.0, 1.0, size=(4, codec.config.input_dim)).astype(np.float32)
    got = tf.saved_model.load(str(path)).signatures["reconstruct"](x=tf.constant(x))["x_hat"].numpy()
    z, q = codec.symbols(codec.model_inputs(x)[0], level)
    want = codec.reconstruct(z, q, level, tuple(codec.config.input_shape[:2]))
    if not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
        raise ModelError(f"{path}: the exported reconstruct signature differs from the codec's reconstructions")
