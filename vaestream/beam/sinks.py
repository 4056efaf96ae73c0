"""Sinks and schemas: batched TFRecord / Parquet writers (temp file + rename), code and record schemas, dead letters."""

from __future__ import annotations

import json
import os
import uuid
from typing import Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io import filebasedsink
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from vaestream import shardset
from vaestream.beam.elements import CodeBatch, DeadLetter, KeyRange, job_counter
from vaestream.errors import DataError


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
    """RecordBatch / CodeBatch -> a list of serialized Examples (counts records and bytes); float codes in
    ``code_layout`` (:func:`code_examples`), records in ``recon_layout`` (:func:`vaestream.shardset.recon_examples`:
    one Example per record, or one per batch)."""

    def __init__(self, code_layout: str = "record", recon_layout: str = "record"):
        self.code_layout = code_layout
        self.recon_layout = recon_layout
        self.records = job_counter("records")
        self.bytes_out = job_counter("bytes_out")

    def process(self, batch):
        if isinstance(batch, CodeBatch):
            out = code_examples(batch, self.code_layout)
        else:
            out = shardset.recon_examples(batch.keys, batch.records, self.recon_layout)
        self.records.inc(len(batch))
        self.bytes_out.inc(sum(map(len, out)) + 16 * len(out))  # 16: TFRecord framing (length, 2 CRCs)
        yield out


def code_examples(batch: CodeBatch, layout: str = "record") -> list[bytes]:
    """Serialized code Examples. Float codes: ``layout="record"``, one per record (key, mean and log_scale as
    float lists of Nz, fingerprint); ``layout="block"``, one for the whole batch (:func:`block_example`). A
    coded batch: one Example for the whole batch (keys, records, fingerprint, code)."""
    if layout not in ("record", "block"):
        raise DataError(f"code layout {layout!r} is not one of block, record")
    if not batch.coded and layout == "block":
        return [block_example(batch)] if len(batch) else []
    if batch.coded:
        import tensorflow as tf

        f = tf.train.Feature
        return [tf.train.Example(features=tf.train.Features(feature={
            "keys": f(bytes_list=tf.train.BytesList(value=[k.encode() for k in batch.keys])),
            "records": f(int64_list=tf.train.Int64List(value=[len(batch)])),
            "fingerprint": f(bytes_list=tf.train.BytesList(value=[batch.fingerprint.encode()])),
            "code": f(bytes_list=tf.train.BytesList(value=[batch.container]))})).SerializeToString()]
    return shardset.serialize_examples(
        batch.keys, floats={"mean": batch.mean, "log_scale": batch.log_scale},
        constants={"fingerprint": shardset.bytes_feature([batch.fingerprint.encode()])})


def block_example(batch: CodeBatch) -> bytes:
    """One serialized Example holding a float CodeBatch of ``n`` records (the block layout, FORMAT.md §8):
    ``records`` int64 = n; ``mean``, ``log_scale`` float lists of n x Nz values (row-major [n, Nz]);
    ``fingerprint`` bytes, once; the keys as ``key_name`` bytes + ``key_start`` int64 when they are a
    :class:`~vaestream.beam.elements.KeyRange` (key i = ``NAME:`` + the offset start + i in 9 digits), else
    ``keys`` bytes x n. The float payloads are the arrays' bytes, copied once (into the returned bytes)."""
    n = len(batch)
    mean = np.ascontiguousarray(batch.mean, "<f4").reshape(n, -1)
    ls = np.ascontiguousarray(batch.log_scale, "<f4").reshape(n, -1)
    parts = [shardset.entry("records", shardset.int64_feature([n])),
             shardset.entry("fingerprint", shardset.bytes_feature([batch.fingerprint.encode()]))]
    if isinstance(batch.keys, KeyRange):
        parts += [shardset.entry("key_name", shardset.bytes_feature([batch.keys.name.encode()])),
                  shardset.entry("key_start", shardset.int64_feature([batch.keys.start]))]
    else:
        parts.append(shardset.entry("keys", shardset.bytes_feature([k.encode() for k in batch.keys])))
    for name, arr in (("mean", mean), ("log_scale", ls)):
        parts += [shardset.float_entry_head(name, arr.nbytes), memoryview(arr).cast("B")]
    body = sum(len(p) for p in parts)
    return b"".join([b"\x0a" + shardset.leb128(body)] + parts)


