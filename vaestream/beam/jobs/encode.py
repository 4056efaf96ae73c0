"""Beam job: records -> latent codes (posterior mean and log-scale, the model fingerprint), batched.

    python -m pipelines.encode --input data/mnist --split test --model runs/model --output codes/
    python -m pipelines.encode --input shards/mnist-train --model runs/model --output codes/ --output_format parquet

Inputs: any format :class:`vaestream.beam.ReadRecords` reads, or a shard set. Output:
``OUTPUT/codes-SSSSS-of-NNNNN.tfrecord`` (``--code_layout block``, the default: one tf.train.Example per batch
of records, keys as name + first offset, mean and log_scale as [n, Nz] float lists, one fingerprint;
``--code_layout record``: one Example per record: key, mean, log_scale, fingerprint) or ``.parquet`` (a row
per record, same columns), ``OUTPUT/dead_letter.jsonl`` and ``OUTPUT/summary.json`` (which names the layout,
versioned: ``code_layout`` ``block/1``, ``record/1`` or ``coded/1``). With ``--coder`` the
codes are entropy-coded: one row per batch of up to ``--chunk_size`` records (keys, records, fingerprint, code
= one vaestream container of the batch's codes in key order); with ``--coder lossless`` the container holds
the records themselves, bits-back coded (decode with ``--output_dtype uint8`` for the exact counts);
``pipelines/decode.py`` reads every form. The model is loaded
once per worker (``RunInference`` with :class:`vaestream.beam.VAEModelHandler`) from ``--model`` (a model
directory) or ``--saved_model`` (an export). Unknown flags are Beam pipeline options.
"""

from __future__ import annotations

import argparse
import sys

import apache_beam as beam

from vaestream import beam as vb
from vaestream.beam.elements import LAYOUT_VERSIONS
from vaestream.beam import dask as beam_dask
from vaestream.beam.jobs import options
from vaestream import shardset
from vaestream.errors import ConfigError

CODES = "codes"
SUMMARY = "summary.json"


add_arguments = options.add_encode_arguments


def build(p: beam.Pipeline, args: argparse.Namespace) -> dict:
    """Add the encode steps to ``p``."""
    check_coder(args)
    config = vb.read_model_config(args.model, args.saved_model)
    out = args.output.rstrip("/")
    read_paths = vb.expand_inputs(args.input, args.split)
    # a rerun replaces the earlier run's files
    vb.clear_outputs(f"{out}/{CODES}-*", f"{out}/{shardset.DEAD_LETTER}", f"{out}/{SUMMARY}", inputs=read_paths)
    # records are validated as they are read (one step, one dead-letter stream: no Flatten stage)
    read = p | "ReadRecords" >> vb.ReadRecords(
        read_paths, args.split, args.chunk_size, args.split_records, args.feature, validate=validation(config, args))
    codes = read[vb.RECORDS] | "Encode" >> vb.Encode(args.model, args.saved_model, args.batch_size,
                                                      overlap=args.inference == "overlap", **coder_options(args))
    vb.write_outputs(codes, read[vb.DEAD_LETTER], out, CODES, args.output_format,
                     vb.code_schema(config.latent_dim, args.coder), args.num_shards, "WriteCodes",
                     "block" if code_layout(args) == "block" else "record")
    return {"output": out, "config": config, "inputs": read_paths}


def code_layout(args: argparse.Namespace) -> str:
    """The layout of the job's code files: ``block`` or ``record`` (``--code_layout``; TFRecord float codes),
    ``record`` for Parquet (a row per record), ``coded`` with ``--coder`` (a row per batch)."""
    if args.coder:
        return "coded"
    return getattr(args, "code_layout", "record") if args.output_format == "tfrecord" else "record"


def coder_options(args: argparse.Namespace) -> dict:
    """The encoding handler's coder options from the job's flags (:class:`vaestream.beam.VAEModelHandler`); every
    runner's encode path builds its handler from these."""
    return {"coder": args.coder, "levels": args.levels, "reconstruction": args.reconstruction,
            "rdo_lmbda": args.rdo_lmbda}


def check_coder(args: argparse.Namespace) -> None:
    """Refuse flag combinations the coder cannot serve: the flags alone first, then (only the model's config read)
    a learned entropy model's."""
    if args.coder == "lossless" and args.model is None:
        raise ConfigError("--coder lossless needs --model (a model directory: the exact float64 networks), not "
                          "--saved_model")
    if (args.levels is not None or args.reconstruction != "level") and args.coder != "lossless":
        raise ConfigError("--levels / --reconstruction (near-lossless) need --coder lossless")
    if args.rdo_lmbda is not None and (args.coder != "lossy" or args.model is None):
        raise ConfigError("--rdo-lmbda (rate-distortion optimised codes) needs --coder (lossy) and --model")
    config = vb.read_model_config(args.model, args.saved_model) if args.model or args.saved_model else None
    if config is not None and config.entropy_model:
        from vaestream.serving.learned_export import refuse_learned_saved_model

        refuse_learned_saved_model(config, args.saved_model, "encode")
        if args.coder == "lossless":
            raise ConfigError("--coder on a model with a learned entropy model: its coder (--coder lossy) needs "
                              "--model (a model directory: the exact float64 networks and entropy tables)")


