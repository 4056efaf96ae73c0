"""Pixel context models for near-lossless bits-back coding (vaestream.coding.bitsback.context), on a beta-binomial
model and context models trained on real MNIST."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from vaestream.coder_training import context as context_training
from vaestream.coding import family, open_stream
from vaestream.coding.bitsback import context as context_mod
from vaestream.coding.bitsback.tables import level_rows, pixel_levels
from vaestream.coding.bitsback.coder import CONTEXT_FLAG, LosslessCoder
from vaestream.errors import BitstreamError, ConfigError, ModelError, ModelMismatchError

K = 4


def test_a_context_model_codes_level_images_in_fewer_bits_and_round_trips_exactly(ctx_member, mnist_test):
    model, d, cm = ctx_member
    x = mnist_test[300:600]
    contexts = context_mod.load_contexts(d)
    assert list(contexts) == [K] and contexts[K].digest() == cm.digest()
    plain = LosslessCoder(model, levels=K)
    with_ctx = LosslessCoder(model, levels=K, contexts=contexts)
    assert with_ctx.context is not None and plain.context is None
    b_plain, b_ctx = plain.compress(x), with_ctx.compress(x)
    assert len(b_ctx) < 0.97 * len(b_plain)  # held-out records, real bytes
    back = LosslessCoder(model, contexts=contexts).decompress(b_ctx)
    assert np.array_equal(back, plain.quantize(x)) and back.dtype == np.uint8
    # mean reconstruction: what the encoder computed is what the decoder returns
    blob, want = LosslessCoder(model, levels=K, contexts=contexts, reconstruction="mean").compress_and_reconstruct(x)
    assert np.array_equal(LosslessCoder(model, contexts=contexts).decompress(blob).reshape(len(x), -1), want)


def test_the_coder_computes_the_code_length_the_trained_network_measured(ctx_member, mnist_test):
    """The coder's exact integer network and the float32 TensorFlow network it was trained as give the same
    code length on the held-out images (at the posterior mean's z): the two agree on the feature layout."""
    model, _, cm = ctx_member
    c = LosslessCoder(model, levels=K)
    lv = pixel_levels(K)[1][mnist_test[:300].reshape(300, -1).astype(np.int64)].astype(np.int32)
    mean, _ = c._posterior(lv)
    base = level_rows(c._likelihood(np.rint(mean).astype(np.int64)), K)
    rows = cm.rows_all(base, lv.reshape(-1)).reshape(-1, K)
    exact = -np.sum(np.log2(rows[np.arange(len(rows)), lv.reshape(-1)])) / len(lv)
    assert exact == pytest.approx(cm.meta["held_out_bits"], rel=2e-3)
    assert exact < cm.meta["base_bits"]
    # ... and the layout is the one features() documents: the first layer over features() = the coder's sum
    lv_pad, e_pad, logp = cm._pads(base[:784 * 2], 2, lv[:2].reshape(-1))
    rr, cc = np.divmod(np.arange(784), 28)
    f = cm.features(lv_pad, e_pad, logp, rr, cc)
    y = f * 2.0 ** -context_mod.FEATURE_BITS @ cm.layers[0][0].astype(np.float64)
    wc, _, s, _, _, _ = cm._net()
    dense = cm._dense_part(e_pad, logp).reshape(-1, wc.shape[1])
    dy, dx = cm._causal_at
    nb = lv_pad[:, rr[:, None] + dy[None, :], cc[:, None] + dx[None, :]]
    h1 = dense + wc[cm._causal_index(nb)].sum(axis=2).reshape(dense.shape)
    np.testing.assert_allclose(np.ldexp(h1, -(context_mod.FEATURE_BITS + s)), y, atol=1e-4)


def test_a_pixels_rows_do_not_depend_on_the_batch_the_group_or_the_threads(ctx_member, mnist_test, tmp_path):
    model, d, cm = ctx_member
    x = mnist_test[:40]
    c = LosslessCoder(model, levels=K)
    lv = pixel_levels(K)[1][x.reshape(40, -1).astype(np.int64)].astype(np.int32)
    mean, _ = c._posterior(lv)
    base = level_rows(c._likelihood(np.rint(mean).astype(np.int64)), K)
    all_rows = cm.rows_all(base, lv.reshape(-1))
    assert np.array_equal(cm.rows_all(base[:784 * 3], lv[:3].reshape(-1), chunk=1), all_rows[:3])
    # the decoder, position by position, rebuilds exactly the encoder's rows
    seen = []

    def pop(rows):
        seen.append(rows)
        return lv[:, len(seen) - 1]

    assert np.array_equal(cm.decode_group(base, 40, pop), lv.reshape(-1))
    assert np.array_equal(np.stack(seen, axis=1), all_rows)
    # any group size decodes; another process with other BLAS threads decodes the same records
    contexts = context_mod.load_contexts(d)
    for group in (1, 7):
        blob = LosslessCoder(model, levels=K, group=group, contexts=contexts).compress(x)
        assert np.array_equal(LosslessCoder(model, contexts=contexts).decompress(blob), c.quantize(x))
    (tmp_path / "x.vaez").write_bytes(LosslessCoder(model, levels=K, contexts=contexts).compress(x))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-m", "vaestream.cli", "decompress", str(tmp_path / "x.vaez"),
                           str(tmp_path / "y.npy"), "--model", str(d)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "y.npy"), c.quantize(x))


