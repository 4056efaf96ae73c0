"""SavedModel export: layout and assets, versions, every signature in a fresh process against the in-process
model (float32 round-off; bit-identical symbols), saved_model_cli, and errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from vaestream import objective, store
from vaestream.coding import tables as tables_mod
from vaestream.errors import DataError, ModelError
from vaestream.serving.export import ExportedModel, describe, elbo_fixed_noise, export, list_versions, resolve_export

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
QUALITY = 0.5


def build_tables(model, x: np.ndarray, path: Path) -> tables_mod.CoderTables:
    """Coder tables from the posteriors of real records, saved where export() looks for them."""
    mean, log_scale = (t.numpy() for t in model.encoder_params(tf.constant(x)))
    tables = tables_mod.build_tables_from_stats(model.fingerprint(), mean, log_scale)
    tables.save(path)
    return tables


def _recomputed_fingerprint(config_json: str, weights) -> str:
    """A model fingerprint from its definition: SHA-256 of the canonical (sorted keys) config JSON, then of each
    weight's shape and little-endian float32 bytes, in the model's weight order."""
    h = hashlib.sha256(json.dumps(json.loads(config_json), sort_keys=True).encode())
    for w in weights:
        a = np.ascontiguousarray(w, dtype="<f4")
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _saved_weights(path: Path) -> list[np.ndarray]:
    """The weights an export's SavedModel holds (plain TensorFlow), encoder then decoder, layer by layer, W then b."""
    loaded = tf.saved_model.load(str(path))
    out = []
    for net in (loaded.model.encoder, loaded.model.decoder):
        for layer in list(net.hidden) + [net.out]:
            out += [layer.w.numpy(), layer.b.numpy()]
    return out


@pytest.fixture(scope="module")
def records(mnist_test) -> np.ndarray:
    """300 real MNIST test images as model inputs [300, 784] in [0, 1]."""
    return (mnist_test[:300].reshape(300, -1).astype(np.float32) / np.float32(255))


@pytest.fixture(scope="module")
def exported(small_model, mnist_test, records, tmp_path_factory):
    """(model_dir with coder tables, export base, version dir, in-process VAE, tables)."""
    model_dir = tmp_path_factory.mktemp("model_with_tables")
    shutil.copytree(small_model.model_dir, model_dir, dirs_exist_ok=True)
    from vaestream.coding.codec import write_tables

    write_tables(model_dir, mnist_test[2000:4000])  # the coder's own calibration path
    model = store.load_model(model_dir)
    tables = tables_mod.CoderTables.load(model_dir / "coder_tables.npz")
    base = tmp_path_factory.mktemp("exports")
    path = export(model_dir, base, quality=QUALITY)
    return model_dir, base, path, model, tables


def test_layout_assets_and_signatures(exported):
    model_dir, base, path, model, tables = exported
    assert path == base / "1" and list_versions(base) == [1]
    assert (path / "saved_model.pb").is_file() and (path / "variables" / "variables.index").is_file()
    assets = path / "assets"
    assert json.loads((assets / "config.json").read_text()) == json.loads(model.config.to_json())
    fp = (assets / "fingerprint.txt").read_text().strip()
    assert len(fp) == 64 and set(fp) <= set("0123456789abcdef"), fp
    # recomputed here from its definition, on the export's own config asset and the SavedModel's weights
    assert fp == _recomputed_fingerprint((assets / "config.json").read_text(), _saved_weights(path))
    assert fp == model.fingerprint()
    # it follows the weights: the same model with one weight moved by one float32 step is another model
    other = store.load_model(model_dir)
    w = other.weights()[-1]
    v = w.numpy()
    v.flat[0] = np.nextafter(v.flat[0], np.float32(np.inf))
    w.assign(v)
    moved = other.fingerprint()
    assert moved != fp
    assert moved == _recomputed_fingerprint(other.config.to_json(), [t.numpy() for t in other.weights()])
    shipped = tables_mod.CoderTables.load(assets / "coder_tables.npz")
    assert shipped.digest() == tables.digest() and shipped.fingerprint == fp
    info = json.loads((assets / "export.json").read_text())
    assert info["quality"] == QUALITY and info["fingerprint"] == fp
    d = describe(base)
    assert set(d["signatures"]) == {"encode", "decode", "quantize", "reconstruct", "elbo", "serving_default"}
    nz, dim = model.config.latent_dim, model.config.input_dim
    sig = d["signatures"]
    assert sig["encode"] == sig["serving_default"] == {
        "inputs": {"x": ["float32", [None, dim]]},
        "outputs": {"mean": ["float32", [None, nz]], "log_scale": ["float32", [None, nz]]}}
    assert sig["decode"]["inputs"] == {"z": ["float32", [None, nz]]}
    assert sig["decode"]["outputs"] == {"x_mean": ["float32", [None, dim]], "logits": ["float32", [None, dim]]}
    assert sig["quantize"]["outputs"] == {"symbols": ["int32", [None, nz]]}
    assert sig["reconstruct"]["outputs"] == {"x_hat": ["float32", [None, dim]]}
    assert set(sig["elbo"]["outputs"]) == {"elbo", "rate", "distortion"}


