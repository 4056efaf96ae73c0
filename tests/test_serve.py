"""``vaestream serve`` over loopback: TF Serving's REST surface (status, metadata, predict in row and columnar
format), the client (Python class, ``vaestream client`` and ``deploy/client.py``), bad requests answered with
TF Serving-style JSON errors, concurrent load, and hot-loading a new version."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vaestream.serving.export import ExportedModel, export
from vaestream.serving.client import Client
from vaestream.serving.protocol import ServingError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
MAX_BATCH = 64
MAX_BYTES = 4 << 20


@pytest.fixture(scope="module")
def records(mnist_test) -> np.ndarray:
    return mnist_test[:40].reshape(40, -1).astype(np.float32) / np.float32(255)


@pytest.fixture(scope="module")
def export_base(small_model, mnist_test, tmp_path_factory) -> Path:
    from vaestream.coding.codec import write_tables

    model_dir = tmp_path_factory.mktemp("serve_model")
    shutil.copytree(small_model.model_dir, model_dir, dirs_exist_ok=True)
    write_tables(model_dir, mnist_test[2000:3000])
    base = tmp_path_factory.mktemp("serve_exports")
    export(model_dir, base)
    (base / "model_dir.txt").write_text(str(model_dir))  # not a version: ignored by servers
    return base


@pytest.fixture(scope="module")
def local(export_base) -> ExportedModel:
    return ExportedModel(export_base)


def start_serve(export_base: Path, *flags: str) -> tuple[subprocess.Popen, dict]:
    """``vaestream serve`` on ``export_base`` in a subprocess, gRPC and REST on ephemeral loopback ports, with
    ``flags``; returns (process, the JSON line it prints once both ports accept connections)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vaestream.cli", "serve", "--model_base_path", str(export_base), "--model_name",
         "vae", "--port", "0", "--rest_api_port", "0", "--host", "127.0.0.1", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    line = proc.stdout.readline()  # blocks until the server is up (or died)
    if not line:
        proc.kill()
        pytest.fail(f"vaestream serve did not start: {proc.stderr.read()[-3000:]}")
    return proc, json.loads(line)


def stop_serve(proc: subprocess.Popen) -> None:
    """SIGTERM the server and check that it shuts down cleanly (exit 0)."""
    if proc.poll() is None:
        proc.terminate()
    try:
        assert proc.wait(timeout=20) == 0  # SIGTERM: a clean shutdown
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def serving(export_base):
    """``vaestream serve`` in a subprocess, gRPC and REST on ephemeral loopback ports; yields
    {"proc", "rest": URL, "grpc": HOST:PORT}."""
    proc, info = start_serve(export_base, "--max_batch_size", str(MAX_BATCH), "--max_request_bytes", str(MAX_BYTES),
                             "--file_system_poll_wait_seconds", "0.3")
    assert info["versions"] == [1]
    yield {"proc": proc, "rest": f"http://127.0.0.1:{info['rest_api_port']}", "grpc": f"127.0.0.1:{info['port']}"}
    stop_serve(proc)


@pytest.fixture(scope="module")
def server(serving) -> str:
    """The REST base URL of the module's server."""
    return serving["rest"]


def raw(url: str, method: str, path: str, body: bytes | str | None = None,
        headers: dict | None = None) -> tuple[int, dict]:
    """One request on a fresh connection, bounded by a timeout; (status, JSON body)."""
    u = url.split("://", 1)[1]
    host, port = u.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body.encode() if isinstance(body, str) else body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        assert r.getheader("Content-Type") == "application/json"
        return r.status, json.loads(data)
    finally:
        conn.close()


def post(url: str, payload, path: str = "/v1/models/vae:predict") -> tuple[int, dict]:
    return raw(url, "POST", path, payload if isinstance(payload, str) else json.dumps(payload))


# -- the REST surface ------------------------------------------------------------------------------------------
def test_status_and_metadata(server):
    status, body = raw(server, "GET", "/v1/models/vae")
    assert status == 200
    assert body == {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                              "status": {"error_code": "OK", "error_message": ""}}]}
    assert raw(server, "GET", "/v1/models/vae/versions/1")[1] == body
    status, meta = raw(server, "GET", "/v1/models/vae/metadata")
    assert status == 200
    assert meta["model_spec"] == {"name": "vae", "signature_name": "", "version": "1"}
    sdefs = meta["metadata"]["signature_def"]["signature_def"]
    assert {"encode", "decode", "quantize", "reconstruct", "elbo", "serving_default"} <= set(sdefs)
    enc = sdefs["serving_default"]
    assert enc["method_name"] == "tensorflow/serving/predict"
    assert enc["inputs"]["x"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in enc["inputs"]["x"]["tensor_shape"]["dim"]] == ["-1", "784"]
    assert sdefs["quantize"]["outputs"]["symbols"]["dtype"] == "DT_INT32"


def test_predict_row_and_columnar_formats_match_the_savedmodel(server, local, records):
    x = records[:5]
    mean, log_scale = local.encode(x)
    # row format, default signature, several outputs: a list of objects
    status, body = post(server, {"instances": x.tolist()})
    assert status == 200 and len(body["predictions"]) == 5
    got = np.array([r["mean"] for r in body["predictions"]], np.float32)
    np.testing.assert_array_equal(got, mean)  # float32 values survive the JSON round trip exactly
    # named instances
    status, body2 = post(server, {"signature_name": "encode", "instances": [{"x": r} for r in x.tolist()]})
    assert status == 200 and body2 == body
    # columnar format: an object of tensors
    status, body = post(server, {"signature_name": "encode", "inputs": {"x": x.tolist()}})
    assert status == 200
    np.testing.assert_array_equal(np.array(body["outputs"]["log_scale"], np.float32), log_scale)
    # a single output is unnamed: predictions is the list of rows, outputs the tensor
    symbols = local.quantize(x)
    status, body = post(server, {"signature_name": "quantize", "instances": x.tolist()})
    assert status == 200 and body["predictions"] == symbols.tolist()
    status, body = post(server, {"signature_name": "quantize", "inputs": x.tolist()})
    assert status == 200 and body["outputs"] == symbols.tolist()
    # an explicit version
    status, body = post(server, {"signature_name": "reconstruct", "inputs": x.tolist()},
                        "/v1/models/vae/versions/1:predict")
    assert status == 200
    np.testing.assert_array_equal(np.array(body["outputs"], np.float32), local.reconstruct(x))


