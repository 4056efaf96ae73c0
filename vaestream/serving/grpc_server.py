"""``vaestream serve``'s gRPC port: TF Serving's ``PredictionService`` and ``ModelService`` on ``grpcio``.

The messages and service stubs are TF Serving's own, from the ``tensorflow-serving-api`` package
(``tensorflow_serving.apis``), so TF Serving's clients (``prediction_service_pb2_grpc.PredictionServiceStub``
with ``tf.make_tensor_proto``) work unchanged against ``vaestream serve``, and vaestream's
:class:`vaestream.serving.client.GrpcClient` against ``tensorflow/serving``. Implemented:

* ``PredictionService.Predict`` — ``PredictRequest`` (``model_spec`` name / version / signature_name,
  ``inputs`` name -> TensorProto ``[B, ...]``, optional ``output_filter``) -> ``PredictResponse``
  (``model_spec`` with the version served, ``outputs`` name -> TensorProto ``[B, ...]``);
* ``PredictionService.GetModelMetadata`` — ``metadata_field: "signature_def"`` -> a packed
  ``SignatureDefMap`` of the SavedModel;
* ``ModelService.GetModelStatus`` — AVAILABLE / END per version.

``Classify``, ``Regress``, ``MultiInference`` and ``HandleReloadConfigRequest`` answer UNIMPLEMENTED (the
stubs' defaults): our signatures are predict signatures. Status codes are TF Serving's: NOT_FOUND for an
unknown model or version, FAILED_PRECONDITION for an unknown signature (``Serving signature key "S" not
found.``, as TF Serving's predict_util), INVALID_ARGUMENT for missing / extra inputs, wrong dtype, shape or
batch size, UNAVAILABLE when the batching queue is full, INTERNAL for a server bug.

``Predict`` works on the wire bytes: the request is parsed by protobuf (upb) and each input's ``tensor_content``
becomes a NumPy view (``np.frombuffer``, no ``tf.make_ndarray``; inputs sent in the typed ``*_val`` fields go
through ``tf.make_ndarray``), and the response is written directly in the protobuf wire format (the outputs'
bytes as ``tensor_content``, the ``ModelSpec`` serialised once per version and signature): the tensors
``tf.make_tensor_proto`` builds, field for field when a tensor holds several values (a single value goes in
``tensor_content`` too, where ``make_tensor_proto`` uses the typed field; ``tf.make_ndarray`` reads both).
Two servers: :func:`make_grpc_server` (grpcio's thread pool; a request waits for its batch on its thread) and
:func:`make_grpc_aio_server` (``grpc.aio``: the requests are coroutines on one event loop and wait for their
batch on futures, with no thread per request).
"""

from __future__ import annotations

import functools
from concurrent import futures
from typing import Any

import numpy as np

from vaestream.serving.protocol import RequestError
from vaestream.serving.server import DEFAULT_SIGNATURE, ModelServer


def _invalid(msg: str) -> RequestError:
    return RequestError(400, msg, "INVALID_ARGUMENT")


def _version(spec: Any) -> tuple[int | None, str | None]:
    """(version or None, label or None) of a ``ModelSpec``."""
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return int(spec.version.value), None
    if choice == "version_label":
        return None, spec.version_label
    return None, None


def _dtype_name(enum: int) -> str:
    """TF's DataTypeString: DT_FLOAT -> "float", DT_DOUBLE -> "double" (as in TF Serving's messages)."""
    from tensorflow.core.framework import types_pb2

    try:
        return types_pb2.DataType.Name(enum).removeprefix("DT_").lower()
    except ValueError:
        return f"an unknown dtype ({enum})"


@functools.lru_cache(maxsize=None)
def _numpy_dtype(enum: int) -> np.dtype | None:
    """The NumPy dtype of a TF DataType enum whose ``tensor_content`` is its raw little-endian values (None for
    strings, resources, variants and unknown enums)."""
    import tensorflow as tf

    try:
        dt = np.dtype(tf.as_dtype(enum).as_numpy_dtype)
    except (TypeError, ValueError):
        return None
    return dt if dt.kind in "biufc" else None


