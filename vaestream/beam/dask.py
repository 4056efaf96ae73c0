"""The Beam jobs (prepare, encode, decode) on Beam's ``DaskRunner`` (a dask.distributed cluster).

Why the jobs do not run their FnApiRunner graphs there. Beam 2.77's Dask runner
(``apache_beam/runners/dask/``) translates a pipeline into dask bags and computes **only the last bag
visited** (``dask_runner.py``: ``dask.optimize(list(bags.values())[-1])``):

* a graph with several leaves (our jobs' shard/code files *and* dead letters) runs one leaf; the others
  never run;
* a multi-output ``ParDo`` (``with_outputs``) puts every output, main and tagged, in one bag, whose
  consumers all see all outputs (``transform_evaluator.ParDo``: the tags are dropped);
* side inputs are a ``list(bag)`` computed inside the consuming task (``DaskBagWindowedIterator``), i.e. the
  whole upstream branch runs again there: Beam's file sinks (``iobase.WriteImpl``: init, write, pre-finalize
  and finalize joined by side inputs) run their set-up branches again and their finalize sees no shard, which
  is the empty ``WriteToText`` output with ``beam-temp-*`` folders left behind;
* outputs of ``finish_bundle`` are dropped (results are collected before it runs);
* ``metrics()`` raises ``NotImplementedError``: no counters, which our jobs' conservation checks need.

So on Dask each job is one *linear* Beam graph with a single leaf, no side input, no tagged output and no
Beam sink: ``Create(read tasks) -> ParDo(read, validate, encode/decode, write one part file a task)`` (prepare:
``-> ParDo(scatter) -> GroupByKey -> ParDo(write one shard a bucket)``). Each part is written atomically
(temporary name, then rename) under a name derived from its data (the read task / the bucket), so a task that
Dask runs again (a lost worker) rewrites the same file with the same bytes and is counted once. Every part
task returns a small descriptor (name, counts, bytes, stats); the client gathers them, checks the counts and
commits: parts renamed to the final ``codes-SSSSS-of-NNNNN.tfrecord`` etc., dead letters merged, manifest /
summary written. If the cluster job fails nothing is committed and the staging folder is deleted: no
partial output.

:func:`check_dask_support` names the first feature of an arbitrary pipeline the Dask runner gets wrong
(used to refuse graphs, see the tests).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
import uuid
from typing import Any, Iterator, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from vaestream import beam as vb
from vaestream.beam import shards as beam_shards
from vaestream.beam import sinks, transforms
from vaestream import shardset
from vaestream.errors import DataError, VaestreamError

DASK_RUNNERS = ("DaskRunner", "dask", "apache_beam.runners.dask.dask_runner.DaskRunner")
STAGING = "_vaestream_staging"


class DaskUnsupportedError(VaestreamError):
    """A pipeline uses a Beam feature that Beam's DaskRunner does not execute correctly."""


# ---------------------------------------------------------------------------------------------------------
# options and the cluster
# ---------------------------------------------------------------------------------------------------------
def wants_dask(pipeline_args: Sequence[str]) -> bool:
    """Whether the Beam options name the Dask runner (``--runner DaskRunner`` / ``--runner=DaskRunner``), or
    name no runner but a Dask option (``--dask_client_address``, ``--dask_local_workers``,
    ``--dask_npartitions``)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--runner", default=None)
    for flag in ("--dask_client_address", "--dask_local_workers", "--dask_npartitions"):
        p.add_argument(flag, default=None)
    known, _ = p.parse_known_args(list(pipeline_args))
    if known.runner is None:
        return any(v is not None for v in (known.dask_client_address, known.dask_local_workers,
                                           known.dask_npartitions))
    return known.runner in DASK_RUNNERS


def dask_options(pipeline_args: Sequence[str]) -> dict:
    """``address`` (``--dask_client_address``), ``local_workers`` (``--dask_local_workers``, default 2: worker
    processes of the ``LocalCluster`` started when no address is given) and ``npartitions``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--dask_client_address", default=None)
    p.add_argument("--dask_local_workers", type=int, default=2)
    p.add_argument("--dask_npartitions", type=int, default=None)
    known, _ = p.parse_known_args(list(pipeline_args))
    return {"address": known.dask_client_address, "local_workers": known.dask_local_workers,
            "npartitions": known.dask_npartitions}


