"""``vaestream serve``: a small TF Serving-compatible REST server over ``tf.saved_model.load``, and its client.

TF Serving's binary cannot be installed everywhere (and not in our CI), so this module implements the same
REST surface for local use and tests; ``deploy/`` runs the real ``tensorflow/serving`` image on the same
export. Endpoints (``NAME`` is ``--model_name``; every response is JSON):

* ``GET  /v1/models/NAME[/versions/N]`` — model status:
  ``{"model_version_status": [{"version": "N", "state": "AVAILABLE", "status": {"error_code": "OK",
  "error_message": ""}}]}``.
* ``GET  /v1/models/NAME[/versions/N]/metadata`` — ``{"model_spec": {...}, "metadata": {"signature_def":
  {"signature_def": {SIGNATURE: SignatureDef as JSON}}}}``, the protos' JSON as TF Serving prints them.
* ``POST /v1/models/NAME[/versions/N]:predict`` with ``{"signature_name": S, "instances": [...]}`` (row
  format) -> ``{"predictions": [...]}``, or ``{"inputs": ...}`` (columnar) -> ``{"outputs": ...}``. With one
  named output the name is left out (a list per row / the tensor); with several, each row is an object
  (row format) or the outputs are an object of tensors (columnar), exactly as TF Serving formats them.

Errors are ``{"error": "..."}`` with TF Serving's status mapping: 400 (INVALID_ARGUMENT: malformed JSON or
URL, wrong shape or dtype, unknown signature, batch over ``max_batch_size``), 404 (NOT_FOUND: unknown model or
version). The latest loaded version serves requests without ``/versions/N``. The base path is polled for new
versions (``file_system_poll_wait_seconds``), which are loaded and then made the default.

:class:`Client` speaks this API (to ``vaestream serve`` or to TF Serving itself) and turns responses into
NumPy codes and reconstructions. It uses only the standard library and NumPy.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import math
import re
import socket
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from vaestream.errors import DataError, ModelError, VaestreamError

DEFAULT_SIGNATURE = "serving_default"
_PREDICT_RE = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:(classify|regress|predict)$",
                         re.IGNORECASE)
_STATUS_RE = re.compile(r"^/v1/models(?:/([^/:]+))?(?:/versions/(\d+)|/labels/([^/:]+))?(?:/(metadata))?$",
                        re.IGNORECASE)
_DTYPES = {"DT_FLOAT": np.float32, "DT_DOUBLE": np.float64, "DT_INT32": np.int32, "DT_INT64": np.int64,
           "DT_HALF": np.float16, "DT_INT8": np.int8, "DT_UINT8": np.uint8, "DT_INT16": np.int16,
           "DT_BOOL": np.bool_}


class ServingError(VaestreamError):
    """A REST request failed: ``status`` is the HTTP status, ``message`` the server's error text."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


