"""Training throughput (examples/s) of a 784-500-20 Bernoulli VAE, M = 100, L = 1, side by side with
(a) a plain Keras 3 ``model.fit`` VAE of the same shapes, written here, and (b) the machine's limit for these
shapes: a bare XLA loop of the same forward + backward matmuls (no activations, sampling or optimizer), each
step on its own minibatch so that XLA cannot hoist the first layer's matmul out of the loop.

Rounds alternate between the runners (A B C A B C ...) so that load from other processes hits them alike; the
figure for each is its median round. On a loaded machine, ``--threads 1 --clock cpu`` gives steadier ratios
(CPU seconds per example, single-threaded). ``--ablation`` adds two runners: vaestream's step with the ELBO terms
through the TFP distribution objects (``Trainer.closed_form = False``, the step before the closed forms) and the
earlier limit loop, whose minibatch was loop-invariant (XLA hoisted x @ W1 out of it, so it ran 4 of the 5 big
matmuls per step). Prints JSON. The default (5 rounds of 1000 steps) takes about 2-4 minutes.

    python benchmarks/bench_train_throughput.py --mnist ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from vaestream import ModelConfig, TrainConfig, Trainer, VAE
from vaestream.data import load_records

D, H, NZ, M = 784, 500, 20, 100


def vaestream_runner(x_u8: np.ndarray, steps: int, jit: bool = True, k: int = 50, closed_form: bool = True):
    model = VAE(ModelConfig(latent_dim=NZ, hidden=(H,)), seed=0)
    trainer = Trainer(model, TrainConfig(steps_per_call=k, jit=jit), n_train=len(x_u8))
    trainer.closed_form = closed_form
    n_chunks = steps // k
    chunks = [x_u8[(i * k * M) % (len(x_u8) - k * M):][: k * M].reshape(k, M, D) for i in range(n_chunks)]
    trainer.run_steps(chunks[0], 1 / 255)  # compile

    def run():
        for c in chunks:
            trainer.run_steps(c, 1 / 255)
        return n_chunks * k * M

    return run


class KerasVAE(keras.Model):
    """The Keras 3 VAE example's structure: encoder/decoder models and a custom train_step."""

    def __init__(self):
        super().__init__()
        inp = keras.Input((D,))
        h = keras.layers.Dense(H, activation="tanh")(inp)
        self.encoder = keras.Model(inp, [keras.layers.Dense(NZ)(h), keras.layers.Dense(NZ)(h)])
        zin = keras.Input((NZ,))
        h2 = keras.layers.Dense(H, activation="tanh")(zin)
        self.decoder = keras.Model(zin, keras.layers.Dense(D)(h2))
        self.seed = keras.random.SeedGenerator(0)

    def train_step(self, x):
        with tf.GradientTape() as tape:
            mean, log_scale = self.encoder(x)
            z = mean + tf.exp(log_scale) * keras.random.normal(tf.shape(mean), seed=self.seed)
            logits = self.decoder(z)
            rec = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=x, logits=logits), axis=-1)
            kl = 0.5 * tf.reduce_sum(mean ** 2 + tf.exp(2 * log_scale) - 1 - 2 * log_scale, axis=-1)
            loss = tf.reduce_mean(rec + kl)
        grads = tape.gradient(loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        return {"loss": loss}


def keras_runner(x_f32: np.ndarray, steps: int):
    model = KerasVAE()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    n = steps * M
    data = x_f32[:n] if len(x_f32) >= n else np.concatenate([x_f32] * (n // len(x_f32) + 1))[:n]
    model.fit(data[: 10 * M], batch_size=M, epochs=1, verbose=0, shuffle=False)  # build + trace

    def run():
        model.fit(data, batch_size=M, epochs=1, verbose=0, shuffle=False)
        return n

    return run


def gemm_runner(steps: int, k: int = 50, hoisted: bool = False):
    """The same matmuls as one training step (forward, and backward for weights and inputs), nothing else.

    Each step multiplies its own minibatch (``xs[i]`` of a ``[k, M, D]`` chunk, as the trainer does) by weights
    held in variables. ``hoisted=True`` is the earlier loop, one constant minibatch and constant weights: XLA
    moves the loop-invariant x @ W1 (and h1 @ W2) out of the loop, so it is not the limit of a training step.
    """
    rng = np.random.default_rng(0)
    shapes = [(D, H), (H, 2 * NZ), (NZ, H), (H, D)]
    if hoisted:
        w = [tf.constant(rng.normal(0, 0.01, s).astype(np.float32)) for s in shapes]
        xs = tf.constant(rng.random((1, M, D)).astype(np.float32))
    else:
        w = [tf.Variable(rng.normal(0, 0.01, s).astype(np.float32)) for s in shapes]
        xs = tf.constant(rng.random((k, M, D)).astype(np.float32))

    @tf.function(jit_compile=True)
    def chunk(xs):
        def body(i, acc):
            x = xs[0] if hoisted else xs[i]
            h1 = x @ w[0]
            e = h1 @ w[1]
            z = e[:, :NZ] + acc
            h2 = z @ w[2]
            out = h2 @ w[3]
            # backward: dW = a^T g, dA = g W^T, for each layer (no dA for the input layer)
            g3 = out
            dw3 = tf.matmul(h2, g3, transpose_a=True)
            g2 = tf.matmul(g3, w[3], transpose_b=True)
            dw2 = tf.matmul(z, g2, transpose_a=True)
            gz = tf.matmul(g2, w[2], transpose_b=True)
            ge = tf.concat([gz, gz], axis=1)
            dw1 = tf.matmul(h1, ge, transpose_a=True)
            g1 = tf.matmul(ge, w[1], transpose_b=True)
            dw0 = tf.matmul(x, g1, transpose_a=True)
            s = (tf.reduce_mean(dw0) + tf.reduce_mean(dw1) + tf.reduce_mean(dw2) + tf.reduce_mean(dw3)) * 1e-30
            return i + 1, acc + s
        return tf.while_loop(lambda i, a: i < k, body, (tf.constant(0), tf.constant(0.0)))[1]

    chunk(xs)
    n_chunks = steps // k

    def run():
        for _ in range(n_chunks):
            chunk(xs).numpy()
        return n_chunks * k * M

    return run


def flops_per_example() -> float:
    fwd = D * H + H * 2 * NZ + NZ * H + H * D  # multiply-adds per example
    return 2 * 3 * fwd - 2 * D * H  # forward + 2x backward (no input gradient for the first layer), 2 FLOP/MAC


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnist", required=True)
    ap.add_argument("--steps", type=int, default=1000, help="training steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ablation", action="store_true",
                    help="also time the TFP-objects step and the earlier (hoisted) limit loop")
    ap.add_argument("--threads", type=int, default=0,
                    help="intra- and inter-op threads (0: TensorFlow's default, one per core)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: divide by the process's CPU time instead of wall time; with --threads 1 this "
                         "measures work per example and is robust to other processes' load")
    a = ap.parse_args(argv)
    if a.threads:
        tf.config.threading.set_intra_op_parallelism_threads(a.threads)
        tf.config.threading.set_inter_op_parallelism_threads(a.threads)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    load_before = os.getloadavg()
    x_u8 = load_records(a.mnist, "train").reshape(-1, D)
    x_f32 = x_u8.astype(np.float32) / 255
    runners = {"vaestream": vaestream_runner(x_u8, a.steps), "keras_fit": keras_runner(x_f32, a.steps),
               "gemm_limit": gemm_runner(a.steps)}
    if a.ablation:
        runners["vaestream_tfp_terms"] = vaestream_runner(x_u8, a.steps, closed_form=False)
        runners["gemm_limit_hoisted"] = gemm_runner(a.steps, hoisted=True)
    rates = {k: [] for k in runners}
    for _ in range(a.rounds):
        for name, run in runners.items():
            t0 = clock()
            n = run()
            rates[name].append(n / (clock() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = {
        "benchmark": "train_throughput", "shapes": f"{D}-{H}-{NZ}, M={M}, L=1, Bernoulli, Adam",
        "command": "python benchmarks/bench_train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'} intra-op threads",
        "clock": a.clock,
        "load_average_1m": {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)},
        "examples_per_second": {k: round(v) for k, v in med.items()},
        "rounds": {k: [round(r) for r in v] for k, v in rates.items()},
        "ratio_vs_keras_fit": round(med["vaestream"] / med["keras_fit"], 2),
        "fraction_of_limit": round(med["vaestream"] / med["gemm_limit"], 3),
        "limit_gflops": round(med["gemm_limit"] * flops_per_example() / 1e9, 1),
    }
    if a.ablation:
        out["ablation"] = {
            "closed_form_speedup": round(med["vaestream"] / med["vaestream_tfp_terms"], 3),
            "tfp_terms_fraction_of_limit": round(med["vaestream_tfp_terms"] / med["gemm_limit"], 3),
            "hoisted_over_true_limit": round(med["gemm_limit_hoisted"] / med["gemm_limit"], 3),
            "fraction_of_hoisted_limit": round(med["vaestream"] / med["gemm_limit_hoisted"], 3),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
