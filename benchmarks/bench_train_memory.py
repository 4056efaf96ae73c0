"""Peak memory of training vs. data set size: training streams minibatches from a memory-mapped .npy, so the
process's own (anonymous) memory stays flat as the data set grows 20x.

For each size, a fresh process trains a 784-500-20 VAE for a fixed number of steps on MNIST tiled to N records
(uint8 .npy on disk), sampling its RssAnon (memory the process owns; file pages of the mapped data are page
cache, shared and reclaimable) every 10 ms. Prints JSON.

    python benchmarks/bench_train_memory.py --mnist ../shared/data/mnist --sizes 60000 600000 1200000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import sys, threading, time, json
peak = {"anon": 0}
def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
def watch():
    while True:
        peak["anon"] = max(peak["anon"], rss_anon()); time.sleep(0.01)
threading.Thread(target=watch, daemon=True).start()
from vaestream import ModelConfig, TrainConfig, train
from vaestream.data import make_dataset, read_npy
x = read_npy(sys.argv[1])  # memory-mapped
base = rss_anon()
ds = make_dataset(x, "bernoulli", sys.argv[1])
t0 = time.time()
res = train(ds, sys.argv[2], ModelConfig(latent_dim=20, hidden=(500,)), TrainConfig(steps=int(sys.argv[3])),
            progress=False)
time.sleep(0.05)
print(json.dumps({"records": len(x), "peak_rss_anon_mb": peak["anon"] / 2**20, "after_import_mb": base / 2**20,
                  "examples_per_second": res.examples_per_second}))
"""


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnist", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[60000, 600000, 1200000])
    ap.add_argument("--steps", type=int, default=2000)
    a = ap.parse_args(argv)
    from vaestream.data import load_records

    base = load_records(a.mnist, "train")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.sizes:
            path = Path(tmp) / f"x{n}.npy"
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 28, 28))
            for s in range(0, n, len(base)):
                mm[s:s + len(base)] = base[: min(len(base), n - s)]
            mm.flush()
            del mm
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(Path(tmp) / f"m{n}"), str(a.steps)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["file_mb"] = path.stat().st_size / 2**20
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            path.unlink()
    print(json.dumps({"benchmark": "train_memory",
                      "command": "python benchmarks/bench_train_memory.py "
                                 + " ".join(sys.argv[1:] if argv is None else argv),
                      "date": time.strftime("%Y-%m-%d"), "steps": a.steps, "rows": rows,
                      "peak_ratio_largest_vs_smallest":
                          round(rows[-1]["peak_rss_anon_mb"] / rows[0]["peak_rss_anon_mb"], 3)},
                     indent=1))


if __name__ == "__main__":
    main()
