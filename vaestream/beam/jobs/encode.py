"""Beam job: records -> latent codes (posterior mean and log-scale, the model fingerprint), batched.

    python -m pipelines.encode --input data/mnist --split test --model runs/model --output codes/
    python -m pipelines.encode --input shards/mnist-train --model runs/model --output codes/ --output_format parquet

Inputs: any format :class:`vaestream.beam.ReadRecords` reads, or a shard set. Output:
``OUTPUT/codes-SSSSS-of-NNNNN.tfrecord`` (one tf.train.Example per record: key, mean, log_scale, fingerprint)
or ``.parquet`` (same columns), ``OUTPUT/dead_letter.jsonl`` and ``OUTPUT/summary.json``. With ``--coder`` the
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
from vaestream.beam.jobs import add_model_and_output_arguments
from vaestream.coding.lossless import RECONSTRUCTIONS
from vaestream import shardset
from vaestream.errors import ConfigError

CODES = "codes"
SUMMARY = "summary.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_output_arguments(parser, "record files, globs, directories, a shard set or 'fashion-mnist'",
                                   vb.CHUNK)
    parser.add_argument("--split", default="test", choices=["train", "test"],
                        help="split of an MNIST-layout directory (default test)")
    parser.add_argument("--scale", type=float, default=None,
                        help="model input = value * scale (default: 1/255 for integers, 1 for floats)")
    parser.add_argument("--coder", nargs="?", const="lossy", default=None, choices=vb.CODERS,
                        help="one row per batch of records (its keys and one container) instead of float codes. "
                             "lossy (the default when the flag is given alone): the quantised latents, entropy-coded "
                             "(vaestream.coding.codec; needs the model's coder tables); lossless: the records "
                             "themselves, exactly, by bits-back coding (vaestream.coding.lossless; a model directory "
                             "with a beta_binomial or bernoulli likelihood; records must be whole counts)")
    parser.add_argument("--levels", type=int, default=None,
                        help="with --coder lossless: near-lossless, each pixel rounded to the nearest of K = 2..64 "
                             "levels first (every pixel within 255 / (2 (K - 1)); the decode job reads K from the stream)")
    parser.add_argument("--reconstruction", default="level", choices=list(RECONSTRUCTIONS),
                        help="with --levels: decode a pixel as its level, as E[count | level, z] under the model, or "
                             "learned (the model directory's context model's reconstruction network)")
    parser.add_argument("--rdo-lmbda", "--rdo_lmbda", type=float, default=None,
                        help="with the lossy coder and --model: rate-distortion optimised codes, each record's chosen "
                             "for bits + L * MSE by a search through the decoder (vaestream.coding.rdo; ordinary "
                             "streams, ~20x slower encoding)")
    parser.add_argument("--inference", default="runinference", choices=["runinference", "overlap"],
                        help="runinference: Beam's RunInference, one model call at a time; overlap: the next batch "
                             "is encoded on a background thread while the last one is written (helps when the "
                             "cores are shared with other work)")
    parser.add_argument("--split_records", "--split-records", type=int, default=vb.SPLIT)
    parser.add_argument("--num_shards", "--num-shards", type=int, default=0,
                        help="output files (0: the runner's choice)")
    parser.add_argument("--feature", default="x", help="record feature of generic TFRecord Examples / .npz array")


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
                     vb.code_schema(config.latent_dim, args.coder), args.num_shards, "WriteCodes")
    return {"output": out, "config": config}


def coder_options(args: argparse.Namespace) -> dict:
    """The encoding handler's coder options from the job's flags (:class:`vaestream.beam.VAEModelHandler`); every
    runner's encode path builds its handler from these."""
    return {"coder": args.coder, "levels": args.levels, "reconstruction": args.reconstruction,
            "rdo_lmbda": args.rdo_lmbda}


def check_coder(args: argparse.Namespace) -> None:
    """Refuse flag combinations the coder cannot serve, before anything is read."""
    if args.coder == "lossless" and args.model is None:
        raise ConfigError("--coder lossless needs --model (a model directory: the exact float64 networks), not "
                          "--saved_model")
    if (args.levels is not None or args.reconstruction != "level") and args.coder != "lossless":
        raise ConfigError("--levels / --reconstruction (near-lossless) need --coder lossless")
    if args.rdo_lmbda is not None and (args.coder != "lossy" or args.model is None):
        raise ConfigError("--rdo-lmbda (rate-distortion optimised codes) needs --coder (lossy) and --model")


def validation(config, args: argparse.Namespace) -> vb.Validate:
    """The records' check: shape and range for the model; with ``--coder lossless`` also whole counts, stored
    as uint8 (:func:`vaestream.beam.lossless_validate`)."""
    extra = vb.lossless_validate(config.likelihood) if args.coder == "lossless" else {}
    return vb.Validate(config.input_shape, config.likelihood, extra.pop("dtype", None), args.scale, **extra)


@vb.dask_alternative("run_encode")
def run_job(args: argparse.Namespace, pipeline_args: list[str]) -> dict:
    """Run the encode job; returns (and writes to ``OUTPUT/summary.json``) its summary."""
    result, seconds, info = vb.build_and_run(pipeline_args, build, args)
    out = info["output"]
    ext = "parquet" if args.output_format == "parquet" else "tfrecord"
    return vb.finish_job("encode", result, seconds, out, f"{out}/{CODES}-*.{ext}",
                         {"model": args.model or args.saved_model, "latent_dim": info["config"].latent_dim,
                          "output_format": args.output_format, "coder": args.coder or False}, bool(args.coder), SUMMARY)


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
