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

* ``load_matrix`` (``--matrix-only``): closed-loop load of batch-1 ``encode`` requests from 1, 8, 32, 128
  concurrent clients (threads, one connection / channel each), REST and gRPC, ``vaestream serve`` with and
  without ``--enable_batching`` (``deploy/batching_parameters.txt``): requests/s, p50/p99/p99.9, errors, the
  server's peak RSS; the peer is the SavedModel signature called in-process at batch 1 / 32 / 128.

    python benchmarks/bench_serving.py [--model DIR] [--data MNIST_DIR] [--seconds 20] [--clients 4]
    python benchmarks/bench_serving.py --matrix-only --seconds 3
    python benchmarks/bench_serving.py --vs-echo [--seconds 5] [--rounds 3] [--clients 32]

* ``vs_echo`` (``--vs-echo``): ``vaestream serve`` with batching (``deploy/batching_parameters.txt``) against
  bare echo servers on the same load shape, in one run: ``--clients`` threads (one channel / kept-alive
  connection each) sending the same pre-serialised batch-1 ``encode`` requests back to back — gRPC: the
  ``PredictRequest`` bytes to ``vaestream serve`` and to a gRPC echo (thread pool and grpc.aio) that returns
  them; REST: the JSON body to ``vaestream serve`` and to a Starlette-on-uvicorn echo that parses and
  re-serialises it (``bench_grpc_ceiling.py --serve-echo``). Rounds alternate peer and server; per round
  requests/s, p50/p99, errors; the medians, the ratios server / best echo, each server's RSS at start / end.

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
BATCHING_FILE = [ROOT / "deploy" / "batching_parameters.txt"]  # --batching-file replaces it

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


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid``, all its threads."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


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
    from vaestream.serving.client import Client

    proc = subprocess.Popen([sys.executable, "-m", "vaestream.cli", "serve", "--model_base_path", str(base),
                             "--model_name", "vae", "--port", "0", "--rest_api_port", "0",
                             "--file_system_poll_wait_seconds", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        info = json.loads(proc.stdout.readline())
        url = f"http://127.0.0.1:{info['rest_api_port']}"
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


def start_server(base: Path, batching: bool, *extra: str) -> tuple[subprocess.Popen, dict]:
    """``vaestream serve`` (gRPC + REST on free ports), with or without ``--enable_batching``."""
    cmd = [sys.executable, "-m", "vaestream.cli", "serve", "--model_base_path", str(base), "--model_name", "vae",
           "--port", "0", "--rest_api_port", "0", "--file_system_poll_wait_seconds", "0",
           "--rest_api_num_threads", "160", "--grpc_max_threads", "160"]
    if batching:
        cmd += ["--enable_batching", "--batching_parameters_file", str(BATCHING_FILE[0])]
    err = tempfile.NamedTemporaryFile("w+", prefix="serve_stderr_", suffix=".txt", delete=False)
    proc = subprocess.Popen(cmd + list(extra), stdout=subprocess.PIPE, stderr=err, text=True, env=ENV)
    proc.stderr_path = err.name  # the batching statistics line, printed at exit
    return proc, json.loads(proc.stdout.readline())


def batching_stats(proc: subprocess.Popen) -> dict | None:
    """The ``{"batching": ...}`` line ``vaestream serve`` printed to stderr at exit (requests, batches, rows)."""
    path = getattr(proc, "stderr_path", None)
    for line in reversed(Path(path).read_text().splitlines() if path else []):
        if line.startswith('{"batching"'):
            return json.loads(line)["batching"]
    return None


def closed_loop(transport: str, info: dict, pid: int, x: np.ndarray, clients: int, seconds: float) -> dict:
    """``clients`` threads, each with its own connection / channel, sending batch-1 ``encode`` requests back to
    back for ``seconds``: requests/s, latency p50/p99/p99.9, errors, the server's peak RSS."""
    import http.client

    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from vaestream.serving.protocol import dumps

    n_rec = 256
    if transport == "grpc":
        reqs = []
        for i in range(n_rec):
            r = predict_pb2.PredictRequest()
            r.model_spec.name, r.model_spec.signature_name = "vae", "encode"
            r.inputs["x"].CopyFrom(tf.make_tensor_proto(x[i:i + 1]))
            reqs.append(r)
    else:
        bodies = [dumps({"signature_name": "encode", "inputs": {"x": x[i:i + 1]}}).encode() for i in range(n_rec)]
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start, stop = threading.Barrier(clients + 1), [0.0]

    def worker(i: int) -> None:
        if transport == "grpc":
            ch = grpc.insecure_channel(f"127.0.0.1:{info['port']}")
            stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            stub.Predict(reqs[0], timeout=30)

            def call(j: int) -> None:
                stub.Predict(reqs[j], timeout=30)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", info["rest_api_port"], timeout=30)

            def call(j: int) -> None:
                conn.request("POST", "/v1/models/vae:predict", body=bodies[j],
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                if r.status != 200:
                    raise RuntimeError(r.status)
        start.wait()
        j = i
        while time.perf_counter() < stop[0]:
            t = time.perf_counter()
            try:
                call(j % n_rec)
                lat[i].append(time.perf_counter() - t)
            except Exception:
                errors[i] += 1
                if transport == "rest":
                    conn.close()
            j += clients

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    stop[0] = time.perf_counter() + seconds + 60
    start.wait()
    t0 = time.perf_counter()
    stop[0] = t0 + seconds
    peak = 0
    while any(t.is_alive() for t in threads) and time.perf_counter() < stop[0] + 30:
        time.sleep(0.2)
        peak = max(peak, rss_kib(pid))
    for t in threads:
        t.join(30)
    wall = time.perf_counter() - t0
    all_lat = np.asarray([v for xs in lat for v in xs])
    return {"transport": transport, "clients": clients, "requests": int(len(all_lat)), "errors": int(sum(errors)),
            "requests_per_s": round(len(all_lat) / wall, 1),
            "p50_ms": round(pct(all_lat, 50) * 1e3, 2), "p99_ms": round(pct(all_lat, 99) * 1e3, 2),
            "p999_ms": round(pct(all_lat, 99.9) * 1e3, 2), "server_rss_peak_mib": round(peak / 1024, 1)}


def load_matrix(base: Path, x: np.ndarray, seconds: float, client_counts: list[int]) -> list[dict]:
    """Closed-loop batch-1 encode load: {REST, gRPC} x {batching off, on} x ``client_counts``."""
    out = []
    for batching in (False, True):
        proc, info = start_server(base, batching)
        try:
            for transport in ("rest", "grpc"):
                for c in client_counts:
                    r = closed_loop(transport, info, proc.pid, x, c, seconds)
                    r["batching"] = batching
                    print(json.dumps(r), file=sys.stderr, flush=True)
                    out.append(r)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return out


def _raw_closed_loop(transport: str, port: int, bodies: list[bytes], clients: int, seconds: float,
                     pid: int) -> dict:
    """``clients`` threads sending ``bodies`` (pre-serialised; gRPC: PredictRequest bytes, REST: JSON) back to
    back for ``seconds`` over one channel / connection each; the answers are not parsed (a non-OK one is an
    error). Requests/s, p50/p99 ms, errors, the server's RSS after (MiB)."""
    import http.client

    import grpc

    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start, stop = threading.Barrier(clients + 1), [time.perf_counter() + 3600]

    def worker(i: int) -> None:
        if transport == "grpc":
            ch = grpc.insecure_channel(f"127.0.0.1:{port}")
            rpc = ch.unary_unary("/tensorflow.serving.PredictionService/Predict")

            def call(b: bytes) -> None:
                rpc(b, timeout=30)
            call(bodies[0])
        else:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

            def call(b: bytes) -> None:
                conn.request("POST", "/v1/models/vae:predict", body=b, headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                if r.status != 200:
                    raise RuntimeError(r.status)
        start.wait()
        j = i
        while time.perf_counter() < stop[0]:
            t = time.perf_counter()
            try:
                call(bodies[j % len(bodies)])
                lat[i].append(time.perf_counter() - t)
            except Exception:
                errors[i] += 1
                if transport == "rest":
                    conn.close()
            j += clients
        if transport == "grpc":
            ch.close()
        else:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    time.sleep(0.5)  # warm: connections made, batches flowing
    for xs in lat:
        xs.clear()
    c0, t0, l0 = cpu_s(pid), time.perf_counter(), time.process_time()
    time.sleep(seconds)
    n = sum(len(xs) for xs in lat)
    wall, c1, l1 = time.perf_counter() - t0, cpu_s(pid), time.process_time()
    stop[0] = 0.0
    for t in threads:
        t.join(60)
    a = np.asarray([v for xs in lat for v in xs[:]]) * 1e3
    return {"requests_per_s": round(n / wall, 1), "p50_ms": round(pct(a, 50), 2), "p99_ms": round(pct(a, 99), 2),
            "errors": int(sum(errors)), "server_cpu_us_per_request": round((c1 - c0) / max(n, 1) * 1e6, 1),
            "server_cpu_cores": round((c1 - c0) / wall, 2),
            "client_cpu_us_per_request": round((l1 - l0) / max(n, 1) * 1e6, 1),
            "load_cores": round(os.getloadavg()[0], 2), "rss_mib": round(rss_kib(pid) / 1024, 1)}


def _popen_json(cmd: list[str]) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
    return proc, json.loads(proc.stdout.readline())


def _stop(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return -9


def vs_echo(base: Path, x: np.ndarray, seconds: float, clients: int, rounds: int,
            grpc_servers: list[str]) -> dict:
    """``vaestream serve`` with batching vs. bare echo servers, same load, same bytes (see the module doc).
    ``grpc_servers``: ``vaestream serve --grpc_server`` kinds to measure (``[]``: the default server, for a
    version without the flag); REST is measured on the first."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    from vaestream.serving.protocol import dumps

    n_rec = 256
    grpc_bodies, rest_bodies = [], []
    for i in range(n_rec):
        r = predict_pb2.PredictRequest()
        r.model_spec.name, r.model_spec.signature_name = "vae", "encode"
        r.inputs["x"].CopyFrom(tf.make_tensor_proto(x[i:i + 1]))
        grpc_bodies.append(r.SerializeToString())
        rest_bodies.append(dumps({"signature_name": "encode", "inputs": {"x": x[i:i + 1]}}).encode())
    echo = [sys.executable, str(ROOT / "benchmarks" / "bench_grpc_ceiling.py"), "--serve-echo"]
    procs: dict[str, tuple[subprocess.Popen, dict]] = {}
    try:
        for g in grpc_servers or [""]:
            procs["serve" + (f"_{g}" if g else "")] = start_server(base, True, *(["--grpc_server", g] if g else []))
        first = next(iter(procs))
        for kind in ("grpc-threads", "grpc-aio", "asgi"):
            procs[kind] = _popen_json(echo + [kind])
        time.sleep(2.0)
        rss0 = {k: round(rss_kib(p.pid) / 1024, 1) for k, (p, _) in procs.items()}
        cells = {("grpc", "echo_threads"): ("grpc-threads", "port", grpc_bodies),
                 ("grpc", "echo_aio"): ("grpc-aio", "port", grpc_bodies),
                 **{("grpc", k): (k, "port", grpc_bodies) for k in procs if k.startswith("serve")},
                 ("rest", "echo_asgi"): ("asgi", "port", rest_bodies),
                 ("rest", first): (first, "rest_api_port", rest_bodies)}
        runs: dict[tuple, list[dict]] = {k: [] for k in cells}
        for r in range(rounds):
            for (transport, peer), (proc_key, port_key, bodies) in cells.items():
                proc, info = procs[proc_key]
                res = _raw_closed_loop(transport, info[port_key], bodies, clients, seconds, proc.pid)
                runs[(transport, peer)].append(res)
                print(json.dumps({"round": r, "transport": transport, "server": peer, **res}), file=sys.stderr,
                      flush=True)
        rss1 = {k: round(rss_kib(p.pid) / 1024, 1) for k, (p, _) in procs.items()}
    finally:
        codes = {k: _stop(p) for k, (p, _) in procs.items()}
        stats = {k: batching_stats(p) for k, (p, _) in procs.items() if k.startswith("serve")}
    out: dict = {"clients": clients, "seconds": seconds, "rounds": rounds, "cells": []}
    med = {}
    for (transport, peer), rs in runs.items():
        m = {k: round(statistics.median(r[k] for r in rs), 2)
             for k in ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_request", "server_cpu_cores",
                       "client_cpu_us_per_request")}
        m["errors"] = sum(r["errors"] for r in rs)
        m["rounds_req_per_s"] = [r["requests_per_s"] for r in rs]
        med[(transport, peer)] = m
        out["cells"].append({"transport": transport, "server": peer, **m})
    g_echo = max(med[("grpc", "echo_threads")]["requests_per_s"], med[("grpc", "echo_aio")]["requests_per_s"])
    for (transport, peer), m in med.items():
        if peer.startswith("serve") and transport == "grpc":
            out[f"ratio_grpc_{peer}_over_best_echo"] = round(m["requests_per_s"] / g_echo, 3)
            out[f"ratio_grpc_{peer}_over_echo_threads"] = round(
                m["requests_per_s"] / med[("grpc", "echo_threads")]["requests_per_s"], 3)
    # if the two cores were the only limit: requests/s ~ cores / (client + server CPU per request), so the
    # ratio the CPU alone allows is (echo's client + server CPU) / (serve's client + server CPU)
    cpu = {k: m["server_cpu_us_per_request"] + m["client_cpu_us_per_request"] for k, m in med.items()}
    out["cpu_bound_ratio"] = {f"{t}_{p}": round(cpu[(t, "echo_threads" if t == "grpc" else "echo_asgi")] / c, 3)
                              for (t, p), c in cpu.items() if p.startswith("serve")}
    out["ratio_rest_serve_over_echo_asgi"] = round(
        med[("rest", first)]["requests_per_s"] / med[("rest", "echo_asgi")]["requests_per_s"], 3)
    out["rss_start_mib"], out["rss_end_mib"], out["exit_codes"] = rss0, rss1, codes
    out["serve_batching"] = stats
    out["load_average"] = os.getloadavg()
    return out


def in_process(sig, x: np.ndarray, seconds: float) -> dict:
    """The peer: the SavedModel's ``encode`` signature called in this process, batch 1 / 32 / 128."""
    import tensorflow as tf

    res = {}
    for b in (1, 32, 128):
        v = tf.constant(x[:b])
        lats = latency(lambda t: sig(x=t)["mean"].numpy(), v, 300)
        res[f"b{b}"] = {"records_per_s": round(throughput(lambda t: sig(x=t)["mean"].numpy(), v, seconds), 0),
                        "p50_ms": round(pct(lats, 50) * 1e3, 3), "p99_ms": round(pct(lats, 99) * 1e3, 3)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="model directory (default: train 784-500-20 for one epoch)")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    ap.add_argument("--seconds", type=float, default=20.0, help="load duration per serve scenario")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--serve-batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="fresh-process loads (median)")
    ap.add_argument("--matrix-only", action="store_true",
                    help="only the closed-loop load matrix (REST/gRPC x batching x clients) and its in-process peer")
    ap.add_argument("--matrix-clients", default="1,8,32,128", help="client counts of the load matrix")
    ap.add_argument("--vs-echo", action="store_true",
                    help="only vaestream serve (batching) vs bare gRPC / ASGI echo servers, side by side")
    ap.add_argument("--rounds", type=int, default=3, help="--vs-echo: alternated rounds (median)")
    ap.add_argument("--grpc-servers", default="asyncio,threads",
                    help="--vs-echo: vaestream serve --grpc_server kinds, comma-separated ('': the default server)")
    ap.add_argument("--batching-file", type=Path, default=BATCHING_FILE[0],
                    help="the batching parameters of vaestream serve (default deploy/batching_parameters.txt)")
    a = ap.parse_args()
    BATCHING_FILE[0] = a.batching_file

    import tensorflow as tf

    from vaestream import store
    from vaestream.coding.codec import write_tables
    from vaestream.data import read_idx
    from vaestream.serving.export import ExportedModel, export

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

    if a.vs_echo:
        res["vs_echo"] = vs_echo(path.parent, x_all, a.seconds, a.clients, a.rounds,
                                 [g for g in a.grpc_servers.split(",") if g])
        print(json.dumps(res, indent=1))
        return
    if a.matrix_only:
        loaded = ExportedModel(path)
        res["in_process_savedmodel_encode"] = in_process(loaded.signatures["encode"], x_all, min(a.seconds, 2.0))
        res["load_matrix"] = load_matrix(path.parent, x_all, a.seconds, [int(c) for c in a.matrix_clients.split(",")])
        print(json.dumps(res, indent=1))
        return
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
