"""Input discovery: which files a spec names, which format each is, and how to split a file into read tasks."""

from __future__ import annotations

import io
import os
import zlib
from typing import Sequence

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from vaestream import shardset
from vaestream.beam.elements import SPLIT
from vaestream.data import idx_header, npy_header
from vaestream.errors import DataError

def input_kind(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    if os.path.isdir(path) or path.endswith("/"):
        return "png_dir"
    if name.endswith(".gz"):
        name = name[:-3]
    if ("idx" in name and "ubyte" in name) or name.endswith(".idx"):
        return "idx"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(".npz"):
        return "npz"
    if name.endswith((".csv", ".txt")):
        return "csv"
    if name.endswith(".png"):
        return "png"
    if ".tfrecord" in name or name.endswith((".tfr", ".tfrecords")):
        return "tfrecord"
    raise DataError(f"{path}: unknown record format (expected IDX, .npy, .npz, .csv, .tfrecord, .png or a folder "
                    "of PNG images)")


def split_specs(specs: str | Sequence[str]) -> list[str]:
    """Input specs as a list: one string or several, each possibly holding comma-separated specs."""
    if isinstance(specs, str):
        specs = [specs]
    return [part.strip() for s in specs for part in str(s).split(",") if part.strip()]


def expand_inputs(specs: str | Sequence[str], split: str = "train") -> list[str]:
    """The files (and PNG folders) that ``specs`` name, in a stable order.

    Each spec is a file, a glob (any Beam file system: local, ``gs://``, ...), a shard set (a
    ``manifest.json`` or a directory holding one), an MNIST-layout directory or ``fashion-mnist`` (its
    ``split`` images), or a folder of PNG images. A string may hold several specs separated by commas.
    """
    from vaestream import data

    out: list[str] = []
    for spec in split_specs(specs):
        if spec == "fashion-mnist":
            out.append(str(data.resolve(spec, split)))
            continue
        if shardset.is_shard_spec(spec):
            out += shardset.read_manifest(spec).shard_paths()
            continue
        if os.path.isdir(spec):
            try:
                out.append(str(data.mnist_layout_images(spec, split)))
                continue
            except DataError:
                pass
            if FileSystems.match([spec.rstrip("/") + "/*.png"])[0].metadata_list:
                out.append(spec.rstrip("/"))
                continue
            raise DataError(f"{spec}: a directory with no manifest.json, no MNIST-layout images and no PNG images")
        matched = sorted(m.path for m in FileSystems.match([spec])[0].metadata_list)
        if not matched:
            raise DataError(f"{spec}: no such file (no file matches)")
        out += matched
    if not out:
        raise DataError("no inputs given")
    return out


def open_raw(path: str):
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


class Gunzip(io.RawIOBase):
    """A readable stream of a gzip file's data that keeps every byte before a break.

    ``gzip.GzipFile.read(n)`` on a truncated file raises and drops what that call had decompressed (a
    16 MiB read of a file cut in its second MiB returns nothing); this stream hands out every decompressed
    byte first and raises :class:`EOFError` on the read after that (``zcat``'s recovery). Concatenated
    members are read one after the other.
    """

    def __init__(self, f, path: str, block: int = 1 << 16):
        super().__init__()
        self.f, self.path, self.block = f, path, block
        self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self.buf = bytearray()
        self.member_started = False
        self.broken: str | None = None
        self.done = False

    def readable(self) -> bool:
        return True

    def _fill(self, n: int) -> None:
        while (n < 0 or len(self.buf) < n) and not self.done and self.broken is None:
            raw = self.f.read(self.block)
            if not raw:
                self.buf += self.d.flush()
                if self.member_started and not self.d.eof:
                    self.broken = "the gzip data breaks off (truncated file)"
                self.done = True
                return
            self.member_started = True
            try:
                self.buf += self.d.decompress(raw)
                while self.d.eof and self.d.unused_data.strip(b"\x00"):
                    rest = self.d.unused_data
                    self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    self.buf += self.d.decompress(rest)
            except zlib.error as e:
                self.broken = f"corrupt gzip data ({e})"

    def read(self, n: int = -1) -> bytes:
        self._fill(n)
        if not self.buf and self.broken is not None:
            raise EOFError(self.broken)
        take = len(self.buf) if n < 0 else min(n, len(self.buf))
        out = bytes(self.buf[:take])
        del self.buf[:take]
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        raise io.UnsupportedOperation("a gzip stream is read from its start")


def maybe_gunzip(f, path: str):
    """``(stream, zipped)``: a :class:`Gunzip` over ``f`` if it starts with the gzip magic, else ``f``."""
    head = f.read(2)
    f.seek(0)
    return (Gunzip(f, path), True) if head == b"\x1f\x8b" else (f, False)


def file_size(path: str) -> int | None:
    """The size of ``path`` in bytes (any Beam file system), or None if it cannot be told."""
    try:
        meta = FileSystems.match([path])[0].metadata_list
    except Exception:
        return None
    return int(meta[0].size_in_bytes) if len(meta) == 1 else None




def plan_reads(path: str, split_records: int = SPLIT) -> list[dict]:
    """Read tasks for one input: ``{"path", "kind", "start", "stop"}`` record ranges.

    Raw (uncompressed) IDX and C-order ``.npy`` files and PNG folders split into ranges of
    ``split_records`` records so that several workers read one file; other formats are one task a file.
    A file whose header cannot be read is one task (the reader dead-letters it).
    """
    kind = input_kind(path)
    whole = [{"path": path, "kind": kind, "start": 0, "stop": None}]
    try:
        if kind == "idx":
            with open_raw(path) as f:
                g, zipped = maybe_gunzip(f, path)
                if zipped:
                    return whole
                _, shape, _ = idx_header(g, path)
            n = shape[0]
        elif kind == "npy":
            with open_raw(path) as f:
                _, shape, fortran = npy_header(f, path)
            if fortran:
                return whole
            n = shape[0]
        elif kind == "png_dir":
            n = len(FileSystems.match([path + "/*.png"])[0].metadata_list)
        else:
            return whole
    except (DataError, OSError):
        return whole
    return [{"path": path, "kind": kind, "start": s, "stop": min(s + split_records, n)}
            for s in range(0, n, split_records)] or whole