def tensor_array(tp: Any, name: str) -> np.ndarray:
    """A TensorProto as a NumPy array: a read-only view of ``tensor_content`` ``[d0, d1, ...]`` when the values
    are there (as ``tf.make_tensor_proto`` puts them), else ``tf.make_ndarray`` (the typed ``*_val`` fields).

    Raises:
      RequestError: INVALID_ARGUMENT for a malformed TensorProto (content size not ``prod(dims) * itemsize``,
        negative dimensions).
    """
    content = tp.tensor_content
    dt = _numpy_dtype(tp.dtype) if content else None
    if dt is None:
        import tensorflow as tf

        try:
            return tf.make_ndarray(tp)
        except Exception as e:  # a malformed TensorProto: the client's fault
            raise _invalid(f"input '{name}': malformed TensorProto ({type(e).__name__}: {e})") from None
    dims = [d.size for d in tp.tensor_shape.dim]
    count = 1
    for d in dims:
        count *= d
    if min(dims, default=0) < 0 or len(content) != count * dt.itemsize:
        raise _invalid(f"input '{name}': malformed TensorProto (tensor_content of {len(content)} bytes for shape "
                       f"{dims} of {dt.name})")
    return np.frombuffer(content, dt).reshape(dims)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field: tag (``number << 3 | 2``), length, payload."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


@functools.lru_cache(maxsize=4096)
def _tensor_head(enum: int, shape: tuple[int, ...]) -> bytes:
    """A TensorProto's ``dtype`` and ``tensor_shape`` fields (``TensorShapeProto.dim[i].size``)."""
    dims = b"".join(_field(2, b"\x08" + _varint(d)) for d in shape)
    return b"\x08" + _varint(enum) + _field(2, dims)


@functools.lru_cache(maxsize=64)
def _dtype_enum(dt: np.dtype) -> int:
    import tensorflow as tf

    return tf.as_dtype(dt).as_datatype_enum


def tensor_bytes(a: np.ndarray) -> bytes:
    """The serialised TensorProto of a numeric array: dtype, shape, ``tensor_content`` (little-endian C-order
    values) — what ``tf.make_tensor_proto(a).SerializeToString()`` parses to. Other arrays (strings) go through
    ``tf.make_tensor_proto``."""
    if a.dtype.kind not in "biufc" or a.dtype.byteorder == ">":
        import tensorflow as tf

        return tf.make_tensor_proto(a).SerializeToString()
    return _tensor_head(_dtype_enum(a.dtype), a.shape) + _field(4, np.ascontiguousarray(a).tobytes())


def predict_response_bytes(spec: bytes, outputs: dict[str, np.ndarray], names: list[str]) -> bytes:
    """A serialised ``PredictResponse``: ``outputs`` (field 1, map entries name -> TensorProto) of ``names`` and
    the serialised ``ModelSpec`` ``spec`` (field 2)."""
    entries = [_field(1, _field(1, n.encode()) + _field(2, tensor_bytes(outputs[n]))) for n in names]
    return b"".join(entries) + _field(2, spec)


@functools.lru_cache(maxsize=256)
def _spec_bytes(name: str, version: int, signature: str) -> bytes:
    from tensorflow_serving.apis import model_pb2

    spec = model_pb2.ModelSpec(name=name, signature_name=signature)
    spec.version.value = version
    return spec.SerializeToString()


def _model_name(spec: Any) -> str:
    if not spec.name:
        raise _invalid("Missing ModelSpec")
    return spec.name


