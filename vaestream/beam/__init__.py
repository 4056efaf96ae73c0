"""Reusable Apache Beam transforms: read records, validate, write shards, encode and decode with a VAE.

Elements travel in batches, never one record per element (Beam's per-element overhead is tens of µs):

* :class:`RecordBatch` — ``keys`` (n strings), ``records`` ``[n, *shape]`` in their stored dtype and the
  ``scale`` that maps them to model inputs (``x = records * scale``, flattened to ``[n, D]``).
* :class:`CodeBatch` — ``keys``, the posterior parameters ``mean`` and ``log_scale`` ``[n, Nz]`` float32 of
  q(z|x) = N(mean, diag exp(log_scale)^2), the model ``fingerprint`` and optionally the coder's bytes.
* :class:`DeadLetter` — ``(source, key, reason)`` for a record (or the rest of a file) that was refused.

Transforms (each labelled, each usable in any pipeline)::

    read = p | ReadRecords(["data/train-images-idx3-ubyte.gz", "more/*.csv"])      # IDX, npy/npz, CSV, TFRecord, PNG
    good = read[RECORDS] | Validate(shape=(28, 28), likelihood="bernoulli")
    codes = good[RECORDS] | Encode(model_dir="runs/model")                        # RunInference, batched
    codes | WriteBatches("out/codes", "parquet", code_schema(latent_dim=20))
    (read[DEAD_LETTER], good[DEAD_LETTER]) | beam.Flatten() | WriteDeadLetters("out/dead_letter.jsonl")

    # the same, validated in the read step (one step and no Flatten: what the jobs do)
    read = p | ReadRecords(["data/train-images-idx3-ubyte.gz"], validate=Validate((28, 28), "bernoulli"))
    read[RECORDS] | Encode(model_dir="runs/model") | WriteBatches("out/codes")  # TFRecord
    read[DEAD_LETTER] | WriteDeadLetters("out/dead_letter.jsonl")

The model is loaded once per worker process by a Beam ``ModelHandler`` (:class:`VAEModelHandler`) through
``RunInference``; it wraps either a model directory (:func:`vaestream.store.load_model`) or a SavedModel
export (``tf.saved_model.load``), see :class:`LoadedVAE`. Files are written through Beam's file sinks (each
bundle writes a temporary file that is renamed at finalisation), so a retried bundle neither loses nor
duplicates records.

Counters (namespace ``vaestream``): ``records_in`` (records read, plus one per unreadable unit that was
dead-lettered by a reader), ``bytes_in`` (raw record bytes read), ``records`` (records written),
``bytes_out`` (bytes written), ``dead_lettered``. A job is consistent when
``records_in == records + dead_lettered`` (:func:`check_counts`). A job's summary reports the wall seconds of
the whole job, ``bytes_in`` / ``bytes_out`` as the sizes of its input and output files (so one job's bytes out
are the next job's bytes in), and the encode job's ``compression_ratio`` as raw record bytes / bytes out.

The package, one concept a module (``vaestream.beam.<name>`` is the same object under its module)::

    elements       RecordBatch, CodeBatch, DeadLetter, counters' namespace
    formats        input discovery: expand_inputs, plan_reads (which file, which format, which ranges)
    readers        read_range (IDX, npy, npz, CSV, TFRecord, PNG) and ReadRecords
    validate       validate_batch, Validate
    sinks          BatchedTFRecordSink, WriteBatches, WriteDeadLetters, code_schema, record_schema
    shards         WriteShards (shuffle into a shard set + manifest) and prepare (the prepare job)
    model_handler  LoadedVAE, VAEModelHandler, read_model_config (model directory or SavedModel)
    transforms     Encode, Decode, read_codes, ReadCodes
    running        make_pipeline, run_pipeline, counters, check_counts, job_summary, check_output (a job that
                   wrote no record or dead-lettered too much: JobFailedError), clear_outputs, clear_temporary
    bridge         StreamBridge: the in-process streaming runner's TestStream bridge (file and broker watchers)
    stream_sources the streaming encoder's sources (FileWatcher/WatchFiles, PollFiles, Pub/Sub)
    panes          the streaming encoder's window panes on disk (writers, drift step, read_windows)
    streaming      the streaming encoder (event-time windows, late gate, StreamEncode, run_stream)
    dask           the Dask runner
    jobs/          the jobs prepare, encode, decode, stream_encode (pipelines/*.py are their shells)

Names are resolved lazily (importing a job module or ``vaestream.beam.streaming`` does not import the
rest; ``vaestream.beam.X`` imports X's module on first use).
"""

from __future__ import annotations

import importlib

_MODULES = {
    "elements": ("CHUNK CODE_LAYOUTS CodeBatch DEAD_LETTER DeadLetter KEY_DIGITS KeyRange NAMESPACE RecordBatch "
                 "RECORDS SPLIT"),
    "formats": "expand_inputs plan_reads Gunzip",
    "readers": "probe read_range ReadRecords",
    "validate": "default_scale Validate validate_batch",
    "sinks": ("BatchedTFRecordSink code_examples code_schema record_schema WriteBatches WriteDeadLetters write_outputs "
              "write_atomic"),
    "shards": "WriteShards",
    "model_handler": "CODERS coder_kind LoadedVAE lossless_validate read_model_config VAEModelHandler",
    "transforms": "code_files count_codes Decode Encode first_fingerprint read_codes ReadCodes",
    "running": ("check_counts clear_outputs count_lines count_written counters file_sizes freeze_startup_heap "
                "job_summary make_pipeline run_pipeline job_main run_job_argv timed_run build_and_run write_json "
                "finish_job run_batch_job job_started check_output clear_temporary input_bytes BEAM_TEMP"),
    "vaestream.errors": "DataError JobFailedError ModelError ModelMismatchError",
}
_HOMES = {name: module if "." in module else f"vaestream.beam.{module}"
          for module, names in _MODULES.items() for name in names.split()}
"""Where each name of the package lives (the old flat module's public names, and the job helpers)."""

__all__ = ["NAMESPACE", "RECORDS", "DEAD_LETTER", "CHUNK", "SPLIT", "KEY_DIGITS", "RecordBatch", "CodeBatch",
           "DeadLetter", "expand_inputs", "probe", "plan_reads", "read_range", "ReadRecords", "default_scale",
           "validate_batch", "Validate", "BatchedTFRecordSink", "code_examples", "code_schema", "record_schema",
           "WriteBatches", "WriteDeadLetters", "WriteShards", "LoadedVAE", "read_model_config", "VAEModelHandler",
           "CODERS", "coder_kind", "lossless_validate",
           "Encode", "Decode", "code_files", "read_codes", "ReadCodes", "first_fingerprint", "make_pipeline",
           "freeze_startup_heap", "counters", "check_counts", "count_written", "file_sizes", "count_lines",
           "run_pipeline", "job_summary", "clear_outputs"]


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