class _Cluster:
    """A dask.distributed Client on ``address``, or on a LocalCluster of ``local_workers`` single-threaded
    worker processes started (and closed) here. Worker processes inherit this process's environment
    (``PYTHONPATH``), so they import the same vaestream."""

    def __init__(self, address: str | None, local_workers: int):
        from dask.distributed import Client, LocalCluster

        self.cluster = None
        if address:
            self.client = Client(address)
        else:
            self.cluster = LocalCluster(n_workers=max(1, local_workers), threads_per_worker=1, processes=True,
                                        dashboard_address=None)
            self.client = Client(self.cluster)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


# ---------------------------------------------------------------------------------------------------------
# refusing what the runner gets wrong
# ---------------------------------------------------------------------------------------------------------
def check_dask_support(pipeline: beam.Pipeline) -> None:
    """Raise :class:`DaskUnsupportedError` naming the first feature of ``pipeline`` that Beam's DaskRunner
    does not execute correctly: side inputs, tagged (multiple) outputs, Beam file sinks (``Write``), or
    more than one leaf (only the last is computed)."""
    from apache_beam.pipeline import PipelineVisitor

    problems: list[str] = []
    consumed: set = set()
    produced: list = []

    class V(PipelineVisitor):
        def visit_transform(self, node):
            t = node.transform
            name = node.full_label
            if node.side_inputs:
                problems.append(f"{name}: side inputs (the Dask runner recomputes their whole branch inside "
                                "the consuming task)")
            if len(node.outputs) > 1:
                problems.append(f"{name}: tagged outputs (the Dask runner mixes all outputs of a ParDo in one "
                                "bag)")
            if isinstance(t, beam.io.Write) or type(t).__name__ == "WriteImpl":
                problems.append(f"{name}: a Beam file sink (its finalize runs on side inputs)")
            for i in node.inputs:
                consumed.add(id(i))
            produced.extend(node.outputs.values())

        def enter_composite_transform(self, node):
            t = node.transform
            if isinstance(t, beam.io.Write) or type(t).__name__ in ("WriteImpl", "WriteToText"):
                problems.append(f"{node.full_label}: a Beam file sink (its finalize runs on side inputs)")

    pipeline.visit(V())
    leaves = [o for o in produced if id(o) not in consumed]
    if len(leaves) > 1 and not problems:
        problems.append(f"{len(leaves)} leaves (the Dask runner computes only the last one)")
    if problems:
        raise DaskUnsupportedError("Beam's DaskRunner cannot run this pipeline correctly: " + problems[0])


def _compute(pipeline: beam.Pipeline, cluster: _Cluster, npartitions: int | None) -> list:
    """Translate ``pipeline`` (checked linear) with Beam's Dask runner and compute its one leaf on the
    cluster; returns the leaf's elements."""
    import dask
    from apache_beam.runners.dask.dask_runner import DaskRunner
    from apache_beam.runners.dask.overrides import dask_overrides

    check_dask_support(pipeline)
    pipeline.replace_all(dask_overrides())
    visitor = DaskRunner.to_dask_bag_visitor({"npartitions": npartitions} if npartitions else {"partition_size": 1})
    pipeline.visit(visitor)
    (bag,) = dask.optimize(list(visitor.bags.values())[-1])
    return list(cluster.client.compute(bag).result())


# ---------------------------------------------------------------------------------------------------------
# atomic, deterministic part files
# ---------------------------------------------------------------------------------------------------------
def _digest(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]


def _tfrecord_bytes(records: Sequence[bytes]) -> bytes:
    """TFRecord framing (length, masked CRC32C of it, data, masked CRC32C of the data), as TF writes it."""
    import tensorflow as tf

    path = f"/tmp/vaestream-{uuid.uuid4().hex}.tfrecord"
    try:
        with tf.io.TFRecordWriter(path) as w:
            for r in records:
                w.write(r)
        with open(path, "rb") as f:
            return f.read()
    finally:
        if os.path.exists(path):
            os.remove(path)


def _dead_lines(dead: Sequence[vb.DeadLetter]) -> list[str]:
    return [d.to_json() for d in dead]


_MODELS: dict = {}


def _model(handler: vb.VAEModelHandler):
    """The handler's model, loaded once per worker process."""
    k = handler.key()
    if k not in _MODELS:
        _MODELS[k] = handler.load_model()
    return _MODELS[k]


def _read_task(task: dict, chunk: int, feature: str, check) -> Iterator[tuple[str, Any]]:
    """(kind, item) for one read task: ("in", n, nbytes) counts and ("rec", RecordBatch) / ("dead", DeadLetter),
    exactly as :class:`vaestream.beam.readers._ReadFn` reads and validates."""
    for item in vb.read_range(task, chunk, feature):
        if isinstance(item, vb.RecordBatch):
            yield "in", (len(item), int(item.records.nbytes))
            for out in (check.process(item) if check is not None else [item]):
                if isinstance(out, beam.pvalue.TaggedOutput):
                    yield "dead", out.value
                else:
                    yield "rec", out
        else:
            yield "in", (1, 0)
            yield "dead", item


