"""Running a job and accounting for it: pipelines, counters, consistency checks, summaries, output cleanup."""

from __future__ import annotations

import io
import json
import os
from typing import Any, Iterable, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from vaestream import shardset
from vaestream.beam.elements import NAMESPACE
from vaestream.beam.formats import open_raw
from vaestream.beam.transforms import count_codes
from vaestream.errors import DataError, JobFailedError, ModelError, ModelMismatchError


def make_pipeline(options) -> beam.Pipeline:
    """A Pipeline on the runner the options name, or on the in-process ``FnApiRunner`` (no download) if none.

    ``--direct_num_workers`` and ``--direct_running_mode`` (``in_memory``, ``multi_threading``,
    ``multi_processing``) are read by the FnApiRunner from the options.
    """
    from apache_beam.options.pipeline_options import StandardOptions
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    if options.view_as(StandardOptions).runner is None:
        return beam.Pipeline(runner=FnApiRunner(), options=options)
    return beam.Pipeline(options=options)


_HEAP_FROZEN = False


def freeze_startup_heap() -> None:
    """Move the objects alive before the first job of this process (TensorFlow's and Beam's modules, ~0.5M
    objects) out of reach of the cyclic garbage collector (``gc.freeze``), once per process. The job entry
    points call it (``vaestream encode|decode|prepare``, ``python pipelines/*.py``); the library never does,
    since it changes the whole process: call it yourself in a process of your own that runs jobs.

    Without it, the allocations of a job's first pipeline (translation, bundle processors) trigger one full
    collection over that whole heap, ~0.3 s of a 10k-record job's ~1 s (measured, ``benchmarks/RESULTS_beam.md``).
    Frozen objects are still freed when their reference count drops; only cyclic garbage that already exists
    at the first call is never collected, which bounds what this can keep alive to that one snapshot.
    """
    import gc

    global _HEAP_FROZEN
    if not _HEAP_FROZEN:
        _HEAP_FROZEN = True
        gc.freeze()


def counters(result) -> dict[str, int]:
    """The ``vaestream`` counters of a finished pipeline, summed over steps (committed values)."""
    from apache_beam.metrics.metric import MetricsFilter

    out: dict[str, int] = {}
    for c in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        try:
            v = c.committed
        except Exception:
            v = None
        if v is None:
            v = c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(v or 0)
    return out


def check_counts(c: dict[str, int], what: str) -> None:
    """Raise :class:`DataError` unless ``records_in == records + dead_lettered``."""
    rin, rout, dead = c.get("records_in", 0), c.get("records", 0), c.get("dead_lettered", 0)
    if rin != rout + dead:
        raise DataError(f"{what}: {rin} records in, but {rout} written + {dead} dead-lettered = {rout + dead}")


def count_written(paths: Iterable[str], coded: bool = False) -> int:
    """Records in written TFRecord / Parquet files (Parquet from its footer, TFRecord by reading through its
    framing, record blocks from each block's leading ``records`` feature);
    ``coded``: code files of a row per batch (the encode job's ``--coder``, or its block layout), the rows'
    record counts summed (:func:`vaestream.beam.transforms.count_codes`)."""
    import pyarrow.parquet as pq

    if coded:  # (block codes: each block's record count, without decoding its floats)
        return sum(count_codes(p) for p in paths)
    total = 0
    tf_paths = []
    for p in paths:
        if p.endswith(".parquet"):
            with open_raw(p) as f:
                total += pq.ParquetFile(io.BytesIO(f.read())).metadata.num_rows
        else:
            tf_paths.append(p)
    return total + sum(shardset.count_records(tf_paths, blocks=True).values())  # record blocks: their counts


def file_sizes(pattern: str) -> tuple[list[str], int]:
    """Paths matching ``pattern`` and their total size in bytes."""
    meta = FileSystems.match([pattern])[0].metadata_list
    return sorted(m.path for m in meta), int(sum(m.size_in_bytes for m in meta))


def count_lines(path: str) -> int:
    """Non-empty lines of a text file (0 if it does not exist)."""
    if not FileSystems.exists(path):
        return 0
    with open_raw(path) as f:
        return sum(1 for line in io.TextIOWrapper(f, encoding="utf-8") if line.strip())


def run_pipeline(p: beam.Pipeline):
    """Run ``p`` to the end; a vaestream error raised in a worker is re-raised as its own type."""
    from vaestream.errors import VaestreamError

    try:
        result = p.run()
        result.wait_until_finish()
        return result
    except VaestreamError:
        raise
    except Exception as e:  # runners wrap worker exceptions (RuntimeError carrying the remote traceback)
        seen, cur = set(), e
        while cur is not None and id(cur) not in seen:
            if isinstance(cur, VaestreamError):
                raise cur from e
            seen.add(id(cur))
            cur = cur.__cause__ or cur.__context__
        text = str(e)
        for cls in (ModelMismatchError, ModelError, DataError):
            marker = f"{cls.__name__}: "
            if marker in text:
                msg = text.rsplit(marker, 1)[1].strip().splitlines()[0]
                raise cls(msg) from e
        raise


