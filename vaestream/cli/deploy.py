"""``vaestream export``, ``vaestream serve`` and ``vaestream client``: thin shells over :mod:`vaestream.serving.export`
and :mod:`vaestream.serving.main`."""

from __future__ import annotations

import argparse
import json


def cmd_export(a: argparse.Namespace) -> int:
    from vaestream.serving.export import describe, export, list_versions

    before = set(list_versions(a.out))
    path = export(a.model, a.out, a.version, quality=a.quality, elbo_samples=a.elbo_samples,
                  verify=not a.no_verify, skip_unchanged=not a.force)
    info = describe(path)
    print(json.dumps({"path": info["path"], "version": info["version"], "unchanged": info["version"] in before,
                      "fingerprint": info["fingerprint"], "has_coder_tables": info["has_coder_tables"],
                      "quality": info["info"].get("quality"), "signatures": sorted(info["signatures"])}))
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from vaestream.errors import ModelError
    from vaestream.serving.main import serve

    batching = None
    if a.enable_batching:
        from vaestream.serving.batching import BatchingParameters

        batching = (BatchingParameters.from_file(a.batching_parameters_file) if a.batching_parameters_file
                    else BatchingParameters())
    elif a.batching_parameters_file:
        raise ModelError("--batching_parameters_file needs --enable_batching (as tensorflow_model_server)")
    serve(a.model_base_path, a.model_name, port=a.port, rest_api_port=a.rest_api_port, host=a.host,
          version_policy=a.version_policy, max_batch_size=a.max_batch_size,
          poll_seconds=a.file_system_poll_wait_seconds, max_request_bytes=a.max_request_bytes,
          max_concurrent=a.max_concurrent, batching=batching, rest_api_timeout_ms=a.rest_api_timeout_in_ms,
          rest_api_num_threads=a.rest_api_num_threads, grpc_max_threads=a.grpc_max_threads,
          keep_alive_s=a.keep_alive_seconds, grace_s=a.shutdown_grace_seconds, verbose=a.verbose,
          grpc_server=a.grpc_server)
    return 0


def cmd_client(a: argparse.Namespace) -> int:
    from vaestream.serving.client import run_client

    print(json.dumps(run_client(a.url, a.model_name, a.action, a.input, a.out, a.version, a.key, a.max_batch),
                     indent=1 if a.action in ("status", "metadata") else None))
    return 0


