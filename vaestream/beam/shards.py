"""Shard writing: shuffle record batches into a shard set and write its manifest (:class:`WriteShards`)."""

from __future__ import annotations

from typing import Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from vaestream import shardset
from vaestream.beam.elements import RecordBatch
from vaestream.beam.sinks import WriteBatches, write_atomic
from vaestream.errors import DataError


def _stable_seed(*parts) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class Scatter(beam.DoFn):
    def __init__(self, buckets: int, seed: int):
        self.buckets, self.seed = buckets, seed

    def process(self, batch: RecordBatch):
        rng = np.random.default_rng(_stable_seed(self.seed, batch.source, batch.keys[0]))
        where = rng.integers(0, self.buckets, len(batch))
        for b in np.unique(where):
            yield int(b), batch.take(where == b)


def gather_bucket(item, seed: int) -> RecordBatch:
    bucket, parts = item
    parts = sorted(parts, key=lambda p: p.keys[0])
    keys = [k for p in parts for k in p.keys]
    recs = np.concatenate([p.records for p in parts])
    perm = np.random.default_rng(_stable_seed(seed, "bucket", bucket)).permutation(len(keys))
    return RecordBatch(f"bucket-{bucket}", [keys[i] for i in perm], recs[perm], parts[0].scale)


class ShardStatsFn(beam.CombineFn):
    """Count, min, max, raw bytes and the order-independent content hash of RecordBatch elements."""

    def create_accumulator(self):
        return [0, np.inf, -np.inf, 0, 0]

    def add_input(self, acc, batch: RecordBatch):
        flat = batch.records.reshape(len(batch), -1)
        acc[0] += len(batch)
        acc[1] = min(acc[1], float(flat.min()))
        acc[2] = max(acc[2], float(flat.max()))
        acc[3] += int(batch.records.nbytes)
        acc[4] = (acc[4] + shardset.record_hash_sum(batch.keys, batch.records)) % (1 << 256)
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for a in accs:
            out = [out[0] + a[0], min(out[1], a[1]), max(out[2], a[2]), out[3] + a[3], (out[4] + a[4]) % (1 << 256)]
        return out

    def extract_output(self, acc):
        return {"records": acc[0], "min": acc[1], "max": acc[2], "bytes": acc[3], "hash": f"{acc[4]:064x}"}


def write_manifest(_, output_dir: str, files: list[str], stats: list[dict], dead: list[int], shape, dtype: str,
                    scale: float, sources: list[str]) -> str:
    import datetime
    import hashlib

    st = stats[0] if stats else {"records": 0, "min": 0.0, "max": 0.0, "hash": "0" * 64}
    counts = shardset.count_records(sorted(files))
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
    m = shardset.Manifest(records=written, shape=tuple(int(s) for s in shape), dtype=dtype, scale=float(scale),
                        value_min=float(st["min"]) if written else 0.0, value_max=float(st["max"]) if written else 0.0,
                        shards=entries, content_hash=st["hash"], dead_lettered=int(sum(dead)), sources=list(sources),
                        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    final = output_dir.rstrip("/") + "/" + shardset.MANIFEST
    write_atomic(final, m.to_json().encode())
    return final


class WriteShards(beam.PTransform):
    """Shuffle validated records into ``num_shards`` TFRecord shards and write ``manifest.json``.

    Records are scattered to random buckets (seeded by ``seed`` and the batch, so reruns are identical),
    grouped, permuted within their bucket, and written through :class:`BatchedTFRecordSink`. The manifest
    (:class:`vaestream.shardset.Manifest`) is written last, after the shard files are final; its record count is
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
                    | "ScatterToBuckets" >> beam.ParDo(Scatter(self.num_shards, self.seed))
                    | "GroupBuckets" >> beam.GroupByKey()
                    | "PermuteBuckets" >> beam.Map(gather_bucket, self.seed))
        files = shuffled | "WriteShardFiles" >> WriteBatches(f"{self.output_dir}/{shardset.SHARD_PREFIX}", "tfrecord",
                                                             num_shards=self.num_shards)
        stats = shuffled | "ShardStats" >> beam.CombineGlobally(ShardStatsFn())
        if self.dead_letters is not None:
            dead = self.dead_letters | "CountDeadLetters" >> beam.combiners.Count.Globally()
        else:
            dead = pcoll.pipeline | "NoDeadLetters" >> beam.Create([0])
        return (pcoll.pipeline
                | "ManifestTrigger" >> beam.Create([None])
                | "WriteManifest" >> beam.Map(write_manifest, self.output_dir, AsList(files), AsList(stats),
                                              AsList(dead), self.shape, self.dtype, self.scale, self.sources))
