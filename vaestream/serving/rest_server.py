"""``vaestream serve``'s REST port: TF Serving's REST API as a Starlette app on uvicorn.

Why Starlette on uvicorn, not ``http.server``: uvicorn is a maintained ASGI server whose HTTP/1.1 parsing
(h11), keep-alive (``timeout_keep_alive``), connection limit (``limit_concurrency``: 503 beyond it) and
graceful shutdown (SIGTERM: stop accepting, let the requests in flight finish within
``timeout_graceful_shutdown``, then exit) are tested by many users; Starlette is the thin, maintained ASGI
toolkit for the request / response objects and routing. With server-side batching, a ``:predict`` of
up to ``inline_bytes`` is parsed on the event loop and waits for its batch on a future (no thread per
request: the batch thread wakes the loop once per batch); larger bodies, and every request without
batching, are parsed and run in a bounded thread pool (``rest_api_num_threads``). Each request is bounded
by ``rest_api_timeout_in_ms``: after it the answer is TF Serving's for a run past its deadline
(DEADLINE_EXCEEDED: HTTP 504, ``{"error": "..."}``). A body larger than ``max_request_bytes`` is refused
(400) before it is read. The request logic and the error JSON are :meth:`vaestream.serving.server.ModelServer.handle`'s,
shared with nothing else, so the surface is exactly the one of ``vaestream serve`` before (the same tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from typing import Any

from vaestream.errors import ModelError
from vaestream.serving.protocol import dumps
from vaestream.serving.server import ModelServer

_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


def _json(status: int, payload: Any, close: bool = False) -> Any:
    from starlette.responses import Response

    return Response(dumps(payload), status_code=status, media_type="application/json",
                    headers={"Connection": "close"} if close else None)


def make_app(ms: ModelServer, max_request_bytes: int = 64 << 20, timeout_s: float = 30.0,
             num_threads: int = 64, inline_bytes: int = 64 << 10) -> Any:
    """The Starlette app of TF Serving's REST API over ``ms`` (every path goes to ``ms.handle``, or, for a
    ``:predict`` of at most ``inline_bytes`` with batching on, ``ms.handle_async`` on the event loop)."""
    import anyio
    import anyio.to_thread
    from starlette.applications import Starlette
    from starlette.routing import Route

    state: dict[str, Any] = {}

    def answer(method: str, path: str, body: bytes) -> tuple[int, bytes]:
        status, payload = ms.handle(method, path, body)
        return status, dumps(payload).encode()

    async def endpoint(request: Any) -> Any:
        from starlette.responses import Response

        length = request.headers.get("content-length")
        if length is not None:
            try:
                n = int(length)
                if n < 0:
                    raise ValueError
            except ValueError:
                return _json(400, {"error": f"bad Content-Length {length!r}"}, close=True)
            if n > max_request_bytes:  # do not read the body
                return _json(400, {"error": f"request body of {n} bytes is larger than the maximum "
                                            f"{max_request_bytes}"}, close=True)
        chunks, size = [], 0
        async for chunk in request.stream():  # chunked bodies: bounded as they arrive
            size += len(chunk)
            if size > max_request_bytes:
                return _json(400, {"error": f"request body is larger than the maximum {max_request_bytes}"},
                             close=True)
            chunks.append(chunk)
        path = request.scope.get("raw_path", request.url.path.encode()).decode("latin-1")
        if "limiter" not in state:
            state["limiter"] = anyio.CapacityLimiter(num_threads)
        body = b"".join(chunks)
        try:
            async with asyncio.timeout(timeout_s):  # cheaper than anyio's cancel scope, per request
                if ms.batcher is not None and request.method == "POST" and size <= inline_bytes:
                    status, payload = await ms.handle_async(request.method, path, body)
                    data = dumps(payload).encode()
                else:
                    status, data = await anyio.to_thread.run_sync(answer, request.method, path, body,
                                                                  limiter=state["limiter"], abandon_on_cancel=True)
        except TimeoutError:  # TF Serving: the run's deadline (RunOptions.timeout_in_ms) -> DEADLINE_EXCEEDED
            return _json(504, {"error": f"Deadline Exceeded: the request took longer than rest_api_timeout_in_ms "
                                        f"({timeout_s * 1000:g} ms)"})
        return Response(data, status_code=status, media_type="application/json")

    return Starlette(routes=[Route("/{path:path}", endpoint, methods=_METHODS)])


class _Server:
    """A uvicorn server that exits normally (status 0) after a graceful SIGTERM / SIGINT shutdown (uvicorn
    re-raises the captured signal after shutdown, which would end the process by the signal); ``on_exit`` (if
    given) is called first on the signal, so that the gRPC port stops taking requests at the same moment."""

    def __new__(cls, config: Any, on_exit: Any = None) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                if on_exit is not None and not self.should_exit:
                    on_exit()
                super().handle_exit(sig, frame)

            @contextlib.contextmanager
            def capture_signals(self):  # noqa: ANN202 (uvicorn's hook)
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for s, h in old.items():
                        signal.signal(s, h)

        return Server(config)


class RestServer:
    """The REST port: a socket bound (and listening) at construction, served by :meth:`run`.

    Args:
      ms: the model server.
      host, port: where to listen (``port=0``: a free port, then :attr:`port`).
      max_request_bytes: the largest request body (larger: 400, not read).
      timeout_s: per-request limit (504 after it).
      num_threads: request handlers running at once (JSON + model call).
      keep_alive_s: idle keep-alive connections are closed after this.
      grace_s: on SIGTERM, how long requests in flight may take to finish.
      max_connections: connections + requests at once (beyond: 503).
      verbose: log every request.
      on_exit: called (in the main thread) when SIGTERM / SIGINT arrives, before the REST port drains.
    """

    def __init__(self, ms: ModelServer, host: str = "127.0.0.1", port: int = 8501, *,
                 max_request_bytes: int = 64 << 20, timeout_s: float = 30.0, num_threads: int = 64,
                 keep_alive_s: float = 30.0, grace_s: float = 30.0, max_connections: int = 2048,
                 verbose: bool = False, on_exit: Any = None):
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (uvicorn writes
        # headers and body separately; without NODELAY each response waits ~40 ms for the client's delayed ACK)
        self.sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise ModelError(f"REST: cannot bind {host}:{port}: {e}") from None
        self.sock.listen(1024)  # connections queue from now on, before run() accepts them
        self.port: int = self.sock.getsockname()[1]
        app = make_app(ms, max_request_bytes, timeout_s, num_threads)
        config = uvicorn.Config(app, http="h11", loop="asyncio", lifespan="off", log_level="info" if verbose
                                else "warning", access_log=verbose, timeout_keep_alive=int(max(1, keep_alive_s)),
                                timeout_graceful_shutdown=int(max(1, grace_s)), limit_concurrency=max_connections,
                                backlog=1024, server_header=False)
        self.server = _Server(config, on_exit)

    def run(self) -> None:
        """Serve until SIGTERM / SIGINT (main thread) or :meth:`stop`; drains in-flight requests first."""
        self.server.run(sockets=[self.sock])

    async def serve(self) -> None:
        """:meth:`run` on the running event loop (with the gRPC asyncio server beside it)."""
        await self.server.serve(sockets=[self.sock])

    def stop(self) -> None:
        """Ask :meth:`run` to shut down gracefully (from any thread)."""
        self.server.should_exit = True
