"""Beam job: latent codes -> reconstructions, refusing codes written by another model.

    python -m pipelines.decode --input codes/ --model runs/model --output recon/ --output_dtype uint8

Inputs: code files written by ``pipelines/encode.py`` (TFRecord or Parquet; files, globs or a directory).
Before the job starts, the first code's fingerprint is checked against the model's; every batch is checked
again in the workers. A mismatch raises :class:`vaestream.errors.ModelMismatchError`. Output:
``OUTPUT/recon-SSSSS-of-NNNNN.tfrecord`` (``--recon_layout block``, the default: one tf.train.Example per batch
of records: records, shape, dtype, keys as name + first offset or listed, data = the [n, *shape] values;
``--recon_layout record``: one Example per record, the shard layout: key, data, shape, dtype; both read by
:func:`vaestream.shards.read_shards`) or ``.parquet`` (key, data), plus ``dead_letter.jsonl`` and
``summary.json`` (which names the layout, versioned: ``recon_layout`` ``block/1`` or ``record/1``). Unknown
flags are Beam pipeline options.
"""

from __future__ import annotations

import argparse

import apache_beam as beam

from vaestream import beam as vb
from vaestream.beam import dask as beam_dask
from vaestream.beam.jobs import options
from vaestream import shardset
from vaestream.errors import ModelMismatchError

RECON = "recon"
SUMMARY = "summary.json"


add_arguments = options.add_decode_arguments


def check_fingerprint(paths: list[str], model_dir: str | None, saved_model: str | None,
                      model: vb.LoadedVAE | None = None) -> str:
    """Raise ModelMismatchError if the first code in ``paths`` was written by another model; return the
    model's fingerprint. ``model``: the loaded model (default: load it)."""
    from vaestream.beam.transforms import first_code

    model = model if model is not None else vb.LoadedVAE.load(model_dir, saved_model)
    first = first_code(paths)
    fp = first.fingerprint if first is not None else None
    if fp is not None and fp != model.fingerprint:
        raise ModelMismatchError(f"{paths[0]}: codes were written by model {fp[:16]}..., the model given "
                                 f"({model_dir or saved_model}) is {model.fingerprint[:16]}...; decode them with the "
                                 "model that encoded them")
    if first is not None and first.coded:
        _check_context(paths[0], first.container, model.fingerprint, model_dir)
    return model.fingerprint


def _check_context(path: str, blob: bytes, fingerprint: str, model_dir: str | None) -> None:
    """A bits-back container coded with a pixel context model (vaestream.coding.bitsback.context) names it in its
    header: raise ModelMismatchError unless ``model_dir`` holds it."""
    import io

    from vaestream.coding import container
    from vaestream.coding.bitsback import context as context_mod

    h = container.read_header(io.BytesIO(bytes(blob)), name=path)
    if not h.lossless or fingerprint.startswith(h.fingerprint.hex()):
        return
    contexts = context_mod.load_contexts(model_dir) if model_dir else {}
    if not context_mod.stream_context(h.fingerprint, fingerprint, contexts)[0]:
        raise ModelMismatchError(f"{path}: the codes were written by this model with a pixel context model "
                                 f"({h.fingerprint.hex()}...) that {model_dir or 'the export'}/context/ does not "
                                 "hold; decode them with the model directory that encoded them")


def build(p: beam.Pipeline, args: argparse.Namespace, paths: list[str]) -> dict:
    """Add the decode steps to ``p``."""
    config = vb.read_model_config(args.model, args.saved_model)
    out = args.output.rstrip("/")
    # a rerun replaces the earlier run's files
    vb.clear_outputs(f"{out}/{RECON}-*", f"{out}/{shardset.DEAD_LETTER}", f"{out}/{SUMMARY}", inputs=paths)
    codes = p | "ReadCodes" >> vb.ReadCodes(paths, args.chunk_size)
    decode = vb.Decode(args.model, args.saved_model, args.batch_size, args.output_dtype,
                       overlap=args.inference == "overlap")
    schema = vb.record_schema(config.input_shape, args.output_dtype)
    vb.write_outputs(codes[vb.RECORDS] | "Decode" >> decode, codes[vb.DEAD_LETTER], out, RECON, args.output_format,
                     schema, args.num_shards, "WriteReconstructions", recon_layout=recon_layout(args))
    return {"output": out, "config": config}


