"""Beam elements: batches of records and codes, dead letters, counters (``NAMESPACE``)."""

from __future__ import annotations

import json
import dataclasses
from typing import Iterator, NamedTuple, Sequence

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
CODE_LAYOUTS = ("block", "record")
"""The encode job's ``--code_layout`` of TFRecord float codes (:func:`vaestream.beam.sinks.code_examples`)."""
LAYOUT_VERSIONS = {"block": "block/1", "record": "record/1", "coded": "coded/1"}
"""The versioned layout names the encode job's summary (its manifest) records as ``code_layout``."""


class KeyRange(Sequence[str]):
    """The keys ``record_key(name, start)`` .. ``record_key(name, stop - 1)`` of consecutive records, held as
    the name and the range: no string a record until one is asked for. A ``Sequence[str]`` (indexing, slicing,
    iteration, ``len``); equal to the list of the same keys. The block code layout stores such keys as their
    prefix and first offset (:func:`vaestream.beam.sinks.code_examples`)."""

    __slots__ = ("name", "start", "stop")
    digits = KEY_DIGITS

    def __init__(self, name: str, start: int, stop: int):
        self.name, self.start, self.stop = name, int(start), max(int(start), int(stop))

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i):
        if isinstance(i, slice):
            lo, hi, step = i.indices(len(self))
            if step == 1:
                return KeyRange(self.name, self.start + lo, self.start + max(lo, hi))
            return [record_key(self.name, self.start + j) for j in range(lo, hi, step)]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("key index out of range")
        return record_key(self.name, self.start + i)

    def __iter__(self) -> Iterator[str]:
        name = self.name
        return (record_key(name, j) for j in range(self.start, self.stop))

    def __eq__(self, other) -> bool:
        if isinstance(other, KeyRange):
            same = (self.name, self.start, self.stop) == (other.name, other.start, other.stop)
            return same or list(self) == list(other)
        return isinstance(other, (list, tuple)) and list(self) == list(other)

    def __add__(self, other) -> list[str]:
        return list(self) + list(other)

    def __radd__(self, other) -> list[str]:
        return list(other) + list(self)

    def __repr__(self) -> str:
        return f"KeyRange({self.name!r}, {self.start}, {self.stop})"

    def __reduce__(self):
        return KeyRange, (self.name, self.start, self.stop)



@dataclasses.dataclass
class RecordBatch:
    """``n`` records from one source: ``keys`` [n], ``records`` [n, *shape] (stored dtype), ``scale``.

    ``scale`` is None until :class:`Validate` has decided it; model inputs are ``records * scale``.
    """

    source: str
    keys: Sequence[str]
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
        if isinstance(self.keys, KeyRange) and len(idx) and idx[-1] - idx[0] + 1 == len(idx):  # one run: a range
            return RecordBatch(self.source, self.keys[int(idx[0]):int(idx[-1]) + 1], self.records[idx], self.scale)
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
    keys: Sequence[str]
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
