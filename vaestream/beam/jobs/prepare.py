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
from vaestream import shardset
from vaestream.shardset import Manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", "--inputs", dest="input", required=True, nargs="+",
                        help="files, globs, directories (MNIST layout, PNG folder) or 'fashion-mnist'")
    parser.add_argument("--output", required=True, help="output directory (shards, manifest.json, dead_letter.jsonl)")
    parser.add_argument("--split", default="train", choices=["train", "test"],
                        help="split of an MNIST-layout directory (default train)")
    parser.add_argument("--num_shards", "--num-shards", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seeds the shuffle")
    parser.add_argument("--dtype", default="auto", choices=["auto", "uint8", "float32"],
                        help="stored dtype (auto: uint8 if the first input holds integers, else float32)")
    parser.add_argument("--shape", type=int, nargs="+", default=None,
                        help="record shape (default: the first input's)")
    parser.add_argument("--scale", type=float, default=None,
                        help="model input = value * scale (default: 1/255 for integers, 1 for floats)")
    parser.add_argument("--likelihood", default="bernoulli",
                        choices=["bernoulli", "gaussian_sigmoid", "gaussian", "none"],
                        help="refuse records outside this decoder's support (bernoulli: inputs in [0, 1])")
    parser.add_argument("--chunk_size", "--chunk-size", type=int, default=vb.CHUNK)
    parser.add_argument("--split_records", "--split-records", type=int, default=vb.SPLIT)
    parser.add_argument("--feature", default="x", help="record feature of generic TFRecord Examples / .npz array")


def settle(args: argparse.Namespace) -> tuple[list[str], tuple[int, ...], str, float, str | None, str]:
    """What the flags come to on every runner: (input paths, record shape, stored dtype, scale, likelihood
    checked, output directory); an earlier run's files in the output directory are removed (a rerun
    replaces them)."""
    paths = vb.expand_inputs(args.input, args.split)
    shape, dtype0 = vb.probe(paths[0], args.feature)
    shape = tuple(args.shape) if args.shape else shape
    dtype = args.dtype if args.dtype != "auto" else ("uint8" if dtype0.kind in "iub" else "float32")
    scale = 1.0 / 255.0 if dtype == "uint8" else 1.0
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
    return {"output": out, "shape": list(shape), "dtype": dtype}


@vb.dask_alternative("run_prepare")
def run_job(args: argparse.Namespace, pipeline_args: list[str]) -> dict:
    """Run the prepare job; returns its summary (see :func:`vaestream.beam.job_summary`)."""
    result, seconds, info = vb.build_and_run(pipeline_args, build, args)
    out = info["output"]
    manifest = shardset.read_manifest(out)
    summary = vb.job_summary("prepare", result, seconds, f"{out}/{shardset.SHARD_PREFIX}-*{shardset.SHARD_SUFFIX}",
                             f"{out}/{shardset.DEAD_LETTER}",
                             {"manifest": manifest.path, "content_hash": manifest.content_hash,
                              "shape": list(manifest.shape), "dtype": manifest.dtype})
    if manifest.records != summary["records"] or manifest.dead_lettered != summary["dead_lettered"]:
        raise vb.DataError(f"{manifest.path}: says {manifest.records} records / {manifest.dead_lettered} "
                           f"dead-lettered, the job counted {summary['records']} / {summary['dead_lettered']}")
    return summary


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
