"""Serving benchmark: the SavedModel export against the in-process model, and ``vaestream serve`` under load.

Prints one JSON object:

* ``load``: fresh-process times (a new Python process each): ``import tensorflow``, ``tf.saved_model.load`` of
  the export, and — the peer — ``vaestream.store.load_model`` of the model directory (checkpoint restore);
* ``encode``: latency p50/p99 at batch 1 and records/s at batch 1000 through the SavedModel's ``encode``
  signature vs. the in-process model (``tf.function`` over ``VAE.encoder_params``), same run, as ratios;
* ``serve``: a bounded loopback load on ``vaestream serve`` (``--clients`` threads for ``--seconds``, each with
  a kept-alive connection: ``encode`` and ``quantize`` requests of ``--serve-batch`` records, then
  ``quantize`` of 100 records): requests/s, latency p50/p99, error count, and the server's RSS before /
  during (10 samples) / after; the peer is the same signature called directly in this process (the cost of
  HTTP + JSON).

    python benchmarks/bench_serving.py [--model DIR] [--data MNIST_DIR] [--seconds 20] [--clients 4]

Without ``--model`` it trains the paper's 784-500-20 Bernoulli VAE for one epoch on MNIST (a few seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

LOAD_SAVEDMODEL = """
import time, json, sys
t0 = time.perf_counter()
import tensorflow as tf
t1 = time.perf_counter()
m = tf.saved_model.load(sys.argv[1])
f = m.signatures["encode"]
f(x=tf.zeros([1, int(sys.argv[2])]))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1}))
"""

LOAD_CHECKPOINT = """
import time, json, sys
t0 = time.perf_counter()
import tensorflow as tf
t1 = time.perf_counter()
from vaestream.store import load_model
m = load_model(sys.argv[1])
f = tf.function(m.encoder_params)
f(tf.zeros([1, int(sys.argv[2])]))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1}))
"""


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def fresh_load(script: str, path: Path, dim: int, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", script, str(path), str(dim)], capture_output=True, text=True,
                           env=ENV, timeout=300, check=True)
        d = json.loads(r.stdout.strip().splitlines()[-1])
        d["process_s"] = time.perf_counter() - t
        runs.append(d)
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


def latency(fn, x, n: int) -> list[float]:
    fn(x)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t)
    return out


def throughput(fn, x, seconds: float) -> float:
    fn(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(x)
        n += len(x)
    return n / (time.perf_counter() - t0)


def train_model(data: Path, out: Path) -> Path:
    from vaestream import ModelConfig, TrainConfig, train
    from vaestream.data import make_dataset, read_idx

    ds = make_dataset(read_idx(data / "train-images-idx3-ubyte.gz"), "bernoulli", "mnist-train")
    train(ds, out, ModelConfig(latent_dim=20, hidden=(500,)), TrainConfig(epochs=1, seed=0), progress=False)
    return out


def serve_load(base: Path, x: np.ndarray, seconds: float, clients: int, batch: int, signature: str) -> dict:
    from vaestream.serve import Client

    proc = subprocess.Popen([sys.executable, "-m", "vaestream.cli", "serve", "--model_base_path", str(base),
                             "--model_name", "vae", "--port", "0", "--file_system_poll_wait_seconds", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        info = json.loads(proc.stdout.readline())
        url = f"http://127.0.0.1:{info['port']}"
        c = Client(url, "vae")
        c.wait_until_available(30)
        for _ in range(20):  # warm up every path once
            c.predict(signature, x=x[:batch])
        rss0 = rss_kib(proc.pid)
        lat: list[list[float]] = [[] for _ in range(clients)]
        errors = [0] * clients
        stop = time.perf_counter() + seconds

        def worker(i: int) -> None:
            cl = Client(url, "vae")
            rng = np.random.default_rng(i)
            while time.perf_counter() < stop:
                s = int(rng.integers(0, len(x) - batch))
                t = time.perf_counter()
                try:
                    cl.predict(signature, x=x[s:s + batch])
                    lat[i].append(time.perf_counter() - t)
                except Exception:
                    errors[i] += 1
            cl.close()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        samples = []
        while any(t.is_alive() for t in threads) and time.perf_counter() < stop + 60:
            time.sleep(seconds / 10)
            samples.append(round(rss_kib(proc.pid) / 1024, 1))
        for t in threads:
            t.join(timeout=60)
        wall = time.perf_counter() - t0
        rss1 = rss_kib(proc.pid)
        all_lat = [v for xs in lat for v in xs]
        return {"signature": signature, "batch": batch, "clients": clients, "seconds": round(wall, 2),
                "requests": len(all_lat), "errors": int(sum(errors)),
                "requests_per_s": round(len(all_lat) / wall, 1),
                "records_per_s": round(len(all_lat) * batch / wall, 1),
                "p50_ms": round(pct(all_lat, 50) * 1e3, 2), "p99_ms": round(pct(all_lat, 99) * 1e3, 2),
                "rss_before_mib": round(rss0 / 1024, 1), "rss_after_mib": round(rss1 / 1024, 1),
                "rss_during_mib": samples}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="model directory (default: train 784-500-20 for one epoch)")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    ap.add_argument("--seconds", type=float, default=20.0, help="load duration per serve scenario")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--serve-batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="fresh-process loads (median)")
    a = ap.parse_args()

    import tensorflow as tf

    from vaestream import store
    from vaestream.codec import write_tables
    from vaestream.data import read_idx
    from vaestream.export import ExportedModel, export

    tmp = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    test = read_idx(a.data / "t10k-images-idx3-ubyte.gz")
    x_all = test.reshape(len(test), -1).astype(np.float32) / np.float32(255)
    model_dir = a.model
    if model_dir is None:
        model_dir = train_model(a.data, tmp / "model")
    if not (Path(model_dir) / "coder_tables.npz").is_file():
        write_tables(model_dir, test[:5000])
    t = time.perf_counter()
    path = export(model_dir, tmp / "exports")
    export_s = time.perf_counter() - t
    model = store.load_model(model_dir)
    dim = model.config.input_dim

    res: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
                 "python": platform.python_version(),
                 "tensorflow": tf.__version__, "model": {"dir": str(model_dir), **model.config.to_dict()},
                 "export_s": round(export_s, 2)}

    sm = fresh_load(LOAD_SAVEDMODEL, path, dim, a.repeats)
    ck = fresh_load(LOAD_CHECKPOINT, Path(model_dir), dim, a.repeats)
    res["load"] = {"savedmodel": sm, "checkpoint_peer": ck,
                   "load_ratio_savedmodel_over_checkpoint": round(sm["load_s"] / ck["load_s"], 2)}

    loaded = ExportedModel(path)
    sig = loaded.signatures["encode"]
    enc = tf.function(model.encoder_params, input_signature=[tf.TensorSpec([None, dim], tf.float32)])
    x1 = tf.constant(x_all[:1])
    x1000 = tf.constant(x_all[:1000])
    fns = {"savedmodel": lambda v: sig(x=v)["mean"].numpy(), "in_process": lambda v: enc(v)[0].numpy()}
    # interleaved rounds, so that load from other processes on the shared machine hits both sides alike
    lats: dict[str, list[float]] = {k: [] for k in fns}
    tps: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(5):
        for name, fn in fns.items():
            lats[name] += latency(fn, x1, 400)
            tps[name].append(throughput(fn, x1000, 1.0))
    enc_res = {name: {"b1_p50_us": round(pct(lats[name], 50) * 1e6, 1),
                      "b1_p99_us": round(pct(lats[name], 99) * 1e6, 1),
                      "b1000_records_per_s": round(statistics.median(tps[name]), 0)} for name in fns}
    np.testing.assert_allclose(fns["savedmodel"](x1000), fns["in_process"](x1000), rtol=1e-5, atol=1e-5)
    enc_res["ratio_savedmodel_over_in_process"] = {
        "b1_p50": round(enc_res["savedmodel"]["b1_p50_us"] / enc_res["in_process"]["b1_p50_us"], 2),
        "b1000_throughput": round(enc_res["savedmodel"]["b1000_records_per_s"]
                                  / enc_res["in_process"]["b1000_records_per_s"], 2)}
    res["encode"] = enc_res

    direct = latency(lambda v: sig(x=v)["mean"].numpy(), tf.constant(x_all[:a.serve_batch]), 2000)
    res["serve"] = []
    for signature, batch in (("encode", a.serve_batch), ("quantize", a.serve_batch), ("quantize", 100)):
        res["serve"].append(serve_load(path.parent, x_all, a.seconds, a.clients, batch, signature))
    res["serve_peer_direct_call_p50_us"] = round(pct(direct, 50) * 1e6, 1)
    res["serve_p50_over_direct_p50"] = round(res["serve"][0]["p50_ms"] * 1e3 / res["serve_peer_direct_call_p50_us"], 1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