class _Handlers:
    """The request logic of the three RPCs, on a :class:`ModelServer`; each raises :class:`RequestError`.
    ``Predict`` takes and returns wire bytes."""

    def __init__(self, ms: ModelServer):
        self.ms = ms

    def parse_predict(self, data: bytes) -> tuple[Any, str, dict[str, np.ndarray], list[str], bytes]:
        """Parse and check a serialised ``PredictRequest``: (servable, signature, input arrays, the output names
        to answer or [] for all, the serialised ModelSpec of the answer)."""
        from google.protobuf.message import DecodeError
        from tensorflow_serving.apis import predict_pb2

        try:
            request = predict_pb2.PredictRequest.FromString(data)
        except DecodeError as e:
            raise _invalid(f"cannot parse the PredictRequest: {e}") from None
        spec = request.model_spec
        version, label = _version(spec)
        s = self.ms.get(_model_name(spec), version, label)
        sig = spec.signature_name or DEFAULT_SIGNATURE
        if sig not in s.inputs:
            raise RequestError(400, f'Serving signature key "{sig}" not found.', "FAILED_PRECONDITION")
        specs = s.inputs[sig]
        inputs = request.inputs
        sent, want = set(inputs), set(specs)
        if sent != want:
            raise _invalid(f"input size does not match signature: {len(sent)}!={len(want)} len({sorted(sent)}) != "
                           f"len({sorted(want)}). Sent extra: {sorted(sent - want)}. Missing but required: "
                           f"{sorted(want - sent)}.")
        arrays: dict[str, np.ndarray] = {}
        for k, tp in inputs.items():
            want_enum = _dtype_enum(np.dtype(specs[k][0]))
            if tp.dtype != want_enum:
                raise _invalid(f"Expects arg[{k}] to be {_dtype_name(want_enum)} but {_dtype_name(tp.dtype)} is "
                               "provided")
            arrays[k] = tensor_array(tp, k)
        return s, sig, arrays, list(request.output_filter), _spec_bytes(spec.name, s.version, sig)

    @staticmethod
    def answer(out: dict[str, np.ndarray], names: list[str], spec: bytes) -> bytes:
        """The serialised ``PredictResponse`` of the signature's outputs ``out`` (``names``: the output filter)."""
        names = names or list(out)
        unknown = [n for n in names if n not in out]
        if unknown:
            raise _invalid(f"output tensor alias not found in signature: {unknown[0]} Outputs expected to be in "
                           f"the set {{{','.join(sorted(out))}}}.")
        return predict_response_bytes(spec, out, names)

    def predict(self, data: bytes) -> bytes:
        s, sig, arrays, names, spec = self.parse_predict(data)
        return self.answer(self.ms.run(s, sig, arrays), names, spec)

    async def predict_async(self, data: bytes) -> bytes:
        s, sig, arrays, names, spec = self.parse_predict(data)
        return self.answer(await self.ms.run_async(s, sig, arrays), names, spec)

    def metadata(self, request: Any) -> Any:
        from tensorflow_serving.apis import get_model_metadata_pb2

        fields = list(request.metadata_field)
        if not fields:
            raise _invalid("GetModelMetadataRequest must specify at least one metadata_field")
        for f in fields:
            if f != "signature_def":
                raise _invalid(f"Metadata field {f} is not supported")
        spec = request.model_spec
        version, label = _version(spec)
        s = self.ms.get(_model_name(spec), version, label)
        resp = get_model_metadata_pb2.GetModelMetadataResponse()
        resp.model_spec.name = spec.name
        resp.model_spec.version.value = s.version
        sdm = get_model_metadata_pb2.SignatureDefMap()
        for name, sd in s.signature_protos.items():
            sdm.signature_def[name].CopyFrom(sd)
        resp.metadata["signature_def"].Pack(sdm)
        return resp

    def status(self, request: Any) -> Any:
        from tensorflow_serving.apis import get_model_status_pb2

        spec = request.model_spec
        version, label = _version(spec)
        rows = self.ms.status_rows(_model_name(spec), version, label)
        resp = get_model_status_pb2.GetModelStatusResponse()
        states = {"AVAILABLE": get_model_status_pb2.ModelVersionStatus.AVAILABLE,
                  "END": get_model_status_pb2.ModelVersionStatus.END}
        for v, state in rows:
            mvs = resp.model_version_status.add()
            mvs.version = v
            mvs.state = states[state]
            mvs.status.error_code = 0  # tensorflow.error.OK
        return resp


