"""The Beam jobs on the in-process FnApiRunner, on real MNIST: prepare -> train -> encode -> decode, dead
letters for poisoned inputs, fingerprint checks, multi-processing, and the reusable transforms with
TestPipeline + assert_that."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from vaestream.beam.jobs import decode, encode, prepare
from vaestream import beam as vb
from vaestream import shards, shardset
from vaestream.errors import ModelMismatchError

TRAIN_KEY = "train-images-idx3-ubyte.gz:{:09d}"
TEST_KEY = "t10k-images-idx3-ubyte.gz:{:09d}"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mnist_dir):
    """The MNIST training images through the prepare job (4 shuffled shards)."""
    out = tmp_path_factory.mktemp("prepare") / "mnist-train"
    summary = prepare.run(["--input", str(mnist_dir), "--split", "train", "--output", str(out), "--num_shards", "4"])
    return out, summary


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """A 784-200-10 Bernoulli VAE trained for 1 epoch on minibatches streamed from the shards."""
    from vaestream import ModelConfig, TrainConfig
    from vaestream.shards import train_from_shards

    model_dir = tmp_path_factory.mktemp("model")
    res = train_from_shards(prepared[0], model_dir, ModelConfig(latent_dim=10, hidden=(200,)),
                            TrainConfig(epochs=1, seed=1, eval_records=1000), progress=False)
    return res


def _untrained_model_dir(path: Path, config) -> Path:
    from vaestream import store
    from vaestream.model import VAE

    store.save_config(path, config)
    tf.train.Checkpoint(model=VAE(config, seed=7)).save(str(path / "ckpt" / "ckpt"))
    return path


def test_prepare_writes_every_record_once_with_a_manifest(prepared, mnist_train):
    out, summary = prepared
    m = shardset.read_manifest(out)
    assert summary["records_in"] == summary["records"] == m.records == 60000
    assert summary["dead_lettered"] == m.dead_lettered == 0
    assert (m.shape, m.dtype, m.value_min, m.value_max) == ((28, 28), "uint8", 0.0, 255.0)
    assert len(m.shards) == 4 and sum(s["records"] for s in m.shards) == 60000
    assert all(len(s["sha256"]) == 64 for s in m.shards)
    keys = [TRAIN_KEY.format(i) for i in range(60000)]
    assert m.content_hash == f"{shardset.record_hash_sum(keys, mnist_train):064x}"
    # the shards are shuffled: the first shard is not a run of consecutive records
    first = [k.decode() for k, _ in shards.read_shards(m.shard_paths()[0], batch_size=50, shuffle_buffer=0,
                                                       with_keys=True).take(1).unbatch().as_numpy_iterator()]
    idx = [int(k.rsplit(":", 1)[1]) for k in first]
    assert idx != sorted(idx)
    assert (out / "dead_letter.jsonl").read_text() == ""


def test_round_trip_prepare_train_encode_decode(trained, tmp_path, mnist_dir, mnist_test):
    from vaestream.model import VAE

    model_dir = str(trained.model_dir)
    assert trained.history[-1]["train_elbo"] > -200  # a trained model (an untrained one is below -500)
    codes_dir = tmp_path / "codes"
    s = encode.run(["--input", str(mnist_dir), "--split", "test", "--model", model_dir, "--output", str(codes_dir),
                    "--output_format", "parquet"])
    assert s["records_in"] == s["records"] == 10000 and s["dead_lettered"] == 0
    assert s["compression_ratio"] > 1.5
    assert json.loads((codes_dir / "summary.json").read_text())["records"] == 10000

    recon_dir = tmp_path / "recon"
    d = decode.run(["--input", str(codes_dir), "--model", model_dir, "--output", str(recon_dir)])
    assert d["records_in"] == d["records"] == 10000 and d["dead_lettered"] == 0

    got = {}
    for keys, x in shards.read_shards(str(recon_dir / "recon-*.tfrecord"), batch_size=2000, shuffle_buffer=0,
                                      with_keys=True):
        for k, row in zip(keys.numpy(), x.numpy()):
            got[k.decode()] = row
    assert sorted(got) == [TEST_KEY.format(i) for i in range(10000)]  # unique and complete
    x = mnist_test.reshape(10000, -1).astype(np.float32) / 255.0
    recon = np.stack([got[TEST_KEY.format(i)] for i in range(10000)]).reshape(10000, -1)
    mse = float(np.mean((recon - x) ** 2))
    untrained = VAE(trained.model.config, seed=7)
    mean0, _ = untrained.encoder_params(x)
    mse0 = float(np.mean((untrained.decoder_params(mean0)["x_mean"].numpy() - x) ** 2))
    assert mse < 0.35 * mse0, (mse, mse0)
    # the codes are the model's posterior parameters of exactly these records
    mean, log_scale = trained.model.encoder_params(x[:100])
    files = sorted(codes_dir.glob("codes-*.parquet"))
    codes = {}
    for f in files:
        for item in vb.read_codes(str(f)):
            assert item.fingerprint == trained.model.fingerprint()
            codes.update({k: (m_, ls) for k, m_, ls in zip(item.keys, item.mean, item.log_scale)})
    np.testing.assert_allclose(np.stack([codes[TEST_KEY.format(i)][0] for i in range(100)]), mean.numpy(),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.stack([codes[TEST_KEY.format(i)][1] for i in range(100)]), log_scale.numpy(),
                               rtol=1e-4, atol=1e-4)

    # decoding with another model is refused before the job starts ...
    other = _untrained_model_dir(tmp_path / "other", trained.model.config)
    with pytest.raises(ModelMismatchError, match="written by model"):
        decode.run(["--input", str(codes_dir), "--model", str(other), "--output", str(tmp_path / "x")])
    # ... and in the workers, for codes that slip past the check (the Decode transform itself)
    batch = next(b for b in vb.read_codes(str(files[0]), chunk_size=8) if isinstance(b, vb.CodeBatch))
    p = BeamTestPipeline(runner=FnApiRunner())
    _ = p | beam.Create([batch]) | vb.Decode(model_dir=str(other))
    with pytest.raises(ModelMismatchError, match="written by model"):
        vb.run_pipeline(p)


def test_block_layout_codes_are_the_bare_models_and_both_layouts_decode_alike(trained, tmp_path, mnist_test):
    """The encode job's default layout (one Example per batch): the codes are the compiled model's, bit for bit,
    under their keys (implicit name + offset, or listed where a dead letter broke the run); the summary names the
    layout and the counts add up; the per-record layout of the same job (as older outputs) decodes to the same
    reconstructions."""
    x = mnist_test[:700].reshape(700, 28, 28).astype(np.float32) / 255.0
    x[100, 5, 5] = np.nan  # block 0 loses record 100: its keys are listed, not a range
    np.save(tmp_path / "x.npy", x)
    model_dir = str(trained.model_dir)
    runs = {}
    for layout in ("block", "record"):
        flags = [] if layout == "block" else ["--code_layout", "record"]
        runs[layout] = encode.run(["--input", str(tmp_path / "x.npy"), "--model", model_dir, "--output",
                                   str(tmp_path / layout), "--chunk_size", "256", *flags])
    s = runs["block"]
    assert s["code_layout"] == "block/1" and runs["record"]["code_layout"] == "record/1"
    assert s["records_in"] == 700 and s["records"] == 699 and s["dead_lettered"] == 1
    assert json.loads((tmp_path / "block" / "summary.json").read_text())["code_layout"] == "block/1"
    files = sorted((tmp_path / "block").glob("codes-*.tfrecord"))
    examples = sum(shardset.count_records([str(f) for f in files]).values())
    assert examples == 3  # one Example per batch of up to 256 records
    batches = [b for f in files for b in vb.read_codes(str(f))]
    assert sorted(type(b.keys).__name__ for b in batches) == ["KeyRange", "KeyRange", "list"]
    got = {k: (m, ls) for b in batches for k, m, ls in zip(b.keys, b.mean, b.log_scale)}
    keep = [i for i in range(700) if i != 100]
    assert sorted(got) == [f"x.npy:{i:09d}" for i in keep]
    mean, log_scale = vb.LoadedVAE.load(model_dir).encode(x[keep], 1.0)
    assert np.array_equal(np.stack([got[f"x.npy:{i:09d}"][0] for i in keep]), mean)  # bit for bit
    assert np.array_equal(np.stack([got[f"x.npy:{i:09d}"][1] for i in keep]), log_scale)
    old = {k: (m, ls) for f in (tmp_path / "record").glob("codes-*.tfrecord") for b in vb.read_codes(str(f))
           for k, m, ls in zip(b.keys, b.mean, b.log_scale)}
    assert sorted(old) == sorted(got) and all(np.array_equal(old[k][0], got[k][0]) for k in got)
    # the per-record layout is what tf.io.parse_example reads with fixed-length features
    raw = next(iter(tf.data.TFRecordDataset(str(next((tmp_path / "record").glob("codes-*.tfrecord")))).batch(4)))
    nz = mean.shape[1]
    ex = tf.io.parse_example(raw, {"key": tf.io.FixedLenFeature([], tf.string),
                                   "mean": tf.io.FixedLenFeature([nz], tf.float32)})
    assert all(np.array_equal(m, got[k.decode()][0]) for k, m in zip(ex["key"].numpy(), ex["mean"].numpy()))
    recon = {}
    for layout in ("block", "record"):
        d = decode.run(["--input", str(tmp_path / layout), "--model", model_dir, "--output",
                        str(tmp_path / f"dec-{layout}"), "--output_dtype", "uint8"])
        assert d["records_in"] == d["records"] == 699 and d["dead_lettered"] == 0
        recon[layout] = {k.decode(): r for keys, r in shards.read_shards(
            str(tmp_path / f"dec-{layout}" / "recon-*.tfrecord"), batch_size=700, shuffle_buffer=0, with_keys=True)
            for k, r in zip(keys.numpy(), r.numpy())}
    assert sorted(recon["block"]) == sorted(got)
    assert all(np.array_equal(recon["block"][k], recon["record"][k]) for k in got)


def test_block_layout_reconstructions_are_the_bare_models_and_every_reader_reads_both(tmp_path, mnist_test,
                                                                                      small_model):
    """The decode job's default output (one Example per batch of reconstructions): the bare model's decoder means
    at the codes, bit for bit, in the requested dtype, under their keys; ``--recon_layout record`` (the shard
    layout, for tf.io.parse_example) holds the same; the summary names the layout; read_shards (also on an old
    output whose summary does not name it), read_records and the Beam TFRecord reader read both; the output
    check counts blocks by their records feature; a code block that does not parse is dead-lettered naming its
    file, and read = written + dead-lettered."""
    model_dir = str(small_model.model_dir)
    np.save(tmp_path / "x.npy", mnist_test[:700])
    encode.run(["--input", str(tmp_path / "x.npy"), "--model", model_dir, "--output", str(tmp_path / "codes"),
                "--chunk_size", "256"])
    codes = {k: m for f in sorted((tmp_path / "codes").glob("codes-*.tfrecord")) for b in vb.read_codes(str(f))
             for k, m in zip(b.keys, b.mean)}
    keys = [f"x.npy:{i:09d}" for i in range(700)]
    assert sorted(codes) == keys
    x_hat = vb.LoadedVAE.load(model_dir).decode(np.stack([codes[k] for k in keys])).reshape(700, 28, 28)
    want = {"float32": x_hat, "uint8": np.clip(np.round(x_hat * 255.0), 0, 255).astype(np.uint8)}
    bad = tmp_path / "codes" / "zz-bad.tfrecord"  # a code block of 4 records with the floats of 3
    with tf.io.TFRecordWriter(str(bad)) as w:
        w.write(vb.sinks.block_example(vb.CodeBatch("b", [f"b:{i}" for i in range(3)], np.zeros((3, 10), np.float32),
                                                    np.zeros((3, 10), np.float32), "f" * 64)).replace(
            b"records\x12\x05\x1a\x03\x0a\x01\x03", b"records\x12\x05\x1a\x03\x0a\x01\x04"))
    for layout, dtype in (("block", "uint8"), ("record", "uint8"), ("block", "float32")):
        out = tmp_path / f"rec-{layout}-{dtype}"
        d = decode.run(["--input", str(tmp_path / "codes"), "--model", model_dir, "--output", str(out),
                        "--output_dtype", dtype] + (["--recon_layout", "record"] if layout == "record" else []))
        assert d["recon_layout"] == json.loads((out / "summary.json").read_text())["recon_layout"] == f"{layout}/1"
        assert (d["records_in"], d["records"], d["dead_lettered"]) == (701, 700, 1)
        (letter,) = [json.loads(line) for line in (out / "dead_letter.jsonl").read_text().splitlines()]
        assert letter["key"] == str(bad) and "zz-bad.tfrecord" in letter["reason"]
        assert "4 records with 30 mean" in letter["reason"]
        files = [str(f) for f in sorted(out.glob("recon-*.tfrecord"))]
        assert sum(shardset.count_records(files).values()) == (3 if layout == "block" else 700)  # Examples
        assert sum(shardset.count_records(files, blocks=True).values()) == 700
        got = {k.decode(): r for ks, r in shards.read_shards(str(out), batch_size=300, shuffle_buffer=0,
                                                             with_keys=True) for k, r in zip(ks.numpy(), r.numpy())}
        assert sorted(got) == keys
        assert np.array_equal(np.stack([got[k] for k in keys]), want[dtype])  # bit for bit, the same dtype
        assert sorted(map(bytes, (r.tobytes() for r in shards.read_records(files, (28, 28), dtype)))) == sorted(
            r.tobytes() for r in want[dtype])
        beam_read = [b for f in files for b in vb.read_range({"path": f, "kind": "tfrecord", "start": 0,
                                                              "stop": None}, chunk_size=100)]
        assert all(isinstance(b, vb.RecordBatch) and len(b) <= 100 for b in beam_read)
        assert {k: r.tobytes() for b in beam_read for k, r in zip(b.keys, b.records)} == {
            k: want[dtype][i].tobytes() for i, k in enumerate(keys)}
    # the record layout is the shard layout: tf.io.parse_example with fixed-length features reads it
    out = tmp_path / "rec-record-uint8"
    raw = next(iter(tf.data.TFRecordDataset(str(next(out.glob("recon-*.tfrecord")))).batch(4)))
    ex = tf.io.parse_example(raw, {"key": tf.io.FixedLenFeature([], tf.string),
                                   "data": tf.io.FixedLenFeature([], tf.string)})
    for k, v in zip(ex["key"].numpy(), tf.io.decode_raw(ex["data"], tf.uint8).numpy()):
        assert np.array_equal(v.reshape(28, 28), want["uint8"][keys.index(k.decode())])
    # an output written before the layout was named (no recon_layout in its summary) reads as before
    summary = json.loads((out / "summary.json").read_text())
    del summary["recon_layout"]
    (out / "summary.json").write_text(json.dumps(summary))
    assert sum(int(b.shape[0]) for b in shards.read_shards(str(out), batch_size=300, shuffle_buffer=0)) == 700


def _poisoned_inputs(d: Path, mnist_test: np.ndarray) -> tuple[list[str], set[str], dict[str, str]]:
    """Inputs of every format with bad records planted; returns (inputs, good keys, bad key -> reason)."""
    good: set[str] = set()
    bad: dict[str, str] = {}
    np.save(d / "good.npy", mnist_test[:300])
    good |= {f"good.npy:{i:09d}" for i in range(300)}
    # raw IDX of 100 records, cut inside record 57
    recs = mnist_test[300:400]
    raw = struct.pack(">HBB3I", 0, 8, 3, 100, 28, 28) + recs.tobytes()
    (d / "cut-images-idx3-ubyte").write_bytes(raw[:16 + 57 * 784 + 100])
    good |= {f"cut-images-idx3-ubyte:{i:09d}" for i in range(57)}
    bad["cut-images-idx3-ubyte:000000057..cut-images-idx3-ubyte:000000099"] = "truncated"
    # a gzip IDX cut in the middle of the stream
    gz = gzip.compress(struct.pack(">HBB3I", 0, 8, 3, 100, 28, 28) + recs.tobytes())
    (d / "cutgz-images-idx3-ubyte.gz").write_bytes(gz[: len(gz) // 2])
    # CSV of model inputs in [0, 1] with a header, NaN, a short line, an unparsable line, a value out of range
    lines = [",".join(f"p{i}" for i in range(784))]
    for j, r in enumerate(mnist_test[400:450]):
        vals = [f"{v / 255:.6f}" for v in r.reshape(-1)]
        lineno = j + 2
        key = f"poisoned.csv:{lineno:09d}"
        if j == 10:
            vals[5] = "nan"
            bad[key] = "NaN"
        elif j == 20:
            vals = vals[:-1]
            bad[key] = "783 values, expected 784"
        elif j == 30:
            vals = ["abc"] + vals[1:]
            bad[key] = "not a row of numbers"
        elif j == 40:
            vals[100] = "2.5"
            bad[key] = "outside the support"
        else:
            good.add(key)
        lines.append(",".join(vals))
    (d / "poisoned.csv").write_text("\n".join(lines) + "\n")
    # a folder of PNG images, one of them corrupt
    from PIL import Image

    (d / "pngs").mkdir()
    for j, r in enumerate(mnist_test[450:470]):
        Image.fromarray(r).save(d / "pngs" / f"img{j:03d}.png")
        good.add(f"img{j:03d}.png")
    (d / "pngs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    bad["broken.png"] = "not a readable PNG"
    # TFRecord of shard Examples, the last record cut short
    with tf.io.TFRecordWriter(str(d / "cut.tfrecord")) as w:
        for raw_ex in shardset.record_examples([f"tf:{i:03d}" for i in range(30)], mnist_test[470:500]):
            w.write(raw_ex)
    data = (d / "cut.tfrecord").read_bytes()
    (d / "cut.tfrecord").write_bytes(data[:-50])
    good |= {f"tf:{i:03d}" for i in range(29)}
    bad["cut.tfrecord:000000029.."] = "truncated or corrupt TFRecord"
    inputs = [str(d / n) for n in ("good.npy", "cut-images-idx3-ubyte", "cutgz-images-idx3-ubyte.gz",
                                   "poisoned.csv", "pngs", "cut.tfrecord")]
    return inputs, good, bad


def test_poisoned_inputs_go_to_dead_letter_and_every_good_record_is_encoded(trained, tmp_path, mnist_test,
                                                                            capsys):
    """Through the CLI, on two worker processes (direct_running_mode=multi_processing)."""
    from vaestream.cli import main

    inputs, good, bad = _poisoned_inputs(tmp_path, mnist_test)
    out = tmp_path / "out"
    rc = main(["encode", "--input", *inputs, "--model", str(trained.model_dir), "--output", str(out),
               "--chunk_size", "64", "--json",
               "--direct_running_mode", "multi_processing", "--direct_num_workers", "2"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    dead = [json.loads(line) for line in (out / "dead_letter.jsonl").read_text().splitlines()]
    by_key = {d["key"]: d for d in dead}
    for key, reason in bad.items():
        assert key in by_key, (key, sorted(by_key))
        assert reason in by_key[key]["reason"]
    gz_dead = [d for d in dead if d["source"].endswith("cutgz-images-idx3-ubyte.gz")]
    assert len(gz_dead) == 1 and "truncated" in gz_dead[0]["reason"]
    got = set()
    for f in out.glob("codes-*.tfrecord"):
        for item in vb.read_codes(str(f)):
            got |= set(item.keys)
    gz_good = {k for k in got if k.startswith("cutgz-images")}  # complete records before the cut
    assert got - gz_good == good  # every good record encoded, nothing else
    assert len(dead) == len(bad) + 1
    assert s["records"] == len(got) and s["dead_lettered"] == len(dead)
    assert s["records_in"] == s["records"] + s["dead_lettered"] == len(good) + len(gz_good) + len(dead)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "runinference"])
def test_transforms_with_test_pipeline(trained, tmp_path, mnist_test, overlap):
    """ReadRecords -> Validate -> Encode as a user would drop them into a pipeline; the overlapped encoder
    (one batch ahead on a thread) and stock RunInference give every record's code once."""
    recs = mnist_test[:200].copy()
    recs_f = recs.astype(np.float32) / 255.0
    recs_f[7, 3] = np.nan
    np.save(tmp_path / "a.npy", recs)
    np.save(tmp_path / "b.npy", recs_f)
    x = recs.reshape(200, -1).astype(np.float32) / 255.0
    mean, _ = trained.model.encoder_params(x)
    want = {f"{n}:{i:09d}": mean.numpy()[i] for n in ("a.npy", "b.npy") for i in range(200) if (n, i) != ("b.npy", 7)}

    def close_to_reference(actual):
        got = {k: m for b in actual for k, m in zip(b.keys, b.mean)}
        assert sorted(got) == sorted(want)
        for k, v in got.items():
            np.testing.assert_allclose(v, want[k], rtol=1e-4, atol=1e-4)

    with BeamTestPipeline(runner=FnApiRunner()) as p:
        read = p | vb.ReadRecords([str(tmp_path / "a.npy"), str(tmp_path / "b.npy")], chunk_size=64,
                                  split_records=150)
        valid = read[vb.RECORDS] | vb.Validate(shape=(28, 28), likelihood="bernoulli")
        codes = valid[vb.RECORDS] | vb.Encode(model_dir=str(trained.model_dir), max_records=128,
                                                      overlap=overlap)
        assert_that(codes, close_to_reference, label="codes")
        dead = valid[vb.DEAD_LETTER] | beam.Map(lambda d: (d.key, "NaN" in d.reason))
        assert_that(dead, equal_to([("b.npy:000000007", True)]), label="dead")


