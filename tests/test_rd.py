"""Rate-distortion training (objective "rd"), a family of models across lambda, and the operating point
that ``vaestream compress --family --psnr`` picks from it, on real MNIST."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from vaestream import ModelConfig, TrainConfig, train
from vaestream.cli import main
from vaestream.coding import codec, family, open_stream
from vaestream.data import make_dataset
from vaestream.errors import ConfigError
from vaestream.model import VAE
from vaestream.objective import rd_loss
from vaestream.store import read_config

LAMBDAS = (100.0, 1000.0, 10000.0)


@pytest.fixture(scope="module")
def rd_family(tmp_path_factory, mnist_train):
    """Three 784-200-16 Gaussian-mean MLPs trained 300 steps each for rate + lambda MSE, with coder tables."""
    root = tmp_path_factory.mktemp("family")
    ds = make_dataset(mnist_train[:30000], "gaussian_sigmoid", "mnist-train")
    for lm in LAMBDAS:
        d = root / f"lmbda-{lm:g}"
        cfg = ModelConfig(latent_dim=16, hidden=(200,), likelihood="gaussian_sigmoid", lmbda=lm)
        train(ds, d, cfg, TrainConfig(steps=300, objective="rd", seed=5), progress=False)
        codec.write_tables(d, mnist_train[30000:33000])
    return root


def _x(records):
    return records.reshape(len(records), -1).astype(np.float32) / np.float32(255)


def test_the_rd_loss_is_rate_in_bits_plus_lambda_mse_and_a_fixed_variance_negative_elbo(mnist_test):
    """The docstring's scaling: ln 2 (R + lambda D) = KL + D_x D / (2 s^2), s^2 = D_x / (2 lambda ln 2)."""
    cfg = ModelConfig(latent_dim=8, hidden=(64,), likelihood="gaussian_sigmoid", lmbda=250.0)
    model = VAE(cfg, seed=2)
    x = tf.constant(_x(mnist_test[:50]))
    t = rd_loss(model, x, cfg.lmbda, seed=7)
    mean, log_scale = model.encoder_params(x)
    kl = tf.reduce_sum(tf.compat.v1.distributions.kl_divergence(
        tf.compat.v1.distributions.Normal(mean, tf.exp(log_scale)),
        tf.compat.v1.distributions.Normal(0.0, 1.0)), axis=-1).numpy()
    np.testing.assert_allclose(t["rate"].numpy(), kl / math.log(2), rtol=1e-5)
    eps = tf.random.stateless_normal(tf.shape(mean), tf.constant([7, 0], tf.int32))
    m = model.decoder_params(mean + tf.exp(log_scale) * eps)["x_mean"].numpy()
    mse = np.mean((x.numpy() - m) ** 2, axis=1)
    np.testing.assert_allclose(t["distortion"].numpy(), mse, rtol=1e-5)
    d = cfg.input_dim
    s2 = d / (2 * cfg.lmbda * math.log(2))
    neg_elbo_no_const = kl + np.sum((x.numpy() - m) ** 2, axis=1) / (2 * s2)
    np.testing.assert_allclose(math.log(2) * t["loss"].numpy(), neg_elbo_no_const, rtol=1e-5)


def test_rd_needs_a_gaussian_decoder_and_lambda(tmp_path, mnist_train):
    ds = make_dataset(mnist_train[:500], "bernoulli", "mnist")
    with pytest.raises(ConfigError, match="Gaussian decoder"):
        train(ds, tmp_path / "a", ModelConfig(latent_dim=4, hidden=(16,), lmbda=10.0),
              TrainConfig(steps=1, objective="rd"), progress=False)
    ds = make_dataset(mnist_train[:500], "gaussian_sigmoid", "mnist")
    with pytest.raises(ConfigError, match="lmbda"):
        train(ds, tmp_path / "b", ModelConfig(latent_dim=4, hidden=(16,), likelihood="gaussian_sigmoid"),
              TrainConfig(steps=1, objective="rd"), progress=False)
    with pytest.raises(ConfigError, match="objective"):
        TrainConfig(objective="mse")
    with pytest.raises(ConfigError, match="lmbda"):
        ModelConfig(lmbda=-1.0)


