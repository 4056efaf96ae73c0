"""How many bits would a context model save on a spatial latent? (issue 17: is a learned entropy model the lever?)

A spatial latent (``ModelConfig(latent_channels=C)``) is coded with one factorised table per position and map.
A hyperprior or an autoregressive context model can only save what the symbols' *dependence* allows. This
benchmark bounds that from the data, without training anything: for a model directory it quantises the posterior
means of 30,000 training records (estimation) and of the test set (evaluation) at a few qualities, and reports
bits per record of the test symbols under

* ``coder_ideal``: the model's own coder tables (-log2 of their integer probabilities; what the coder pays, less
  container overhead);
* ``marginal``: per-dimension empirical tables from the training symbols (add-0.1 smoothing): the best any
  factorised table can do on these symbols;
* ``context_neighbours``: per-dimension tables *conditioned* on the already-decoded causal neighbours in raster
  order: min(|q|, 2) of the left and the upper position in the same map and of the previous map at the same
  position (27 contexts), each context's counts backed off to the dimension's marginal with weight 4;
* ``context_activity``: conditioned on how many of the 4 causal neighbour positions (left, up-left, up, up-right)
  have any nonzero symbol over all maps (0..7+, 8 contexts): the "is this region active" side information a
  hyperprior would send.

Conditional tables estimated from 30k records and scored on held-out records estimate what a context model of
that information could save (a learned one could do better with richer contexts; the count tables are not
penalised for their own size, which flatters them). Prints JSON:

    python benchmarks/bench_context_entropy.py MODEL_DIR DATA_DIR [--qualities 1 2 4] [--train-n 30000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

BACKOFF = 4.0


def conditional_bits(train_s: np.ndarray, test_s: np.ndarray, ctx_train: np.ndarray | None,
                     ctx_test: np.ndarray | None, n_ctx: int) -> float:
    """Mean bits per test record of ``test_s [N, Nz]`` under per-dimension count tables from ``train_s``,
    conditioned on the integer contexts ``ctx_* [N, Nz]`` in [0, n_ctx) (None: unconditioned)."""
    total = 0.0
    for d in range(train_s.shape[1]):
        a, b = train_s[:, d], test_s[:, d]
        lo = min(a.min(), b.min())
        k = int(max(a.max(), b.max()) - lo + 1)
        ca = np.zeros(len(a), np.int64) if ctx_train is None else ctx_train[:, d]
        cb = np.zeros(len(b), np.int64) if ctx_test is None else ctx_test[:, d]
        counts = np.zeros((n_ctx, k))
        np.add.at(counts, (ca, a - lo), 1.0)
        marginal = counts.sum(0) + 0.1
        marginal /= marginal.sum()
        p = (counts + BACKOFF * marginal) / (counts.sum(1, keepdims=True) + BACKOFF)
        total += float(-np.log2(p[cb, b - lo]).sum())
    return total / len(test_s)


def neighbour_context(s: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, int]:
    h, w, c = shape
    m = np.minimum(np.abs(s), 2).reshape(-1, h, w, c)
    left = np.zeros_like(m)
    left[:, :, 1:] = m[:, :, :-1]
    up = np.zeros_like(m)
    up[:, 1:] = m[:, :-1]
    prev = np.zeros_like(m)
    prev[..., 1:] = m[..., :-1]
    return (9 * left + 3 * up + prev).reshape(len(s), -1), 27


def activity_context(s: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, int]:
    h, w, c = shape
    m = (s != 0).reshape(-1, h, w, c).any(-1).astype(np.int64)
    a = np.zeros_like(m)
    a[:, :, 1:] += m[:, :, :-1]
    a[:, 1:] += m[:, :-1]
    a[:, 1:, 1:] += m[:, :-1, :-1]
    a[:, 1:, :-1] += m[:, :-1, 1:]
    return np.repeat(np.minimum(a, 7)[..., None], c, -1).reshape(len(s), -1), 8


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_dir")
    p.add_argument("data_dir", help="an MNIST-layout directory (IDX train and test files)")
    p.add_argument("--qualities", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--train-n", type=int, default=30000)
    p.add_argument("--test-n", type=int, default=10000)
    args = p.parse_args(argv)
    from vaestream.coding import codec
    from vaestream.data import load_records

    c = codec.load(args.model_dir)
    shape = c.config.latent_shape
    if shape is None:
        raise SystemExit(f"{args.model_dir}: not a spatial-latent model (latent_channels 0)")
    train = load_records(args.data_dir, "train")[: args.train_n]
    test = load_records(args.data_dir, "test")[: args.test_n]
    rows = []
    for q in args.qualities:
        t0 = time.perf_counter()
        a, b = c.encode(train, quality=q), c.encode(test, quality=q)
        marginal = conditional_bits(a, b, None, None, 1)
        row = {"quality": q, "coder_ideal": float(c.ideal_bits(b, quality=q).mean()), "marginal": marginal}
        for name, fn in (("context_neighbours", neighbour_context), ("context_activity", activity_context)):
            ca, n = fn(a, shape)
            cb, _ = fn(b, shape)
            row[name] = conditional_bits(a, b, ca, cb, n)
            row[name + "_vs_marginal"] = row[name] / marginal
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
    print(json.dumps({"benchmark": "bench_context_entropy", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores", "model": args.model_dir,
                      "latent_shape": shape, "lmbda": c.config.lmbda, "train_n": len(train), "test_n": len(test),
                      "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
