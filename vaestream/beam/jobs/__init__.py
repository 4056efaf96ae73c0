"""The Beam jobs: ``prepare`` (raw records -> shard set), ``encode`` (records -> codes), ``decode`` (codes
-> reconstructions), ``stream_encode`` (new files -> codes in event-time windows).

Each module has ``add_arguments(parser)`` (the job's flags), ``run_job(args, pipeline_args)`` and
``run(argv)``; ``pipelines/JOB.py`` is its command-line shell and ``vaestream JOB`` its CLI command.
"""

from __future__ import annotations

import argparse


def add_model_and_output_arguments(parser: argparse.ArgumentParser, input_help: str, chunk: int) -> None:
    """The flags the model jobs (encode, decode) share: ``--input``, ``--model`` or ``--saved_model``,
    ``--output``, ``--output_format``, ``--chunk_size``, ``--batch_size`` (both default ``chunk``)."""
    parser.add_argument("--input", "--inputs", dest="input", required=True, nargs="+", help=input_help)
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", "--model_dir", dest="model", help="model directory (config.json + ckpt/)")
    g.add_argument("--saved_model", "--saved-model", dest="saved_model", help="SavedModel export directory")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--output_format", "--output-format", default="tfrecord", choices=["tfrecord", "parquet"])
    parser.add_argument("--chunk_size", "--chunk-size", type=int, default=chunk, help="records per element")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=chunk, help="records per model call")
