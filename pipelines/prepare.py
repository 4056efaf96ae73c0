"""Beam job: raw records -> validated, shuffled, sharded TFRecord files plus ``manifest.json``.

The job lives in :mod:`vaestream.beam.jobs.prepare` (the library never imports ``pipelines``); this module is its
command-line shell: ``python -m pipelines.prepare --help``.
"""

from __future__ import annotations

if __name__ == "__main__":  # the command: quiet start-up (no TensorFlow / absl / Beam log lines) unless --verbose
    import sys

    from vaestream.cli.console import quiet

    quiet("--verbose" in sys.argv)
    sys.argv = [a for a in sys.argv if a != "--verbose"]

from vaestream.beam.jobs import prepare as _job
from vaestream.beam.jobs.prepare import (
    add_arguments, settle, build, run_job, run, prepare)

__all__ = ["add_arguments", "settle", "build", "run_job", "run", "prepare"]


def __getattr__(name: str):
    """Any other name of the job module (one object, whichever path it is reached by)."""
    return getattr(_job, name)


if __name__ == "__main__":
    from vaestream.beam.running import job_main

    job_main(run)