def test_a_stream_names_its_context_model_and_other_coders_refuse_it(ctx_member, mnist_train, mnist_test, tmp_path):
    model, d, cm = ctx_member
    x = mnist_test[:30]
    contexts = context_mod.load_contexts(d)
    blob = LosslessCoder(model, levels=K, contexts=contexts).compress(x)
    with pytest.raises(ModelMismatchError, match="context"):
        LosslessCoder(model).decompress(blob)  # the model alone: the stream needs its context model
    other = context_training.train_context(model, mnist_train[:300], K, window=5, hidden=(8,), epochs=1, seed=5)
    with pytest.raises(ModelMismatchError):
        LosslessCoder(model, contexts={K: other}).decompress(blob)
    # a plain stream of the same model still decodes with a coder that holds context models
    plain = LosslessCoder(model, levels=K, contexts=contexts, use_context=False)
    assert plain.context is None
    assert np.array_equal(LosslessCoder(model, contexts=contexts).decompress(plain.compress(x)), plain.quantize(x))
    # a frame whose context flag was flipped (in a well-formed container) is refused, never decoded with the
    # other likelihood; so is a context flag in a plain stream
    from vaestream.coding import container

    recon_at = 11  # "<4sBBHBBBB...": tag, format, latent bits, group, layout, range bits, levels, then this byte
    for stream in (blob, plain.compress(x)):
        r = container.ContainerReader(stream)
        n, payload = r.read_frame(0)
        bad = bytearray(payload)
        bad[recon_at] ^= CONTEXT_FLAG
        with pytest.raises(BitstreamError, match="context"):
            LosslessCoder(model, contexts=contexts).decompress(container.pack(r.header, [(n, bytes(bad))]))
    # a context model for another model, or for another K, is refused up front
    foreign = context_mod.ContextModel(K, (28, 28), 5, other.layers, {"model_fingerprint": "00" * 32})
    with pytest.raises(ModelMismatchError):
        LosslessCoder(model, levels=K, contexts={K: foreign})
    with pytest.raises(ConfigError):
        LosslessCoder(model, levels=K, contexts={K + 1: cm})
    with pytest.raises(ConfigError):
        context_training.train_context(model, mnist_train[:10].astype(np.float32), K)


