"""``vaestream export``, ``vaestream serve`` and ``vaestream client``: thin shells over :mod:`vaestream.export`
and :mod:`vaestream.serve`."""

from __future__ import annotations

import argparse
import json


def cmd_export(a: argparse.Namespace) -> int:
    from vaestream.export import describe, export

    path = export(a.model, a.out, a.version, quality=a.quality, elbo_samples=a.elbo_samples,
                  verify=not a.no_verify)
    info = describe(path)
    print(json.dumps({"path": info["path"], "version": info["version"], "fingerprint": info["fingerprint"],
                      "has_coder_tables": info["has_coder_tables"], "signatures": sorted(info["signatures"])}))
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from vaestream.serve import serve

    serve(a.model_base_path, a.model_name, port=a.port, host=a.host, version_policy=a.version_policy,
          max_batch_size=a.max_batch_size, poll_seconds=a.file_system_poll_wait_seconds,
          max_request_bytes=a.max_request_bytes, max_concurrent=a.max_concurrent, verbose=a.verbose)
    return 0


def cmd_client(a: argparse.Namespace) -> int:
    from vaestream.serve import run_client

    print(json.dumps(run_client(a.url, a.model_name, a.action, a.input, a.out, a.version, a.key, a.max_batch),
                     indent=1 if a.action in ("status", "metadata") else None))
    return 0


def add_subcommands(sub) -> None:
    p = sub.add_parser("export", help="export a model directory as a versioned SavedModel (TF Serving layout)")
    p.add_argument("--model", required=True, help="model directory (config.json + ckpt/)")
    p.add_argument("--out", required=True, help="export base: the version goes to OUT/N/")
    p.add_argument("--version", type=int, default=None, help="version N (default: the next free integer)")
    p.add_argument("--quality", type=float, default=None,
                   help="coder quality of the quantize/reconstruct signatures (a ladder step; default 1.0)")
    p.add_argument("--elbo-samples", type=int, default=1, help="L of the elbo signature (default 1)")
    p.add_argument("--no-verify", action="store_true", help="skip reloading the export to check it")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="serve an export over TF Serving's REST API (local, for tests and demos)")
    p.add_argument("--model_base_path", "--model-base-path", required=True, help="export base (versions in it)")
    p.add_argument("--model_name", "--model-name", default="vae", help="NAME in /v1/models/NAME (default vae)")
    p.add_argument("--port", "--rest_api_port", type=int, default=8501, help="port (default 8501; 0: any free)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--version_policy", "--version-policy", default="latest",
                   help="latest | latest:K | all | specific:N[,M] (default latest, as TF Serving)")
    p.add_argument("--max_batch_size", "--max-batch-size", type=int, default=10_000,
                   help="largest batch one request may carry (default 10000)")
    p.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0,
                   help="poll the base path for new versions every S seconds (0: never; default 1)")
    p.add_argument("--max_request_bytes", type=int, default=64 << 20, help="largest request body (default 64 MiB)")
    p.add_argument("--max_concurrent", type=int, default=4, help="signature calls running at once (default 4)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("client", help="call a TF Serving / vaestream serve REST endpoint")
    p.add_argument("action", choices=["status", "metadata", "encode", "quantize", "reconstruct", "decode", "elbo"])
    p.add_argument("--url", default="http://localhost:8501")
    p.add_argument("--model_name", "--model-name", default="vae")
    p.add_argument("--version", type=int, default=None, help="a fixed model version (default: latest)")
    p.add_argument("--input", help="records (IDX, .npy, .npz, CSV; uint8 scaled by 1/255) or latents for decode")
    p.add_argument("--key", help="array name inside an .npz input")
    p.add_argument("--out", help="output .npz (one array per output)")
    p.add_argument("--max-batch", type=int, default=1000, help="records per request (default 1000)")
    p.set_defaults(func=cmd_client)