def test_encode_job_from_export(trained, tmp_path, mnist_test):
    """The encode job with --saved_model on vaestream.serving.export's layout gives the model directory's codes."""
    from vaestream.serving.export import export

    base = tmp_path / "exports"
    export(trained.model_dir, base)
    np.save(tmp_path / "few.npy", mnist_test[:200])
    s = encode.run(["--input", str(tmp_path / "few.npy"), "--saved_model", str(base), "--output",
                    str(tmp_path / "codes")])
    assert s["records"] == 200
    got = {}
    for f in (tmp_path / "codes").glob("codes-*.tfrecord"):
        for item in vb.read_codes(str(f)):
            assert item.fingerprint == trained.model.fingerprint()
            got.update(zip(item.keys, item.mean))
    mean, _ = trained.model.encoder_params(mnist_test[:200].reshape(200, -1).astype(np.float32) / 255.0)
    np.testing.assert_allclose(np.stack([got[f"few.npy:{i:09d}"] for i in range(200)]), mean.numpy(),
                               rtol=1e-4, atol=1e-4)


def test_saved_model_handler_matches_model_dir(trained, tmp_path, mnist_test):
    """A SavedModel of another layout (functions as attributes, a fingerprint variable) gives the same codes."""
    model = trained.model
    d = model.config.input_dim

    class Export(tf.Module):
        def __init__(self):
            super().__init__()
            self.vae = model
            self.fingerprint = tf.Variable(model.fingerprint(), trainable=False)

        @tf.function(input_signature=[tf.TensorSpec([None, d], tf.float32)])
        def encode(self, x):
            mean, log_scale = self.vae.encoder_params(x)
            return {"mean": mean, "log_scale": log_scale}

        @tf.function(input_signature=[tf.TensorSpec([None, model.config.latent_dim], tf.float32)])
        def decode(self, z):
            return {"x_mean": self.vae.decoder_params(z)["x_mean"]}

    path = tmp_path / "export"
    tf.saved_model.save(Export(), str(path))
    (path / "assets").mkdir(exist_ok=True)
    (path / "assets" / "config.json").write_text(model.config.to_json())
    a = vb.LoadedVAE.load(saved_model=str(path))
    b = vb.LoadedVAE.load(model_dir=str(trained.model_dir))
    assert a.fingerprint == b.fingerprint and a.config == b.config
    handler = vb.VAEModelHandler(saved_model=str(path))
    batch = vb.RecordBatch("t", [f"k{i}" for i in range(50)], mnist_test[:50], 1 / 255)
    (ca,) = handler.run_inference([batch], handler.load_model())
    mb, lb = b.encode(mnist_test[:50], 1 / 255)
    np.testing.assert_allclose(ca.mean, mb, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ca.log_scale, lb, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.decode(mb), b.decode(mb), rtol=1e-4, atol=1e-5)


