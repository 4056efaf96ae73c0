"""Spike: does a learned entropy model pay on 28 x 28 records? Rates from real range-coded bytes.

On the conv transform of ``vaestream train --arch conv --objective rd`` with a spatial latent (channels 16, 32;
C latent maps over the encoder's 7 x 7 grid; ELU; sigmoid decoder mean: bench_rd.py run 3's shape), per lambda:

* ``a_today``: the project's RD model (:func:`bench_rd.train_family`: KL to N(0, I), Gaussian posterior noise)
  coded by the project's codec (one aggregate table per latent position, the quality ladder; container bytes).
* ``b_factorized``: the same analysis/synthesis transform (:class:`vaestream.model.VAE`, its posterior mean as
  y), trained with additive uniform noise under a learned per-channel non-parametric density (Ballé et al. 2018,
  appendix 6.1, filters 3-3-3, init scale 10); coded with round(y) and one integer PMF table per channel.
* ``c_hyperprior``: + hyper-analysis |y| -> z (2 x 2 x Cz) and hyper-synthesis z -> scale; z coded with a
  factorised density (per-channel tables), y under N(0, s) convolved with U(-1/2, 1/2), s quantised to one of
  64 log-spaced scales in [0.11, 256] (tensorflow-compression's defaults), one table per scale index.
* ``d_meanscale``: as c, hyper-synthesis predicts mean and scale (Minnen et al. 2018), hyper-analysis sees y;
  coded symbols round(y - mu), reconstruction round(y - mu) + mu (the mean is not rounded).

Every learned model: same transform, batch 100, Adam 1e-3, the same epochs as a_today, loss bits + lambda MSE;
the rate under additive uniform noise, the synthesis fed the rounded latent round(y - mu) + mu with a
straight-through gradient (Minnen & Singh 2020's mixed quantisation); a dead decoder is retrained (next seed).
Streams: frames of 1,024 records (the codec's default); each frame one range-coded side stream (z) and one main
stream (y), constriction RangeEncoder, escapes as two 16-bit uniform symbols; 24 bytes of container header per
data set and 8 bytes (two lengths) per frame are added. Every stream is decoded and checked against the symbols.

``--frozen Q``: instead of training b, c, d end to end, train only their entropy side (densities, hyper-analysis
and -synthesis; Adam ``--frozen-lr``, ``--frozen-steps`` batches of 100) on the latents of today's models
(a_today, already trained in ``--work``) at codec quality Q: y = mu / delta with the codec's own bins, inactive
positions not coded. b and c then code exactly the codec's symbols (same PSNR); d codes round(y - mu) and
reconstructs (round(y - mu) + mu) delta. What the runs recorded in RESULTS_coder.md did:

    PYTHONPATH=. nice -n 19 python benchmarks/spike_entropy_models.py --data mnist --epochs 5 --models a_today \
        --work /tmp/spike_runs5
    PYTHONPATH=. nice -n 19 python benchmarks/spike_entropy_models.py --data mnist --frozen 1 --work /tmp/spike_runs5

Prints JSON and writes benchmarks/results/spike_entropy_<data>.json (``--out``). Resumable: finished
(model, lambda) rows in the output are kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

DATASETS = {"mnist": Path("/work/shared/data/mnist"), "fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
FRAME = 1024
HEADER_BYTES = 24
FRAME_BYTES = 8
SCALE_MIN, SCALE_MAX, SCALE_LEVELS = 0.11, 256.0, 64
LEARNED = ("b_factorized", "c_hyperprior", "d_meanscale")


# ----------------------------------------------------------------------------------------------- TF models
def _tf():
    import tensorflow as tf

    return tf


def build_classes():
    tf = _tf()
    from vaestream.conv import Conv

    class DeepFactorized(tf.Module):
        """Ballé et al. 2018's non-parametric density, one per channel; likelihood of an interval of width 1."""

        def __init__(self, channels: int, filters=(3, 3, 3), init_scale: float = 10.0, name: str = "density"):
            super().__init__(name=name)
            f = (1,) + tuple(filters) + (1,)
            scale = init_scale ** (1.0 / (len(f) - 1))
            rng = np.random.default_rng(0)
            self.m, self.b, self.a = [], [], []
            for i in range(len(f) - 1):
                init = math.log(math.expm1(1.0 / scale / f[i + 1]))
                self.m.append(tf.Variable(np.full((channels, f[i + 1], f[i]), init, np.float32)))
                self.b.append(tf.Variable(rng.uniform(-.5, .5, (channels, f[i + 1], 1)).astype(np.float32)))
                if i < len(f) - 2:
                    self.a.append(tf.Variable(np.zeros((channels, f[i + 1], 1), np.float32)))

        def logits(self, x):  # x [C, 1, N]
            t = x
            for i in range(len(self.m)):
                t = tf.matmul(tf.nn.softplus(self.m[i]), t) + self.b[i]
                if i < len(self.a):
                    t += tf.tanh(self.a[i]) * tf.tanh(t)
            return t

        def likelihood(self, y):  # y [..., C] -> same shape
            c = tf.shape(y)[-1]
            shp = tf.shape(y)
            x = tf.reshape(tf.transpose(tf.reshape(y, [-1, c])), [c, 1, -1])
            lo, hi = self.logits(x - 0.5), self.logits(x + 0.5)
            sign = -tf.sign(lo + hi)
            lik = tf.abs(tf.sigmoid(sign * hi) - tf.sigmoid(sign * lo))
            return tf.reshape(tf.transpose(tf.reshape(lik, [c, -1])), shp)

    def gauss_lik(y, mu, s):
        v = tf.abs(y - mu)
        n = lambda t: 0.5 * tf.math.erfc(-t / math.sqrt(2.0))  # noqa: E731
        return n((0.5 - v) / s) - n((-0.5 - v) / s)

    class Hyper(tf.Module):
        """h_a: 7x7xC -> 3x3 s1 -> 5x5 s2 -> 5x5 s2 -> 2x2xCz; h_s: sub-pixel x2, x2 (crop 7), 3x3 -> k C."""

        def __init__(self, c: int, n: int, cz: int, k: int, grid, seed: int):
            super().__init__(name="hyper")
            rng = np.random.default_rng(seed + 100)
            self.grid = grid
            self.ha = [Conv(3, c, n, 1, rng, "ha0"), Conv(5, n, n, 2, rng, "ha1"), Conv(5, n, cz, 2, rng, "ha2")]
            self.hs = [Conv(3, cz, 4 * n, 1, rng, "hs0"), Conv(3, n, 4 * n, 1, rng, "hs1"),
                       Conv(3, n, k * c, 1, rng, "hs2")]

        def analysis(self, y):
            t = tf.nn.relu(self.ha[0](y))
            t = tf.nn.relu(self.ha[1](t))
            return self.ha[2](t)

        def synthesis(self, z):
            h, w = self.grid
            t = tf.nn.relu(tf.nn.depth_to_space(self.hs[0](z), 2))
            t = tf.nn.relu(tf.nn.depth_to_space(self.hs[1](t), 2)[:, :h, :w, :])
            return self.hs[2](t)

    return DeepFactorized, Hyper, gauss_lik


