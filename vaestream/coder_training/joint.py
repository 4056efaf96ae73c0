"""Joint fine-tuning of a bits-back member with its pixel context model.

A context model (:mod:`vaestream.coding.bitsback.context`) is trained against a *frozen* member, and that member was
trained for pixels independent given z. Its z therefore still carries what the context now predicts anyway:
the course of an edge, the texture next to a known pixel. With bits-back coding the code length of a level image
``l`` (K levels, one image of ``H x W`` pixels) is, in expectation over the z the chain pops,

    L(l) = KL( q(z | l) || N(0, I) )  +  E_{z ~ q(z | l)} [ -sum_p log2 P(l_p | z, l_<p) ]       bits

(``rate`` of the latent plus the pixels' code; the coder pays it to within the latent grid's small overhead).
:func:`train_joint` minimises the mean of ``L`` over training images with respect to the encoder, the decoder
*and* the context network together, starting from the trained member and its context model: PixelVAE
(Gulrajani et al., 2017) fine-tuning for one K. The z learns to leave to the context what the context does
better, and pays less KL for it. Fashion-MNIST, K = 3, 20,000 images, 3 epochs: KL 86 -> 36 bits, pixels
205 -> 218 bits per held-out image; the coder's real bits on the whole test set 295 -> 253 at the same PSNR
(benchmarks/RESULTS_coder.md: 4-14 % fewer bits for K = 3-8).

In training, ``P_base(level | z)`` is the beta-binomial's mass over the level's counts computed in float64 from
the decoder's (alpha, beta), clipped to the coder's grid (:data:`vaestream.coding.bitsback.tables.GRID_U` and
``GRID_V``); the coder itself reads the nearest grid cell's table (its base rows differ from training's by the
grid's step) and the context features in fixed point, exactly as for a context model trained by
:func:`vaestream.coder_training.context.train_context`. The result is a new member: a model (its own fingerprint)
and a context model for it; streams of the source member are not decodable by it, nor the other way round.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from vaestream.coder_training.context import (adam_step, check_schedule, context_code_bits, level_images, run_epochs,
                                              tf_layers)
from vaestream.coding.bitsback.context import ContextModel
from vaestream.coding.bitsback.tables import GRID_U, GRID_V, level_spans, pixel_levels
from vaestream.config import DISCRETE_LEVELS
from vaestream.errors import ConfigError, ModelError


def level_log_probs(log_alpha, log_beta, levels: int):
    """The base model's rows in TensorFlow, differentiable: the decoder's ``log alpha``, ``log beta``
    (``[..., D]``) -> ``(log P_base(k | z)`` in nats, floored at ``2^-30``, float32 ``[..., D, K]``; the expected
    level ``sum_k k P_base(k | z)``, float32 ``[..., D])``.

    ``u = log alpha - log beta`` and ``v = log(alpha + beta)`` are clipped to the coder's grid first; the
    beta-binomial pmf over the 256 counts,

        log P(n) = log C(255, n) + log B(n + alpha, 255 - n + beta) - log B(alpha, beta),

    is summed over each level's counts (:func:`vaestream.coding.bitsback.tables.level_spans`), in float64 (the
    log-gamma terms reach ~10^6 where the concentration is high)."""
    import tensorflow as tf
    from scipy.special import gammaln

    k = int(levels)
    la = tf.cast(log_alpha, tf.float64)
    lb = tf.cast(log_beta, tf.float64)
    u = tf.clip_by_value(la - lb, GRID_U[0], GRID_U[1])
    v = tf.clip_by_value(tf.maximum(la, lb) + tf.math.log1p(tf.exp(-tf.abs(la - lb))), GRID_V[0], GRID_V[1])
    a = tf.exp(v + tf.math.log_sigmoid(u))[..., None]
    b = tf.exp(v + tf.math.log_sigmoid(-u))[..., None]
    top = float(DISCRETE_LEVELS)
    counts = np.arange(DISCRETE_LEVELS + 1, dtype=np.float64)
    n = tf.constant(counts)
    log_c = tf.constant(gammaln(top + 1.0) - gammaln(counts + 1.0) - gammaln(top + 1.0 - counts))
    lgamma = tf.math.lgamma
    log_pmf = log_c + lgamma(n + a) + lgamma(top - n + b) - lgamma(top + a + b) - lgamma(a) - lgamma(b) + lgamma(a + b)
    lo, hi = level_spans(k)
    spans = np.zeros((DISCRETE_LEVELS + 1, k))
    for j in range(k):
        spans[lo[j]:hi[j] + 1, j] = 1.0
    p = tf.matmul(tf.exp(log_pmf), tf.constant(spans))
    logp = tf.math.log(tf.maximum(p, 2.0 ** -30))
    e = tf.reduce_sum(p * tf.range(k, dtype=tf.float64), axis=-1)
    return tf.cast(logp, tf.float32), tf.cast(e, tf.float32)


def _check_member(model, context: ContextModel) -> None:
    """Raise :class:`ConfigError` for a model the context coder cannot take, :class:`ModelError` if ``context``
    was trained for another model."""
    cfg = model.config
    if cfg.likelihood != "beta_binomial" or cfg.arch != "mlp" or cfg.hierarchical or len(cfg.input_shape) != 2:
        raise ConfigError("joint training needs a one-layer beta-binomial MLP of pictures [H, W] (a bits-back "
                          f"member); this model is {cfg.arch} / {cfg.likelihood}, input shape {cfg.input_shape}")
    if context.meta.get("model_fingerprint") not in (None, model.fingerprint()):
        raise ModelError("the context model was trained for another model; fine-tune it with that one")
    if tuple(context.shape) != tuple(cfg.input_shape):
        raise ConfigError(f"context model shape {context.shape} is not the model's input shape {cfg.input_shape}")


def train_joint(model, records: np.ndarray, context: ContextModel, epochs: int = 3, batch_size: int = 64,
                learning_rate: float = 3e-4, seed: int = 0, held_out: np.ndarray | None = None,
                log: Callable[[dict], None] | None = None):
    """Fine-tune the bits-back member ``model`` together with its context model ``context`` (for K =
    ``context.levels``) on ``records`` (8-bit pictures ``[N, H, W]`` or ``[N, D]``), minimising the code length
    ``L(l)`` of the module docstring, bits per record, with Adam (``learning_rate`` decayed 10x over the run;
    one z per record and step, by the reparameterisation trick).

    ``model`` is left as it is: returns ``(member, context model)``, a new :class:`vaestream.model.VAE` of the
    same config and a :class:`ContextModel` for it (without a reconstruction network: train one for the new
    member with :func:`vaestream.coder_training.context.train_reconstruction`, e.g. starting from ``context``'s).
    ``held_out`` records, if given, are measured before training and after each epoch (``z`` drawn as a chain
    would, a fixed seed); ``log`` receives ``{"epoch", "train_bits", "held_out_bits", "held_out_kl_bits",
    "held_out_pixel_bits", "seconds"}`` (epoch 0: before training). Raises :class:`ConfigError` for a model the
    context coder cannot take and :class:`ModelError` if ``context`` was trained for another model."""
    import tensorflow as tf

    from vaestream.model import VAE

    cfg = model.config
    _check_member(model, context)
    check_schedule(epochs, batch_size, learning_rate)
    k, (hh, ww) = context.levels, tuple(cfg.input_shape)
    d = hh * ww
    lv_train = level_images(records, k, d)
    lv_held = level_images(held_out, k, d) if held_out is not None and len(held_out) else None

    member = VAE(cfg)
    for dst, src in zip(member.weights(), model.weights()):
        dst.assign(src)
    sizes = [int(context.layers[0][0].shape[0])] + [int(w.shape[1]) for w, _ in context.layers]
    ws, bs = tf_layers(sizes, seed, context.layers)
    variables = ws + bs + member.weights()
    # the encoder sees a level image as the coder shows it: each level's count, scaled as in training
    inputs = tf.constant((pixel_levels(k)[0].astype(np.float64) / DISCRETE_LEVELS).astype(np.float32))
    noise = tf.random.Generator.from_seed(seed)
    log2 = float(np.log(2.0))

    def code_length(lv, eps):
        """Level images int ``[n, D]``, standard normal ``[n, Nz]`` -> (KL bits ``[n]``, pixel bits ``[n]``)."""
        mean, log_scale = member.encoder_params(tf.gather(inputs, lv))
        kl = member.posterior(mean, log_scale).kl_divergence(member.prior) / log2
        p = member.decoder_params(mean + tf.exp(log_scale) * eps)
        logp, e = level_log_probs(p["log_alpha"], p["log_beta"], k)
        pix = context_code_bits(ws, bs, context.window, tf.reshape(lv, (-1, hh, ww)), logp, tf.reshape(e, (-1, hh, ww)))
        return kl, pix

    def loss(lv):  # one z per record, by the reparameterisation trick
        kl, pix = code_length(lv, noise.normal((tf.shape(lv)[0], cfg.latent_dim)))
        return tf.reduce_mean(kl + pix)

    step = adam_step(loss, variables, learning_rate, max(1, -(-len(lv_train) // int(batch_size))) * int(epochs))
    measure_fn = tf.function(code_length, reduce_retracing=True)

    def measure() -> dict:
        eps = np.random.default_rng(seed + 1).standard_normal((len(lv_held), cfg.latent_dim)).astype(np.float32)
        kl, pix = (np.concatenate(t) for t in zip(*[
            [q.numpy() for q in measure_fn(lv_held[s:s + 250], eps[s:s + 250])] for s in range(0, len(lv_held), 250)]))
        return {"held_out_bits": float(np.mean(kl + pix)), "held_out_kl_bits": float(np.mean(kl)),
                "held_out_pixel_bits": float(np.mean(pix))}

    before = {}
    if lv_held is not None:
        before = measure()
        if log is not None:
            log({"epoch": 0, **before})
    rng = np.random.default_rng(seed)
    t0 = time.time()
    row = run_epochs(int(epochs), len(lv_train), int(batch_size), rng, lambda: None,
                      lambda j, _: step(lv_train[j]), "train_bits", None if lv_held is None else measure, log)
    meta = {"trained_on": int(len(lv_train)), "epochs": int(epochs), "hidden": sizes[1:-1],
            "learning_rate": learning_rate, "seed": seed, "model_fingerprint": member.fingerprint(),
            "joint": {"from_model": model.fingerprint(), "from_context": context.likelihood_digest()[:16],
                      "train_seconds": round(time.time() - t0, 1),
                      **{f"{key}_before": v for key, v in before.items()},
                      **{key: row[key] for key in ("held_out_bits", "held_out_kl_bits", "held_out_pixel_bits")
                         if key in row}}}
    layers = [(w.numpy(), b.numpy()) for w, b in zip(ws, bs)]
    return member, ContextModel(k, tuple(cfg.input_shape), context.window, layers, meta)


JOINT_FILE = "joint.json"
"""What a jointly fine-tuned member records of its making, beside its ``config.json``."""


def save_member(out_dir, member, context: ContextModel, info: dict | None = None):
    """Write a fine-tuned member as a model directory: ``config.json``, a checkpoint under ``ckpt/``, its context
    model (``context/levels-K.npz``) and :data:`JOINT_FILE` (``context.meta["joint"]`` plus ``info``). Refuses
    (:class:`ConfigError`) to write over a model directory. Returns the directory."""
    import json
    from pathlib import Path

    import tensorflow as tf

    from vaestream.store import CKPT, CONFIG, save_config

    out = Path(out_dir)
    if (out / CONFIG).exists():
        raise ConfigError(f"{out}: already a model directory; choose a new --out")
    save_config(out, member.config)
    tf.train.CheckpointManager(tf.train.Checkpoint(model=member), str(out / CKPT), max_to_keep=1).save()
    context.save(out)
    (out / JOINT_FILE).write_text(json.dumps({"levels": context.levels, **context.meta.get("joint", {}),
                                              **(info or {})}, indent=2, sort_keys=True) + "\n")
    return out
