"""Beam job: records -> latent codes (posterior mean and log-scale, the model fingerprint), batched.

    python -m pipelines.encode --input data/mnist --split test --model runs/model --output codes/
    python -m pipelines.encode --input shards/mnist-train --model runs/model --output codes/ --output_format parquet

Inputs: any format :class:`vaestream.beam.ReadRecords` reads, or a shard set. Output:
``OUTPUT/codes-SSSSS-of-NNNNN.tfrecord`` (one tf.train.Example per record: key, mean, log_scale, fingerprint)
or ``.parquet`` (same columns), ``OUTPUT/dead_letter.jsonl`` and ``OUTPUT/summary.json``. With ``--coder`` the
codes are entropy-coded: one row per batch of up to ``--chunk_size`` records (keys, records, fingerprint, code
= one vaestream container of the batch's codes in key order); ``pipelines/decode.py`` reads both forms. The model is loaded
once per worker (``RunInference`` with :class:`vaestream.beam.VAEModelHandler`) from ``--model`` (a model
directory) or ``--saved_model`` (an export). Unknown flags are Beam pipeline options.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from vaestream import beam as vb
from vaestream import shardset
from vaestream.beam.running import write_json

CODES = "codes"
SUMMARY = "summary.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", "--inputs", dest="input", required=True, nargs="+",
                        help="record files, globs, directories, a shard set or 'fashion-mnist'")
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", "--model_dir", dest="model", help="model directory (config.json + ckpt/)")
    g.add_argument("--saved_model", "--saved-model", dest="saved_model", help="SavedModel export directory")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--output_format", "--output-format", default="tfrecord", choices=["tfrecord", "parquet"])
    parser.add_argument("--split", default="test", choices=["train", "test"],
                        help="split of an MNIST-layout directory (default test)")
    parser.add_argument("--scale", type=float, default=None,
                        help="model input = value * scale (default: 1/255 for integers, 1 for floats)")
    parser.add_argument("--coder", action="store_true",
                        help="entropy-code the latents (vaestream.coding.codec; needs the model's coder tables): one row per "
                             "batch of records, its keys and one container of their codes, instead of float codes")
    parser.add_argument("--inference", default="runinference", choices=["runinference", "overlap"],
                        help="runinference: Beam's RunInference, one model call at a time; overlap: the next batch "
                             "is encoded on a background thread while the last one is written (helps when the "
                             "cores are shared with other work)")
    parser.add_argument("--chunk_size", "--chunk-size", type=int, default=vb.CHUNK, help="records per element")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=vb.CHUNK, help="records per model call")
    parser.add_argument("--split_records", "--split-records", type=int, default=vb.SPLIT)
    parser.add_argument("--num_shards", "--num-shards", type=int, default=0,
                        help="output files (0: the runner's choice)")
    parser.add_argument("--feature", default="x", help="record feature of generic TFRecord Examples / .npz array")


def build(p: beam.Pipeline, args: argparse.Namespace) -> dict:
    """Add the encode steps to ``p``."""
    config = vb.read_model_config(args.model, args.saved_model)
    out = args.output.rstrip("/")
    read_paths = vb.expand_inputs(args.input, args.split)
    # a rerun replaces the earlier run's files
    vb.clear_outputs(f"{out}/{CODES}-*", f"{out}/{shardset.DEAD_LETTER}", f"{out}/{SUMMARY}", inputs=read_paths)
    # records are validated as they are read (one step, one dead-letter stream: no Flatten stage)
    read = p | "ReadRecords" >> vb.ReadRecords(
        read_paths, args.split, args.chunk_size, args.split_records, args.feature,
        validate=vb.Validate(config.input_shape, config.likelihood, None, args.scale))
    codes = read[vb.RECORDS] | "Encode" >> vb.Encode(args.model, args.saved_model, args.batch_size, args.coder,
                                                      overlap=args.inference == "overlap")
    schema = vb.code_schema(config.latent_dim, args.coder) if args.output_format == "parquet" else None
    codes | "WriteCodes" >> vb.WriteBatches(f"{out}/{CODES}", args.output_format, schema, args.num_shards)
    read[vb.DEAD_LETTER] | "WriteDeadLetters" >> vb.WriteDeadLetters(f"{out}/{shardset.DEAD_LETTER}")
    return {"output": out, "config": config}


def run_job(args: argparse.Namespace, pipeline_args: list[str]) -> dict:
    """Run the encode job; returns (and writes to ``OUTPUT/summary.json``) its summary."""
    from vaestream.beam import dask as beam_dask

    if beam_dask.wants_dask(pipeline_args):  # Beam's DaskRunner: a linear graph, our own commit (beam_dask)
        return beam_dask.run_encode(args, pipeline_args)
    p = vb.make_pipeline(PipelineOptions(pipeline_args))
    info = build(p, args)
    t0 = time.perf_counter()
    result = vb.run_pipeline(p)
    seconds = time.perf_counter() - t0
    out = info["output"]
    ext = "parquet" if args.output_format == "parquet" else "tfrecord"
    summary = vb.job_summary("encode", result, seconds, f"{out}/{CODES}-*.{ext}", f"{out}/{shardset.DEAD_LETTER}",
                             {"model": args.model or args.saved_model, "latent_dim": info["config"].latent_dim,
                              "output_format": args.output_format, "coder": bool(args.coder)}, coded=bool(args.coder))
    write_json(f"{out}/{SUMMARY}", summary)
    return summary


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (job flags, then Beam pipeline options) and run the job.

    With ``--streaming`` the input is unbounded (new files matching a pattern, or Pub/Sub): the job is
    ``pipelines/stream_encode.py``, which encodes in windows and writes windowed output files.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--streaming" in argv:
        from vaestream.beam.jobs import stream_encode

        argv.remove("--streaming")
        return stream_encode.run(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args, pipeline_args = parser.parse_known_args(argv)
    return run_job(args, pipeline_args)


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.encode``: run the job on ``argv`` (default ``sys.argv[1:]``) and print its summary."""
    vb.freeze_startup_heap()
    print(json.dumps(run(sys.argv[1:] if argv is None else argv), indent=2))


if __name__ == "__main__":
    main()
