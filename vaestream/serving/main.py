"""``vaestream serve``'s process: one :class:`~vaestream.serving.server.ModelServer` behind both transports,
gRPC (:mod:`vaestream.serving.grpc_server`) and REST (:mod:`vaestream.serving.rest_server`), until SIGTERM.

The entry point sits above the server and its transports (they import the server, never this module).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

from vaestream.errors import ModelError
from vaestream.serving.grpc_server import make_grpc_server
from vaestream.serving.rest_server import RestServer
from vaestream.serving.server import ModelServer


def serve(base_path: str | Path, model_name: str, port: int = 8500, rest_api_port: int = 8501,
          host: str = "127.0.0.1", version_policy: str = "latest", max_batch_size: int = 10_000,
          poll_seconds: float = 1.0, max_request_bytes: int = 64 << 20, max_concurrent: int = 4,
          batching: Any = None, rest_api_timeout_ms: int = 30_000, rest_api_num_threads: int = 64,
          grpc_max_threads: int = 64, keep_alive_s: float = 30.0, grace_s: float = 30.0,
          verbose: bool = False) -> None:
    """Load the model and serve it over gRPC (``port``) and REST (``rest_api_port``) until SIGTERM / SIGINT.

    ``port=0`` / ``rest_api_port=0`` pick a free port; ``rest_api_port=-1`` turns REST off (TF Serving turns it
    off with 0). Prints one JSON line ``{"serving": NAME, "host", "port", "rest_api_port", "versions"}`` to
    stdout once both accept connections. On SIGTERM both stop accepting, finish the requests in flight
    (up to ``grace_s``) and the process exits 0. ``poll_seconds`` > 0 polls ``base_path`` for new versions.

    Raises:
      ModelError: no loadable version under ``base_path``.
    """
    ms = ModelServer(base_path, model_name, version_policy, max_batch_size, max_concurrent, batching)
    if not ms.reload():
        raise ModelError(f"{base_path}: no loadable version for policy {version_policy!r}")
    grpc_server, grpc_port = make_grpc_server(ms, host, port, max_request_bytes, grpc_max_threads)
    rest = None
    if rest_api_port >= 0:
        rest = RestServer(ms, host, rest_api_port, max_request_bytes=max_request_bytes,
                          timeout_s=rest_api_timeout_ms / 1000.0, num_threads=rest_api_num_threads,
                          keep_alive_s=keep_alive_s, grace_s=grace_s, verbose=verbose)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(poll_seconds):
            try:
                ms.reload()
            except Exception as e:  # keep serving what is loaded
                print(f"vaestream serve: polling {base_path} failed: {e}", file=sys.stderr)

    if poll_seconds > 0:
        threading.Thread(target=poll, name="version-poll", daemon=True).start()
    grpc_server.start()
    print(json.dumps({"serving": model_name, "host": host, "port": grpc_port,
                      "rest_api_port": rest.port if rest else None, "versions": ms.versions}), flush=True)
    try:
        if rest is not None:
            rest.run()  # until SIGTERM / SIGINT; drains in-flight REST requests
        else:
            _wait_for_signal()
    finally:
        stop.set()
        grpc_server.stop(grace_s).wait()  # in-flight RPCs finish, new ones are refused
        ms.close()


def _wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT (the gRPC-only server's main loop)."""
    import signal

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.5):
        pass
