"""The Beam jobs: ``prepare`` (raw records -> shard set), ``encode`` (records -> codes), ``decode`` (codes
-> reconstructions), ``stream_encode`` (new files -> codes in event-time windows).

Each module has ``add_arguments(parser)`` (the job's flags), ``run_job(args, pipeline_args)`` and
``run(argv)``; ``pipelines/JOB.py`` is its command-line shell and ``vaestream JOB`` its CLI command. The flags
of the batch jobs are defined in :mod:`vaestream.beam.jobs.options` (no Beam or TensorFlow import).
"""

from __future__ import annotations

from vaestream.beam.jobs.options import add_model_and_output_arguments

__all__ = ["add_model_and_output_arguments"]