def input_bytes(paths: Sequence[str]) -> int:
    """Bytes of the input files as stored (a PNG folder: its ``*.png`` files), the jobs' ``bytes_in``: the
    encode job's ``bytes_out`` is the decode job's ``bytes_in`` for the same files."""
    patterns = [p.rstrip("/") + "/*.png" if _is_dir(p) else p for p in paths]
    return int(sum(m.size_in_bytes for r in FileSystems.match(patterns) for m in r.metadata_list))


def _is_dir(path: str) -> bool:
    return "://" not in path and os.path.isdir(path)


def job_summary(job: str, result, started: float, output_pattern: str, dead_letter_path: str,
                extra: dict | None = None, coded: bool = False, counts: dict[str, int] | None = None,
                inputs: Sequence[str] = (), ratio: bool = False) -> dict:
    """Counters, throughput, bytes and the conservation check of a finished job.

    ``started``: the job's start (``time.perf_counter()``); ``seconds`` is the wall time from it to the end
    of the job (model loading, the pipeline and the output check included). ``counts``: the counters, where
    the runner has no metrics (the Dask runner: :mod:`vaestream.beam.dask` counts in the tasks' results);
    default ``counters(result)``. ``inputs``: the input files, whose size on disk is ``bytes_in``;
    ``bytes_out`` is the size of the output files (``output_pattern``; not the dead letters or the summary).
    ``ratio`` (the encode job): also ``record_bytes`` (the records' raw bytes as read) and
    ``compression_ratio`` = record_bytes / bytes_out.

    Checks ``records_in == records + dead_lettered`` from the counters, and that the output files hold
    ``records`` records and the dead-letter file ``dead_lettered`` lines; raises :class:`DataError` if not.
    """
    import time

    c = counts if counts is not None else counters(result)
    check_counts(c, job)
    files, out_bytes = file_sizes(output_pattern)
    written = count_written(files, coded)
    dead = count_lines(dead_letter_path)
    if written != c.get("records", 0):
        raise DataError(f"{job}: output files hold {written} records, the pipeline wrote {c.get('records', 0)}")
    if dead != c.get("dead_lettered", 0):
        raise DataError(f"{job}: {dead_letter_path} has {dead} lines, the pipeline dead-lettered "
                        f"{c.get('dead_lettered', 0)}")
    seconds = time.perf_counter() - started
    summary = {"job": job, "records_in": c.get("records_in", 0), "records": written, "dead_lettered": dead,
               "seconds": round(seconds, 3), "records_per_second": round(written / max(seconds, 1e-9), 1),
               "bytes_in": input_bytes(inputs), "bytes_out": out_bytes}
    if ratio:
        record_bytes = c.get("bytes_in", 0)
        summary["record_bytes"] = record_bytes
        summary["compression_ratio"] = round(record_bytes / out_bytes, 3) if out_bytes else None
    summary.update({"outputs": files, "dead_letter": dead_letter_path})
    summary.update(extra or {})
    return summary


def check_output(summary: dict, max_dead_letter_fraction: float = 1.0) -> dict:
    """The jobs' output contract: raise :class:`JobFailedError` (exit code 3) when the job wrote no record, or
    dead-lettered more than ``max_dead_letter_fraction`` of the records it read; else return ``summary``."""
    job, rin, written, dead = summary["job"], summary["records_in"], summary["records"], summary["dead_lettered"]
    where = f"reasons in {summary['dead_letter']}"
    if written == 0:
        why = (f"all {rin} records read were dead-lettered ({where})" if rin and dead == rin
               else "its inputs hold no records")
        raise JobFailedError(f"{job}: wrote no record: {why}", summary)
    if rin and dead / rin > max_dead_letter_fraction:
        raise JobFailedError(f"{job}: dead-lettered {dead} of the {rin} records read ({100 * dead / rin:.1f} %), "
                             f"more than --max_dead_letter_fraction {max_dead_letter_fraction:g} ({where})", summary)
    return summary


BEAM_TEMP = "beam-temp-*"
"""The temporary folders Beam's file sinks write beside their output (removed when a job ends, and by
:func:`clear_temporary` when it failed)."""


def clear_temporary(out: str) -> None:
    """Remove the ``beam-temp-*`` folders of earlier or failed runs under the output directory ``out``."""
    out = out.rstrip("/")
    if "://" not in out:  # a local directory: the folders themselves
        import glob
        import shutil

        for d in glob.glob(os.path.join(glob.escape(out), BEAM_TEMP)):
            shutil.rmtree(d, ignore_errors=True) if os.path.isdir(d) else os.remove(d)
        return
    found = [m.path for m in FileSystems.match([f"{out}/{BEAM_TEMP}/*"])[0].metadata_list]  # object stores: files
    if found:
        FileSystems.delete(sorted(set(found)))


