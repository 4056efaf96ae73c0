"""Clients of a TF Serving model server (``vaestream serve`` or ``tensorflow/serving``) for a vaestream export:
:class:`Client` over REST (standard library + NumPy only) and :class:`GrpcClient` over gRPC (TF Serving's own
``PredictionServiceStub`` / ``ModelServiceStub`` with ``tf.make_tensor_proto``). Both give NumPy codes,
posteriors and reconstructions with the same methods.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

from vaestream.errors import DataError
from vaestream.serving.protocol import DTYPES, GRPC_TO_HTTP, ServingError, dumps


_TOO_LARGE = re.compile(r"Task size (\d+) is larger than maximum input batch size (\d+)")


def _check_max_batch(max_batch: int) -> int:
    if isinstance(max_batch, bool) or not isinstance(max_batch, (int, np.integer)) or max_batch < 1:
        raise DataError(f"max_batch must be a positive number of records per request, got {max_batch!r}")
    return int(max_batch)


def _explain_too_large(e: ServingError, grpc: bool) -> ServingError:
    """The server's "Task size N is larger than maximum input batch size M" with what to do about it; any other
    error as it is."""
    m = _TOO_LARGE.search(e.message)
    if m is None or e.status != 400:
        return e
    limit = int(m.group(2))
    msg = (f"{e.message}: this server takes at most {limit} records per request (its max_batch_size), this "
           f"client sent {m.group(1)}; send at most {limit} per request (Client/GrpcClient max_batch={limit}, "
           f"vaestream client --max-batch {limit}) or raise the server's max_batch_size")
    return ServingError(e.status, msg, e.code if grpc else None)


def _batch_inputs(signature: str, inputs: dict) -> tuple[dict[str, np.ndarray], int]:
    """The inputs of a predict call as arrays, and their common batch size (at least one record)."""
    arrays = {k: np.asarray(v) for k, v in inputs.items()}
    n = {len(a) for a in arrays.values()}
    if len(n) != 1:
        raise DataError(f"inputs have different batch sizes: { {k: len(a) for k, a in arrays.items()} }")
    n = n.pop()
    if n == 0:
        raise DataError(f"{signature}: no records to send")
    return arrays, n


class _ModelApi:
    """The vaestream signatures as methods over :meth:`predict` (signature, inputs -> outputs)."""

    model: str

    def status(self) -> Any:
        raise NotImplementedError

    def _available(self, status: Any) -> bool:
        raise NotImplementedError

    def _address(self) -> str:
        raise NotImplementedError

    def wait_until_available(self, timeout: float = 60.0, interval: float = 0.2) -> Any:
        """Poll the model status until a version is AVAILABLE; returns the status (the REST JSON, or gRPC's
        ``GetModelStatusResponse``). Raises ServingError on timeout."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                st = self.status()
                if self._available(st):
                    return st
            except ServingError as e:
                last = e
            time.sleep(interval)
        raise ServingError(0, f"{self._address()}: model {self.model!r} not available after {timeout} s ({last})")

    def predict(self, signature: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

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



class Client(_ModelApi):
    """A client of TF Serving's REST API (``vaestream serve`` or ``tensorflow/serving``) for a vaestream export.

    Batches larger than ``max_batch`` are sent as several requests, of at most ``max_batch`` records each. A
    server that takes fewer records per request answers INVALID_ARGUMENT ("Task size N is larger than maximum
    input batch size M"): raised as a :class:`ServingError` that names M. Requests use the columnar format (the
    compact one); connections are kept alive (one per thread).

    Args:
      url: the server, e.g. ``http://localhost:8501``.
      model: the model name.
      version: a fixed version (``/versions/N``), or None for the server's latest.
      timeout: seconds per request.
      max_batch: the most records per request (default 1000).
    """

    def __init__(self, url: str = "http://localhost:8501", model: str = "vae", version: int | None = None,
                 timeout: float = 60.0, max_batch: int = 1000):
        u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise DataError(f"{url}: not an http(s) URL")
        self.url, self.model, self.version = url, model, version
        self._scheme, self._host, self._port = u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80)
        self._prefix = u.path.rstrip("/")
        self.timeout, self.max_batch = float(timeout), _check_max_batch(max_batch)
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

    def _available(self, status: dict) -> bool:
        return any(v.get("state") == "AVAILABLE" for v in status.get("model_version_status", []))

    def _address(self) -> str:
        return self.url

    def output_dtypes(self, signature: str) -> dict[str, Any]:
        """Output name -> NumPy dtype of a signature, from the metadata (cached)."""
        if self._dtypes is None:
            sdefs = self.metadata()["metadata"]["signature_def"]["signature_def"]
            self._dtypes = {name: {k: DTYPES.get(v.get("dtype"), np.float32)
                                   for k, v in sd.get("outputs", {}).items()} for name, sd in sdefs.items()}
        if signature not in self._dtypes:
            raise ServingError(400, f"Serving signature name: \"{signature}\" not found in signature def")
        return self._dtypes[signature]

    def predict_raw(self, payload: dict) -> dict:
        """POST a ``:predict`` request body as is; returns the response JSON."""
        return self.request("POST", self._model_path() + ":predict", payload)

    def predict(self, signature: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run ``signature`` on ``inputs`` (name -> ``[B, ...]`` array), in requests of at most ``max_batch``
        records.

        Returns output name -> NumPy array (dtypes from the model metadata), concatenated over requests.

        Raises:
          ServingError: the server's error (one that a request is too large names the server's limit).
        """
        arrays, n = _batch_inputs(signature, inputs)
        dtypes = self.output_dtypes(signature)
        parts: dict[str, list[np.ndarray]] = {}
        for s in range(0, n, self.max_batch):
            payload = {"signature_name": signature,
                       "inputs": {k: a[s:s + self.max_batch] for k, a in arrays.items()}}
            try:
                out = self.predict_raw(payload)["outputs"]
            except ServingError as e:
                raise _explain_too_large(e, grpc=False) from None
            if not isinstance(out, dict):  # a single output comes back unnamed
                out = {next(iter(dtypes)): out}
            for k, v in out.items():
                parts.setdefault(k, []).append(np.asarray(v, dtype=dtypes.get(k, np.float32)))
        return {k: np.concatenate(v) for k, v in parts.items()}


class GrpcClient(_ModelApi):
    """A client of TF Serving's gRPC API (``PredictionService`` / ``ModelService``, port 8500).

    Requests larger than ``max_batch`` records are sent as several ``Predict`` calls (a server that takes
    fewer records per call: a :class:`ServingError` naming its limit, as :class:`Client`). Errors raise
    :class:`ServingError` with the gRPC status name in ``code`` (``"NOT_FOUND"``, ``"INVALID_ARGUMENT"``,
    ``"UNAVAILABLE"``, ...) and the matching HTTP status in ``status``.

    Args:
      target: ``host:port`` of the gRPC server, e.g. ``localhost:8500``.
      model: the model name.
      version: a fixed version, or None for the server's latest.
      timeout: seconds per call.
      max_batch: the most records per call (default 1000).
      max_message_bytes: the largest message sent or received.
    """

    def __init__(self, target: str = "localhost:8500", model: str = "vae", version: int | None = None,
                 timeout: float = 60.0, max_batch: int = 1000, max_message_bytes: int = 64 << 20):
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.target, self.model, self.version = target, model, version
        self.timeout, self.max_batch = float(timeout), _check_max_batch(max_batch)
        opts = [("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes)]
        self._channel = grpc.insecure_channel(target, options=opts)
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def _spec(self, spec: Any, signature: str = "") -> None:
        spec.name = self.model
        if signature:
            spec.signature_name = signature
        if self.version is not None:
            spec.version.value = int(self.version)

    def _call(self, method: Any, request: Any) -> Any:
        import grpc

        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            code = e.code().name if e.code() is not None else "UNKNOWN"
            raise ServingError(GRPC_TO_HTTP.get(code, 500), str(e.details()), code) from None

    def status(self) -> Any:
        """``GetModelStatusResponse`` (proto)."""
        from tensorflow_serving.apis import get_model_status_pb2

        req = get_model_status_pb2.GetModelStatusRequest()
        self._spec(req.model_spec)
        return self._call(self._models.GetModelStatus, req)

    def metadata(self) -> dict[str, Any]:
        """Signature name -> ``SignatureDef`` (proto), from ``GetModelMetadata``."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(req.model_spec)
        resp = self._call(self._predict.GetModelMetadata, req)
        sdm = get_model_metadata_pb2.SignatureDefMap()
        resp.metadata["signature_def"].Unpack(sdm)
        return dict(sdm.signature_def)

    def _available(self, status: Any) -> bool:
        from tensorflow_serving.apis import get_model_status_pb2

        return any(v.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE for v in status.model_version_status)

    def _address(self) -> str:
        return self.target

    def predict_proto(self, signature: str, inputs: dict[str, np.ndarray]) -> Any:
        """One ``Predict`` call (no splitting); returns the ``PredictResponse``."""
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        req = predict_pb2.PredictRequest()
        self._spec(req.model_spec, signature)
        for k, a in inputs.items():
            req.inputs[k].CopyFrom(tf.make_tensor_proto(a))
        return self._call(self._predict.Predict, req)

    def predict(self, signature: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run ``signature`` on ``inputs`` (name -> ``[B, ...]`` array), in calls of ``max_batch`` records.
        Returns output name -> NumPy array ``[B, ...]``, concatenated over calls."""
        import tensorflow as tf

        arrays, n = _batch_inputs(signature, inputs)
        parts: dict[str, list[np.ndarray]] = {}
        for s in range(0, n, self.max_batch):
            try:
                resp = self.predict_proto(signature, {k: a[s:s + self.max_batch] for k, a in arrays.items()})
            except ServingError as e:
                raise _explain_too_large(e, grpc=True) from None
            for k, t in resp.outputs.items():
                parts.setdefault(k, []).append(tf.make_ndarray(t))
        return {k: np.concatenate(v) for k, v in parts.items()}


def load_inputs(path: str | Path, key: str | None = None) -> np.ndarray:
    """Records from a data file (IDX, .npy/.npz, CSV, ... see :func:`vaestream.data.read_array`) as float32
    model inputs ``[N, D]`` by the input-scaling rule of every entry point (:func:`vaestream.data.input_scale`:
    8-bit counts, e.g. uint8 or an integer CSV, x 1/255; floats as they are)."""
    from vaestream.data import model_inputs, read_array

    a = read_array(path, key=key)
    if a.ndim < 1 or len(a) == 0:
        raise DataError(f"{path}: no records")
    a = a.reshape(len(a), -1)
    if a.dtype.kind not in "biuf":
        raise DataError(f"{path}: records of dtype {a.dtype} are not numbers")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise DataError(f"{path}: records hold NaN or infinite values")
    return model_inputs(a)


def run_client(url: str, model: str, action: str, input_path: str | None = None, output: str | None = None,
               version: int | None = None, key: str | None = None, max_batch: int = 1000) -> dict:
    """The ``vaestream client`` command: ``status`` / ``metadata`` return the server's JSON; ``encode`` /
    ``quantize`` / ``reconstruct`` / ``elbo`` read records from ``input_path`` and write the outputs to
    ``output`` (.npz, one array per output name); ``decode`` reads latents ``z [B, Nz]``. ``url``
    ``grpc://HOST:PORT`` speaks gRPC, anything else REST. Inputs go in requests of at most ``max_batch``
    records.

    Returns a JSON-able summary: action, records (read and answered), requests, out, seconds (wall seconds of
    the whole call: reading, requests, writing), records_per_second and the outputs' dtypes and shapes
    (``elbo``: the mean ELBO and rate; ``reconstruct``: MSE and PSNR).

    Raises:
      DataError: bad input or arguments.  ServingError: the server's error.
    """
    t = time.perf_counter()
    max_batch = _check_max_batch(max_batch)
    if url.startswith("grpc://"):  # TF Serving's gRPC port: the same actions over PredictionService
        from google.protobuf import json_format

        c: Client | GrpcClient = GrpcClient(url[len("grpc://"):], model, version, max_batch=max_batch)
        if action == "status":
            return json_format.MessageToDict(c.status(), preserving_proto_field_name=True)
        if action == "metadata":
            return {k: json_format.MessageToDict(v, preserving_proto_field_name=True)
                    for k, v in c.metadata().items()}
    else:
        c = Client(url, model, version, max_batch=max_batch)
        if action == "status":
            return c.status()
        if action == "metadata":
            return c.metadata()
    if input_path is None or output is None:
        raise DataError(f"client {action}: needs --input and --out")
    x = None
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
    summary: dict[str, Any] = {"action": action, "records": n, "requests": -(-n // max_batch), "out": str(output),
                               "seconds": round(secs, 3), "records_per_second": round(n / max(secs, 1e-9), 1),
                               "outputs": {k: [str(v.dtype), list(v.shape)] for k, v in out.items()}}
    if action == "elbo":
        summary["mean_elbo_nats"] = float(np.mean(out["elbo"]))
        summary["mean_rate_nats"] = float(np.mean(out["rate"]))
    if action == "reconstruct":
        summary["mse"] = float(np.mean((out["x_hat"] - x) ** 2))
        summary["psnr_db"] = float(10 * math.log10(1.0 / max(summary["mse"], 1e-12)))
    return summary