def test_encode_job_with_the_coder_writes_one_container_per_batch_and_decode_reads_it(trained, tmp_path, mnist_train,
                                                                                     mnist_test):
    """--coder: each row holds a batch's keys and one container; together they hold every record once, each
    decompressing to the codec's reconstruction of that record, and the decode job reproduces them."""
    from vaestream.coding import codec as codec_mod
    model_dir = tmp_path / "model"
    import shutil

    shutil.copytree(trained.model_dir, model_dir)
    codec_mod.write_tables(model_dir, mnist_train[:2000])
    np.save(tmp_path / "few.npy", mnist_test[:300])
    codec = codec_mod.load(model_dir)
    x = mnist_test[:300].reshape(300, -1).astype(np.float32) / 255.0
    want = np.asarray(codec.decode(codec.encode(x))).reshape(300, -1)
    for fmt in ("parquet", "tfrecord"):
        out = tmp_path / f"codes-{fmt}"
        mode = "overlap" if fmt == "tfrecord" else "runinference"  # both ways of running the model
        s = encode.run(["--input", str(tmp_path / "few.npy"), "--model", str(model_dir), "--output", str(out),
                        "--coder", "--output_format", fmt, "--chunk_size", "128", "--inference", mode])
        assert s["records"] == 300 and s["dead_lettered"] == 0 and s["coder"] == "lossy"
        got = {}
        rows = 0
        blob_bytes = []
        for f in out.glob(f"codes-*.{fmt}"):
            for item in vb.read_codes(str(f)):
                rows += 1
                assert item.coded and item.mean is None
                blob_bytes.append(len(item.container))
                rec = np.asarray(codec.decompress(item.container)).reshape(len(item), -1)
                for k, r in zip(item.keys, rec):
                    assert k not in got
                    got[k] = r
        assert rows == 3  # 300 records in chunks of 128: 128 + 128 + 44
        assert sorted(got) == [f"few.npy:{i:09d}" for i in range(300)]
        for i in range(300):
            np.testing.assert_array_equal(got[f"few.npy:{i:09d}"], want[i])
        # far smaller than float codes (2 x Nz float32 a record): the containers, and the whole files
        assert sum(blob_bytes) < 300 * 8 * trained.model.config.latent_dim / 4
        floats = encode.run(["--input", str(tmp_path / "few.npy"), "--model", str(model_dir), "--output",
                             str(tmp_path / f"floats-{fmt}"), "--output_format", fmt])
        assert s["bytes_out"] < floats["bytes_out"] / 2
        d = decode.run(["--input", str(out), "--model", str(model_dir), "--output", str(tmp_path / f"rec-{fmt}"),
                        "--output_format", "parquet", "--inference", mode])
        assert d["records"] == 300 and d["dead_lettered"] == 0
        import pyarrow.parquet as pq

        back = {}
        for f in (tmp_path / f"rec-{fmt}").glob(f"{decode.RECON}-*.parquet"):
            t = pq.read_table(f).to_pydict()
            back.update(zip(t["key"], t["data"]))
        assert len(back) == 300
        for i in range(0, 300, 7):
            np.testing.assert_allclose(back[f"few.npy:{i:09d}"], want[i], rtol=0, atol=1e-6)