def clear_outputs(*patterns: str, inputs: Sequence[str] = ()) -> int:
    """Delete the files matching ``patterns`` (the outputs of an earlier run of a job into the same place, so a
    rerun with another shard count leaves no stale shards behind); returns how many were deleted.

    Raises :class:`DataError` (deleting nothing) if one of them is among ``inputs``."""
    paths = [m.path for pat in patterns for m in FileSystems.match([pat])[0].metadata_list]
    def norm(p: str) -> str:
        return p if "://" in p else os.path.abspath(p)

    clash = sorted({norm(p) for p in paths} & {norm(str(i)) for i in inputs})
    if clash:
        raise DataError(f"{clash[0]}: is an input of this job and would be overwritten by its output; "
                        "write to another directory")
    if paths:
        FileSystems.delete(paths)
    return len(paths)


def write_json(path: str, obj: dict) -> None:
    """A job's ``summary.json``: ``obj`` as indented JSON (any Beam file system)."""
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path) as f:
        f.write((json.dumps(obj, indent=2) + "\n").encode())


def timed_run(p: beam.Pipeline):
    """:func:`run_pipeline` and the seconds it took."""
    import time

    t0 = time.perf_counter()
    result = run_pipeline(p)
    return result, time.perf_counter() - t0


def build_and_run(pipeline_args: Sequence[str], build, *build_args) -> tuple[Any, float, dict]:
    """A pipeline on the runner ``pipeline_args`` name (:func:`make_pipeline`), built by
    ``build(p, *build_args)`` (which returns what the summary needs), then run: (result, seconds, info).
    ``seconds`` is the pipeline's run alone; a job's summary reports the job's wall time (:func:`job_summary`)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    p = make_pipeline(PipelineOptions(list(pipeline_args)))
    info = build(p, *build_args)
    result, seconds = timed_run(p)
    return result, seconds, info


def run_job_argv(description: str, add_arguments, run_job, argv: Sequence[str] | None) -> dict:
    """A job's ``run(argv)``: parse the job's flags (``add_arguments``), pass the rest to ``run_job`` as
    Beam pipeline options, and return its summary."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser)
    args, pipeline_args = parser.parse_known_args(argv)
    return run_job(args, pipeline_args)


def job_main(run, argv: Sequence[str] | None = None, freeze: bool = True) -> None:
    """A job's ``python -m pipelines.JOB``: run it on ``argv`` (default ``sys.argv[1:]``), print its summary.

    Exits as the ``vaestream`` command does: 0 done; 1 a vaestream error (one line on stderr); 3 the job ran
    but failed its output contract (:class:`JobFailedError`: its summary is printed first)."""
    import sys

    from vaestream.errors import VaestreamError

    if freeze:
        freeze_startup_heap()
    prog = os.path.basename(sys.argv[0]) if argv is None else "job"
    try:
        summary = run(sys.argv[1:] if argv is None else list(argv))
    except VaestreamError as e:
        if getattr(e, "summary", None) is not None:
            print(json.dumps(e.summary, indent=2))
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 1))
    print(json.dumps(summary, indent=2))


def finish_job(job: str, result, started: float, out: str, output_pattern: str, extra: dict,
               coded: bool = False, summary_file: str = "summary.json", counts: dict | None = None,
               inputs: Sequence[str] = (), ratio: bool = False, max_dead_letter_fraction: float = 1.0) -> dict:
    """The end of a batch job: its :func:`job_summary` (dead letters in ``OUT/dead_letter.jsonl``), written to
    ``OUT/summary.json``, then its output contract (:func:`check_output`: :class:`JobFailedError` if it
    failed; the summary and every file written stay)."""
    summary = job_summary(job, result, started, output_pattern, f"{out}/{shardset.DEAD_LETTER}", extra, coded=coded,
                          counts=counts, inputs=inputs, ratio=ratio)
    write_json(f"{out}/{summary_file}", summary)
    return check_output(summary, max_dead_letter_fraction)


def job_started(args) -> float:
    """When the job of ``args`` started (``time.perf_counter()``), as :func:`run_batch_job` noted it; now if
    it did not."""
    import time

    return getattr(args, "started", None) or time.perf_counter()


def run_batch_job(run, args, pipeline_args: Sequence[str]) -> dict:
    """A batch job's ``run(args, pipeline_args)`` (its Beam pipeline or its Dask path, chosen by the job): note
    the job's start in ``args.started`` (its summary's wall ``seconds`` count from there), clear the
    ``beam-temp-*`` folders of earlier runs under ``args.output`` before it, and this run's when it fails
    (unless it failed its output contract: :class:`JobFailedError` leaves every file it wrote)."""
    import time

    args.started = time.perf_counter()
    out = getattr(args, "output", None)
    if out:
        clear_temporary(out)
    try:
        return run(args, pipeline_args)
    except JobFailedError:
        raise
    except BaseException:
        if out:
            clear_temporary(out)
        raise
