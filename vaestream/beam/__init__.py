"""Reusable Apache Beam transforms: read records, validate, write shards, encode and decode with a VAE.

Elements travel in batches, never one record per element (Beam's per-element overhead is tens of µs):

* :class:`RecordBatch` — ``keys`` (n strings), ``records`` ``[n, *shape]`` in their stored dtype and the
  ``scale`` that maps them to model inputs (``x = records * scale``, flattened to ``[n, D]``).
* :class:`CodeBatch` — ``keys``, the posterior parameters ``mean`` and ``log_scale`` ``[n, Nz]`` float32 of
  q(z|x) = N(mean, diag exp(log_scale)^2), the model ``fingerprint`` and optionally the coder's bytes.
* :class:`DeadLetter` — ``(source, key, reason)`` for a record (or the rest of a file) that was refused.

Transforms (each labelled, each usable in any pipeline)::

    read = p | ReadRecords(["data/train-images-idx3-ubyte.gz", "more/*.csv"])      # IDX, npy/npz, CSV, TFRecord, PNG
    good = read[RECORDS] | Validate(shape=(28, 28), likelihood="bernoulli")
    codes = good[RECORDS] | Encode(model_dir="runs/model")                        # RunInference, batched
    codes | WriteBatches("out/codes", "parquet", code_schema(latent_dim=20))
    (read[DEAD_LETTER], good[DEAD_LETTER]) | beam.Flatten() | WriteDeadLetters("out/dead_letter.jsonl")

    # the same, validated in the read step (one step and no Flatten: what the jobs do)
    read = p | ReadRecords(["data/train-images-idx3-ubyte.gz"], validate=Validate((28, 28), "bernoulli"))
    read[RECORDS] | Encode(model_dir="runs/model") | WriteBatches("out/codes")  # TFRecord
    read[DEAD_LETTER] | WriteDeadLetters("out/dead_letter.jsonl")

The model is loaded once per worker process by a Beam ``ModelHandler`` (:class:`VAEModelHandler`) through
``RunInference``; it wraps either a model directory (:func:`vaestream.store.load_model`) or a SavedModel
export (``tf.saved_model.load``), see :class:`LoadedVAE`. Files are written through Beam's file sinks (each
bundle writes a temporary file that is renamed at finalisation), so a retried bundle neither loses nor
duplicates records.

Counters (namespace ``vaestream``): ``records_in`` (records read, plus one per unreadable unit that was
dead-lettered by a reader), ``bytes_in`` (raw record bytes read), ``records`` (records written),
``bytes_out`` (bytes written), ``dead_lettered``. A job is consistent when
``records_in == records + dead_lettered`` (:func:`check_counts`).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import struct
import weakref
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io import filebasedsink
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, RunInference

from vaestream import shards
from vaestream.errors import DataError, ModelError, ModelMismatchError

NAMESPACE = "vaestream"
RECORDS = "records"
DEAD_LETTER = "dead_letter"
CHUNK = 4096
"""Records per element read from a file (and per model call)."""
SPLIT = 65536
"""Records per read task of a splittable file (raw IDX, .npy, a PNG folder)."""
KEY_DIGITS = 9

_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


# ---------------------------------------------------------------------------------------------------------
# elements
# ---------------------------------------------------------------------------------------------------------
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


def _key(name: str, i: int) -> str:
    return f"{name}:{i:0{KEY_DIGITS}d}"


def _counter(name: str):
    return Metrics.counter(NAMESPACE, name)


# ---------------------------------------------------------------------------------------------------------
# input discovery
# ---------------------------------------------------------------------------------------------------------
def _kind(path: str) -> str:
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


def _split_specs(specs: str | Sequence[str]) -> list[str]:
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
    for spec in _split_specs(specs):
        if spec == "fashion-mnist":
            out.append(str(data.resolve(spec, split)))
            continue
        if shards.is_shard_spec(spec):
            out += shards.read_manifest(spec).shard_paths()
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


def _open(path: str):
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def _maybe_gunzip(f, path: str):
    head = f.read(2)
    f.seek(0)
    return (gzip.GzipFile(fileobj=f, mode="rb"), True) if head == b"\x1f\x8b" else (f, False)


def _read_exact(f, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        try:
            b = f.read(n - len(out))
        except (EOFError, OSError) as e:  # a truncated gzip stream
            raise _Truncated(bytes(out), str(e)) from e
        if not b:
            break
        out += b
    return bytes(out)


class _Truncated(Exception):
    def __init__(self, data: bytes, why: str):
        super().__init__(why)
        self.data = data


def _idx_header(f, path: str) -> tuple[np.dtype, tuple[int, ...], int]:
    head = _read_exact(f, 4)
    if len(head) < 4:
        raise DataError(f"{path}: too short to be an IDX file")
    zero, type_code, ndim = struct.unpack(">HBB", head)
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: not an IDX file (magic 0x{head.hex()})")
    dims = _read_exact(f, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", dims)
    return _IDX_DTYPES[type_code], tuple(shape), 4 + 4 * ndim


def _npy_header(f, path: str) -> tuple[np.dtype, tuple[int, ...], bool]:
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


def probe(path: str, feature: str = "x") -> tuple[tuple[int, ...], np.dtype]:
    """The record shape and dtype of the first records of ``path`` (reads only a little of it)."""
    for item in read_range({"path": path, "kind": _kind(path), "start": 0, "stop": None}, chunk_size=1,
                           feature=feature, limit=1):
        if isinstance(item, RecordBatch):
            return tuple(item.records.shape[1:]), item.records.dtype
        raise DataError(f"{path}: first record unreadable: {item.reason}")
    raise DataError(f"{path}: no records")


def plan_reads(path: str, split_records: int = SPLIT) -> list[dict]:
    """Read tasks for one input: ``{"path", "kind", "start", "stop"}`` record ranges.

    Raw (uncompressed) IDX and C-order ``.npy`` files and PNG folders split into ranges of
    ``split_records`` records so that several workers read one file; other formats are one task a file.
    A file whose header cannot be read is one task (the reader dead-letters it).
    """
    kind = _kind(path)
    whole = [{"path": path, "kind": kind, "start": 0, "stop": None}]
    try:
        if kind == "idx":
            with _open(path) as f:
                g, zipped = _maybe_gunzip(f, path)
                if zipped:
                    return whole
                _, shape, _ = _idx_header(g, path)
            n = shape[0]
        elif kind == "npy":
            with _open(path) as f:
                _, shape, fortran = _npy_header(f, path)
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


# ---------------------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------------------
def read_range(task: dict, chunk_size: int = CHUNK, feature: str = "x", limit: int | None = None
               ) -> Iterator[RecordBatch | DeadLetter]:
    """Read the records of one task of :func:`plan_reads`, ``chunk_size`` records per :class:`RecordBatch`.

    Problems become :class:`DeadLetter` items: an unreadable file (one item, key = the path), a truncated
    file (the complete records are read; one item for the rest), an unparsable CSV line or one of the wrong
    length (one item per line).
    """
    path, kind = task["path"], task["kind"]
    try:
        reader = {"idx": _read_idx, "npy": _read_npy, "npz": _read_npz, "csv": _read_csv,
                  "tfrecord": _read_tfrecord, "png": _read_png_files, "png_dir": _read_png_files}[kind]
        yield from reader(task, chunk_size, feature, limit)
    except DataError as e:
        yield DeadLetter(path, path, str(e))
    except (OSError, ValueError, EOFError) as e:
        yield DeadLetter(path, path, f"{path}: unreadable ({type(e).__name__}: {e})")


def _fixed_records(path: str, f, dtype: np.dtype, rec_shape: tuple[int, ...], start: int, stop: int,
                   chunk: int, name: str) -> Iterator[RecordBatch | DeadLetter]:
    rec_bytes = int(np.prod(rec_shape)) * dtype.itemsize
    i = start
    while i < stop:
        n = min(chunk, stop - i)
        try:
            raw = _read_exact(f, n * rec_bytes)
            why = None
        except _Truncated as t:
            raw, why = t.data, t.args[0]
        got = len(raw) // rec_bytes
        if got:
            arr = np.frombuffer(raw[:got * rec_bytes], dtype=dtype).reshape((got,) + rec_shape)
            arr = arr.astype(dtype.newbyteorder("="), copy=False)
            yield RecordBatch(path, [_key(name, j) for j in range(i, i + got)], arr)
        if got < n:
            yield DeadLetter(path, f"{_key(name, i + got)}..{_key(name, stop - 1)}",
                             f"{path}: truncated: the header says {stop} records, the data ends inside record "
                             f"{i + got}" + (f" ({why})" if why else ""))
            return
        i += n


def _read_idx(task, chunk, feature, limit):
    path = task["path"]
    name = path.rsplit("/", 1)[-1]
    with _open(path) as f:
        g, zipped = _maybe_gunzip(f, path)
        try:
            dtype, shape, header = _idx_header(g, path)
        except _Truncated as t:
            raise DataError(f"{path}: truncated IDX header ({t.args[0]})") from None
        if len(shape) < 2:
            raise DataError(f"{path}: IDX of shape {shape} holds labels, not records")
        start, stop = task["start"], task["stop"] if task["stop"] is not None else shape[0]
        if limit is not None:
            stop = min(stop, start + limit)
        rec_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        if start:
            g.seek(header + start * rec_bytes)
        yield from _fixed_records(path, g, dtype, tuple(shape[1:]), start, stop, chunk, name)


def _read_npy(task, chunk, feature, limit):
    path = task["path"]
    name = path.rsplit("/", 1)[-1]
    with _open(path) as f:
        dtype, shape, fortran = _npy_header(f, path)
        if len(shape) < 2:
            shape = shape + (1,)
        if fortran:
            arr = np.load(_open(path), allow_pickle=False)
            yield from _chunks_of(path, name, arr[:limit] if limit else arr, chunk)
            return
        start, stop = task["start"], task["stop"] if task["stop"] is not None else shape[0]
        if limit is not None:
            stop = min(stop, start + limit)
        rec_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        if start:
            f.seek(f.tell() + start * rec_bytes)
        yield from _fixed_records(path, f, dtype, tuple(shape[1:]), start, stop, chunk, name)


def _chunks_of(path: str, name: str, arr: np.ndarray, chunk: int) -> Iterator[RecordBatch]:
    if arr.ndim < 2:
        arr = arr.reshape(-1, 1)
    for s in range(0, len(arr), chunk):
        yield RecordBatch(path, [_key(name, j) for j in range(s, min(s + chunk, len(arr)))],
                          np.ascontiguousarray(arr[s:s + chunk]))


def _read_npz(task, chunk, feature, limit):
    path = task["path"]
    try:
        with np.load(io.BytesIO(_open(path).read()), allow_pickle=False) as z:
            names = list(z.files)
            if not names:
                raise DataError(f"{path}: .npz file holds no arrays")
            pick = feature if feature in names else next((n for n in ("x", "images", "data") if n in names), names[0])
            arr = z[pick]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from e
    if arr.dtype.hasobject:
        raise DataError(f"{path}: array {pick!r} holds Python objects, not numbers")
    yield from _chunks_of(path, path.rsplit("/", 1)[-1], arr[:limit] if limit else arr, chunk)


def _read_csv(task, chunk, feature, limit):
    path = task["path"]
    name = path.rsplit("/", 1)[-1]
    width = task.get("width")
    rows: list[np.ndarray] = []
    keys: list[str] = []
    seen_data = False
    with _open(path) as raw:
        f = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")
        lineno = 0
        try:
            for lineno, line in enumerate(f, start=1):
                line = line.strip()
                if not line:
                    continue
                try:
                    row = np.array(line.split(","), dtype=np.float32)
                except ValueError:
                    if not seen_data and lineno == 1:
                        continue  # a header line
                    yield DeadLetter(path, _key(name, lineno), f"{path}: line {lineno}: not a row of numbers: "
                                                               f"{line[:60]!r}")
                    continue
                seen_data = True
                if width is None:
                    width = row.size
                if row.size != width:
                    yield DeadLetter(path, _key(name, lineno), f"{path}: line {lineno}: {row.size} values, expected "
                                                               f"{width}")
                    continue
                rows.append(row)
                keys.append(_key(name, lineno))
                if len(rows) == chunk:
                    yield RecordBatch(path, keys, np.stack(rows))
                    rows, keys = [], []
                if limit is not None and len(keys) >= limit:
                    break
        except UnicodeDecodeError as e:
            if rows:
                yield RecordBatch(path, keys, np.stack(rows))
                rows, keys = [], []
            yield DeadLetter(path, f"{_key(name, lineno + 1)}..", f"{path}: not UTF-8 text after line {lineno} ({e})")
    if rows:
        yield RecordBatch(path, keys, np.stack(rows))


def _read_tfrecord(task, chunk, feature, limit):
    import tensorflow as tf

    path = task["path"]
    name = path.rsplit("/", 1)[-1]
    comp = "GZIP" if path.endswith(".gz") else ""
    ds = tf.data.TFRecordDataset(path, compression_type=comp, buffer_size=1 << 20)
    if limit is not None:
        ds = ds.take(limit)
    index = 0
    schema = None
    for raw, error in _tfrecord_chunks(ds, chunk):
        if len(raw):
            if schema is None:
                schema = _example_schema(path, raw[0], feature)
            yield from _parse_examples(path, name, raw, index, schema)
            index += len(raw)
        if error is not None:
            yield DeadLetter(path, f"{_key(name, index)}..", f"{path}: truncated or corrupt TFRecord data after "
                                                             f"record {index} ({error})")
            return


def _tfrecord_chunks(ds, chunk: int):
    """(records [<= chunk] bytes array, None) from a TFRecordDataset, then on corruption the records before the
    bad one and the error text (re-read one record at a time from the failed chunk's start)."""
    import tensorflow as tf

    it = iter(ds.batch(chunk))
    done = 0
    while True:
        try:
            raw = next(it).numpy()
        except StopIteration:
            return
        except tf.errors.DataLossError as e:
            good = []
            try:
                for r in ds.skip(done).take(chunk):
                    good.append(r.numpy())
            except tf.errors.DataLossError:
                pass
            yield np.array(good, dtype=object), e.message.splitlines()[0]
            return
        except tf.errors.OpError as e:
            raise DataError(f"unreadable TFRecord file ({e.message.splitlines()[0]})") from None
        yield raw, None
        done += len(raw)


def _example_schema(path: str, first: bytes, feature: str) -> dict:
    import tensorflow as tf

    try:
        f = tf.train.Example.FromString(first).features.feature
    except Exception as e:
        raise DataError(f"{path}: records are not tf.train.Example ({e})") from None
    if "data" in f and "dtype" in f and "shape" in f:
        return {"kind": "shard", "dtype": np.dtype(f["dtype"].bytes_list.value[0].decode()),
                "shape": tuple(int(v) for v in f["shape"].int64_list.value), "has_key": "key" in f}
    if feature in f:
        which = f[feature].WhichOneof("kind")
        if which in ("float_list", "int64_list"):
            n = len(getattr(f[feature], which).value)
            return {"kind": which, "feature": feature, "width": n, "has_key": "key" in f}
    raise DataError(f"{path}: Examples have neither the shard features (data, shape, dtype) nor a float/int64 "
                    f"feature {feature!r} (features: {sorted(f.keys())})")


def _parse_examples(path: str, name: str, raw: np.ndarray, index: int, schema: dict):
    import tensorflow as tf

    n = len(raw)
    spec: dict[str, Any] = {}
    if schema["has_key"]:
        spec["key"] = tf.io.FixedLenFeature([], tf.string, default_value="")
    if schema["kind"] == "shard":
        spec["data"] = tf.io.FixedLenFeature([], tf.string, default_value="")
    else:
        spec[schema["feature"]] = tf.io.VarLenFeature(tf.float32 if schema["kind"] == "float_list" else tf.int64)
    try:
        ex = tf.io.parse_example(raw, spec)
    except tf.errors.InvalidArgumentError:
        ex = None
    if ex is None:  # some record is malformed: parse one by one to find it
        for j in range(n):
            try:
                one = tf.io.parse_example(raw[j:j + 1], spec)
            except tf.errors.InvalidArgumentError as e:
                yield DeadLetter(path, _key(name, index + j), f"{path}: record {index + j}: not a valid Example "
                                                              f"({e.message.splitlines()[0]})")
                continue
            yield from _parse_examples_ok(path, name, raw[j:j + 1], index + j, schema, one)
        return
    yield from _parse_examples_ok(path, name, raw, index, schema, ex)


def _parse_examples_ok(path, name, raw, index, schema, ex):
    import tensorflow as tf

    n = len(raw)
    keys = [k.decode() if k else _key(name, index + j)
            for j, k in enumerate(ex["key"].numpy())] if "key" in ex else [_key(name, index + j) for j in range(n)]
    if schema["kind"] == "shard":
        dtype, shape = schema["dtype"], schema["shape"]
        want = int(np.prod(shape)) * dtype.itemsize
        blobs = ex["data"].numpy()
        ok = np.array([len(b) == want for b in blobs])
        for j in np.flatnonzero(~ok):
            yield DeadLetter(path, keys[j], f"{path}: record {index + j}: {len(blobs[j])} data bytes, expected {want} "
                                            f"({shape} {dtype.name})")
        if ok.any():
            arr = np.frombuffer(b"".join(blobs[ok]), dtype=dtype.newbyteorder("<")).reshape((-1,) + shape)
            yield RecordBatch(path, [k for k, g in zip(keys, ok) if g], arr.astype(dtype.newbyteorder("="), copy=False))
        return
    sp = ex[schema["feature"]]
    lengths = np.bincount(sp.indices.numpy()[:, 0], minlength=n)
    width = schema["width"]
    ok = lengths == width
    for j in np.flatnonzero(~ok):
        yield DeadLetter(path, keys[j], f"{path}: record {index + j}: feature {schema['feature']!r} has {lengths[j]} "
                                        f"values, expected {width}")
    if ok.any():
        dense = tf.sparse.to_dense(sp).numpy()[ok][:, :width]
        dtype = np.float32 if schema["kind"] == "float_list" else np.int64
        yield RecordBatch(path, [k for k, g in zip(keys, ok) if g], dense.astype(dtype))


def _read_png_files(task, chunk, feature, limit):
    from PIL import Image

    path = task["path"]
    if task["kind"] == "png":
        files = [path]
    else:
        files = sorted(m.path for m in FileSystems.match([path + "/*.png"])[0].metadata_list)
        stop = task["stop"] if task["stop"] is not None else len(files)
        files = files[task["start"]:stop]
    if limit is not None:
        files = files[:limit]
    for s in range(0, len(files), chunk):
        groups: dict[tuple, tuple[list, list]] = {}
        for fp in files[s:s + chunk]:
            key = fp.rsplit("/", 1)[-1]
            try:
                with _open(fp) as f:
                    img = Image.open(io.BytesIO(f.read()))
                    img.load()
                arr = np.asarray(img)
            except Exception as e:
                yield DeadLetter(fp, key, f"{fp}: not a readable PNG image ({type(e).__name__}: {e})")
                continue
            sig = (arr.shape, arr.dtype.str)
            groups.setdefault(sig, ([], []))
            groups[sig][0].append(key)
            groups[sig][1].append(arr)
        for keys, arrs in groups.values():
            yield RecordBatch(path, keys, np.stack(arrs))


class _ReadFn(beam.DoFn):
    def __init__(self, chunk_size: int, feature: str, csv_width: int | None, check: "_ValidateFn | None" = None):
        self.chunk_size = chunk_size
        self.feature = feature
        self.csv_width = csv_width
        self.check = check  # a Validate's DoFn, applied to each batch as it is read, or None
        self.records_in = _counter("records_in")
        self.bytes_in = _counter("bytes_in")

    def process(self, task: dict):
        if task["kind"] == "csv" and self.csv_width is not None:
            task = dict(task, width=self.csv_width)
        for item in read_range(task, self.chunk_size, self.feature):
            if isinstance(item, RecordBatch):
                self.records_in.inc(len(item))
                self.bytes_in.inc(int(item.records.nbytes))
                if self.check is None:
                    yield item
                else:
                    yield from self.check.process(item)
            else:
                self.records_in.inc(1)
                yield beam.pvalue.TaggedOutput(DEAD_LETTER, item)


class ReadRecords(beam.PTransform):
    """Read records from files: a :class:`RecordBatch` PCollection (tag ``records``) plus ``dead_letter``.

    Args:
      inputs: specs as for :func:`expand_inputs` (a list, or a comma-separated string).
      split: which split of an MNIST-layout directory / ``fashion-mnist`` to read.
      chunk_size: records per element.
      split_records: records per read task of a splittable file (:func:`plan_reads`).
      feature: the record feature of generic TFRecord Examples / the array of an ``.npz``.
      csv_width: values per CSV line (default: the first data line's).
      validate: a :class:`Validate` to apply to each batch as it is read, in the same step: ``records`` are
        then the validated records and ``dead_letter`` holds the refused ones as well as the unreadable ones
        (the same output as ``Validate`` after the read and a ``Flatten`` of the two dead-letter outputs,
        with one step and one dead-letter stream fewer: on the local runner a ``Flatten`` of two
        PCollections is a stage of its own).

    Returns (``expand``): a ``DoOutputsTuple``; ``result[RECORDS]`` and ``result[DEAD_LETTER]``.

    The read tasks are spread over workers by ``beam.Create``'s own reshuffle (applied when there is more
    than one task), so that several workers read the parts of a split file.
    """

    def __init__(self, inputs: str | Sequence[str], split: str = "train", chunk_size: int = CHUNK,
                 split_records: int = SPLIT, feature: str = "x", csv_width: int | None = None,
                 validate: "Validate | None" = None):
        super().__init__()
        self.paths = expand_inputs(inputs, split)
        self.chunk_size = int(chunk_size)
        self.split_records = int(split_records)
        self.feature = feature
        self.csv_width = csv_width
        if validate is not None and not isinstance(validate, Validate):
            raise DataError(f"validate must be a vaestream.beam.Validate, not {type(validate).__name__}")
        self.validate = validate

    def expand(self, pbegin):
        tasks = [t for p in self.paths for t in plan_reads(p, self.split_records)]
        check = self.validate.fn if self.validate is not None else None
        return (pbegin
                | "ReadTasks" >> beam.Create(tasks)  # reshuffles the tasks when there are several
                | "Read" >> beam.ParDo(_ReadFn(self.chunk_size, self.feature, self.csv_width, check)).with_outputs(
                    DEAD_LETTER, main=RECORDS))


# ---------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------
def default_scale(dtype: np.dtype) -> float:
    """Stored value -> model input: integers (images) scale by 1/255, floats are model inputs already."""
    return 1.0 / 255.0 if np.issubdtype(dtype, np.integer) else 1.0


def validate_batch(batch: RecordBatch, shape: tuple[int, ...] | None = None, likelihood: str | None = None,
                   dtype: str | None = None, scale: float | None = None
                   ) -> tuple[RecordBatch | None, list[DeadLetter]]:
    """Check one batch; return (the good records, reshaped/cast and with ``scale`` set, dead letters).

    A record is refused when its number of values differs from prod(``shape``), when it holds NaN or
    infinite values, or (``likelihood`` ``bernoulli``/``gaussian_sigmoid``) when a model input
    ``x = value * scale`` lies outside [0, 1]. With ``dtype="uint8"`` records are stored as uint8 (values
    must be whole numbers in [0, 255]; scale 1/255); with ``dtype="float32"`` as float32 model inputs
    (scale 1).
    """
    recs = batch.records
    n = len(batch)
    dead: list[DeadLetter] = []
    if not (np.issubdtype(recs.dtype, np.integer) or np.issubdtype(recs.dtype, np.floating)
            or recs.dtype == np.bool_):
        return None, [DeadLetter(batch.source, k, f"{k}: values of dtype {recs.dtype} are not numbers")
                      for k in batch.keys]
    if shape is not None:
        d_have, d_want = int(np.prod(recs.shape[1:])), int(np.prod(shape))
        if d_have != d_want:
            return None, [DeadLetter(batch.source, k, f"{k}: record has {d_have} values (shape "
                                                      f"{tuple(recs.shape[1:])}), expected {d_want} {tuple(shape)}")
                          for k in batch.keys]
        recs = recs.reshape((n,) + tuple(shape))
    sc = scale if scale is not None else (batch.scale if batch.scale is not None else default_scale(recs.dtype))
    flat = recs.reshape(n, -1)
    ok = np.ones(n, bool)
    reasons: dict[int, str] = {}
    if np.issubdtype(flat.dtype, np.floating):
        finite = np.isfinite(flat).all(axis=1)
        for j in np.flatnonzero(~finite):
            reasons[j] = f"{batch.keys[j]}: record has NaN or infinite values"
        ok &= finite
    if likelihood in ("bernoulli", "gaussian_sigmoid"):
        with np.errstate(invalid="ignore"):
            lo = flat.min(axis=1).astype(np.float64) * sc
            hi = flat.max(axis=1).astype(np.float64) * sc
        inside = (lo >= 0.0) & (hi <= 1.0) | ~ok
        for j in np.flatnonzero(~inside):
            reasons[j] = (f"{batch.keys[j]}: model inputs span [{lo[j]:g}, {hi[j]:g}], outside the support [0, 1] of "
                          f"the {likelihood} decoder")
        ok &= inside
    if dtype == "uint8" and recs.dtype != np.uint8:
        with np.errstate(invalid="ignore"):
            v = flat.astype(np.float64) * (sc * 255.0)
            whole = ((v >= 0) & (v <= 255) & (np.abs(v - np.round(v)) < 1e-6)).all(axis=1) | ~ok
        for j in np.flatnonzero(~whole):
            reasons[j] = f"{batch.keys[j]}: values are not whole numbers in [0, 255] and cannot be stored as uint8"
        ok &= whole
    for j in sorted(reasons):
        dead.append(DeadLetter(batch.source, batch.keys[j], reasons[j]))
    if not ok.any():
        return None, dead
    good = RecordBatch(batch.source, batch.keys, recs, sc)
    if not ok.all():
        good = good.take(ok)
    if dtype == "uint8" and good.records.dtype != np.uint8:
        good.records = np.round(good.records.astype(np.float64) * (sc * 255.0)).astype(np.uint8)
        good.scale = 1.0 / 255.0
    elif dtype == "float32" and (good.records.dtype != np.float32 or good.scale != 1.0):
        good.records = (good.records.astype(np.float32) * np.float32(good.scale)).astype(np.float32)
        good.scale = 1.0
    return good, dead


class _ValidateFn(beam.DoFn):
    def __init__(self, shape, likelihood, dtype, scale):
        self.args = (tuple(shape) if shape is not None else None, likelihood, dtype, scale)

    def process(self, batch: RecordBatch):
        good, dead = validate_batch(batch, *self.args)
        if good is not None:
            yield good
        for d in dead:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, d)


