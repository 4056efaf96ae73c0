"""The TF Serving wire protocol both ends share: dtype names, canonical status codes, the errors of a request
(:class:`RequestError` on the server's side, :class:`ServingError` on the client's), and the JSON writer for
NumPy arrays. The server, its transports, the batcher and the client import it; it imports none of them.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from vaestream.errors import VaestreamError

DTYPES = {"DT_FLOAT": np.float32, "DT_DOUBLE": np.float64, "DT_INT32": np.int32, "DT_INT64": np.int64,
          "DT_HALF": np.float16, "DT_INT8": np.int8, "DT_UINT8": np.uint8, "DT_INT16": np.int16,
          "DT_BOOL": np.bool_}


# TF Serving's mapping of canonical status codes to HTTP (tensorflow_serving/util/net_http ...: ToHTTPStatusCode).
GRPC_TO_HTTP = {"OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
                "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
                "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501,
                "INTERNAL": 500, "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401}
HTTP_TO_GRPC = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "INVALID_ARGUMENT", 500: "INTERNAL",
                503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


class RequestError(Exception):
    """An error the server answers to the client: HTTP ``status``, canonical (gRPC) ``code`` and a TF
    Serving-style ``message``. Raised by :class:`vaestream.serving.server.ModelServer` and the batcher; each
    transport turns it into its own error reply."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or HTTP_TO_GRPC.get(status, "UNKNOWN")


class ServingError(VaestreamError):
    """A request failed: ``status`` is the HTTP status (0: no answer), ``message`` the server's error text,
    ``code`` the canonical (gRPC) status name, e.g. ``"NOT_FOUND"``."""

    def __init__(self, status: int, message: str, code: str | None = None):
        self.code = code or HTTP_TO_GRPC.get(status, "UNKNOWN" if status else "UNAVAILABLE")
        super().__init__(f"HTTP {status}: {message}" if code is None else f"{self.code}: {message}")
        self.status = status
        self.message = message


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