def test_read_records_with_validate_equals_read_then_validate(tmp_path, mnist_test):
    """ReadRecords(validate=Validate(...)) (one step, one dead-letter stream) gives the same records and the
    same dead letters, with the same reasons, as ReadRecords -> Validate -> Flatten of the two dead-letter
    outputs: bad values, records outside the decoder's support, a wrong record size and a truncated file."""
    recs = mnist_test[:300].astype(np.float32) / 255.0
    recs[5, 0, 0] = np.nan
    recs[17, 3, 3] = 1.5  # outside [0, 1]
    np.save(tmp_path / "a.npy", recs)
    np.save(tmp_path / "wide.npy", np.zeros((3, 30, 30), np.float32))  # 900 values a record
    raw = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[:len(raw) - 784 * 4 * 10 - 100])  # ends inside a record
    paths = [str(tmp_path / n) for n in ("a.npy", "wide.npy", "cut.npy")]

    def run(fused: bool):
        check = vb.Validate(shape=(28, 28), likelihood="bernoulli")
        p = vb.make_pipeline(beam.options.pipeline_options.PipelineOptions([]))
        if fused:
            read = p | vb.ReadRecords(paths, chunk_size=64, split_records=100, validate=check)
            good, dead = read[vb.RECORDS], read[vb.DEAD_LETTER]
        else:
            read = p | vb.ReadRecords(paths, chunk_size=64, split_records=100)
            valid = read[vb.RECORDS] | check
            good = valid[vb.RECORDS]
            dead = (read[vb.DEAD_LETTER], valid[vb.DEAD_LETTER]) | beam.Flatten()
        out = tmp_path / ("fused" if fused else "separate")
        _ = (good | beam.FlatMap(lambda b: [json.dumps([k, float(r.sum()), b.scale])
                                            for k, r in zip(b.keys, b.records)])
             | "WriteGood" >> beam.io.WriteToText(str(out / "good"), shard_name_template=""))
        _ = (dead | beam.Map(lambda d: json.dumps(list(d)))
             | "WriteDead" >> beam.io.WriteToText(str(out / "dead"), shard_name_template=""))
        result = vb.run_pipeline(p)
        return (sorted((out / "good").read_text().splitlines()), sorted((out / "dead").read_text().splitlines()),
                vb.counters(result))

    good_f, dead_f, counts_f = run(True)
    good_s, dead_s, counts_s = run(False)
    assert good_f == good_s
    assert dead_f == dead_s
    assert counts_f == counts_s
    keys = {json.loads(d)[1] for d in dead_f}
    assert {"a.npy:000000005", "a.npy:000000017", "wide.npy:000000000", "cut.npy:000000005",
            "cut.npy:000000017"} <= keys
    assert any("truncated" in json.loads(d)[2] for d in dead_f)
    # a.npy: 298 good records; cut.npy: its complete records less the 2 bad ones
    assert len(good_f) == 298 + (300 - 11) - 2
    with pytest.raises(vb.DataError, match="Validate"):
        vb.ReadRecords(paths, validate=(28, 28))


