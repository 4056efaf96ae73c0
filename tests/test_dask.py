"""The Beam jobs on Beam's DaskRunner, on a real dask.distributed LocalCluster of 2 worker processes, against
the same jobs on the in-process FnApiRunner: prepare -> encode -> decode on real MNIST with poisoned inputs;
the (key, value) rows, dead-letter rows and summaries must be identical. Plus: the stock Beam graphs are
refused with the feature the Dask runner gets wrong, and a failing cluster job leaves no output."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

import dask.distributed  # noqa: E402,F401 (dask[distributed] is a dependency)

from vaestream.beam.jobs import decode, encode, prepare  # noqa: E402
from vaestream import beam as vb  # noqa: E402
from vaestream import shardset  # noqa: E402
from vaestream.beam import dask as beam_dask  # noqa: E402
from vaestream.errors import DataError  # noqa: E402

from tests.test_pipelines import _poisoned_inputs  # noqa: E402

TIMING = {"seconds", "records_per_second", "outputs", "dead_letter", "manifest"}


@pytest.fixture(scope="module")
def cluster():
    from dask.distributed import Client, LocalCluster

    c = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(c)
    yield c.scheduler_address
    client.close()
    c.close()


def _dask(address: str) -> list[str]:
    return ["--runner", "DaskRunner", "--dask_client_address", address]


def _dead_rows(out: Path) -> set[tuple]:
    p = out / shardset.DEAD_LETTER
    if not p.exists():
        return set()
    return {tuple(sorted(json.loads(line).items())) for line in p.read_text().splitlines() if line.strip()}


def _code_rows(out: Path) -> list[tuple]:
    """Every (key, mean, log_scale, fingerprint) row, sorted (a multiset: the shards repeat some keys)."""
    rows = []
    for f in sorted(out.glob("codes-*.tfrecord")):
        for b in vb.read_codes(str(f)):
            assert isinstance(b, vb.CodeBatch), b
            for k, m, s in zip(b.keys, b.mean, b.log_scale):
                rows.append((k, np.asarray(m, np.float32).tobytes(), np.asarray(s, np.float32).tobytes(),
                             b.fingerprint))
    return sorted(rows)


def _record_rows(paths) -> set[tuple]:
    rows = set()
    for f in paths:
        for b in vb.read_range({"path": str(f), "kind": "tfrecord", "start": 0, "stop": None}, 4096):
            assert isinstance(b, vb.RecordBatch), b
            rows |= {(k, np.asarray(r).tobytes()) for k, r in zip(b.keys, b.records)}
    return rows


def _same_summary(a: dict, b: dict) -> None:
    assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}


def test_prepare_encode_decode_on_dask_equal_fnapi(cluster, tmp_path, small_model, mnist_test):
    model = str(small_model.model_dir)
    d = tmp_path / "in"
    d.mkdir()
    inputs, good, bad = _poisoned_inputs(d, mnist_test)
    # prepare: MNIST records from .npy and a truncated raw IDX, plus a file of wrong-shape records
    np.save(d / "wrong_shape.npy", mnist_test[:5, :27, :27])
    prep_in = [str(d / "good.npy"), str(d / "cut-images-idx3-ubyte"), str(d / "wrong_shape.npy")]
    ps = {}
    for name, extra in (("fn", []), ("dask", _dask(cluster))):
        ps[name] = prepare.run(["--input", *prep_in, "--output", str(tmp_path / f"prep-{name}"), "--num_shards", "3",
                                "--seed", "5", "--chunk_size", "64", *extra])
    _same_summary(ps["fn"], ps["dask"])
    assert ps["dask"]["records"] == 357 and ps["dask"]["dead_lettered"] >= 2
    assert ps["dask"]["records_in"] == ps["dask"]["records"] + ps["dask"]["dead_lettered"]
    mf, md = shardset.read_manifest(tmp_path / "prep-fn"), shardset.read_manifest(tmp_path / "prep-dask")
    assert (mf.records, mf.content_hash, mf.dead_lettered) == (md.records, md.content_hash, md.dead_lettered)
    assert (_record_rows((tmp_path / "prep-fn").glob("shard-*"))
            == _record_rows((tmp_path / "prep-dask").glob("shard-*")))
    assert _dead_rows(tmp_path / "prep-fn") == _dead_rows(tmp_path / "prep-dask") != set()

    # encode: every poisoned format, plus the shards the Dask prepare wrote
    enc_in = [*inputs, str(tmp_path / "prep-dask")]
    es, walls = {}, {}
    for name, extra in (("fn", []), ("dask", _dask(cluster))):
        t0 = time.perf_counter()
        es[name] = encode.run(["--input", *enc_in, "--model", model, "--output", str(tmp_path / f"enc-{name}"),
                               "--chunk_size", "64", *extra])
        walls[name] = time.perf_counter() - t0
    _same_summary(es["fn"], es["dask"])
    for name in es:  # the job's wall seconds, not a part of it
        assert 0.9 * walls[name] - 0.1 <= es[name]["seconds"] <= walls[name], (name, es[name]["seconds"], walls)
    rows = _code_rows(tmp_path / "enc-dask")
    import zlib

    gz = (d / "cutgz-images-idx3-ubyte.gz").read_bytes()  # cut in the middle: its whole records are encoded
    gz_whole = (len(zlib.decompressobj(31).decompress(gz)) - 16) // 784
    assert 0 < gz_whole < 100
    assert rows == _code_rows(tmp_path / "enc-fn") and len(rows) == es["dask"]["records"] == 452 + 357 + gz_whole
    dead = _dead_rows(tmp_path / "enc-dask")
    assert dead == _dead_rows(tmp_path / "enc-fn") and len(dead) == es["dask"]["dead_lettered"] == len(bad) + 1
    assert {k for k, *_ in rows} >= good

    # decode: the codes plus a corrupt code file
    (tmp_path / "junk.tfrecord").write_bytes(b"not a tfrecord file at all")
    code_in = (sorted(str(p) for p in (tmp_path / "enc-dask").glob("codes-*.tfrecord"))
               + [str(tmp_path / "junk.tfrecord")])
    ds = {}
    for name, extra in (("fn", []), ("dask", _dask(cluster))):
        ds[name] = decode.run(["--input", *code_in, "--model", model, "--output", str(tmp_path / f"dec-{name}"),
                               "--output_dtype", "uint8", *extra])
    _same_summary(ds["fn"], ds["dask"])
    assert ds["dask"]["records"] == es["dask"]["records"] and ds["dask"]["dead_lettered"] == 1
    assert (_record_rows((tmp_path / "dec-fn").glob("recon-*"))
            == _record_rows((tmp_path / "dec-dask").glob("recon-*")))
    assert _dead_rows(tmp_path / "dec-fn") == _dead_rows(tmp_path / "dec-dask")
    assert not list(tmp_path.glob("*/_vaestream_staging-*"))


def test_stock_graphs_are_refused_with_the_missing_feature(tmp_path, mnist_dir):
    """The FnApiRunner graphs of the jobs use what Beam's Dask runner executes wrongly (the stock file sinks'
    side-input finalize, tagged outputs, several leaves): check_dask_support names it instead of running."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    p = beam.Pipeline(options=PipelineOptions([]))
    parser = __import__("argparse").ArgumentParser()
    prepare.add_arguments(parser)
    args = parser.parse_args(["--input", str(mnist_dir), "--output", str(tmp_path / "o"), "--num_shards", "2"])
    prepare.build(p, args)
    with pytest.raises(beam_dask.DaskUnsupportedError, match="side inputs|tagged outputs|file sink"):
        beam_dask.check_dask_support(p)
    # the stock WriteToText alone: its WriteImpl joins init / write / finalize by side inputs
    p2 = beam.Pipeline(options=PipelineOptions([]))
    _ = p2 | beam.Create(["a", "b"]) | beam.io.WriteToText(str(tmp_path / "t"))
    with pytest.raises(beam_dask.DaskUnsupportedError, match="side inputs|file sink"):
        beam_dask.check_dask_support(p2)
    # two leaves: only the last would run
    p3 = beam.Pipeline(options=PipelineOptions([]))
    c = p3 | beam.Create([1, 2])
    _ = c | "A" >> beam.Map(lambda x: x)
    _ = c | "B" >> beam.Map(lambda x: x)
    with pytest.raises(beam_dask.DaskUnsupportedError, match="2 leaves"):
        beam_dask.check_dask_support(p3)