def test_train_context_on_the_command_line_then_compress_uses_it_and_a_family_decodes_it(bb_model, mnist_dir,
                                                                                         mnist_test, tmp_path, capsys):
    from vaestream.cli import main

    _, src = bb_model
    d = tmp_path / "family" / "bitsback"
    shutil.copytree(src, d)
    assert main(["train-context", "--model", str(d), "--data", str(mnist_dir), "--n", "1000", "--levels", "3",
                 "--epochs", "1", "--window", "3", "--hidden", "16", "--held-out", "100", "--recon-epochs", "1",
                 "--recon-window", "3", "--recon-hidden", "8"]) == 0
    lines = [json.loads(v) for v in capsys.readouterr().out.strip().splitlines()]
    assert lines[0]["epoch"] == 1 and lines[0]["held_out_bits"] < lines[0]["base_bits"]
    assert lines[1]["recon"]["epoch"] == 1 and "held_out_psnr_db" in lines[1]["recon"]
    assert lines[-1]["levels"] == 3 and lines[-1]["trained_on"] == 1000 and (d / "context" / "levels-3.npz").is_file()
    assert lines[-1]["reconstruction"]["trained_on"] == 1000
    x = mnist_test[:100]
    np.save(tmp_path / "x.npy", x)
    info = {}
    for name, extra in (("x.vaez", []), ("p.vaez", ["--no-context"]), ("l.vaez", ["--reconstruction", "learned"])):
        assert main(["compress", str(tmp_path / "x.npy"), str(tmp_path / name), "--model", str(d), "--levels", "3"]
                    + extra) == 0
        info[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["x.vaez"]["context"] is True and info["p.vaez"]["context"] is False
    assert info["x.vaez"]["bytes"] < info["p.vaez"]["bytes"]
    assert info["l.vaez"]["bytes"] == info["x.vaez"]["bytes"] and info["l.vaez"]["reconstruction"] == "learned"
    learned = open_stream(tmp_path / "l.vaez", tmp_path / "family")
    out = learned.decompress((tmp_path / "l.vaez").read_bytes()).reshape(100, -1)
    cell = pixel_levels(3)[1]  # the learned reconstruction: among each pixel's level's counts
    assert np.array_equal(cell[out.astype(np.int64)], cell[x.reshape(100, -1).astype(np.int64)])
    # a new reconstruction network for the same context model: earlier streams that do not use it still decode
    before = context_mod.ContextModel.load(d / "context" / "levels-3.npz")
    assert main(["train-context", "--model", str(d), "--data", str(mnist_dir), "--n", "500", "--levels", "3",
                 "--recon-only", "--recon-epochs", "1", "--recon-window", "3", "--recon-hidden", "4",
                 "--seed", "9"]) == 0
    after = context_mod.ContextModel.load(d / "context" / "levels-3.npz")
    assert after.likelihood_digest() == before.likelihood_digest() and after.digest() != before.digest()
    capsys.readouterr()
    want = LosslessCoder(bb_model[0], levels=3).quantize(x)
    for name in ("x.vaez", "p.vaez"):  # the family finds the member, and its context model when one was used
        blob = (tmp_path / name).read_bytes()
        assert np.array_equal(open_stream(blob, tmp_path / "family").decompress(blob), want)
    points = family.near_lossless_points(d, x, ladder=[(3, "level"), (4, "level")])
    assert [p.context for p in points] == [True, False]


def test_the_beam_jobs_code_with_the_directorys_context_model_and_only_it_decodes_them(ctx_member, bb_model,
                                                                                       mnist_test, tmp_path):
    """``encode --coder lossless --levels 4`` on a model directory with a context model for K = 4 codes with
    it; the decode job of that directory returns every level image; the same model without the context model
    is refused before the job starts."""
    from vaestream.beam.jobs import decode, encode

    model, d, _ = ctx_member
    x = mnist_test[1000:1120]
    np.save(tmp_path / "counts.npy", x)
    out = tmp_path / "codes"
    s = encode.run(["--input", str(tmp_path / "counts.npy"), "--model", str(d), "--output", str(out),
                    "--coder", "lossless", "--levels", str(K), "--chunk_size", "60"])
    assert s["records"] == 120 and s["dead_lettered"] == 0
    import pyarrow.parquet as pq

    r = decode.run(["--input", str(out), "--model", str(d), "--output", str(tmp_path / "rec"), "--output_dtype",
                    "uint8", "--output_format", "parquet"])
    assert r["records"] == 120 and r["dead_lettered"] == 0
    back = {}
    for f in (tmp_path / "rec").glob("recon-*.parquet"):
        t = pq.read_table(f).to_pydict()
        back.update(zip(t["key"], t["data"]))
    want = LosslessCoder(model, levels=K).quantize(x)
    assert sorted(back) == [f"counts.npy:{i:09d}" for i in range(120)]
    for i in range(120):
        assert np.array_equal(np.asarray(back[f"counts.npy:{i:09d}"]).reshape(x[i].shape), want[i])
    with pytest.raises(ModelMismatchError, match="pixel context model"):
        decode.run(["--input", str(out), "--model", str(bb_model[1]), "--output", str(tmp_path / "rec2"),
                    "--output_dtype", "uint8", "--output_format", "parquet"])
    assert not (tmp_path / "rec2").exists() or not list((tmp_path / "rec2").glob("recon-*"))


# ------------------------------------------------------------------------------------------------------------
# learned reconstruction
# ------------------------------------------------------------------------------------------------------------
def test_a_learned_reconstruction_gains_psnr_at_the_same_bits_and_the_decoder_returns_it(recon_member, mnist_test):
    model, d, rc = recon_member
    x = mnist_test[300:600].reshape(300, -1)
    contexts = context_mod.load_contexts(d)
    assert contexts[K].has_reconstruction and contexts[K].digest() == rc.digest()
    assert rc.meta["reconstruction"]["held_out_psnr_db"] > rc.meta["reconstruction"]["mean_psnr_db"]
    mean = LosslessCoder(model, levels=K, contexts=contexts, reconstruction="mean")
    learned = LosslessCoder(model, levels=K, contexts=contexts, reconstruction="learned")
    b_mean, r_mean = mean.compress_and_reconstruct(x)
    b_learned, r_learned = learned.compress_and_reconstruct(x)
    assert len(b_learned) == len(b_mean)  # the same level images, the same chain: the same bits

    def psnr(r):
        return 10 * np.log10(255.0 ** 2 / np.mean((r.astype(np.float64) - x) ** 2))
    assert psnr(r_learned) > psnr(r_mean) + 0.05
    # every pixel stays among its level's counts
    cell = pixel_levels(K)[1]
    assert np.array_equal(cell[r_learned.astype(np.int64)], cell[x.astype(np.int64)])
    assert np.max(np.abs(r_learned.astype(np.int64) - x)) <= learned.max_error
    # what the encoder computed is what decoders return, whatever their frames and groups
    for frame_records in (300, 64):
        back = LosslessCoder(model, contexts=contexts, frame_records=frame_records).decompress(b_learned)
        assert np.array_equal(back.reshape(300, -1), r_learned)
    blob7 = LosslessCoder(model, levels=K, group=7, frame_records=50, contexts=contexts,
                          reconstruction="learned").compress(x)
    assert np.array_equal(LosslessCoder(model, contexts=contexts).decompress(blob7).shape, (300, 784))


def test_the_reconstruction_network_is_exact_and_is_the_trained_one(recon_member, mnist_test):
    """A pixel's output depends on its window alone (not on the batch or the chunk), and the exact network
    computes the trained float network's output (the feature layout of recon_features)."""
    _, _, rc = recon_member
    rng = np.random.default_rng(3)
    lv = pixel_levels(K)[1][mnist_test[:12].reshape(-1).astype(np.int64)]
    means = rng.integers(0, 256, lv.shape).astype(np.uint8)
    whole = rc.reconstruct(lv, means)
    assert np.array_equal(np.concatenate([rc.reconstruct(lv[i * 784:(i + 1) * 784], means[i * 784:(i + 1) * 784],
                                                         chunk=1) for i in range(12)]), whole)
    # float64 reference: features laid out as recon_features documents, the float layers, clip and round
    w = rc.recon_window
    offs = context_mod.window_offsets(w)
    img, m = lv[:784].reshape(28, 28), means[:784].reshape(28, 28).astype(np.float64)
    feats = np.zeros((784, context_mod.recon_features(w, K)))
    for p in range(784):
        i, j = divmod(p, 28)
        for o, (dy, dx) in enumerate(offs):
            if 0 <= i + dy < 28 and 0 <= j + dx < 28:
                feats[p, o * K + img[i + dy, j + dx]] = 1.0
                feats[p, len(offs) * K + o] = m[i + dy, j + dx] / 256.0
    h = feats
    for n, (wt, b) in enumerate(rc.recon):
        h = h @ wt.astype(np.float64) + b
        if n < len(rc.recon) - 1:
            h = np.where(h > 0, h, np.expm1(np.minimum(h, 0.0)))
    cell = pixel_levels(K)[1]
    lo = np.array([np.flatnonzero(cell == k)[0] for k in range(K)])
    hi = np.array([np.flatnonzero(cell == k)[-1] for k in range(K)])
    ref = np.clip(m.reshape(-1) + context_mod.RECON_SCALE * h[:, 0], lo[img.reshape(-1)], hi[img.reshape(-1)])
    assert np.max(np.abs(whole[:784] - ref)) <= 0.5 + 1e-3  # the same value up to the final rounding


def test_a_learned_reconstruction_needs_its_network_and_streams_name_it(recon_member, ctx_member, mnist_test):
    model, d, rc = recon_member
    _, _, cm = ctx_member
    x = mnist_test[:20]
    with pytest.raises(ConfigError, match="reconstruction network"):
        LosslessCoder(model, levels=K, contexts={K: cm}, reconstruction="learned")
    with pytest.raises(ConfigError, match="reconstruction network"):
        LosslessCoder(model, levels=K, contexts={K: rc}, reconstruction="learned", use_context=False)
    assert rc.digest() != cm.digest()  # ... though the likelihood's layers are the same
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(rc.layers, cm.layers))
    blob = LosslessCoder(model, levels=K, contexts={K: rc}, reconstruction="learned").compress(x)
    with pytest.raises(ModelMismatchError):  # the same likelihood without the network: another stream identity
        LosslessCoder(model, contexts={K: cm}).decompress(blob)
    # ... while a stream that does not use the network names the likelihood alone: either file decodes it
    plain = LosslessCoder(model, levels=K, contexts={K: rc}, reconstruction="mean").compress_and_reconstruct(x)
    for holder in (cm, rc):
        back = LosslessCoder(model, contexts={K: holder}).decompress(plain[0])
        assert np.array_equal(back.reshape(len(x), -1), plain[1])
    # a frame that asks for the learned reconstruction in a stream whose context model has none is refused
    from vaestream.coding import container

    r = container.ContainerReader(LosslessCoder(model, levels=K, contexts={K: cm},
                                                reconstruction="mean").compress(x))
    n, payload = r.read_frame(0)
    bad = bytearray(payload)
    bad[11] = 2 | CONTEXT_FLAG
    for holder in (cm, rc):  # rc has a network, but the header names the likelihood alone
        with pytest.raises(BitstreamError, match="learned reconstruction"):
            LosslessCoder(model, contexts={K: holder}).decompress(container.pack(r.header, [(n, bytes(bad))]))
    # the file round-trips, network included; a damaged one is refused
    back = context_mod.ContextModel.load(context_mod.context_path(d, K))
    assert back.digest() == rc.digest() and back.recon_window == rc.recon_window
    with pytest.raises(ModelError):
        context_mod.ContextModel(K, (28, 28), 5, cm.layers, {}, rc.recon, recon_window=3)


