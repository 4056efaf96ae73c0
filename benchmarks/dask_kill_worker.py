"""SIGKILL one Dask worker in the middle of an encode job on a `dask scheduler` + 2 `dask worker` cluster
(started here as processes, as the README shows), then check the job's output against the FnApiRunner's.

    PYTHONPATH=. python benchmarks/dask_kill_worker.py --out /tmp/dask_kill > result.json

The nanny of the killed worker starts a new one; Dask re-runs the tasks that were lost; each task's part file
has a name derived from its read task and is written by rename, so the rerun replaces it with the same bytes
and the client counts it once. Expected: same code rows and counts as the FnApiRunner, no staging folder left.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/dask_kill")
    ap.add_argument("--records", type=int, default=60000)
    ap.add_argument("--kill_after", type=float, default=6.0)
    a = ap.parse_args()
    from dask.distributed import Client

    from pipelines import encode
    from vaestream import beam as vb
    from vaestream import ModelConfig, TrainConfig, train
    from vaestream.data import make_dataset, read_idx
    from vaestream.distributed import free_ports

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    x = read_idx(Path(__file__).resolve().parents[2] / "shared/data/mnist/train-images-idx3-ubyte.gz")[:a.records]
    np.save(out / "x.npy", x)
    model = out / "model"
    if not (model / "config.json").exists():
        train(make_dataset(x, "bernoulli", "x"), model, ModelConfig(latent_dim=10, hidden=(200,)),
              TrainConfig(steps=200, seed=1), progress=False)
    port = free_ports(1)[0]
    env = dict(os.environ)
    slog = open(out / "scheduler.log", "w")
    procs = [subprocess.Popen(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0"], env=env, stderr=slog)]
    time.sleep(3)
    addr = f"tcp://127.0.0.1:{port}"
    for _ in range(2):
        procs.append(subprocess.Popen(["dask", "worker", addr, "--nworkers", "1", "--nthreads", "1"], env=env,
                                      stderr=subprocess.DEVNULL))
    client = Client(addr)
    client.wait_for_workers(2, timeout=60)
    pids = client.run(os.getpid)
    killed = {}

    def kill():
        time.sleep(a.kill_after)
        victim = sorted(pids.values())[0]
        os.kill(victim, signal.SIGKILL)
        killed.update(pid=victim, at=a.kill_after)

    common = ["--input", str(out / "x.npy"), "--model", str(model), "--split_records", "5000", "--chunk_size", "1000"]
    threading.Thread(target=kill, daemon=True).start()
    t0 = time.perf_counter()
    try:
        s_dask = encode.run([*common, "--output", str(out / "dask"), "--runner", "DaskRunner",
                             "--dask_client_address", addr])
        error = None
    except Exception as e:  # a clear failure is the other acceptable outcome
        s_dask, error = None, f"{type(e).__name__}: {e}"
    wall = time.perf_counter() - t0
    pids_after = sorted(client.run(os.getpid).values())
    client.close()
    for p in reversed(procs):
        p.terminate()
        p.wait()
    s_fn = encode.run([*common, "--output", str(out / "fn")])

    def rows(d):
        r = []
        for f in sorted(Path(d).glob("codes-*.tfrecord")):
            for b in vb.read_codes(str(f)):
                r += [(k, m.tobytes(), v.tobytes()) for k, m, v in zip(b.keys, b.mean, b.log_scale)]
        return sorted(r)

    same = s_dask is not None and rows(out / "dask") == rows(out / "fn")
    slog.close()
    events = [l.strip() for l in (out / "scheduler.log").read_text().splitlines()
              if any(w in l for w in ("Remove worker", "lost", "suspicious", "Register worker"))]
    print(json.dumps({"killed": killed, "worker_pids_before": sorted(pids.values()), "worker_pids_after": pids_after,
                      "scheduler_events": events, "dask_error": error, "wall": round(wall, 3),
                      "dask_records": s_dask and s_dask["records"], "fn_records": s_fn["records"],
                      "rows_identical": same,
                      "staging_left": [str(p) for p in (out / "dask").glob("_vaestream_staging*")]},
                     indent=2))


if __name__ == "__main__":
    main()
