"""Training the pixel context models of :mod:`vaestream.coding.bitsback.context` against a frozen bits-back
member: :func:`train_context` (the likelihood network) and :func:`train_reconstruction` (the learned
reconstruction network); ``vaestream train-context`` runs them."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from vaestream.coding.bitsback.context import (DEFAULT_HIDDEN, DEFAULT_RECON_HIDDEN, DEFAULT_RECON_WINDOW,
                                               DEFAULT_WINDOW, FEATURE_BITS, RECON_SCALE, ContextModel, base_terms,
                                               causal_offsets, num_features, recon_features, window_offsets)
from vaestream.coding.bitsback.tables import level_means, level_rows, level_spans, pixel_levels
from vaestream.errors import ConfigError, ModelError


def level_images(x, levels: int, d: int) -> np.ndarray:
    """8-bit pictures ``[N, H, W]`` or ``[N, D]`` -> their level images, int32 ``[N, D]``."""
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim not in (2, 3) or int(np.prod(x.shape[1:])) != d:
        raise ConfigError(f"training needs 8-bit pictures (uint8) of {d} pixels, got {x.shape} {x.dtype}")
    return pixel_levels(levels)[1][x.reshape(len(x), -1).astype(np.int64)].astype(np.int32)


def _chain_cells(coder, lv: np.ndarray, rng, sample: bool, chunk: int = 1024):
    """For level images ``lv`` ``[N, D]``, in chunks: ``(chunk's level images, their pixels' grid cells [n * D])``
    at a z drawn from the coder's own discretised posterior Q(z | level image) (the z a bits-back chain pops;
    its mean if not ``sample``)."""
    for s in range(0, len(lv), chunk):
        b = lv[s:s + chunk]
        mean, std = coder._posterior(b)
        z = mean + std * rng.standard_normal(mean.shape) if sample else mean
        yield b, coder._likelihood(np.rint(z).astype(np.int64))


def tf_layers(sizes, seed: int, init=None):
    """TensorFlow variables of an MLP with layer ``sizes``: (weights, biases); the weights scaled normal (the
    last layer's zero, so training starts from the base model), the biases zero. ``init``, a network's
    ``[(W, b), ...]`` of these sizes, starts them there instead."""
    import tensorflow as tf

    if init is not None:
        got = [int(init[0][0].shape[0])] + [int(w.shape[1]) for w, _ in init]
        if got != [int(v) for v in sizes]:
            raise ConfigError(f"cannot start a network of layer sizes {list(sizes)} from one of {got}")
        return ([tf.Variable(np.asarray(w, np.float32)) for w, _ in init],
                [tf.Variable(np.asarray(b, np.float32)) for _, b in init])
    g = tf.random.Generator.from_seed(seed)
    ws, bs = [], []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        ws.append(tf.Variable(tf.zeros((a, b)) if last else g.normal((a, b)) * np.sqrt(1.0 / a)))
        bs.append(tf.Variable(tf.zeros(b)))
    return ws, bs


def context_code_bits(ws, bs, window: int, lv, logp, e):
    """The context network in TensorFlow, as trained: level images ``lv`` int ``[n, H, W]``, the base model's
    ``log P_base`` (nats, float32 ``[n, H W, K]``) and expected levels (float32 ``[n, H, W]``) -> each record's
    pixel code length ``-sum_p log2 P(l_p | z, l_<p)``, bits ``[n]``. The first layer runs as convolutions (a
    masked one over the one-hot levels, a full one over the expected levels) whose kernels are the rows of the
    weight matrix the coder reads (:meth:`ContextModel.features` gives the layout)."""
    import tensorflow as tf

    k = int(logp.shape[-1])
    c = window // 2
    offsets, full = causal_offsets(window), window_offsets(window)
    nc = len(offsets) * k
    w1 = ws[0]
    h1 = int(w1.shape[1])
    kc = tf.scatter_nd([[dy + c, dx + c] for dy, dx in offsets], tf.reshape(w1[:nc], (len(offsets), k, h1)),
                       (window, window, k, h1))
    kf = tf.scatter_nd([[dy + c, dx + c] for dy, dx in full], tf.reshape(w1[nc:nc + window ** 2],
                                                                          (window ** 2, 1, h1)),
                       (window, window, 1, h1))
    d = int(logp.shape[1])
    x = tf.nn.conv2d(tf.one_hot(lv, k), kc, 1, "SAME") + tf.nn.conv2d(e[..., None], kf, 1, "SAME")
    x = tf.reshape(x, (-1, d, h1)) + tf.matmul(logp, w1[nc + window ** 2:]) + bs[0]
    for w, b in zip(ws[1:], bs[1:]):
        x = tf.matmul(tf.nn.elu(x), w) + b
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.reshape(lv, (-1, d)), logp + x)
    return tf.reduce_sum(ce, axis=1) / np.log(2.0)


def recon_estimate(ws, bs, window: int, levels: int, lv, m):
    """The reconstruction network in TensorFlow, as trained: level images ``lv`` int ``[n, H, W]`` and the base
    means ``m`` (counts, float32 ``[n, H, W]``) -> the unclipped estimate ``m + RECON_SCALE r``, counts
    ``[n, H, W]``. The first layer runs as two convolutions whose kernels are the rows of the weight matrix the
    decoder reads (one-hot levels, then the means in fixed point; the layout of :func:`recon_features`)."""
    import tensorflow as tf

    k, h1 = int(levels), int(ws[0].shape[1])
    n_look = window ** 2 * k
    scale = float(2.0 ** -FEATURE_BITS)
    kl = tf.reshape(ws[0][:n_look], (window, window, k, h1))
    km = tf.reshape(ws[0][n_look:], (window, window, 1, h1))
    x = tf.nn.conv2d(tf.one_hot(lv, k), kl, 1, "SAME") + tf.nn.conv2d(m[..., None] * scale, km, 1, "SAME")
    x = x + bs[0]
    for w, b in zip(ws[1:], bs[1:]):
        x = tf.tensordot(tf.nn.elu(x), w, 1) + b
    return m + RECON_SCALE * x[..., 0]


def run_epochs(epochs: int, n: int, batch_size: int, rng, draw, batch_step, loss_key: str, measure, log) -> dict:
    """The training loop of both networks: each epoch ``draw()``s the z-dependent inputs afresh, then runs
    ``batch_step(indices, drawn)`` (the batch's mean loss) over a random permutation of the ``n`` records; logs
    ``{"epoch", loss_key, "seconds", **measure()}``. Returns the last epoch's row."""
    row = {}
    for epoch in range(epochs):
        t0 = time.time()
        drawn = draw()
        order = rng.permutation(n)
        total = 0.0
        for s in range(0, n, batch_size):
            j = order[s:s + batch_size]
            total += float(batch_step(j, drawn)) * len(j)
        row = {"epoch": epoch + 1, loss_key: total / n, "seconds": round(time.time() - t0, 1)}
        if measure is not None:
            row.update(measure())
        if log is not None:
            log(row)
    return row


def check_schedule(epochs: int, batch_size: int, learning_rate: float) -> None:
    """Raise :class:`ConfigError` unless ``epochs``, ``batch_size`` and ``learning_rate`` are positive."""
    if int(epochs) < 1 or int(batch_size) < 1 or not learning_rate > 0:
        raise ConfigError(f"epochs, batch_size and learning_rate must be positive, got {epochs}, {batch_size}, "
                          f"{learning_rate}")


def adam_step(loss: Callable, variables: list, learning_rate: float, steps: int) -> Callable:
    """The compiled training step of the coder's trainers: ``step(*batch)`` takes one Adam step on ``variables``
    down ``loss(*batch)`` (a scalar tensor) and returns the loss; the step size ``learning_rate`` decays 10x
    over ``steps`` steps."""
    import tensorflow as tf

    opt = tf.keras.optimizers.Adam(tf.keras.optimizers.schedules.ExponentialDecay(learning_rate, steps, 0.1))

    @tf.function(reduce_retracing=True)
    def step(*batch):
        with tf.GradientTape() as tape:
            value = loss(*batch)
        opt.apply_gradients(zip(tape.gradient(value, variables), variables))
        return value
    return step


def train_context(model, records: np.ndarray, levels: int, window: int = DEFAULT_WINDOW,
                  hidden: tuple[int, ...] = DEFAULT_HIDDEN, epochs: int = 6, batch_size: int = 64,
                  learning_rate: float = 2e-3, seed: int = 0, held_out: np.ndarray | None = None,
                  log: Callable[[dict], None] | None = None) -> ContextModel:
    """Fit a :class:`ContextModel` for K = ``levels`` to the bits-back model ``model`` (frozen) on ``records``
    (8-bit pictures ``[N, H, W]`` or ``[N, D]``).

    Each epoch draws a fresh z per record from the coder's own discretised posterior Q(z | level image)
    (the z a bits-back chain would pop), computes the base rows P_base(l | z) exactly as the coder does, and
    minimises the pixels' code length ``-sum_p log2 P(l_p | z, l_<p)`` (bits per record) with Adam (step size
    ``learning_rate``, decayed 10x over the run). In training the first layer runs as convolutions (a masked
    one over the one-hot levels, a full one over the expected levels) whose kernels are the rows of the same
    weight matrix the coder reads (:meth:`ContextModel.features` gives the layout). The last layer starts at
    zero, so training starts from the base model's own code. ``held_out`` records, if given, are measured
    after each epoch; ``log`` receives ``{"epoch", "train_bits", "held_out_bits", "base_bits", "seconds"}``."""
    import tensorflow as tf

    from vaestream.coding.bitsback.coder import LosslessCoder

    cfg = model.config
    if len(cfg.input_shape) != 2:
        raise ConfigError(f"a context model needs pictures [H, W]; this model's input shape is {cfg.input_shape}")
    check_schedule(epochs, batch_size, learning_rate)
    coder = LosslessCoder(model, levels=levels)
    k, (hh, ww) = int(levels), cfg.input_shape
    d = hh * ww
    lv_train = level_images(records, k, d)
    lv_held = level_images(held_out, k, d) if held_out is not None and len(held_out) else None
    rng = np.random.default_rng(seed)

    def base(lv, sample: bool):
        """(logp int [N, D, K], e int [N, H, W], the rows' own code length in bits per record)."""
        logps, es, bits = [], [], 0.0
        for b, cells in _chain_cells(coder, lv, rng, sample):
            rows = level_rows(cells, k)
            bits += float(-np.sum(np.log2(np.maximum(rows[np.arange(rows.shape[0]), b.reshape(-1)], 2.0 ** -30))))
            lp, e = base_terms(rows, k)
            logps.append(lp.reshape(len(b), d, k).astype(np.float32))
            es.append(e.reshape(len(b), hh, ww).astype(np.float32))
        return np.concatenate(logps), np.concatenate(es), bits / len(lv)

    ws, bs = tf_layers([num_features(window, k), *hidden, k], seed)
    variables = ws + bs
    scale = float(2.0 ** -FEATURE_BITS)

    def code_bits(lv, logp, e):  # the pixels' code length of a batch, bits (summed)
        return tf.reduce_sum(context_code_bits(ws, bs, window, lv, logp * scale, e * scale))

    step = adam_step(lambda lv, logp, e: code_bits(lv, logp, e) / tf.cast(tf.shape(lv)[0], tf.float32), variables,
                     learning_rate, max(1, -(-len(lv_train) // batch_size)) * int(epochs))
    measure_fn = tf.function(code_bits, reduce_retracing=True)

    def measure(lv):
        logp, e, base_bits = base(lv, False)
        tot = sum(float(measure_fn(lv[s:s + 500].reshape(-1, hh, ww), logp[s:s + 500], e[s:s + 500]))
                  for s in range(0, len(lv), 500))
        return tot / len(lv), base_bits

    def batch_step(j, drawn):
        logp, e, _ = drawn
        return step(lv_train[j].reshape(-1, hh, ww), logp[j], e[j])

    row = run_epochs(int(epochs), len(lv_train), batch_size, rng, lambda: base(lv_train, True), batch_step,
                      "train_bits", None if lv_held is None else
                      lambda: dict(zip(("held_out_bits", "base_bits"), measure(lv_held))), log)
    layers = [(w.numpy(), b.numpy()) for w, b in zip(ws, bs)]
    meta = {"trained_on": int(len(lv_train)), "epochs": int(epochs), "hidden": list(hidden),
            "learning_rate": learning_rate, "seed": seed, "model_fingerprint": model.fingerprint(),
            **{k2: row[k2] for k2 in ("held_out_bits", "base_bits") if k2 in row}}
    return ContextModel(k, cfg.input_shape, window, layers, meta)


def train_reconstruction(model, records: np.ndarray, context: ContextModel, window: int = DEFAULT_RECON_WINDOW,
                         hidden: tuple[int, ...] = DEFAULT_RECON_HIDDEN, epochs: int = 4, batch_size: int = 64,
                         learning_rate: float = 1e-3, seed: int = 0, held_out: np.ndarray | None = None,
                         log: Callable[[dict], None] | None = None, init: ContextModel | None = None) -> ContextModel:
    """Fit the reconstruction network of ``context`` (a :class:`ContextModel` of the bits-back model ``model``,
    frozen) on ``records`` (8-bit pictures): returns ``context`` with it (:meth:`ContextModel.with_reconstruction`).
    ``init``, a context model with a reconstruction network of this window and these layer sizes (e.g. that of
    the model ``model`` was fine-tuned from, :mod:`vaestream.coder_training.joint`), starts training from its network.

    Each epoch draws a fresh z per record from the coder's discretised posterior Q(z | level image) (the z a
    chain pops), computes the base means m = E[n | level, z] exactly as the decoder does, and minimises the
    squared error in counts of ``m + RECON_SCALE r(window of levels and m)`` (Adam, ``learning_rate`` decayed 10x
    over the run). In training the first layer runs as two convolutions whose kernels are the rows of the weight
    matrix the decoder reads (one-hot levels, then the means; the layout of :func:`recon_features`). The last
    layer starts at zero, so training starts from ``reconstruction="mean"``. ``held_out`` records, if given, are
    measured after each epoch; ``log`` receives ``{"epoch", "train_mse", "held_out_psnr_db", "mean_psnr_db",
    "seconds"}`` (MSE in counts^2; PSNR of the clipped, rounded output, over all pixels, peak 255)."""
    import tensorflow as tf

    from vaestream.coding.bitsback.coder import LosslessCoder

    cfg = model.config
    if context.meta.get("model_fingerprint") not in (None, model.fingerprint()):
        raise ModelError("the context model was trained for another model; train its reconstruction with that one")
    if int(window) < 1 or int(window) % 2 == 0:
        raise ConfigError(f"reconstruction window must be odd and positive, got {window}")
    check_schedule(epochs, batch_size, learning_rate)
    coder = LosslessCoder(model, levels=context.levels)
    k, (hh, ww) = context.levels, tuple(cfg.input_shape)
    if (hh, ww) != tuple(context.shape):
        raise ConfigError(f"context model shape {context.shape} is not the model's input shape {cfg.input_shape}")
    d = hh * ww
    lv_train = level_images(records, k, d)
    x_train = np.asarray(records).reshape(len(lv_train), hh, ww).astype(np.float32)
    lv_held = level_images(held_out, k, d) if held_out is not None and len(held_out) else None
    rng = np.random.default_rng(seed)
    lo, hi = level_spans(k)

    def means(lv, sample: bool) -> np.ndarray:
        return np.concatenate([level_means(cells, b.reshape(-1), k).reshape(len(b), hh, ww)
                               for b, cells in _chain_cells(coder, lv, rng, sample)]).astype(np.float32)

    window = int(window)
    if init is not None and (not init.has_reconstruction or init.recon_window != window or init.levels != k):
        raise ConfigError(f"init: a reconstruction network for K = {k} with a {window} x {window} window is needed")
    ws, bs = tf_layers([recon_features(window, k), *hidden, 1], seed, None if init is None else init.recon)

    def estimate(lv, m):  # [n, H, W] each -> the unclipped estimate, counts
        return recon_estimate(ws, bs, window, k, lv, m)

    step = adam_step(lambda lv, m, x: tf.reduce_mean(tf.square(estimate(lv, m) - x)), ws + bs, learning_rate,
                     max(1, -(-len(lv_train) // batch_size)) * int(epochs))
    estimate_fn = tf.function(estimate, reduce_retracing=True)

    def measure(lv):
        m = means(lv, True)
        x = np.asarray(held_out).reshape(len(lv), hh, ww).astype(np.float64)
        lvi = lv.reshape(-1, hh, ww)
        est = np.concatenate([estimate_fn(lvi[s:s + 500], m[s:s + 500]).numpy() for s in range(0, len(lv), 500)])
        est = np.clip(np.rint(est), lo[lvi], hi[lvi])

        def psnr(y):
            return float(10 * np.log10(255.0 ** 2 / np.mean((y - x) ** 2)))
        return psnr(est), psnr(m)

    def batch_step(j, m):
        return step(lv_train[j].reshape(-1, hh, ww), m[j], x_train[j])

    row = run_epochs(int(epochs), len(lv_train), batch_size, rng, lambda: means(lv_train, True), batch_step,
                      "train_mse", None if lv_held is None else
                      lambda: dict(zip(("held_out_psnr_db", "mean_psnr_db"), measure(lv_held))), log)
    recon = [(w.numpy(), b.numpy()) for w, b in zip(ws, bs)]
    meta = {"trained_on": int(len(lv_train)), "epochs": int(epochs), "hidden": list(hidden), "seed": seed,
            "learning_rate": learning_rate, **({} if init is None else {"init": init.digest()[:16]}),
            **{k2: row[k2] for k2 in ("held_out_psnr_db", "mean_psnr_db") if k2 in row}}
    return context.with_reconstruction(recon, window, meta)