def test_lambda_is_stored_in_config_json_and_old_configs_keep_their_json(rd_family):
    for lm in LAMBDAS:
        stored = json.loads((rd_family / f"lmbda-{lm:g}" / "config.json").read_text())
        assert stored["lmbda"] == lm and read_config(rd_family / f"lmbda-{lm:g}").lmbda == lm
    # a model stored before arch/channels/lmbda existed hashes the same JSON (so its fingerprint is unchanged)
    assert "lmbda" not in ModelConfig().to_json() and "arch" not in ModelConfig().to_json()


def test_bits_fall_and_mse_rises_as_lambda_falls(rd_family, mnist_test):
    x = mnist_test[:1000]
    rows = []
    for lm in LAMBDAS:
        c = codec.load(rd_family / f"lmbda-{lm:g}")
        xs, _ = c.model_inputs(x)
        blob = c.compress(x, quality=4.0)  # the bin of ~sqrt(2 pi e) posterior stds, where bits ~ KL
        mse = float(np.mean((xs - c.decompress(blob)) ** 2))
        rows.append((lm, 8 * len(blob) / len(x), float(np.mean(c.kl_bits(x))), mse))
    bits, kl, mse = (np.array([r[i] for r in rows]) for i in (1, 2, 3))
    assert np.all(np.diff(bits) > 0), rows  # lambda rises along the rows: more bits ...
    assert np.all(np.diff(kl) > 0), rows
    assert np.all(np.diff(mse) < 0), rows  # ... and less distortion
    assert bits[-1] > 2 * bits[0], rows


def test_psnr_picks_the_cheapest_point_that_meets_the_target_on_a_held_back_batch(rd_family, mnist_test):
    held = mnist_test[1000:1500]
    points = family.measure(rd_family, held)
    psnrs = sorted(p.psnr_db for p in points)
    target = float(np.round(np.median(psnrs), 2))
    pick = family.choose(rd_family, held, psnr=target)
    assert pick.psnr_db >= target and pick.lmbda in LAMBDAS
    # independently: the stream the pick writes decodes to that PSNR, and no point is cheaper and good enough
    c = codec.load(pick.model)
    blob = c.compress(held, quality=pick.quality)
    assert pick.compress(held) == blob
    xs, _ = c.model_inputs(held)
    assert family.psnr_db(float(np.mean((xs - c.decompress(blob)) ** 2))) == pytest.approx(pick.psnr_db, abs=1e-9)
    assert 8 * len(blob) / len(held) == pytest.approx(pick.bits_per_record)
    cheaper = [p for p in points if p.bits_per_record < pick.bits_per_record]
    assert cheaper and all(p.psnr_db < target for p in cheaper)
    # a budget in bits per pixel: the best PSNR within it
    bpp = pick.bits_per_value
    by_bpp = family.choose(rd_family, held, bpp=bpp)
    assert by_bpp.bits_per_value <= bpp and by_bpp.psnr_db >= pick.psnr_db
    with pytest.raises(ConfigError, match="reaches"):
        family.choose(rd_family, held, psnr=99.0)


