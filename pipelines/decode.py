"""Beam job: latent codes -> reconstructions, refusing codes written by another model.

The job lives in :mod:`vaestream.beam.jobs.decode` (the library never imports ``pipelines``); this module is its
command-line shell: ``python -m pipelines.decode --help``.
"""

from __future__ import annotations

if __name__ == "__main__":  # the command: quiet start-up (no TensorFlow / absl / Beam log lines) unless --verbose
    import sys

    from vaestream.cli.console import quiet

    quiet("--verbose" in sys.argv)
    sys.argv = [a for a in sys.argv if a != "--verbose"]

from vaestream.beam.jobs import decode as _job
from vaestream.beam.jobs.decode import (
    RECON, SUMMARY, add_arguments, check_fingerprint, build, run_job, run)

__all__ = ["RECON", "SUMMARY", "add_arguments", "check_fingerprint", "build", "run_job", "run"]


def __getattr__(name: str):
    """Any other name of the job module (one object, whichever path it is reached by)."""
    return getattr(_job, name)


if __name__ == "__main__":
    from vaestream.beam.running import job_main

    job_main(run)