FRESH = textwrap.dedent("""
    import sys, numpy as np, tensorflow as tf
    path, inp, out = sys.argv[1:4]
    loaded = tf.saved_model.load(path)          # plain TensorFlow: no vaestream code, no checkpoint
    d = np.load(inp)
    res = {}
    for name, fn in loaded.signatures.items():
        arg = "z" if name == "decode" else "x"
        for k, v in fn(**{arg: tf.constant(d[arg])}).items():
            res[name + "/" + k] = v.numpy()
    np.savez(out, **res)
    print("vaestream" in sys.modules)
""")


def test_fresh_process_matches_in_process_model(exported, records, tmp_path):
    """Every signature, loaded by plain tf.saved_model.load in a new process, against the in-process model."""
    _, _, path, model, tables = exported
    x = records
    z = np.random.default_rng(1).standard_normal((50, model.config.latent_dim)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x, z=z)
    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    r = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "False"  # vaestream was never imported
    got = dict(np.load(tmp_path / "out.npz"))

    # the networks in the exports' fixed row blocks (vaestream.layers.blocked): the fresh process's outputs are
    # then bit-identical, not merely close
    mean, log_scale = (t.numpy() for t in model.encoder_params_exact(tf.constant(x)))
    dec = {k: v.numpy() for k, v in model.decoder_params_exact(tf.constant(z)).items()}
    elbo = {k: v.numpy() for k, v in elbo_fixed_noise(model, tf.constant(x)).items()}
    symbols = tables_mod.quantize(mean, tables, QUALITY)
    z_hat = tables_mod.dequantize(symbols, tables, QUALITY)
    x_hat = model.decoder_params_exact(tf.constant(z_hat))["x_mean"].numpy()

    for sig in ("encode", "serving_default"):
        np.testing.assert_array_equal(got[f"{sig}/mean"], mean)
        np.testing.assert_array_equal(got[f"{sig}/log_scale"], log_scale)
    for k in ("x_mean", "logits"):
        np.testing.assert_array_equal(got[f"decode/{k}"], dec[k])
    for k in ("elbo", "rate", "distortion"):
        np.testing.assert_allclose(got[f"elbo/{k}"], elbo[k], rtol=1e-5, atol=1e-3)
    assert got["quantize/symbols"].dtype == np.int32
    np.testing.assert_array_equal(got["quantize/symbols"], symbols)  # bit-identical codes
    # and bit-identical to the NumPy coder on the SavedModel's own means, whatever the round-off
    np.testing.assert_array_equal(got["quantize/symbols"], tables_mod.quantize(got["encode/mean"], tables, QUALITY))
    np.testing.assert_array_equal(got["reconstruct/x_hat"], x_hat)
    assert np.abs(symbols).max() > 0 and len(np.unique(symbols)) > 3  # real, non-trivial codes


CODEC = textwrap.dedent("""
    import sys, numpy as np
    from vaestream.coding import codec
    path, inp, out = sys.argv[1:4]
    c = codec.load(path)                         # the SavedModel alone: no checkpoint, no model directory
    d = np.load(inp)
    blob = d["blob"].tobytes()
    codes, _ = c.decompress_codes(blob)
    back = c.compress(d["x"], quality=float(d["quality"]))
    np.savez(out, codes=codes, x_hat=c.decompress(blob), blob=np.frombuffer(back, np.uint8))
""")


