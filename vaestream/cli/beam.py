"""``vaestream prepare``, ``vaestream encode``, ``vaestream decode``: the Beam jobs of ``pipelines/``.

Each subcommand takes the job's flags (``python -m pipelines.JOB --help``) plus the common Beam options
``--runner``, ``--direct_num_workers`` and ``--direct_running_mode``; any other pipeline option goes in
``--beam-args "--project P --region R ..."``. With no ``--runner`` the job runs on the in-process
FnApiRunner. At the end it prints a summary: records, dead-lettered, seconds, throughput, bytes in and out,
compression ratio (``--json`` for one JSON line).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import threading
import time


def _beam_args(a: argparse.Namespace) -> list[str]:
    out = []
    if a.runner:
        out.append(f"--runner={a.runner}")
    if a.direct_num_workers is not None:
        out.append(f"--direct_num_workers={a.direct_num_workers}")
    if a.direct_running_mode:
        out.append(f"--direct_running_mode={a.direct_running_mode}")
    return out + shlex.split(a.beam_args or "")


def _add_beam_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Beam runner")
    g.add_argument("--runner", default=None, help="DataflowRunner, FlinkRunner, SparkRunner, ... (default: in-process)")
    g.add_argument("--direct_num_workers", "--direct-num-workers", type=int, default=None)
    g.add_argument("--direct_running_mode", "--direct-running-mode", default=None,
                   choices=["in_memory", "multi_threading", "multi_processing"])
    g.add_argument("--beam-args", "--beam_args", default="", help="further pipeline options, one string")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    p.add_argument("--no-progress", action="store_true", help="no elapsed-time display while the job runs")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def format_summary(s: dict) -> str:
    """A human-readable table of a job summary."""
    rows = [("job", s["job"]), ("records in", s["records_in"]), ("records written", s["records"]),
            ("dead-lettered", f"{s['dead_lettered']}  ({s['dead_letter']})"), ("seconds", s["seconds"]),
            ("throughput", f"{s['records_per_second']:,.0f} records/s"), ("bytes in", _human_bytes(s["bytes_in"])),
            ("bytes out", _human_bytes(s["bytes_out"]))]
    if s.get("compression_ratio"):
        rows.append(("compression ratio", f"{s['compression_ratio']:.3f}"))
    for k in ("manifest", "content_hash", "model", "fingerprint", "output_format"):
        if k in s:
            rows.append((k.replace("_", " "), s[k]))
    rows.append(("outputs", f"{len(s['outputs'])} file(s): {s['outputs'][0] if s['outputs'] else '-'}"
                 + (" ..." if len(s["outputs"]) > 1 else "")))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _run(module, a: argparse.Namespace) -> int:
    from vaestream.beam import freeze_startup_heap

    freeze_startup_heap()  # this process exists to run the job (see its docstring)
    stop = threading.Event()
    if not a.no_progress and sys.stderr.isatty():
        t0 = time.perf_counter()

        def tick():
            while not stop.wait(0.5):
                print(f"\r{a.command}: running {time.perf_counter() - t0:6.1f} s", end="", file=sys.stderr, flush=True)
            print("\r", end="", file=sys.stderr, flush=True)

        threading.Thread(target=tick, daemon=True).start()
    try:
        summary = module.run_job(a, _beam_args(a))
    finally:
        stop.set()
    print(json.dumps(summary) if a.json else format_summary(summary))
    return 0


def cmd_prepare(a: argparse.Namespace) -> int:
    """Raw records -> validated, shuffled TFRecord shards + manifest.json (pipelines/prepare.py)."""
    from vaestream.beam.jobs import prepare

    return _run(prepare, a)


def cmd_encode(a: argparse.Namespace) -> int:
    """Records -> latent codes (pipelines/encode.py)."""
    from vaestream.beam.jobs import encode

    return _run(encode, a)


def cmd_decode(a: argparse.Namespace) -> int:
    """Latent codes -> reconstructions (pipelines/decode.py)."""
    from vaestream.beam.jobs import decode

    return _run(decode, a)


def add_subcommands(sub) -> None:
    from vaestream.beam.jobs import decode, encode, prepare

    for name, module, func, help_ in (
            ("prepare", prepare, cmd_prepare, "Beam job: raw records -> shuffled TFRecord shards + manifest"),
            ("encode", encode, cmd_encode, "Beam job: records -> latent codes (TFRecord or Parquet)"),
            ("decode", decode, cmd_decode, "Beam job: latent codes -> reconstructions")):
        p = sub.add_parser(name, help=help_, description=func.__doc__)
        module.add_arguments(p)
        _add_beam_args(p)
        p.set_defaults(func=func)