def check_coder_model(args: argparse.Namespace):
    """With ``--coder``, load the model with its coder before the job starts (a model without coder tables, or
    with tables of another model, is refused here with its one-line error instead of failing in every
    worker); returns the loaded model (held for the job: the in-process runner's workers reuse it), or None."""
    if not args.coder:
        return None
    handler = vb.VAEModelHandler(args.model, args.saved_model, "encode", args.batch_size, **coder_options(args))
    return handler.load_model()


def validation(config, args: argparse.Namespace) -> vb.Validate:
    """The records' check: shape and range for the model; with ``--coder lossless`` also whole counts, stored
    as uint8 (:func:`vaestream.beam.lossless_validate`)."""
    extra = vb.lossless_validate(config.likelihood) if args.coder == "lossless" else {}
    return vb.Validate(config.input_shape, config.likelihood, extra.pop("dtype", None), args.scale, **extra)


def run_job(args: argparse.Namespace, pipeline_args: list[str]) -> dict:
    """Run the encode job on the runner ``pipeline_args`` name: Beam's (:func:`run_on_beam`) or, with the Dask
    runner, :func:`run_on_dask`. Returns (and writes to ``OUTPUT/summary.json``) its summary. Raises
    :class:`vaestream.errors.JobFailedError` (after writing it) when no record was written or more than
    ``--max_dead_letter_fraction`` of them were dead-lettered."""
    run = run_on_dask if beam_dask.wants_dask(pipeline_args) else run_on_beam
    return vb.run_batch_job(run, args, pipeline_args)


def run_on_beam(args: argparse.Namespace, pipeline_args: list[str]) -> dict:
    """The encode job's Beam pipeline (:func:`build`) on the runner ``pipeline_args`` name."""
    check_coder(args)
    held = check_coder_model(args)  # noqa: F841 (kept alive for the workers)
    result, _, info = vb.build_and_run(pipeline_args, build, args)
    out = info["output"]
    ext = "parquet" if args.output_format == "parquet" else "tfrecord"
    layout = code_layout(args)
    return vb.finish_job("encode", result, vb.job_started(args), out, f"{out}/{CODES}-*.{ext}",
                         {"model": args.model or args.saved_model, "latent_dim": info["config"].latent_dim,
                          "output_format": args.output_format, "coder": args.coder or False,
                          "code_layout": LAYOUT_VERSIONS[layout]}, layout != "record", SUMMARY,
                         inputs=info["inputs"], ratio=True,
                         max_dead_letter_fraction=getattr(args, "max_dead_letter_fraction", 1.0))


def run_on_dask(args: argparse.Namespace, pipeline_args: list[str]) -> dict:
    """The encode job on Beam's Dask runner (:func:`vaestream.beam.dask.run_coding`; TFRecord output only)."""
    if args.output_format != "tfrecord":
        raise beam_dask.DaskUnsupportedError("encode on the DaskRunner writes TFRecord only (--output_format "
                                             "tfrecord); Beam's Parquet sink needs side inputs the Dask runner "
                                             "recomputes")
    check_coder(args)
    check_coder_model(args)  # a model without coder tables: refused before the cluster starts
    config = vb.read_model_config(args.model, args.saved_model)
    out = args.output.rstrip("/")
    paths = vb.expand_inputs(args.input, args.split)
    vb.clear_outputs(f"{out}/{CODES}-*", f"{out}/{shardset.DEAD_LETTER}", f"{out}/{SUMMARY}", inputs=paths)
    tasks = [t for p in paths for t in vb.plan_reads(p, args.split_records)]
    handler = vb.VAEModelHandler(args.model, args.saved_model, "encode", args.batch_size, **coder_options(args))
    return beam_dask.run_coding("encode", tasks, handler, args, pipeline_args, out, CODES,
                                {"model": args.model or args.saved_model, "latent_dim": config.latent_dim,
                                 "output_format": args.output_format, "coder": args.coder or False,
                                 "code_layout": LAYOUT_VERSIONS[code_layout(args)]},
                                check=validation(config, args).fn, coded=bool(args.coder), summary_file=SUMMARY,
                                inputs=paths, ratio=True)


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (job flags, then Beam pipeline options) and run the job.

    With ``--streaming`` the input is unbounded (new files matching a pattern, or Pub/Sub): the job is
    :mod:`vaestream.beam.jobs.stream_encode` (``pipelines/stream_encode.py``), which encodes in windows and
    writes windowed output files.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--streaming" in argv:
        from vaestream.beam.jobs import stream_encode

        argv.remove("--streaming")
        return stream_encode.run(argv)
    return vb.run_job_argv(__doc__.splitlines()[0], add_arguments, run_job, argv)