def read_block_example(raw: bytes, path: str, index: int = 0) -> CodeBatch:
    """The CodeBatch of one serialized float code block (:func:`block_example`), parsed in Python: ``mean`` and
    ``log_scale`` are views of ``raw``, no copy. ``index``: records of the file before it (for the message).
    Raises :class:`DataError` naming ``path`` for a block that is not one: not an Example, float counts not
    ``records`` x Nz each, keys neither a name + start nor ``records`` listed."""
    where = f"{path}: code block after record {index}"
    try:
        f = shardset.example_features(raw)
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: malformed code Example ({e})") from None
    kinds = {name: f.get(name, ("none", []))[0] for name in ("records", "mean", "log_scale", "fingerprint")}
    if kinds != {"records": "int64", "mean": "float", "log_scale": "float", "fingerprint": "bytes"}:
        raise DataError(f"{where}: not a code block (features {kinds})")
    ns, mean, ls, fps = (f[name][1] for name in ("records", "mean", "log_scale", "fingerprint"))
    n = ns[0] if len(ns) == 1 else 0
    if n <= 0 or len(mean) % n or len(ls) != len(mean) or len(fps) != 1:
        raise DataError(f"{where}: {n} records with {len(mean)} mean and {len(ls)} log_scale values (need n x Nz "
                        "of each) and one fingerprint")
    names, starts = f.get("key_name", ("none", []))[1], f.get("key_start", ("none", []))[1]
    keys = f.get("keys", ("none", []))[1]
    if len(names) == 1 and len(starts) == 1 and starts[0] >= 0 and len(names[0]):
        ks = KeyRange(bytes(names[0]).decode(), starts[0], starts[0] + n)
    elif len(keys) == n:
        ks = [bytes(k).decode() for k in keys]
    else:
        raise DataError(f"{where}: {n} records but {len(keys)} keys and no key_name + key_start")
    return CodeBatch(path, ks, mean.astype(np.float32, copy=False).reshape(n, -1),
                     ls.astype(np.float32, copy=False).reshape(n, -1), bytes(fps[0]).decode())


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
        self.records = job_counter("records")
        self.bytes_out = job_counter("bytes_out")

    def process(self, batch):
        import pyarrow as pa

        if isinstance(batch, CodeBatch) and batch.coded:
            if "code" not in self.schema.names:
                raise DataError(f"{batch.source}: coded batches need the coded schema (code_schema(coded=True))")
            cols = [pa.array([list(batch.keys)], pa.list_(pa.string())), pa.array([len(batch)], pa.int32()),
                    pa.array([batch.fingerprint], pa.string()), pa.array([batch.container], pa.binary())]
        elif isinstance(batch, CodeBatch):
            cols = [pa.array(list(batch.keys), pa.string()), _fixed_list(batch.mean.astype(np.float32)),
                    _fixed_list(batch.log_scale.astype(np.float32)),
                    pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(batch), np.int32)),
                                                   pa.array([batch.fingerprint])).cast(pa.string())]
        else:
            cols = [pa.array(list(batch.keys), pa.string()), _fixed_list(batch.records.reshape(len(batch), -1))]
        table = pa.Table.from_arrays(cols, schema=self.schema)
        self.records.inc(len(batch))
        self.bytes_out.inc(int(table.nbytes))
        yield table


class WriteBatches(beam.PTransform):
    """Write RecordBatch or CodeBatch elements as TFRecord (Examples) or Parquet files.

    Files are ``{prefix}-SSSSS-of-NNNNN.tfrecord`` / ``.parquet``. Returns the PCollection of final file
    names. ``schema`` (a ``pyarrow.Schema``, see :func:`code_schema` / :func:`record_schema`) is needed for
    Parquet. ``code_layout``: TFRecord float codes one Example per record or per batch (:func:`code_examples`);
    ``recon_layout``: TFRecord records (RecordBatch) the same (:func:`vaestream.shardset.recon_examples`).
    """

    def __init__(self, prefix: str, output_format: str = "tfrecord", schema=None, num_shards: int = 0,
                 code_layout: str = "record", recon_layout: str = "record"):
        super().__init__()
        if output_format not in ("tfrecord", "parquet"):
            raise DataError(f"output format {output_format!r} is not one of tfrecord, parquet")
        if output_format == "parquet" and schema is None:
            raise DataError("Parquet output needs a schema")
        self.prefix, self.output_format, self.schema, self.num_shards = prefix, output_format, schema, num_shards
        self.code_layout = code_layout
        if recon_layout not in shardset.RECON_LAYOUTS:
            raise DataError(f"record layout {recon_layout!r} is not one of {', '.join(shardset.RECON_LAYOUTS)}")
        self.recon_layout = recon_layout

    def expand(self, pcoll):
        if self.output_format == "tfrecord":
            return (pcoll
                    | "SerializeExamples" >> beam.ParDo(_ToExamples(self.code_layout, self.recon_layout))
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
        counter = job_counter("dead_lettered")

        def to_json(d: DeadLetter) -> str:
            counter.inc(1)
            return d.to_json()

        return (pcoll
                | "DeadLetterToJson" >> beam.Map(to_json)
                | "WriteDeadLetterFile" >> beam.io.WriteToText(self.path, shard_name_template=""))


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` (any Beam file system) through a temporary dotfile in the same folder and a
    rename: a reader never sees a torn file, and a rerun of the same task replaces the file with the same
    bytes. (Object stores have no fsync; :func:`vaestream.binio.atomic_write` is the local-disk one.)"""
    tmp = f"{os.path.dirname(path)}/.tmp-{uuid.uuid4().hex}"
    with FileSystems.create(tmp) as f:
        f.write(data)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def write_outputs(batches, dead, out: str, name: str, output_format: str, schema, num_shards: int, label: str,
                  code_layout: str = "record", recon_layout: str = "record") -> None:
    """A batch job's two outputs: ``batches`` as ``OUT/NAME-*`` files (step ``label``; ``schema`` is used for
    Parquet only; ``code_layout`` for TFRecord float codes, ``recon_layout`` for TFRecord records), the dead
    letters as ``OUT/dead_letter.jsonl`` (step ``WriteDeadLetters``)."""
    schema = schema if output_format == "parquet" else None
    batches | label >> WriteBatches(f"{out}/{name}", output_format, schema, num_shards, code_layout, recon_layout)
    dead | "WriteDeadLetters" >> WriteDeadLetters(f"{out}/{shardset.DEAD_LETTER}")