class _Tally:
    """Counts what a read task's ``(kind, item)`` stream says ("in": (records, bytes) read, "dead": a dead
    letter) and passes its record batches on."""

    def __init__(self):
        self.dead: list = []
        self.records_in = self.bytes_in = 0

    def batches(self, items):
        for kind, item in items:
            if kind == "in":
                self.records_in += item[0]
                self.bytes_in += item[1]
            elif kind == "dead":
                self.dead.append(item)
            else:
                yield item


class _CodecTaskFn(beam.DoFn):
    """One read task -> encode (or one code file -> decode) -> one part file of output rows and one of dead
    letters in ``staging``; yields the task's descriptor."""

    def __init__(self, job: str, staging: str, handler: vb.VAEModelHandler, chunk: int, feature: str = "x",
                 check=None, output_dtype: str = "float32", code_layout: str = "record", recon_layout: str = "record"):
        self.job, self.staging, self.handler, self.chunk = job, staging, handler, chunk
        self.feature, self.check, self.output_dtype, self.code_layout = feature, check, output_dtype, code_layout
        self.recon_layout = recon_layout

    def _items(self, task):
        if self.job == "encode":
            yield from _read_task(task, self.chunk, self.feature, self.check)
            return
        try:
            for item in vb.read_codes(task, self.chunk):
                if isinstance(item, vb.CodeBatch):
                    yield "in", (len(item), int(item.nbytes))
                    yield "rec", item
                else:
                    yield "in", (1, 0)
                    yield "dead", item
        except DataError as e:
            yield "in", (1, 0)
            yield "dead", vb.DeadLetter(task, task, str(e))

    def process(self, task):
        model = None
        rows: list[bytes] = []
        tally = _Tally()
        written = 0
        for item in tally.batches(self._items(task)):
            model = model or _model(self.handler)
            if self.job == "encode":
                (out,) = self.handler.encode_batches([item], model)
                rows.extend(vb.code_examples(out, self.code_layout))
            else:
                (out,) = self.handler.decode_batches([item], model)
                out = transforms.quantize_batch(out, self.output_dtype)
                rows.extend(shardset.recon_examples(out.keys, out.records, self.recon_layout))
            written += len(out)
        dead, records_in, bytes_in = tally.dead, tally.records_in, tally.bytes_in
        name = _digest(self.job, task)
        if rows:
            sinks.write_atomic(f"{self.staging}/{name}.part", _tfrecord_bytes(rows))
        if dead:
            sinks.write_atomic(f"{self.staging}/{name}.dead", ("\n".join(_dead_lines(dead)) + "\n").encode())
        yield {"name": name, "rows": bool(rows), "dead_file": bool(dead), "records_in": records_in,
               "bytes_in": bytes_in, "records": written, "dead_lettered": len(dead)}


class _ScatterTaskFn(beam.DoFn):
    """prepare: one read task -> (bucket, part) pairs as :class:`vaestream.beam.shards.Scatter`, plus
    (-1, dead letters) and (-2, counts)."""

    def __init__(self, buckets: int, seed: int, chunk: int, feature: str, check):
        self.scatter = beam_shards.Scatter(buckets, seed)
        self.chunk, self.feature, self.check = chunk, feature, check

    def process(self, task):
        tally = _Tally()
        for item in tally.batches(_read_task(task, self.chunk, self.feature, self.check)):
            yield from self.scatter.process(item)
        yield -1, {"dead": tally.dead, "records_in": tally.records_in, "bytes_in": tally.bytes_in,
                   "task": repr(sorted(task.items()))}


