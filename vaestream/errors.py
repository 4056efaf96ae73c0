"""The exceptions vaestream raises.

Every error a user can cause (a bad file, a bad record, a bad bitstream, a model that does not match)
is a :class:`VaestreamError`, so callers can catch one type; the subclasses say which kind it is.
"""

from __future__ import annotations


class VaestreamError(Exception):
    """Base class of every error vaestream raises on bad input."""


class DataError(VaestreamError, ValueError):
    """A data file or record is missing, unreadable, of the wrong shape, or has values the model cannot take.

    The message names the file (and the record index where there is one) and the problem.
    """


class ConfigError(VaestreamError, ValueError):
    """A model or training configuration is invalid."""


class ModelError(VaestreamError):
    """A model directory is missing, incomplete, or does not match what was asked of it."""


class BitstreamError(VaestreamError, ValueError):
    """A bitstream is truncated, corrupt, of an unknown format version, or written by another model."""


class ModelMismatchError(BitstreamError):
    """A code or bitstream was written by a model other than the one asked to decode it."""


class JobFailedError(VaestreamError):
    """A job ran to the end but failed its output contract: it wrote no record, or dead-lettered more than
    its ``--max_dead_letter_fraction`` of the records it read. The outputs and dead letters it wrote stay
    (they say what was wrong); ``summary`` is the job's summary. The ``vaestream`` command and
    ``python -m pipelines.JOB`` exit with :attr:`exit_code` (3)."""

    exit_code = 3

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary
