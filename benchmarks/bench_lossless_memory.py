"""Peak memory of lossless compress and streaming decode against the number of records (issue 16, "peak memory
flat").

    python benchmarks/bench_lossless_memory.py --model runs/lossless-2layer/mnist --sizes 1000 4096 10000 20000 40000

For each size, records from the MNIST training set (the first ``size``; repeated past 60,000) are compressed
with :class:`vaestream.coding.bitsback.coder.LosslessCoder` and the stream is decoded frame by frame
(``iter_decompress``), as in ``bench_lossless.py``'s ``scaling`` (:func:`bench_lossless.scaling_row`): ms per image
from untraced passes, then the tracemalloc peak of each call (NumPy's allocations; the input array itself is
allocated before tracing starts, so it is not counted). Run it on an idle machine if the times matter. Prints
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import datetime, timezone

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a beta-binomial model directory")
    p.add_argument("--data", default="../shared/data/mnist")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4096, 10000, 20000, 40000])
    a = p.parse_args(argv)

    from bench_lossless import scaling_row  # the same measurement as bench_lossless.py's "scaling"
    from vaestream.coding.bitsback.coder import LosslessCoder
    from vaestream.data import load_records
    from vaestream.store import load_model

    pool = load_records(a.data, "train")
    coder = LosslessCoder(load_model(a.model))
    coder.compress(pool[:8])  # warm up (grid, constriction models) outside the measurement
    rows = {}
    for n in a.sizes:
        x = np.ascontiguousarray(np.resize(pool, (n,) + pool.shape[1:]))
        row = scaling_row(coder, x)
        assert row["records_back"] == n
        rows[str(n)] = {"input_mib": x.nbytes / 2 ** 20, **row}
    out = {"benchmark": "bench_lossless_memory", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "model": a.model,
           "frame_records": coder.frame_records, "sizes": rows}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