def test_loaded_model_is_reused_only_while_alive_and_unchanged(trained, tmp_path):
    """LoadedVAE.load(reuse=True) hands out the live model of an unchanged directory (the decode job's check
    and its workers share one load), and loads afresh once the directory's files change."""
    import os
    import shutil

    model_dir = tmp_path / "m"
    shutil.copytree(trained.model_dir, model_dir)
    a = vb.LoadedVAE.load(str(model_dir), reuse=True)
    assert vb.LoadedVAE.load(str(model_dir), reuse=True) is a
    assert vb.LoadedVAE.load(str(model_dir)) is not a  # reuse is asked for, never implied
    handler_model = vb.VAEModelHandler(str(model_dir), mode="decode").load_model()
    assert handler_model is not a and handler_model._decode is a._decode  # a copy sharing the loaded functions
    index = next((model_dir / "ckpt").glob("*.index"))
    st = index.stat()
    os.utime(index, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    b = vb.LoadedVAE.load(str(model_dir), reuse=True)
    assert b is not a and b.fingerprint == a.fingerprint


# -- the input-scaling rule, the jobs' output contract, summaries, the CLI's job commands --------------------------

def _cli(*args, cwd=None):
    """``vaestream ARGS`` in a subprocess: (exit code, stdout, stderr)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-m", "vaestream.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def _main(capsys, *args):
    """``vaestream ARGS`` in this process (the CLI's own main, where a fresh process proves nothing more):
    (exit code, stdout, stderr)."""
    from vaestream.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _idx_bytes(recs: np.ndarray) -> bytes:
    return struct.pack(">HBB3I", 0, 8, 3, len(recs), *recs.shape[1:]) + recs.tobytes()


def _codes_by_key(out: Path) -> dict[str, np.ndarray]:
    got = {}
    for f in sorted(out.glob("codes-*.tfrecord")):
        for item in vb.read_codes(str(f)):
            got.update(zip(item.keys, item.mean))
    return got


def test_integer_csv_is_scaled_like_the_uint8_idx_of_the_same_records(tmp_path, mnist_test, small_model,
                                                                     coded_model_dir, capsys):
    """An integer CSV (0..255) of real MNIST rows goes through ``vaestream train``, ``vaestream compress`` and the
    encode job with the very model inputs of the uint8 IDX of the same records: the same trained weights, the same
    container bytes, the same codes."""
    recs = mnist_test[:300]
    (tmp_path / "rows-images-idx3-ubyte").write_bytes(_idx_bytes(recs))
    (tmp_path / "rows.csv").write_text("\n".join(",".join(str(int(v)) for v in r.reshape(-1)) for r in recs) + "\n")
    fps = {}
    for name in ("rows.csv", "rows-images-idx3-ubyte"):
        rc, out, err = _main(capsys, "train", "--data", tmp_path / name, "--out", tmp_path / f"m-{name}", "--steps",
                             20, "--latent-dim", 4, "--hidden", 32, "--steps-per-call", 10, "--no-progress", "--json")
        assert rc == 0, err[-2000:]
        s = json.loads(out.strip().splitlines()[-1])
        assert s["steps"] == 20
        from vaestream.store import load_model

        weights = [v.numpy() for v in load_model(tmp_path / f"m-{name}").trainable_variables]
        fps[name] = (weights, s.get("train_elbo"))
    # the same weights after 20 steps (the fingerprints differ only by the record shape: [784] vs [28, 28])
    for a, b in zip(fps["rows.csv"][0], fps["rows-images-idx3-ubyte"][0], strict=True):
        np.testing.assert_array_equal(a, b)
    assert fps["rows.csv"][1] == fps["rows-images-idx3-ubyte"][1]
    assert fps["rows.csv"][1] < 0  # a Bernoulli ELBO of inputs in [0, 1] (raw 0..255 gives a large positive one)

    blobs = {}
    for name in ("rows.csv", "rows-images-idx3-ubyte"):
        rc, out, err = _main(capsys, "compress", tmp_path / name, tmp_path / f"{name}.vaez", "--model",
                             coded_model_dir)
        assert rc == 0, err[-2000:]
        blobs[name] = (tmp_path / f"{name}.vaez").read_bytes()
    assert blobs["rows.csv"] == blobs["rows-images-idx3-ubyte"]

    model = str(small_model.model_dir)
    rc, out, err = _main(capsys, "encode", "--input", tmp_path / "rows.csv", "--model", model, "--output",
                         tmp_path / "e-csv", "--json")
    assert rc == 0, err[-2000:]
    s = json.loads(out.strip().splitlines()[-1])
    assert (s["records_in"], s["records"], s["dead_lettered"]) == (300, 300, 0)
    encode.run(["--input", str(tmp_path / "rows-images-idx3-ubyte"), "--model", model, "--output",
                str(tmp_path / "e-idx")])
    a, b = _codes_by_key(tmp_path / "e-csv"), _codes_by_key(tmp_path / "e-idx")
    assert len(a) == len(b) == 300
    for i in range(300):  # CSV keys are line numbers (from 1), IDX keys record indices (from 0)
        np.testing.assert_array_equal(a[f"rows.csv:{i + 1:09d}"], b[f"rows-images-idx3-ubyte:{i:09d}"])


def test_truncated_gzip_keeps_its_whole_records_and_an_all_bad_file_fails(tmp_path, mnist_dir, small_model,
                                                                           capsys):
    """A real MNIST .gz cut short: every whole record before the cut is encoded and one dead letter says where it
    breaks (exit 0); --max_dead_letter_fraction below that share fails (exit 3); a file whose every record is bad
    writes its dead letters and fails (exit 3, the reason on stderr), from the CLI (the all-bad file in a fresh
    process) and from pipelines/encode.py."""
    import subprocess
    import sys
    import zlib

    blob = (mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes()
    cut = tmp_path / "t10k-images-idx3-ubyte.gz"
    cut.write_bytes(blob[:120_000])
    whole = (len(zlib.decompressobj(31).decompress(blob[:120_000])) - 16) // 784  # what zcat recovers
    assert 500 < whole < 1000
    model = str(small_model.model_dir)
    rc, out, err = _main(capsys, "encode", "--input", cut, "--model", model, "--output", tmp_path / "o", "--json")
    assert rc == 0, err[-2000:]
    s = json.loads(out.strip().splitlines()[-1])
    assert (s["records_in"], s["records"], s["dead_lettered"]) == (whole + 1, whole, 1)
    (dead,) = [json.loads(line) for line in (tmp_path / "o" / "dead_letter.jsonl").read_text().splitlines()]
    assert dead["reason"].startswith(f"{cut}: truncated at record {whole}:")
    assert dead["key"] == f"t10k-images-idx3-ubyte.gz:{whole:09d}..t10k-images-idx3-ubyte.gz:000009999"
    assert sorted(_codes_by_key(tmp_path / "o")) == [f"t10k-images-idx3-ubyte.gz:{i:09d}" for i in range(whole)]

    rc, out, err = _main(capsys, "encode", "--input", cut, "--model", model, "--output", tmp_path / "strict",
                         "--json", "--max_dead_letter_fraction", 0.0001)
    assert rc == 3
    assert f"vaestream: error: encode: dead-lettered 1 of the {whole + 1} records read" in err
    assert "Traceback" not in err
    assert json.loads(out.strip().splitlines()[-1])["records"] == whole  # the summary, and the outputs stay
    assert len(_codes_by_key(tmp_path / "strict")) == whole

    bad = np.full((40, 784), 2.5, np.float32)  # every record outside the Bernoulli decoder's [0, 1]
    np.save(tmp_path / "bad.npy", bad)
    rc, out, err = _cli("encode", "--input", tmp_path / "bad.npy", "--model", model, "--output", tmp_path / "b")
    assert rc == 3
    assert "vaestream: error: encode: wrote no record: all 40 records read were dead-lettered" in err
    assert "Traceback" not in err
    assert "records written" in out  # the summary table is printed before the error
    lines = (tmp_path / "b" / "dead_letter.jsonl").read_text().splitlines()
    assert len(lines) == 40 and all("outside the support" in json.loads(x)["reason"] for x in lines)
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["dead_lettered"] == 40
    proc = subprocess.run([sys.executable, "-m", "pipelines.encode", "--input", str(tmp_path / "bad.npy"), "--model",
                           model, "--output", str(tmp_path / "b2")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3 and "wrote no record" in proc.stderr and "Traceback" not in proc.stderr


def test_job_summaries_wall_seconds_and_bytes_that_agree(tmp_path, mnist_dir, small_model):
    """The summaries: ``seconds`` is the job's wall time; ``bytes_in`` is the input files' size and ``bytes_out``
    the output files' (encode's bytes out = decode's bytes in for the same files); prepare reports no
    compression ratio; the dead-letter file it names exists."""
    import time

    model = str(small_model.model_dir)
    src = mnist_dir / "t10k-images-idx3-ubyte.gz"
    t0 = time.perf_counter()
    e = encode.run(["--input", str(src), "--model", model, "--output", str(tmp_path / "codes")])
    wall = time.perf_counter() - t0
    assert 0.9 * wall - 0.1 <= e["seconds"] <= wall
    codes = sorted((tmp_path / "codes").glob("codes-*.tfrecord"))
    assert e["bytes_in"] == src.stat().st_size
    assert e["bytes_out"] == sum(p.stat().st_size for p in codes)
    assert e["record_bytes"] == 10000 * 784 and e["compression_ratio"] == round(10000 * 784 / e["bytes_out"], 3)
    assert Path(e["dead_letter"]).exists()
    d = decode.run(["--input", str(tmp_path / "codes"), "--model", model, "--output", str(tmp_path / "recon")])
    assert d["bytes_in"] == e["bytes_out"]
    assert d["bytes_out"] == sum(p.stat().st_size for p in (tmp_path / "recon").glob("recon-*.tfrecord"))
    assert "compression_ratio" not in d
    np.save(tmp_path / "few.npy", np.zeros((50, 28, 28), np.uint8))
    p = prepare.run(["--input", str(tmp_path / "few.npy"), "--output", str(tmp_path / "shards"), "--num_shards", "2"])
    assert "compression_ratio" not in p and p["bytes_in"] == (tmp_path / "few.npy").stat().st_size
    assert (tmp_path / "shards" / "dead_letter.jsonl").read_text() == ""


def test_encode_coder_without_tables_is_refused_in_one_line_and_beam_temp_is_cleared(tmp_path, small_model,
                                                                                     mnist_test, capsys):
    """``vaestream encode --coder`` with a model that has no coder tables: one ``vaestream: error:`` line, no
    traceback, nothing written (in a fresh process); ``beam-temp-*`` folders under --output (a failed run's) go at the
    next run (in this process)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(small_model.model_dir, model, ignore=shutil.ignore_patterns("coder_tables.npz"))
    np.save(tmp_path / "x.npy", mnist_test[:64])
    out = tmp_path / "out"
    rc, stdout, err = _cli("encode", "--input", tmp_path / "x.npy", "--model", model, "--output", out, "--coder")
    assert rc == 1
    lines = err.strip().splitlines()
    assert lines == [line for line in lines if line.startswith("vaestream: error:")]
    assert "has no coder tables" in err and "Traceback" not in err
    assert not list(out.glob("codes-*")) and not list(out.glob("beam-temp-*"))
    (out / "beam-temp-codes-0123456789abcdef").mkdir(parents=True)
    (out / "beam-temp-codes-0123456789abcdef" / "part").write_bytes(b"x")
    rc, stdout, err = _main(capsys, "encode", "--input", tmp_path / "x.npy", "--model", model, "--output", out,
                            "--json")
    assert rc == 0, err[-2000:]
    assert json.loads(stdout.strip().splitlines()[-1])["records"] == 64
    assert not list(out.glob("beam-temp-*"))


def test_job_flags_are_defined_without_beam_or_tensorflow():
    """``vaestream.cli.beam.add_subcommands`` (the prepare / encode / decode flags, every one with help) imports
    neither Apache Beam nor TensorFlow."""
    import subprocess
    import sys

    code = ("import argparse, sys; import vaestream.cli.beam as m; p = argparse.ArgumentParser(); "
            "m.add_subcommands(p.add_subparsers(dest='c')); "
            "subs = p._subparsers._group_actions[0].choices; "
            "print(sorted(subs)); "
            "print([a.option_strings for s in subs.values() for a in s._actions if not a.help]); "
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'apache_beam', 'tensorflow', 'keras'}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["['decode', 'encode', 'prepare']", "[]", "[]"]
