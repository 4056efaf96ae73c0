"""``vaestream serve``: a TF Serving-compatible model server over ``tf.saved_model.load`` — the core.

TF Serving's binary cannot be installed everywhere (and not in our CI), so vaestream implements the same two
surfaces for local use, tests and small deployments; ``deploy/`` runs either this or the real
``tensorflow/serving`` image on the same export, on the same ports:

* **gRPC** (``--port``, 8500): ``tensorflow.serving.PredictionService`` (``Predict``, ``GetModelMetadata``) and
  ``ModelService`` (``GetModelStatus``) with TF Serving's own protos — :mod:`vaestream.serving.grpc_server`.
* **REST** (``--rest_api_port``, 8501) on Starlette / uvicorn — :mod:`vaestream.serving.rest_server`:

  - ``GET  /v1/models/NAME[/versions/N]`` — model status:
    ``{"model_version_status": [{"version": "N", "state": "AVAILABLE", "status": {"error_code": "OK",
    "error_message": ""}}]}``.
  - ``GET  /v1/models/NAME[/versions/N]/metadata`` — ``{"model_spec": {...}, "metadata": {"signature_def":
    {"signature_def": {SIGNATURE: SignatureDef as JSON}}}}``, the protos' JSON as TF Serving prints them.
  - ``POST /v1/models/NAME[/versions/N]:predict`` with ``{"signature_name": S, "instances": [...]}`` (row
    format) -> ``{"predictions": [...]}``, or ``{"inputs": ...}`` (columnar) -> ``{"outputs": ...}``. With one
    named output the name is left out (a list per row / the tensor); with several, each row is an object
    (row format) or the outputs are an object of tensors (columnar), exactly as TF Serving formats them.

  Errors are ``{"error": "..."}`` with TF Serving's status mapping: 400 (INVALID_ARGUMENT: malformed JSON or
  URL, wrong shape or dtype, unknown signature, batch over ``max_batch_size``), 404 (NOT_FOUND: unknown model
  or version), 503 (UNAVAILABLE: the batching queue is full).

This module holds what both transports share: :class:`ModelServer` (the loaded versions, status, metadata, the
checks of a predict request and the signature call, optionally through server-side batching,
:mod:`vaestream.serving.batching`) and the JSON tensor reader / writer; :func:`vaestream.serving.main.serve` runs
both transports over it. The latest loaded version serves requests without a version. The base path is polled
for new versions (``file_system_poll_wait_seconds``), which are loaded and then made the default.

:class:`Client` (REST) and :class:`GrpcClient` (gRPC) speak these APIs (to ``vaestream serve`` or to TF Serving
itself) and turn responses into NumPy codes and reconstructions (:mod:`vaestream.serving.client`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

from vaestream.errors import ModelError, VaestreamError
from vaestream.serving.protocol import RequestError

try:  # a faster JSON parser for :predict bodies, used where its result is json.loads' own (_parse_predict)
    import orjson
except ImportError:  # json alone (None also turns it off)
    orjson = None

DEFAULT_SIGNATURE = "serving_default"
_EXACT_BOUND = 2.0 ** 63  # orjson and json read every number below this magnitude alike (larger ints: a float)
_PREDICT_RE = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:(classify|regress|predict)$",
                         re.IGNORECASE)
_STATUS_RE = re.compile(r"^/v1/models(?:/([^/:]+))?(?:/versions/(\d+)|/labels/([^/:]+))?(?:/(metadata))?$",
                        re.IGNORECASE)
# ============================================================================================================
# The server
# ============================================================================================================
def _invalid(msg: str) -> RequestError:
    return RequestError(400, msg)


def _not_found(msg: str) -> RequestError:
    return RequestError(404, msg)


@dataclasses.dataclass
class _Servable:
    """One loaded version: the SavedModel, its signature inputs (name -> (numpy dtype, shape)), the
    SignatureDefs as TF Serving prints them (JSON) and as protos (gRPC metadata)."""

    version: int
    path: Path
    model: Any  # vaestream.serving.export.ExportedModel
    inputs: dict[str, dict[str, tuple[Any, tuple[int | None, ...]]]]
    signature_defs: dict[str, Any]
    signature_protos: dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> SignatureDef


def _signature_defs(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The SignatureDef map of ``path/saved_model.pb``: (name -> SignatureDef proto, name -> the same as JSON
    with proto field names and defaults printed)."""
    from google.protobuf import json_format
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((path / "saved_model.pb").read_bytes())
    meta = next((m for m in sm.meta_graphs if "serve" in m.meta_info_def.tags), sm.meta_graphs[0])
    protos = dict(meta.signature_def.items())
    return protos, {name: json_format.MessageToDict(sig, preserving_proto_field_name=True,
                                                    always_print_fields_with_no_presence=True)
                    for name, sig in protos.items()}


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
      batching: a :class:`vaestream.serving.batching.BatchingParameters` to merge concurrent requests to one
        (version, signature) into one call, and split large ones when ``enable_large_batch_splitting`` is on
        (TF Serving's ``--enable_batching``); None: one call per request.
    """

    def __init__(self, base_path: str | Path, model_name: str, version_policy: str = "latest",
                 max_batch_size: int = 10_000, max_concurrent: int = 4, batching: Any = None):
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
        self.batcher = None
        if batching is not None:
            from vaestream.serving.batching import Batcher

            self.batcher = Batcher(batching, self._call)

    def close(self) -> None:
        """Stop the batching threads (after the queued batches have run)."""
        if self.batcher is not None:
            self.batcher.close()

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
        from vaestream.serving.export import ExportedModel, list_versions

        wanted = self._wanted(list_versions(self.base_path))
        for v in wanted:
            if v in self._servables:
                continue
            try:
                model = ExportedModel(self.base_path / str(v))
                inputs = {name: {k: (s.dtype.as_numpy_dtype, tuple(s.shape.as_list()))
                                 for k, s in model.signature_inputs(name).items()}
                          for name in model.signatures}
                sprotos, sdefs = _signature_defs(model.path)
            except VaestreamError as e:
                print(f"vaestream serve: cannot load version {v}: {e}", file=sys.stderr)
                continue
            with self._lock:
                self._servables[v] = _Servable(v, model.path, model, inputs, sdefs, sprotos)
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

    def get(self, name: str, version: int | None, label: str | None = None) -> _Servable:
        """The servable of ``name`` at ``version`` (None: the latest). Raises NOT_FOUND (404)."""
        return self._get(name, version, label)

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
        """Answer one request: (HTTP status, body for :func:`~vaestream.serving.protocol.dumps` — NumPy arrays
        allowed). Never raises."""
        try:
            return 200, self._dispatch(method, urllib.parse.unquote(path.split("?", 1)[0]), body)
        except RequestError as e:
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

    def status_rows(self, name: str, version: int | None = None, label: str | None = None) -> list[tuple[int, str]]:
        """(version, state) of ``name``'s versions, newest first: AVAILABLE (loaded) or END (unloaded).
        Raises NOT_FOUND (404) for an unknown model / version."""
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
        return rows

    def status(self, name: str, version: int | None = None, label: str | None = None) -> dict:
        """``GetModelStatusResponse`` as JSON."""
        rows = self.status_rows(name, version, label)
        return {"model_version_status": [
            {"version": str(v), "state": s, "status": {"error_code": "OK", "error_message": ""}} for v, s in rows]}

    def metadata(self, name: str, version: int | None = None, label: str | None = None) -> dict:
        """``GetModelMetadataResponse`` as JSON (``signature_def`` metadata only, as TF Serving)."""
        s = self._get(name, version, label)
        return {"model_spec": {"name": name, "signature_name": "", "version": str(s.version)},
                "metadata": {"signature_def": {"signature_def": s.signature_defs}}}

    def predict(self, name: str, version: int | None, label: str | None, body: bytes) -> dict:
        """``:predict``: parse the request, run the signature, format the response (row or columnar)."""
        s, sig, arrays, rows = self._parse_predict(name, version, label, body)
        outputs = self.run(s, sig, arrays)
        return _format_rows(outputs) if rows else _format_columns(outputs)

    async def handle_async(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        """:meth:`handle` on an asyncio event loop: a ``:predict`` is parsed on the loop and waits for its batch
        on a future (:meth:`run_async`); other requests are answered by :meth:`handle`. Never raises."""
        p = urllib.parse.unquote(path.split("?", 1)[0])
        m = _PREDICT_RE.match(p) if method == "POST" else None
        if m is None or m.group(4).lower() != "predict":
            return self.handle(method, path, body)
        try:
            name, version, label, _ = m.groups()
            s, sig, arrays, rows = self._parse_predict(name, int(version) if version else None, label, body)
            outputs = await self.run_async(s, sig, arrays)
            return 200, _format_rows(outputs) if rows else _format_columns(outputs)
        except RequestError as e:
            return e.status, {"error": e.message}
        except Exception as e:  # a server bug must not take the server down; say what it was
            return 500, {"error": f"Internal: {type(e).__name__}: {e}"}

    def _parse_predict(self, name: str, version: int | None, label: str | None,
                       body: bytes) -> tuple[_Servable, str, dict[str, np.ndarray], bool]:
        """A ``:predict`` body -> (servable, signature, input arrays, row format?).

        The body is parsed by ``orjson`` when it is installed (~8x faster than ``json`` on a request of floats)
        and the result taken only where it is ``json.loads``' own: orjson refuses what ``json`` alone accepts
        (``NaN``, ``Infinity``, lone surrogates, a BOM, UTF-16/32) and turns integers beyond 64 bits into floats,
        so on any orjson error, any request error, or a value of magnitude >= 2^63 (or not finite) in the arrays,
        the body is parsed again by ``json``: answers and error messages are exactly ``json``'s."""
        s = self._get(name, version, label)
        if orjson is not None:
            try:
                parsed = self._predict_request(s, orjson.loads(body))
            except (orjson.JSONDecodeError, RequestError):
                parsed = None
            if parsed is not None and all(a.dtype.kind not in "fc" or bool((np.abs(a) < _EXACT_BOUND).all())
                                          for a in parsed[1].values()):
                return (s, *parsed)
        try:
            req = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _invalid(f"JSON Parse error: {e}") from None
        return (s, *self._predict_request(s, req))

    def _predict_request(self, s: _Servable, req: Any) -> tuple[str, dict[str, np.ndarray], bool]:
        """A parsed ``:predict`` body -> (signature, input arrays, row format?)."""
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
        return sig, arrays, has_rows

    def run(self, s: _Servable, sig: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check ``arrays`` (input name -> ``[B, ...]`` of the signature's dtype) against signature ``sig`` of
        ``s`` and run it: directly, or through the batcher (merged with concurrent requests; each record's
        outputs are the same either way, the signatures compute in fixed 64-row blocks). Returns output name
        -> ``[B, ...]``. Raises :class:`RequestError` (INVALID_ARGUMENT, UNAVAILABLE when the queue is full)."""
        specs = s.inputs[sig]
        feeds = {k: self._check(k, a, specs[k], sig) for k, a in arrays.items()}
        n = {len(a) for a in feeds.values()}
        if self.batcher is not None and len(n) == 1:
            return self.batcher.submit((s.version, sig), s, sig, feeds, n.pop())
        return self._call(s, sig, feeds)

    async def run_async(self, s: _Servable, sig: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """:meth:`run` from an asyncio event loop: through the batcher, a future of the batch's outputs (no
        thread per request); without batching, the call runs on the loop's default executor."""
        import asyncio

        specs = s.inputs[sig]
        feeds = {k: self._check(k, a, specs[k], sig) for k, a in arrays.items()}
        n = {len(a) for a in feeds.values()}
        if self.batcher is not None and len(n) == 1:
            return await self.batcher.submit_async((s.version, sig), s, sig, feeds, n.pop())
        return await asyncio.get_running_loop().run_in_executor(None, self._call, s, sig, feeds)

    def _call(self, s: _Servable, sig: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call of signature ``sig`` of ``s`` on checked ``feeds``; output name -> NumPy array."""
        import tensorflow as tf

        try:
            with self._gate:
                out = s.model.signatures[sig](**feeds)
        except tf.errors.InvalidArgumentError as e:  # TF's own input checks: a bad request, not a crash
            raise _invalid(e.message) from None
        return {k: v.numpy() for k, v in out.items()}

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
        if a.ndim != len(shape) or any(d is not None and d != n for d, n in zip(shape, a.shape)):
            want = "[" + ",".join("-1" if d is None else str(d) for d in shape) + "]"
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


def _format_rows(outputs: dict[str, np.ndarray]) -> dict:
    if len(outputs) == 1:
        return {"predictions": next(iter(outputs.values()))}
    batch = {len(v) for v in outputs.values()}
    if len(batch) != 1:
        raise RequestError(400, "Tensors in the outputs have different batch sizes: use the columnar "
                                 "('inputs') format")
    n = batch.pop()
    return {"predictions": [{k: v[i] for k, v in outputs.items()} for i in range(n)]}


def _format_columns(outputs: dict[str, np.ndarray]) -> dict:
    if len(outputs) == 1:
        return {"outputs": next(iter(outputs.values()))}
    return {"outputs": outputs}
