"""``vaestream serve``'s process: one :class:`~vaestream.serving.server.ModelServer` behind both transports,
gRPC (:mod:`vaestream.serving.grpc_server`) and REST (:mod:`vaestream.serving.rest_server`), until SIGTERM.

The entry point sits above the server and its transports (they import the server, never this module).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from vaestream.errors import ModelError
from vaestream.serving.grpc_server import make_grpc_aio_server, make_grpc_server
from vaestream.serving.rest_server import RestServer
from vaestream.serving.server import ModelServer


def serve(base_path: str | Path, model_name: str, port: int = 8500, rest_api_port: int = 8501,
          host: str = "127.0.0.1", version_policy: str = "latest", max_batch_size: int = 10_000,
          poll_seconds: float = 1.0, max_request_bytes: int = 64 << 20, max_concurrent: int = 4,
          batching: Any = None, rest_api_timeout_ms: int = 30_000, rest_api_num_threads: int = 64,
          grpc_max_threads: int = 64, keep_alive_s: float = 30.0, grace_s: float = 30.0,
          verbose: bool = False, grpc_server: str = "asyncio") -> None:
    """Load the model and serve it over gRPC (``port``) and REST (``rest_api_port``) until SIGTERM / SIGINT.

    ``port=0`` / ``rest_api_port=0`` pick a free port; ``rest_api_port=-1`` turns REST off (TF Serving turns it
    off with 0). Prints one JSON line ``{"serving": NAME, "host", "port", "rest_api_port", "versions"}`` to
    stdout once both accept connections. On SIGTERM both stop taking requests at once (new connections and
    RPCs are refused), finish the requests in flight (up to ``grace_s``) and the process exits 0.
    ``poll_seconds`` > 0 polls ``base_path`` for new versions. ``grpc_server``: ``asyncio`` (``grpc.aio`` on
    the REST port's event loop) or ``threads`` (grpcio's thread pool of ``grpc_max_threads``).

    Raises:
      ModelError: no loadable version under ``base_path``; an unknown ``grpc_server``.
    """
    if grpc_server not in ("asyncio", "threads"):
        raise ModelError(f"grpc_server {grpc_server!r} is not asyncio or threads")
    ms = ModelServer(base_path, model_name, version_policy, max_batch_size, max_concurrent, batching)
    if not ms.reload():
        raise ModelError(f"{base_path}: no loadable version for policy {version_policy!r}")
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(poll_seconds):
            try:
                ms.reload()
            except Exception as e:  # keep serving what is loaded
                print(f"vaestream serve: polling {base_path} failed: {e}", file=sys.stderr)

    if poll_seconds > 0:
        threading.Thread(target=poll, name="version-poll", daemon=True).start()
    rest_kw = dict(max_request_bytes=max_request_bytes, timeout_s=rest_api_timeout_ms / 1000.0,
                   num_threads=rest_api_num_threads, keep_alive_s=keep_alive_s, grace_s=grace_s, verbose=verbose)

    def ready(grpc_port: int, rest: RestServer | None) -> None:
        print(json.dumps({"serving": model_name, "host": host, "port": grpc_port,
                          "rest_api_port": rest.port if rest else None, "versions": ms.versions}), flush=True)

    try:
        if grpc_server == "asyncio":
            asyncio.run(_serve_async(ms, host, port, rest_api_port, rest_kw, max_request_bytes, grace_s, ready))
            return
        server, grpc_port = make_grpc_server(ms, host, port, max_request_bytes, grpc_max_threads)
        stopped: list[Any] = []

        def on_exit() -> None:  # the signal: gRPC refuses new RPCs now, its in-flight ones finish
            stopped.append(server.stop(grace_s))

        rest = RestServer(ms, host, rest_api_port, on_exit=on_exit, **rest_kw) if rest_api_port >= 0 else None
        server.start()
        ready(grpc_port, rest)
        try:
            if rest is not None:
                rest.run()  # until SIGTERM / SIGINT; drains in-flight REST requests
            else:
                _wait_for_signal()
        finally:
            (stopped[0] if stopped else server.stop(grace_s)).wait()
    finally:
        stop.set()
        ms.close()
        b = ms.batcher
        if b is not None and b.batches_run:
            print(json.dumps({"batching": {"requests": b.tasks_run, "batches": b.batches_run,
                                           "mean_rows": round(sum(k * v for k, v in b.sizes_run.items())
                                                              / b.batches_run, 2),
                                           "sizes": dict(sorted(b.sizes_run.items()))}}), file=sys.stderr)


async def _serve_async(ms: ModelServer, host: str, port: int, rest_api_port: int, rest_kw: dict,
                       max_request_bytes: int, grace_s: float, ready: Any) -> None:
    """gRPC (``grpc.aio``) and REST (uvicorn) on this event loop until SIGTERM / SIGINT; then both refuse new
    requests at once and drain the ones in flight."""
    loop = asyncio.get_running_loop()
    server, grpc_port = make_grpc_aio_server(ms, host, port, max_request_bytes)
    stopping: list[asyncio.Task] = []
    done = asyncio.Event()

    def begin_stop() -> None:  # on the loop: refuse new RPCs, let the in-flight ones finish
        if not stopping:
            stopping.append(loop.create_task(server.stop(grace_s)))
        done.set()

    rest = None
    if rest_api_port >= 0:
        rest = RestServer(ms, host, rest_api_port, on_exit=lambda: loop.call_soon_threadsafe(begin_stop), **rest_kw)
    await server.start()
    ready(grpc_port, rest)
    if rest is not None:
        await rest.serve()  # until SIGTERM / SIGINT; drains in-flight REST requests
    else:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, begin_stop)
        await done.wait()
    begin_stop()
    await stopping[0]


def _wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT (the gRPC-only server's main loop)."""
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.5):
        pass