class Validate(beam.PTransform):
    """Refuse bad records (see :func:`validate_batch`): outputs ``records`` and ``dead_letter``."""

    def __init__(self, shape: Sequence[int] | None = None, likelihood: str | None = None, dtype: str | None = None,
                 scale: float | None = None):
        super().__init__()
        if dtype not in (None, "uint8", "float32"):
            raise DataError(f"dtype {dtype!r} is not one of uint8, float32")
        self.fn = _ValidateFn(shape, likelihood, dtype, scale)

    def expand(self, pcoll):
        return pcoll | "CheckRecords" >> beam.ParDo(self.fn).with_outputs(DEAD_LETTER, main=RECORDS)


# ---------------------------------------------------------------------------------------------------------
# writing: batched file sinks (temp file + rename, idempotent)
# ---------------------------------------------------------------------------------------------------------
class BatchedTFRecordSink(filebasedsink.FileBasedSink):
    """A Beam file sink whose elements are *lists* of serialized records, written with TensorFlow's TFRecord
    writer (CRC32C framing in C++) to the sink's temporary file, which Beam renames at finalisation."""

    def __init__(self, file_path_prefix: str, file_name_suffix: str = ".tfrecord", num_shards: int = 0,
                 shard_name_template: str | None = None):
        super().__init__(file_path_prefix, coder=None, file_name_suffix=file_name_suffix, num_shards=num_shards,
                         shard_name_template=shard_name_template, mime_type="application/octet-stream",
                         compression_type=CompressionTypes.UNCOMPRESSED)

    def open(self, temp_path):
        import tensorflow as tf

        return tf.io.TFRecordWriter(temp_path)

    def write_record(self, file_handle, value):
        for rec in value:
            file_handle.write(rec)

    def close(self, file_handle):
        file_handle.close()


