"""Sharded TFRecord data sets for training at scale: read them through ``tf.data`` and train on them.

:func:`read_shards` streams a shard set (the output of ``pipelines/prepare.py``, laid out as
:mod:`vaestream.shardset` describes) through ``tf.data`` (interleaved files, a bounded shuffle buffer,
batching, parallel parsing, prefetch): memory is bounded by the shuffle buffer, not by the data size.
:func:`train_from_shards` trains a model on a shard set with :class:`vaestream.training.Trainer`.

:func:`read_records` reads whole shard files into memory (a distributed worker's share). The wire format and
the manifest are :mod:`vaestream.shardset`'s; the prepare job that writes a shard set is
:mod:`vaestream.beam.jobs.prepare`.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from vaestream.errors import ConfigError, DataError
from vaestream import shardset

# ---------------------------------------------------------------------------------------------------------
# reading with tf.data
# ---------------------------------------------------------------------------------------------------------
def _resolve_files(source: str | Path | Sequence[str]) -> tuple[list[str], shardset.Manifest | None]:
    """The TFRecord files of ``source`` (a list, a shard set's manifest or directory, a decode job's output
    directory: its ``recon-*.tfrecord``, or a glob) and the shard set's manifest, if any."""
    import tensorflow as tf

    if isinstance(source, (list, tuple)):
        return [str(s) for s in source], None
    s = str(source)
    if shardset.is_shard_spec(s):
        m = shardset.read_manifest(s)
        return m.shard_paths(), m
    if "://" not in s and Path(s).is_dir() and (Path(s) / "summary.json").is_file():
        _recon_layout(Path(s) / "summary.json")
        files = sorted(tf.io.gfile.glob(str(Path(s) / "recon-*.tfrecord")))
        if not files:
            raise DataError(f"{s}: a job's output directory without recon-*.tfrecord files")
        return files, None
    files = sorted(tf.io.gfile.glob(s))
    if not files:
        raise DataError(f"{s}: no shard files match")
    return files, None


