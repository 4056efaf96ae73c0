"""A quick RD sanity point of one variable-rate learned-entropy-model (hyperprior) model: real stream bytes.

For each rate level of the model: ``LearnedCodec.compress`` the whole MNIST test set, decode it, and report bits per
record (container included), the ideal and side-stream bits, PSNR, and encode / decode records per second (one
process, batches of 4,096, frames of 1,024). BD-rates against the tiled-WebP curve and today's 5-epoch RD models
(quality 1) of the spike's run (``results/spike_entropy_mnist.json``, same test set), over each pair's overlap.

    PYTHONPATH=. flock /tmp/bench.lock python benchmarks/bench_hyperprior_sanity.py MODEL_DIR

Prints JSON (one line per level, then the summary) and writes ``results/hyperprior_sanity_mnist.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def main(argv=None) -> int:
    import vaestream
    from vaestream.data import load_records
    from vaestream.metrics import bd_rate

    model = (argv or sys.argv[1:])[0]
    here = Path(__file__).resolve().parent / "results"
    x = load_records("/work/shared/data/mnist", "test")
    c = vaestream.load(model)
    rows = []
    for q in c.qualities:
        t = time.perf_counter()
        blob = c.compress(x, quality=q)
        te = time.perf_counter() - t
        t = time.perf_counter()
        xh = c.decompress(blob)
        td = time.perf_counter() - t
        mse = float(np.mean((x.reshape(len(x), -1) / 255.0 - xh) ** 2))
        ideal, side = c.bits(x, quality=q, side=True)
        rows.append({"lmbda": c.config.rd_lambdas[c.level(q)], "quality": q, "bits_per_record": 8 * len(blob) / len(x),
                     "ideal_bits": float(ideal.mean()), "side_bits": float(side.mean()),
                     "psnr_db": 10 * np.log10(1 / mse), "encode_rps": len(x) / te, "decode_rps": len(x) / td})
        print(json.dumps(rows[-1]), flush=True)
    spike = json.loads((here / "spike_entropy_mnist.json").read_text())
    webp = spike["webp_tiled"]
    pts = [{"psnr_db": r["psnr_db"], "bits_per_image": r["bits_per_record"]} for r in rows]
    today = [{"psnr_db": p["psnr_db"], "bits_per_image": p["bits_per_record"]}
             for r in spike["rows"].values() if r["model"] == "a_today" for p in r["points"]
             if abs(p["quality"] - 1) < 1e-9]
    out = {"model": str(model), "records": int(len(x)), "rows": rows,
           "bd_vs_webp_tiled_overlap": bd_rate(pts, webp), "bd_today_q1_vs_webp": bd_rate(today, webp),
           "bd_vs_today_q1": bd_rate(pts, today), "today_q1": today}
    (here / "hyperprior_sanity_mnist.json").write_text(json.dumps(out, indent=1, default=float))
    print(json.dumps(out, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
