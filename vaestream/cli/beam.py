"""``vaestream prepare``, ``vaestream encode``, ``vaestream decode``: the Beam jobs of ``pipelines/``.

Each subcommand takes the job's flags (``python -m pipelines.JOB --help``) plus the common Beam options
``--runner``, ``--direct_num_workers`` and ``--direct_running_mode``, the Dask runner's
``--dask_client_address``, ``--dask_local_workers`` and ``--dask_npartitions`` (any of them alone means
``--runner DaskRunner``); any other pipeline option goes in ``--beam-args "--project P --region R ..."``.
With no ``--runner`` the job runs on the in-process FnApiRunner. At the end it prints a summary: records
in, written and dead-lettered, wall seconds, throughput, bytes of the input and output files, and for
encode the compression of the raw records (``--json`` for one JSON line).

Exit codes: 0 done; 1 a vaestream error before or while the job ran (bad input, model, flag values); 3 the
job ran but wrote no record, or dead-lettered more than ``--max_dead_letter_fraction`` of the records read
(its summary is printed; its outputs and ``dead_letter.jsonl`` stay).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import threading
import time


def _beam_args(a: argparse.Namespace) -> list[str]:
    """The job's Beam pipeline options from the runner flags (a ``--dask_*`` flag alone means DaskRunner)."""
    out = []
    if a.runner:
        out.append(f"--runner={a.runner}")
    if a.direct_num_workers is not None:
        out.append(f"--direct_num_workers={a.direct_num_workers}")
    if a.direct_running_mode:
        out.append(f"--direct_running_mode={a.direct_running_mode}")
    for flag in ("dask_client_address", "dask_local_workers", "dask_npartitions"):
        if getattr(a, flag, None) is not None:
            out.append(f"--{flag}={getattr(a, flag)}")
    return out + shlex.split(a.beam_args or "")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def format_summary(s: dict) -> str:
    """A human-readable table of a job summary."""
    rows = [("job", s["job"]), ("records in", s["records_in"]), ("records written", s["records"]),
            ("dead-lettered", f"{s['dead_lettered']}  ({s['dead_letter']})"),
            ("seconds", f"{s['seconds']:.1f} (wall)"), ("throughput", f"{s['records_per_second']:,.0f} records/s"),
            ("bytes in", f"{_human_bytes(s['bytes_in'])} (input files)"),
            ("bytes out", f"{_human_bytes(s['bytes_out'])} (output files)")]
    if s.get("compression_ratio"):
        rows.append(("compression", f"{s['compression_ratio']:.1f}x ({_human_bytes(s['record_bytes'])} of raw "
                                    "records / bytes out)"))
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
    from vaestream.errors import JobFailedError

    try:
        summary = module.run_job(a, _beam_args(a))
    except JobFailedError as e:  # the job ran: its summary, then the reason (exit code 3, from the caller)
        stop.set()
        if e.summary is not None:
            print(json.dumps(e.summary) if a.json else format_summary(e.summary), flush=True)
        raise
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
    """Add ``prepare``, ``encode`` and ``decode`` (their flags come from :mod:`vaestream.beam.jobs.options`:
    neither Beam nor TensorFlow is imported to list them)."""
    from vaestream.beam.jobs import options

    for name, add_arguments, func, help_ in (
            ("prepare", options.add_prepare_arguments, cmd_prepare,
             "Beam job: raw records -> shuffled TFRecord shards + manifest"),
            ("encode", options.add_encode_arguments, cmd_encode,
             "Beam job: records -> latent codes (TFRecord or Parquet)"),
            ("decode", options.add_decode_arguments, cmd_decode, "Beam job: latent codes -> reconstructions")):
        p = sub.add_parser(name, help=help_, description=func.__doc__)
        add_arguments(p)
        options.add_runner_arguments(p)
        p.set_defaults(func=func)