class Learned:
    """One learned-entropy-model codec around a :class:`vaestream.model.VAE` conv transform."""

    def __init__(self, kind: str, vae, c: int, grid, seed: int, hyper_n: int = 32, cz: int = 8):
        tf = _tf()
        DeepFactorized, Hyper, gauss_lik = build_classes()
        self.kind, self.vae, self.c, self.grid = kind, vae, c, grid
        self.gauss_lik = gauss_lik
        self.density_y = DeepFactorized(c, name="dy") if kind == "b_factorized" else None
        self.hyper = None
        if kind != "b_factorized":
            self.hyper = Hyper(c, hyper_n, cz, 2 if kind == "d_meanscale" else 1, grid, seed)
            self.density_z = DeepFactorized(cz, name="dz")
        mods = [vae] + [m for m in (self.density_y, self.hyper, getattr(self, "density_z", None)) if m is not None]
        self.variables = [v for m in mods for v in m.trainable_variables]
        self.tf = tf

    def analysis(self, x):
        mean, _ = self.vae.encoder_params(x)
        h, w = self.grid
        return self.tf.reshape(mean, [-1, h, w, self.c])

    def synthesis(self, y):
        tf = self.tf
        return self.vae.decoder_params(tf.reshape(y, [tf.shape(y)[0], -1]))["x_mean"]

    def hyper_params(self, z):
        tf = self.tf
        t = self.hyper.synthesis(z)
        if self.kind == "d_meanscale":
            mu, raw = tf.split(t, 2, axis=-1)
        else:
            mu, raw = tf.zeros_like(t), t
        return mu, SCALE_MIN + tf.nn.softplus(raw)

    def loss(self, x, lmbda):
        tf = self.tf
        y = self.analysis(x)
        y_t = y + tf.random.uniform(tf.shape(y), -0.5, 0.5)
        if self.kind == "b_factorized":
            bits_y = -tf.reduce_sum(tf.math.log(tf.maximum(self.density_y.likelihood(y_t), 1e-9)), [1, 2, 3])
            bits_z = tf.zeros_like(bits_y)
        else:
            z = self.hyper.analysis(tf.abs(y) if self.kind == "c_hyperprior" else y)
            z_t = z + tf.random.uniform(tf.shape(z), -0.5, 0.5)
            mu, s = self.hyper_params(z_t)
            bits_y = -tf.reduce_sum(tf.math.log(tf.maximum(self.gauss_lik(y_t, mu, s), 1e-9)), [1, 2, 3])
            bits_z = -tf.reduce_sum(tf.math.log(tf.maximum(self.density_z.likelihood(z_t), 1e-9)), [1, 2, 3])
        ln2 = math.log(2.0)
        rate = (bits_y + bits_z) / ln2
        # the synthesis sees the rounded latent (straight-through: identity gradient), the rate the noisy one
        # (Minnen & Singh 2020's "mixed" quantisation): additive noise alone left a train/test gap of 4 dB here
        mu_q = mu if self.kind != "b_factorized" else tf.zeros_like(y)
        y_q = y + tf.stop_gradient(tf.round(y - mu_q) + mu_q - y)
        mse = tf.reduce_mean(tf.square(x - self.synthesis(y_q)), axis=-1)
        return tf.reduce_mean(rate + lmbda * mse), tf.reduce_mean(rate), tf.reduce_mean(mse)


