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
"""

from __future__ import annotations

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


def _model_name(spec: Any) -> str:
    if not spec.name:
        raise _invalid("Missing ModelSpec")
    return spec.name


class _Handlers:
    """The request logic of the three RPCs, on a :class:`ModelServer`; each raises :class:`RequestError`."""

    def __init__(self, ms: ModelServer):
        self.ms = ms

    def predict(self, request: Any) -> Any:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        spec = request.model_spec
        version, label = _version(spec)
        s = self.ms.get(_model_name(spec), version, label)
        sig = spec.signature_name or DEFAULT_SIGNATURE
        if sig not in s.inputs:
            raise RequestError(400, f'Serving signature key "{sig}" not found.', "FAILED_PRECONDITION")
        specs = s.inputs[sig]
        sent, want = set(request.inputs), set(specs)
        if sent != want:
            raise _invalid(f"input size does not match signature: {len(sent)}!={len(want)} len({sorted(sent)}) != "
                           f"len({sorted(want)}). Sent extra: {sorted(sent - want)}. Missing but required: "
                           f"{sorted(want - sent)}.")
        arrays: dict[str, np.ndarray] = {}
        for k, tp in request.inputs.items():
            want = tf.as_dtype(specs[k][0]).as_datatype_enum
            if tp.dtype != want:
                raise _invalid(f"Expects arg[{k}] to be {_dtype_name(want)} but {_dtype_name(tp.dtype)} is provided")
            try:
                arrays[k] = tf.make_ndarray(tp)
            except Exception as e:  # a malformed TensorProto (content size, shape): the client's fault
                raise _invalid(f"input '{k}': malformed TensorProto ({type(e).__name__}: {e})") from None
        out = self.ms.run(s, sig, arrays)
        names = list(request.output_filter) or list(out)
        unknown = [n for n in names if n not in out]
        if unknown:
            raise _invalid(f"output tensor alias not found in signature: {unknown[0]} Outputs expected to be in "
                           f"the set {{{','.join(sorted(out))}}}.")
        resp = predict_pb2.PredictResponse()
        resp.model_spec.name = spec.name
        resp.model_spec.version.value = s.version
        resp.model_spec.signature_name = sig
        for n in names:
            resp.outputs[n].CopyFrom(tf.make_tensor_proto(out[n]))
        return resp

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


def _rpc(fn):
    """An RPC method: :class:`RequestError` -> its status code, anything else -> INTERNAL."""
    import grpc

    def method(self, request, context):
        try:
            return fn(self.handlers, request)
        except RequestError as e:
            context.abort(getattr(grpc.StatusCode, e.code, grpc.StatusCode.UNKNOWN), e.message)
        except Exception as e:  # a server bug must not take the server down; say what it was
            context.abort(grpc.StatusCode.INTERNAL, f"Internal: {type(e).__name__}: {e}")

    method.__name__ = fn.__name__
    return method


def make_grpc_server(ms: ModelServer, host: str = "127.0.0.1", port: int = 8500,
                     max_message_bytes: int = 64 << 20, max_threads: int = 64) -> tuple[Any, int]:
    """A ``grpc.Server`` (not yet started) with PredictionService and ModelService over ``ms``, bound to
    ``host:port`` (``port=0``: a free port). Returns (server, bound port).

    Raises:
      ModelError: the port cannot be bound.
    """
    import grpc
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    from vaestream.errors import ModelError

    handlers = _Handlers(ms)

    class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
        Predict = _rpc(_Handlers.predict)
        GetModelMetadata = _rpc(_Handlers.metadata)

    class ModelService(model_service_pb2_grpc.ModelServiceServicer):
        GetModelStatus = _rpc(_Handlers.status)

    PredictionService.handlers = ModelService.handlers = handlers
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="grpc"),
                         options=[("grpc.max_receive_message_length", max_message_bytes),
                                  ("grpc.max_send_message_length", max_message_bytes),
                                  ("grpc.so_reuseport", 0)])
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(), server)
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(addr)
    except RuntimeError as e:
        raise ModelError(f"gRPC: cannot bind {addr}: {e}") from None
    if not bound:
        raise ModelError(f"gRPC: cannot bind {addr}")
    return server, bound