class _ToExamples(beam.DoFn):
    """RecordBatch / CodeBatch -> a list of serialized Examples (counts records and bytes)."""

    def __init__(self):
        self.records = _counter("records")
        self.bytes_out = _counter("bytes_out")

    def process(self, batch):
        if isinstance(batch, CodeBatch):
            out = code_examples(batch)
        else:
            out = shards.record_examples(batch.keys, batch.records)
        self.records.inc(len(batch))
        self.bytes_out.inc(sum(len(r) + 16 for r in out))  # 16: TFRecord framing (length, 2 CRCs)
        yield out


def code_examples(batch: CodeBatch) -> list[bytes]:
    """Serialized code Examples: one per record (key, mean and log_scale as float lists of Nz, fingerprint),
    or for a coded batch one Example for the whole batch (keys, records, fingerprint, code)."""
    if batch.coded:
        import tensorflow as tf

        f = tf.train.Feature
        return [tf.train.Example(features=tf.train.Features(feature={
            "keys": f(bytes_list=tf.train.BytesList(value=[k.encode() for k in batch.keys])),
            "records": f(int64_list=tf.train.Int64List(value=[len(batch)])),
            "fingerprint": f(bytes_list=tf.train.BytesList(value=[batch.fingerprint.encode()])),
            "code": f(bytes_list=tf.train.BytesList(value=[batch.container]))})).SerializeToString()]
    return shards.serialize_examples(
        batch.keys, floats={"mean": batch.mean, "log_scale": batch.log_scale},
        constants={"fingerprint": shards.bytes_feature([batch.fingerprint.encode()])})