def test_a_context_chain_ramps_its_groups_within_what_the_latents_prior_code_leaves(ctx_member, mnist_test,
                                                                                     monkeypatch):
    """Each group pops its latents from the bits the previous group's latents wrote with the prior; a context
    model's first positions, near-certain, give no usable bits beyond them (bitsback_coder.chain_ramp). So a context
    frame grows its groups by at most 1 + 3/4 KL / H, says by how much in its header, and decodes by it; streams
    written with the doubling ramp (before it) still decode."""
    from vaestream.coding import container
    from vaestream.coding.bitsback import coder as bitsback_coder
    from vaestream.coding.bitsback.tables import latent_step_bits

    model, d, cm = ctx_member
    x = mnist_test[:700]
    contexts = context_mod.load_contexts(d)
    c = LosslessCoder(model, levels=K, contexts=contexts)
    blob = c.compress(x)
    mean, std = c._posterior(pixel_levels(K)[1][x.reshape(len(x), -1).astype(np.int64)])
    ramp = bitsback_coder.chain_ramp(mean, std, c.latent_bits, c.range_bits)
    n, payload = container.ContainerReader(blob).read_frame(0)
    assert (payload[11] >> bitsback_coder.RAMP_SHIFT) & 7 == ramp > 0 and payload[11] & CONTEXT_FLAG
    delta = 2.0 ** -latent_step_bits(c.latent_bits, c.range_bits)
    mu, sigma = mean * delta, std * delta
    kl = np.sum(0.5 * (mu ** 2 + sigma ** 2 - 1) - np.log(sigma)) / np.log(2)
    h = np.sum(np.maximum(np.log2(std * np.sqrt(2 * np.pi * np.e)), 0))
    sizes = bitsback_coder.group_sizes(n, c.group, ramp)
    assert sum(sizes) == n and len(sizes) > len(bitsback_coder.group_sizes(n, c.group))
    growth = [b / a for a, b in zip(sizes, sizes[1:-1]) if a >= 2 ** ramp]  # past the +1 steps
    assert growth and max(growth) <= 1 + 0.75 * kl / h
    assert np.array_equal(LosslessCoder(model, contexts=contexts).decompress(blob), c.quantize(x))
    # a stream written with the doubling ramp (ramp 0) decodes as before
    monkeypatch.setattr(bitsback_coder, "chain_ramp", lambda *a, **k: 0)
    old = LosslessCoder(model, levels=K, contexts=contexts).compress(x)
    monkeypatch.undo()
    assert old != blob
    assert np.array_equal(LosslessCoder(model, contexts=contexts).decompress(old), c.quantize(x))
    # the ramp is a context frame's: set in a plain frame, the header is refused
    plain = LosslessCoder(model, levels=K, contexts=contexts, use_context=False).compress(x[:20])
    r = container.ContainerReader(plain)
    n, payload = r.read_frame(0)
    bad = bytearray(payload)
    bad[11] |= 2 << bitsback_coder.RAMP_SHIFT
    with pytest.raises(BitstreamError, match="ramp"):
        LosslessCoder(model, contexts=contexts).decompress(container.pack(r.header, [(n, bytes(bad))]))
