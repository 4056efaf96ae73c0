"""Beam elements: batches of records and codes, dead letters, counters (``NAMESPACE``)."""

from __future__ import annotations

import json
import dataclasses
from typing import NamedTuple

import numpy as np


NAMESPACE = "vaestream"
RECORDS = "records"
DEAD_LETTER = "dead_letter"
CHUNK = 4096
"""Records per element read from a file (and per model call)."""
SPLIT = 65536
"""Records per read task of a splittable file (raw IDX, .npy, a PNG folder)."""
KEY_DIGITS = 9
CODERS = ("lossy", "lossless")
"""The encode job's ``--coder`` kinds (:func:`vaestream.beam.model_handler.coder_kind`)."""


@dataclasses.dataclass
class RecordBatch:
    """``n`` records from one source: ``keys`` [n], ``records`` [n, *shape] (stored dtype), ``scale``.

    ``scale`` is None until :class:`Validate` has decided it; model inputs are ``records * scale``.
    """

    source: str
    keys: list[str]
    records: np.ndarray
    scale: float | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def inputs(self) -> np.ndarray:
        """Float32 model inputs ``[n, D]``."""
        x = np.asarray(self.records, np.float32).reshape(len(self.keys), -1)
        return x * np.float32(self.scale if self.scale is not None else 1.0)

    def take(self, mask: np.ndarray) -> "RecordBatch":
        idx = np.flatnonzero(mask)
        return RecordBatch(self.source, [self.keys[i] for i in idx], self.records[idx], self.scale)


@dataclasses.dataclass
class CodeBatch:
    """Latent codes of ``n`` records, in one of two forms:

    * floats: q(z|x) = N(mean, diag exp(log_scale)^2), ``mean`` and ``log_scale`` each ``[n, Nz]`` float32;
    * coded (the encode job's ``--coder``): ``container``, one vaestream container (:mod:`vaestream.coding.container`)
      holding the ``n`` records' entropy-coded latents in the order of ``keys`` (``mean``/``log_scale`` None).
      One container per batch, not per record: its 24 bytes of header, frame length and CRC would cost more
      than a coarse record's ~10-byte code (:func:`vaestream.coding.codec.Codec.decompress` reads it back).

    ``fingerprint`` names the model that wrote them (:meth:`vaestream.model.VAE.fingerprint`).
    """

    source: str
    keys: list[str]
    mean: np.ndarray | None
    log_scale: np.ndarray | None
    fingerprint: str
    container: bytes | None = None
    bytes_in: int = 0

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def coded(self) -> bool:
        return self.container is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the codes themselves (floats, or the container)."""
        return len(self.container) if self.container is not None else int(self.mean.nbytes + self.log_scale.nbytes)


class DeadLetter(NamedTuple):
    """A refused record (or the unreadable rest of a file): where it came from, its key and why."""

    source: str
    key: str
    reason: str

    def to_json(self) -> str:
        """The dead-letter file's line (without its newline): ``{"source", "key", "reason"}``."""
        return json.dumps({"source": self.source, "key": self.key, "reason": self.reason})


def record_key(name: str, i: int) -> str:
    return f"{name}:{i:0{KEY_DIGITS}d}"


def job_counter(name: str):
    """The Beam counter ``name`` of the jobs' namespace (Beam is imported here, not with this module, so that
    the jobs' flag definitions can use this module's constants without importing Beam)."""
    from apache_beam.metrics import Metrics

    return Metrics.counter(NAMESPACE, name)