# ============================================================================================================
# The server
# ============================================================================================================
class _RequestError(Exception):
    """An error answered to the client: HTTP status + TF Serving-style message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _invalid(msg: str) -> _RequestError:
    return _RequestError(400, msg)


def _not_found(msg: str) -> _RequestError:
    return _RequestError(404, msg)


@dataclasses.dataclass
class _Servable:
    """One loaded version: the SavedModel, its signature inputs (name -> (numpy dtype, shape)) and the
    SignatureDefs as TF Serving prints them."""

    version: int
    path: Path
    model: Any  # vaestream.export.ExportedModel
    inputs: dict[str, dict[str, tuple[Any, tuple[int | None, ...]]]]
    signature_defs: dict[str, Any]


def _signature_defs_json(path: Path) -> dict[str, Any]:
    """The SignatureDef map of ``path/saved_model.pb`` as JSON (proto field names, defaults printed)."""
    from google.protobuf import json_format
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((path / "saved_model.pb").read_bytes())
    meta = next((m for m in sm.meta_graphs if "serve" in m.meta_info_def.tags), sm.meta_graphs[0])
    return {name: json_format.MessageToDict(sig, preserving_proto_field_name=True,
                                            always_print_fields_with_no_presence=True)
            for name, sig in meta.signature_def.items()}


def parse_version_policy(policy: str) -> tuple[str, Any]:
    """``latest`` / ``latest:K`` / ``all`` / ``specific:1,3`` -> (kind, argument), as TF Serving's
    ``model_version_policy``.

    Raises:
      ModelError: a malformed policy.
    """
    p = policy.strip().lower()
    try:
        if p == "all":
            return "all", None
        if p == "latest":
            return "latest", 1
        if p.startswith("latest:"):
            k = int(p.split(":", 1)[1])
            if k < 1:
                raise ValueError
            return "latest", k
        if p.startswith("specific:"):
            vs = sorted({int(v) for v in p.split(":", 1)[1].split(",") if v.strip()})
            if not vs:
                raise ValueError
            return "specific", vs
    except ValueError:
        pass
    raise ModelError(f"version policy {policy!r} is not one of latest, latest:K, all, specific:N[,M...]")


class ModelServer:
    """The servables of one model (the versions under ``base_path`` chosen by ``version_policy``) and the
    request logic of the REST API, independent of the HTTP transport.

    Args:
      base_path: the export base (``EXPORT_BASE``: numeric version directories).
      model_name: the ``NAME`` of the URLs.
      version_policy: see :func:`parse_version_policy` (default: the latest version only, as TF Serving).
      max_batch_size: the largest batch (0-th dimension) one request may carry.
      max_concurrent: at most this many signature calls run at once (bounds memory under load).
    """

    def __init__(self, base_path: str | Path, model_name: str, version_policy: str = "latest",
                 max_batch_size: int = 10_000, max_concurrent: int = 4):
        self.base_path = Path(base_path)
        self.model_name = model_name
        self.policy = parse_version_policy(version_policy)
        self.max_batch_size = int(max_batch_size)
        self._servables: dict[int, _Servable] = {}
        self._ended: set[int] = set()
        self._lock = threading.Lock()
        self._gate = threading.BoundedSemaphore(max(1, int(max_concurrent)))
        if not self.base_path.is_dir():
            raise ModelError(f"{self.base_path}: model base path does not exist")

    # -- versions ------------------------------------------------------------------------------------------
    def _wanted(self, available: list[int]) -> list[int]:
        kind, arg = self.policy
        if kind == "all":
            return available
        if kind == "latest":
            return available[-arg:]
        return [v for v in available if v in arg]

    def reload(self) -> list[int]:
        """Poll the base path: load wanted versions not yet loaded, unload unwanted ones (new versions are
        loaded before old ones go, so there is always one to serve). Returns the loaded versions."""
        from vaestream.export import ExportedModel, list_versions

        wanted = self._wanted(list_versions(self.base_path))
        for v in wanted:
            if v in self._servables:
                continue
            try:
                model = ExportedModel(self.base_path / str(v))
                inputs = {name: {k: (s.dtype.as_numpy_dtype, tuple(s.shape.as_list()))
                                 for k, s in model.signature_inputs(name).items()}
                          for name in model.signatures}
                sdefs = _signature_defs_json(model.path)
            except VaestreamError as e:
                print(f"vaestream serve: cannot load version {v}: {e}", file=sys.stderr)
                continue
            with self._lock:
                self._servables[v] = _Servable(v, model.path, model, inputs, sdefs)
                self._ended.discard(v)
        with self._lock:
            for v in [v for v in self._servables if v not in wanted]:
                del self._servables[v]
                self._ended.add(v)
            return sorted(self._servables)

    @property
    def versions(self) -> list[int]:
        with self._lock:
            return sorted(self._servables)

    def _get(self, name: str, version: int | None, label: str | None) -> _Servable:
        if label is not None:
            raise _not_found(f"Unrecognized servable version label: {label}")
        with self._lock:
            if name != self.model_name or not self._servables:
                spec = f"Latest({name})" if version is None else f"Specific({name}, {version})"
                raise _not_found(f"Servable not found for request: {spec}")
            if version is None:
                return self._servables[max(self._servables)]
            if version not in self._servables:
                raise _not_found(f"Servable not found for request: Specific({name}, {version})")
            return self._servables[version]

    # -- endpoints -----------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        """Answer one request: (HTTP status, body for :func:`dumps` — NumPy arrays allowed). Never raises."""
        try:
            return 200, self._dispatch(method, urllib.parse.unquote(path.split("?", 1)[0]), body)
        except _RequestError as e:
            return e.status, {"error": e.message}
        except Exception as e:  # a server bug must not take the server down; say what it was
            return 500, {"error": f"Internal: {type(e).__name__}: {e}"}

    def _dispatch(self, method: str, path: str, body: bytes) -> Any:
        if method == "POST":
            m = _PREDICT_RE.match(path)
            if m:
                name, version, label, verb = m.groups()
                if verb.lower() != "predict":
                    raise _invalid(f"vaestream serve implements :predict only, not :{verb} (our signatures are "
                                   "predict signatures)")
                return self.predict(name, int(version) if version else None, label, body)
        elif method == "GET":
            m = _STATUS_RE.match(path)
            if m:
                name, version, label, sub = m.groups()
                if not name:
                    raise _invalid("Missing model name in request.")
                v = int(version) if version else None
                return self.metadata(name, v, label) if sub else self.status(name, v, label)
        raise _invalid(f"Malformed request: {method} {path}")

    def status(self, name: str, version: int | None = None, label: str | None = None) -> dict:
        """``GetModelStatusResponse`` as JSON."""
        if label is not None:
            raise _not_found(f"Unrecognized servable version label: {label}")
        with self._lock:
            loaded, ended = sorted(self._servables), sorted(self._ended)
        if name != self.model_name or not (loaded or ended):
            raise _not_found(f"Could not find any versions of model {name}")
        rows = [(v, "AVAILABLE") for v in loaded] + [(v, "END") for v in ended]
        if version is not None:
            rows = [r for r in rows if r[0] == version]
            if not rows:
                raise _not_found(f"Could not find version {version} of model {name}")
        rows.sort(key=lambda r: -r[0])
        return {"model_version_status": [
            {"version": str(v), "state": s, "status": {"error_code": "OK", "error_message": ""}} for v, s in rows]}

    def metadata(self, name: str, version: int | None = None, label: str | None = None) -> dict:
        """``GetModelMetadataResponse`` as JSON (``signature_def`` metadata only, as TF Serving)."""
        s = self._get(name, version, label)
        return {"model_spec": {"name": name, "signature_name": "", "version": str(s.version)},
                "metadata": {"signature_def": {"signature_def": s.signature_defs}}}

    def predict(self, name: str, version: int | None, label: str | None, body: bytes) -> dict:
        """``:predict``: parse the request, run the signature, format the response (row or columnar)."""
        s = self._get(name, version, label)
        try:
            req = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _invalid(f"JSON Parse error: {e}") from None
        if not isinstance(req, dict):
            raise _invalid("JSON Value: request body is not an object")
        sig = req.get("signature_name", DEFAULT_SIGNATURE)
        if not isinstance(sig, str):
            raise _invalid("'signature_name' must be a string")
        sig = sig or DEFAULT_SIGNATURE
        if sig not in s.inputs:
            raise _invalid(f"Serving signature name: \"{sig}\" not found in signature def")
        specs = s.inputs[sig]
        has_rows, has_cols = "instances" in req, "inputs" in req
        if has_rows == has_cols:
            raise _invalid("Missing 'inputs' or 'instances' key" if not has_rows else
                           "Both 'instances' and 'inputs' cannot be specified at the same time")
        unknown = set(req) - {"signature_name", "instances", "inputs"}
        if unknown:
            raise _invalid(f"Unexpected keys in request: {sorted(unknown)}")
        arrays = self._rows(req["instances"], specs) if has_rows else self._columns(req["inputs"], specs)
        feeds = {k: self._check(k, a, specs[k], sig) for k, a in arrays.items()}
        import tensorflow as tf

        try:
            with self._gate:
                out = s.model.signatures[sig](**feeds)
        except tf.errors.InvalidArgumentError as e:  # TF's own input checks: a bad request, not a crash
            raise _invalid(e.message) from None
        outputs = {k: v.numpy() for k, v in out.items()}
        return _format_rows(outputs) if has_rows else _format_columns(outputs)

    # -- request parsing -----------------------------------------------------------------------------------
    def _rows(self, instances: Any, specs: dict) -> dict[str, np.ndarray]:
        if not isinstance(instances, list) or not instances:
            raise _invalid("'instances' must be a non-empty list")
        if len(instances) > self.max_batch_size:
            raise _invalid(f"Task size {len(instances)} is larger than maximum input batch size "
                           f"{self.max_batch_size}")
        names = list(specs)
        if all(isinstance(r, dict) for r in instances):
            cols: dict[str, list] = {k: [] for k in names}
            for i, r in enumerate(instances):
                if set(r) != set(names):
                    raise _invalid(f"Failed to process element: {i} of 'instances' list. Error: expected "
                                   f"named inputs {names}, got {sorted(r)}")
                for k in names:
                    cols[k].append(r[k])
            return {k: _to_array(cols[k], specs[k][0], k, "instances") for k in names}
        if any(isinstance(r, dict) for r in instances):
            raise _invalid("'instances' mixes objects and plain values")
        if len(names) != 1:
            raise _invalid(f"The signature has {len(names)} named inputs {names}: each instance must be an object "
                           "with one value per input")
        return {names[0]: _to_array(instances, specs[names[0]][0], names[0], "instances")}

    def _columns(self, inputs: Any, specs: dict) -> dict[str, np.ndarray]:
        names = list(specs)
        if isinstance(inputs, dict):
            if set(inputs) != set(names):
                raise _invalid(f"'inputs' names {sorted(inputs)} do not match the signature's inputs {names}")
            return {k: _to_array(inputs[k], specs[k][0], k, "inputs") for k in names}
        if len(names) != 1:
            raise _invalid(f"The signature has {len(names)} named inputs {names}: 'inputs' must be an object")
        return {names[0]: _to_array(inputs, specs[names[0]][0], names[0], "inputs")}

    def _check(self, name: str, a: np.ndarray, spec: tuple, sig: str) -> np.ndarray:
        _, shape = spec
        want = "[" + ",".join("-1" if d is None else str(d) for d in shape) + "]"
        if a.ndim != len(shape) or any(d is not None and d != n for d, n in zip(shape, a.shape)):
            raise _invalid(f"input '{name}' of signature '{sig}' has shape {list(a.shape)}, expected {want}")
        if a.ndim and a.shape[0] > self.max_batch_size:
            raise _invalid(f"Task size {a.shape[0]} is larger than maximum input batch size {self.max_batch_size}")
        if a.ndim and a.shape[0] == 0:
            raise _invalid(f"input '{name}' has an empty batch")
        return a


def _to_array(value: Any, dtype: Any, name: str, key: str) -> np.ndarray:
    """A JSON (nested) list -> a NumPy array of ``dtype``; the JSON must hold numbers of a kind that dtype
    takes (no strings, booleans, nulls or ragged lists), as TF Serving's JSON tensor parser."""
    try:
        a = np.array(value)
    except (ValueError, TypeError):
        raise _invalid(f"input '{name}' in '{key}': the nested lists are ragged (not a tensor)") from None
    kind = a.dtype.kind
    want = np.dtype(dtype).kind
    if kind == "O":
        raise _invalid(f"input '{name}' in '{key}': the nested lists are ragged or hold nulls / objects")
    if kind in "US":
        raise _invalid(f"input '{name}' in '{key}': JSON Value is a string, not of expected type: "
                       f"{np.dtype(dtype).name}")
    if kind == "b" and want != "b":
        raise _invalid(f"input '{name}' in '{key}': JSON Value is a bool, not of expected type: {np.dtype(dtype).name}")
    if want in "iu" and kind == "f":
        raise _invalid(f"input '{name}' in '{key}': JSON Value is a float, not of expected type: "
                       f"{np.dtype(dtype).name}")
    if kind not in "biuf":
        raise _invalid(f"input '{name}' in '{key}': values are not numbers")
    if want == "f" and kind in "iu" and a.size and np.abs(a).max() > 2**53:
        raise _invalid(f"input '{name}' in '{key}': integer too large for {np.dtype(dtype).name}")
    try:
        return a.astype(dtype, casting="unsafe")
    except (OverflowError, ValueError) as e:
        raise _invalid(f"input '{name}' in '{key}': {e}") from None


