"""Format readers: one read task -> record batches and dead letters (IDX, npy, npz, CSV, TFRecord, PNG), and
:class:`ReadRecords`."""

from __future__ import annotations

import io
import pickle
from typing import Any, Iterator, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from vaestream import shardset
from vaestream.beam.elements import (CHUNK, DEAD_LETTER, CodeBatch, DeadLetter, KeyRange, RECORDS, RecordBatch, SPLIT,
                                     job_counter, record_key)
from vaestream.beam.formats import expand_inputs, file_size, input_kind, maybe_gunzip, open_raw, plan_reads
from vaestream.beam.validate import Validate, ValidateFn
from vaestream.binio import Truncated, read_exact
from vaestream.data import csv_records, csv_row, idx_header, npy_header
from vaestream.errors import DataError


def probe(path: str, feature: str = "x", records: bool = False, limit: int = 256
          ) -> tuple[tuple[int, ...], np.dtype | np.ndarray]:
    """The record shape and dtype of the first records of ``path`` (reads only a little of it); with
    ``records``, (shape, the first records: up to ``limit`` of them) instead."""
    n = limit if records else 1
    for item in read_range({"path": path, "kind": input_kind(path), "start": 0, "stop": None}, chunk_size=n,
                           feature=feature, limit=n):
        if isinstance(item, RecordBatch):
            return tuple(item.records.shape[1:]), (item.records if records else item.records.dtype)
        raise DataError(f"{path}: first record unreadable: {item.reason}")
    raise DataError(f"{path}: no records")