def add_subcommands(sub) -> None:
    p = sub.add_parser("export", help="export a model directory as a versioned SavedModel (TF Serving layout)",
                       description="Export MODEL as OUT/N/ (a SavedModel with encode, decode, quantize, reconstruct "
                                   "and elbo signatures). When OUT's latest version already holds the same weights, "
                                   "coder tables, quality and elbo settings, no version is added: that version is "
                                   "printed with \"unchanged\": true.")
    p.add_argument("--model", required=True, help="model directory (config.json + ckpt/, optionally coder_tables.npz)")
    p.add_argument("--out", required=True, help="export base: the version goes to OUT/N/")
    p.add_argument("--version", type=int, default=None,
                   help="version N (default: the next free integer); an existing N is an error unless it holds "
                        "the same export")
    p.add_argument("--quality", type=float, default=None,
                   help="coder quality of the quantize/reconstruct signatures (a ladder step; default 1.0)")
    p.add_argument("--elbo-samples", type=int, default=1, help="L of the elbo signature (default 1)")
    p.add_argument("--no-verify", action="store_true", help="skip reloading the export to check it")
    p.add_argument("--force", action="store_true",
                   help="write a new version even when the latest one holds the same export")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="serve an export over TF Serving's gRPC (--port) and REST (--rest_api_port) APIs",
                       description="A TF Serving-compatible model server for a vaestream export base. Prints one "
                                   "JSON line when both ports accept connections; SIGTERM drains and exits 0.")
    p.add_argument("--model_base_path", "--model-base-path", required=True,
                   help="export base (numeric version directories, as written by vaestream export)")
    p.add_argument("--model_name", "--model-name", default="vae", help="NAME in /v1/models/NAME (default vae)")
    p.add_argument("--port", type=int, default=8500,
                   help="gRPC port: PredictionService / ModelService (default 8500; 0: any free port)")
    p.add_argument("--rest_api_port", "--rest-api-port", type=int, default=8501,
                   help="REST port (default 8501; 0: any free port; -1: no REST)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--version_policy", "--version-policy", default="latest",
                   help="latest | latest:K | all | specific:N[,M] (default latest, as TF Serving)")
    p.add_argument("--max_batch_size", "--max-batch-size", type=int, default=10_000,
                   help="most records one request may carry, batching or not (default 10000); with "
                        "--enable_batching the parameters file's max_batch_size bounds a request too")
    p.add_argument("--enable_batching", action="store_true",
                   help="merge concurrent requests into batched model calls, and split large ones "
                        "(server-side batching, as TF Serving)")
    p.add_argument("--batching_parameters_file", default=None,
                   help="BatchingParameters text proto (TF Serving's format): max_batch_size (per request), "
                        "enable_large_batch_splitting, max_execution_batch_size (per model call), "
                        "batch_timeout_micros, num_batch_threads, max_enqueued_batches; see "
                        "deploy/batching_parameters.txt (default without a file: TF Serving's defaults)")
    p.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0,
                   help="poll the base path for new versions every S seconds (0: never; default 1)")
    p.add_argument("--max_request_bytes", type=int, default=64 << 20, help="largest request body (default 64 MiB)")
    p.add_argument("--max_concurrent", type=int, default=4, help="signature calls running at once (default 4)")
    p.add_argument("--rest_api_timeout_in_ms", type=int, default=30_000,
                   help="REST request timeout (default 30000; 504 after it)")
    p.add_argument("--rest_api_num_threads", type=int, default=64, help="REST handler threads (default 64)")
    p.add_argument("--grpc_max_threads", type=int, default=64,
                   help="gRPC handler threads of --grpc_server threads (default 64)")
    p.add_argument("--grpc_server", choices=["asyncio", "threads"], default="asyncio",
                   help="gRPC server: asyncio (grpc.aio on the REST port's event loop; default) or threads "
                        "(grpcio's thread pool)")
    p.add_argument("--keep_alive_seconds", type=float, default=30.0, help="idle HTTP keep-alive (default 30)")
    p.add_argument("--shutdown_grace_seconds", type=float, default=30.0,
                   help="on SIGTERM, time for in-flight requests to finish (default 30)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("client", help="call a TF Serving / vaestream serve endpoint (REST; grpc://HOST:PORT: gRPC)",
                       description="Call a model server (vaestream serve or tensorflow/serving) for a vaestream "
                                   "export; prints the response (status, metadata) or a JSON summary (records, "
                                   "requests, wall seconds) after writing the outputs to --out.")
    p.add_argument("action", choices=["status", "metadata", "encode", "quantize", "reconstruct", "decode", "elbo"],
                   help="status / metadata of the model, or a signature to run on --input")
    p.add_argument("--url", default="http://localhost:8501",
                   help="the server: http(s)://HOST:PORT for REST (default http://localhost:8501), "
                        "grpc://HOST:PORT for gRPC (e.g. grpc://localhost:8500)")
    p.add_argument("--model_name", "--model-name", default="vae", help="NAME of the model on the server (default vae)")
    p.add_argument("--version", type=int, default=None, help="a fixed model version (default: the server's latest)")
    p.add_argument("--input", help="records (IDX, .npy, .npz, CSV; uint8 scaled by 1/255) or latents for decode")
    p.add_argument("--key", help="array name inside an .npz input")
    p.add_argument("--out", help="output .npz (one array per output)")
    p.add_argument("--max-batch", type=int, default=1000,
                   help="most records per request (default 1000); at most the server's max_batch_size")
    p.set_defaults(func=cmd_client)