_F32 = "{:.9g}".format  # 9 significant digits give back every float32 exactly, in ~40% fewer bytes than repr


def _array_json(a: np.ndarray) -> str:
    """A NumPy array as a JSON (nested) list. float32 / float16 values are written with 9 significant digits
    (they parse back bit-identical); float64 with Python's repr; NaN and infinities as TF Serving writes them
    (``NaN``, ``Infinity``)."""
    if a.dtype.kind == "f" and a.dtype.itemsize <= 4 and np.isfinite(a).all():
        if a.ndim == 0:
            return _F32(a.item())
        if a.ndim == 1:
            return "[" + ",".join(map(_F32, a.tolist())) + "]"
        return "[" + ",".join(_array_json(r) for r in a) + "]"
    if a.dtype.kind == "f":
        return json.dumps(a.astype(np.float64).tolist())
    return json.dumps(a.tolist())


def dumps(obj: Any) -> str:
    """``json.dumps`` that writes NumPy arrays (anywhere in dicts / lists) with :func:`_array_json`."""
    if isinstance(obj, np.ndarray):
        return _array_json(obj)
    if isinstance(obj, dict):
        return "{" + ",".join(json.dumps(str(k)) + ":" + dumps(v) for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(dumps(v) for v in obj) + "]"
    return json.dumps(obj)


def _format_rows(outputs: dict[str, np.ndarray]) -> dict:
    if len(outputs) == 1:
        return {"predictions": next(iter(outputs.values()))}
    batch = {len(v) for v in outputs.values()}
    if len(batch) != 1:
        raise _RequestError(400, "Tensors in the outputs have different batch sizes: use the columnar "
                                 "('inputs') format")
    n = batch.pop()
    return {"predictions": [{k: v[i] for k, v in outputs.items()} for i in range(n)]}


def _format_columns(outputs: dict[str, np.ndarray]) -> dict:
    if len(outputs) == 1:
        return {"outputs": next(iter(outputs.values()))}
    return {"outputs": outputs}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as TF Serving
    server_version = "vaestream-serve"
    model_server: ModelServer
    max_request_bytes: int
    verbose: bool

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in separate writes: without TCP_NODELAY, Nagle's algorithm holds the body
        # until the client's delayed ACK (~40 ms per request on Linux).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _reply(self, status: int, payload: Any) -> None:
        data = dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                self.close_connection = True
                self._reply(400, {"error": "chunked request bodies are not supported; send Content-Length"})
                return None
            return b""
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._reply(400, {"error": f"bad Content-Length {length!r}"})
            return None
        if n > self.max_request_bytes:
            self.close_connection = True  # do not read the body
            self._reply(400, {"error": f"request body of {n} bytes is larger than the maximum "
                                       f"{self.max_request_bytes}"})
            return None
        return self.rfile.read(n)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = self._body()
        if body is not None:
            self._reply(*self.model_server.handle("GET", self.path, body))

    def do_POST(self) -> None:  # noqa: N802
        body = self._body()
        if body is not None:
            self._reply(*self.model_server.handle("POST", self.path, body))

    def _other(self) -> None:  # PUT, DELETE, PATCH, ...: TF Serving answers "Malformed request" (400)
        body = self._body()
        if body is not None:
            self._reply(*self.model_server.handle(self.command, self.path, body))

    do_PUT = do_DELETE = do_PATCH = _other  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.verbose:
            super().log_message(format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def make_server(model_server: ModelServer, host: str = "127.0.0.1", port: int = 8501,
                max_request_bytes: int = 64 << 20, verbose: bool = False) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) answering with ``model_server``; ``port=0`` picks a free port
    (``server.server_address[1]``)."""
    handler = type("Handler", (_Handler,), {"model_server": model_server, "max_request_bytes": max_request_bytes,
                                            "verbose": verbose})
    return _Server((host, port), handler)


def serve(base_path: str | Path, model_name: str, port: int = 8501, host: str = "127.0.0.1",
          version_policy: str = "latest", max_batch_size: int = 10_000, poll_seconds: float = 1.0,
          max_request_bytes: int = 64 << 20, max_concurrent: int = 4, verbose: bool = False,
          ready: threading.Event | None = None) -> None:
    """Load the model and serve its REST API until interrupted (SIGINT / SIGTERM).

    Prints one JSON line ``{"serving": NAME, "host", "port", "versions"}`` to stdout once it accepts
    requests (with ``port=0``, the port picked). ``poll_seconds`` > 0 polls ``base_path`` for new versions.

    Raises:
      ModelError: no loadable version under ``base_path``.
    """
    import signal

    ms = ModelServer(base_path, model_name, version_policy, max_batch_size, max_concurrent)
    if not ms.reload():
        raise ModelError(f"{base_path}: no loadable version for policy {version_policy!r}")
    httpd = make_server(ms, host, port, max_request_bytes, verbose)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(poll_seconds):
            try:
                ms.reload()
            except Exception as e:  # keep serving what is loaded
                print(f"vaestream serve: polling {base_path} failed: {e}", file=sys.stderr)

    if poll_seconds > 0:
        threading.Thread(target=poll, name="version-poll", daemon=True).start()

    def on_term(signum, frame):  # shut down cleanly: finish in-flight requests
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    print(json.dumps({"serving": model_name, "host": host, "port": httpd.server_address[1],
                      "versions": ms.versions}), flush=True)
    if ready is not None:
        ready.set()
    try:
        httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        httpd.server_close()


# ============================================================================================================
# The client
# ============================================================================================================
class Client:
    """A client of TF Serving's REST API (``vaestream serve`` or ``tensorflow/serving``) for a vaestream export.

    Batches larger than ``max_batch`` are sent as several requests. Requests use the columnar format (the
    compact one); connections are kept alive (one per thread).

    Args:
      url: the server, e.g. ``http://localhost:8501``.
      model: the model name.
      version: a fixed version (``/versions/N``), or None for the server's latest.
      timeout: seconds per request.
      max_batch: records per request.
    """

    def __init__(self, url: str = "http://localhost:8501", model: str = "vae", version: int | None = None,
                 timeout: float = 60.0, max_batch: int = 1000):
        u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise DataError(f"{url}: not an http(s) URL")
        self.url, self.model, self.version = url, model, version
        self._scheme, self._host, self._port = u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80)
        self._prefix = u.path.rstrip("/")
        self.timeout, self.max_batch = float(timeout), int(max_batch)
        self._local = threading.local()
        self._dtypes: dict[str, dict[str, Any]] | None = None

    # -- transport -----------------------------------------------------------------------------------------
    def _conn(self) -> http.client.HTTPConnection:
        c = getattr(self._local, "conn", None)
        if c is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            c = self._local.conn = cls(self._host, self._port, timeout=self.timeout)
        return c

    def close(self) -> None:
        """Close this thread's connection."""
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    def request(self, method: str, path: str, payload: Any = None) -> Any:
        """One request; returns the parsed JSON body. Raises :class:`ServingError` on an HTTP error."""
        body = None if payload is None else dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in (0, 1):  # one retry on a connection the server closed while idle
            conn = self._conn()
            try:
                conn.request(method, self._prefix + path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.close()
                if attempt:
                    raise ServingError(0, f"{self.url}: connection lost ({e})") from e
            except OSError as e:
                self.close()
                raise ServingError(0, f"cannot reach {self.url}: {e}") from e
        if resp.getheader("Connection", "").lower() == "close":
            self.close()
        try:
            parsed = json.loads(data) if data else None
        except json.JSONDecodeError:
            parsed = None
        if resp.status != 200:
            msg = parsed.get("error") if isinstance(parsed, dict) else data[:500].decode(errors="replace")
            raise ServingError(resp.status, str(msg))
        if parsed is None:
            raise ServingError(resp.status, f"the response is not JSON: {data[:200]!r}")
        return parsed

    def _model_path(self) -> str:
        p = f"/v1/models/{urllib.parse.quote(self.model, safe='')}"
        return p + (f"/versions/{self.version}" if self.version is not None else "")

    # -- the API -------------------------------------------------------------------------------------------
    def status(self) -> dict:
        """The model status (``model_version_status``)."""
        return self.request("GET", self._model_path())

    def metadata(self) -> dict:
        """The model metadata (signature definitions)."""
        return self.request("GET", self._model_path() + "/metadata")

    def wait_until_available(self, timeout: float = 60.0, interval: float = 0.2) -> dict:
        """Poll the status until a version is AVAILABLE; returns the status. Raises ServingError on timeout."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                st = self.status()
                if any(v.get("state") == "AVAILABLE" for v in st.get("model_version_status", [])):
                    return st
            except ServingError as e:
                last = e
            time.sleep(interval)
        raise ServingError(0, f"{self.url}: model {self.model!r} not available after {timeout} s ({last})")

    def output_dtypes(self, signature: str) -> dict[str, Any]:
        """Output name -> NumPy dtype of a signature, from the metadata (cached)."""
        if self._dtypes is None:
            sdefs = self.metadata()["metadata"]["signature_def"]["signature_def"]
            self._dtypes = {name: {k: _DTYPES.get(v.get("dtype"), np.float32)
                                   for k, v in sd.get("outputs", {}).items()} for name, sd in sdefs.items()}
        if signature not in self._dtypes:
            raise ServingError(400, f"Serving signature name: \"{signature}\" not found in signature def")
        return self._dtypes[signature]

    def predict_raw(self, payload: dict) -> dict:
        """POST a ``:predict`` request body as is; returns the response JSON."""
        return self.request("POST", self._model_path() + ":predict", payload)

    def predict(self, signature: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run ``signature`` on ``inputs`` (name -> ``[B, ...]`` array), in batches of ``max_batch``.

        Returns output name -> NumPy array (dtypes from the model metadata), concatenated over batches.
        """
        arrays = {k: np.asarray(v) for k, v in inputs.items()}
        n = {len(a) for a in arrays.values()}
        if len(n) != 1:
            raise DataError(f"inputs have different batch sizes: { {k: len(a) for k, a in arrays.items()} }")
        n = n.pop()
        if n == 0:
            raise DataError(f"{signature}: no records to send")
        dtypes = self.output_dtypes(signature)
        parts: dict[str, list[np.ndarray]] = {}
        for s in range(0, n, self.max_batch):
            payload = {"signature_name": signature,
                       "inputs": {k: a[s:s + self.max_batch] for k, a in arrays.items()}}
            out = self.predict_raw(payload)["outputs"]
            if not isinstance(out, dict):  # a single output comes back unnamed
                out = {next(iter(dtypes)): out}
            for k, v in out.items():
                parts.setdefault(k, []).append(np.asarray(v, dtype=dtypes.get(k, np.float32)))
        return {k: np.concatenate(v) for k, v in parts.items()}

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x [B, D] -> (mean, log_scale) [B, Nz] of q(z|x)."""
        out = self.predict("encode", x=np.asarray(x, np.float32))
        return out["mean"], out["log_scale"]

    def decode(self, z: np.ndarray) -> dict[str, np.ndarray]:
        """z [B, Nz] -> p(x|z)'s parameters ``x_mean`` and ``logits`` / ``log_scale``, each [B, D]."""
        return self.predict("decode", z=np.asarray(z, np.float32))

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """x [B, D] -> the int32 codes (quantised latents) [B, Nz]."""
        return self.predict("quantize", x=np.asarray(x, np.float32))["symbols"]

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """x [B, D] -> x_hat [B, D], the decoder mean at the (dequantised) code."""
        return self.predict("reconstruct", x=np.asarray(x, np.float32))["x_hat"]

    def elbo(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """x [B, D] -> {elbo, rate, distortion} [B], nats."""
        return self.predict("elbo", x=np.asarray(x, np.float32))


def load_inputs(path: str | Path, key: str | None = None) -> np.ndarray:
    """Records from a data file (IDX, .npy/.npz, CSV, ... see :func:`vaestream.data.read_array`) as float32
    model inputs ``[N, D]``: uint8 records are scaled by 1/255, others taken as they are."""
    from vaestream.data import read_array

    a = read_array(path, key=key)
    if a.ndim < 1 or len(a) == 0:
        raise DataError(f"{path}: no records")
    a = a.reshape(len(a), -1)
    if a.dtype == np.uint8:
        return a.astype(np.float32) * np.float32(1.0 / 255.0)
    if a.dtype.kind not in "biuf":
        raise DataError(f"{path}: records of dtype {a.dtype} are not numbers")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise DataError(f"{path}: records hold NaN or infinite values")
    return a.astype(np.float32)


def run_client(url: str, model: str, action: str, input_path: str | None = None, output: str | None = None,
               version: int | None = None, key: str | None = None, max_batch: int = 1000) -> dict:
    """The ``vaestream client`` command: ``status`` / ``metadata`` print JSON; ``encode`` / ``quantize`` /
    ``reconstruct`` / ``elbo`` read records from ``input_path`` and write the outputs to ``output`` (.npz,
    one array per output name); ``decode`` reads latents ``z [B, Nz]``. Returns a JSON-able summary."""
    c = Client(url, model, version, max_batch=max_batch)
    if action == "status":
        return c.status()
    if action == "metadata":
        return c.metadata()
    if input_path is None or output is None:
        raise DataError(f"client {action}: needs --input and --out")
    t = time.perf_counter()
    if action == "decode":
        from vaestream.data import read_array

        z = np.asarray(read_array(input_path, key=key), np.float32)
        out = c.decode(z.reshape(len(z), -1))
        n = len(z)
    else:
        x = load_inputs(input_path, key)
        n = len(x)
        if action == "encode":
            mean, log_scale = c.encode(x)
            out = {"mean": mean, "log_scale": log_scale}
        elif action == "quantize":
            out = {"symbols": c.quantize(x)}
        elif action == "reconstruct":
            out = {"x_hat": c.reconstruct(x)}
        elif action == "elbo":
            out = c.elbo(x)
        else:
            raise DataError(f"unknown client action {action!r}")
    np.savez(output, **out)
    secs = time.perf_counter() - t
    summary: dict[str, Any] = {"action": action, "records": n, "out": str(output), "seconds": round(secs, 3),
                               "outputs": {k: [str(v.dtype), list(v.shape)] for k, v in out.items()}}
    if action == "elbo":
        summary["mean_elbo_nats"] = float(np.mean(out["elbo"]))
        summary["mean_rate_nats"] = float(np.mean(out["rate"]))
    if action == "reconstruct":
        x = load_inputs(input_path, key)
        summary["mse"] = float(np.mean((out["x_hat"] - x) ** 2))
        summary["psnr_db"] = float(10 * math.log10(1.0 / max(summary["mse"], 1e-12)))
    return summary
