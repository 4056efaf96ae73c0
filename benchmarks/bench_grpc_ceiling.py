"""The ceiling of Python gRPC on this machine: a bare echo service (no model, no protos, no batching), the
same closed-loop load shape as bench_serving.py's matrix (N client threads, one channel each, back-to-back
unary calls with a 3,136-byte body: one 784-float32 record), against grpcio's thread-pool server and its
asyncio server. Whatever `vaestream serve` does per request, it cannot beat this on the same cores, so it
bounds what any throughput target for the server (e.g. a share of in-process batching) can reach here.

    python benchmarks/bench_grpc_ceiling.py [--clients 1 8 32] [--seconds 3]
    python benchmarks/bench_grpc_ceiling.py --serve-echo {grpc-threads,grpc-aio,asgi}

``--serve-echo`` runs one echo server in this process (prints ``{"port": N}``, serves until SIGTERM): the peers
of ``bench_serving.py --vs-echo``. The gRPC echoes answer ``/tensorflow.serving.PredictionService/Predict``
with the request's bytes (no parsing); the ASGI echo is a Starlette app on uvicorn (h11, asyncio loop: the
REST stack of ``vaestream serve``) that parses the JSON body and writes it back with ``json.dumps``.

Prints one JSON document: req/s and p50/p99 ms per (server kind, clients). Each server runs in its own
process (as `vaestream serve` would), the load generator in this one.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import threading
import time

import grpc
import numpy as np

METHOD = "/vaestream.bench.Echo/Echo"


def _ident(request: bytes, context) -> bytes:
    return request


def _echo_handler(fn) -> grpc.GenericRpcHandler:
    """The one-method echo service, ``fn`` its (sync or async) identity on bytes."""
    return grpc.method_handlers_generic_handler("vaestream.bench.Echo",
                                                {"Echo": grpc.unary_unary_rpc_method_handler(fn)})


def _serve_threads(port_q, workers: int) -> None:
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers((_echo_handler(_ident),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_q.put(port)
    server.wait_for_termination()


def _serve_aio(port_q, workers: int) -> None:
    """``workers`` is unused: the asyncio server runs its handlers on one event loop."""
    import asyncio

    async def ident(request: bytes, context) -> bytes:
        return request

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_echo_handler(ident),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_q.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


PREDICT = "/tensorflow.serving.PredictionService/Predict"


def serve_echo(kind: str) -> None:
    """One echo server on a free port (prints ``{"port": N}``) until SIGTERM: ``grpc-threads`` (grpcio's
    thread-pool server, 160 threads), ``grpc-aio`` (grpc.aio) or ``asgi`` (Starlette on uvicorn)."""
    import asyncio
    import signal
    import socket
    import sys

    if kind == "grpc-threads":
        from concurrent import futures

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=160))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "tensorflow.serving.PredictionService", {"Predict": grpc.unary_unary_rpc_method_handler(_ident)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        print(json.dumps({"port": port}), flush=True)
        done = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: done.set())
        while not done.wait(0.5):
            pass
        server.stop(1).wait()
        return
    if kind == "grpc-aio":
        async def ident(request: bytes, context) -> bytes:
            return request

        async def main_aio() -> None:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                "tensorflow.serving.PredictionService", {"Predict": grpc.unary_unary_rpc_method_handler(ident)}),))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            print(json.dumps({"port": port}), flush=True)
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()
            await server.stop(1)

        asyncio.run(main_aio())
        return
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def echo(request) -> Response:
        return Response(json.dumps(json.loads(await request.body())), media_type="application/json")

    app = Starlette(routes=[Route("/{path:path}", echo, methods=["POST"])])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY, as vaestream's
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
    config = uvicorn.Config(app, http="h11", loop="asyncio", lifespan="off", log_level="warning",
                            access_log=False, backlog=1024, server_header=False)
    uvicorn.Server(config).run(sockets=[sock])
    sys.exit(0)


def _load(port: int, clients: int, seconds: float, body: bytes) -> dict:
    lat: list[list[float]] = [[] for _ in range(clients)]
    stop = threading.Event()

    def client(i: int) -> None:
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        call = ch.unary_unary(METHOD)
        call(body)  # connect
        while not stop.is_set():
            t = time.perf_counter()
            call(body)
            lat[i].append(time.perf_counter() - t)
        ch.close()

    ts = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in ts:
        t.start()
    time.sleep(0.5)
    for L in lat:
        L.clear()
    t0 = time.perf_counter()
    time.sleep(seconds)
    n = sum(len(L) for L in lat)
    dt = time.perf_counter() - t0
    stop.set()
    for t in ts:
        t.join()
    a = np.concatenate([np.asarray(L) for L in lat]) * 1e3
    return {"clients": clients, "requests": n, "req_per_s": round(n / dt, 1),
            "p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--serve-echo", choices=["grpc-threads", "grpc-aio", "asgi"],
                    help="run one echo server (a peer of bench_serving.py --vs-echo) until SIGTERM")
    args = ap.parse_args(argv)
    if args.serve_echo:
        serve_echo(args.serve_echo)
        return {}
    body = np.random.default_rng(0).random(784, dtype=np.float32).tobytes()
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{platform.node()} "
           f"{os.cpu_count()} cores", "grpcio": grpc.__version__, "body_bytes": len(body), "rows": []}
    ctx = mp.get_context("spawn")
    for kind, target in (("threadpool", _serve_threads), ("asyncio", _serve_aio)):
        q = ctx.Queue()
        proc = ctx.Process(target=target, args=(q, 160), daemon=True)
        proc.start()
        port = q.get(timeout=30)
        try:
            for n in args.clients:
                out["rows"].append({"server": kind, **_load(port, n, args.seconds, body)})
        finally:
            proc.terminate()
            proc.join()
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
