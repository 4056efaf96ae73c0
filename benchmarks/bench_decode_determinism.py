"""What batch-invariant decoding costs: codec.decompress with the networks in fixed row blocks
(vaestream.layers.blocked, the codec's behaviour: one BatchMatMul of [nblocks, 64, n] per layer) vs the same
codec with one plain GEMM per batch (the peer: faster in principle, but its float32 output may depend on the
batch), and vs the earlier mechanism (a tf.map_fn loop over the 64-row blocks), side by side in one run,
alternating.

Model: the paper's 784-500-20 Bernoulli MLP (random weights: the cost does not depend on them), coder tables
from 10k real MNIST training records. Streams of 1,000 records (one container), and 1 and 64 records.
Prints one JSON document.

    python benchmarks/bench_decode_determinism.py [--repeat 7] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

MNIST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist"


def rate(fn, seconds: float) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args(argv)

    import tensorflow as tf

    from vaestream import ModelConfig, VAE
    from vaestream.coding import codec
    from vaestream.data import read_idx
    from vaestream.layers import BLOCK_ROWS
    from vaestream.layers import blocked as blocked_fn

    train = read_idx(MNIST / "train-images-idx3-ubyte.gz")
    test = read_idx(MNIST / "t10k-images-idx3-ubyte.gz")
    model = VAE(ModelConfig(latent_dim=20, hidden=(500,)), seed=1)
    tables = codec.build_tables(model, train[:10000])
    blocked = codec.Codec(codec._ModelBackend(model), tables)
    plain = codec.Codec(codec._ModelBackend(model), tables)
    nz = model.config.latent_dim
    plain._backend._dec = tf.function(lambda z: model.decoder_params(z)["x_mean"],
                                      input_signature=[tf.TensorSpec([None, nz], tf.float32)])
    loop = codec.Codec(codec._ModelBackend(model), tables)
    loop._backend._dec = tf.function(lambda z: blocked_fn(model.decoder_params, z)["x_mean"],
                                     input_signature=[tf.TensorSpec([None, nz], tf.float32)])
    out: dict = {"machine": f"{platform.node()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M UTC",
                 time.gmtime()), "model": "784-500-20 bernoulli", "block_rows": BLOCK_ROWS, "sizes": {}}
    for size in (1000, 64, 1):
        blob = blocked.compress(test[:size])
        runs = {"blocked": [], "plain": [], "loop": []}
        for _ in range(args.repeat):
            for name, c in (("blocked", blocked), ("plain", plain), ("loop", loop)):
                runs[name].append(size * rate(lambda: c.decompress(blob), args.seconds))
        med = {k: float(np.median(v)) for k, v in runs.items()}
        out["sizes"][str(size)] = {"records_per_s_blocked": med["blocked"], "records_per_s_plain": med["plain"],
                                   "ratio_blocked_to_plain": med["blocked"] / med["plain"],
                                   "cost_percent": 100 * (1 - med["blocked"] / med["plain"]),
                                   "records_per_s_map_fn_loop": med["loop"],
                                   "ratio_map_fn_loop_to_plain": med["loop"] / med["plain"]}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