def read_range(task: dict, chunk_size: int = CHUNK, feature: str = "x", limit: int | None = None
               ) -> Iterator[RecordBatch | DeadLetter]:
    """Read the records of one task of :func:`plan_reads`, ``chunk_size`` records per :class:`RecordBatch`.

    Problems become :class:`DeadLetter` items: an unreadable file (one item, key = the path), a truncated
    file (every whole record before the cut is read; one item ``FILE: truncated at record N`` for the rest,
    raw or gzip), an unparsable CSV line or one of the wrong length (one item per line).
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
                   chunk: int, name: str, total: int | None = None) -> Iterator[RecordBatch | DeadLetter]:
    """Records ``start .. stop - 1`` of a file of fixed-size records (``total`` in all, the header says), read
    from ``f`` at record ``start``; at a cut, the whole records before it and one dead letter for the rest."""
    total = stop if total is None else total
    rec_bytes = int(np.prod(rec_shape)) * dtype.itemsize
    i = start
    while i < stop:
        n = min(chunk, stop - i)
        try:
            raw = read_exact(f, n * rec_bytes)
            why = None
        except Truncated as t:
            raw, why = t.data, t.args[0]
        got = len(raw) // rec_bytes
        if got:
            arr = np.frombuffer(raw[:got * rec_bytes], dtype=dtype).reshape((got,) + rec_shape)
            arr = arr.astype(dtype.newbyteorder("="), copy=False)
            yield RecordBatch(path, KeyRange(name, i, i + got), arr)
        if got < n:
            cut = i + got
            yield DeadLetter(path, f"{record_key(name, cut)}..{record_key(name, total - 1)}",
                             f"{path}: truncated at record {cut}: the header says {total} records, the data ends "
                             f"inside record {cut}" + (f" ({why})" if why else ""))
            return
        i += n


def _whole_records(path: str, header: int, rec_bytes: int) -> int | None:
    """How many whole records an uncompressed file of fixed-size records holds after its ``header``."""
    size = file_size(path)
    return None if size is None or rec_bytes == 0 else max(0, size - header) // rec_bytes


def _range_of(task: dict, n: int, limit: int | None, whole: int | None) -> tuple[int, int] | None:
    """The records ``(start, stop)`` a task reads of a file of ``n`` (``whole`` of them on disk, when it is
    cut short); None when the task lies wholly after the cut (the task that holds the cut reports it)."""
    start, stop = task["start"], task["stop"] if task["stop"] is not None else n
    if limit is not None:
        stop = min(stop, start + limit)
    if whole is not None and whole < n and start > whole:
        return None
    return start, stop


def _read_idx(task, chunk, feature, limit):
    path = task["path"]
    name = path.rsplit("/", 1)[-1]
    with open_raw(path) as f:
        g, zipped = maybe_gunzip(f, path)
        try:
            dtype, shape, header = idx_header(g, path)
        except (Truncated, EOFError) as t:
            raise DataError(f"{path}: truncated IDX header ({t.args[0]})") from None
        if len(shape) < 2:
            raise DataError(f"{path}: IDX of shape {shape} holds labels, not records")
        rec_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        span = _range_of(task, shape[0], limit, None if zipped else _whole_records(path, header, rec_bytes))
        if span is None:
            return
        start, stop = span
        if start:
            g.seek(header + start * rec_bytes)
        yield from _fixed_records(path, g, dtype, tuple(shape[1:]), start, stop, chunk, name, shape[0])


def _read_npy(task, chunk, feature, limit):
    path = task["path"]
    name = path.rsplit("/", 1)[-1]
    with open_raw(path) as f:
        dtype, shape, fortran = npy_header(f, path)
        if len(shape) < 2:
            shape = shape + (1,)
        if fortran:
            arr = np.load(open_raw(path), allow_pickle=False)
            yield from _chunks_of(path, name, arr[:limit] if limit else arr, chunk)
            return
        header = f.tell()
        rec_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        span = _range_of(task, shape[0], limit, _whole_records(path, header, rec_bytes))
        if span is None:
            return
        start, stop = span
        if start:
            f.seek(header + start * rec_bytes)
        yield from _fixed_records(path, f, dtype, tuple(shape[1:]), start, stop, chunk, name, shape[0])


def _chunks_of(path: str, name: str, arr: np.ndarray, chunk: int) -> Iterator[RecordBatch]:
    if arr.ndim < 2:
        arr = arr.reshape(-1, 1)
    for s in range(0, len(arr), chunk):
        yield RecordBatch(path, KeyRange(name, s, min(s + chunk, len(arr))), np.ascontiguousarray(arr[s:s + chunk]))


def _read_npz(task, chunk, feature, limit):
    path = task["path"]
    try:
        with np.load(io.BytesIO(open_raw(path).read()), allow_pickle=False) as z:
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
    with open_raw(path) as raw:
        f = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")
        lineno = 0
        try:
            for lineno, line in enumerate(f, start=1):
                line = line.strip()
                if not line:
                    continue
                try:
                    row = csv_row(line)
                except ValueError:
                    if not seen_data and lineno == 1:
                        continue  # a header line
                    yield DeadLetter(path, record_key(name, lineno),
                                     f"{path}: line {lineno}: not a row of numbers: {line[:60]!r}")
                    continue
                seen_data = True
                if width is None:
                    width = row.size
                if row.size != width:
                    yield DeadLetter(path, record_key(name, lineno),
                                     f"{path}: line {lineno}: {row.size} values, expected {width}")
                    continue
                rows.append(row)
                keys.append(record_key(name, lineno))
                if len(rows) == chunk:
                    yield RecordBatch(path, keys, csv_records(np.stack(rows)))
                    rows, keys = [], []
                if limit is not None and len(keys) >= limit:
                    break
        except UnicodeDecodeError as e:
            if rows:
                yield RecordBatch(path, keys, csv_records(np.stack(rows)))
                rows, keys = [], []
            yield DeadLetter(path, f"{record_key(name, lineno + 1)}..",
                             f"{path}: not UTF-8 text after line {lineno} ({e})")
    if rows:
        yield RecordBatch(path, keys, csv_records(np.stack(rows)))


def _read_tfrecord(task, chunk, feature, limit):
    import tensorflow as tf

    path = task["path"]
    name = path.rsplit("/", 1)[-1]
    comp = "GZIP" if path.endswith(".gz") else ""
    ds = tf.data.TFRecordDataset(path, compression_type=comp, buffer_size=1 << 20)
    if _leads_with_block(ds):
        yield from _read_record_blocks(path, name, ds, chunk, limit)
        return
    if limit is not None:
        ds = ds.take(limit)
    index = 0
    schema = None
    for raw, error in tfrecord_chunks(ds, chunk):
        if len(raw):
            if schema is None:
                schema = _example_schema(path, raw[0], feature)
            yield from _parse_examples(path, name, raw, index, schema)
            index += len(raw)
        if error is not None:
            yield DeadLetter(path, f"{record_key(name, index)}..", f"{path}: truncated or corrupt TFRecord data after "
                                                             f"record {index} ({error})")
            return


def _leads_with_block(ds) -> bool:
    """Whether the first record of a TFRecordDataset is a record block (:func:`vaestream.shardset.record_block`,
    the decode job's default output); False for an empty or unreadable file (the record path reports it)."""
    import tensorflow as tf

    try:
        for raw in ds.take(1):
            f = shardset.example_features(raw.numpy())
            return shardset.is_record_block(f)
    except (tf.errors.OpError, ValueError, IndexError, UnicodeDecodeError):
        return False
    return False


def _read_record_blocks(path: str, name: str, ds, chunk: int, limit: int | None
                        ) -> Iterator[RecordBatch | DeadLetter]:
    """The records of a file of record blocks, ``chunk`` records per :class:`RecordBatch` (a block's keys as a
    :class:`KeyRange` where it stores a name and start); a block that does not parse becomes one dead letter
    (the file, the block and the reason) and the next is read; corrupt framing ends the file with one."""
    index, blocks = 0, 0
    for raw, error in tfrecord_chunks(ds, 1):
        for one in raw:
            try:
                block = shardset.parse_record_block(one, f"{path}: block {blocks} (after record {index})")
            except DataError as e:
                yield DeadLetter(path, f"{name}: block {blocks}", str(e))
                blocks += 1
                continue
            blocks += 1
            n = len(block) if limit is None else min(len(block), limit - index)
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                keys = (KeyRange(block.key_name, block.key_start + s, block.key_start + e) if block.keys is None
                        else block.keys[s:e])
                yield RecordBatch(path, keys, block.records[s:e])
            index += n
            if limit is not None and index >= limit:
                return
        if error is not None:
            yield DeadLetter(path, f"{name}: block {blocks}..", f"{path}: truncated or corrupt TFRecord data after "
                                                                 f"{blocks} blocks ({error})")
            return


def tfrecord_file_chunks(path: str, chunk: int):
    """As :func:`tfrecord_chunks` for one uncompressed TFRecord file, read in the calling thread by TensorFlow's
    record iterator (``tf.compat.v1.io.tf_record_iterator``: the framing and its CRC32C checks in C++), not
    through ``tf.data``: each ``tf.data`` step hands the read to TensorFlow's runtime threads and waits, and on
    cores shared with other work those hand-offs were seen to cost the decode job ~30 s of 85 at 1M records
    (``benchmarks/RESULTS_beam.md``). Yields (a list of <= ``chunk`` records, None), then on corruption the
    records before the bad one and the error text."""
    import tensorflow as tf

    try:
        it = iter(tf.compat.v1.io.tf_record_iterator(path))
    except tf.errors.OpError as e:
        raise DataError(f"unreadable TFRecord file ({e.message.splitlines()[0]})") from None
    buf: list[bytes] = []
    while True:
        try:
            buf.append(next(it))
        except StopIteration:
            break
        except tf.errors.DataLossError as e:
            yield buf, e.message.splitlines()[0]
            return
        except tf.errors.OpError as e:
            raise DataError(f"unreadable TFRecord file ({e.message.splitlines()[0]})") from None
        if len(buf) == chunk:
            yield buf, None
            buf = []
    if buf:
        yield buf, None


def tfrecord_chunks(ds, chunk: int):
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
                yield DeadLetter(path, record_key(name, index + j), f"{path}: record {index + j}: not a valid Example "
                                                              f"({e.message.splitlines()[0]})")
                continue
            yield from _parse_examples_ok(path, name, raw[j:j + 1], index + j, schema, one)
        return
    yield from _parse_examples_ok(path, name, raw, index, schema, ex)


def _parse_examples_ok(path, name, raw, index, schema, ex):
    import tensorflow as tf

    n = len(raw)
    if "key" in ex:
        keys = [k.decode() if k else record_key(name, index + j) for j, k in enumerate(ex["key"].numpy())]
    else:
        keys = [record_key(name, index + j) for j in range(n)]
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
                with open_raw(fp) as f:
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


class BatchCoder(beam.coders.Coder):
    """The coder of :class:`RecordBatch` / :class:`CodeBatch` PCollections: pickle, with a size estimate from
    the arrays' ``nbytes`` (the runner samples each output's element sizes: through pickle that copied every
    sampled batch, several MB each, ~1 ms)."""

    def encode(self, value) -> bytes:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)

    def decode(self, encoded: bytes):
        return pickle.loads(encoded)

    def estimate_size(self, value) -> int:
        if not isinstance(value, (RecordBatch, CodeBatch)):
            return len(self.encode(value))
        arrays = [getattr(value, a, None) for a in ("records", "mean", "log_scale")]
        size = sum(int(a.nbytes) for a in arrays if isinstance(a, np.ndarray))
        container = getattr(value, "container", None)
        return size + (len(container) if container is not None else 0) + 16 * len(value)

    def is_deterministic(self) -> bool:
        return False


beam.coders.registry.register_coder(RecordBatch, BatchCoder)
beam.coders.registry.register_coder(CodeBatch, BatchCoder)


class _ReadFn(beam.DoFn):
    def __init__(self, chunk_size: int, feature: str, csv_width: int | None, check: "ValidateFn | None" = None):
        self.chunk_size = chunk_size
        self.feature = feature
        self.csv_width = csv_width
        self.check = check  # a Validate's DoFn, applied to each batch as it is read, or None
        self.records_in = job_counter("records_in")
        self.bytes_in = job_counter("bytes_in")

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
                | "Read" >> beam.ParDo(_ReadFn(self.chunk_size, self.feature, self.csv_width, check))
                .with_output_types(RecordBatch).with_outputs(DEAD_LETTER, main=RECORDS))
