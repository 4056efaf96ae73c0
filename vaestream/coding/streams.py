"""One way to open a stream: read its head and return the coder that decodes it.

    dec = vaestream.coding.open_stream("x.vz", "models/mnist")     # or bytes; or a family directory
    x = dec.decompress(Path("x.vz").read_bytes())                   # the coder's own verbs
    x = vaestream.coding.streams.decompress("x.vz", "models/mnist") # the same, in one call

A stream is one of three kinds (FORMAT.md), told apart by its first bytes:

* a **lossy** container (the coder tables' hash in its header): a :class:`vaestream.coding.codec.Codec`;
* a **bits-back** container (lossless or near-lossless; the header's table hash is the lossless tag): the model's
  :class:`vaestream.coding.bitsback.coder.LosslessCoder` built with the pixel context models beside it
  (``MODEL_DIR/context/``), so a stream coded with one of them, or with its reconstruction network, decodes;
* a **per-record** stream (``"VM"``): a :class:`vaestream.coding.per_record.PerRecordCoder` over the family.

``model_or_family`` is a model directory (or a SavedModel export, lossy streams only) or a family directory
(:func:`vaestream.coding.family.members`), whose member that wrote the stream is found by the header's model
fingerprint. Every coder offers the same verbs: ``compress(x) -> bytes``, ``decompress(blob) -> records``,
``iter_decompress(f)`` (frame by frame from a binary file read front to back) and ``bits(x)`` (each record's
ideal code length under the coder's entropy model).

:func:`vaestream.coding.family.bitsback_coder` is the one place a bits-back coder of a model directory is built
(lossless, or near-lossless with ``levels``), its context models included.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from vaestream.coding import container
from vaestream.coding.family import container_coder, is_model_dir
from vaestream.errors import BitstreamError, ConfigError, ModelError

KINDS = ("lossy", "bitsback", "per_record")
"""The kinds of stream :func:`stream_kind` tells apart."""


def _head(source, name: str) -> tuple[bool, container.Header | None]:
    """``(per-record, the container header or None)`` of ``source`` (bytes or a path), reading only its head."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        blob = bytes(source)
        if container.is_per_record(blob):
            return True, None
        return False, container.read_header(io.BytesIO(blob), name)
    if not isinstance(source, (str, os.PathLike)):
        raise BitstreamError(f"{name}: expected bytes or a path, got {type(source).__name__}")
    if not Path(source).is_file():
        raise BitstreamError(f"{name}: no such file")
    try:
        f = open(source, "rb")
    except OSError as e:
        raise BitstreamError(f"{name}: cannot read ({e.strerror or e})") from None
    with f:
        if container.is_per_record(f.read(2)):
            return True, None
        f.seek(0)
        return False, container.read_header(f, name)


def stream_kind(source, name: str | None = None) -> str:
    """The kind of the stream ``source`` (bytes or a path) is, one of :data:`KINDS`, from its head alone. Raises
    :class:`BitstreamError` naming ``name`` (default: the path, or "stream") if it is not a vaestream stream."""
    name = _name(source, name)
    per_record, h = _head(source, name)
    return "per_record" if per_record else ("bitsback" if h.lossless else "lossy")


def _name(source, name: str | None) -> str:
    if name is not None:
        return str(name)
    return str(source) if isinstance(source, (str, os.PathLike)) else "stream"


class StreamOpener:
    """Opens the streams of one model or family directory, keeping each decoder it builds.

    A job that reads many containers of one model (the Beam decode job) opens every one of them: the head is read
    each time, the decoder (its model, tables and context models) is built once per kind of stream and model
    fingerprint. :func:`open_stream` is one opener used once.
    """

    def __init__(self, model_or_family: str | os.PathLike):
        self.root = Path(model_or_family)
        if not self.root.is_dir():
            raise ModelError(f"{self.root}: not a model or family directory")
        self._coders: dict[tuple, object] = {}

    def open(self, source, *, name: str | None = None):
        """The coder that decodes ``source`` (bytes or a path): see :func:`open_stream`."""
        name = _name(source, name)
        per_record, h = _head(source, name)
        key = ("per_record",) if per_record else (h.lossless, h.fingerprint, h.table_hash)
        coder = self._coders.get(key)
        if coder is None:
            coder = self._coders[key] = self._build(per_record, h, name)
        return coder

    def _build(self, per_record: bool, h: container.Header | None, name: str):
        if not per_record:
            return container_coder(h, self.root, name)
        if is_model_dir(self.root):
            raise ConfigError(f"{name}: a per-record stream of several models: open it with their family directory, "
                              f"not the model directory {self.root}")
        from vaestream.coding.per_record import PerRecordCoder

        return PerRecordCoder(self.root)


def open_stream(source, model_or_family: str | os.PathLike, *, name: str | None = None):
    """The coder that decodes the stream ``source``: bytes, or the path of a stream file (only its head is read).

    Args:
      source: the stream (bytes / bytearray / memoryview) or its path.
      model_or_family: the model directory that wrote it (or its SavedModel export, for a lossy stream), or a
        family directory holding that model (a per-record stream needs a family).
      name: how errors name the stream (default: the path, or "stream").

    Returns:
      a :class:`vaestream.coding.codec.Codec` (lossy), a :class:`vaestream.coding.bitsback.coder.LosslessCoder`
      with the model's context models (lossless / near-lossless), or a
      :class:`vaestream.coding.per_record.PerRecordCoder` (per-record); ``decompress`` of each decodes it.

    Raises:
      BitstreamError: ``source`` is not a vaestream stream (naming ``name``).
      ModelMismatchError / ModelError: the stream's model is not the one given, or not in the family (naming the
        stream and its fingerprint).
    """
    return StreamOpener(model_or_family).open(source, name=name)


def decompress(source, model_or_family: str | os.PathLike, *, name: str | None = None) -> np.ndarray:
    """The records of the stream ``source`` (bytes or a path): ``open_stream(source, model_or_family)``'s
    ``decompress``."""
    name = _name(source, name)
    coder = open_stream(source, model_or_family, name=name)
    blob = source if isinstance(source, (bytes, bytearray, memoryview)) else Path(source).read_bytes()
    return coder.decompress(bytes(blob), name=name)
