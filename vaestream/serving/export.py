"""Export a trained model as a versioned TensorFlow SavedModel (TF Serving's layout), and load one back.

``export(MODEL_DIR, EXPORT_BASE)`` writes ``EXPORT_BASE/N/`` — the directory layout TF Serving, Vertex AI,
Beam's RunInference and plain ``tf.saved_model.load`` all read::

    EXPORT_BASE/N/saved_model.pb          the graph with its signatures
    EXPORT_BASE/N/variables/              the weights
    EXPORT_BASE/N/assets/config.json      the ModelConfig (canonical JSON)
    EXPORT_BASE/N/assets/fingerprint.txt  VAE.fingerprint(): 64 hex digits, SHA-256 of config + weights
    EXPORT_BASE/N/assets/coder_tables.npz the coder's quantisation / probability tables
                                          (only when MODEL_DIR/coder_tables.npz exists)
    EXPORT_BASE/N/assets/export.json      how the signatures were made (coder quality, elbo seed and L)

Signatures (every input float32 with a free leading batch dimension B; D = input_dim, Nz = latent_dim):

* ``encode(x[B, D]) -> {mean[B, Nz], log_scale[B, Nz]}`` — q(z|x) = N(mean, diag exp(log_scale)^2).
  ``serving_default`` is the same function.
* ``decode(z[B, Nz]) -> {x_mean[B, D], logits[B, D]}`` (Bernoulli), ``{x_mean, log_scale}`` (Gaussian) or
  ``{x_mean, log_alpha, log_beta}`` (beta-binomial): the parameters of p(x|z).
* ``elbo(x[B, D]) -> {elbo[B], rate[B], distortion[B]}`` in nats: the SGVB estimator B
  (``-KL(q||p) + 1/L sum_l log p(x|z_l)``) with fixed noise (:func:`elbo_fixed_noise`), so a record's value
  is the same in every batch and every process.
* ``quantize(x[B, D]) -> {symbols[B, Nz] int32}`` — the coder's quantisation of the posterior
  (:func:`vaestream.coding.tables.quantize_tf` over one ladder level of the tables, embedded as constants:
  ``q = clip(rint(mean * inv_delta), +-2^30)``, 0 on inactive dimensions), bit-identical to
  :func:`vaestream.coding.tables.quantize` at the same quality. Only when the model has coder tables.
* ``reconstruct(x[B, D]) -> {x_hat[B, D]}`` — the decoder mean at the dequantised symbols (with tables), or at
  the posterior mean (without).

A learned entropy model's export has ``quantize``, ``decode``, ``reconstruct`` (exact float64) at one rate level:
:mod:`vaestream.serving.learned_export`. The export is staged under a hidden name in ``EXPORT_BASE`` and renamed
into place, so a server polling ``EXPORT_BASE`` (TF Serving does) never sees a half-written version.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from vaestream import store
from vaestream.config import ModelConfig
from vaestream.errors import ConfigError, DataError, ModelError
from vaestream.model import VAE

CONFIG_ASSET = "config.json"
FINGERPRINT_ASSET = "fingerprint.txt"
TABLES_ASSET = "coder_tables.npz"
INFO_ASSET = "export.json"  # how the signatures were made: coder quality, elbo estimator / samples / seed
MODEL_TABLES = "coder_tables.npz"  # MODEL_DIR/coder_tables.npz, written by the coder
SIGNATURES = ("encode", "decode", "quantize", "reconstruct", "elbo")
DEFAULT_SIGNATURE = "serving_default"

_VERSION_RE = re.compile(r"^\d+$")


# -- versions --------------------------------------------------------------------------------------------------
def list_versions(export_base: str | Path) -> list[int]:
    """The complete versions under ``export_base`` (numeric directories holding a ``saved_model.pb``), sorted."""
    base = Path(export_base)
    if not base.is_dir():
        return []
    out = []
    for p in base.iterdir():
        if p.is_dir() and _VERSION_RE.match(p.name) and (p / "saved_model.pb").is_file():
            out.append(int(p.name))
    return sorted(out)


def resolve_export(path: str | Path, version: int | None = None) -> Path:
    """The version directory for ``path``: either a version directory itself (it holds ``saved_model.pb``)
    or an export base, in which case ``version`` (default: the latest) is chosen.

    Raises:
      ModelError: no such export / version.
    """
    p = Path(path)
    if (p / "saved_model.pb").is_file():
        if version is not None and p.name != str(version):
            raise ModelError(f"{p}: is version {p.name}, not {version}")
        return p
    versions = list_versions(p)
    if not versions:
        raise ModelError(f"{p}: no SavedModel (neither saved_model.pb nor numeric version directories)")
    if version is None:
        return p / str(versions[-1])
    if version not in versions:
        raise ModelError(f"{p}: no version {version} (versions: {versions})")
    return p / str(version)


def _next_version(export_base: Path) -> int:
    used = [int(p.name) for p in export_base.iterdir() if _VERSION_RE.match(p.name)] if export_base.is_dir() else []
    return max(used, default=0) + 1


# -- the exported module ---------------------------------------------------------------------------------------
def _load_tables(model_dir: Path):
    """The model's coder tables (``MODEL_DIR/coder_tables.npz``), or None if it has none."""
    path = model_dir / MODEL_TABLES
    if not path.is_file():
        return None
    try:
        from vaestream.coding.tables import CoderTables
    except ImportError as e:  # the coder is a separate part of the package
        raise ModelError(f"{path}: the model has coder tables but vaestream.coding.tables cannot be imported ({e})"
                         ) from e
    return CoderTables.load(path)