def code_schema(latent_dim: int, coded: bool = False):
    """Parquet/Arrow schema of codes: per record key (string), mean and log_scale (fixed-size lists of Nz
    float32), fingerprint (string); coded (``--coder``): per batch keys (list of string), records (int32),
    fingerprint (string), code (binary: one vaestream container of the batch's records, in key order)."""
    import pyarrow as pa

    if coded:
        return pa.schema([("keys", pa.list_(pa.string())), ("records", pa.int32()), ("fingerprint", pa.string()),
                          ("code", pa.binary())], metadata={b"vaestream": b"coded"})
    return pa.schema([("key", pa.string()), ("mean", pa.list_(pa.float32(), latent_dim)),
                      ("log_scale", pa.list_(pa.float32(), latent_dim)), ("fingerprint", pa.string())])


def record_schema(shape: Sequence[int], dtype: str):
    """Parquet/Arrow schema of records: key (string), data (fixed-size list of prod(shape) values of dtype);
    the shape and dtype are in the schema metadata."""
    import pyarrow as pa

    d = int(np.prod(shape))
    return pa.schema([("key", pa.string()), ("data", pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), d))],
                     metadata={b"shape": json.dumps(list(shape)).encode(), b"dtype": dtype.encode()})


def _fixed_list(arr: np.ndarray):
    import pyarrow as pa

    arr = np.ascontiguousarray(arr)
    n = len(arr)
    flat = arr.reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), int(flat.size // max(n, 1)) if n else arr.shape[-1])


class _ToTable(beam.DoFn):
    def __init__(self, schema):
        self.schema = schema
        self.records = _counter("records")
        self.bytes_out = _counter("bytes_out")

    def process(self, batch):
        import pyarrow as pa

        if isinstance(batch, CodeBatch) and batch.coded:
            if "code" not in self.schema.names:
                raise DataError(f"{batch.source}: coded batches need the coded schema (code_schema(coded=True))")
            cols = [pa.array([batch.keys], pa.list_(pa.string())), pa.array([len(batch)], pa.int32()),
                    pa.array([batch.fingerprint], pa.string()), pa.array([batch.container], pa.binary())]
        elif isinstance(batch, CodeBatch):
            cols = [pa.array(batch.keys, pa.string()), _fixed_list(batch.mean.astype(np.float32)),
                    _fixed_list(batch.log_scale.astype(np.float32)),
                    pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(batch), np.int32)),
                                                   pa.array([batch.fingerprint])).cast(pa.string())]
        else:
            cols = [pa.array(batch.keys, pa.string()), _fixed_list(batch.records.reshape(len(batch), -1))]
        table = pa.Table.from_arrays(cols, schema=self.schema)
        self.records.inc(len(batch))
        self.bytes_out.inc(int(table.nbytes))
        yield table


class WriteBatches(beam.PTransform):
    """Write RecordBatch or CodeBatch elements as TFRecord (Examples) or Parquet files.

    Files are ``{prefix}-SSSSS-of-NNNNN.tfrecord`` / ``.parquet``. Returns the PCollection of final file
    names. ``schema`` (a ``pyarrow.Schema``, see :func:`code_schema` / :func:`record_schema`) is needed for
    Parquet.
    """

    def __init__(self, prefix: str, output_format: str = "tfrecord", schema=None, num_shards: int = 0):
        super().__init__()
        if output_format not in ("tfrecord", "parquet"):
            raise DataError(f"output format {output_format!r} is not one of tfrecord, parquet")
        if output_format == "parquet" and schema is None:
            raise DataError("Parquet output needs a schema")
        self.prefix, self.output_format, self.schema, self.num_shards = prefix, output_format, schema, num_shards

    def expand(self, pcoll):
        if self.output_format == "tfrecord":
            return (pcoll
                    | "SerializeExamples" >> beam.ParDo(_ToExamples())
                    | "WriteTFRecord" >> beam.io.Write(BatchedTFRecordSink(self.prefix, ".tfrecord", self.num_shards)))
        from apache_beam.io.parquetio import WriteToParquetBatched

        return (pcoll
                | "ToArrowTables" >> beam.ParDo(_ToTable(self.schema))
                | "WriteParquet" >> WriteToParquetBatched(self.prefix, self.schema, file_name_suffix=".parquet",
                                                          num_shards=self.num_shards))


