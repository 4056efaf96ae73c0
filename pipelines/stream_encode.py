"""Beam streaming job: new record files -> latent codes in fixed event-time windows (vaestream.beam.streaming).

The job lives in :mod:`vaestream.beam.jobs.stream_encode` (the library never imports ``pipelines``); this module is its
command-line shell: ``python -m pipelines.stream_encode --help``.
"""

from __future__ import annotations

if __name__ == "__main__":  # the command: quiet start-up (no TensorFlow / absl / Beam log lines) unless --verbose
    import sys

    from vaestream.cli.console import quiet

    quiet("--verbose" in sys.argv)
    sys.argv = [a for a in sys.argv if a != "--verbose"]

from vaestream.beam.jobs import stream_encode as _job
from vaestream.beam.jobs.stream_encode import (
    SUMMARY, add_arguments, run_job, run)

__all__ = ["SUMMARY", "add_arguments", "run_job", "run"]


def __getattr__(name: str):
    """Any other name of the job module (one object, whichever path it is reached by)."""
    return getattr(_job, name)


if __name__ == "__main__":
    from vaestream.beam.running import job_main

    job_main(run, freeze=False)