def elbo_fixed_noise(model: VAE, x: tf.Tensor, num_samples: int = 1, seed: int = 0) -> dict[str, tf.Tensor]:
    """The SGVB estimator B of the ELBO with fixed noise, what the ``elbo`` signature computes:

        elbo(x) = -KL(q(z|x) || p(z)) + 1/L sum_l log p(x | mu(x) + sigma(x) * eps_l)

    with ``eps_l = stateless_normal([L, Nz], seed)`` shared by every record, so a record's value does not
    depend on the batch it comes in, the batch size or the process (each record's estimate is still
    unbiased; the noise is only shared between records). ``x`` is ``[B, D]``; returns ``{"elbo", "rate",
    "distortion"}``, each ``[B]``, in nats.
    """
    from vaestream.layers import blocked

    return blocked(lambda xb: _elbo_fixed_noise_block(model, xb, num_samples, seed),
                   tf.convert_to_tensor(x, tf.float32))


def _elbo_fixed_noise_block(model: VAE, x: tf.Tensor, num_samples: int, seed: int) -> dict[str, tf.Tensor]:
    mean, log_scale = model.encoder_params(x)
    nz = model.config.latent_dim
    eps = tf.random.stateless_normal([num_samples, 1, nz], seed=tf.constant([seed, 0], tf.int32))
    z = mean + tf.exp(log_scale) * eps  # [L, B, Nz]
    distortion = -tf.reduce_mean(model.decode(z).log_prob(model.observe(x)), axis=0)
    rate = tfp.distributions.kl_divergence(model.encode(x), model.prior)
    return {"elbo": -(rate + distortion), "rate": rate, "distortion": distortion}