COLLAPSED_DB = 12.0
"""A learned model whose training PSNR (last 300 steps) ends below this has a dead (saturated sigmoid) decoder:
it is trained again from the next seed (as bench_rd.py does for today's models), at most twice."""


def train_learned(kind: str, train_x: np.ndarray, cfg_kw: dict, lmbda: float, epochs: float, seed: int,
                  log) -> tuple["Learned", dict]:
    collapsed = []
    for s in range(seed, seed + 3):
        m, tr = _train_learned(kind, train_x, cfg_kw, lmbda, epochs, s, log)
        if tr["final_train_psnr_db"] >= COLLAPSED_DB or s == seed + 2:
            return m, {**tr, "seed": s, "collapsed_runs": collapsed}
        collapsed.append({"seed": s, "psnr_db": tr["final_train_psnr_db"], "train_seconds": tr["train_seconds"]})
        log(f"  collapsed: {collapsed[-1]}")


def _train_learned(kind: str, train_x: np.ndarray, cfg_kw: dict, lmbda: float, epochs: float, seed: int,
                   log) -> tuple[Learned, dict]:
    tf = _tf()
    from vaestream import ModelConfig
    from vaestream.model import VAE
    import keras

    cfg = ModelConfig(**cfg_kw, lmbda=lmbda)
    tf.random.set_seed(seed)
    vae = VAE(cfg, seed=seed)
    grid = cfg.latent_shape[:2]
    m = Learned(kind, vae, cfg.latent_shape[2], grid, seed)
    opt = keras.optimizers.Adam(1e-3)
    opt.build(m.variables)
    lm = tf.constant(lmbda, tf.float32)

    @tf.function(reduce_retracing=True)
    def step(xb):
        with tf.GradientTape() as tape:
            loss, rate, mse = m.loss(xb, lm)
        grads = tape.gradient(loss, m.variables)
        opt.apply_gradients(zip(grads, m.variables))
        return loss, rate, mse

    rng = np.random.default_rng(seed)
    n = len(train_x)
    steps = int(math.ceil(epochs * (n // 100)))
    t0 = time.perf_counter()
    perm = rng.permutation(n)
    pos = 0
    acc = []
    for k in range(steps):
        if pos + 100 > n:
            perm, pos = rng.permutation(n), 0
        xb = train_x[perm[pos:pos + 100]].reshape(100, -1).astype(np.float32) / 255.0
        pos += 100
        acc.append([float(v) for v in step(tf.constant(xb))])
        if (k + 1) % 600 == 0:
            a = np.mean(acc[-600:], axis=0)
            log(f"  {kind} lmbda={lmbda:g} step {k + 1}/{steps}: loss {a[0]:.1f} rate {a[1]:.1f} bits "
                f"psnr(rounded) {10 * math.log10(1 / a[2]):.2f} ({time.perf_counter() - t0:.0f} s)")
    secs = time.perf_counter() - t0
    last = np.mean(acc[-300:], axis=0)
    return m, {"steps": steps, "train_seconds": round(secs, 1), "final_train_rate_bits": round(float(last[1]), 2),
               "final_train_psnr_db": round(10 * math.log10(1 / float(last[2])), 2)}


# ----------------------------------------------------------------------------------------------- tables
def factorized_tables(density, channels: int, half: int) -> np.ndarray:
    """PMF ``[C, 2 half + 2]`` over the integers -half..half and one escape entry (the mass outside)."""
    tf = _tf()
    grid = np.arange(-half, half + 1, dtype=np.float32)
    y = np.broadcast_to(grid[:, None, None, None], (len(grid), 1, 1, channels)).astype(np.float32)
    pmf = density.likelihood(tf.constant(y)).numpy().reshape(len(grid), channels).T.astype(np.float64)
    pmf = np.maximum(pmf, 0.0)
    tail = np.maximum(1.0 - pmf.sum(axis=1, keepdims=True), 1e-7)
    out = np.concatenate([pmf, tail], axis=1)
    return out / out.sum(axis=1, keepdims=True)


def scale_table() -> np.ndarray:
    return np.exp(np.linspace(math.log(SCALE_MIN), math.log(SCALE_MAX), SCALE_LEVELS))


def gaussian_tables(scales: np.ndarray) -> list[np.ndarray]:
    """One PMF per scale over -K..K (K = ceil(5 s) + 1) and an escape entry."""
    from scipy.stats import norm

    out = []
    for s in scales:
        k = int(math.ceil(5 * s)) + 1
        g = np.arange(-k, k + 1, dtype=np.float64)
        pmf = norm.cdf((g + 0.5) / s) - norm.cdf((g - 0.5) / s)
        tail = max(1.0 - pmf.sum(), 1e-7)
        p = np.append(pmf, tail)
        out.append(p / p.sum())
    return out


def scale_index(s: np.ndarray) -> np.ndarray:
    step = math.log(SCALE_MAX / SCALE_MIN) / (SCALE_LEVELS - 1)
    return np.clip(np.rint((np.log(s) - math.log(SCALE_MIN)) / step), 0, SCALE_LEVELS - 1).astype(np.int64)


# ----------------------------------------------------------------------------------------------- coding
class GroupCoder:
    """Codes integer symbols, each with a table index, in one RangeEncoder stream: grouped by table (stable
    order within a group, which the decoder also knows), escapes last as two uniform 16-bit symbols."""

    def __init__(self, pmfs: list[np.ndarray]):
        import constriction

        self.cs = constriction.stream
        self.pmfs = pmfs = [np.ascontiguousarray(p, np.float64) for p in pmfs]
        self.half = np.array([(len(p) - 2) // 2 for p in pmfs], np.int64)
        self.models = [self.cs.model.Categorical(p, perfect=False) for p in pmfs]
        self.logp = [np.log2(np.maximum(p, 2.0 ** -24)) for p in pmfs]
        self.uniform = self.cs.model.Uniform(1 << 16)

    def _plan(self, tables: np.ndarray):
        order = np.argsort(tables, kind="stable")
        counts = np.bincount(tables, minlength=len(self.pmfs))
        return order, counts

    def encode(self, symbols: np.ndarray, tables: np.ndarray) -> tuple[bytes, float]:
        """Flat int symbols and their table indices -> (bytes, ideal bits)."""
        order, counts = self._plan(tables)
        enc = self.cs.queue.RangeEncoder()
        s_sorted = symbols[order].astype(np.int64)
        pos, ideal, esc = 0, 0.0, []
        for t, c in enumerate(counts):
            if not c:
                continue
            s = s_sorted[pos:pos + c]
            pos += c
            k = self.half[t]
            out = (s < -k) | (s > k)
            idx = np.where(out, 2 * k + 1, s + k).astype(np.int32)
            enc.encode(idx, self.models[t])
            ideal += float(-self.logp[t][idx].sum()) + 32.0 * int(out.sum())
            esc.append(s[out])
        e = np.concatenate(esc) if esc else np.zeros(0, np.int64)
        if len(e):
            u = e.astype(np.int32).view(np.uint32)
            enc.encode(np.stack([u & 0xFFFF, u >> 16], 1).reshape(-1).astype(np.int32), self.uniform)
        return enc.get_compressed().astype("<u4").tobytes(), ideal

    def decode(self, payload: bytes, tables: np.ndarray) -> np.ndarray:
        order, counts = self._plan(tables)
        dec = self.cs.queue.RangeDecoder(np.frombuffer(payload, "<u4").astype(np.uint32))
        vals = np.zeros(len(tables), np.int64)
        parts, n_esc = [], 0
        for t, c in enumerate(counts):
            if not c:
                continue
            idx = np.asarray(dec.decode(self.models[t], int(c)), np.int64)
            k = self.half[t]
            parts.append(idx - k)
            n_esc += int((idx == 2 * k + 1).sum())
        s_sorted = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if n_esc:
            esc_pos = _escape_positions(parts, counts, self.half)
            raw = np.asarray(dec.decode(self.uniform, 2 * n_esc), np.int64).reshape(-1, 2)
            s_sorted[esc_pos] = (raw[:, 0] | (raw[:, 1] << 16)).astype(np.uint32).view(np.int32)
        vals[order] = s_sorted
        return vals


def _escape_positions(parts, counts, half) -> np.ndarray:
    out, base, i = [], 0, 0
    for t, c in enumerate(counts):
        if not c:
            continue
        out.append(base + np.flatnonzero(parts[i] == half[t] + 1))
        base += c
        i += 1
    return np.concatenate(out)


def code_frames(coder, sym: np.ndarray, tab: np.ndarray, what: str) -> tuple[int, float, float, float]:
    """Range-code symbols ``[n, k]`` under table indices ``[n, k]`` in frames of FRAME records, decode them back
    and check they round-trip: (bytes, ideal bits, encode seconds, decode seconds)."""
    blobs, nbytes, ideal_bits = [], 0, 0.0
    t0 = time.perf_counter()
    for s in range(0, len(sym), FRAME):
        b, ideal = coder.encode(sym[s:s + FRAME].reshape(-1), tab[s:s + FRAME].reshape(-1))
        blobs.append(b)
        nbytes += len(b)
        ideal_bits += ideal
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    dec = np.concatenate([coder.decode(b, tab[s:s + FRAME].reshape(-1)).reshape(-1, sym.shape[1])
                          for b, s in zip(blobs, range(0, len(sym), FRAME))])
    t_dec = time.perf_counter() - t0
    assert np.array_equal(dec, sym), f"{what} stream did not decode to its symbols"
    return nbytes, ideal_bits, t_enc, t_dec


def evaluate_learned(m: Learned, test_x: np.ndarray, train_x: np.ndarray) -> dict:
    """Real streams of the 10k test records: PSNR, bits (real, ideal), side share, coding records/s."""
    tf = m.tf
    xs = test_x.reshape(len(test_x), -1).astype(np.float32) / 255.0
    ys, zs = [], []
    for s in range(0, len(xs), 1000):
        y = m.analysis(tf.constant(xs[s:s + 1000]))
        ys.append(y.numpy())
        if m.hyper is not None:
            zs.append(m.hyper.analysis(tf.abs(y) if m.kind == "c_hyperprior" else y).numpy())
    y = np.concatenate(ys)
    n = len(y)
    out = {}
    t_side_e = t_side_d = t_hs = 0.0
    side_bytes, side_ideal = 0, 0.0  # no side stream (factorised)
    # tables for the factorised densities: range from the training set's quantised values
    if m.kind == "b_factorized":
        ytr = m.analysis(tf.constant(train_x[:5000].reshape(5000, -1).astype(np.float32) / 255.0)).numpy()
        half = int(min(1024, max(8, 2 * np.abs(np.rint(ytr)).max())))
        coder = GroupCoder(list(factorized_tables(m.density_y, m.c, half)))
        sym = np.rint(y).astype(np.int64)
        tables = np.broadcast_to(np.arange(m.c), y.shape).reshape(n, -1)
        y_hat = sym.astype(np.float32)
        out["table_half_range"] = half
    else:
        z = np.concatenate(zs)
        cz = z.shape[-1]
        xtr = tf.constant(train_x[:5000].reshape(5000, -1).astype(np.float32) / 255.0)
        ytr = m.analysis(xtr)
        ztr = m.hyper.analysis(tf.abs(ytr) if m.kind == "c_hyperprior" else ytr).numpy()
        zhalf = int(min(1024, max(8, 2 * np.abs(np.rint(ztr)).max())))
        zcoder = GroupCoder(list(factorized_tables(m.density_z, cz, zhalf)))
        zsym = np.rint(z).astype(np.int64)
        ztab = np.broadcast_to(np.arange(cz), z.shape).reshape(n, -1)
        zflat = zsym.reshape(n, -1)
        side_bytes, side_ideal, t_side_e, t_side_d = code_frames(zcoder, zflat, ztab, "side")
        t0 = time.perf_counter()
        mus, ss = [], []
        for s in range(0, n, 1000):
            mu, sc = m.hyper_params(tf.constant(zsym[s:s + 1000].astype(np.float32)))
            mus.append(mu.numpy())
            ss.append(sc.numpy())
        t_hs = time.perf_counter() - t0
        mu, sc = np.concatenate(mus), np.concatenate(ss)
        coder = GroupCoder(gaussian_tables(scale_table()))
        sym = np.rint(y - mu).astype(np.int64)
        tables = scale_index(sc).reshape(n, -1)
        y_hat = (sym + mu).astype(np.float32)
        out["z_shape"] = list(z.shape[1:])
        out["z_table_half_range"] = zhalf
        out["scale_index_histogram_nonzero"] = int((np.bincount(tables.reshape(-1), minlength=64) > 0).sum())
    flat, tflat = sym.reshape(n, -1), tables.reshape(n, -1)
    main_bytes, main_ideal, t_main_e, t_main_d = code_frames(coder, flat, tflat, "main")
    xh = np.concatenate([np.clip(m.synthesis(tf.constant(y_hat[s:s + 1000])).numpy(), 0, 1)
                         for s in range(0, n, 1000)])
    mse = float(np.mean((xs.astype(np.float64) - xh) ** 2))
    frames = -(-n // FRAME)
    overhead = HEADER_BYTES + FRAME_BYTES * frames
    total = side_bytes + main_bytes + overhead
    out.update({
        "psnr_db": round(10 * math.log10(1 / mse), 3), "mse": mse,
        "bits_per_record": round(8 * total / n, 2),
        "main_bits_per_record": round(8 * main_bytes / n, 2), "side_bits_per_record": round(8 * side_bytes / n, 2),
        "container_bits_per_record": round(8 * overhead / n, 3),
        "side_share_pct": round(100 * side_bytes / total, 2),
        "ideal_bits_per_record": round((main_ideal + side_ideal) / n, 2),
        "ideal_side_bits_per_record": round(side_ideal / n, 2),
        "real_over_ideal_pct": round(100 * (8 * (side_bytes + main_bytes) / max(main_ideal + side_ideal, 1) - 1), 3),
        "coding_encode_records_per_s": round(n / max(t_main_e + t_side_e, 1e-9)),
        "coding_decode_records_per_s": round(n / max(t_main_d + t_side_d, 1e-9)),
        "hyper_synthesis_records_per_s": round(n / t_hs) if t_hs else None,
        "latent_nonzero_symbols_per_record": round(float((flat != 0).sum()) / n, 2),
    })
    return out


# ----------------------------------------------------------------------------------------------- today's coder
def today(root: Path, work: Path, lmbda: float, args, test: np.ndarray) -> list[dict]:
    """The project's RD model at ``lmbda`` (bench_rd.train_family) coded by its codec at every ladder quality."""
    import bench_rd
    from vaestream.coding import codec, family
    from vaestream.coding.range_coder import EntropyCoder

    fam = work / f"family-{root.name}"
    ns = SimpleNamespace(lambdas=[lmbda], prefix="", latent_channels=args.latent_channels,
                         channels=args.channels, latent_dim=64, hidden=[256], activation="elu",
                         likelihood="gaussian_sigmoid", epochs=args.epochs, bits_back_steps=0)
    log = bench_rd.train_family(root, fam, ns)[0]
    d = fam / f"lmbda-{lmbda:g}"
    c = codec.load(d)
    rows = []
    for p in family.operating_points(c, test):
        rows.append({"quality": p.quality, "psnr_db": round(p.psnr_db, 3),
                     "bits_per_record": round(p.bits_per_record, 2)})
    # ideal bits and coding-only speed at quality 1 (and the point nearest 4 = the KL rate)
    x, _ = c.model_inputs(test)
    mean, _ = c.posterior(x)
    for q in (1.0, 4.0):
        ec = EntropyCoder(c.tables, q)
        codes = c.codes_of(x, mean, ec.quality)
        t0 = time.perf_counter()
        blobs = [ec.encode(codes[s:s + FRAME]) for s in range(0, len(codes), FRAME)]
        t1 = time.perf_counter()
        for b, s in zip(blobs, range(0, len(codes), FRAME)):
            ec.decode(b, len(codes[s:s + FRAME]))
        t2 = time.perf_counter()
        r = next(r for r in rows if abs(r["quality"] - ec.quality) < 1e-9)
        r.update({"ideal_bits_per_record": round(float(ec.ideal_bits(codes).mean()), 2),
                  "coding_encode_records_per_s": round(len(codes) / (t1 - t0)),
                  "coding_decode_records_per_s": round(len(codes) / (t2 - t1))})
    return [{"training": log, "points": rows}]


# ----------------------------------------------------------------------------------------------- frozen transform
class FrozenEM:
    """A learned entropy model (b, c or d) of a trained model's latents scaled by the codec's bins, y = mu / delta
    ``[N, h, w, C]``, inactive positions masked out (not coded, as the codec does)."""

    def __init__(self, kind: str, c: int, grid, mask: np.ndarray, seed: int, hyper_n: int = 32, cz: int = 8):
        tf = _tf()
        DeepFactorized, Hyper, gauss_lik = build_classes()
        self.tf, self.kind, self.c, self.gauss_lik = tf, kind, c, gauss_lik
        self.mask = tf.constant(mask.astype(np.float32))
        self.density_y = DeepFactorized(c, name="dy") if kind == "b_factorized" else None
        self.hyper = None
        if kind != "b_factorized":
            self.hyper = Hyper(c, hyper_n, cz, 2 if kind == "d_meanscale" else 1, grid, seed)
            self.density_z = DeepFactorized(cz, name="dz")
        mods = [m for m in (self.density_y, self.hyper, getattr(self, "density_z", None)) if m is not None]
        self.variables = [v for m in mods for v in m.trainable_variables]

    def z_of(self, y):
        return self.hyper.analysis(self.tf.abs(y) if self.kind == "c_hyperprior" else y)

    def hyper_params(self, z):
        tf = self.tf
        t = self.hyper.synthesis(z)
        if self.kind == "d_meanscale":
            mu, raw = tf.split(t, 2, axis=-1)
        else:
            mu, raw = tf.zeros_like(t), t
        return mu, SCALE_MIN + tf.nn.softplus(raw)

    def rate(self, y):
        tf = self.tf
        y_t = y + tf.random.uniform(tf.shape(y), -0.5, 0.5)
        if self.kind == "b_factorized":
            ly = tf.math.log(tf.maximum(self.density_y.likelihood(y_t), 1e-9))
            lz = tf.zeros_like(ly[..., :1])
        else:
            z = self.z_of(y)
            z_t = z + tf.random.uniform(tf.shape(z), -0.5, 0.5)
            mu, s = self.hyper_params(z_t)
            ly = tf.math.log(tf.maximum(self.gauss_lik(y_t, mu, s), 1e-9))
            lz = tf.math.log(tf.maximum(self.density_z.likelihood(z_t), 1e-9))
        return -(tf.reduce_sum(ly * self.mask, [1, 2, 3]) + tf.reduce_sum(lz, [1, 2, 3])) / math.log(2.0)


def frozen_rows(root: Path, work: Path, lmbda: float, quality: float, args, train_imgs, test, log) -> dict:
    """b, c, d trained (entropy side only) on the latents of today's model at ``lmbda``, quality ``quality``;
    every row coded for real, beside today's codec on the same codes."""
    tf = _tf()
    import keras
    from vaestream.coding import codec

    d = work / f"family-{root.name}" / f"lmbda-{lmbda:g}"
    while not (d / "bench_training.json").is_file():  # today's model may still be training in another process
        time.sleep(15)
    c = codec.load(d)
    t = c.tables
    lev = t.level(quality)
    q = float(t.qualities[lev])
    delta = t.delta[lev].astype(np.float64)
    shape = tuple(c.config.latent_shape)
    mask = t.active.reshape(shape)
    x_tr, _ = c.model_inputs(train_imgs[:args.frozen_train_n])
    m_tr, _ = c.posterior(x_tr)
    x_te, _ = c.model_inputs(test)
    m_te, _ = c.posterior(x_te)
    y_tr = (m_tr / delta * t.active).reshape((-1,) + shape).astype(np.float32)
    y_te = (m_te / delta * t.active).reshape((-1,) + shape).astype(np.float32)
    codes = c.codes_of(x_te, m_te, q)
    n = len(codes)
    x_true = x_te.astype(np.float64)
    rows = {}
    # today's codec on these codes: real container bytes and PSNR
    blob = c.compress_codes(codes, q)
    xh = c.decode(codes, q)
    rows["a_today"] = {"bits_per_record": round(8 * len(blob) / n, 2),
                       "psnr_db": round(10 * math.log10(1 / float(np.mean((x_true - xh) ** 2))), 3)}
    grid = shape[:2]
    for kind in LEARNED:
        tf.random.set_seed(args.seed)
        em = FrozenEM(kind, shape[2], grid, mask, args.seed)
        opt = keras.optimizers.Adam(args.frozen_lr)
        opt.build(em.variables)

        @tf.function(reduce_retracing=True)
        def step(yb):
            with tf.GradientTape() as tape:
                r = tf.reduce_mean(em.rate(yb))
            opt.apply_gradients(zip(tape.gradient(r, em.variables), em.variables))
            return r

        rng = np.random.default_rng(args.seed)
        t0 = time.perf_counter()
        hist = []
        for k in range(args.frozen_steps):
            hist.append(float(step(tf.constant(y_tr[rng.integers(0, len(y_tr), 100)]))))
        secs = time.perf_counter() - t0
        row = {"train_steps": args.frozen_steps, "train_seconds": round(secs, 1),
               "final_train_rate_bits": round(float(np.mean(hist[-200:])), 2)}
        # streams
        side_bytes, side_ideal = 0, 0.0  # no side stream (factorised)
        tse = tsd = ths = 0.0
        act = mask.reshape(-1)
        if kind == "b_factorized":
            half = int(min(1024, max(8, 2 * np.abs(np.rint(y_tr)).max())))
            coder = GroupCoder(list(factorized_tables(em.density_y, shape[2], half)))
            sym = codes.astype(np.int64).reshape((n,) + shape)
            tables = np.broadcast_to(np.arange(shape[2]), sym.shape).reshape(n, -1)
            y_hat = sym.astype(np.float64)
        else:
            z_tr = np.concatenate([em.z_of(tf.constant(y_tr[s:s + 5000])).numpy() for s in range(0, 20000, 5000)])
            z = np.concatenate([em.z_of(tf.constant(y_te[s:s + 2000])).numpy() for s in range(0, n, 2000)])
            cz = z.shape[-1]
            zhalf = int(min(1024, max(8, 2 * np.abs(np.rint(z_tr)).max())))
            zc = GroupCoder(list(factorized_tables(em.density_z, cz, zhalf)))
            zsym = np.rint(z).astype(np.int64)
            zflat, ztab = zsym.reshape(n, -1), np.broadcast_to(np.arange(cz), z.shape).reshape(n, -1)
            side_bytes, side_ideal, tse, tsd = code_frames(zc, zflat, ztab, "side")
            t0 = time.perf_counter()
            ps = [em.hyper_params(tf.constant(zsym[s:s + 2000].astype(np.float32))) for s in range(0, n, 2000)]
            ths = time.perf_counter() - t0
            mu = np.concatenate([p[0].numpy() for p in ps]).astype(np.float64)
            sc = np.concatenate([p[1].numpy() for p in ps])
            coder = GroupCoder(gaussian_tables(scale_table()))
            mu = mu * mask
            sym = np.rint(y_te - mu).astype(np.int64)
            if kind == "c_hyperprior":
                assert np.array_equal(sym.reshape(n, -1), codes), "c: symbols differ from the codec's codes"
            tables = scale_index(sc).reshape(n, -1)
            y_hat = sym + mu
            row["z_shape"] = list(z.shape[1:])
        flat = sym.reshape(n, -1)[:, act]
        tflat = tables.reshape(n, -1)[:, act]
        main_bytes, main_ideal, te, td = code_frames(coder, flat, tflat, "main")
        if kind == "d_meanscale":
            zhat = (y_hat.reshape(n, -1) * delta).astype(np.float32)
            xh = np.concatenate([np.asarray(c._backend.decode(zhat[s:s + 1000])) for s in range(0, n, 1000)])
            psnr = 10 * math.log10(1 / float(np.mean((x_true - xh) ** 2)))
        else:
            psnr = rows["a_today"]["psnr_db"]  # the very same codes
        overhead = HEADER_BYTES + FRAME_BYTES * (-(-n // FRAME))
        total = side_bytes + main_bytes + overhead
        row.update({"psnr_db": round(psnr, 3), "bits_per_record": round(8 * total / n, 2),
                    "side_bits_per_record": round(8 * side_bytes / n, 2),
                    "side_share_pct": round(100 * side_bytes / total, 2),
                    "ideal_bits_per_record": round((main_ideal + side_ideal) / n, 2),
                    "coding_encode_records_per_s": round(n / max(te + tse, 1e-9)),
                    "coding_decode_records_per_s": round(n / max(td + tsd, 1e-9)),
                    "hyper_synthesis_records_per_s": round(n / ths) if ths else None})
        rows[kind] = row
        log(f"  frozen {kind} lmbda={lmbda:g} q={q:g}: {json.dumps(row)}")
    return {"lmbda": lmbda, "quality": q, "active_dims": int(t.active.sum()), "rows": rows}


# ----------------------------------------------------------------------------------------------- main
def bd_table(curves: dict, webp: list) -> dict:
    from vaestream.metrics import bd_rate

    out = {}
    for name, pts in curves.items():
        p = [{"psnr_db": r["psnr_db"], "bits_per_image": r["bits_per_record"]} for r in pts]
        out[name] = {"overlap": bd_rate(p, webp), "range_18_32": bd_rate(p, webp, (18.0, 32.0))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=list(DATASETS), required=True)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[3e3, 5e4, 1e6])
    ap.add_argument("--epochs", type=float, default=4)
    ap.add_argument("--channels", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--latent-channels", type=int, default=8)
    ap.add_argument("--models", nargs="+", default=["a_today", *LEARNED])
    ap.add_argument("--work", type=Path, default=Path("/tmp/spike_runs"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--tiled-n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="TensorFlow intra-/inter-op threads (0: its default)")
    ap.add_argument("--frozen", type=float, nargs="*", default=None,
                    help="instead: the learned entropy models trained on today's models' latents (transform frozen) "
                         "at these codec qualities")
    ap.add_argument("--frozen-steps", type=int, default=1500)
    ap.add_argument("--frozen-lr", type=float, default=5e-3)
    ap.add_argument("--frozen-train-n", type=int, default=20000, help="training records whose latents train them")
    ap.add_argument("--n", type=int, default=10000, help="test records (default: the whole set)")
    args = ap.parse_args(argv)
    tf = _tf()
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    from vaestream.config import latent_grid
    from vaestream.data import load_records

    out_path = args.out or Path(__file__).resolve().parent / "results" / f"spike_entropy_{args.data}.json"
    root = DATASETS[args.data]
    train_x = load_records(str(root), "train")
    test = load_records(str(root), "test")[:args.n]
    report = json.loads(out_path.read_text()) if out_path.is_file() else {
        "benchmark": "spike_entropy_models", "data": args.data, "records": int(len(test)), "rows": {}}
    report.update({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared; trainings under nice 19)",
                   "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "scale_table": {"levels": SCALE_LEVELS, "min": SCALE_MIN, "max": SCALE_MAX, "spacing": "log"},
                   "frame_records": FRAME, "container_bytes": f"{HEADER_BYTES} + {FRAME_BYTES} per frame"})
    h, w = latent_grid(train_x.shape[1:], tuple(args.channels))
    cfg_kw = dict(latent_dim=h * w * args.latent_channels, hidden=(), latent_channels=args.latent_channels,
                  activation="elu", likelihood="gaussian_sigmoid", arch="conv", channels=tuple(args.channels))

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=1, default=float))

    if args.frozen is not None:
        fz = report.setdefault("frozen", {})
        for q in args.frozen:
            for lm in args.lambdas:
                key = f"{lm:g}@q{q:g}"
                if key not in fz:
                    log(f"{args.data} frozen {key} ...")
                    fz[key] = frozen_rows(root, args.work, lm, q, args, train_x, test, log)
                    save()
        curves = {k: [] for k in ("a_today", *LEARNED)}
        for r in fz.values():
            for k, v in r["rows"].items():
                curves[k].append(v)
        report["frozen_bd_rate_vs_webp_tiled"] = bd_table(curves, report["webp_tiled"]) if "webp_tiled" in report \
            else None
        save()
        print(json.dumps(report["frozen"], indent=1))
        return 0
    for lm in args.lambdas:
        for kind in args.models:
            key = f"{kind}@{lm:g}"
            if key in report["rows"]:
                continue
            log(f"{args.data} {key} ...")
            if kind == "a_today":
                report["rows"][key] = {"model": kind, "lmbda": lm, **today(root, args.work, lm, args, test)[0]}
            else:
                m, tr = train_learned(kind, train_x, cfg_kw, lm, args.epochs, args.seed, log)
                report["rows"][key] = {"model": kind, "lmbda": lm, "training": tr,
                                       **evaluate_learned(m, test, train_x)}
            log(json.dumps(report["rows"][key])[:600])
            save()
    if "webp_tiled" not in report:
        from vaestream.evaluation import peers

        report["webp_tiled"] = peers.lossy_curve(test[:args.tiled_n], "WEBP", tiled=True)
        save()
    curves = {}
    for kind in args.models:
        rows = [r for k, r in report["rows"].items() if r["model"] == kind]
        if kind == "a_today":
            curves["a_today_quality1"] = [p for r in rows for p in r["points"] if abs(p["quality"] - 1) < 1e-9]
            curves["a_today_ladder"] = [p for r in rows for p in r["points"]]
        else:
            curves[kind] = rows
    report["bd_rate_vs_webp_tiled"] = bd_table(curves, report["webp_tiled"])
    save()
    print(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
