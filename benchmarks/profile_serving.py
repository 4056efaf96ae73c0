"""Where the server's CPU goes per request: ``vaestream serve`` with batching under the closed-loop load of
``bench_serving.py --vs-echo`` (32 clients, pre-serialised batch-1 ``encode`` requests), sampled by py-spy
(``pip install py-spy``; all threads, idle threads left out, so a sample is CPU time).

    python benchmarks/profile_serving.py [--transport grpc|rest] [--grpc-server asyncio|threads] [--seconds 10]

Prints JSON: requests, the server's CPU µs per request (``/proc``), and µs per request per step of the path
(a sample is counted in the first step, in the order below, that any frame of its stack matches), plus the
top functions by own time.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serving as bs  # noqa: E402

# step -> frame fragments (function name + file), first match wins, in this order
STEPS = [
    ("signature call (TF)", ("_call (vaestream/serving/server.py",)),
    ("batcher: merge, pad, split, wake", ("_execute (vaestream/serving/batching.py",
                                          "_run (vaestream/serving/batching.py",
                                          "_settle (vaestream/serving/batching.py",
                                          "_enqueue (vaestream/serving/batching.py",
                                          "_worker (vaestream/serving/batching.py")),
    ("request -> arrays (proto / JSON parse, checks)", ("parse_predict (", "_parse_predict (", "_check (")),
    ("outputs -> response (proto / JSON write)", ("answer (vaestream", "dumps (vaestream", "_format_")),
    ("REST: Starlette / uvicorn / h11", ("starlette", "uvicorn", "h11")),
    ("gRPC: grpc.aio / grpcio", ("grpc",)),
    ("asyncio event loop", ("asyncio",)),
]


IDLE = ("Condition.wait (threading.py", "EpollSelector.select (selectors.py", "Event.wait (threading.py",
        "_worker (concurrent/futures/thread.py")


def classify(stack: str) -> str:
    leaf = stack.rsplit(";", 1)[-1]
    if leaf.startswith(IDLE):  # py-spy's idle detection missed a blocked thread: not CPU
        return "waiting (blocked, not CPU)"
    if leaf.startswith("Handle._run (asyncio/events.py"):  # grpc.aio's Cython callbacks run by the loop
        return "gRPC: grpc.aio (Cython callbacks on the loop)"
    for step, frags in STEPS:
        if any(f in stack for f in frags):
            return step
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transport", choices=["grpc", "rest"], default="grpc")
    ap.add_argument("--grpc-server", choices=["asyncio", "threads"], default="asyncio")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--data", type=Path, default=bs.ROOT.parent / "shared" / "data" / "mnist")
    a = ap.parse_args()

    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    from vaestream.coding.codec import write_tables
    from vaestream.data import read_idx
    from vaestream.serving.export import export
    from vaestream.serving.protocol import dumps

    tmp = Path(tempfile.mkdtemp(prefix="profile_serving_"))
    test = read_idx(a.data / "t10k-images-idx3-ubyte.gz")
    x = test.reshape(len(test), -1).astype("float32") / 255
    model_dir = bs.train_model(a.data, tmp / "model")
    write_tables(model_dir, test[:5000])
    path = export(model_dir, tmp / "exports")
    bodies = []
    for i in range(256):
        if a.transport == "grpc":
            r = predict_pb2.PredictRequest()
            r.model_spec.name, r.model_spec.signature_name = "vae", "encode"
            r.inputs["x"].CopyFrom(tf.make_tensor_proto(x[i:i + 1]))
            bodies.append(r.SerializeToString())
        else:
            bodies.append(dumps({"signature_name": "encode", "inputs": {"x": x[i:i + 1]}}).encode())
    proc, info = bs.start_server(path.parent, True, "--grpc_server", a.grpc_server)
    raw = tmp / "spy.txt"
    try:
        time.sleep(2.0)
        spy: list[subprocess.CompletedProcess] = []
        t = threading.Thread(target=lambda: spy.append(subprocess.run(
            ["py-spy", "record", "-p", str(proc.pid), "-d", str(int(a.seconds)), "-r", str(a.rate), "--format",
             "raw", "-o", str(raw), "--nonblocking", "--threads"], capture_output=True, text=True)))
        t.start()
        load = bs._raw_closed_loop(a.transport, info["port" if a.transport == "grpc" else "rest_api_port"], bodies,
                                   a.clients, a.seconds, proc.pid)
        t.join()
    finally:
        bs._stop(proc)
    per_step: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        n = int(n)
        total += n
        per_step[classify(stack)] += n
        own[stack.rsplit(";", 1)[-1]] += n
    # samples -> µs per request: samples / rate = CPU seconds over the load's seconds, requests in those seconds
    reqs = load["requests_per_s"] * a.seconds
    us = lambda n: round(n / a.rate / reqs * 1e6, 1)  # noqa: E731
    idle = per_step.get("waiting (blocked, not CPU)", 0)
    out = {"transport": a.transport, "grpc_server": a.grpc_server, "load": load, "samples": total,
           "sampled_cpu_us_per_request": us(total - idle),
           "steps_us_per_request": {k: us(v) for k, v in per_step.most_common()},
           "top_own_us_per_request": {k: us(v) for k, v in own.most_common(25)}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
