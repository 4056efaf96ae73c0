"""One stochastic layer against two (Bit-Swap order) in vaestream's bits-back lossless coder, same run, same
training budget: bits/dim on the MNIST test set, each model's -ELBO, and compress/decompress images/s.

Both models: 784-500-500-50 ELU beta-binomial (the headline model of RESULTS_lossless.md), Adam 1e-3 decayed
to 1e-4 over ``--steps`` steps of 100, seed 0; the two-layer one adds z2 of ``--top-latent-dim`` with MLPs of
``--top-hidden`` between z and z2 (``ModelConfig.top_latent_dim``). Models are kept in ``--model-dir``
(``one``, ``two``) and reused when they have reached ``--steps``.

    python benchmarks/bench_lossless_layers.py [--steps 9000] [--n 10000] [--top-latent-dim 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

MNIST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=9000)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--top-latent-dim", type=int, default=20)
    ap.add_argument("--top-hidden", type=int, default=256)
    ap.add_argument("--model-dir", type=Path, default=Path("runs/lossless-layers"))
    a = ap.parse_args(argv)

    from vaestream import ModelConfig, TrainConfig, train
    from vaestream.coding.bitsback.coder import LosslessCoder
    from vaestream.data import load_records, make_dataset

    train_x = make_dataset(load_records(str(MNIST), "train"), "beta_binomial", "mnist-train")
    x = load_records(str(MNIST), "test")[:a.n]
    tcfg = TrainConfig(steps=a.steps, seed=0, eval_every=10 ** 9, learning_rate=1e-3, lr_decay_rate=0.1,
                       lr_decay_steps=a.steps)
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor(),
           "cpus": os.cpu_count(), "n": a.n, "steps": a.steps, "models": {}}
    for name, top in (("one", 0), ("two", a.top_latent_dim)):
        cfg = ModelConfig(latent_dim=50, hidden=(500, 500), activation="elu", likelihood="beta_binomial",
                          top_latent_dim=top, top_hidden=(a.top_hidden,))
        t0 = time.time()
        model = train(train_x, a.model_dir / name, cfg, tcfg, progress=False).model
        trained = time.time() - t0
        coder = LosslessCoder(model)
        coder.compress(x[:16])  # builds the beta-binomial grid once, outside the timings
        t0 = time.perf_counter()
        blob = coder.compress(x)
        tc = time.perf_counter() - t0
        t0 = time.perf_counter()
        y = coder.decompress(blob)
        td = time.perf_counter() - t0
        neg_elbo = float(LosslessCoder(model).bits(x, num_samples=8).sum()) / x.size
        out["models"][name] = {"config": cfg.to_dict(), "train_seconds": round(trained, 1),
                               "bits_per_dim": 8 * len(blob) / x.size, "neg_elbo_bits_per_dim": neg_elbo,
                               "overhead": 8 * len(blob) / x.size / neg_elbo - 1, "exact": bool(np.array_equal(y, x)),
                               "compress_images_per_s": round(a.n / tc, 1),
                               "decompress_images_per_s": round(a.n / td, 1)}
        print(json.dumps({name: out["models"][name]}), file=sys.stderr, flush=True)
    one, two = out["models"]["one"], out["models"]["two"]
    out["two_vs_one"] = {"bits": two["bits_per_dim"] / one["bits_per_dim"],
                         "compress_speed": two["compress_images_per_s"] / one["compress_images_per_s"],
                         "decompress_speed": two["decompress_images_per_s"] / one["decompress_images_per_s"]}
    print(json.dumps(out, indent=2))
    return 0 if one["exact"] and two["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
