"""Encode and decode transforms (model inference on record / code batches) and the readers of code files."""

from __future__ import annotations

import io
import os
from typing import Iterator, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import RunInference

from vaestream.beam.elements import (CHUNK, DEAD_LETTER, RECORDS, CodeBatch, DeadLetter, RecordBatch,
                                     job_counter, record_key)
from vaestream.beam.formats import file_size, open_raw, split_specs
from vaestream.beam.model_handler import VAEModelHandler, round_uint8
from vaestream.beam.readers import tfrecord_chunks, tfrecord_file_chunks
from vaestream.errors import DataError
from vaestream.example_wire import leading_records


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
                 coder: bool = False, overlap: bool = False, levels: int | None = None,
                 reconstruction: str = "level", rdo_lmbda: float | None = None):
        super().__init__()
        self.handler = VAEModelHandler(model_dir, saved_model, "encode", max_records, coder, levels, reconstruction,
                                       rdo_lmbda)
        self.overlap = overlap

    def expand(self, pcoll):
        if not self.overlap:  # (typed: the batches' coder estimates their sizes from their arrays)
            return pcoll | "RunInference" >> RunInference(self.handler).with_output_types(CodeBatch)
        return (pcoll
                | "BatchElements" >> beam.BatchElements(**self.handler.batch_elements_kwargs())
                | "InferAhead" >> beam.ParDo(_InferAheadFn(self.handler)))


def quantize_batch(batch: RecordBatch, dtype: str) -> RecordBatch:
    """Reconstructions -> the decode job's output dtype. Float batches (model outputs x in [0, 1]): uint8
    stores round(255 x), float32 keeps x. Integer batches (a lossless stream's exact counts, model input =
    counts * scale): uint8 keeps the counts, float32 stores the model inputs counts * scale."""
    if np.issubdtype(batch.records.dtype, np.integer):
        if dtype == "uint8":  # (uint8 already, e.g. decoded with the rounding in the model: no copy)
            return RecordBatch(batch.source, batch.keys, batch.records.astype(np.uint8, copy=False), batch.scale)
        return RecordBatch(batch.source, batch.keys, batch.inputs().reshape(batch.records.shape), 1.0)
    if dtype == "uint8":
        return RecordBatch(batch.source, batch.keys, round_uint8(batch.records), 1.0 / 255.0)
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
        # (uint8: float codes are rounded inside the model's decoder, LoadedVAE.decode_uint8)
        self.handler = VAEModelHandler(model_dir, saved_model, "decode", max_records, output_dtype=output_dtype)
        self.output_dtype = output_dtype
        self.overlap = overlap

    def expand(self, pcoll):
        if self.overlap:  # as Encode: the next batch decodes on a thread while the last one is written
            out = (pcoll
                   | "BatchElements" >> beam.BatchElements(**self.handler.batch_elements_kwargs())
                   | "InferAhead" >> beam.ParDo(_InferAheadFn(self.handler)))
        else:
            out = pcoll | "RunInference" >> RunInference(self.handler).with_output_types(RecordBatch)
        # (float32 too: a lossless stream decodes to integer counts)
        return out | "OutputDtype" >> beam.Map(quantize_batch, self.output_dtype).with_output_types(RecordBatch)


def code_files(specs: str | Sequence[str]) -> list[str]:
    """The code files (``.tfrecord`` / ``.parquet``) that ``specs`` name (files, globs or directories)."""
    out: list[str] = []
    for spec in split_specs(specs):
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
        with open_raw(path) as f:
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


def _first_record(path: str) -> bytes | None:
    """The first record of a TFRecord file, or None (empty or unreadable: the full read reports why)."""
    try:
        for raw, error in tfrecord_file_chunks(path, 1):
            return raw[0] if raw else None
    except DataError:
        return None
    return None


def _read_codes_tfrecord(path: str, chunk_size: int):
    name = path.rsplit("/", 1)[-1]
    first = _first_record(path)
    spec = _code_spec(path, first) if first is not None else None
    # a block Example holds a whole batch of records: read one at a time, not chunk_size of them
    per_read = 1 if spec is not None and _is_block(spec) else chunk_size
    index = 0  # records (not Examples) read so far
    for raw, error in tfrecord_file_chunks(path, per_read):  # (read in this thread, not by tf.data's)
        if error is not None:
            if len(raw):
                for b in _code_batches(path, raw, spec, index):
                    index += len(b)
                    yield b
            yield DeadLetter(path, f"{record_key(name, index)}..", f"{path}: truncated or corrupt TFRecord data after "
                                                             f"record {index} ({error})")
            return
        if spec is None:
            spec = _code_spec(path, raw[0])
        for b in _code_batches(path, raw, spec, index):
            index += len(b)
            yield b


def _is_block(spec: dict) -> bool:
    return "records" in spec and "mean" in spec


