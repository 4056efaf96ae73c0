"""Encode job: FnApiRunner vs Beam's DaskRunner (LocalCluster of 1 and 2 single-threaded worker processes),
at one or more sizes, side by side in one run; every job in a fresh process.

    PYTHONPATH=. python benchmarks/bench_dask.py --records 100000 1000000 --out /tmp/bench_dask > result.json

Input: real MNIST training images as .npy files of 60k records each (the training set repeated under other
names up to ``records``). The model: a 784-200-10 VAE trained for one epoch (or ``--model``). Each job runs in
a fresh Python process (so every runner pays its own TensorFlow import and model load); the cluster is
started in that process before the timed job (its start-up is reported on its own). Per job: ``seconds``
(the job's own timer), ``wall`` (the whole ``encode.run`` call), peak RSS of the job's process and of each
Dask worker process (``ru_maxrss``). With two sizes the per-record cost is the slope between them, the fixed
cost the intercept: ``(wall_big - wall_small) / (n_big - n_small)``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _inputs(out: Path, mnist: Path, records: int) -> list[str]:
    from vaestream.data import read_idx

    x = read_idx(mnist / "train-images-idx3-ubyte.gz")
    files, left, i = [], records, 0
    while left > 0:
        n = min(left, len(x))
        f = out / f"part-{records}-{i:02d}.npy"
        if not f.exists():
            np.save(f, x[:n])
        files.append(str(f))
        left -= n
        i += 1
    return files


def _job(a) -> dict:
    """One encode job in this (fresh) process; prints its row as JSON."""
    from pipelines import encode

    inputs = a.inputs
    extra, cl, c, startup = [], None, None, None
    if a.job != "FnApiRunner":
        from dask.distributed import Client, LocalCluster

        n = int(a.job.split("-")[1].rstrip("w"))
        t0 = time.perf_counter()
        c = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
        cl = Client(c)
        startup = round(time.perf_counter() - t0, 3)
        extra = ["--runner", "DaskRunner", "--dask_client_address", c.scheduler_address]
    t0 = time.perf_counter()
    s = encode.run(["--input", *inputs, "--model", a.model, "--output",
                    str(Path(a.out) / f"enc-{a.job}-{a.records}"), *extra])
    wall = time.perf_counter() - t0
    row = {"runner": a.job, "records": s["records"], "dead_lettered": s.get("dead_lettered"),
           "seconds": s["seconds"], "records_per_second": s["records_per_second"], "wall": round(wall, 3),
           "wall_records_per_second": round(s["records"] / wall, 1),
           "us_per_record_wall": round(1e6 * wall / s["records"], 2), "cluster_startup": startup,
           "peak_rss_mib_job_process": round(_maxrss_mib(), 1)}
    if cl is not None:
        rss = cl.run(_maxrss_mib)
        row["peak_rss_mib_workers"] = [round(v, 1) for v in rss.values()]
        cl.close()
        c.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, nargs="+", default=[100_000])
    ap.add_argument("--out", default="/tmp/bench_dask")
    ap.add_argument("--model", default=None)
    ap.add_argument("--mnist", default=str(ROOT.parent / "shared/data/mnist"))
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: run one job, print its row
    ap.add_argument("--inputs", nargs="+", default=None, help=argparse.SUPPRESS)  # internal: the job's files
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.job:
        a.records = a.records[0]
        print(json.dumps(_job(a)))
        return
    if a.model is None:
        from vaestream import ModelConfig, TrainConfig, train
        from vaestream.data import make_dataset, read_idx

        a.model = str(out / "model")
        if not (Path(a.model) / "config.json").exists():
            x = read_idx(Path(a.mnist) / "train-images-idx3-ubyte.gz")
            train(make_dataset(x, "bernoulli", "mnist-train"), a.model, ModelConfig(latent_dim=10, hidden=(200,)),
                  TrainConfig(epochs=1, seed=1), progress=False)
    rows = []
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    for n in a.records:
        inputs = _inputs(out, Path(a.mnist), n)  # written once here: the jobs' processes only read them
        for job in ("FnApiRunner", "DaskRunner-1w", "DaskRunner-2w"):
            r = subprocess.run([sys.executable, __file__, "--job", job, "--records", str(n), "--out", str(out),
                                "--model", a.model, "--inputs", *inputs], env=env, capture_output=True, text=True)
            if r.returncode:
                sys.stderr.write(r.stderr[-4000:])
                raise SystemExit(f"{job} at {n} records failed ({r.returncode})")
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    fits = {}
    if len(a.records) >= 2:
        lo, hi = min(a.records), max(a.records)
        for job in ("FnApiRunner", "DaskRunner-1w", "DaskRunner-2w"):
            w = {r["records"]: r["wall"] for r in rows if r["runner"] == job}
            slope = (w[hi] - w[lo]) / (hi - lo)
            fits[job] = {"us_per_record": round(1e6 * slope, 2), "fixed_seconds": round(w[lo] - slope * lo, 2)}
        for job in ("DaskRunner-1w", "DaskRunner-2w"):
            fits[job]["added_us_per_record_vs_FnApiRunner"] = round(
                fits[job]["us_per_record"] - fits["FnApiRunner"]["us_per_record"], 2)
    print(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.node(),
                      "cpus": os.cpu_count(), "python": platform.python_version(), "results": rows,
                      "linear_fit_wall": fits}, indent=2))


if __name__ == "__main__":
    main()