class ServingModule(tf.Module):
    """The tf.Module that is saved: the VAE plus one ``tf.function`` per signature (see the module docstring).

    Args:
      model: the trained VAE.
      tables: the coder's tables (``vaestream.coding.tables.CoderTables``) or None.
      asset_paths: file name -> path of the files to ship in ``assets/``.
      elbo_samples: L of the ``elbo`` signature's estimator.
      elbo_seed: its stateless seed.
    """

    def __init__(self, model: VAE, tables: Any | None, asset_paths: dict[str, Path],
                 elbo_samples: int = 1, elbo_seed: int = 0, quality: float | None = None):
        super().__init__(name="vaestream_export")
        self.model = model
        cfg = model.config
        self.assets = {name: tf.saved_model.Asset(str(p)) for name, p in asset_paths.items()}
        self._tables = tables
        if tables is not None:
            # {"inv_delta", "active"} and delta of one ladder level: variables (saved in variables/), so a
            # module re-exported with other tables (ExportCache) keeps its traced signatures
            q = tables.as_tensors(quality)
            self._quant = {k: tf.Variable(v, trainable=False, name=f"quant_{k}") for k, v in q.items()}
            self._delta = tf.Variable(np.float32(tables.delta[tables.level(quality)]), trainable=False,
                                      name="quant_delta")
        self._elbo_samples, self._elbo_seed = int(elbo_samples), int(elbo_seed)
        x_spec = tf.TensorSpec([None, cfg.input_dim], tf.float32, name="x")
        z_spec = tf.TensorSpec([None, cfg.latent_dim], tf.float32, name="z")
        self.encode = tf.function(self._encode, input_signature=[x_spec])
        self.decode = tf.function(self._decode, input_signature=[z_spec])
        self.elbo = tf.function(self._elbo, input_signature=[x_spec])
        self.reconstruct = tf.function(self._reconstruct, input_signature=[x_spec])
        self.quantize = tf.function(self._quantize, input_signature=[x_spec]) if tables is not None else None

    def set_tables(self, tables: Any, quality: float | None = None) -> None:
        """Hold ``tables`` (of the same latent size) at ``quality`` from now on: the ``quantize`` and
        ``reconstruct`` signatures read them, the traces stay."""
        if (tables is None) != (self._tables is None):
            raise ModelError("set_tables: a module made without coder tables cannot take them, and vice versa")
        if tables is None:
            return
        q = tables.as_tensors(quality)
        for k, v in q.items():
            self._quant[k].assign(v)
        self._delta.assign(np.float32(tables.delta[tables.level(quality)]))
        self._tables = tables

    # Every signature runs the networks in fixed row blocks (vaestream.layers.blocked): a record's outputs are
    # bit-identical to the Python API's and independent of the request's batch.
    def _encode(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        mean, log_scale = self.model.encoder_params_exact(x)
        return {"mean": mean, "log_scale": log_scale}

    def _decode(self, z: tf.Tensor) -> dict[str, tf.Tensor]:
        return dict(self.model.decoder_params_exact(z))

    def _elbo(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return elbo_fixed_noise(self.model, x, self._elbo_samples, self._elbo_seed)

    def _symbols(self, x: tf.Tensor) -> tf.Tensor:
        from vaestream.coding.tables import quantize_tf

        mean, _ = self.model.encoder_params_exact(x)
        return quantize_tf(mean, self._quant)

    def _quantize(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"symbols": self._symbols(x)}

    def _reconstruct(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        if self._tables is None:
            z, _ = self.model.encoder_params_exact(x)
        else:  # z_hat = float32(q) * delta, exactly 0 (the prior mean) where inactive (coding.tables.dequantize)
            z_hat = tf.cast(self._symbols(x), tf.float32) * self._delta
            z = tf.where(self._quant["active"], z_hat, tf.zeros_like(z_hat))
        return {"x_hat": self.model.decoder_params_exact(z)["x_mean"]}

    def signatures(self) -> dict[str, Any]:
        """Signature name -> concrete function, ``serving_default`` = ``encode``."""
        sigs = {"encode": self.encode, "decode": self.decode, "elbo": self.elbo, "reconstruct": self.reconstruct}
        if self.quantize is not None:
            sigs["quantize"] = self.quantize
        out = {name: fn.get_concrete_function() for name, fn in sigs.items()}
        out[DEFAULT_SIGNATURE] = out["encode"]
        return out


# -- export ----------------------------------------------------------------------------------------------------
class ExportCache:
    """The traced :class:`ServingModule` of one in-memory model, kept between its exports, and the SavedModel
    written from it.

    A caller that exports the same ``VAE`` object again and again with new weights (the online learner's
    publisher) passes one cache to :func:`export_model`. The first export through it is a full
    ``tf.saved_model.save`` (~0.9 s for a 784-200-10 model, a third of it tracing). Later ones reuse that
    export's graph, which does not depend on the weights and tables (variables): the first version's
    ``saved_model.pb`` (same bytes), the new assets, ``variables/`` written by one ``SaveV2`` with the same
    checkpoint keys and object graph (:meth:`write_version`), and ``fingerprint.pb`` recomputed. A fresh
    ``tf.saved_model.load`` or TF Serving's loader (the ``saver_def`` restore op, reading the same keys) gets
    what a full save of those weights gives. The module and graph are rebuilt when the model object, its
    config, the presence of tables, the asset names or the elbo settings change. The assets are staged in the
    cache's own directory."""

    def __init__(self):
        self._key = None
        self._module: ServingModule | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="vaestream-export-assets-")
        self.assets = Path(self._dir.name)
        self._template: dict[str, Any] | None = None  # the saved graph of _module (see capture)

    def module(self, model: VAE, tables: Any | None, assets: dict[str, Path], elbo_samples: int, elbo_seed: int,
               quality: float | None) -> ServingModule:
        """The traced module for these arguments (the cached one, given ``tables``, or a new one)."""
        key = (id(model), model.config.to_json(), tables is None, int(elbo_samples), int(elbo_seed),
               tuple(sorted(assets)))
        if self._module is None or key != self._key or self._module.model is not model:
            self._module = ServingModule(model, tables, assets, elbo_samples=elbo_samples, elbo_seed=elbo_seed,
                                         quality=quality)
            self._key = key
            self._template = None
        else:
            self._module.set_tables(tables, quality)
        return self._module

    @property
    def has_template(self) -> bool:
        """Whether the next export of the cached module can reuse a saved graph (:meth:`write_version`)."""
        return self._template is not None

    def capture(self, path: Path, module: ServingModule, verified: bool) -> None:
        """Keep the graph of ``module`` just saved in full at ``path`` for later versions: ``saved_model.pb``,
        the checkpoint's object graph and keys, and the variable each key holds (a key is the path of attribute
        names to it, ``model/encoder/out/w/.ATTRIBUTES/VARIABLE_VALUE``); when a key does not resolve so, or the
        keys miss a variable, nothing is kept (full saves go on). ``verified``: :func:`_verify` passed."""
        self._template = None
        if module is not self._module:
            return
        reader = tf.train.load_checkpoint(str(path / "variables" / "variables"))
        keys = sorted(reader.get_variable_to_shape_map())
        if _OBJECT_GRAPH_KEY not in keys:
            return
        keys.remove(_OBJECT_GRAPH_KEY)
        variables = [_resolve_key(module, k) for k in keys]
        if any(v is None for v in variables) or \
                sorted(id(v) for v in variables) != sorted(id(v) for v in module.variables):
            return
        self._template = {"pb": (path / "saved_model.pb").read_bytes(), "keys": keys, "variables": variables,
                          "graph": reader.get_tensor(_OBJECT_GRAPH_KEY), "verified": verified}

    def write_version(self, out: Path, assets: dict[str, Path], model: VAE, verify: bool) -> None:
        """Write the cached module's SavedModel, its variables as they are now, to the new directory ``out``
        without ``tf.saved_model.save``: the captured ``saved_model.pb``, ``assets`` (name -> file) copied,
        ``variables/`` by one ``SaveV2`` with the captured keys and object graph, ``fingerprint.pb``.
        ``verify``: read the variables back and check each bit for bit (and, the first time, load the whole
        SavedModel and check ``encode`` against ``model``, as a full export does)."""
        import shutil

        t = self._template
        if t is None:
            raise ModelError("ExportCache.write_version: no saved graph captured yet (export once in full)")
        (out / "variables").mkdir(parents=True)
        (out / "assets").mkdir()
        (out / "saved_model.pb").write_bytes(t["pb"])
        for name, src in assets.items():
            shutil.copyfile(src, out / "assets" / name)
        values = [v.read_value() for v in t["variables"]]
        prefix = str(out / "variables" / "variables")
        tf.raw_ops.SaveV2(prefix=prefix, tensor_names=t["keys"] + [_OBJECT_GRAPH_KEY],
                          shape_and_slices=[""] * (len(values) + 1),
                          tensors=values + [tf.constant(t["graph"], tf.string)])
        _write_tf_fingerprint(out)
        if verify:
            reader = tf.train.load_checkpoint(prefix)
            for k, v in zip(t["keys"], values):
                if not np.array_equal(reader.get_tensor(k), v.numpy()):
                    raise ModelError(f"{out}: variables/ holds another value of {k} than the model")
            if not t["verified"]:
                _verify(out, model)
                t["verified"] = True


_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


def _resolve_key(root: tf.Module, key: str) -> tf.Variable | None:
    """The variable a SavedModel checkpoint key names (``a/b/0/c/.ATTRIBUTES/VARIABLE_VALUE``: attribute ``a``,
    its attribute ``b``, item 0 of that list, its attribute ``c``), or None when the key is not of that form."""
    import collections.abc

    suffix = "/.ATTRIBUTES/VARIABLE_VALUE"
    if not key.endswith(suffix):
        return None
    obj: Any = root
    for name in key[:-len(suffix)].split("/"):
        if not name or "." in name:  # an escaped name: not resolved here
            return None
        try:
            if isinstance(obj, collections.abc.Mapping):
                obj = obj[name]
            elif isinstance(obj, collections.abc.Sequence) and not isinstance(obj, str):
                obj = obj[int(name)]
            else:
                obj = getattr(obj, name)
        except (KeyError, IndexError, ValueError, AttributeError):
            return None
    return obj if isinstance(obj, tf.Variable) else None


def _write_tf_fingerprint(path: Path) -> None:
    """``fingerprint.pb`` of the SavedModel at ``path`` (what ``tf.saved_model.save`` writes: hashes of the
    graph and of ``variables/variables.index``), when this TensorFlow writes one."""
    try:
        from tensorflow.python.saved_model import fingerprinting_utils
    except ImportError:  # an older TensorFlow: a SavedModel without fingerprint.pb is complete
        return
    fingerprinting_utils.write_fingerprint(str(path))


def export(model_dir: str | Path, export_base: str | Path, version: int | None = None, *,
           quality: float | None = None, elbo_samples: int = 1, elbo_seed: int = 0, verify: bool = True,
           skip_unchanged: bool = False) -> Path:
    """Export the model in ``model_dir`` as ``export_base/version/`` and return that path.

    Args:
      model_dir: a vaestream model directory (``config.json`` + ``ckpt/``, optionally ``coder_tables.npz``).
      export_base: the directory holding the versions (TF Serving's ``--model_base_path``); created if needed.
      version: the version number (a non-negative integer); default: one more than the largest existing one
        (1 for an empty base). An existing version is never overwritten.
      quality: the coder quality (a step of the tables' ladder; default 1.0) of the ``quantize`` and
        ``reconstruct`` signatures. Recorded in ``assets/export.json``.
      elbo_samples, elbo_seed: L and the stateless seed of the ``elbo`` signature.
      verify: reload the written SavedModel and check that ``encode`` reproduces the in-process model.
      skip_unchanged: write nothing when the version this export would duplicate holds the same export — the
        latest version (no ``version`` given) or ``version`` itself (it exists) with the same model
        fingerprint (config and weights), coder tables, quality and elbo settings — and return that version's
        path (``vaestream export`` does this). Without it every call writes a new version.

    Raises:
      ModelError: the model directory is incomplete, the version exists (with other contents, under
        ``skip_unchanged``), or verification failed.
    """
    model_dir = Path(model_dir)
    model = store.load_model(model_dir)
    tables = _load_tables(model_dir)
    return export_model(model, export_base, tables, version, quality=quality, elbo_samples=elbo_samples,
                        elbo_seed=elbo_seed, verify=verify, source=str(model_dir), skip_unchanged=skip_unchanged)


def export_model(model: VAE, export_base: str | Path, tables: Any | None = None, version: int | None = None, *,
                 quality: float | None = None, elbo_samples: int = 1, elbo_seed: int = 0, verify: bool = True,
                 cache: ExportCache | None = None, source: str | None = None, skip_unchanged: bool = False) -> Path:
    """Export an in-memory ``model`` (and its coder ``tables``, a ``vaestream.coding.tables.CoderTables`` or
    None) as ``export_base/version/``; :func:`export` reads both from a model directory first. Arguments as
    :func:`export`; ``cache``: an :class:`ExportCache` to reuse the traced signatures between exports of the
    same model object; ``source``: names the model in error messages.

    Raises:
      ConfigError: a two-layer model.  ModelError: tables of another model, the version exists, or
      verification failed.
    """
    base, name = Path(export_base), source or "model"
    if model.config.entropy_model:  # its own signatures (vaestream.serving.learned_export); a full save, cache or not
        from vaestream.serving.learned_export import export_learned
        return export_learned(model, base, version, quality=quality, verify=verify, source=source,
                              skip_unchanged=skip_unchanged)
    if model.config.hierarchical:
        raise ConfigError(f"{name}: a two-layer model (top_latent_dim {model.config.top_latent_dim}) is for "
                          "lossless bits-back coding (vaestream compress --lossless, which needs the model "
                          "directory); the SavedModel's elbo signature is written for one stochastic layer")
    fingerprint = model.fingerprint()
    if tables is not None and tables.fingerprint != fingerprint:
        where = f"{source}/{MODEL_TABLES}" if source else name
        raise ModelError(f"{where}: coder tables built for model {tables.fingerprint[:16]}..., not this model "
                         f"({fingerprint[:16]}...); rebuild the coder tables")
    info: dict[str, Any] = {"format": 1, "fingerprint": fingerprint, "elbo_estimator": "B, fixed noise",
                            "elbo_samples": int(elbo_samples), "elbo_seed": int(elbo_seed),
                            "quality": None if tables is None else float(tables.qualities[tables.level(quality)])}
    base.mkdir(parents=True, exist_ok=True)
    if version is None:
        existing = list_versions(base)
        if skip_unchanged and existing and same_export(base / str(existing[-1]), info, tables):
            return base / str(existing[-1])
        version = _next_version(base)
    version = int(version)
    if version < 0:
        raise ModelError(f"{base}: version must be a non-negative integer, got {version}")
    final = base / str(version)
    if final.exists():
        if skip_unchanged and same_export(final, info, tables):
            return final
        raise ModelError(f"{final}: version {version} already exists" + (" with other contents (weights, coder "
                         "tables, quality or elbo settings)" if skip_unchanged else "") +
                         " (versions are immutable; pick another)")
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=base) as staging:
        stage = Path(staging)
        asset_dir = cache.assets if cache is not None else stage / "assets_src"
        asset_dir.mkdir(exist_ok=True)
        (asset_dir / CONFIG_ASSET).write_text(model.config.to_json() + "\n")
        (asset_dir / FINGERPRINT_ASSET).write_text(fingerprint + "\n")
        (asset_dir / INFO_ASSET).write_text(json.dumps(info, sort_keys=True) + "\n")
        assets = {CONFIG_ASSET: asset_dir / CONFIG_ASSET, FINGERPRINT_ASSET: asset_dir / FINGERPRINT_ASSET,
                  INFO_ASSET: asset_dir / INFO_ASSET}
        if tables is not None:
            tables.save(asset_dir / TABLES_ASSET)
            assets[TABLES_ASSET] = asset_dir / TABLES_ASSET
        if cache is not None:
            module = cache.module(model, tables, assets, elbo_samples, elbo_seed, quality)
        else:
            module = ServingModule(model, tables, assets, elbo_samples=elbo_samples, elbo_seed=elbo_seed,
                                   quality=quality)
        out = stage / str(version)
        if cache is not None and cache.has_template:
            cache.write_version(out, assets, model, verify)
        else:
            tf.saved_model.save(module, str(out), signatures=module.signatures())
            if verify:
                _verify(out, model)
            if cache is not None:
                cache.capture(out, module, verified=verify)
        for asset in assets:
            if not (out / "assets" / asset).is_file():
                raise ModelError(f"{out}: asset {asset} was not written to assets/")
        if final.exists():
            raise ModelError(f"{final}: version {version} appeared while exporting")
        os.replace(out, final)
    return final


def same_export(path: str | Path, info: dict[str, Any], tables: Any | None) -> bool:
    """Whether the version at ``path`` was exported with ``info`` (the ``assets/export.json`` an export would
    write: model fingerprint, quality, elbo settings) and the same coder ``tables`` (compared by
    ``CoderTables.digest``; None: the version has none)."""
    assets = Path(path) / "assets"
    try:
        if json.loads((assets / INFO_ASSET).read_text()) != json.loads(json.dumps(info)):
            return False
        if (assets / FINGERPRINT_ASSET).read_text().strip() != info["fingerprint"]:
            return False
    except (OSError, ValueError):
        return False
    shipped = assets / TABLES_ASSET
    if tables is None or not shipped.is_file():
        return tables is None and not shipped.exists()
    try:
        return type(tables).load(shipped).digest() == tables.digest()
    except ModelError:
        return False


def _probe(config: ModelConfig, n: int = 4) -> np.ndarray:
    return np.random.default_rng(12345).uniform(0.0, 1.0, size=(n, config.input_dim)).astype(np.float32)


def _verify(path: Path, model: VAE) -> None:
    loaded = tf.saved_model.load(str(path))
    x = _probe(model.config)
    got = loaded.signatures["encode"](x=tf.constant(x))
    mean, log_scale = model.encoder_params(tf.constant(x))
    for name, want in (("mean", mean), ("log_scale", log_scale)):
        if not np.allclose(got[name].numpy(), want.numpy(), rtol=1e-5, atol=1e-5):
            raise ModelError(f"{path}: the exported encode signature's {name!r} differs from the model's")


# -- loading ---------------------------------------------------------------------------------------------------
class ExportedModel:
    """A loaded export: ``tf.saved_model.load`` plus the assets, with NumPy-in / NumPy-out signature calls.

    Needs no Python model code or checkpoint: everything comes from the SavedModel directory.

    Args:
      path: a version directory or an export base (then ``version``, default the latest).
    """

    def __init__(self, path: str | Path, version: int | None = None):
        self.path = resolve_export(path, version)
        self.version = int(self.path.name) if _VERSION_RE.match(self.path.name) else None
        assets = self.path / "assets"
        try:
            self.config = ModelConfig.from_json((assets / CONFIG_ASSET).read_text())
            self.fingerprint = (assets / FINGERPRINT_ASSET).read_text().strip()
        except FileNotFoundError as e:
            raise ModelError(f"{self.path}: not a vaestream export (missing assets/{Path(e.filename).name})") from e
        self.tables_path = assets / TABLES_ASSET if (assets / TABLES_ASSET).is_file() else None
        info = assets / INFO_ASSET
        self.info: dict[str, Any] = json.loads(info.read_text()) if info.is_file() else {}
        try:
            self.module = tf.saved_model.load(str(self.path))
        except (OSError, tf.errors.OpError, ValueError) as e:
            raise ModelError(f"{self.path}: cannot load the SavedModel ({e})") from e
        self.signatures = dict(self.module.signatures)

    def signature_inputs(self, name: str) -> dict[str, tf.TensorSpec]:
        """Input name -> TensorSpec of a signature."""
        _, kwargs = self.signatures[name].structured_input_signature
        return dict(kwargs)

    def run(self, signature: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Call a signature on NumPy arrays; returns output name -> NumPy array.

        Raises:
          ModelError: unknown signature.  DataError: missing / unexpected inputs or wrong shapes.
        """
        if signature not in self.signatures:
            raise ModelError(f"{self.path}: no signature {signature!r} (has {sorted(self.signatures)})")
        specs = self.signature_inputs(signature)
        if set(inputs) != set(specs):
            raise DataError(f"{signature}: expects inputs {sorted(specs)}, got {sorted(inputs)}")
        feeds = {}
        for name, spec in specs.items():
            a = np.asarray(inputs[name], dtype=spec.dtype.as_numpy_dtype)
            if a.ndim == 1 and spec.shape.rank == 2:
                a = a[None, :]
            if not spec.shape.is_compatible_with(a.shape):
                raise DataError(f"{signature}: input {name!r} has shape {a.shape}, expected {spec.shape}")
            feeds[name] = tf.constant(a)
        out = self.signatures[signature](**feeds)
        return {k: v.numpy() for k, v in out.items()}

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x [B, D] -> (mean [B, Nz], log_scale [B, Nz]) of q(z|x)."""
        out = self.run("encode", x=x)
        return out["mean"], out["log_scale"]

    def decode(self, z: np.ndarray) -> dict[str, np.ndarray]:
        """z [B, Nz] -> the parameters of p(x|z), each [B, D]."""
        return self.run("decode", z=z)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """x [B, D] -> int32 symbols [B, Nz] (needs coder tables in the export)."""
        return self.run("quantize", x=x)["symbols"]

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """x [B, D] -> x_hat [B, D]."""
        return self.run("reconstruct", x=x)["x_hat"]

    def elbo(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """x [B, D] -> {elbo, rate, distortion}, each [B], nats."""
        return self.run("elbo", x=x)


def load_export(path: str | Path, version: int | None = None) -> ExportedModel:
    """Load an export (a version directory, or an export base and optionally a version): see
    :class:`ExportedModel`."""
    return ExportedModel(path, version)


def describe(path: str | Path) -> dict[str, Any]:
    """A JSON-able summary of an export: path, version, fingerprint, config and each signature's inputs and
    outputs (name -> [dtype, shape])."""
    m = ExportedModel(path)
    sigs = {}
    for name, fn in sorted(m.signatures.items()):
        ins = {k: [s.dtype.name, s.shape.as_list()] for k, s in m.signature_inputs(name).items()}
        outs = {k: [s.dtype.name, s.shape.as_list()] for k, s in fn.structured_outputs.items()}
        sigs[name] = {"inputs": ins, "outputs": outs}
    return {"path": str(m.path), "version": m.version, "fingerprint": m.fingerprint,
            "config": json.loads(m.config.to_json()), "has_coder_tables": m.tables_path is not None,
            "info": m.info, "signatures": sigs}