class WriteDeadLetters(beam.PTransform):
    """Write :class:`DeadLetter` items as JSON lines ``{"source", "key", "reason"}`` to one file ``path``."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def expand(self, pcoll):
        counter = _counter("dead_lettered")

        def to_json(d: DeadLetter) -> str:
            counter.inc(1)
            return json.dumps({"source": d.source, "key": d.key, "reason": d.reason})

        return (pcoll
                | "DeadLetterToJson" >> beam.Map(to_json)
                | "WriteDeadLetterFile" >> beam.io.WriteToText(self.path, shard_name_template=""))


# ---------------------------------------------------------------------------------------------------------
# shards: shuffle, write, manifest
# ---------------------------------------------------------------------------------------------------------
def _stable_seed(*parts) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class _Scatter(beam.DoFn):
    def __init__(self, buckets: int, seed: int):
        self.buckets, self.seed = buckets, seed

    def process(self, batch: RecordBatch):
        rng = np.random.default_rng(_stable_seed(self.seed, batch.source, batch.keys[0]))
        where = rng.integers(0, self.buckets, len(batch))
        for b in np.unique(where):
            yield int(b), batch.take(where == b)


def _gather(item, seed: int) -> RecordBatch:
    bucket, parts = item
    parts = sorted(parts, key=lambda p: p.keys[0])
    keys = [k for p in parts for k in p.keys]
    recs = np.concatenate([p.records for p in parts])
    perm = np.random.default_rng(_stable_seed(seed, "bucket", bucket)).permutation(len(keys))
    return RecordBatch(f"bucket-{bucket}", [keys[i] for i in perm], recs[perm], parts[0].scale)


class _StatsFn(beam.CombineFn):
    """Count, min, max, raw bytes and the order-independent content hash of RecordBatch elements."""

    def create_accumulator(self):
        return [0, np.inf, -np.inf, 0, 0]

    def add_input(self, acc, batch: RecordBatch):
        flat = batch.records.reshape(len(batch), -1)
        acc[0] += len(batch)
        acc[1] = min(acc[1], float(flat.min()))
        acc[2] = max(acc[2], float(flat.max()))
        acc[3] += int(batch.records.nbytes)
        acc[4] = (acc[4] + shards.record_hash_sum(batch.keys, batch.records)) % (1 << 256)
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for a in accs:
            out = [out[0] + a[0], min(out[1], a[1]), max(out[2], a[2]), out[3] + a[3], (out[4] + a[4]) % (1 << 256)]
        return out

    def extract_output(self, acc):
        return {"records": acc[0], "min": acc[1], "max": acc[2], "bytes": acc[3], "hash": f"{acc[4]:064x}"}


def _write_manifest(_, output_dir: str, files: list[str], stats: list[dict], dead: list[int], shape, dtype: str,
                    scale: float, sources: list[str]) -> str:
    import datetime
    import hashlib

    st = stats[0] if stats else {"records": 0, "min": 0.0, "max": 0.0, "hash": "0" * 64}
    counts = shards.count_records(sorted(files))
    entries = []
    for p in sorted(files):
        h = hashlib.sha256()
        size = 0
        with FileSystems.open(p, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            while True:
                b = f.read(1 << 22)
                if not b:
                    break
                h.update(b)
                size += len(b)
        rel = p[len(output_dir.rstrip("/")) + 1:] if p.startswith(output_dir.rstrip("/") + "/") else p
        entries.append({"path": rel, "records": counts[p], "bytes": size, "sha256": h.hexdigest()})
    written = sum(e["records"] for e in entries)
    if written != st["records"]:
        raise DataError(f"{output_dir}: the shards hold {written} records, the pipeline handed {st['records']} to "
                        "the writer")
    m = shards.Manifest(records=written, shape=tuple(int(s) for s in shape), dtype=dtype, scale=float(scale),
                        value_min=float(st["min"]) if written else 0.0, value_max=float(st["max"]) if written else 0.0,
                        shards=entries, content_hash=st["hash"], dead_lettered=int(sum(dead)), sources=list(sources),
                        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    final = output_dir.rstrip("/") + "/" + shards.MANIFEST
    tmp = final + ".tmp"
    with FileSystems.create(tmp) as f:
        f.write(m.to_json().encode())
    if FileSystems.exists(final):
        FileSystems.delete([final])
    FileSystems.rename([tmp], [final])
    return final


class WriteShards(beam.PTransform):
    """Shuffle validated records into ``num_shards`` TFRecord shards and write ``manifest.json``.

    Records are scattered to random buckets (seeded by ``seed`` and the batch, so reruns are identical),
    grouped, permuted within their bucket, and written through :class:`BatchedTFRecordSink`. The manifest
    (:class:`vaestream.shards.Manifest`) is written last, after the shard files are final; its record count is
    verified against the files. Returns a PCollection holding the manifest path.

    Args:
      output_dir: where ``shard-SSSSS-of-NNNNN.tfrecord`` and ``manifest.json`` go.
      shape, dtype, scale: the record layout every element has (``Validate`` with the same ``shape`` and
        ``dtype`` guarantees it).
      dead_letters: optional PCollection of DeadLetter items, counted into the manifest.
    """

    def __init__(self, output_dir: str, shape: Sequence[int], dtype: str, scale: float, num_shards: int = 8,
                 seed: int = 0, sources: Sequence[str] = (), dead_letters=None):
        super().__init__()
        self.output_dir = output_dir.rstrip("/")
        self.shape, self.dtype, self.scale = tuple(shape), dtype, scale
        self.num_shards, self.seed, self.sources = int(num_shards), int(seed), list(sources)
        self.dead_letters = dead_letters

    def expand(self, pcoll):
        from apache_beam.pvalue import AsList

        shuffled = (pcoll
                    | "ScatterToBuckets" >> beam.ParDo(_Scatter(self.num_shards, self.seed))
                    | "GroupBuckets" >> beam.GroupByKey()
                    | "PermuteBuckets" >> beam.Map(_gather, self.seed))
        files = shuffled | "WriteShardFiles" >> WriteBatches(f"{self.output_dir}/{shards.SHARD_PREFIX}", "tfrecord",
                                                             num_shards=self.num_shards)
        stats = shuffled | "ShardStats" >> beam.CombineGlobally(_StatsFn())
        if self.dead_letters is not None:
            dead = self.dead_letters | "CountDeadLetters" >> beam.combiners.Count.Globally()
        else:
            dead = pcoll.pipeline | "NoDeadLetters" >> beam.Create([0])
        return (pcoll.pipeline
                | "ManifestTrigger" >> beam.Create([None])
                | "WriteManifest" >> beam.Map(_write_manifest, self.output_dir, AsList(files), AsList(stats),
                                              AsList(dead), self.shape, self.dtype, self.scale, self.sources))


# ---------------------------------------------------------------------------------------------------------
# the model: one loader for model directories and SavedModel exports
# ---------------------------------------------------------------------------------------------------------
class LoadedVAE:
    """A VAE ready for batched inference, from a model directory or a SavedModel export.

    * ``encode(records [n, ...], scale) -> (mean [n, Nz], log_scale [n, Nz])`` float32: the parameters of
      q(z|x) for x = records * scale (records may stay uint8: the cast happens inside the compiled function).
    * ``decode(z [n, Nz]) -> x_mean [n, D]`` float32: the mean of p(x|z) (Bernoulli: sigmoid(logits)).
    * ``fingerprint``: the model's 64-hex SHA-256 (:meth:`vaestream.model.VAE.fingerprint`).
    * ``config``: its :class:`vaestream.config.ModelConfig`.

    A SavedModel written by :func:`vaestream.serving.export.export` (a version directory, or an export base whose
    latest version is taken) is read through :class:`vaestream.serving.export.ExportedModel`: its ``encode`` and
    ``decode`` signatures, ``assets/config.json`` and ``assets/fingerprint.txt``. Any other SavedModel must
    provide ``encode`` and ``decode`` (as attributes or signatures; outputs a dict
    with ``mean``/``log_scale`` and ``x_mean``, or tensors in that order) and its fingerprint as an attribute
    ``fingerprint`` (a string tensor/variable or a function returning one) or as ``"fingerprint"`` in a
    ``vaestream.json``/``metadata.json`` next to ``saved_model.pb`` or under ``assets/``; the model config as
    ``config.json`` there, or inside that JSON under ``"config"``.
    """

    def __init__(self, config, fingerprint: str, encode_fn, decode_fn, source: str):
        self.config = config
        self.fingerprint = fingerprint
        self._encode = encode_fn
        self._decode = decode_fn
        self.source = source

    def encode(self, records: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
        import tensorflow as tf

        x = np.asarray(records).reshape(len(records), -1)
        if x.dtype not in (np.uint8, np.float32):
            x = x.astype(np.float32)
        mean, log_scale = self._encode(tf.constant(x), tf.constant(scale, tf.float32))
        return np.asarray(mean, np.float32), np.asarray(log_scale, np.float32)

    def decode(self, z: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        return np.asarray(self._decode(tf.constant(np.asarray(z, np.float32))), np.float32)

    @classmethod
    def load(cls, model_dir: str | None = None, saved_model: str | None = None, reuse: bool = False
             ) -> "LoadedVAE":
        """Load a model directory or a SavedModel export (exactly one).

        ``reuse``: return the LoadedVAE of the same local directory that is still alive in this process (held
        by someone else, e.g. a job's fingerprint check while the job's workers load the model), if the
        directory's files (names, sizes, modification times) are unchanged since it was loaded; otherwise load
        it (and remember it, weakly: it goes when its last holder drops it).
        """
        if (model_dir is None) == (saved_model is None):
            raise ModelError("give exactly one of model_dir, saved_model")
        key = _dir_stamp(model_dir if model_dir is not None else saved_model) if reuse else None
        if key is not None:
            key = (model_dir, saved_model) + key
            live = _LIVE_MODELS.get(key)
            if live is not None:
                return live
        model = cls.from_model_dir(model_dir) if model_dir is not None else cls.from_saved_model(saved_model)
        if key is not None:
            _LIVE_MODELS[key] = model
        return model

    @classmethod
    def from_model_dir(cls, model_dir: str, jit: bool = False) -> "LoadedVAE":
        """Load a model directory; the encoder and decoder run as compiled ``tf.function`` graphs (with
        ``jit``, XLA-compiled, batches padded to powers of two to bound recompilation; on CPU the plain graph
        is as fast and needs no compilation time)."""
        import tensorflow as tf

        from vaestream.store import load_model

        model = load_model(model_dir)

        # Without jit the networks run in fixed row blocks (vaestream.model.blocked): codes and reconstructions
        # are bit-identical to the codec's and the SavedModel's for any batching. XLA (jit) compiles other
        # kernels: its outputs are deterministic per shape but not those bits.
        @tf.function(jit_compile=jit, reduce_retracing=True, autograph=False)
        def enc(x, scale):
            x = tf.cast(x, tf.float32) * scale
            return model.encoder_params(x) if jit else model.encoder_params_exact(x)

        @tf.function(jit_compile=jit, reduce_retracing=True, autograph=False)
        def dec(z):
            return (model.decoder_params(z) if jit else model.decoder_params_exact(z))["x_mean"]

        if jit:
            pad = _pad_rows
        else:
            # one trace per input dtype, for any batch length ([None, D]): a job's short last batch neither
            # retraces nor reuses a shape-specialised graph
            pad = (lambda t: t)
            enc = _batch_polymorphic(enc, tf.TensorSpec([], tf.float32))
            dec = _batch_polymorphic(dec)

        def encode_fn(x, s):
            n = int(x.shape[0])
            mean, log_scale = enc(pad(x), s)
            return mean.numpy()[:n], log_scale.numpy()[:n]

        def decode_fn(z):
            n = int(z.shape[0])
            return dec(pad(z)).numpy()[:n]

        out = cls(model.config, model.fingerprint(), encode_fn, decode_fn, str(model_dir))
        out._model = model
        return out

    @classmethod
    def from_saved_model(cls, path: str) -> "LoadedVAE":
        import tensorflow as tf

        from vaestream.config import ModelConfig

        exported = _vaestream_export(path)
        if exported is not None:
            em = exported
            enc_sig, dec_sig = em.signatures["encode"], em.signatures["decode"]
            enc_arg = list(enc_sig.structured_input_signature[1])[0]
            dec_arg = list(dec_sig.structured_input_signature[1])[0]

            def encode_fn(x, scale):
                out = enc_sig(**{enc_arg: tf.cast(x, tf.float32) * scale})
                return out["mean"].numpy(), out["log_scale"].numpy()

            def decode_fn(z):
                return dec_sig(**{dec_arg: z})["x_mean"].numpy()

            out = cls(em.config, em.fingerprint, encode_fn, decode_fn, str(em.path))
            out._saved = em
            return out
        try:
            obj = tf.saved_model.load(path)
        except (OSError, tf.errors.OpError, ValueError) as e:
            raise ModelError(f"{path}: not a loadable SavedModel ({e})") from e
        meta = {}
        for name in ("vaestream.json", "metadata.json", "assets/vaestream.json", "assets/metadata.json"):
            p = f"{path.rstrip('/')}/{name}"
            if FileSystems.exists(p):
                with FileSystems.open(p) as f:
                    meta = json.loads(f.read().decode())
                break
        config = None
        for name in ("config.json", "assets/config.json"):
            p = f"{path.rstrip('/')}/{name}"
            if FileSystems.exists(p):
                with FileSystems.open(p) as f:
                    config = ModelConfig.from_json(f.read().decode())
                break
        if config is None and isinstance(meta.get("config"), dict):
            config = ModelConfig.from_dict(meta["config"])
        if config is None:
            raise ModelError(f"{path}: SavedModel has no config.json (nor 'config' in vaestream.json)")
        fp = meta.get("fingerprint")
        if fp is None and hasattr(obj, "fingerprint"):
            v = obj.fingerprint
            v = v() if callable(v) else v
            fp = v.numpy().decode() if hasattr(v, "numpy") else str(v)
        if not fp:
            raise ModelError(f"{path}: SavedModel carries no model fingerprint")
        enc = _saved_fn(obj, "encode", path)
        dec = _saved_fn(obj, "decode", path)

        def encode_fn(x, scale):
            xf = tf.cast(x, tf.float32) * scale
            out = enc(xf)
            if isinstance(out, dict):
                return out["mean"].numpy(), out["log_scale"].numpy()
            return out[0].numpy(), out[1].numpy()

        def decode_fn(z):
            out = dec(z)
            if isinstance(out, dict):
                out = out["x_mean"]
            elif isinstance(out, (list, tuple)):
                out = out[0]
            return out.numpy()

        out = cls(config, fp, encode_fn, decode_fn, str(path))
        out._saved = obj  # the restored functions hold their variables weakly: keep the object alive
        return out


def _batch_polymorphic(fn, *rest_specs):
    """``fn(t, *rest)`` (a ``tf.function``) traced once per dtype and record shape of ``t``, for batches of any
    length (``TensorSpec([None, ...])``); ``rest_specs`` are the specs of the other arguments."""
    import tensorflow as tf

    traced: dict = {}

    def call(t, *rest):
        key = (t.dtype, tuple(t.shape[1:]))
        f = traced.get(key)
        if f is None:
            f = traced[key] = fn.get_concrete_function(tf.TensorSpec([None, *key[1]], t.dtype), *rest_specs)
        return f(t, *rest)

    return call


_LIVE_MODELS: "weakref.WeakValueDictionary[tuple, LoadedVAE]" = weakref.WeakValueDictionary()


def _dir_stamp(path: str) -> tuple | None:
    """(relative name, size, mtime in ns) of every file under a local directory, sorted; None for a remote or
    missing path (never reused)."""
    if "://" in str(path) or not os.path.isdir(path):
        return None
    out = []
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except OSError:
                return None
            out.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return (os.path.abspath(path),) + tuple(sorted(out))


def _vaestream_export(path: str):
    """``vaestream.serving.export.ExportedModel`` of ``path`` (a version directory or an export base whose latest
    version is taken) when it is in that layout (``assets/config.json`` + ``assets/fingerprint.txt``), else
    None."""
    try:
        from vaestream.serving.export import ExportedModel, resolve_export
    except ModuleNotFoundError:
        return None
    try:
        version_dir = resolve_export(path)
    except ModelError:
        return None
    if not (version_dir / "assets" / "fingerprint.txt").is_file():
        return None
    return ExportedModel(version_dir)


def _pad_rows(x):
    """Pad ``x`` [n, ...] with zero rows to the next power of two (at least 64), so the XLA-compiled model
    sees a handful of batch shapes instead of one per distinct batch length."""
    import tensorflow as tf

    n = int(x.shape[0])
    size = max(64, 1 << max(0, (n - 1).bit_length()))
    if size == n:
        return x
    return tf.concat([x, tf.zeros([size - n] + list(x.shape[1:]), x.dtype)], 0)


def _saved_fn(obj, name: str, path: str):
    fn = getattr(obj, name, None)
    if callable(fn):
        return fn
    sig = getattr(obj, "signatures", {}).get(name)
    if sig is not None:
        arg = list(sig.structured_input_signature[1].keys())[0]
        return lambda t: sig(**{arg: t})
    raise ModelError(f"{path}: SavedModel has no '{name}' function or signature")


def read_model_config(model_dir: str | None = None, saved_model: str | None = None):
    """The ModelConfig of a model directory or SavedModel export, without loading weights."""
    from vaestream.config import ModelConfig
    from vaestream.store import read_config

    if model_dir is not None:
        return read_config(model_dir)
    try:
        from vaestream.serving.export import resolve_export

        saved_model = str(resolve_export(saved_model))
    except (ModuleNotFoundError, ModelError):
        pass
    for name in ("config.json", "assets/config.json"):
        p = f"{str(saved_model).rstrip('/')}/{name}"
        if FileSystems.exists(p):
            with FileSystems.open(p) as f:
                return ModelConfig.from_json(f.read().decode())
    for name in ("vaestream.json", "metadata.json", "assets/vaestream.json", "assets/metadata.json"):
        p = f"{str(saved_model).rstrip('/')}/{name}"
        if FileSystems.exists(p):
            with FileSystems.open(p) as f:
                meta = json.loads(f.read().decode())
            if isinstance(meta.get("config"), dict):
                return ModelConfig.from_dict(meta["config"])
    raise ModelError(f"{saved_model}: no model config found")


class VAEModelHandler(ModelHandler):
    """A Beam ``ModelHandler`` for :class:`LoadedVAE`: elements are :class:`RecordBatch` (``mode="encode"``,
    predictions :class:`CodeBatch`) or :class:`CodeBatch` (``mode="decode"``, predictions
    :class:`RecordBatch` of reconstructions x_mean, float32 ``[n, *input_shape]``).

    ``RunInference`` loads the model once per worker process (``load_model``) and hands ``run_inference``
    lists of elements (``BatchElements`` up to ``max_records`` records a call); each call concatenates them
    into one TF call and splits the result back. In decode mode every element's fingerprint must equal the
    model's, else :class:`vaestream.errors.ModelMismatchError`.

    Args:
      coder: encode mode: entropy-code the latents instead of returning floats: ``vaestream.coding.codec.load(model)``
        quantises each element's posterior means (one model call, ``codec.encode``) and codes them into one
        container per element (``codec.compress_codes``): a coded :class:`CodeBatch`. Decode mode reads coded
        batches whatever this flag says (``codec.decompress``). Needs the model's coder tables
        (``coder_tables.npz``, see :func:`vaestream.coding.codec.write_tables`).
    """

    def __init__(self, model_dir: str | None = None, saved_model: str | None = None, mode: str = "encode",
                 max_records: int = CHUNK, coder: bool = False):
        # BatchElements sizes batches by the sum of element_size_fn: records, not elements.
        super().__init__(min_batch_size=1, max_batch_size=max(1, max_records), element_size_fn=len)
        if mode not in ("encode", "decode"):
            raise ModelError(f"mode {mode!r} is not one of encode, decode")
        if (model_dir is None) == (saved_model is None):
            raise ModelError("give exactly one of model_dir, saved_model")
        self.model_dir, self.saved_model, self.mode, self.coder = model_dir, saved_model, mode, coder

    def key(self) -> tuple:
        """What identifies the model this handler loads (the ``shared.Shared`` tag)."""
        return (self.model_dir, self.saved_model, self.mode, self.coder)

    def load_model(self) -> LoadedVAE:
        """The model (with its coder when ``coder``); reuses one that is alive in this process for the same,
        unchanged directory (``LoadedVAE.load(reuse=True)``), e.g. the decode job's fingerprint check's."""
        import copy

        # a shallow copy: the weights and compiled functions are shared, the coder is this handler's own
        model = copy.copy(LoadedVAE.load(self.model_dir, self.saved_model, reuse=True))
        model.codec = None
        if self.coder:
            _attach_codec(model, self.model_dir)
        return model

    def run_inference(self, batch: Sequence[Any], model: LoadedVAE, inference_args=None) -> list:
        if not batch:
            return []
        if self.mode == "encode":
            return self._encode(batch, model)
        return self._decode(batch, model)

    def _encode(self, batch: Sequence[RecordBatch], model: LoadedVAE) -> list[CodeBatch]:
        if self.coder:  # one model call per element (the codec's), one container per element
            coded = []
            for b in batch:
                symbols = np.asarray(model.codec.encode(b.inputs())).reshape(len(b), -1)
                coded.append(CodeBatch(b.source, b.keys, None, None, model.fingerprint,
                                       bytes(model.codec.compress_codes(symbols)), int(b.records.nbytes)))
            return coded
        groups: dict[tuple, list[int]] = {}
        for i, b in enumerate(batch):
            groups.setdefault((b.records.dtype.str, b.scale), []).append(i)
        results: dict[int, CodeBatch] = {}
        for (_, scale), idx in groups.items():
            recs = np.concatenate([batch[i].records.reshape(len(batch[i]), -1) for i in idx])
            mean, log_scale = model.encode(recs, 1.0 if scale is None else scale)
            s = 0
            for i in idx:
                b = batch[i]
                n = len(b)
                results[i] = CodeBatch(b.source, b.keys, mean[s:s + n], log_scale[s:s + n], model.fingerprint, None,
                                       int(b.records.nbytes))
                s += n
        out = [results[i] for i in range(len(batch))]
        return out

    def _decode(self, batch: Sequence[CodeBatch], model: LoadedVAE) -> list[RecordBatch]:
        for b in batch:
            if b.fingerprint != model.fingerprint:
                raise ModelMismatchError(
                    f"{b.source}: codes were written by model {b.fingerprint[:16]}..., the model given "
                    f"({model.source}) is {model.fingerprint[:16]}...; decode them with the model that encoded them")
        shape = tuple(model.config.input_shape)
        floats = [b for b in batch if not b.coded]
        x = model.decode(np.concatenate([b.mean for b in floats])) if floats else None
        out, s = [], 0
        for b in batch:
            n = len(b)
            if b.coded:
                if getattr(model, "codec", None) is None:
                    _attach_codec(model, self.model_dir)
                rec = np.asarray(model.codec.decompress(b.container))
                if len(rec) != n:
                    raise DataError(f"{b.source}: a coded batch lists {n} keys but its container holds "
                                    f"{len(rec)} records")
                out.append(RecordBatch(b.source, b.keys, rec.reshape((n,) + shape).astype(np.float32), 1.0))
                continue
            out.append(RecordBatch(b.source, b.keys, x[s:s + n].reshape((n,) + shape), 1.0))
            s += n
        return out

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return int(sum(b.records.nbytes if isinstance(b, RecordBatch) else b.nbytes for b in batch))

    def get_metrics_namespace(self) -> str:
        return "vaestream.RunInference"


def _attach_codec(model: LoadedVAE, model_dir: str | None) -> None:
    """Give ``model`` its coder (``model.codec``), checked to belong to the same model."""
    from vaestream.coding import codec

    model.codec = codec.load(model_dir if model_dir is not None else model.source)
    if getattr(model.codec, "fingerprint", model.fingerprint) != model.fingerprint:
        raise ModelMismatchError(f"{model.source}: the coder tables belong to another model")


class _InferAheadFn(beam.DoFn):
    """Lists of elements -> ``handler.run_inference`` on them, one list ahead: the model call for list k+1
    runs on a background thread (TensorFlow releases the GIL) while list k's predictions travel downstream
    (serialisation and writes in the same fused stage), so the model and the per-record Python work overlap
    on two cores instead of taking turns. Outputs keep their input's window and timestamp; the last list of
    a bundle is flushed in ``finish_bundle``. The model is loaded once per worker process through
    ``shared.Shared``, as ``RunInference`` does."""

    def __init__(self, handler: "VAEModelHandler"):
        from apache_beam.utils import shared

        self.handler = handler
        self._shared = shared.Shared()

    def setup(self):
        import concurrent.futures

        self._model = self._shared.acquire(self.handler.load_model, tag=repr(self.handler.key()))
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vaestream-infer")
        self._pending = None

    def _drain(self):
        if self._pending is None:
            return
        fut, window, timestamp = self._pending
        self._pending = None
        from apache_beam.utils.windowed_value import WindowedValue

        for pred in fut.result():
            yield WindowedValue(pred, timestamp, [window])

    def process(self, elements, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        fut = self._pool.submit(self.handler.run_inference, list(elements), self._model)
        yield from self._drain()
        self._pending = (fut, window, timestamp)

    def finish_bundle(self):
        yield from self._drain()

    def teardown(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class Encode(beam.PTransform):
    """RecordBatch -> CodeBatch with a VAE (see :class:`VAEModelHandler`).

    By default Beam's ``RunInference`` over the handler (one model call at a time). ``overlap=True``: elements
    are batched by ``BatchElements`` (up to ``max_records`` records a model call) and encoded one batch ahead
    on a background thread (:class:`_InferAheadFn`), so encoding overlaps the downstream per-record work.
    Measured on 2 cores (``benchmarks/RESULTS_beam.md``): 1.02-1.3x faster when the cores are shared with
    other work, no faster (0.95-1.0x at 1M records) on an idle machine, where TensorFlow's matmuls already
    use both cores.
    """

    def __init__(self, model_dir: str | None = None, saved_model: str | None = None, max_records: int = CHUNK,
                 coder: bool = False, overlap: bool = False):
        super().__init__()
        self.handler = VAEModelHandler(model_dir, saved_model, "encode", max_records, coder)
        self.overlap = overlap

    def expand(self, pcoll):
        if not self.overlap:
            return pcoll | "RunInference" >> RunInference(self.handler)
        return (pcoll
                | "BatchElements" >> beam.BatchElements(**self.handler.batch_elements_kwargs())
                | "InferAhead" >> beam.ParDo(_InferAheadFn(self.handler)))


def _quantize(batch: RecordBatch, dtype: str) -> RecordBatch:
    if dtype == "uint8":
        q = np.clip(np.round(batch.records * 255.0), 0, 255).astype(np.uint8)
        return RecordBatch(batch.source, batch.keys, q, 1.0 / 255.0)
    return batch


class Decode(beam.PTransform):
    """CodeBatch -> RecordBatch of reconstructions (the decoder mean at z = the posterior mean).

    Raises :class:`vaestream.errors.ModelMismatchError` (in the worker, so the pipeline fails) when a code's
    fingerprint differs from the model's. ``output_dtype="uint8"`` stores round(255 x) (for image data).
    ``overlap``: as :class:`Encode` (``False``: Beam's ``RunInference``).
    """

    def __init__(self, model_dir: str | None = None, saved_model: str | None = None, max_records: int = CHUNK,
                 output_dtype: str = "float32", overlap: bool = False):
        super().__init__()
        if output_dtype not in ("float32", "uint8"):
            raise DataError(f"output dtype {output_dtype!r} is not one of float32, uint8")
        self.handler = VAEModelHandler(model_dir, saved_model, "decode", max_records)
        self.output_dtype = output_dtype
        self.overlap = overlap

    def expand(self, pcoll):
        if self.overlap:  # as Encode: the next batch decodes on a thread while the last one is written
            out = (pcoll
                   | "BatchElements" >> beam.BatchElements(**self.handler.batch_elements_kwargs())
                   | "InferAhead" >> beam.ParDo(_InferAheadFn(self.handler)))
        else:
            out = pcoll | "RunInference" >> RunInference(self.handler)
        if self.output_dtype != "float32":
            out = out | "Quantize" >> beam.Map(_quantize, self.output_dtype)
        return out


# ---------------------------------------------------------------------------------------------------------
# reading codes
# ---------------------------------------------------------------------------------------------------------
def code_files(specs: str | Sequence[str]) -> list[str]:
    """The code files (``.tfrecord`` / ``.parquet``) that ``specs`` name (files, globs or directories)."""
    out: list[str] = []
    for spec in _split_specs(specs):
        if os.path.isdir(spec):
            pats = [spec.rstrip("/") + "/*.tfrecord", spec.rstrip("/") + "/*.parquet"]
        else:
            pats = [spec]
        found = sorted(m.path for pat in pats for m in FileSystems.match([pat])[0].metadata_list)
        if not found:
            raise DataError(f"{spec}: no code files (.tfrecord or .parquet) match")
        out += found
    return out


def read_codes(path: str, chunk_size: int = CHUNK) -> Iterator[CodeBatch | DeadLetter]:
    """Read one code file (TFRecord of code Examples, or Parquet) in chunks of ``chunk_size`` records."""
    if path.endswith(".parquet"):
        yield from _read_codes_parquet(path, chunk_size)
    else:
        yield from _read_codes_tfrecord(path, chunk_size)


def _read_codes_parquet(path: str, chunk_size: int):
    import pyarrow.parquet as pq

    try:
        with _open(path) as f:
            pf = pq.ParquetFile(io.BytesIO(f.read()))
        names = pf.schema_arrow.names
        if "keys" in names and "code" in names:  # coded: one row per batch
            for rb in pf.iter_batches(batch_size=max(1, chunk_size // CHUNK)):
                for keys, n, fp, blob in zip(*(rb.column(c).to_pylist() for c in ("keys", "records", "fingerprint",
                                                                                     "code"))):
                    if n != len(keys):
                        raise ValueError(f"a coded row lists {len(keys)} keys for {n} records")
                    yield CodeBatch(path, keys, None, None, fp, blob)
            return
        for rb in pf.iter_batches(batch_size=chunk_size):
            n = rb.num_rows
            mean = np.asarray(rb.column("mean").flatten().to_numpy(zero_copy_only=False), np.float32).reshape(n, -1)
            ls = np.asarray(rb.column("log_scale").flatten().to_numpy(zero_copy_only=False), np.float32).reshape(n, -1)
            keys = rb.column("key").to_pylist()
            fps = rb.column("fingerprint").to_pylist()
            for fp in sorted(set(fps)):
                sel = [i for i, v in enumerate(fps) if v == fp] if len(set(fps)) > 1 else list(range(n))
                yield CodeBatch(path, [keys[i] for i in sel], mean[sel], ls[sel], fp)
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}: not a readable code Parquet file ({type(e).__name__}: {e})") from None


def _read_codes_tfrecord(path: str, chunk_size: int):
    import tensorflow as tf

    name = path.rsplit("/", 1)[-1]
    index = 0
    spec = None
    for raw, error in _tfrecord_chunks(tf.data.TFRecordDataset(path, buffer_size=1 << 20), chunk_size):
        if error is not None:
            if len(raw):
                yield from _code_batches(path, raw, spec, index)
                index += len(raw)
            yield DeadLetter(path, f"{_key(name, index)}..", f"{path}: truncated or corrupt TFRecord data after "
                                                             f"record {index} ({error})")
            return
        if spec is None:
            spec = _code_spec(path, raw[0])
        yield from _code_batches(path, raw, spec, index)
        index += len(raw)


def _code_spec(path: str, first: bytes) -> dict:
    import tensorflow as tf

    f = tf.train.Example.FromString(first).features.feature
    if "keys" in f and "code" in f and "fingerprint" in f:  # coded: one Example per batch
        return {"keys": tf.io.VarLenFeature(tf.string), "records": tf.io.FixedLenFeature([], tf.int64),
                "fingerprint": tf.io.FixedLenFeature([], tf.string), "code": tf.io.FixedLenFeature([], tf.string)}
    if "mean" not in f or "log_scale" not in f or "fingerprint" not in f:
        raise DataError(f"{path}: records are not vaestream codes (need mean, log_scale, fingerprint; or keys, "
                        "code, fingerprint)")
    nz = len(f["mean"].float_list.value)
    return {"key": tf.io.FixedLenFeature([], tf.string), "mean": tf.io.FixedLenFeature([nz], tf.float32),
            "log_scale": tf.io.FixedLenFeature([nz], tf.float32), "fingerprint": tf.io.FixedLenFeature([], tf.string)}


def _code_batches(path: str, raw, spec: dict | None, index: int = 0) -> Iterator[CodeBatch]:
    import tensorflow as tf

    spec = spec or _code_spec(path, raw[0])
    try:
        ex = tf.io.parse_example(tf.constant(list(raw), tf.string), spec)
    except tf.errors.InvalidArgumentError as e:
        raise DataError(f"{path}: records {index}..{index + len(raw) - 1}: malformed code Examples "
                        f"({e.message.splitlines()[0]})") from None
    fps = [v.decode() for v in ex["fingerprint"].numpy()]
    if "code" in ex:
        keys = tf.RaggedTensor.from_sparse(ex["keys"]).to_list()
        for i, (ks, n, fp, blob) in enumerate(zip(keys, ex["records"].numpy(), fps, ex["code"].numpy())):
            if n != len(ks):
                raise DataError(f"{path}: record {index + i}: a coded batch lists {len(ks)} keys for {n} records")
            yield CodeBatch(path, [k.decode() for k in ks], None, None, fp, bytes(blob))
        return
    keys = [k.decode() for k in ex["key"].numpy()]
    mean, ls = ex["mean"].numpy(), ex["log_scale"].numpy()
    for fp in sorted(set(fps)):
        sel = [i for i, v in enumerate(fps) if v == fp] if len(set(fps)) > 1 else list(range(len(fps)))
        yield CodeBatch(path, [keys[i] for i in sel], mean[sel], ls[sel], fp)


class _ReadCodesFn(beam.DoFn):
    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size
        self.records_in = _counter("records_in")
        self.bytes_in = _counter("bytes_in")

    def process(self, path: str):
        try:
            for item in read_codes(path, self.chunk_size):
                if isinstance(item, CodeBatch):
                    self.records_in.inc(len(item))
                    self.bytes_in.inc(item.nbytes)
                    yield item
                else:
                    self.records_in.inc(1)
                    yield beam.pvalue.TaggedOutput(DEAD_LETTER, item)
        except DataError as e:
            self.records_in.inc(1)
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(path, path, str(e)))


class ReadCodes(beam.PTransform):
    """Read code files (TFRecord or Parquet) as CodeBatch elements (``records``) plus ``dead_letter``."""

    def __init__(self, inputs: str | Sequence[str], chunk_size: int = CHUNK):
        super().__init__()
        self.paths = code_files(inputs)
        self.chunk_size = chunk_size

    def expand(self, pbegin):
        return (pbegin
                | "CodeFiles" >> beam.Create(self.paths)  # reshuffles the files when there are several
                | "ReadCodes" >> beam.ParDo(_ReadCodesFn(self.chunk_size)).with_outputs(DEAD_LETTER, main=RECORDS))


def first_fingerprint(paths: Sequence[str]) -> str | None:
    """The fingerprint of the first code in ``paths`` (for a check before a decode job starts)."""
    for p in paths:
        try:
            for item in read_codes(p, chunk_size=1):
                if isinstance(item, CodeBatch):
                    return item.fingerprint
                break
        except DataError:
            continue
    return None


# ---------------------------------------------------------------------------------------------------------
# running and accounting
# ---------------------------------------------------------------------------------------------------------
def make_pipeline(options) -> beam.Pipeline:
    """A Pipeline on the runner the options name, or on the in-process ``FnApiRunner`` (no download) if none.

    ``--direct_num_workers`` and ``--direct_running_mode`` (``in_memory``, ``multi_threading``,
    ``multi_processing``) are read by the FnApiRunner from the options.
    """
    from apache_beam.options.pipeline_options import StandardOptions
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    if options.view_as(StandardOptions).runner is None:
        return beam.Pipeline(runner=FnApiRunner(), options=options)
    return beam.Pipeline(options=options)


_HEAP_FROZEN = False


def freeze_startup_heap() -> None:
    """Move the objects alive before the first job of this process (TensorFlow's and Beam's modules, ~0.5M
    objects) out of reach of the cyclic garbage collector (``gc.freeze``), once per process. The job entry
    points call it (``vaestream encode|decode|prepare``, ``python pipelines/*.py``); the library never does,
    since it changes the whole process: call it yourself in a process of your own that runs jobs.

    Without it, the allocations of a job's first pipeline (translation, bundle processors) trigger one full
    collection over that whole heap, ~0.3 s of a 10k-record job's ~1 s (measured, ``benchmarks/RESULTS_beam.md``).
    Frozen objects are still freed when their reference count drops; only cyclic garbage that already exists
    at the first call is never collected, which bounds what this can keep alive to that one snapshot.
    """
    import gc

    global _HEAP_FROZEN
    if not _HEAP_FROZEN:
        _HEAP_FROZEN = True
        gc.freeze()


def counters(result) -> dict[str, int]:
    """The ``vaestream`` counters of a finished pipeline, summed over steps (committed values)."""
    from apache_beam.metrics.metric import MetricsFilter

    out: dict[str, int] = {}
    for c in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        try:
            v = c.committed
        except Exception:
            v = None
        if v is None:
            v = c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(v or 0)
    return out


def check_counts(c: dict[str, int], what: str) -> None:
    """Raise :class:`DataError` unless ``records_in == records + dead_lettered``."""
    rin, rout, dead = c.get("records_in", 0), c.get("records", 0), c.get("dead_lettered", 0)
    if rin != rout + dead:
        raise DataError(f"{what}: {rin} records in, but {rout} written + {dead} dead-lettered = {rout + dead}")


def count_written(paths: Iterable[str], coded: bool = False) -> int:
    """Records in written TFRecord / Parquet files (Parquet from its footer, TFRecord by reading through);
    ``coded``: code files of the encode job's ``--coder``, one row per batch (the rows' record counts summed,
    every row parsed)."""
    import pyarrow.parquet as pq

    if coded:
        return sum(len(b) for p in paths for b in read_codes(p) if isinstance(b, CodeBatch))
    total = 0
    tf_paths = []
    for p in paths:
        if p.endswith(".parquet"):
            with _open(p) as f:
                total += pq.ParquetFile(io.BytesIO(f.read())).metadata.num_rows
        else:
            tf_paths.append(p)
    return total + sum(shards.count_records(tf_paths).values())


def file_sizes(pattern: str) -> tuple[list[str], int]:
    """Paths matching ``pattern`` and their total size in bytes."""
    meta = FileSystems.match([pattern])[0].metadata_list
    return sorted(m.path for m in meta), int(sum(m.size_in_bytes for m in meta))


def count_lines(path: str) -> int:
    """Non-empty lines of a text file (0 if it does not exist)."""
    if not FileSystems.exists(path):
        return 0
    with _open(path) as f:
        return sum(1 for line in io.TextIOWrapper(f, encoding="utf-8") if line.strip())


def run_pipeline(p: beam.Pipeline):
    """Run ``p`` to the end; a vaestream error raised in a worker is re-raised as its own type."""
    from vaestream.errors import VaestreamError

    try:
        result = p.run()
        result.wait_until_finish()
        return result
    except VaestreamError:
        raise
    except Exception as e:  # runners wrap worker exceptions (RuntimeError carrying the remote traceback)
        seen, cur = set(), e
        while cur is not None and id(cur) not in seen:
            if isinstance(cur, VaestreamError):
                raise cur from e
            seen.add(id(cur))
            cur = cur.__cause__ or cur.__context__
        text = str(e)
        for cls in (ModelMismatchError, ModelError, DataError):
            marker = f"{cls.__name__}: "
            if marker in text:
                msg = text.rsplit(marker, 1)[1].strip().splitlines()[0]
                raise cls(msg) from e
        raise


def job_summary(job: str, result, seconds: float, output_pattern: str, dead_letter_path: str,
                extra: dict | None = None, coded: bool = False, counts: dict[str, int] | None = None) -> dict:
    """Counters, throughput, bytes and the conservation check of a finished job.

    ``counts``: the counters, where the runner has no metrics (the Dask runner: :mod:`vaestream.beam.dask`
    counts in the tasks' results); default ``counters(result)``.

    Checks ``records_in == records + dead_lettered`` from the counters, and that the output files hold
    ``records`` records and the dead-letter file ``dead_lettered`` lines; raises :class:`DataError` if not.
    """
    c = counts if counts is not None else counters(result)
    check_counts(c, job)
    files, out_bytes = file_sizes(output_pattern)
    written = count_written(files, coded)
    dead = count_lines(dead_letter_path)
    if written != c.get("records", 0):
        raise DataError(f"{job}: output files hold {written} records, the pipeline wrote {c.get('records', 0)}")
    if dead != c.get("dead_lettered", 0):
        raise DataError(f"{job}: {dead_letter_path} has {dead} lines, the pipeline dead-lettered "
                        f"{c.get('dead_lettered', 0)}")
    summary = {"job": job, "records_in": c.get("records_in", 0), "records": written, "dead_lettered": dead,
               "seconds": round(seconds, 3), "records_per_second": round(written / max(seconds, 1e-9), 1),
               "bytes_in": c.get("bytes_in", 0), "bytes_out": out_bytes,
               "compression_ratio": round(c.get("bytes_in", 0) / out_bytes, 3) if out_bytes else None,
               "outputs": files, "dead_letter": dead_letter_path}
    summary.update(extra or {})
    return summary


def clear_outputs(*patterns: str, inputs: Sequence[str] = ()) -> int:
    """Delete the files matching ``patterns`` (the outputs of an earlier run of a job into the same place, so a
    rerun with another shard count leaves no stale shards behind); returns how many were deleted.

    Raises :class:`DataError` (deleting nothing) if one of them is among ``inputs``."""
    paths = [m.path for pat in patterns for m in FileSystems.match([pat])[0].metadata_list]
    def norm(p: str) -> str:
        return p if "://" in p else os.path.abspath(p)

    clash = sorted({norm(p) for p in paths} & {norm(str(i)) for i in inputs})
    if clash:
        raise DataError(f"{clash[0]}: is an input of this job and would be overwritten by its output; "
                        "write to another directory")
    if paths:
        FileSystems.delete(paths)
    return len(paths)
