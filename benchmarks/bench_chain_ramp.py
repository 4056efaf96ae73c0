"""Bits per record of a bits-back member with its pixel context models: the doubling group ramp (ramp 0, how
context frames were coded before `bitsback_coder.chain_ramp`) against `chain_ramp`, on the same records, one frame.

    python benchmarks/bench_chain_ramp.py --model runs/rd7/family-fashion-mnist/bitsback --data fashion-mnist

Prints one JSON object: per K, both sizes in bits per record, the ramp chain_ramp chose and the saving."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a bits-back member directory with context models")
    p.add_argument("--data", required=True, help="'fashion-mnist', an MNIST-layout directory or a file")
    p.add_argument("--n", type=int, default=2000, help="the first N test records (default 2000)")
    p.add_argument("--levels", type=int, nargs="+", default=None, help="default: every K with a context model")
    args = p.parse_args(argv)
    from vaestream.coding.bitsback import context as context_mod
    from vaestream.coding.bitsback import coder as bitsback_coder
    from vaestream.coding import family
    from vaestream.coding.bitsback.tables import pixel_levels
    from vaestream.data import load_records
    from vaestream.store import load_model

    model = load_model(args.model)
    contexts = context_mod.load_contexts(args.model)
    x = load_records(args.data, "test")[: args.n]
    chosen = bitsback_coder.chain_ramp
    rows = []
    try:
        for k in args.levels or sorted(contexts):
            row = {"levels": k}
            for name, fn in (("ramp0_bits", lambda *a, **kw: 0), ("chain_ramp_bits", chosen)):
                bitsback_coder.chain_ramp = fn
                coder = family.bitsback_coder(args.model, k, model=model, contexts=contexts)
                row[name] = 8 * len(coder.compress(x)) / len(x)
            c = family.bitsback_coder(args.model, k, model=model, contexts=contexts)
            mean, std = c._posterior(pixel_levels(k)[1][x.reshape(len(x), -1).astype(np.int64)], c.latent_bits)
            row["ramp"] = chosen(mean, std, c.latent_bits, c.range_bits)
            row["saving_pct"] = round(100 * (1 - row["chain_ramp_bits"] / row["ramp0_bits"]), 2)
            rows.append(row)
    finally:
        bitsback_coder.chain_ramp = chosen
    print(json.dumps({"benchmark": "bench_chain_ramp", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores", "args": vars(args),
                      "records": int(len(x)), "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