def test_parquet_on_dask_is_refused_before_writing(cluster, tmp_path, small_model, mnist_test, capsys):
    """--output_format parquet on the DaskRunner: a clear vaestream error naming the limit, no output written,
    and from the CLI one error line and exit status 1 (the SIGKILL case is benchmarks/dask_kill_worker.py)."""
    from vaestream.cli import main
    from vaestream.errors import VaestreamError

    np.save(tmp_path / "x.npy", mnist_test[:50])
    out = tmp_path / "enc"
    argv = ["--input", str(tmp_path / "x.npy"), "--model", str(small_model.model_dir), "--output", str(out),
            "--output_format", "parquet", *_dask(cluster)]
    limit = r"encode on the DaskRunner writes TFRecord only \(--output_format tfrecord\)"
    with pytest.raises(beam_dask.DaskUnsupportedError, match="^" + limit) as e:
        encode.run(argv)
    assert isinstance(e.value, VaestreamError)
    assert not out.exists() or not any(out.iterdir())
    capsys.readouterr()
    assert main(["encode", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match("vaestream: error: " + limit, err[0]), err
    assert not out.exists() or not any(out.iterdir())


def test_near_lossless_encode_on_dask_codes_the_level_images_it_was_asked_for(cluster, tmp_path, bb_model, mnist_test):
    """``--coder lossless --levels 5`` on the Dask runner: each container holds its records' 5-level images (the
    Dask path once dropped --levels and coded the records exactly)."""
    from vaestream.coding.bitsback.coder import LosslessCoder

    model, model_dir = bb_model
    x = mnist_test[4000:4150]
    np.save(tmp_path / "counts.npy", x)
    s = encode.run(["--input", str(tmp_path / "counts.npy"), "--model", str(model_dir), "--output",
                    str(tmp_path / "enc"), "--coder", "lossless", "--levels", "5", "--chunk_size", "50",
                    *_dask(cluster)])
    assert s["records"] == 150 and s["dead_lettered"] == 0
    want, back = LosslessCoder(model, levels=5).quantize(x), {}
    for f in (tmp_path / "enc").glob("codes-*.tfrecord"):
        for b in vb.read_codes(str(f)):
            back.update(zip(b.keys, LosslessCoder(model).decompress(b.container)))
    assert sorted(back) == [f"counts.npy:{i:09d}" for i in range(150)]
    for i in range(150):
        assert np.array_equal(back[f"counts.npy:{i:09d}"].reshape(x[i].shape), want[i])


def test_cli_encode_with_dask_local_workers(tmp_path, small_model, mnist_test, capsys):
    """``vaestream encode --dask_local_workers 1`` (a Dask flag alone means DaskRunner): the job runs on a local
    cluster; its summary's seconds are the job's wall time and the dead-letter file it names exists (empty)."""
    from vaestream.cli import main

    np.save(tmp_path / "x.npy", mnist_test[:100])
    out = tmp_path / "enc"
    t0 = time.perf_counter()
    rc = main(["encode", "--input", str(tmp_path / "x.npy"), "--model", str(small_model.model_dir), "--output",
               str(out), "--dask_local_workers", "1", "--json"])
    wall = time.perf_counter() - t0
    assert rc == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (s["records_in"], s["records"], s["dead_lettered"]) == (100, 100, 0)
    assert len(_code_rows(out)) == 100 and not list(out.glob("_vaestream_staging-*"))
    assert 0.8 * wall - 0.5 <= s["seconds"] <= wall  # the local cluster's start is part of the job
    assert Path(s["dead_letter"]).read_text() == ""
    assert beam_dask.wants_dask(["--dask_local_workers=1"]) and not beam_dask.wants_dask(["--runner", "DirectRunner"])
