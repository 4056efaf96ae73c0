"""Encode job: FnApiRunner vs Beam's DaskRunner (LocalCluster of 1 and 2 single-threaded worker processes).

    PYTHONPATH=. python benchmarks/bench_dask.py --records 100000 --out /tmp/bench_dask > result.json

Input: real MNIST training images (as .npy, 60k + the first ``records - 60k`` again under another name).
The model: a 784-200-10 VAE trained for one epoch (or ``--model``). The cluster is started before the
timed job (its start-up is reported on its own); ``seconds`` is the job's compute time, ``wall`` the whole
``encode.run`` call (client, model load in the workers, commit)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--out", default="/tmp/bench_dask")
    ap.add_argument("--model", default=None)
    ap.add_argument("--mnist", default=str(Path(__file__).resolve().parents[2] / "shared/data/mnist"))
    a = ap.parse_args()
    from vaestream.data import read_idx

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    x = read_idx(Path(a.mnist) / "train-images-idx3-ubyte.gz")
    np.save(out / "a.npy", x[:min(a.records, len(x))])
    inputs = [str(out / "a.npy")]
    if a.records > len(x):
        np.save(out / "b.npy", x[:a.records - len(x)])
        inputs.append(str(out / "b.npy"))
    model = a.model
    if model is None:
        from vaestream import ModelConfig, TrainConfig, train
        from vaestream.data import make_dataset

        model = str(out / "model")
        if not (Path(model) / "config.json").exists():
            train(make_dataset(x, "bernoulli", "mnist-train"), model, ModelConfig(latent_dim=10, hidden=(200,)),
                  TrainConfig(epochs=1, seed=1), progress=False)
    from dask.distributed import Client, LocalCluster

    from pipelines import encode

    rows = []

    def job(name: str, extra: list[str], startup: float | None = None) -> None:
        t0 = time.perf_counter()
        s = encode.run(["--input", *inputs, "--model", model, "--output", str(out / f"enc-{name}"), *extra])
        wall = time.perf_counter() - t0
        rows.append({"runner": name, "records": s["records"], "seconds": s["seconds"],
                     "records_per_second": s["records_per_second"], "wall": round(wall, 3),
                     "wall_records_per_second": round(s["records"] / wall, 1),
                     "us_per_record_wall": round(1e6 * wall / s["records"], 2), "cluster_startup": startup})

    job("FnApiRunner", [])
    for n in (1, 2):
        t0 = time.perf_counter()
        c = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
        cl = Client(c)
        startup = round(time.perf_counter() - t0, 3)
        job(f"DaskRunner-{n}w", ["--runner", "DaskRunner", "--dask_client_address", c.scheduler_address], startup)
        cl.close()
        c.close()
    print(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": "2-core shared",
                      "cpus": os.cpu_count(), "python": platform.python_version(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
