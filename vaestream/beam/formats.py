"""Input discovery: which files a spec names, which format each is, and how to split a file into read tasks."""

from __future__ import annotations

import gzip
import os
import struct
from typing import Sequence

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from vaestream import shardset
from vaestream.beam.elements import SPLIT
from vaestream.errors import DataError

_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


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


def read_exact(f, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        try:
            b = f.read(n - len(out))
        except (EOFError, OSError) as e:  # a truncated gzip stream
            raise Truncated(bytes(out), str(e)) from e
        if not b:
            break
        out += b
    return bytes(out)


class Truncated(Exception):
    def __init__(self, data: bytes, why: str):
        super().__init__(why)
        self.data = data


def idx_header(f, path: str) -> tuple[np.dtype, tuple[int, ...], int]:
    head = read_exact(f, 4)
    if len(head) < 4:
        raise DataError(f"{path}: too short to be an IDX file")
    zero, type_code, ndim = struct.unpack(">HBB", head)
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: not an IDX file (magic 0x{head.hex()})")
    dims = read_exact(f, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", dims)
    return _IDX_DTYPES[type_code], tuple(shape), 4 + 4 * ndim


def npy_header(f, path: str) -> tuple[np.dtype, tuple[int, ...], bool]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except Exception as e:
        raise DataError(f"{path}: not a readable .npy file ({e})") from e
    if dtype.hasobject:
        raise DataError(f"{path}: .npy of dtype {dtype} holds Python objects, not numbers")
    if len(shape) < 1:
        raise DataError(f"{path}: .npy holds a scalar, expected records [N, ...]")
    return dtype, tuple(shape), fortran




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
