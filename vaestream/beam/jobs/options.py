"""The batch jobs' flags (``prepare``, ``encode``, ``decode``), the Beam runner flags of ``vaestream JOB`` and the
``--scale`` flag type.

This module imports neither Apache Beam nor TensorFlow (only the jobs' constants), so ``vaestream --help`` and
``vaestream encode --help`` list every flag without loading them; each job module re-exports its
``add_arguments``.
"""

from __future__ import annotations

import argparse
import math

from vaestream.beam.elements import CHUNK, CODE_LAYOUTS, CODERS, SPLIT
from vaestream.coding.bitsback.coder import RECONSTRUCTIONS

MAX_DEAD_LETTER_FRACTION = 1.0
"""The default of ``--max_dead_letter_fraction``: a job fails only when it writes no record."""

DASK_FLAGS = ("dask_client_address", "dask_local_workers", "dask_npartitions")
"""The Dask runner's options (:mod:`vaestream.beam.dask`); given to ``vaestream JOB`` they imply
``--runner DaskRunner``."""


def scale(text: str) -> float:
    """The ``--scale`` flag's type: a positive number or a fraction (``0.5``, ``1/255``, ``1/65535``)."""
    try:
        num, _, den = str(text).partition("/")
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction like 1/255") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1] (``--max_dead_letter_fraction``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not in [0, 1]")
    return value


SCALE_HELP = ("model input = stored value x S (a number or a fraction such as 1/255); default: 1/255 for "
              "8-bit counts (uint8, or whole numbers in 0..255 such as an integer CSV), the values as they are "
              "for floats")


def add_scale_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--scale S``: the one input-scaling rule's override (:func:`vaestream.data.input_scale`)."""
    parser.add_argument("--scale", type=scale, default=None, metavar="S", help=SCALE_HELP)


def add_job_contract_arguments(parser: argparse.ArgumentParser) -> None:
    """``--max_dead_letter_fraction``: when a finished job counts as failed (exit code 3)."""
    parser.add_argument("--max_dead_letter_fraction", "--max-dead-letter-fraction", type=fraction,
                        default=MAX_DEAD_LETTER_FRACTION, metavar="F",
                        help="fail (exit code 3) when more than this fraction of the records read is dead-lettered "
                             "(default 1: fail only when no record is written); the outputs and dead letters "
                             "written stay")


def add_model_and_output_arguments(parser: argparse.ArgumentParser, input_help: str, chunk: int = CHUNK) -> None:
    """The flags the model jobs (encode, decode) share: ``--input``, ``--model`` or ``--saved_model``,
    ``--output``, ``--output_format``, ``--chunk_size``, ``--batch_size`` (both default ``chunk``)."""
    parser.add_argument("--input", "--inputs", dest="input", required=True, nargs="+", help=input_help)
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", "--model_dir", dest="model", help="model directory (config.json + ckpt/)")
    g.add_argument("--saved_model", "--saved-model", dest="saved_model", help="SavedModel export directory")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--output_format", "--output-format", default="tfrecord", choices=["tfrecord", "parquet"],
                        help="output files: TFRecord of tf.train.Example (default) or Parquet")
    parser.add_argument("--chunk_size", "--chunk-size", type=int, default=chunk,
                        help=f"records per element (default {chunk})")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=chunk,
                        help=f"records per model call (default {chunk})")


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """The prepare job's flags (:mod:`vaestream.beam.jobs.prepare`)."""
    parser.add_argument("--input", "--inputs", dest="input", required=True, nargs="+",
                        help="files, globs, directories (MNIST layout, PNG folder) or 'fashion-mnist'")
    parser.add_argument("--output", required=True, help="output directory (shards, manifest.json, dead_letter.jsonl)")
    parser.add_argument("--split", default="train", choices=["train", "test"],
                        help="split of an MNIST-layout directory (default train)")
    parser.add_argument("--num_shards", "--num-shards", type=int, default=8, help="shard files (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the shuffle (default 0)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "uint8", "float32"],
                        help="stored dtype (auto: uint8 if the first input holds 8-bit counts, else float32)")
    parser.add_argument("--shape", type=int, nargs="+", default=None,
                        help="record shape (default: the first input's)")
    add_scale_argument(parser)
    parser.add_argument("--likelihood", default="bernoulli",
                        choices=["bernoulli", "gaussian_sigmoid", "beta_binomial", "gaussian", "none"],
                        help="refuse records outside this decoder's support (bernoulli: inputs in [0, 1])")
    parser.add_argument("--chunk_size", "--chunk-size", type=int, default=CHUNK,
                        help=f"records per element (default {CHUNK})")
    parser.add_argument("--split_records", "--split-records", type=int, default=SPLIT,
                        help=f"records per read task of a splittable file (default {SPLIT})")
    parser.add_argument("--feature", default="x", help="record feature of generic TFRecord Examples / .npz array")
    add_job_contract_arguments(parser)