def _recon_layout(summary: Path) -> str:
    """The record layout a decode job's ``summary.json`` names (``recon_layout``, absent in outputs written
    before it existed: ``record/1``); DataError for a version this reader does not know."""
    import json

    try:
        d = json.loads(summary.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{summary}: unreadable job summary ({e})") from None
    version = d.get("recon_layout", shardset.RECON_LAYOUT_VERSIONS["record"]) if isinstance(d, dict) else None
    if version not in shardset.RECON_LAYOUT_VERSIONS.values():
        raise DataError(f"{summary}: record layout {version!r} is not one this reader knows "
                        f"({', '.join(shardset.RECON_LAYOUT_VERSIONS.values())})")
    return version.split("/")[0]


def _first_raw(path: str) -> bytes:
    import tensorflow as tf

    try:
        for raw in tf.data.TFRecordDataset(path).take(1):
            return raw.numpy()
    except tf.errors.OpError as e:
        raise DataError(f"{path}: unreadable shard file ({e.message.splitlines()[0]})") from None
    raise DataError(f"{path}: empty shard file")


def _probe(files: Sequence[str], manifest: shardset.Manifest | None) -> tuple[tuple[int, ...], str, str]:
    """(record shape, dtype name, layout) of the first of ``files`` that holds a record (a shard set may hold
    empty shards; with a manifest and no record at all: the manifest's, ``record``)."""
    for i, path in enumerate(files):
        if manifest is None or i == len(files) - 1 or _size(path) > 0:
            try:
                return _probe_first(path)
            except DataError:
                if manifest is None or _size(path) > 0:
                    raise
    return tuple(manifest.shape), manifest.dtype, "record"


def _size(path: str) -> int:
    import tensorflow as tf

    return int(tf.io.gfile.stat(path).length)


def _probe_first(path: str) -> tuple[tuple[int, ...], str, str]:
    """(record shape, dtype name, layout ``record`` or ``block``) of a shard file, from its first Example."""
    raw = _first_raw(path)
    try:
        f = shardset.example_features(raw)
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: records are not tf.train.Example ({e})") from None
    if shardset.is_record_block(f):
        block = shardset.parse_record_block(raw, f"{path}: block 0")
        return tuple(block.records.shape[1:]), block.records.dtype.name, "block"
    if "data" not in f or "shape" not in f or "dtype" not in f or f["dtype"][0] != "bytes" or not f["dtype"][1]:
        raise DataError(f"{path}: records are not vaestream shard Examples (need data, shape, dtype; or a record "
                        "block: records, data, shape, dtype)")
    return tuple(int(v) for v in f["shape"][1]), bytes(f["dtype"][1][0]).decode(), "record"


def _parse_blocks(tf_dtype, shape: tuple[int, ...], with_keys: bool):
    """A ``tf.data`` map function: (one serialized record block, its file name) -> (keys [n] string,
    records [n, *shape]) (:func:`vaestream.shardset.record_block`); a block whose data is not n x D values
    fails the pipeline with an InvalidArgumentError naming the file."""
    import tensorflow as tf

    dim = int(np.prod(shape))
    spec = {"records": tf.io.FixedLenFeature([], tf.int64), "data": tf.io.FixedLenFeature([], tf.string),
            "key_name": tf.io.FixedLenFeature([], tf.string, default_value=""),
            "key_start": tf.io.FixedLenFeature([], tf.int64, default_value=-1), "keys": tf.io.VarLenFeature(tf.string)}

    def parse(raw, file_name):
        ex = tf.io.parse_single_example(raw, spec)
        n = ex["records"]
        x = tf.io.decode_raw(ex["data"], tf_dtype, little_endian=True)
        size = tf.size(x, out_type=tf.int64)
        ok = tf.debugging.Assert(tf.logical_and(n > 0, tf.equal(size, n * dim)),
                                 ["vaestream DataError:", file_name, "a record block of", n, "records holds", size,
                                  f"values, not records x {dim}"])
        with tf.control_dependencies([ok]):
            x = tf.reshape(x, tf.concat([[n], tf.constant(shape, tf.int64)], 0))
        if not with_keys:
            return tf.fill([n], ""), x
        ranged = tf.strings.join([ex["key_name"], tf.strings.as_string(ex["key_start"] + tf.range(n), width=9,
                                                                        fill="0")], separator=":")
        keys = tf.cond(ex["key_start"] >= 0, lambda: ranged, lambda: tf.sparse.to_dense(ex["keys"]))
        return keys, x

    return parse


def read_shards(source: str | Path | Sequence[str], batch_size: int = 100, shuffle_buffer: int = 10000,
                seed: int | None = 0, repeat: bool = False, drop_remainder: bool = False, scaled: bool = False,
                with_keys: bool = False, cycle_length: int = 4, prefetch: int = 2):
    """Stream a shard set as a ``tf.data.Dataset`` of minibatches.

    The pipeline: shard file names (shuffled when ``shuffle_buffer > 0``) -> ``interleave`` of
    ``cycle_length`` TFRecord readers -> record-level ``shuffle(shuffle_buffer)`` -> ``batch(batch_size)`` ->
    vectorised ``parse_example`` + ``decode_raw`` -> ``prefetch``. Memory is O(shuffle_buffer + batch_size *
    prefetch) records whatever the data size. Files of record blocks (the decode job's default output: one
    Example per batch of n records, :func:`vaestream.shardset.record_block`) are told apart by their first
    Example's features; each block is parsed as a whole ([n, *shape] from one ``decode_raw``), its records
    unbatched into the same shuffle and batching (the interleave takes one block from each file in turn; a
    block whose data is not n x D values fails the dataset with an InvalidArgumentError naming the file).

    Args:
      source: a ``manifest.json``, a shard directory, a glob of shard files, a list of shard paths, or a
        decode job's output directory (its ``recon-*.tfrecord``; ``summary.json`` names the layout).
      batch_size: M records per element.
      shuffle_buffer: records in the shuffle buffer (0: file order, no shuffling).
      seed: seeds the file and record shuffles (None: a fresh order every run).
      repeat: repeat forever (each pass reshuffled).
      drop_remainder: drop a last batch shorter than ``batch_size``.
      scaled: yield float32 model inputs ``[B, D]`` (``data * scale``) instead of stored records.
      with_keys: yield ``(keys [B] string, records)`` pairs.

    Returns:
      a dataset of ``records [B, *shape]`` in the stored dtype (or ``[B, D]`` float32 if ``scaled``),
      or ``(keys, records)``.
    """
    import tensorflow as tf

    files, manifest = _resolve_files(source)
    shape, dtype, layout = _probe(files, manifest)
    if manifest is not None:
        shape, dtype, scale = manifest.shape, manifest.dtype, manifest.scale
    else:
        scale = 1.0 / 255.0 if np.issubdtype(np.dtype(dtype), np.integer) else 1.0
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    tf_dtype = tf.as_dtype(np.dtype(dtype))
    dim = int(np.prod(shape))
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_buffer:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    cycle = max(1, min(cycle_length, len(files)))
    if layout == "block":  # blocks -> (key, record) elements, then as the record layout's records
        parse_block = _parse_blocks(tf_dtype, tuple(shape), with_keys)
        ds = ds.interleave(lambda f: tf.data.TFRecordDataset(f, buffer_size=1 << 20).map(
            lambda raw: parse_block(raw, f)), cycle_length=cycle, block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
    else:
        ds = ds.interleave(lambda f: tf.data.TFRecordDataset(f, buffer_size=1 << 20), cycle_length=cycle,
                           block_length=16, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    spec = {"key": tf.io.FixedLenFeature([], tf.string), "data": tf.io.FixedLenFeature([], tf.string)}

    def parse(serialized, x=None):
        if x is None:  # the record layout: a batch of serialized Examples
            ex = tf.io.parse_example(serialized, spec)
            serialized, x = ex["key"], tf.io.decode_raw(ex["data"], tf_dtype, little_endian=True)
        if scaled:
            x = tf.reshape(tf.cast(x, tf.float32) * scale, [-1, dim])
        else:
            x = tf.reshape(x, tf.concat([[-1], tf.constant(shape, tf.int32)], 0))
        return (serialized, x) if with_keys else x

    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(prefetch)


def read_records(paths: Sequence[str], shape: Sequence[int], dtype: str, batch_size: int = 65536) -> np.ndarray:
    """Every record of the shard files ``paths``, file after file and in file order, as one ``[n, *shape]``
    array of the stored ``dtype`` (the manifest's). For a share that fits in memory (a
    :mod:`vaestream.distributed` worker's); :func:`read_shards` streams instead. Reads both layouts (one Example
    per record, or record blocks: :func:`vaestream.shardset.record_block`), told apart by each file's first
    Example.

    Raises:
      DataError: a file is not a readable shard file (corrupt or truncated TFRecord data, records of
        another shape or dtype, a block that does not parse); the message names the file.
    """
    import tensorflow as tf

    shape, dt = tuple(int(v) for v in shape), np.dtype(dtype)
    tf_dtype = tf.as_dtype(dt)
    spec = {"data": tf.io.FixedLenFeature([], tf.string)}
    parts = []
    for path in paths:
        try:
            if _size(str(path)) and _probe_first(str(path))[2] == "block":
                parts += _read_blocks(str(path), shape, dt)
                continue
            for raw in tf.data.TFRecordDataset(str(path), buffer_size=1 << 20).batch(batch_size):
                data = tf.io.parse_example(raw, spec)["data"]
                parts.append(tf.io.decode_raw(data, tf_dtype, little_endian=True).numpy().reshape((-1,) + shape))
        except (tf.errors.OpError, ValueError) as e:
            msg = (e.message if isinstance(e, tf.errors.OpError) else str(e)).split("}}")[-1].strip()
            raise DataError(f"{path}: unreadable shard file ({msg.splitlines()[0]})") from None
    return np.concatenate(parts) if parts else np.zeros((0,) + shape, dt)


def _read_blocks(path: str, shape: tuple[int, ...], dtype: np.dtype) -> list[np.ndarray]:
    """The records of each block of a file of record blocks; DataError naming the file and block for a block
    that does not parse or holds records of another shape or dtype."""
    import tensorflow as tf

    out = []
    for i, raw in enumerate(tf.data.TFRecordDataset(path, buffer_size=1 << 20).as_numpy_iterator()):
        block = shardset.parse_record_block(raw, f"{path}: block {i}")
        if block.records.shape[1:] != shape or block.records.dtype != dtype:
            raise DataError(f"{path}: block {i} holds {block.records.shape[1:]} {block.records.dtype.name} records, "
                            f"expected {shape} {dtype.name}")
        out.append(block.records)
    return out


# ---------------------------------------------------------------------------------------------------------
# training on shards
# ---------------------------------------------------------------------------------------------------------
def _epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def train_from_shards(manifest: str | Path, model_dir: str | Path, config=None, train_config=None,
                      valid_data=None, test_data=None, progress: bool = True, shuffle_buffer: int = 10000,
                      on_eval=None):
    """Train a VAE with AEVB on minibatches streamed from a shard set (see :func:`read_shards`).

    The same loop as :func:`vaestream.training.train` (same :class:`~vaestream.training.Trainer`, compiled
    chunks of ``K = steps_per_call`` minibatches of ``M = batch_size`` records, checkpoints, ``log.jsonl``),
    but the data never sits in memory: epoch ``e`` reads the shards in a shuffled order seeded by
    ``(seed, e)`` through a bounded shuffle buffer, and each epoch yields ``floor(N / M)`` full minibatches.
    A resumed run skips the steps already taken in its epoch, so it sees the same minibatches as an
    uninterrupted run.

    Args:
      manifest: a shard set's ``manifest.json`` or directory.
      model_dir, config, train_config, valid_data, test_data, progress, on_eval: as in
        :func:`vaestream.training.train` (``valid_data``/``test_data`` are in-memory ``Dataset`` objects).
        ``train_config.validation`` must be 0 and ``binarize`` ``none`` or ``dynamic`` (a held-out split and a
        static binarisation need random access: prepare them as separate shard sets instead).
      shuffle_buffer: records in the record-level shuffle buffer.

    Returns:
      a :class:`vaestream.training.TrainResult`.
    """
    import tensorflow as tf

    from vaestream.data import Dataset
    from vaestream.training import TrainConfig, evaluation_set, fit, prepare_model_dir

    cfg = train_config or TrainConfig()
    if cfg.validation:
        raise ConfigError("train_from_shards: validation > 0 needs random access; prepare a separate validation "
                          "shard set and pass it as valid_data")
    if cfg.binarize == "static":
        raise ConfigError("train_from_shards: static binarisation needs the whole data set; use 'dynamic' or "
                          "binarise in the prepare job")
    man = shardset.read_manifest(manifest)
    config = prepare_model_dir(model_dir, config, man.shape, cfg, str(man.path))
    bounded = config.likelihood in ("bernoulli", "gaussian_sigmoid", "beta_binomial")
    if bounded and (man.value_min * man.scale < 0 or man.value_max * man.scale > 1 + 1e-6):
        raise DataError(f"{man.path}: values span [{man.value_min * man.scale:g}, {man.value_max * man.scale:g}] "
                        f"after scaling, outside the support [0, 1] of the {config.likelihood} decoder")
    m, n, k_max = cfg.batch_size, man.records, cfg.steps_per_call
    if n // m < 1:
        raise ConfigError(f"{man.path}: {n} records is fewer than one minibatch of {m}")
    total = cfg.total_steps(n)
    evals = {}
    n_eval = min(cfg.eval_records, n)
    if n_eval:
        first = np.concatenate([b.numpy() for b in read_shards(man.path, batch_size=min(n_eval, 10000),
                                                               shuffle_buffer=0).take(
            math.ceil(n_eval / min(n_eval, 10000)))])[:n_eval]
        evals["train"] = evaluation_set(Dataset(first, man.scale, cfg.binarize, "shards[train-eval]"))
    for name, d in (("valid", valid_data), ("test", test_data)):
        if d is not None:
            evals[name] = evaluation_set(d)

    def chunks(start: int, steps_per_epoch: int):
        s = start
        while s < total:
            epoch, pos = divmod(s, steps_per_epoch)
            steps_here = min(steps_per_epoch, total - epoch * steps_per_epoch)
            ds = read_shards(man.path, batch_size=m, shuffle_buffer=shuffle_buffer, seed=_epoch_seed(cfg.seed, epoch),
                             drop_remainder=True).take(steps_here).skip(pos)
            ds = ds.map(lambda x: tf.reshape(x, [m, man.dim])).batch(k_max).prefetch(2)
            for chunk in ds:
                yield s, chunk
                s += int(chunk.shape[0])

    return fit(model_dir, config, cfg, n, man.scale, chunks, evals, progress, desc="train (shards)", on_eval=on_eval)