class _WriteBucketFn(beam.DoFn):
    """prepare: one bucket -> ``shard-BBBBB-of-NNNNN.tfrecord`` in ``staging``; bucket -1 -> the dead
    letters (in a fixed order) and the counts."""

    def __init__(self, staging: str, num_shards: int, seed: int):
        self.staging, self.num_shards, self.seed = staging, num_shards, seed

    def process(self, item):
        bucket, parts = item
        if bucket == -1:
            infos = sorted(parts, key=lambda d: d["task"])
            dead = [d for i in infos for d in i["dead"]]
            if dead:
                sinks.write_atomic(f"{self.staging}/prepare.dead", ("\n".join(_dead_lines(dead)) + "\n").encode())
            yield {"name": "dead", "records_in": sum(i["records_in"] for i in infos),
                   "bytes_in": sum(i["bytes_in"] for i in infos), "dead_lettered": len(dead), "records": 0}
            return
        batch = beam_shards.gather_bucket((bucket, parts), self.seed)
        fn = beam_shards.ShardStatsFn()
        stats = fn.extract_output(fn.add_input(fn.create_accumulator(), batch))
        name = f"{shardset.SHARD_PREFIX}-{bucket:05d}-of-{self.num_shards:05d}{shardset.SHARD_SUFFIX}"
        examples = shardset.record_examples(batch.keys, batch.records)
        sinks.write_atomic(f"{self.staging}/{name}", _tfrecord_bytes(examples))
        yield {"name": name, "records": len(batch), "stats": stats, "records_in": 0, "bytes_in": 0,
               "dead_lettered": 0}


# ---------------------------------------------------------------------------------------------------------
# the jobs
# ---------------------------------------------------------------------------------------------------------
def _dedupe(descriptors: list[dict]) -> list[dict]:
    """One descriptor per part name (a re-executed task returns the same one), in name order."""
    seen: dict[str, dict] = {}
    for d in descriptors:
        if d["name"] in seen and seen[d["name"]] != {k: v for k, v in d.items()}:
            raise DataError(f"part {d['name']}: two executions of one task disagree ({seen[d['name']]} vs {d})")
        seen[d["name"]] = d
    return [seen[k] for k in sorted(seen)]


def _counts(parts: list[dict]) -> dict[str, int]:
    return {k: int(sum(p.get(k, 0) for p in parts)) for k in ("records_in", "records", "dead_lettered", "bytes_in")}


def _commit_dead(staging: str, names: list[str], path: str) -> None:
    """The dead-letter file, written always (empty when nothing was dead-lettered), as the other runners do."""
    lines = []
    for n in names:
        with FileSystems.open(f"{staging}/{n}") as f:
            lines.extend(l for l in f.read().decode().splitlines() if l.strip())
    sinks.write_atomic(path, ("\n".join(lines) + "\n").encode() if lines else b"")


