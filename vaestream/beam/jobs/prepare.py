"""Beam job: raw records -> validated, shuffled, sharded TFRecord files plus ``manifest.json``.

    python -m pipelines.prepare --input data/mnist --output shards/mnist-train
    python -m pipelines.prepare --input 'data/*.csv,extra.npy' --output shards/x --num_shards 16 \\
        --runner DataflowRunner --project P --region R --temp_location gs://B/tmp --setup_file ./setup.py

Inputs: MNIST-format IDX, .npy/.npz, CSV, TFRecord of tf.train.Example, a folder of PNG images, an
MNIST-layout directory or ``fashion-mnist`` (``--split``). Bad records go to ``OUTPUT/dead_letter.jsonl``
with a reason; the job checks records in = written + dead-lettered. Unknown flags are Beam pipeline
options (``--runner``, ``--direct_num_workers``, ``--direct_running_mode``, ...); with no ``--runner`` the
job runs on the in-process FnApiRunner.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import apache_beam as beam

from vaestream import beam as vb
from vaestream.beam import dask as beam_dask
from vaestream.beam.jobs import options
from vaestream import data, shardset
from vaestream.beam.running import check_output
from vaestream.shardset import Manifest


add_arguments = options.add_prepare_arguments


def settle(args: argparse.Namespace) -> tuple[list[str], tuple[int, ...], str, float, str | None, str]:
    """What the flags come to on every runner: (input paths, record shape, stored dtype, scale, likelihood
    checked, output directory); an earlier run's files in the output directory are removed (a rerun
    replaces them)."""
    paths = vb.expand_inputs(args.input, args.split)
    shape, first = vb.probe(paths[0], args.feature, records=True)
    shape = tuple(args.shape) if args.shape else shape
    if args.dtype != "auto":
        dtype = args.dtype
    else:  # 8-bit counts (uint8, an integer CSV) are stored as uint8; anything else as float32 model inputs
        dtype = "uint8" if first.dtype.kind in "ub" or (args.scale is None and data.is_counts(first)) else "float32"
    scale = data.COUNT_SCALE if dtype == "uint8" else 1.0
    likelihood = None if args.likelihood in ("none", "gaussian") else args.likelihood
    out = args.output.rstrip("/")
    vb.clear_outputs(f"{out}/{shardset.SHARD_PREFIX}-*", f"{out}/{shardset.DEAD_LETTER}", f"{out}/{shardset.MANIFEST}",
                     inputs=paths)
    return paths, shape, dtype, scale, likelihood, out


def build(p: beam.Pipeline, args: argparse.Namespace) -> dict:
    """Add the prepare steps to ``p``; returns what the summary needs."""
    paths, shape, dtype, scale, likelihood, out = settle(args)
    # records are validated as they are read (one step, one dead-letter stream: no Flatten stage)
    read = p | "ReadRecords" >> vb.ReadRecords(paths, args.split, args.chunk_size, args.split_records, args.feature,
                                               validate=vb.Validate(shape, likelihood, dtype, args.scale))
    dead = read[vb.DEAD_LETTER]
    dead | "WriteDeadLetters" >> vb.WriteDeadLetters(f"{out}/{shardset.DEAD_LETTER}")
    read[vb.RECORDS] | "WriteShards" >> vb.WriteShards(out, shape, dtype, scale, args.num_shards, args.seed, paths,
                                                       dead_letters=dead)
    return {"output": out, "shape": list(shape), "dtype": dtype, "inputs": paths}


def run_job(args: argparse.Namespace, pipeline_args: list[str]) -> dict:
    """Run the prepare job on the runner ``pipeline_args`` name: Beam's (:func:`run_on_beam`) or, with the Dask
    runner, :func:`run_on_dask`. Returns its summary (see :func:`vaestream.beam.job_summary`). Raises
    :class:`vaestream.errors.JobFailedError` (after writing the shards and the manifest) when no record was
    written or more than ``--max_dead_letter_fraction`` of them were dead-lettered."""
    run = run_on_dask if beam_dask.wants_dask(pipeline_args) else run_on_beam
    return vb.run_batch_job(run, args, pipeline_args)


def run_on_beam(args: argparse.Namespace, pipeline_args: list[str]) -> dict:
    """The prepare job's Beam pipeline (:func:`build`) on the runner ``pipeline_args`` name."""
    result, _, info = vb.build_and_run(pipeline_args, build, args)
    out = info["output"]
    return finish_prepare(result, args, out, info["inputs"])


def run_on_dask(args: argparse.Namespace, pipeline_args: list[str]) -> dict:
    """The prepare job on Beam's Dask runner (:func:`vaestream.beam.dask.write_shard_set`): the same shuffle and
    shard set as on every runner."""
    paths, shape, dtype, scale, likelihood, out = settle(args)
    tasks = [t for p in paths for t in vb.plan_reads(p, args.split_records)]
    check = vb.Validate(shape, likelihood, dtype, args.scale).fn
    counts = beam_dask.write_shard_set(tasks, args, pipeline_args, out, check, shape, dtype, scale, paths)
    return finish_prepare(None, args, out, paths, counts=counts)


def finish_prepare(result, args: argparse.Namespace, out: str, inputs: Sequence[str],
                   counts: dict | None = None) -> dict:
    """The prepare job's summary (every runner): the manifest checked against the counters, then the output
    contract (:func:`vaestream.beam.running.check_output`)."""
    manifest = shardset.read_manifest(out)
    summary = vb.job_summary("prepare", result, vb.job_started(args),
                             f"{out}/{shardset.SHARD_PREFIX}-*{shardset.SHARD_SUFFIX}", f"{out}/{shardset.DEAD_LETTER}",
                             {"manifest": manifest.path, "content_hash": manifest.content_hash,
                              "shape": list(manifest.shape), "dtype": manifest.dtype}, counts=counts, inputs=inputs)
    if manifest.records != summary["records"] or manifest.dead_lettered != summary["dead_lettered"]:
        raise vb.DataError(f"{manifest.path}: says {manifest.records} records / {manifest.dead_lettered} "
                           f"dead-lettered, the job counted {summary['records']} / {summary['dead_lettered']}")
    return check_output(summary, getattr(args, "max_dead_letter_fraction", 1.0))


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (job flags, then Beam pipeline options) and run the job."""
    return vb.run_job_argv(__doc__.splitlines()[0], add_arguments, run_job, argv)


def prepare(inputs: str | Sequence[str], output_dir: str | Path, split: str = "train", num_shards: int = 8,
            seed: int = 0, pipeline_args: Sequence[str] = ()) -> Manifest:
    """Run the prepare job in-process on raw ``inputs`` and return the manifest.

    For a training run that points at raw data: ``train_from_shards(prepare(raw, dir), model_dir, ...)``.
    ``pipeline_args`` are Beam pipeline options (default: the in-process FnApiRunner).
    """
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    run(["--input", *[str(i) for i in inputs], "--output", str(output_dir), "--split", split, "--num_shards",
         str(num_shards), "--seed", str(seed), *pipeline_args])
    return shardset.read_manifest(output_dir)