def _status(e: Exception) -> tuple[Any, str]:
    """The gRPC status code and details of a handler's exception: a :class:`RequestError`'s own, else INTERNAL."""
    import grpc

    if isinstance(e, RequestError):
        return getattr(grpc.StatusCode, e.code, grpc.StatusCode.UNKNOWN), e.message
    return grpc.StatusCode.INTERNAL, f"Internal: {type(e).__name__}: {e}"


def _sync(fn):
    def method(request, context):
        try:
            return fn(request)
        except Exception as e:  # a server bug must not take the server down; say what it was
            context.abort(*_status(e))

    return method


def _async(fn):
    async def method(request, context):
        try:
            return await fn(request)
        except Exception as e:  # a server bug must not take the server down; say what it was
            await context.abort(*_status(e))

    return method


def _generic_handlers(h: _Handlers, aio: bool) -> tuple:
    """PredictionService (``Predict`` on bytes, ``GetModelMetadata``) and ModelService (``GetModelStatus``);
    the RPCs not listed answer UNIMPLEMENTED."""
    import grpc
    from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2

    def plain(fn):
        if not aio:
            return _sync(fn)

        async def call(request):
            return fn(request)
        return _async(call)

    predict = _async(h.predict_async) if aio else _sync(h.predict)
    meta = grpc.unary_unary_rpc_method_handler(
        plain(h.metadata), request_deserializer=get_model_metadata_pb2.GetModelMetadataRequest.FromString,
        response_serializer=get_model_metadata_pb2.GetModelMetadataResponse.SerializeToString)
    status = grpc.unary_unary_rpc_method_handler(
        plain(h.status), request_deserializer=get_model_status_pb2.GetModelStatusRequest.FromString,
        response_serializer=get_model_status_pb2.GetModelStatusResponse.SerializeToString)
    return (grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", {
                "Predict": grpc.unary_unary_rpc_method_handler(predict), "GetModelMetadata": meta}),
            grpc.method_handlers_generic_handler("tensorflow.serving.ModelService", {"GetModelStatus": status}))


def _options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes), ("grpc.so_reuseport", 0)]


def _bind(server: Any, host: str, port: int) -> int:
    from vaestream.errors import ModelError

    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(addr)
    except RuntimeError as e:
        raise ModelError(f"gRPC: cannot bind {addr}: {e}") from None
    if not bound:
        raise ModelError(f"gRPC: cannot bind {addr}")
    return bound


def make_grpc_server(ms: ModelServer, host: str = "127.0.0.1", port: int = 8500,
                     max_message_bytes: int = 64 << 20, max_threads: int = 64) -> tuple[Any, int]:
    """A thread-pool ``grpc.Server`` (not yet started) with PredictionService and ModelService over ``ms``,
    bound to ``host:port`` (``port=0``: a free port). Returns (server, bound port).

    Raises:
      ModelError: the port cannot be bound.
    """
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="grpc"),
                         options=_options(max_message_bytes))
    server.add_generic_rpc_handlers(_generic_handlers(_Handlers(ms), aio=False))
    return server, _bind(server, host, port)


def make_grpc_aio_server(ms: ModelServer, host: str = "127.0.0.1", port: int = 8500,
                         max_message_bytes: int = 64 << 20) -> tuple[Any, int]:
    """:func:`make_grpc_server` on ``grpc.aio`` (call it on the running event loop; ``await server.start()``):
    requests are coroutines on the loop; a predict waits for its batch on a future (or, without batching, runs
    on the loop's default executor)."""
    import grpc

    server = grpc.aio.server(options=_options(max_message_bytes))
    server.add_generic_rpc_handlers(_generic_handlers(_Handlers(ms), aio=True))
    return server, _bind(server, host, port)