def test_cli_compress_with_psnr_records_the_model_and_decompress_finds_it(rd_family, mnist_test, tmp_path, capsys):
    held, later = mnist_test[1500:1800], mnist_test[1800:2100]
    np.save(tmp_path / "held.npy", held)
    np.save(tmp_path / "later.npy", later)
    target = float(np.round(np.median([p.psnr_db for p in family.measure(rd_family, held)]), 2))
    assert main(["compress", str(tmp_path / "later.npy"), str(tmp_path / "c.vz"), "--family", str(rd_family),
                 "--psnr", str(target), "--select-on", str(tmp_path / "held.npy")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["selected_on"].endswith("held.npy") and out["selection_psnr_db"] >= target
    picked = codec.load(out["model"])
    blob = (tmp_path / "c.vz").read_bytes()
    assert open_stream(blob, rd_family).fingerprint == picked.fingerprint  # the header names the model
    assert main(["decompress", str(tmp_path / "c.vz"), str(tmp_path / "r.npy"), "--family", str(rd_family)]) == 0
    capsys.readouterr()
    np.testing.assert_array_equal(np.load(tmp_path / "r.npy").reshape(len(later), -1),
                                  picked.decompress(blob).reshape(len(later), -1))
    # selected on the input itself (the default), the target holds on what is written, exactly
    assert main(["compress", str(tmp_path / "held.npy"), str(tmp_path / "h.vz"), "--family", str(rd_family),
                 "--psnr", str(target)]) == 0
    out = json.loads(capsys.readouterr().out)
    c = open_stream(tmp_path / "h.vz", rd_family)
    x_hat = c.decompress((tmp_path / "h.vz").read_bytes())
    assert family.psnr_db(float(np.mean((_x(held) - x_hat) ** 2))) >= target
    assert main(["compress", str(tmp_path / "held.npy"), str(tmp_path / "x.vz"), "--psnr", "20"]) == 1


def test_bd_rate_of_a_curve_at_half_the_bits_is_minus_50_percent_over_the_shared_range():
    from vaestream.metrics import bd_rate

    p = np.linspace(15, 35, 9)
    anchor = [{"psnr_db": float(v), "bits_per_image": float(50 * 1.3 ** (v - 15))} for v in p]
    test = [{"psnr_db": float(v), "bits_per_image": r["bits_per_image"] / 2} for v, r in zip(p + 1, anchor)]
    test = [{"psnr_db": r["psnr_db"] - 1, "bits_per_image": r["bits_per_image"]} for r in test]
    got = bd_rate(test, anchor)
    assert got["bd_rate_pct"] == pytest.approx(-50.0, abs=1e-6) and (got["psnr_from"], got["psnr_to"]) == (15, 35)
    assert bd_rate(test, anchor, (18.0, 32.0))["psnr_from"] == 18.0
    assert bd_rate(test[:2], [{"psnr_db": 40.0, "bits_per_image": 1.0}])["bd_rate_pct"] is None


@pytest.mark.parametrize("method", ["pchip", "akima"])
def test_bd_rate_agrees_with_the_reference_implementation_on_measured_curves(method):
    """Measured RD curves (benchmarks/results/rd_run5_rdo.json): our BD-rate over the shared interval is the one of
    Herglotz et al.'s ``bjontegaard`` package (which matches the JCT-VC sheet) on the same envelopes."""
    import bjontegaard

    from vaestream.metrics import bd_rate, envelope

    saved = json.loads((Path(__file__).parents[1] / "benchmarks/results/rd_run5_rdo.json").read_text())
    checked = 0
    for res in saved["results"]:
        for peer in ("webp_tiled", "avif_tiled", "jpeg_tiled"):
            ours, theirs = envelope(res["points"]), envelope(res["peers"][peer])
            got = bd_rate(res["points"], res["peers"][peer], method=method)
            ref = bjontegaard.bd_rate([b for _, b in theirs], [p for p, _ in theirs], [b for _, b in ours],
                                      [p for p, _ in ours], method=method, require_matching_points=False,
                                      min_overlap=0)
            assert got["method"] == method and got["bd_rate_pct"] == pytest.approx(ref, abs=1e-9)
            checked += 1
    assert checked == 6


def test_bd_rate_follows_a_kinked_curve_where_one_cubic_cannot():
    """A curve whose log-rate is piecewise linear in PSNR, steep up to 23 dB and then jumping to a flatter
    branch at 25 dB (lossy members, then a near-lossless member), against a log-linear anchor: over 21-32 dB
    the piecewise interpolants give the exact BD-rate (the integral of the true curves) to 0.1 point; one
    cubic over the whole curve is off by 4."""
    from vaestream.metrics import bd_rate

    def log_rate(v):
        return np.interp(v, [14, 23, 25, 50], [math.log(20), math.log(20) + 9 * math.log(1.35), math.log(450),
                                               math.log(450) + 25 * math.log(1.06)])

    kinked = [{"psnr_db": float(v), "bits_per_image": float(np.exp(log_rate(v)))} for v in np.arange(14, 50.01, 0.5)]
    anchor = [{"psnr_db": float(v), "bits_per_image": 280 * 1.09 ** (v - 21)} for v in np.arange(21, 33.01, 1.0)]
    grid = np.linspace(21, 32, 110_001)
    exact = 100 * (np.exp(np.mean(log_rate(grid) - (math.log(280) + (grid - 21) * math.log(1.09)))) - 1)
    for method in ("pchip", "akima"):
        got = bd_rate(kinked, anchor, (18.0, 32.0), method=method)
        assert (got["psnr_from"], got["psnr_to"]) == (21.0, 32.0)
        assert got["bd_rate_pct"] == pytest.approx(exact, abs=0.1)
    assert abs(bd_rate(kinked, anchor, (18.0, 32.0), method="cubic")["bd_rate_pct"] - exact) > 3.0
    with pytest.raises(ConfigError):
        bd_rate(kinked, anchor, method="spline")


def test_ssim_is_one_on_equal_pictures_and_falls_with_noise(mnist_test):
    from vaestream.metrics import ssim

    x = mnist_test[:20].astype(np.float64) / 255
    noisy = np.clip(x + np.random.default_rng(0).normal(0, 0.1, x.shape), 0, 1)
    noisier = np.clip(x + np.random.default_rng(0).normal(0, 0.3, x.shape), 0, 1)
    assert ssim(x, x) == pytest.approx(1.0)
    assert 1.0 > ssim(noisy, x) > ssim(noisier, x) > 0.0
    assert ssim(noisy, x) == pytest.approx(ssim(x, noisy))


def test_rd_of_a_family_gives_its_envelope_the_peers_bd_rates_and_a_plot(rd_family, mnist_dir, tmp_path, capsys):
    assert main(["rd", str(rd_family), "--data", str(mnist_dir), "--n", "200", "--per-image-n", "40",
                 "--peers", "jpeg", "webp", "--plot", str(tmp_path / "rd.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (tmp_path / "rd.png").stat().st_size > 10000
    assert len(out["points"]) == 3 * 19 and {p["lmbda"] for p in out["points"]} == set(LAMBDAS)
    assert all(0 < p["ssim"] <= 1 for p in out["points"])
    env = out["envelope"]
    assert all(a["psnr_db"] < b["psnr_db"] and a["bits_per_image"] < b["bits_per_image"] for a, b in zip(env, env[1:]))
    assert set(out["peers"]) == {"jpeg_per_image", "jpeg_tiled", "webp_per_image", "webp_tiled", "best_tiled_jpeg_webp"}
    for k, v in out["bd_rate_pct"].items():  # the per-image peers pay their headers: vaestream needs fewer bits
        if "per_image" in k and v["overlap"]["bd_rate_pct"] is not None:
            assert v["overlap"]["bd_rate_pct"] < 0, (k, v)


def test_cli_trains_a_conv_rd_model_with_lambda_in_its_config(mnist_train, tmp_path, capsys):
    np.save(tmp_path / "train.npy", mnist_train[:400])
    args = ["train", "--data", str(tmp_path / "train.npy"), "--out", str(tmp_path / "m"), "--likelihood",
            "gaussian_sigmoid", "--arch", "conv", "--channels", "4", "8", "--hidden", "32", "--latent-dim", "4",
            "--activation", "elu", "--steps", "6", "--steps-per-call", "3", "--no-progress", "--json"]
    assert main(args + ["--objective", "rd"]) == 1  # no --lmbda
    assert "go together" in capsys.readouterr().err
    assert main(args + ["--objective", "rd", "--lmbda", "500"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 6
    cfg = read_config(tmp_path / "m")
    assert (cfg.arch, cfg.channels, cfg.lmbda) == ("conv", (4, 8), 500.0)
    assert json.loads((tmp_path / "m" / "train_config.json").read_text())["objective"] == "rd"


def test_cli_rd_without_likelihood_trains_a_gaussian_decoder_and_elbo_keeps_bernoulli(mnist_train, tmp_path, capsys):
    np.save(tmp_path / "train.npy", mnist_train[:200])
    base = ["train", "--data", str(tmp_path / "train.npy"), "--hidden", "16", "--latent-dim", "2",
            "--steps", "2", "--steps-per-call", "2", "--no-progress", "--json"]
    assert main(base + ["--out", str(tmp_path / "rd"), "--objective", "rd", "--lmbda", "100"]) == 0
    assert main(base + ["--out", str(tmp_path / "elbo")]) == 0
    capsys.readouterr()
    assert read_config(tmp_path / "rd").likelihood == "gaussian_sigmoid"
    assert read_config(tmp_path / "elbo").likelihood == "bernoulli"


def test_a_spatial_latent_is_latent_channels_maps_over_the_encoders_grid_and_follows_the_data(mnist_train, tmp_path,
                                                                                              capsys):
    """ModelConfig(latent_channels=C): Nz = h w C over the last feature grid, checked; the CLI's
    --latent-channels sets it, and training on other picture sizes moves Nz with the grid."""
    from vaestream.config import latent_grid

    assert latent_grid((28, 28), (16, 32)) == (7, 7) and latent_grid((28, 28), (8, 16, 32)) == (4, 4)
    cfg = ModelConfig(latent_dim=7 * 7 * 3, hidden=(), likelihood="gaussian_sigmoid", arch="conv", channels=(4, 8),
                      latent_channels=3)
    assert cfg.latent_shape == (7, 7, 3) and json.loads(cfg.to_json())["latent_channels"] == 3
    assert "latent_channels" not in json.loads(ModelConfig(arch="conv", channels=(4, 8)).to_json())  # as before
    with pytest.raises(ConfigError, match="has 147 dimensions, but latent_dim is 20"):
        ModelConfig(latent_dim=20, hidden=(), arch="conv", channels=(4, 8), latent_channels=3)
    with pytest.raises(ConfigError, match="no dense layers"):
        ModelConfig(latent_dim=147, arch="conv", channels=(4, 8), latent_channels=3)
    with pytest.raises(ConfigError, match="needs arch 'conv'"):
        ModelConfig(latent_dim=147, hidden=(), latent_channels=3)
    small = cfg.for_input_shape((14, 14))
    assert small.latent_shape == (4, 4, 3) and small.latent_dim == 48 and small.input_dim == 196
    vae = VAE(cfg)
    mean, log_scale = vae.encoder_params(tf.constant(_x(mnist_train[:5])))
    assert mean.shape == log_scale.shape == (5, 147)
    assert vae.decoder_params(mean)["x_mean"].shape == (5, 784)
    np.save(tmp_path / "train.npy", mnist_train[:300])
    assert main(["train", "--data", str(tmp_path / "train.npy"), "--out", str(tmp_path / "m"), "--arch", "conv",
                 "--channels", "4", "8", "--latent-channels", "2", "--activation", "elu", "--objective", "rd",
                 "--lmbda", "300", "--steps", "4", "--steps-per-call", "2", "--no-progress", "--json"]) == 0
    capsys.readouterr()
    m = read_config(tmp_path / "m")
    assert (m.latent_channels, m.latent_dim, m.hidden) == (2, 98, ())


def test_gdn_divides_each_pixel_by_its_channel_norm_and_igdn_multiplies_by_it(mnist_train):
    """activation="gdn": y_i = x_i / sqrt(beta_i + sum_j gamma_ji x_j^2) after each encoder convolution, the
    inverse y_i = x_i sqrt(...) after the decoder's; refused where dense layers would need it; blockwise (the decode
    path) agrees with the training path, and the model trains and codes as any spatial model."""
    from vaestream.conv import GDN

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3, 2, 4)).astype(np.float32)
    g = GDN(4, inverse=False, name="g")
    g.w.assign(rng.uniform(0.1, 0.6, size=(4, 4)).astype(np.float32))
    g.b.assign(rng.uniform(0.5, 1.5, size=(4,)).astype(np.float32))
    gamma, beta = g.w.numpy().astype(np.float64) ** 2, g.b.numpy().astype(np.float64) ** 2 + GDN.BETA_MIN
    want = x / np.sqrt(beta + (x.astype(np.float64) ** 2) @ gamma)
    np.testing.assert_allclose(g(tf.constant(x)).numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(g(tf.constant(x), blockwise=True).numpy(), want, rtol=1e-5)
    inv = GDN(4, inverse=True, name="ig")
    inv.w.assign(g.w), inv.b.assign(g.b)
    np.testing.assert_allclose(inv(tf.constant(x)).numpy(), x * np.sqrt(beta + (x.astype(np.float64) ** 2) @ gamma),
                               rtol=1e-5)
    with pytest.raises(ConfigError, match="needs arch 'conv' with a spatial latent"):
        ModelConfig(latent_dim=16, hidden=(64,), activation="gdn", arch="conv", channels=(4, 8))
    cfg = ModelConfig(latent_dim=7 * 7 * 2, hidden=(), activation="gdn", likelihood="gaussian_sigmoid", arch="conv",
                      channels=(4, 8), latent_channels=2, lmbda=300.0)
    vae = VAE(cfg)
    kinds = lambda net: [getattr(m, "inverse", None) for m in net.layers()]  # None: a convolution
    assert kinds(vae.encoder) == [None, False, None, False, None]  # conv GDN conv GDN head
    assert kinds(vae.decoder) == [None, True, None, True, None]  # head IGDN sub-pixel IGDN sub-pixel
    assert len(vae.weights()) == 20  # every layer's w and b, in the fingerprint
    xb = tf.constant(_x(mnist_train[:64]))
    mean, _ = vae.encoder_params(xb)
    np.testing.assert_allclose(vae.encoder(xb, blockwise=True).numpy()[:, :98], mean.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(vae.decoder(mean, blockwise=True).numpy(), vae.decoder(mean).numpy(), rtol=1e-4,
                               atol=1e-5)