def test_codec_compress_in_process_decompress_from_savedmodel_alone(exported, records, tmp_path):
    """Compress with the in-process codec, decompress in a fresh process from a copy of the export alone; and
    the reverse (the SavedModel's streams decode in-process to the same codes)."""
    from vaestream.coding import codec

    model_dir, _, path, _, _ = exported
    alone = tmp_path / "shipped" / "1"
    shutil.copytree(path, alone)  # nothing but the export
    local = codec.load(model_dir)
    x = records[:200]
    blob = local.compress(x, quality=QUALITY)
    codes, _ = local.decompress_codes(blob)
    np.savez(tmp_path / "in.npz", blob=np.frombuffer(blob, np.uint8), x=x, quality=QUALITY)
    script = tmp_path / "codec_fresh.py"
    script.write_text(CODEC)
    r = subprocess.run([sys.executable, str(script), str(alone), str(tmp_path / "in.npz"), str(tmp_path / "o.npz")],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(tmp_path / "o.npz")
    np.testing.assert_array_equal(got["codes"], codes)
    np.testing.assert_array_equal(got["x_hat"], local.decompress(blob))  # bit-identical (model.blocked)
    back, _ = local.decompress_codes(got["blob"].tobytes())
    np.testing.assert_array_equal(back, codes)
    # and the served quantize signature gives the very codes the codec entropy-codes
    np.testing.assert_array_equal(ExportedModel(alone).quantize(x), codes)


def test_elbo_signature_is_a_real_bound_independent_of_the_batch(exported, records):
    _, _, path, model, _ = exported
    m = ExportedModel(path)
    out = m.elbo(records[:100])
    assert np.allclose(out["elbo"], -(out["rate"] + out["distortion"]), rtol=1e-5)
    assert np.all(out["rate"] > 0) and -150 < out["elbo"].mean() < -60  # nats per MNIST digit, 3 epochs
    # a record's value does not depend on its batch
    np.testing.assert_array_equal(m.elbo(records[37:38])["elbo"], out["elbo"][37:38])  # alone == in the batch
    # and the fixed-noise estimate agrees with the model's own SGVB estimator B on average
    ref = objective.elbo(model, tf.constant(records[:100]), estimator="B", num_samples=64, seed=3)["elbo"].numpy()
    assert abs(out["elbo"].mean() - ref.mean()) < 3.0


def test_versions(exported, tmp_path):
    model_dir, _, _, _, _ = exported
    base = tmp_path / "base"
    assert export(model_dir, base, verify=False).name == "1"
    assert export(model_dir, base, version=7, verify=False).name == "7"
    assert export(model_dir, base, verify=False).name == "8"
    assert list_versions(base) == [1, 7, 8]
    assert resolve_export(base) == base / "8" and resolve_export(base, 7) == base / "7"
    with pytest.raises(ModelError, match="already exists"):
        export(model_dir, base, version=7)
    with pytest.raises(ModelError, match="no version 3"):
        resolve_export(base, 3)
    assert not [p for p in base.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_a_cached_export_of_changing_weights_keeps_each_versions_own_weights_and_tables(exported, records, tmp_path):
    """ExportCache re-saves one traced module: version 1 (weights A, tables A) and version 2 (weights B, tables
    B at another quality) each load, in this process, with their own encoder, symbols and fingerprint."""
    from vaestream import VAE
    from vaestream.serving.export import ExportCache, export_model

    _, _, _, model, tables_a = exported
    vae = VAE(model.config)
    for v, w in zip(vae.weights(), model.weights()):
        v.assign(w)
    cache = ExportCache()
    p1 = export_model(vae, tmp_path / "base", tables_a, quality=QUALITY, cache=cache)
    traced = cache._module
    want_a = (model.encoder_params(tf.constant(records[:50]))[0].numpy(),
              tables_mod.quantize(model.encoder_params(tf.constant(records[:50]))[0].numpy(), tables_a, QUALITY))
    other = VAE(model.config, seed=7)
    for v, w in zip(vae.weights(), other.weights()):
        v.assign(w)
    tables_b = build_tables(vae, records, tmp_path / "tables_b.npz")
    p2 = export_model(vae, tmp_path / "base", tables_b, quality=1.0, cache=cache)
    assert p2.name == "2" and cache._module is traced  # re-saved, not traced again
    m1, m2 = ExportedModel(p1), ExportedModel(p2)
    assert m1.fingerprint == model.fingerprint() and m2.fingerprint == other.fingerprint() != m1.fingerprint
    np.testing.assert_allclose(m1.encode(records[:50])[0], want_a[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(m1.quantize(records[:50]), want_a[1])
    mean_b = other.encoder_params(tf.constant(records[:50]))[0].numpy()
    np.testing.assert_allclose(m2.encode(records[:50])[0], mean_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(m2.quantize(records[:50]), tables_mod.quantize(mean_b, tables_b, 1.0))
    assert m1.info["quality"] == QUALITY and m2.info["quality"] == 1.0


FRESH_BOTH_LOADERS = textwrap.dedent("""
    import sys, numpy as np, tensorflow as tf
    inp, out, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
    d = np.load(inp)
    res = {}
    for i, path in enumerate(paths):
        loaded = tf.saved_model.load(path)      # TF2's loader: the object graph, restored by node id
        for name, fn in loaded.signatures.items():
            arg = "z" if name == "decode" else "x"
            for k, v in fn(**{arg: tf.constant(d[arg])}).items():
                res[f"{i}/tf2/{name}/{k}"] = v.numpy()
        # TF Serving's way (C++ LoadSavedModel): the MetaGraph, its saver_def's restore op reading variables/
        # by key, then the SignatureDefs' tensors by name
        with tf.compat.v1.Graph().as_default(), tf.compat.v1.Session() as s:
            mg = tf.compat.v1.saved_model.loader.load(s, ["serve"], path)
            for name, sig in mg.signature_def.items():
                if name.startswith("__"):  # __saved_model_init_op
                    continue
                arg = "z" if name == "decode" else "x"
                feed = {sig.inputs[arg].name: d[arg]}
                for k, t in sig.outputs.items():
                    res[f"{i}/v1/{name}/{k}"] = s.run(t.name, feed)
    np.savez(out, **res)
    print("vaestream" in sys.modules)
""")


def test_a_cached_version_reuses_the_saved_graph_and_equals_a_full_export(exported, records, tmp_path):
    """After one full export through an ExportCache, a version of new weights and tables is the first one's
    saved_model.pb plus new variables/ and assets: in a fresh process, loaded by tf.saved_model.load and by the
    graph-mode loader TF Serving uses, every signature gives the same answers as a full export of those weights,
    and its fingerprint and coder tables are those of the weights it holds."""
    from vaestream import VAE
    from vaestream.serving.export import ExportCache, export_model

    _, _, _, model, tables_a = exported
    vae = VAE(model.config)
    for v, w in zip(vae.weights(), model.weights()):
        v.assign(w)
    cache = ExportCache()
    p1 = export_model(vae, tmp_path / "base", tables_a, quality=QUALITY, cache=cache)
    other = VAE(model.config, seed=11)
    for v, w in zip(vae.weights(), other.weights()):
        v.assign(w)
    tables_b = build_tables(vae, records, tmp_path / "tables_b.npz")
    p2 = export_model(vae, tmp_path / "base", tables_b, quality=1.0, cache=cache)
    assert p2.name == "2" and (p2 / "saved_model.pb").read_bytes() == (p1 / "saved_model.pb").read_bytes()
    full = export_model(other, tmp_path / "full", tables_b, quality=1.0)  # tf.saved_model.save, no cache
    assert (full / "saved_model.pb").read_bytes() != (p2 / "saved_model.pb").read_bytes()  # traced anew
    assert tf.train.list_variables(str(p2 / "variables" / "variables")) == \
        tf.train.list_variables(str(full / "variables" / "variables"))
    fp1, fp2 = (tf.saved_model.experimental.read_fingerprint(str(p)) for p in (p1, p2))
    assert fp2.saved_model_checksum == fp1.saved_model_checksum and fp2.checkpoint_hash != fp1.checkpoint_hash

    z = np.random.default_rng(2).standard_normal((40, model.config.latent_dim)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=records[:100], z=z)
    (tmp_path / "fresh.py").write_text(FRESH_BOTH_LOADERS)
    r = subprocess.run([sys.executable, str(tmp_path / "fresh.py"), str(tmp_path / "in.npz"), str(tmp_path / "out.npz"),
                        str(p2), str(full), str(p1)], capture_output=True, text=True, env=ENV, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "False"
    got = dict(np.load(tmp_path / "out.npz"))
    names = sorted(k[2:] for k in got if k.startswith("1/"))
    assert len(names) == 2 * 11  # each loader: encode, serving_default, decode 2 outputs, elbo 3, quantize, reconstruct
    for k in names:
        np.testing.assert_array_equal(got["0/" + k], got["1/" + k], err_msg=k)  # the cached version = full export
    assert not np.array_equal(got["0/tf2/encode/mean"], got["2/tf2/encode/mean"])  # not version 1's weights
    mean_b = other.encoder_params_exact(tf.constant(records[:100]))[0].numpy()
    np.testing.assert_array_equal(got["0/tf2/encode/mean"], mean_b)
    np.testing.assert_array_equal(got["0/v1/quantize/symbols"], tables_mod.quantize(mean_b, tables_b, 1.0))

    m2 = ExportedModel(p2)
    assert m2.fingerprint == other.fingerprint() == _recomputed_fingerprint(
        (p2 / "assets" / "config.json").read_text(), _saved_weights(p2))
    shipped = tables_mod.CoderTables.load(p2 / "assets" / "coder_tables.npz")
    assert shipped.digest() == tables_b.digest() and shipped.fingerprint == m2.fingerprint
    assert m2.info["fingerprint"] == m2.fingerprint and m2.info["quality"] == 1.0


def test_without_tables_reconstructs_from_the_mean(exported, records, tmp_path):
    model_dir, _, _, model, _ = exported
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    (plain / "coder_tables.npz").unlink()
    m = ExportedModel(export(plain, tmp_path / "exp"))
    assert "quantize" not in m.signatures and m.tables_path is None and m.info["quality"] is None
    mean, _ = model.encoder_params(tf.constant(records[:20]))
    want = model.decoder_params(mean)["x_mean"].numpy()
    np.testing.assert_allclose(m.reconstruct(records[:20]), want, rtol=1e-5, atol=1e-6)


def test_tables_of_another_model_are_refused(exported, small_model, tmp_path, records):
    model_dir, _, _, _, _ = exported
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    from vaestream import VAE

    build_tables(VAE(store.read_config(other), seed=5), records, other / "coder_tables.npz")
    with pytest.raises(ModelError, match="rebuild the coder tables"):
        export(other, tmp_path / "exp")
    assert not (tmp_path / "exp" / "1").exists()


def test_bad_inputs_and_paths(exported, tmp_path):
    _, base, path, _, _ = exported
    m = ExportedModel(base)
    with pytest.raises(DataError, match="shape"):
        m.encode(np.zeros((2, 783), np.float32))
    with pytest.raises(ModelError, match="no signature"):
        m.run("classify", x=np.zeros((1, 784)))
    with pytest.raises(ModelError, match="no SavedModel"):
        ExportedModel(tmp_path)
    with pytest.raises(ModelError, match="not a vaestream model directory"):
        export(tmp_path, tmp_path / "exp")


def test_saved_model_cli_lists_every_signature(exported):
    cli = shutil.which("saved_model_cli")
    if cli is None:
        pytest.skip("saved_model_cli (ships with tensorflow) is not on PATH")
    _, _, path, _, _ = exported
    r = subprocess.run([cli, "show", "--dir", str(path), "--all"], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for sig in ("encode", "decode", "quantize", "reconstruct", "elbo", "serving_default"):
        assert f"signature_def['{sig}']" in r.stdout
    assert "outputs['symbols'] tensor_info:\n        dtype: DT_INT32" in r.stdout


def test_cli_export(exported, tmp_path, capsys):
    from vaestream.cli import main

    model_dir, _, _, _, _ = exported
    assert main(["export", "--model", str(model_dir), "--out", str(tmp_path / "e"), "--version", "3",
                 "--quality", "1", "--no-verify"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == 3 and out["has_coder_tables"] and "quantize" in out["signatures"]
    assert out["unchanged"] is False and out["quality"] == 1.0
    # version 3 exists with the same export (quality 1.0 is the default): nothing new, exit 0
    assert main(["export", "--model", str(model_dir), "--out", str(tmp_path / "e"), "--version", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["unchanged"] is True
    # ... with another quality: an error, version 3 untouched
    assert main(["export", "--model", str(model_dir), "--out", str(tmp_path / "e"), "--version", "3",
                 "--quality", str(QUALITY)]) == 1
    err = capsys.readouterr().err
    assert "already exists with other contents" in err and err.count("\n") == 1
    assert ExportedModel(tmp_path / "e", 3).info["quality"] == 1.0


def _export_cli(model_dir: Path, out: Path, *flags: str) -> dict:
    """``vaestream export`` (the CLI's main, in this process); its JSON summary."""
    import contextlib
    import io

    from vaestream.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["export", "--model", str(model_dir), "--out", str(out), "--no-verify", *flags]) == 0
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def test_cli_export_of_unchanged_weights_adds_no_version(exported, records, tmp_path):
    """``vaestream export`` twice on the same model directory writes one version (the second says
    "unchanged": true); other tables, another quality, or --force write new versions."""
    model_dir, _, _, model, _ = exported
    mine = tmp_path / "model"
    shutil.copytree(model_dir, mine)
    out = tmp_path / "exports"
    first = _export_cli(mine, out)
    assert (first["version"], first["unchanged"]) == (1, False)
    again = _export_cli(mine, out)
    assert (again["version"], again["unchanged"], again["path"]) == (1, True, first["path"])
    assert list_versions(out) == [1] and not [p for p in out.iterdir() if p.name.startswith(".")]
    # another quality of the same tables: a new version, then unchanged again
    assert _export_cli(mine, out, "--quality", str(QUALITY))["version"] == 2
    assert _export_cli(mine, out, "--quality", str(QUALITY))["unchanged"] is True
    # new coder tables (same weights): a new version
    build_tables(model, records[:100], mine / "coder_tables.npz")
    assert _export_cli(mine, out, "--quality", str(QUALITY))["version"] == 3
    assert _export_cli(mine, out, "--force", "--quality", str(QUALITY)) | {"path": None} == \
        {**first, "version": 4, "unchanged": False, "quality": QUALITY, "path": None}
    assert list_versions(out) == [1, 2, 3, 4]
    # the library: skip_unchanged is opt-in (test_versions: without it, a version per call)
    assert export(mine, out, quality=QUALITY, verify=False, skip_unchanged=True).name == "4"


@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian_sigmoid", "beta_binomial"])
def test_other_decoders_export_their_parameters(likelihood, records, tmp_path):
    """Every decoder exports its own parameters, and elbo/decode agree with the in-process model."""
    from vaestream import VAE, ModelConfig

    cfg = ModelConfig(latent_dim=3, hidden=(16,), likelihood=likelihood)
    model = VAE(cfg, seed=2)
    store.save_config(tmp_path / "m", cfg)
    tf.train.Checkpoint(model=model).save(str(tmp_path / "m" / "ckpt" / "ckpt"))
    m = ExportedModel(export(tmp_path / "m", tmp_path / "exp"))
    z = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    got, want = m.decode(z), {k: v.numpy() for k, v in model.decoder_params(tf.constant(z)).items()}
    assert set(got) == set(want) and "x_mean" in got
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    x = records[:6]
    e = m.elbo(x)
    for k, v in elbo_fixed_noise(model, tf.constant(x)).items():
        np.testing.assert_allclose(e[k], v.numpy(), rtol=1e-5, atol=1e-3)
    assert np.all(np.isfinite(e["elbo"]))