def recon_layout(args: argparse.Namespace) -> str:
    """The layout of the job's TFRecord reconstructions: ``block`` or ``record`` (``--recon_layout``); Parquet
    rows are per record."""
    return getattr(args, "recon_layout", "record") if args.output_format == "tfrecord" else "record"


def _extra(args: argparse.Namespace, fingerprint: str) -> dict:
    """The job's own summary entries (the layout versioned: ``recon_layout`` ``block/1`` or ``record/1``)."""
    return {"model": args.model or args.saved_model, "fingerprint": fingerprint, "output_format": args.output_format,
            "output_dtype": args.output_dtype, "recon_layout": shardset.RECON_LAYOUT_VERSIONS[recon_layout(args)]}


def run_job(args: argparse.Namespace, pipeline_args: list[str]) -> dict:
    """Run the decode job on the runner ``pipeline_args`` name: Beam's (:func:`run_on_beam`) or, with the Dask
    runner, :func:`run_on_dask`. Returns (and writes to ``OUTPUT/summary.json``) its summary. Raises
    :class:`vaestream.errors.JobFailedError` (after writing it) when no record was written or more than
    ``--max_dead_letter_fraction`` of the codes read were dead-lettered."""
    if args.saved_model is not None:  # a learned entropy model's export: refused before any code is read
        from vaestream.serving.learned_export import refuse_learned_saved_model

        refuse_learned_saved_model(vb.read_model_config(None, args.saved_model), args.saved_model, "decode")
    run = run_on_dask if beam_dask.wants_dask(pipeline_args) else run_on_beam
    return vb.run_batch_job(run, args, pipeline_args)


def run_on_beam(args: argparse.Namespace, pipeline_args: list[str]) -> dict:
    """The decode job's Beam pipeline (:func:`build`) on the runner ``pipeline_args`` name."""
    paths = vb.code_files(args.input)
    # loaded once: held here for the whole job, the workers of an in-process runner reuse it
    # (VAEModelHandler.load_model -> LoadedVAE.load(reuse=True)) instead of loading it a second time
    model = vb.LoadedVAE.load(args.model, args.saved_model, reuse=True)
    fingerprint = check_fingerprint(paths, args.model, args.saved_model, model)
    result, _, info = vb.build_and_run(pipeline_args, build, args, paths)
    out = info["output"]
    ext = "parquet" if args.output_format == "parquet" else "tfrecord"
    try:
        return vb.finish_job("decode", result, vb.job_started(args), out, f"{out}/{RECON}-*.{ext}",
                             _extra(args, fingerprint), summary_file=SUMMARY, inputs=paths,
                             max_dead_letter_fraction=getattr(args, "max_dead_letter_fraction", 1.0))
    finally:
        del model


def run_on_dask(args: argparse.Namespace, pipeline_args: list[str]) -> dict:
    """The decode job on Beam's Dask runner (:func:`vaestream.beam.dask.run_coding`; TFRecord output only)."""
    if args.output_format != "tfrecord":
        raise beam_dask.DaskUnsupportedError("decode on the DaskRunner writes TFRecord only (--output_format "
                                             "tfrecord)")
    paths = vb.code_files(args.input)
    fingerprint = check_fingerprint(paths, args.model, args.saved_model)
    out = args.output.rstrip("/")
    vb.clear_outputs(f"{out}/{RECON}-*", f"{out}/{shardset.DEAD_LETTER}", f"{out}/{SUMMARY}", inputs=paths)
    handler = vb.VAEModelHandler(args.model, args.saved_model, "decode", args.batch_size)
    return beam_dask.run_coding("decode", paths, handler, args, pipeline_args, out, RECON, _extra(args, fingerprint),
                                summary_file=SUMMARY, inputs=paths)


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (job flags, then Beam pipeline options) and run the job."""
    return vb.run_job_argv(__doc__.splitlines()[0], add_arguments, run_job, argv)
