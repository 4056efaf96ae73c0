"""Input discovery: which files a spec names, which format each is, and how to split a file into read tasks."""

from __future__ import annotations

import gzip
import os
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


def maybe_gunzip(f, path: str):
    head = f.read(2)
    f.seek(0)
    return (gzip.GzipFile(fileobj=f, mode="rb"), True) if head == b"\x1f\x8b" else (f, False)




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
