"""Encode / decode speed of a learned-entropy-model (hyperprior) codec, by step, beside tiled WebP in the same run.

For each requested rate level: ``LearnedCodec.compress`` and ``decompress`` of the whole MNIST test set (best of
``--reps``), and the exact float64 networks alone on the same records (analysis, hyper-analysis, hyper-synthesis,
synthesis; microseconds per record), the rest (range coding, container, tables) as the difference. Then Pillow WebP
(quality 50, methods 6 and 4, one tiled picture and per picture) on the same records (``bench_rd.webp_rates``).

    PYTHONPATH=. flock /tmp/bench.lock python benchmarks/bench_hyperprior_speed.py MODEL_DIR [--levels 0 3]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def _best(fn, reps: int):
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def level_speed(c, x: np.ndarray, level: int, reps: int) -> dict:
    """Records/s of compress / decompress at ``level`` and microseconds per record of each exact network."""
    from vaestream.entropy_models.hyperprior import hyper_grid

    n, q = len(x), c.qualities[level]
    te, blob = _best(lambda: c.compress(x, quality=q), reps)
    td, xh = _best(lambda: c.decompress(blob), reps)
    images = np.asarray(c.model_inputs(x)[0], np.float64)
    a = c._analysis
    t_an, y = _best(lambda: a.latent(images), 1)
    y = y * c._gain[level]
    t_ha, z = _best(lambda: a.hyper_latent(y), 1)
    grid = y.shape[1:3]
    t_hs, (mu, _) = _best(lambda: c._hs(z, grid), 1)
    y_hat = np.rint(y - mu) + mu
    t_sy, _ = _best(lambda: c._synthesis(y_hat, level, tuple(images.shape[1:3])), 1)
    us = 1e6 / n
    return {"level": level, "bytes": len(blob), "encode_rps": n / te, "decode_rps": n / td,
            "encode_us": te * us, "decode_us": td * us,
            "us_per_record": {"analysis": t_an * us, "hyper_analysis": t_ha * us, "hyper_synthesis": t_hs * us,
                              "synthesis": t_sy * us,
                              "encode_rest": (te - t_an - t_ha - t_hs) * us, "decode_rest": (td - t_hs - t_sy) * us},
            "hyper_grid": [list(g) for g in hyper_grid(*grid)], "decoded_mean": float(np.mean(xh))}


def main(argv=None) -> int:
    import vaestream
    from vaestream.data import load_records
    from vaestream.coding import exact_conv as exact

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_rd import webp_rates

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--levels", type=int, nargs="+", default=[0, 3])
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)
    x = load_records("/work/shared/data/mnist", "test")
    c = vaestream.load(args.model)
    c.compress(x[:64], quality=c.qualities[0])  # warm-up
    out = {"model": args.model, "records": len(x), "load_before": os.getloadavg(),
           "settings": {k: getattr(exact, k, None) for k in ("CHUNK_BYTES", "CHUNK_ROWS", "BLAS_THREADS",
                                                              "RECORDS_PER_PASS")},
           "levels": [level_speed(c, x, lv, args.reps) for lv in args.levels]}
    pics = np.asarray(x)
    pics = (pics * 255 if pics.dtype.kind == "f" and pics.max() <= 1 else pics).astype(np.uint8)
    out["webp"] = webp_rates(pics.reshape(len(pics), 28, 28), reps=1)
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
