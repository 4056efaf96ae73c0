"""A model registry: numbered, immutable model versions, and decoding any code by the model that wrote it.

A registry is an export base (:mod:`vaestream.serving.export`, TF Serving's layout) plus a publication log::

    REGISTRY/1/                 version 1: a SavedModel with assets/fingerprint.txt, config.json, coder_tables.npz
    REGISTRY/2/                 ...
    REGISTRY/registry.jsonl     one JSON line per publication: version, fingerprint, time, caller's metrics

Every code names the model that wrote it: a container (:mod:`vaestream.coding.container`) carries the first 16
bytes of the model fingerprint (SHA-256 of config and weights) in its header, and the Beam code records
(:class:`vaestream.beam.CodeBatch`) carry the full 64-hex fingerprint. :meth:`Registry.decode` reads the
header, finds the version whose fingerprint starts with those bytes and decodes with that version's codec, so
codes written under version 1 stay decodable after version 3 is published. A code whose model is not in the
registry raises :class:`vaestream.errors.ModelMismatchError` naming the fingerprint and the versions present.

Versions are never overwritten or changed; a model whose fingerprint is already published is not published
again (:meth:`Registry.publish` returns the existing version).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from vaestream.coding import container
from vaestream.serving import export
from vaestream.errors import BitstreamError, ModelError, ModelMismatchError

LOG = "registry.jsonl"
_HEX = set("0123456789abcdef")


@dataclasses.dataclass(frozen=True)
class Version:
    """One published model: its number, directory and 64-hex fingerprint."""

    version: int
    path: Path
    fingerprint: str


def _as_hex(fingerprint: str | bytes) -> str:
    if isinstance(fingerprint, (bytes, bytearray, memoryview)):
        return bytes(fingerprint).hex()
    fp = str(fingerprint).strip().lower()
    if not fp or set(fp) - _HEX:
        raise ModelError(f"fingerprint {fingerprint!r} is not a hexadecimal string")
    return fp


class Registry:
    """The versions under ``root`` (created on the first publication).

    Args:
      root: the registry directory (an export base).
      cache_size: how many versions' codecs to keep loaded (least recently used are dropped).
    """

    def __init__(self, root: str | os.PathLike, cache_size: int = 4):
        self.root = Path(root)
        self.cache_size = max(1, int(cache_size))
        self._codecs: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._fingerprints: dict[int, str] = {}
        self._exports: dict[int, Any] = {}
        self._lock = threading.Lock()

    # -- listing --------------------------------------------------------------------------------------------
    def versions(self) -> list[int]:
        """The complete versions, increasing."""
        return export.list_versions(self.root)

    def latest(self) -> Version | None:
        """The newest version, or None for an empty registry."""
        v = self.versions()
        return self.get(v[-1]) if v else None

    def get(self, version: int) -> Version:
        """Version ``version``; :class:`ModelError` if there is none."""
        path = self.root / str(int(version))
        if not (path / "saved_model.pb").is_file():
            raise ModelError(f"{self.root}: no version {version} (versions: {self.versions()})")
        fp = self._fingerprints.get(int(version))
        if fp is None:
            try:
                fp = (path / "assets" / export.FINGERPRINT_ASSET).read_text().strip()
            except FileNotFoundError:
                raise ModelError(f"{path}: not a vaestream export (no assets/{export.FINGERPRINT_ASSET})") from None
            self._fingerprints[int(version)] = fp  # versions are immutable: safe to cache
        return Version(int(version), path, fp)

    def index(self) -> dict[int, str]:
        """Version -> 64-hex fingerprint, for every version."""
        return {v: self.get(v).fingerprint for v in self.versions()}

    def find(self, fingerprint: str | bytes) -> Version:
        """The version whose fingerprint is (or starts with) ``fingerprint`` (64 hex digits, or the 4-byte /
        8-hex prefix a container header holds).

        Raises:
          ModelMismatchError: no version of the registry has that fingerprint.
        """
        fp = _as_hex(fingerprint)
        for v in reversed(self.versions()):
            ver = self.get(v)
            if ver.fingerprint.startswith(fp) or fp.startswith(ver.fingerprint):
                return ver
        raise ModelMismatchError(
            f"{self.root}: no model version with fingerprint {fp[:32]}... (the registry holds "
            f"{', '.join(f'v{v} {f[:12]}...' for v, f in self.index().items()) or 'no versions'}); the code was "
            "written by a model that was never published here, or its version was removed")

    def log(self) -> list[dict]:
        """The publication log, one dict per publication."""
        path = self.root / LOG
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # -- publishing -----------------------------------------------------------------------------------------
    def publish(self, model_dir: str | os.PathLike, calibration=None, quality: float | None = None,
                metadata: dict | None = None) -> Version:
        """Publish the model of ``model_dir`` (its latest checkpoint) as the next version.

        The model needs coder tables (``MODEL_DIR/coder_tables.npz``) for its codes to be decodable from the
        registry; they are (re)built from ``calibration`` records when missing or stale (see
        :func:`vaestream.coding.codec.load`). If the newest version already has this model's fingerprint it is
        returned and nothing is written.

        Args:
          model_dir: a vaestream model directory.
          calibration: records ``[N, D]`` to build the coder tables from (e.g. recent training data).
          quality: the export's default coder quality.
          metadata: JSON-able facts to log with the publication (e.g. the held-out bound).

        Returns:
          the :class:`Version` (new or existing).
        """
        from vaestream.coding import codec

        c = codec.load(model_dir, calibration=calibration)  # builds / checks the tables, raises ModelError if none
        latest = self.latest()
        if latest is not None and latest.fingerprint == c.fingerprint:
            return latest
        path = export.export(model_dir, self.root, quality=quality)
        return self._logged(path, c.fingerprint, model_dir, metadata)

    def publish_model(self, model, tables, quality: float | None = None, metadata: dict | None = None,
                      model_dir: str | os.PathLike | None = None, cache=None) -> Version:
        """Publish an in-memory model (a :class:`vaestream.model.VAE`) with its coder ``tables`` as the next
        version: :meth:`publish` without reading a model directory. ``cache``: a
        :class:`vaestream.serving.export.ExportCache`, to keep the traced signatures between publications of
        the same model object (whose weights change). ``model_dir`` is named in the log."""
        fp = model.fingerprint()
        latest = self.latest()
        if latest is not None and latest.fingerprint == fp:
            return latest
        path = export.export_model(model, self.root, tables, quality=quality, cache=cache,
                                   source=str(model_dir) if model_dir is not None else None)
        return self._logged(path, fp, model_dir, metadata)

    def _logged(self, path, fp: str, model_dir, metadata: dict | None) -> Version:
        """The version just exported to ``path``, its publication appended to the log."""
        ver = self.get(int(path.name))
        rec = {"version": ver.version, "fingerprint": fp, "published": time.time(),
               "model_dir": None if model_dir is None else str(model_dir)}
        rec.update(metadata or {})
        with open(self.root / LOG, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        return ver

    # -- decoding -------------------------------------------------------------------------------------------
    def codec(self, version: int | Version):
        """The :class:`vaestream.coding.codec.Codec` of a version (loaded from its SavedModel; cached)."""
        from vaestream.coding import codec

        v = version.version if isinstance(version, Version) else int(version)
        with self._lock:
            c = self._codecs.get(v)
            if c is not None:
                self._codecs.move_to_end(v)
                return c
        path = self.get(v).path
        if not (path / "assets" / export.TABLES_ASSET).is_file():
            raise ModelError(f"{path}: version {v} has no coder tables; it cannot decode containers")
        c = codec.load(path)
        with self._lock:
            self._codecs[v] = c
            while len(self._codecs) > self.cache_size:
                self._codecs.popitem(last=False)
        return c

    def version_of(self, blob: bytes, name: str = "stream") -> Version:
        """The version that wrote the container ``blob`` (from the fingerprint in its header)."""
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise BitstreamError(f"{name}: expected bytes, got {type(blob).__name__}")
        header = container.read_header(io.BytesIO(bytes(blob)), name)
        try:
            return self.find(header.fingerprint)
        except ModelMismatchError as e:
            raise ModelMismatchError(f"{name}: {e}") from None

    def decode(self, blob: bytes, name: str = "stream") -> np.ndarray:
        """A container -> reconstructions float32 ``[B, D]`` (``[D]`` for a single record), decoded by the
        version whose fingerprint the container names.

        Raises:
          ModelMismatchError: that version is not in the registry. BitstreamError: the bytes are malformed.
        """
        ver = self.version_of(blob, name)
        c = self.codec(ver)
        codes, h = c.decompress_codes(bytes(blob), name=name)
        x_hat = c.decode(codes, h.quality)
        return x_hat[0] if h.single else x_hat

    def decode_file(self, path: str | os.PathLike) -> np.ndarray:
        """:meth:`decode` of a container file."""
        p = Path(path)
        if not p.is_file():
            raise BitstreamError(f"{p}: no such file")
        return self.decode(p.read_bytes(), name=str(p))

    def decode_means(self, mean: np.ndarray, fingerprint: str) -> np.ndarray:
        """Posterior means ``[n, Nz]`` written by the model ``fingerprint`` (e.g. a Beam code record's ``mean``
        and ``fingerprint``) -> the decoder mean ``[n, D]`` of that version."""
        ver = self.find(fingerprint)
        with self._lock:
            m = self._exports.get(ver.version)
        if m is None:
            m = export.load_export(ver.path)
            with self._lock:
                self._exports[ver.version] = m
        return m.decode(np.atleast_2d(np.asarray(mean, np.float32)))["x_mean"]


def open_registry(root: str | os.PathLike, must_exist: bool = False) -> Registry:
    """A :class:`Registry` at ``root``; with ``must_exist``, :class:`ModelError` unless it holds a version."""
    reg = Registry(root)
    if must_exist and not reg.versions():
        raise ModelError(f"{root}: not a model registry (no numbered versions)")
    return reg