def _run(job: str, out: str, pipeline_args: Sequence[str], build) -> tuple[list[dict], str, float]:
    """Make the staging folder, build the linear pipeline with ``build(p, staging)``, compute it on the
    cluster; returns (deduplicated descriptors, staging folder, seconds of the computation alone: the
    summaries report the job's wall time). On failure the staging folder is
    deleted and the error re-raised (as its vaestream type where it is one)."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.dask.dask_runner import DaskRunner

    opts = dask_options(pipeline_args)
    staging = f"{out}/{STAGING}-{uuid.uuid4().hex[:12]}"
    FileSystems.mkdirs(staging)
    cluster = None
    try:
        cluster = _Cluster(opts["address"], opts["local_workers"])
        p = beam.Pipeline(runner=DaskRunner(), options=PipelineOptions([]))
        build(p, staging)
        t0 = time.perf_counter()
        parts = _dedupe(_compute(p, cluster, opts["npartitions"]))
        return parts, staging, time.perf_counter() - t0
    except BaseException as e:
        _remove(staging)
        if isinstance(e, VaestreamError):
            raise
        for cls in (vb.ModelMismatchError, vb.ModelError, DataError):
            if f"{cls.__name__}: " in str(e):
                raise cls(str(e).rsplit(f"{cls.__name__}: ", 1)[1].splitlines()[0]) from e
        raise
    finally:
        if cluster is not None:
            cluster.close()


def _remove(folder: str) -> None:
    if FileSystems.exists(folder):
        FileSystems.delete([folder])


def _commit_parts(staging: str, names: list[str], prefix: str) -> None:
    n = len(names)
    for i, name in enumerate(names):
        FileSystems.rename([f"{staging}/{name}.part"], [f"{prefix}-{i:05d}-of-{n:05d}.tfrecord"])


def _finish(job: str, parts: list[dict], staging: str, args: argparse.Namespace, out: str, prefix: str,
            extra: dict, coded: bool = False, summary_file: str = "summary.json", inputs: Sequence[str] = (),
            ratio: bool = False) -> dict:
    """Commit the parts as ``OUT/PREFIX-i-of-n.tfrecord`` and their dead letters, drop the staging folder,
    and write the summary and check the output contract (as the other runners do)."""
    try:
        _commit_parts(staging, [p["name"] for p in parts if p["rows"]], f"{out}/{prefix}")
        _commit_dead(staging, [p["name"] + ".dead" for p in parts if p["dead_file"]], f"{out}/{shardset.DEAD_LETTER}")
    finally:
        _remove(staging)
    return vb.finish_job(job, None, vb.job_started(args), out, f"{out}/{prefix}-*.tfrecord", extra, coded,
                         summary_file, counts=_counts(parts), inputs=inputs, ratio=ratio,
                         max_dead_letter_fraction=getattr(args, "max_dead_letter_fraction", 1.0))


def run_coding(job: str, sources: Sequence[Any], handler: vb.VAEModelHandler, args: argparse.Namespace,
               pipeline_args: Sequence[str], out: str, prefix: str, extra: dict, check=None, coded: bool = False,
               summary_file: str = "summary.json", inputs: Sequence[str] = (), ratio: bool = False) -> dict:
    """The encode or decode job (``job``) on the cluster, as one linear graph: ``Create(sources)`` (encode: read
    tasks of :func:`vaestream.beam.plan_reads`; decode: code files) ``-> ParDo(read, check, code, write one part
    a source)``; then the parts committed as ``OUT/PREFIX-i-of-n.tfrecord`` with their dead letters, the summary
    written and the output contract checked. The jobs call it (``vaestream.beam.jobs.encode.run_on_dask``)."""
    step, label = ("ReadTasks", "ReadEncodeWrite") if job == "encode" else ("CodeFiles", "ReadDecodeWrite")
    # float codes in the encode job's --code_layout (block: one Example per batch, counted as coded rows)
    code_layout = getattr(args, "code_layout", "record") if job == "encode" and not coded else "record"
    coded = coded or code_layout == "block"
    recon_layout = getattr(args, "recon_layout", "record") if job == "decode" else "record"

    def build(p, staging):
        fn = _CodecTaskFn(job, staging, handler, args.chunk_size, getattr(args, "feature", "x"), check,
                          getattr(args, "output_dtype", "float32"), code_layout, recon_layout)
        _ = p | step >> beam.Create(list(sources)) | label >> beam.ParDo(fn)

    parts, staging, _ = _run(job, out, pipeline_args, build)
    return _finish(job, parts, staging, args, out, prefix, extra, coded, summary_file, inputs=inputs, ratio=ratio)


def write_shard_set(tasks: Sequence[dict], args: argparse.Namespace, pipeline_args: Sequence[str], out: str,
                    check, shape: Sequence[int], dtype: str, scale: float, paths: Sequence[str]) -> dict:
    """The prepare job's shuffle on the cluster: the same buckets as on every runner (seeded by ``args.seed``),
    one shard file written per bucket, the manifest written here once the shards are final. Returns the
    job's counts; the job (``vaestream.beam.jobs.prepare.run_on_dask``) writes its summary."""
    n = int(args.num_shards)

    def build(p, staging):
        _ = (p | "ReadTasks" >> beam.Create(tasks)
             | "ReadScatter" >> beam.ParDo(_ScatterTaskFn(n, args.seed, args.chunk_size, args.feature, check))
             | "GroupBuckets" >> beam.GroupByKey()
             | "WriteBuckets" >> beam.ParDo(_WriteBucketFn(staging, n, args.seed)))

    parts, staging, _ = _run("prepare", out, pipeline_args, build)
    try:
        files = []
        for b in range(n):
            name = f"{shardset.SHARD_PREFIX}-{b:05d}-of-{n:05d}{shardset.SHARD_SUFFIX}"
            if FileSystems.exists(f"{staging}/{name}"):
                FileSystems.rename([f"{staging}/{name}"], [f"{out}/{name}"])
            else:  # an empty bucket: an empty shard, as Beam's sink writes one
                sinks.write_atomic(f"{out}/{name}", b"")
            files.append(f"{out}/{name}")
        if FileSystems.exists(f"{staging}/prepare.dead"):
            FileSystems.rename([f"{staging}/prepare.dead"], [f"{out}/{shardset.DEAD_LETTER}"])
        else:  # written always, empty when nothing was dead-lettered (as the other runners do)
            sinks.write_atomic(f"{out}/{shardset.DEAD_LETTER}", b"")
        fn = beam_shards.ShardStatsFn()
        acc = fn.create_accumulator()
        for p in parts:
            if "stats" in p:
                s = p["stats"]
                acc = fn.merge_accumulators([acc, [s["records"], s["min"], s["max"], s["bytes"], int(s["hash"], 16)]])
        counts = _counts(parts)
        beam_shards.write_manifest(None, out, files, [fn.extract_output(acc)], [counts["dead_lettered"]], shape,
                                   dtype, scale, paths)
    finally:
        _remove(staging)
    return counts