def _code_spec(path: str, first: bytes) -> dict:
    import tensorflow as tf

    f = tf.train.Example.FromString(first).features.feature
    if "keys" in f and "code" in f and "fingerprint" in f:  # coded: one Example per batch
        return {"keys": tf.io.VarLenFeature(tf.string), "records": tf.io.FixedLenFeature([], tf.int64),
                "fingerprint": tf.io.FixedLenFeature([], tf.string), "code": tf.io.FixedLenFeature([], tf.string)}
    if "mean" not in f or "log_scale" not in f or "fingerprint" not in f:
        raise DataError(f"{path}: records are not vaestream codes (need mean, log_scale, fingerprint; or keys, "
                        "code, fingerprint)")
    if "records" in f:  # the block layout: one Example per batch of float codes
        return {"records": tf.io.FixedLenFeature([], tf.int64), "fingerprint": tf.io.FixedLenFeature([], tf.string),
                "mean": tf.io.VarLenFeature(tf.float32), "log_scale": tf.io.VarLenFeature(tf.float32),
                "key_name": tf.io.FixedLenFeature([], tf.string, default_value=b""),
                "key_start": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
                "keys": tf.io.VarLenFeature(tf.string)}
    nz = len(f["mean"].float_list.value)
    return {"key": tf.io.FixedLenFeature([], tf.string), "mean": tf.io.FixedLenFeature([nz], tf.float32),
            "log_scale": tf.io.FixedLenFeature([nz], tf.float32), "fingerprint": tf.io.FixedLenFeature([], tf.string)}


def _code_batches(path: str, raw, spec: dict | None, index: int = 0) -> Iterator[CodeBatch]:
    import tensorflow as tf

    spec = spec or _code_spec(path, raw[0])
    if _is_block(spec):  # parsed in Python: mean and log_scale are views of the bytes read, no TF parse
        from vaestream.beam.sinks import read_block_example

        for r in raw:
            b = read_block_example(r, path, index)
            index += len(b)
            yield b
        return
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


def _block_record_counts(path: str) -> int | None:
    """Records in a file of block Examples from the first bytes of each (the TFRecord framing's lengths lead
    from one to the next: the floats are not read); None when a record does not start with its ``records``
    feature or the framing does not end at the file's end (the caller then parses the file)."""
    import struct

    size = file_size(path)
    total, pos = 0, 0
    with open_raw(path) as f:
        while True:
            if size is None or pos >= size:
                return total if pos == size else None  # (a last record cut short: parsed, and refused, there)
            f.seek(pos)
            head = f.read(12 + 64)
            if len(head) < 12:
                return None
            (length,) = struct.unpack_from("<Q", head)
            n = leading_records(head[12:12 + min(length, 64)])
            if n is None:
                return None
            total += n
            pos += 16 + length


def count_codes(path: str) -> int:
    """Records in one code file: per-record TFRecord codes from the framing alone; block codes from each
    block's ``records`` feature (the float lists are not decoded); coded batches and Parquet as read."""
    if path.endswith(".parquet"):
        return sum(len(b) for b in read_codes(path) if isinstance(b, CodeBatch))
    import tensorflow as tf

    from vaestream import shardset

    first = _first_record(path)
    spec = _code_spec(path, first) if first is not None else None
    if spec is None or "key" in spec:
        return shardset.count_records([path])[path]
    if not _is_block(spec):
        return sum(len(b) for b in read_codes(path) if isinstance(b, CodeBatch))
    fast = _block_record_counts(path)
    if fast is not None:
        return fast
    total = 0
    for raw, error in tfrecord_chunks(tf.data.TFRecordDataset(path, buffer_size=1 << 20), 64):
        if len(raw):
            total += int(tf.io.parse_example(tf.constant(list(raw), tf.string),
                                             {"records": tf.io.FixedLenFeature([], tf.int64)})["records"].numpy().sum())
        if error is not None:
            raise DataError(f"{path}: truncated or corrupt TFRecord data ({error})")
    return total


class _ReadCodesFn(beam.DoFn):
    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size
        self.records_in = job_counter("records_in")
        self.bytes_in = job_counter("bytes_in")

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
                | "ReadCodes" >> beam.ParDo(_ReadCodesFn(self.chunk_size)).with_output_types(CodeBatch)
                .with_outputs(DEAD_LETTER, main=RECORDS))


def first_code(paths: Sequence[str]) -> CodeBatch | None:
    """The first code in ``paths`` (for a check before a decode job starts)."""
    for p in paths:
        try:
            for item in read_codes(p, chunk_size=1):
                if isinstance(item, CodeBatch):
                    return item
                break
        except DataError:
            continue
    return None


def first_fingerprint(paths: Sequence[str]) -> str | None:
    """The fingerprint of the first code in ``paths`` (for a check before a decode job starts)."""
    first = first_code(paths)
    return first.fingerprint if first is not None else None