def add_encode_arguments(parser: argparse.ArgumentParser) -> None:
    """The encode job's flags (:mod:`vaestream.beam.jobs.encode`)."""
    add_model_and_output_arguments(parser, "record files, globs, directories, a shard set or 'fashion-mnist'", CHUNK)
    parser.add_argument("--split", default="test", choices=["train", "test"],
                        help="split of an MNIST-layout directory (default test)")
    add_scale_argument(parser)
    parser.add_argument("--coder", nargs="?", const="lossy", default=None, choices=CODERS,
                        help="one row per batch of records (its keys and one container) instead of float codes. "
                             "lossy (the default when the flag is given alone): the quantised latents, entropy-coded "
                             "(vaestream.coding.codec; needs the model's coder tables); lossless: the records "
                             "themselves, exactly, by bits-back coding (vaestream.coding.bitsback.coder; a model "
                             "directory with a beta_binomial or bernoulli likelihood; records must be whole counts)")
    parser.add_argument("--levels", type=int, default=None,
                        help="with --coder lossless: near-lossless, each pixel rounded to the nearest of K = 2..64 "
                             "levels first (every pixel within 255 / (2 (K - 1)); the decode job reads K from the "
                             "stream)")
    parser.add_argument("--reconstruction", default="level", choices=list(RECONSTRUCTIONS),
                        help="with --levels: decode a pixel as its level, as E[count | level, z] under the model, or "
                             "learned (the model directory's context model's reconstruction network)")
    parser.add_argument("--rdo-lmbda", "--rdo_lmbda", type=float, default=None,
                        help="with the lossy coder and --model: rate-distortion optimised codes, each record's chosen "
                             "for bits + L * MSE by a search through the decoder (vaestream.coding.rdo; ordinary "
                             "streams, ~20x slower encoding)")
    parser.add_argument("--code_layout", default="block", choices=list(CODE_LAYOUTS),
                        help="TFRecord float codes: block (default), one Example per batch of up to --chunk_size "
                             "records (keys as name + first offset, mean and log_scale as [n, Nz] float lists, one "
                             "fingerprint); record, one Example per record (key, mean, log_scale, fingerprint: "
                             "for tf.io.parse_example with fixed-length features). The decode job reads both")
    parser.add_argument("--inference", default="runinference", choices=["runinference", "overlap"],
                        help="runinference: Beam's RunInference, one model call at a time; overlap: the next batch "
                             "is encoded on a background thread while the last one is written (helps when the "
                             "cores are shared with other work)")
    parser.add_argument("--split_records", "--split-records", type=int, default=SPLIT,
                        help=f"records per read task of a splittable file (default {SPLIT})")
    parser.add_argument("--num_shards", "--num-shards", type=int, default=0,
                        help="output files (0: the runner's choice)")
    parser.add_argument("--feature", default="x", help="record feature of generic TFRecord Examples / .npz array")
    add_job_contract_arguments(parser)


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    """The decode job's flags (:mod:`vaestream.beam.jobs.decode`)."""
    add_model_and_output_arguments(parser, "code files (.tfrecord/.parquet), globs or directories", CHUNK)
    parser.add_argument("--output_dtype", "--output-dtype", default="float32", choices=["float32", "uint8"],
                        help="reconstructions as float32 means, or round(255 x) as uint8")
    parser.add_argument("--recon_layout", "--recon-layout", default="block", choices=["block", "record"],
                        help="TFRecord reconstructions: block (default), one Example per batch of up to --chunk_size "
                             "records (records, shape, dtype, keys as name + first offset, data: the [n, *shape] "
                             "values as one bytes feature); record, one Example per record (key, data, shape, "
                             "dtype: the shard layout, for tf.io.parse_example). vaestream.shards reads both")
    parser.add_argument("--inference", default="runinference", choices=["runinference", "overlap"],
                        help="as the encode job: RunInference, or the next batch decoded on a thread")
    parser.add_argument("--num_shards", "--num-shards", type=int, default=0,
                        help="output files (0: the runner's choice)")
    add_job_contract_arguments(parser)


def add_runner_arguments(parser: argparse.ArgumentParser) -> None:
    """``vaestream JOB``'s runner flags: the common Beam options, the Dask runner's, ``--beam-args``."""
    g = parser.add_argument_group("runner")
    g.add_argument("--runner", default=None,
                   help="DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, DaskRunner, ... (default: the "
                        "in-process FnApiRunner; a --dask_* flag alone means DaskRunner)")
    g.add_argument("--direct_num_workers", "--direct-num-workers", type=int, default=None,
                   help="worker threads or processes of the in-process runner")
    g.add_argument("--direct_running_mode", "--direct-running-mode", default=None,
                   choices=["in_memory", "multi_threading", "multi_processing"],
                   help="how the in-process runner runs its workers (default in_memory)")
    g.add_argument("--dask_client_address", "--dask-client-address", default=None, metavar="HOST:PORT",
                   help="with DaskRunner: the dask.distributed scheduler to use (default: a local cluster)")
    g.add_argument("--dask_local_workers", "--dask-local-workers", type=int, default=None, metavar="N",
                   help="with DaskRunner and no --dask_client_address: worker processes of the local cluster "
                        "(default 2)")
    g.add_argument("--dask_npartitions", "--dask-npartitions", type=int, default=None, metavar="N",
                   help="with DaskRunner: partitions of the read tasks (default: one task a partition)")
    g.add_argument("--beam-args", "--beam_args", default="", metavar="'OPTIONS'",
                   help="further Beam pipeline options, one quoted string (e.g. \"--project P --region R\")")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    parser.add_argument("--no-progress", "--no_progress", action="store_true",
                        help="no elapsed-time display on stderr while the job runs")