def test_client_codes_and_reconstructions(server, local, records):
    c = Client(server, "vae", max_batch=7)  # 40 records: 6 requests per call
    try:
        assert c.wait_until_available(timeout=10)["model_version_status"][0]["version"] == "1"
        mean, log_scale = c.encode(records)  # batches of 7 against one of 40: round-off at most
        want_mean, want_ls = local.encode(records)
        np.testing.assert_allclose(mean, want_mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(log_scale, want_ls, rtol=1e-6, atol=1e-6)
        codes = c.quantize(records)
        assert codes.dtype == np.int32 and codes.shape == (40, local.config.latent_dim)
        np.testing.assert_array_equal(codes, local.quantize(records))
        np.testing.assert_allclose(c.reconstruct(records), local.reconstruct(records), rtol=1e-6, atol=1e-6)
        dec = c.decode(want_mean)
        assert set(dec) == {"x_mean", "logits"}
        np.testing.assert_allclose(dec["x_mean"], local.decode(want_mean)["x_mean"], rtol=1e-6, atol=1e-6)
        e = c.elbo(records)  # fixed noise: a record's ELBO does not depend on its batch
        np.testing.assert_allclose(e["elbo"], local.elbo(records)["elbo"], rtol=1e-5)
        # the codes are what the codec entropy-codes: decode them from the SavedModel alone
        from vaestream.coding import codec

        cc = codec.load(local.path)
        np.testing.assert_allclose(cc.decode(codes), c.reconstruct(records), rtol=1e-6, atol=1e-6)
    finally:
        c.close()


def test_json_writer_is_exact_and_tf_serving_compatible():
    """float32 values written with 9 significant digits parse back bit-identical; NaN / Infinity are written
    as TF Serving's tokens; ints stay ints."""
    from vaestream.serving.protocol import dumps

    rng = np.random.default_rng(0)
    a = np.concatenate([rng.standard_normal(5000), rng.uniform(0, 1, 5000) * 10.0 ** rng.integers(-30, 30, 5000)])
    a = a.astype(np.float32).reshape(100, 100)
    back = np.array(json.loads(dumps({"outputs": a}))["outputs"], np.float32)
    assert back.tobytes() == a.tobytes()
    special = np.array([np.nan, np.inf, -np.inf, -0.0], np.float32)
    assert dumps(special) == "[NaN, Infinity, -Infinity, -0.0]"
    assert dumps({"s": np.array([[1, -2]], np.int32), "k": "v"}) == '{"s":[[1, -2]],"k":"v"}'


# -- bad requests ----------------------------------------------------------------------------------------------
BAD = [
    # (name, payload or raw string, path, HTTP status, fragment of the error)
    ("wrong shape", {"instances": [[0.5] * 783]}, None, 400, "shape [1, 783]"),
    ("wrong rank", {"inputs": [0.5] * 784}, None, 400, "shape [784]"),
    ("string values", {"instances": [["a"] * 784]}, None, 400, "string"),
    ("bool values", {"instances": [[True] * 784]}, None, 400, "bool"),
    ("nulls", {"instances": [[None] * 784]}, None, 400, "null"),
    ("ragged", {"instances": [[0.5] * 784, [0.5] * 3]}, None, 400, "ragged"),
    ("float codes", {"signature_name": "decode", "instances": [[0.5] * 10]}, None, 200, None),
    ("unknown signature", {"signature_name": "nope", "instances": [[0.5] * 784]}, None, 400,
     'Serving signature name: "nope" not found'),
    ("unknown version", {"instances": [[0.5] * 784]}, "/v1/models/vae/versions/9:predict", 404,
     "Servable not found for request: Specific(vae, 9)"),
    ("unknown model", {"instances": [[0.5] * 784]}, "/v1/models/other:predict", 404,
     "Servable not found for request: Latest(other)"),
    ("oversized batch", {"inputs": [[0.5] * 784] * (MAX_BATCH + 1)}, None, 400,
     f"larger than maximum input batch size {MAX_BATCH}"),
    ("oversized instances", {"instances": [[0.5] * 784] * (MAX_BATCH + 1)}, None, 400, "Task size"),
    ("malformed JSON", '{"instances": [[0.5', None, 400, "JSON Parse error"),
    ("not an object", "[1, 2]", None, 400, "not an object"),
    ("both formats", {"instances": [[0.5] * 784], "inputs": [[0.5] * 784]}, None, 400, "Both"),
    ("neither format", {"signature_name": "encode"}, None, 400, "Missing 'inputs' or 'instances'"),
    ("empty instances", {"instances": []}, None, 400, "non-empty"),
    ("wrong input name", {"inputs": {"z": [[0.5] * 784]}}, None, 400, "do not match"),
    ("classify", {"examples": []}, "/v1/models/vae:classify", 400, ":predict only"),
    ("malformed URL", {"instances": [[0.5] * 784]}, "/v1/models/vae/predict", 400, "Malformed request"),
]


@pytest.mark.parametrize("name,payload,path,code,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_tf_serving_style_errors(server, name, payload, path, code, fragment):
    status, body = post(server, payload, path or "/v1/models/vae:predict")
    assert status == code, body
    if fragment is None:
        assert "outputs" not in body and "predictions" in body
    else:
        assert set(body) == {"error"} and fragment in body["error"], body


def test_bad_gets_oversized_bodies_and_the_server_survives(server):
    assert raw(server, "GET", "/v1/models/other")[0] == 404
    assert raw(server, "GET", "/v1/models/vae/versions/4")[0] == 404
    assert raw(server, "GET", "/v1/nothing")[0] == 400
    status, body = raw(server, "DELETE", "/v1/models/vae")
    assert status == 400 and body == {"error": "Malformed request: DELETE /v1/models/vae"}
    status, body = raw(server, "POST", "/v1/models/vae:predict", b"x" * 16,
                       headers={"Content-Length": str(MAX_BYTES + 1)})
    assert status == 400 and "larger than the maximum" in body["error"]
    status, body = raw(server, "POST", "/v1/models/vae:predict", b"\xff\xfe{", headers={})
    assert status == 400 and "JSON" in body["error"]
    assert raw(server, "GET", "/v1/models/vae")[0] == 200  # still serving


def test_predict_bodies_parse_as_json_loads_parses_them(export_base, records, monkeypatch):
    """With the fast JSON parser (orjson) the answers and error messages are json.loads' own, also where orjson
    alone would read the body otherwise (integers beyond 64 bits) or refuse it (NaN, a BOM, UTF-16)."""
    from vaestream.serving import server as server_module
    from vaestream.serving.protocol import dumps

    if server_module.orjson is None:
        pytest.skip("orjson is not installed: json.loads parses every body")
    ms = server_module.ModelServer(export_base, "vae")
    ms.reload()
    row = [float(v) for v in records[0]]
    bodies = [
        json.dumps({"signature_name": "encode", "instances": [row, row[::-1]]}).encode(),
        json.dumps({"inputs": {"x": [row]}, "signature_name": "quantize"}).encode(),
        json.dumps({"instances": [[18446744073709551616] + row[1:]]}).encode(),  # orjson: a float
        json.dumps({"instances": [[2 ** 60] + [0] * 783]}).encode(),
        json.dumps({"instances": [[2.0 ** 70] + row[1:]]}).encode(),
        json.dumps({"instances": [[float("nan")] + row[1:]]}).encode(),  # NaN: json only
        b"\xef\xbb\xbf" + json.dumps({"instances": [row]}).encode(),
        json.dumps({"instances": [row]}).encode("utf-16"),
        json.dumps({"signature_name": "decode", "instances": [[1] * 9 + [-9223372036854775809]]}).encode(),
        b'{"instances": [[0.5, 1e999]]}', b'{"instances": [[0.5] * 784]}', b'{"a": 1, "a": 2}',
    ]
    path = "/v1/models/vae:predict"
    fast = [ms.handle("POST", path, b) for b in bodies]
    monkeypatch.setattr(server_module, "orjson", None)
    slow = [ms.handle("POST", path, b) for b in bodies]
    assert [f[0] for f in fast] == [s[0] for s in slow] == [200, 200, 400, 400, 200, 200, 200, 200, 400, 400, 400, 400]
    for (_, fb), (_, sb) in zip(fast, slow):
        assert dumps(fb) == dumps(sb)
    assert "objects" in fast[2][1]["error"] and "integer too large" in fast[3][1]["error"]
    assert np.isnan(fast[5][1]["predictions"][0]["mean"]).all()


def test_keep_alive_without_delayed_ack_stalls(server):
    """One kept-alive connection carries many requests, each answered in milliseconds: the REST sockets have
    TCP_NODELAY (without it, each response waited ~40 ms for the client's delayed ACK)."""
    host, port = server.split("://", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        times, socks = [], set()
        for _ in range(15):
            t = time.perf_counter()
            conn.request("GET", "/v1/models/vae")
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["model_version_status"][0]["state"] == "AVAILABLE"
            times.append(time.perf_counter() - t)
            socks.add(id(conn.sock))
        assert len(socks) == 1  # the same connection throughout
        assert sorted(times)[len(times) // 2] < 0.025, times
    finally:
        conn.close()


def test_chunked_bodies_are_read_and_bounded(server, local, records):
    """Transfer-Encoding: chunked bodies (no Content-Length) are served, and refused (400) once they pass
    --max_request_bytes."""
    host, port = server.split("://", 1)[1].split(":")
    body = json.dumps({"signature_name": "quantize", "inputs": records[:2].tolist()}).encode()
    for payload, want in ((body, 200), (b" " * (MAX_BYTES + 1), 400)):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("POST", "/v1/models/vae:predict", body=iter([payload[i:i + 65536] for i in
                                                                     range(0, len(payload), 65536)]),
                         headers={"Content-Type": "application/json"}, encode_chunked=True)
            r = conn.getresponse()
            out = json.loads(r.read())
        finally:
            conn.close()
        assert r.status == want, out
        if want == 200:
            assert out["outputs"] == local.quantize(records[:2]).tolist()
        else:
            assert "larger than the maximum" in out["error"]


def test_client_raises_serving_errors(server):
    c = Client(server, "vae")
    with pytest.raises(ServingError) as e:
        c.encode(np.zeros((2, 100), np.float32))
    assert e.value.status == 400 and "shape [2, 100]" in e.value.message
    with pytest.raises(ServingError) as e:
        Client(server, "vae", version=5).status()
    assert e.value.status == 404
    with pytest.raises(ServingError) as e:
        Client("http://127.0.0.1:9", "vae", timeout=2).status()  # nothing listens on the discard port
    assert e.value.status == 0
    c.close()


def test_concurrent_clients(server, local, records):
    """4 threads x 15 requests: every answer right, no errors."""
    want = local.quantize(records[:8])
    errors: list[str] = []

    def worker(i: int) -> None:
        c = Client(server, "vae")
        try:
            for _ in range(15):
                if not np.array_equal(c.quantize(records[:8]), want):
                    errors.append(f"thread {i}: wrong codes")
        except Exception as e:  # collected and asserted below
            errors.append(f"thread {i}: {e!r}")
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)


# -- the command-line clients ----------------------------------------------------------------------------------
def test_cli_client_and_deploy_client(server, local, records, tmp_path, capsys):
    from vaestream.cli import main

    np.save(tmp_path / "x.npy", (records * 255).round().astype(np.uint8))  # uint8 records, scaled by 1/255
    x = (np.load(tmp_path / "x.npy").astype(np.float32) * np.float32(1 / 255))
    assert main(["client", "quantize", "--url", server, "--input", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "codes.npz")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == 40 and summary["outputs"]["symbols"] == ["int32", [40, local.config.latent_dim]]
    np.testing.assert_array_equal(np.load(tmp_path / "codes.npz")["symbols"], local.quantize(x))
    # deploy/client.py, as an operator would run it
    r = subprocess.run([sys.executable, str(ROOT / "deploy" / "client.py"), "reconstruct", "--url", server,
                        "--model_name", "vae", "--input", str(tmp_path / "x.npy"), "--out", str(tmp_path / "r.npz")],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["action"] == "reconstruct" and 0 < out["mse"] < 0.1
    np.testing.assert_array_equal(np.load(tmp_path / "r.npz")["x_hat"], local.reconstruct(x))
    r = subprocess.run([sys.executable, str(ROOT / "deploy" / "client.py"), "status", "--url", server,
                        "--model_name", "nope"], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 1 and "HTTP 404" in r.stderr


# -- wire compatibility with TF Serving ------------------------------------------------------------------------
def test_responses_parse_as_tf_serving_protos(server, export_base):
    """The status and metadata JSON parse (strictly) into TF Serving's own response protos, and the signature
    defs are those of the SavedModel."""
    import tensorflow_serving.apis  # noqa: F401 (tensorflow-serving-api is a dependency)
    from google.protobuf import json_format
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2

    status = json_format.Parse(json.dumps(raw(server, "GET", "/v1/models/vae")[1]),
                               get_model_status_pb2.GetModelStatusResponse())
    v = status.model_version_status[0]
    assert v.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE and v.status.error_code == 0
    meta = raw(server, "GET", "/v1/models/vae/metadata")[1]
    spec = json_format.Parse(json.dumps(meta["model_spec"]), model_pb2.ModelSpec())
    assert spec.name == "vae" and spec.version.value >= 1
    sdm = json_format.Parse(json.dumps(meta["metadata"]["signature_def"]), get_model_metadata_pb2.SignatureDefMap())
    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((export_base / str(spec.version.value) / "saved_model.pb").read_bytes())
    assert dict(sdm.signature_def) == dict(sm.meta_graphs[0].signature_def)


def test_deploy_files_are_consistent():
    """deploy/models.config is a valid ModelServerConfig, and the compose file, Dockerfile and Kubernetes
    manifest serve that model on TF Serving's REST port with the readiness probe on its status URL."""
    import yaml  # the test extras install PyYAML
    deploy = ROOT / "deploy"
    text = (deploy / "models.config").read_text()
    try:
        from google.protobuf import text_format
        from tensorflow_serving.config import model_server_config_pb2

        cfg = text_format.Parse(text, model_server_config_pb2.ModelServerConfig()).model_config_list.config[0]
        name, base, platform = cfg.name, cfg.base_path, cfg.model_platform
    except ImportError:  # without TF Serving's protos, read the two fields
        import re

        name = re.search(r'name:\s*"([^"]+)"', text).group(1)
        base = re.search(r'base_path:\s*"([^"]+)"', text).group(1)
        platform = "tensorflow"
    assert (name, base, platform) == ("vae", "/models/vae", "tensorflow")
    docker = (deploy / "Dockerfile").read_text()
    assert "FROM tensorflow/serving:" in docker and f"COPY ${{EXPORT_BASE}} {base}" in docker
    assert "--model_config_file=/models/models.config" in docker
    compose = yaml.safe_load((deploy / "docker-compose.yml").read_text())
    svc = compose["services"]["vae"]
    assert svc["image"].startswith("tensorflow/serving:") and "8501:8501" in svc["ports"]
    assert any(v.endswith(f":{base}:ro") for v in svc["volumes"])
    dep, service = list(yaml.safe_load_all((deploy / "k8s.yaml").read_text()))
    assert dep["kind"] == "Deployment" and service["kind"] == "Service"
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"] == {"path": f"/v1/models/{name}", "port": "rest"}
    assert {"name": "rest", "containerPort": 8501} in c["ports"]
    assert service["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    # both ports, batching with the parameters file, and vaestream serve interchangeable with the same flags
    assert {"name": "grpc", "containerPort": 8500} in c["ports"]
    assert c["livenessProbe"]["httpGet"] == {"path": f"/v1/models/{name}", "port": "rest"}
    assert "--enable_batching" in c["args"]
    assert "--batching_parameters_file=/models/batching_parameters.txt" in c["args"]
    assert "COPY deploy/batching_parameters.txt /models/batching_parameters.txt" in docker
    alt = compose["services"]["vae-vaestream"]
    assert alt["command"][:2] == ["vaestream", "serve"] and set(alt["ports"]) == set(svc["ports"])
    assert {"8500:8500", "8501:8501"} <= set(svc["ports"])
    from vaestream.cli import build_parser

    args = build_parser().parse_args(alt["command"][1:])
    assert (args.port, args.rest_api_port, args.enable_batching) == (8500, 8501, True)
    for s in (svc, alt):
        assert "/models/batching_parameters.txt" in s["command"][-1]
        assert any(v.endswith(":/models/batching_parameters.txt:ro") for v in s["volumes"])


# -- gRPC: TF Serving's PredictionService / ModelService with TF Serving's own stubs ---------------------------
def _stub(target: str):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    return prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(target))


def _predict_request(signature: str | None, name: str = "vae", version: int | None = None, **inputs):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    if signature is not None:
        req.model_spec.signature_name = signature
    if version is not None:
        req.model_spec.version.value = version
    for k, v in inputs.items():
        req.inputs[k].CopyFrom(tf.make_tensor_proto(v))
    return req


def test_grpc_predict_matches_the_savedmodel(serving, local, records):
    import tensorflow as tf

    stub = _stub(serving["grpc"])
    x = records[:5]
    mean, log_scale = local.encode(x)
    resp = stub.Predict(_predict_request("encode", x=x), timeout=30)
    assert (resp.model_spec.name, resp.model_spec.version.value, resp.model_spec.signature_name) == \
        ("vae", 1, "encode")
    assert set(resp.outputs) == {"mean", "log_scale"}
    np.testing.assert_array_equal(tf.make_ndarray(resp.outputs["mean"]), mean)  # bit-identical
    np.testing.assert_array_equal(tf.make_ndarray(resp.outputs["log_scale"]), log_scale)
    # the default signature, an explicit version, an int32 output, an output filter
    resp = stub.Predict(_predict_request(None, version=1, x=x), timeout=30)
    assert resp.model_spec.signature_name == "serving_default"
    np.testing.assert_array_equal(tf.make_ndarray(resp.outputs["mean"]), mean)
    resp = stub.Predict(_predict_request("quantize", x=records), timeout=30)
    codes = tf.make_ndarray(resp.outputs["symbols"])
    assert codes.dtype == np.int32
    np.testing.assert_array_equal(codes, local.quantize(records))
    req = _predict_request("decode", z=mean)
    req.output_filter.append("x_mean")
    resp = stub.Predict(req, timeout=30)
    assert set(resp.outputs) == {"x_mean"}
    np.testing.assert_array_equal(tf.make_ndarray(resp.outputs["x_mean"]), local.decode(mean)["x_mean"])


def test_grpc_metadata_and_status(serving, export_base):
    import grpc
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc)

    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    req.model_spec.name = "vae"
    resp = _stub(serving["grpc"]).GetModelMetadata(req, timeout=30)
    assert resp.model_spec.name == "vae" and resp.model_spec.version.value == 1
    sdm = get_model_metadata_pb2.SignatureDefMap()
    assert resp.metadata["signature_def"].Unpack(sdm)
    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((export_base / "1" / "saved_model.pb").read_bytes())
    assert dict(sdm.signature_def) == dict(sm.meta_graphs[0].signature_def)
    models = model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(serving["grpc"]))
    sreq = get_model_status_pb2.GetModelStatusRequest()
    sreq.model_spec.name = "vae"
    st = models.GetModelStatus(sreq, timeout=30).model_version_status
    assert [(v.version, v.state, v.status.error_code) for v in st] == \
        [(1, get_model_status_pb2.ModelVersionStatus.AVAILABLE, 0)]
    sreq.model_spec.name = "other"
    with pytest.raises(grpc.RpcError) as e:
        models.GetModelStatus(sreq, timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


GRPC_BAD = [
    # (name, request builder (records -> PredictRequest), status code name, fragment of the details)
    ("unknown model", lambda x: _predict_request("encode", name="other", x=x), "NOT_FOUND", "Latest(other)"),
    ("unknown version", lambda x: _predict_request("encode", version=9, x=x), "NOT_FOUND", "Specific(vae, 9)"),
    ("unknown signature", lambda x: _predict_request("nope", x=x), "FAILED_PRECONDITION",
     'Serving signature key "nope" not found.'),
    ("wrong dtype", lambda x: _predict_request("encode", x=x.astype(np.float64)), "INVALID_ARGUMENT",
     "Expects arg[x] to be float but double is provided"),
    ("wrong shape", lambda x: _predict_request("encode", x=x[:, :100]), "INVALID_ARGUMENT", "shape [2, 100]"),
    ("wrong input name", lambda x: _predict_request("encode", z=x), "INVALID_ARGUMENT", "Missing but required"),
    ("no inputs", lambda x: _predict_request("encode"), "INVALID_ARGUMENT", "input size does not match"),
    ("oversized batch", lambda x: _predict_request("encode", x=np.zeros((MAX_BATCH + 1, 784), np.float32)),
     "INVALID_ARGUMENT", f"larger than maximum input batch size {MAX_BATCH}"),
    ("no model name", lambda x: _predict_request("encode", name="", x=x), "INVALID_ARGUMENT", "Missing ModelSpec"),
]


@pytest.mark.parametrize("name,build,code,fragment", GRPC_BAD, ids=[b[0] for b in GRPC_BAD])
def test_grpc_bad_requests_get_tf_serving_status_codes(serving, records, name, build, code, fragment):
    import grpc

    with pytest.raises(grpc.RpcError) as e:
        _stub(serving["grpc"]).Predict(build(records[:2]), timeout=30)
    assert e.value.code().name == code and fragment in e.value.details(), (e.value.code(), e.value.details())


def test_grpc_unsupported_calls(serving, records):
    import grpc
    from tensorflow_serving.apis import classification_pb2, get_model_metadata_pb2

    stub = _stub(serving["grpc"])
    req = _predict_request("encode", x=records[:1])
    req.output_filter.append("nope")
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nope" in e.value.details()
    meta = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["graph"])
    meta.model_spec.name = "vae"
    with pytest.raises(grpc.RpcError) as e:
        stub.GetModelMetadata(meta, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "graph" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Classify(classification_pb2.ClassificationRequest(), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_grpc_client(serving, local, records, tmp_path, capsys):
    from vaestream.cli import main
    from vaestream.serving.client import GrpcClient

    np.save(tmp_path / "x.npy", records[:6])
    assert main(["client", "quantize", "--url", "grpc://" + serving["grpc"], "--input", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "codes.npz")]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 6
    np.testing.assert_array_equal(np.load(tmp_path / "codes.npz")["symbols"], local.quantize(records[:6]))
    assert main(["client", "status", "--url", "grpc://" + serving["grpc"]]) == 0
    assert json.loads(capsys.readouterr().out)["model_version_status"][0]["state"] == "AVAILABLE"

    c = GrpcClient(serving["grpc"], "vae", max_batch=16)  # 40 records: 3 calls
    try:
        assert c.wait_until_available(10).model_version_status[0].version == 1
        assert "encode" in c.metadata()
        mean, log_scale = c.encode(records)
        want_mean, want_ls = local.encode(records)
        np.testing.assert_array_equal(mean, want_mean)  # blocked signatures: any batching, same bits
        np.testing.assert_array_equal(log_scale, want_ls)
        np.testing.assert_array_equal(c.quantize(records), local.quantize(records))
        np.testing.assert_array_equal(c.reconstruct(records), local.reconstruct(records))
        with pytest.raises(ServingError) as e:
            c.encode(np.zeros((2, 100), np.float32))
        assert e.value.code == "INVALID_ARGUMENT" and e.value.status == 400
    finally:
        c.close()
    with pytest.raises(ServingError) as e:
        GrpcClient(serving["grpc"], "vae", version=5).status()
    assert e.value.code == "NOT_FOUND" and e.value.status == 404


# -- server-side batching ----------------------------------------------------------------------------------
class _InProcess:
    """A ModelServer with gRPC and REST on ephemeral loopback ports, in this process (threads)."""

    def __init__(self, base: Path, batching):
        from vaestream.serving.server import ModelServer
        from vaestream.serving.grpc_server import make_grpc_server
        from vaestream.serving.rest_server import RestServer

        self.ms = ModelServer(base, "vae", batching=batching)
        assert self.ms.reload() == [1]
        self.grpc, port = make_grpc_server(self.ms, "127.0.0.1", 0)
        self.grpc.start()
        self.target = f"127.0.0.1:{port}"
        self.rest = RestServer(self.ms, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.rest.port}"
        self.thread = threading.Thread(target=self.rest.run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.rest.stop()
        self.thread.join(20)
        self.grpc.stop(5).wait()
        self.ms.close()


def test_batching_merges_concurrent_requests_bit_identical(export_base, local, records):
    """24 concurrent gRPC and REST requests of 1-3 records: merged into fewer model calls, and every answer is
    bit-identical to the SavedModel run on that request alone."""
    import tensorflow as tf

    from vaestream.serving.batching import BatchingParameters

    srv = _InProcess(export_base, BatchingParameters(max_batch_size=32, batch_timeout_micros=50_000,
                                                     num_batch_threads=1, max_enqueued_batches=100))
    try:
        jobs = [(i, records[i:i + 1 + i % 3]) for i in range(24)]
        want = {i: local.run("encode", x=x) for i, x in jobs}
        got: dict[int, dict] = {}
        errors: list[str] = []
        barrier = threading.Barrier(len(jobs))

        def worker(i: int, x: np.ndarray) -> None:
            try:
                barrier.wait(30)
                if i % 2:
                    r = _stub(srv.target).Predict(_predict_request("encode", x=x), timeout=30)
                    got[i] = {k: tf.make_ndarray(v) for k, v in r.outputs.items()}
                else:
                    c = Client(srv.url, "vae")
                    got[i] = c.predict("encode", x=x)
                    c.close()
            except Exception as e:  # collected and asserted below
                errors.append(f"{i}: {e!r}")

        threads = [threading.Thread(target=worker, args=j) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        for i, _ in jobs:
            for k in ("mean", "log_scale"):
                np.testing.assert_array_equal(got[i][k], want[i][k])
        b = srv.ms.batcher
        assert b.tasks_run >= len(jobs) and b.batches_run < b.tasks_run  # requests were merged
    finally:
        srv.close()


def test_batching_full_queue_answers_unavailable_at_once(export_base, local, records):
    """max_enqueued_batches 1: while one batch waits for its timeout, a request that needs a second batch is
    refused at once (503 / UNAVAILABLE), and the waiting one still gets its right answer."""
    import grpc
    import tensorflow as tf

    from vaestream.serving.batching import BatchingParameters

    # the waiting batch's timeout (6 s) is well above the 2 s that "at once" allows, and each transport waits it
    srv = _InProcess(export_base, BatchingParameters(max_batch_size=4, batch_timeout_micros=6_000_000,
                                                     num_batch_threads=1, max_enqueued_batches=1))
    stub = _stub(srv.target)
    try:
        for transport in ("rest", "grpc"):
            first = stub.Predict.future(_predict_request("quantize", x=records[:1]), timeout=30)
            deadline = time.monotonic() + 10
            while not any(srv.ms.batcher._queues.values()) and time.monotonic() < deadline:
                time.sleep(0.01)
            t = time.monotonic()
            if transport == "rest":
                status, body = post(srv.url, {"signature_name": "quantize", "inputs": records[1:5].tolist()})
                assert status == 503 and "queue" in body["error"] and "full" in body["error"], body
            else:
                with pytest.raises(grpc.RpcError) as e:
                    stub.Predict(_predict_request("quantize", x=records[1:5]), timeout=30)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "full" in e.value.details()
            assert time.monotonic() - t < 2.0  # at once, not after the 6 s timeout
            np.testing.assert_array_equal(tf.make_ndarray(first.result(timeout=30).outputs["symbols"]),
                                          local.quantize(records[:1]))
        with pytest.raises(grpc.RpcError) as e:  # larger than a batch
            stub.Predict(_predict_request("quantize", x=records[:5]), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Task size 5 is larger than maximum input batch size 4" in e.value.details()
    finally:
        srv.close()


def test_batching_parameters_file_is_tf_servings_text_format(tmp_path):
    from vaestream.serving.batching import BatchingParameters
    from vaestream.errors import ModelError

    f = tmp_path / "batching.config"
    f.write_text("# TF Serving batching parameters\nmax_batch_size { value: 128 }\nbatch_timeout_micros { value: 2000 }"
                 "\nmax_enqueued_batches { value: 16 }\nnum_batch_threads { value: 2 }\n"
                 'thread_pool_name { value: "batch_threads" }\nallowed_batch_sizes: 64\nallowed_batch_sizes: 128\n')
    p = BatchingParameters.from_file(f)
    assert (p.max_batch_size, p.batch_timeout_micros, p.max_enqueued_batches, p.num_batch_threads,
            p.allowed_batch_sizes) == (128, 2000, 16, 2, (64, 128))
    assert not p.enable_large_batch_splitting and p.execution_batch_size == 128
    p = BatchingParameters.parse("max_batch_size { value: 1024 } enable_large_batch_splitting { value: true }\n"
                                 "max_execution_batch_size { value: 128 } allowed_batch_sizes: 64 "
                                 "allowed_batch_sizes: 128")
    assert (p.max_batch_size, p.enable_large_batch_splitting, p.max_execution_batch_size, p.execution_batch_size,
            p.allowed_batch_sizes) == (1024, True, 128, 128, (64, 128))
    p = BatchingParameters.parse("max_batch_size { value: 300 } enable_large_batch_splitting { value: true }")
    assert p.execution_batch_size == 300  # max_execution_batch_size defaults to max_batch_size
    # the shipped file: a request of the client's default 1,000 records fits, executed in batches of 128
    shipped = BatchingParameters.from_file(ROOT / "deploy" / "batching_parameters.txt")
    assert shipped.max_batch_size >= 1000 and shipped.enable_large_batch_splitting
    assert shipped.execution_batch_size == 128
    for bad, fragment in [("max_batch_sise { value: 1 }", "unknown field"), ("max_batch_size: 3", "cannot parse"),
                          ("max_batch_size { value: 0 }", ">= 1"), ("num_batch_threads { value: x }", "integer"),
                          ("max_batch_size { value: 8 } allowed_batch_sizes: 4", "end with"),
                          ("enable_large_batch_splitting { value: yes }", "not true or false"),
                          ("max_batch_size { value: 8 } max_execution_batch_size { value: 4 }", "splitting is off"),
                          ("max_batch_size { value: 8 } enable_large_batch_splitting { value: true } "
                           "max_execution_batch_size { value: 9 }", "must not exceed max_batch_size 8"),
                          ("pad_variable_length_inputs { value: true }", "not supported")]:
        with pytest.raises(ModelError, match=fragment):
            BatchingParameters.parse(bad, "batching.config")


def test_large_requests_are_split_into_execution_batches_bit_identical(export_base, local, mnist_test):
    """enable_large_batch_splitting: concurrent REST and gRPC requests of up to max_batch_size (100) records
    run as model calls of at most max_execution_batch_size (16) rows, pieces of one request in several calls,
    and every request is answered whole, in order, bit-identical to the SavedModel on that request alone; a
    request over max_batch_size is refused naming the limit, and Client / GrpcClient say what to do."""
    import tensorflow as tf

    from vaestream.serving.batching import BatchingParameters
    from vaestream.serving.client import GrpcClient

    x = mnist_test[:400].reshape(400, -1).astype(np.float32) / np.float32(255)
    srv = _InProcess(export_base, BatchingParameters(max_batch_size=100, enable_large_batch_splitting=True,
                                                     max_execution_batch_size=16, batch_timeout_micros=1000,
                                                     num_batch_threads=2, max_enqueued_batches=100))
    sizes: list[int] = []
    call = srv.ms.batcher._call
    srv.ms.batcher._call = lambda s, sig, feeds: (sizes.append(len(feeds["x"])), call(s, sig, feeds))[1]
    try:
        jobs = [(i, x[a:a + n]) for i, (a, n) in enumerate([(0, 100), (100, 37), (137, 99), (236, 1), (237, 100),
                                                          (337, 63)])]
        got: dict[int, np.ndarray] = {}
        errors: list[str] = []
        barrier = threading.Barrier(len(jobs))

        def worker(i: int, xi: np.ndarray) -> None:
            try:
                barrier.wait(30)
                if i % 2:
                    r = _stub(srv.target).Predict(_predict_request("quantize", x=xi), timeout=60)
                    got[i] = tf.make_ndarray(r.outputs["symbols"])
                else:
                    c = Client(srv.url, "vae")
                    got[i] = c.quantize(xi)
                    c.close()
            except Exception as e:  # collected and asserted below
                errors.append(f"{i}: {e!r}")

        threads = [threading.Thread(target=worker, args=j) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        for i, xi in jobs:
            np.testing.assert_array_equal(got[i], local.quantize(xi))
        b = srv.ms.batcher
        assert b.tasks_run == len(jobs) and b.pieces_run > b.tasks_run  # requests were split
        assert max(sizes) <= 16 and sum(sizes) == 400 and len(sizes) == b.batches_run >= 400 // 16
        # over max_batch_size: INVALID_ARGUMENT naming the limit; the clients say how to fit it
        with pytest.raises(ServingError, match="at most 100 records per request") as e:
            Client(srv.url, "vae", max_batch=101).quantize(x[:150])
        assert e.value.status == 400 and "Task size 101 is larger than maximum input batch size 100" in str(e.value)
        g = GrpcClient(srv.target, "vae", max_batch=150)
        with pytest.raises(ServingError, match="--max-batch 100") as e:
            g.quantize(x[:150])
        assert e.value.code == "INVALID_ARGUMENT"
        g.max_batch = 100  # two calls: 100 + 50
        np.testing.assert_array_equal(g.quantize(x[:150]), local.quantize(x[:150]))
        g.close()
    finally:
        srv.close()


def test_readme_server_and_client_with_the_shipped_batching_file(export_base, local, mnist_test, tmp_path):
    """The README's pair: ``vaestream serve --enable_batching --batching_parameters_file
    deploy/batching_parameters.txt`` and ``vaestream client quantize`` (its default 1,000 records per request)
    on 2,000 real MNIST records over REST, and GrpcClient over gRPC: the codes equal the SavedModel's exactly."""
    from vaestream.serving.client import GrpcClient

    imgs = mnist_test[:2000]
    np.save(tmp_path / "x.npy", imgs)  # uint8: the client scales by 1/255, as load_inputs
    want = local.quantize(imgs.reshape(2000, -1).astype(np.float32) * np.float32(1 / 255))
    proc, info = start_serve(export_base, "--enable_batching", "--batching_parameters_file",
                             str(ROOT / "deploy" / "batching_parameters.txt"), "--file_system_poll_wait_seconds", "0")
    try:
        r = subprocess.run([sys.executable, "-m", "vaestream.cli", "client", "quantize", "--url",
                            f"http://127.0.0.1:{info['rest_api_port']}", "--input", str(tmp_path / "x.npy"),
                            "--out", str(tmp_path / "codes.npz")], capture_output=True, text=True, env=ENV,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        assert (summary["records"], summary["requests"]) == (2000, 2) and summary["seconds"] > 0
        assert summary["outputs"]["symbols"] == ["int32", [2000, local.config.latent_dim]]
        np.testing.assert_array_equal(np.load(tmp_path / "codes.npz")["symbols"], want)
        c = GrpcClient(f"127.0.0.1:{info['port']}", "vae")  # default max_batch 1000: two calls
        try:
            np.testing.assert_array_equal(c.quantize(imgs.reshape(2000, -1).astype(np.float32) * np.float32(1 / 255)),
                                          want)
        finally:
            c.close()
    finally:
        stop_serve(proc)


def test_predict_response_wire_bytes_equal_tf_make_tensor_proto():
    """The response written directly in the protobuf wire format parses to the PredictResponse built with
    ``tf.make_tensor_proto``: field for field for tensors of several values (tensor_content), the same tensor
    for single values (tensor_content where make_tensor_proto uses the typed field), every dtype and rank the
    signatures return; request tensors are read back from tensor_content as the same arrays."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    from vaestream.serving.grpc_server import _spec_bytes, predict_response_bytes, tensor_array

    rng = np.random.default_rng(0)
    outs = {"mean": rng.random((3, 20), dtype=np.float32), "symbols": rng.integers(-9, 300, (3, 20), dtype=np.int32),
            "elbo": rng.random(3), "empty": np.zeros((0, 4), np.float32), "scalar": np.float32(2.5) * np.ones(()),
            "codes": rng.integers(0, 2**40, (2, 2, 2), dtype=np.int64), "one": np.float32([[0.25]])}
    got = predict_pb2.PredictResponse.FromString(predict_response_bytes(_spec_bytes("vae", 7, "encode"), outs,
                                                                        list(outs)))
    want = predict_pb2.PredictResponse()
    want.model_spec.name, want.model_spec.signature_name = "vae", "encode"
    want.model_spec.version.value = 7
    for k, v in outs.items():
        want.outputs[k].CopyFrom(tf.make_tensor_proto(v))
    assert got.model_spec == want.model_spec and sorted(got.outputs) == sorted(want.outputs)
    for k, v in outs.items():
        if v.size > 1:
            assert got.outputs[k] == want.outputs[k], k
        w = tf.make_ndarray(got.outputs[k])
        assert w.dtype == v.dtype and w.shape == v.shape
        np.testing.assert_array_equal(w, v)
        a = tensor_array(got.outputs[k], k)
        assert a.dtype == v.dtype and a.shape == v.shape
        np.testing.assert_array_equal(a, v)


def _batching_file(tmp_path: Path, timeout_micros: int, threads: int = 2, extra: str = "") -> Path:
    f = tmp_path / f"batching_{timeout_micros}.txt"
    f.write_text(f"max_batch_size {{ value: 64 }}\nbatch_timeout_micros {{ value: {timeout_micros} }}\n"
                 f"max_enqueued_batches {{ value: 64 }}\nnum_batch_threads {{ value: {threads} }}\n{extra}")
    return f


def _batching_stats(stderr: str) -> dict:
    """The statistics line ``vaestream serve`` prints to stderr at exit."""
    return next(json.loads(line)["batching"] for line in stderr.splitlines() if line.startswith('{"batching"'))


@pytest.mark.parametrize("grpc_server", ["asyncio", "threads"])
def test_32_concurrent_clients_get_the_in_process_signatures_answers(export_base, local, mnist_test, tmp_path,
                                                                     grpc_server):
    """32 concurrent batch-1 clients (16 gRPC, 16 REST), each sending 8 encode / quantize requests back to back
    to a fresh ``vaestream serve`` process with batching: every answer equals the SavedModel's signature
    called in this process on that record alone, bit for bit, and the requests were merged into batches."""
    import tensorflow as tf

    x = mnist_test[:256].reshape(256, -1).astype(np.float32) / np.float32(255)
    want = {"encode": local.run("encode", x=x), "quantize": local.run("quantize", x=x)}
    proc, info = start_serve(export_base, "--enable_batching", "--batching_parameters_file",
                             str(_batching_file(tmp_path, 5000)), "--file_system_poll_wait_seconds", "0",
                             "--grpc_server", grpc_server)
    errors: list[str] = []
    checked = [0] * 32
    barrier = threading.Barrier(32)

    def worker(i: int) -> None:
        try:
            if i % 2:
                stub = _stub(f"127.0.0.1:{info['port']}")
            else:
                conn = http.client.HTTPConnection("127.0.0.1", info["rest_api_port"], timeout=60)
            barrier.wait(60)
            for j in range(8):
                r, sig = i * 8 + j, ("encode", "quantize")[j % 2]
                if i % 2:
                    resp = stub.Predict(_predict_request(sig, x=x[r:r + 1]), timeout=60)
                    got = {k: tf.make_ndarray(v) for k, v in resp.outputs.items()}
                    assert resp.model_spec.version.value == 1 and resp.model_spec.signature_name == sig
                else:
                    conn.request("POST", "/v1/models/vae:predict", json.dumps(
                        {"signature_name": sig, "inputs": x[r:r + 1].tolist()}), {"Content-Type": "application/json"})
                    h = conn.getresponse()
                    body = json.loads(h.read())
                    assert h.status == 200, body
                    out = body["outputs"]  # one output: the tensor itself, as TF Serving
                    got = {k: np.asarray(v) for k, v in (out.items() if isinstance(out, dict) else
                                                         [(next(iter(want[sig])), out)])}
                assert sorted(got) == sorted(want[sig])
                for k, v in got.items():
                    np.testing.assert_array_equal(v.astype(want[sig][k].dtype), want[sig][k][r:r + 1])
                checked[i] += 1
        except Exception as e:  # collected and asserted below
            errors.append(f"client {i}: {e!r}")

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert not errors, errors[:3]
    assert sum(checked) == 32 * 8 and proc.returncode == 0
    stats = _batching_stats(err)
    assert stats["requests"] == 256 and stats["batches"] < 256  # merged


def test_batches_are_padded_to_allowed_batch_sizes(export_base, local, records):
    """allowed_batch_sizes 4, 8, 16: every signature call gets one of those sizes (padded with copies of the
    batch's first row), and each request's answer is bit-identical to the SavedModel on it alone."""
    import tensorflow as tf

    from vaestream.serving.batching import BatchingParameters, pad_rows

    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(pad_rows({"x": a}, 5)["x"], np.concatenate([a, a[:1], a[:1]]))
    assert pad_rows({"x": a}, 3)["x"] is a
    srv = _InProcess(export_base, BatchingParameters(max_batch_size=16, batch_timeout_micros=20_000,
                                                     num_batch_threads=1, max_enqueued_batches=100,
                                                     allowed_batch_sizes=(4, 8, 16)))
    sizes: list[int] = []
    call = srv.ms.batcher._call
    srv.ms.batcher._call = lambda s, sig, feeds: (sizes.append(len(feeds["x"])), call(s, sig, feeds))[1]
    try:
        jobs = [(i, records[i:i + 1 + i % 3]) for i in range(20)]
        got: dict[int, np.ndarray] = {}
        errors: list[str] = []
        barrier = threading.Barrier(len(jobs))

        def worker(i: int, xi: np.ndarray) -> None:
            try:
                barrier.wait(30)
                r = _stub(srv.target).Predict(_predict_request("encode", x=xi), timeout=30)
                got[i] = tf.make_ndarray(r.outputs["mean"])
            except Exception as e:  # collected and asserted below
                errors.append(f"{i}: {e!r}")

        threads = [threading.Thread(target=worker, args=j) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        for i, xi in jobs:
            np.testing.assert_array_equal(got[i], local.run("encode", x=xi)["mean"])
        assert sizes and set(sizes) <= {4, 8, 16} and set(srv.ms.batcher.sizes_run) == set(sizes)
        assert sum(len(xi) for _, xi in jobs) <= sum(sizes)
    finally:
        srv.close()


def test_rest_timeout_is_answered_504_deadline_exceeded(export_base, tmp_path):
    """A REST request still waiting for its batch after --rest_api_timeout_in_ms is answered as TF Serving
    answers a run past its deadline: 504 (DEADLINE_EXCEEDED) with ``{"error": ...}``; the server serves on."""
    proc, info = start_serve(export_base, "--enable_batching", "--batching_parameters_file",
                             str(_batching_file(tmp_path, 20_000_000)), "--rest_api_timeout_in_ms", "300",
                             "--file_system_poll_wait_seconds", "0")
    try:
        url = f"http://127.0.0.1:{info['rest_api_port']}"
        status, body = post(url, {"signature_name": "encode", "inputs": [[0.5] * 784]})
        assert status == 504 and "Deadline Exceeded" in body["error"] and "rest_api_timeout_in_ms" in body["error"]
        status, body = raw(url, "GET", "/v1/models/vae")
        assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"
    finally:
        proc.kill()
        proc.wait(30)


@pytest.mark.parametrize("grpc_server", ["asyncio", "threads"])
def test_sigterm_drains_in_flight_grpc_and_rest_requests(export_base, local, records, tmp_path, grpc_server):
    """SIGTERM while a gRPC and a REST request wait for their batch (batch_timeout_micros 4 s): new RPCs and
    new connections are refused at once, both requests in flight are answered in full and right, and the
    process exits 0."""
    import grpc
    import tensorflow as tf

    proc, info = start_serve(export_base, "--enable_batching", "--batching_parameters_file",
                             str(_batching_file(tmp_path, 4_000_000, threads=1)), "--file_system_poll_wait_seconds",
                             "0", "--grpc_server", grpc_server)
    try:
        stub = _stub(f"127.0.0.1:{info['port']}")
        stub.Predict(_predict_request("quantize", x=records[:1]), timeout=30)  # connected, warm
        in_flight = stub.Predict.future(_predict_request("quantize", x=records[1:3]), timeout=60)
        import socket as so
        body = json.dumps({"signature_name": "quantize", "inputs": records[3:5].tolist()}).encode()
        s = so.create_connection(("127.0.0.1", info["rest_api_port"]), timeout=60)
        s.sendall(b"POST /v1/models/vae:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(1.0)  # both requests are in the server, waiting for the 4 s batch timeout
        assert not in_flight.done()
        proc.send_signal(__import__("signal").SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # draining
        with pytest.raises(grpc.RpcError) as e:  # new RPCs are refused
            _stub(f"127.0.0.1:{info['port']}").Predict(_predict_request("quantize", x=records[:1]), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(OSError):  # no new REST connections
            so.create_connection(("127.0.0.1", info["rest_api_port"]), timeout=5).close()
        np.testing.assert_array_equal(tf.make_ndarray(in_flight.result(timeout=60).outputs["symbols"]),
                                      local.quantize(records[1:3]))
        data = b""
        while chunk := s.recv(65536):  # shutting down: the server closes the connection after the answer
            data += chunk
        s.close()
        head, payload = data.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert json.loads(payload)["outputs"] == local.quantize(records[3:5]).tolist()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# -- versions --------------------------------------------------------------------------------------------------
def test_new_version_is_hot_loaded(server, export_base, records):
    """A new version exported under the base path is picked up by polling and becomes the default; under the
    default policy (latest) the old one is unloaded, as TF Serving does. Runs last in this module."""
    model_dir = Path((export_base / "model_dir.txt").read_text())
    export(model_dir, export_base, verify=False)
    c = Client(server, "vae")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = c.status()["model_version_status"]
        if st[0]["version"] == "2" and st[0]["state"] == "AVAILABLE":
            break
        time.sleep(0.2)
    assert [(v["version"], v["state"]) for v in st] == [("2", "AVAILABLE"), ("1", "END")]
    assert c.metadata()["model_spec"]["version"] == "2"
    assert c.quantize(records[:3]).shape == (3, 10)
    status, body = post(server, {"instances": records[:1].tolist()}, "/v1/models/vae/versions/1:predict")
    assert status == 404 and "Specific(vae, 1)" in body["error"]
    c.close()


# -- graceful shutdown -----------------------------------------------------------------------------------------
def test_sigterm_drains_in_flight_requests(serving, local, records):
    """SIGTERM while a REST request is in flight (headers sent, half the body still to come): the server stops
    accepting, answers that request in full, and exits 0. Runs last: it ends the module's server."""
    import socket as so
    import signal

    proc = serving["proc"]
    host, port = serving["rest"].split("://", 1)[1].split(":")
    body = json.dumps({"signature_name": "quantize", "inputs": records[:3].tolist()}).encode()
    s = so.create_connection((host, int(port)), timeout=30)
    try:
        s.sendall(b"POST /v1/models/vae:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) // 2])
        time.sleep(0.5)  # the server has the request's head
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # still draining
        with pytest.raises(OSError):  # no new connections
            so.create_connection((host, int(port)), timeout=5).close()
        s.sendall(body[len(body) // 2:])
        data = b""
        while chunk := s.recv(65536):  # shutting down: the server closes the connection after the answer
            data += chunk
    finally:
        s.close()
    head, payload = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert json.loads(payload)["outputs"] == local.quantize(records[:3]).tolist()
    assert proc.wait(timeout=30) == 0
