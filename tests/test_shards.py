"""The shard format: Example serialization, manifest, tf.data reading (no Beam here; see test_pipelines)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from vaestream import shards, shardset
from vaestream.errors import DataError


def _parse(raw: bytes) -> dict:
    f = tf.train.Example.FromString(raw).features.feature
    out = {}
    for k, v in f.items():
        kind = v.WhichOneof("kind")
        out[k] = list(getattr(v, kind).value)
    return out


@pytest.mark.parametrize("keys", [["a0", "a1", "a2"], ["x", "longer-key-" * 20, ""]])
def test_serialize_examples_matches_protobuf(keys):
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, (3, 4, 5), dtype=np.uint8)
    floats = rng.normal(size=(3, 7)).astype(np.float32)
    got = shardset.serialize_examples(keys, rows={"data": rows}, floats={"mean": floats},
                                      constants={"fingerprint": shardset.bytes_feature([b"f" * 64]),
                                                 "shape": shardset.int64_feature([4, 5, 300])})
    for i, raw in enumerate(got):
        want = tf.train.Example(features=tf.train.Features(feature={
            "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[keys[i].encode()])),
            "data": tf.train.Feature(bytes_list=tf.train.BytesList(value=[rows[i].tobytes()])),
            "mean": tf.train.Feature(float_list=tf.train.FloatList(value=floats[i])),
            "fingerprint": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"f" * 64])),
            "shape": tf.train.Feature(int64_list=tf.train.Int64List(value=[4, 5, 300]))}))
        assert _parse(raw) == _parse(want.SerializeToString())
    # tf.io.parse_example reads the batch too
    ex = tf.io.parse_example(tf.constant(got), {"mean": tf.io.FixedLenFeature([7], tf.float32),
                                                "key": tf.io.FixedLenFeature([], tf.string)})
    np.testing.assert_array_equal(ex["mean"].numpy(), floats)
    assert [k.decode() for k in ex["key"].numpy()] == keys


def test_serialize_variable_bytes_feature():
    got = shardset.serialize_examples(["k1", "k2"], variable={"code": [b"\x00\x01" * 100, b""]})
    assert _parse(got[0])["code"] == [b"\x00\x01" * 100]
    assert _parse(got[1])["code"] == [b""]
    with pytest.raises(ValueError):
        shardset.int64_feature([-1])


def test_content_hash_is_order_independent():
    rng = np.random.default_rng(1)
    recs = rng.integers(0, 256, (50, 9), dtype=np.uint8)
    keys = [f"r{i}" for i in range(50)]
    perm = rng.permutation(50)
    whole = shardset.record_hash_sum(keys, recs)
    parts = (shardset.record_hash_sum([keys[i] for i in perm[:20]], recs[perm[:20]])
             + shardset.record_hash_sum([keys[i] for i in perm[20:]], recs[perm[20:]])) % (1 << 256)
    assert whole == parts
    recs2 = recs.copy()
    recs2[3, 0] ^= 1
    assert shardset.record_hash_sum(keys, recs2) != whole


def _write_set(tmp_path, records: np.ndarray, n_files: int = 3, layout: str = "record") -> str:
    """A shard set written by hand in the documented layout (what pipelines/prepare.py writes; ``layout="block"``:
    record blocks of up to 128 records, as the decode job writes its reconstructions)."""
    keys = [f"rec:{i:06d}" for i in range(len(records))]
    entries = []
    for s, idx in enumerate(np.array_split(np.arange(len(records)), n_files)):
        name = f"shard-{s:05d}-of-{n_files:05d}.tfrecord"
        with tf.io.TFRecordWriter(str(tmp_path / name)) as w:
            for part in np.array_split(idx, -(-len(idx) // 128)) if layout == "block" else [idx]:
                for raw in shardset.recon_examples([keys[i] for i in part], records[part], layout):
                    w.write(raw)
        entries.append({"path": name, "records": len(idx), "bytes": (tmp_path / name).stat().st_size, "sha256": ""})
    m = shardset.Manifest(records=len(records), shape=records.shape[1:], dtype=records.dtype.name,
                          scale=1 / 255 if records.dtype == np.uint8 else 1.0, value_min=float(records.min()),
                          value_max=float(records.max()), shards=entries,
                          content_hash=f"{shardset.record_hash_sum(keys, records):064x}")
    (tmp_path / shardset.MANIFEST).write_text(m.to_json())
    return str(tmp_path)


@pytest.mark.parametrize("layout", ["record", "block"])
def test_read_shards_streams_every_record_once(tmp_path, layout):
    rng = np.random.default_rng(2)
    recs = rng.integers(0, 256, (1000, 6, 5), dtype=np.uint8)
    d = _write_set(tmp_path, recs, layout=layout)
    assert shardset.is_shard_spec(d) and shardset.is_shard_spec(d + "/manifest.json")
    got_keys, got = [], []
    for keys, x in shards.read_shards(d, batch_size=64, shuffle_buffer=200, seed=3, with_keys=True):
        assert x.dtype == tf.uint8 and tuple(x.shape[1:]) == (6, 5) and x.shape[0] <= 64
        got_keys += [k.decode() for k in keys.numpy()]
        got.append(x.numpy())
    got = np.concatenate(got)
    assert len(got_keys) == 1000 and len(set(got_keys)) == 1000
    assert got_keys != sorted(got_keys)  # shuffled
    order = np.array([int(k.split(":")[1]) for k in got_keys])
    np.testing.assert_array_equal(got, recs[order])
    # the same seed gives the same order; scaled inputs are float32 [B, D] in [0, 1]
    again = [k.decode() for k, _ in shards.read_shards(d, batch_size=64, shuffle_buffer=200, seed=3,
                                                        with_keys=True).unbatch().as_numpy_iterator()]
    assert again == got_keys
    x = next(iter(shards.read_shards(d, batch_size=10, shuffle_buffer=0, scaled=True)))
    assert x.dtype == tf.float32 and x.shape == (10, 30)
    np.testing.assert_allclose(x.numpy(), recs[:10].reshape(10, -1) / 255.0, rtol=1e-6)
    # a glob of shard files works without the manifest
    n = sum(int(b.shape[0]) for b in shards.read_shards(str(tmp_path / "shard-*.tfrecord"), batch_size=128,
                                                         shuffle_buffer=0))
    assert n == 1000
    paths = shardset.read_manifest(d).shard_paths()
    assert sum(shardset.count_records(paths, blocks=True).values()) == 1000
    assert sum(shardset.count_records(paths).values()) == (1000 if layout == "record" else 9)  # Examples
    np.testing.assert_array_equal(shards.read_records(paths, (6, 5), "uint8"), recs)


class _Range:
    """Keys ``NAME:`` + 9-digit offsets start .. stop - 1 (what record_block stores as a name and a start)."""
    digits = 9

    def __init__(self, name: str, start: int, stop: int):
        self.name, self.start, self.stop = name, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        return (f"{self.name}:{i:09d}" for i in range(self.start, self.stop))


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_record_block_is_one_example_of_the_documented_features(tmp_path, dtype):
    recs = np.random.default_rng(5).integers(0, 256, (7, 3, 4)).astype(dtype)
    raw = shardset.record_block(_Range("f.npy", 40, 47), recs)
    assert shardset.leading_records(raw[:64]) == 7
    f = _parse(raw)
    assert sorted(f) == ["data", "dtype", "key_name", "key_start", "records", "shape"]
    assert (f["records"], f["shape"], f["dtype"], f["key_name"], f["key_start"]) == (
        [7], [3, 4], [dtype.encode()], [b"f.npy"], [40])
    assert f["data"] == [recs.astype(recs.dtype.newbyteorder("<")).tobytes()]
    # tf.io.parse_example reads it with fixed-length features (the keys listed: a VarLenFeature)
    ex = tf.io.parse_example([raw], {"records": tf.io.FixedLenFeature([], tf.int64),
                                     "data": tf.io.FixedLenFeature([], tf.string)})
    x = tf.io.decode_raw(ex["data"], tf.as_dtype(dtype)).numpy().reshape(7, 3, 4)
    assert ex["records"].numpy().tolist() == [7] and np.array_equal(x, recs)
    block = shardset.parse_record_block(raw, "here")
    assert block.key_list() == [f"f.npy:{i:09d}" for i in range(40, 47)] and np.array_equal(block.records, recs)
    listed = shardset.parse_record_block(shardset.record_block(["a", "bb", "c", "d", "e", "f", "g"], recs), "here")
    assert listed.key_list() == ["a", "bb", "c", "d", "e", "f", "g"] and np.array_equal(listed.records, recs)
    # read_shards: the keys of a range built in the graph, as written
    path = tmp_path / "recon-00000-of-00001.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as w:
        w.write(raw)
        w.write(shardset.record_block(["a", "bb", "c", "d", "e", "f", "g"], recs))
    got = [(k.decode(), r) for keys, x in shards.read_shards(str(path), batch_size=5, shuffle_buffer=0,
                                                              with_keys=True) for k, r in zip(keys.numpy(), x.numpy())]
    assert [k for k, _ in got] == [f"f.npy:{i:09d}" for i in range(40, 47)] + ["a", "bb", "c", "d", "e", "f", "g"]
    assert np.array_equal(np.stack([r for _, r in got]), np.concatenate([recs, recs]))


def _bad_block(n: int, data: bytes) -> bytes:
    """A record block Example claiming ``n`` records of shape [2] uint8 with ``data``."""
    f = tf.train.Feature
    return tf.train.Example(features=tf.train.Features(feature={
        "records": f(int64_list=tf.train.Int64List(value=[n])), "shape": f(int64_list=tf.train.Int64List(value=[2])),
        "dtype": f(bytes_list=tf.train.BytesList(value=[b"uint8"])),
        "keys": f(bytes_list=tf.train.BytesList(value=[b"k%d" % i for i in range(n)])),
        "data": f(bytes_list=tf.train.BytesList(value=[data]))})).SerializeToString()


def test_a_short_or_corrupt_block_is_refused_naming_the_file(tmp_path):
    good = tmp_path / "good.tfrecord"
    with tf.io.TFRecordWriter(str(good)) as w:
        w.write(_bad_block(3, bytes(6)))  # a well-formed block written by another writer (features in any order)
    assert shardset.parse_record_block(good.read_bytes()[12:-4], "x").key_list() == ["k0", "k1", "k2"]
    short = tmp_path / "short.tfrecord"
    with tf.io.TFRecordWriter(str(short)) as w:
        w.write(_bad_block(3, bytes(6)))
        w.write(_bad_block(3, bytes(5)))  # 5 data bytes for 3 records of 2
    with pytest.raises(DataError, match=r"short\.tfrecord: block 1: record block of 3 records .* 5 data bytes, "
                                        r"expected 6"):
        shards.read_records([str(short)], (2,), "uint8")
    with pytest.raises(tf.errors.InvalidArgumentError, match="short.tfrecord"):
        for _ in shards.read_shards(str(short), batch_size=2, shuffle_buffer=0):
            pass
    with pytest.raises(DataError, match="here: not a record block"):
        shardset.parse_record_block(b"\x0a\x05\x0a\x03", "here")
    assert shardset.count_records([str(short)], blocks=True) == {str(short): 6}
    cut = tmp_path / "cut.tfrecord"
    cut.write_bytes(good.read_bytes() * 2 + good.read_bytes()[:-3])
    with pytest.raises(DataError, match="cut.tfrecord: corrupt or truncated TFRecord file"):
        shardset.count_records([str(cut)], blocks=True)
    with pytest.raises(DataError, match="cut.tfrecord: unreadable shard file"):
        shards.read_records([str(cut)], (2,), "uint8")


def test_bad_manifest_and_missing_shards_raise(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="not a vaestream-shards/1 manifest"):
        shardset.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest"):
        shardset.read_manifest(tmp_path / "manifest.json")
    with pytest.raises(DataError, match="no shard files match"):
        shards.read_shards(str(tmp_path / "nothing-*.tfrecord"))
    bad = tmp_path / "trunc.tfrecord"
    with tf.io.TFRecordWriter(str(bad)) as w:
        for raw in shardset.record_examples(["a", "b"], np.zeros((2, 30), np.uint8)):
            w.write(raw)
    bad.write_bytes(bad.read_bytes()[:-9])
    with pytest.raises(DataError, match="corrupt or truncated"):
        shardset.count_records([str(bad)])


def test_train_from_shards_resumes_exactly(tmp_path):
    """A run stopped and resumed takes the very steps of an uninterrupted run (bit-identical weights); that the
    model learns from shards is tested by the round trip in test_pipelines."""
    from vaestream import ModelConfig, TrainConfig
    from vaestream.store import load_model

    rng = np.random.default_rng(4)
    protos = rng.random((4, 36)) < 0.3  # four binary patterns plus noise
    recs = (protos[rng.integers(0, 4, 1000)] ^ (rng.random((1000, 36)) < 0.05)).astype(np.uint8) * 255
    (tmp_path / "set").mkdir()
    d = _write_set(tmp_path / "set", recs.reshape(1000, 6, 6))
    config = ModelConfig(latent_dim=2, hidden=(16,))

    def cfg(steps):
        return TrainConfig(batch_size=50, steps=steps, steps_per_call=10, seed=3, jit=False, eval_records=0)

    whole = shards.train_from_shards(d, tmp_path / "a", config, cfg(30), progress=False, shuffle_buffer=300)
    assert whole.steps == 30
    first = shards.train_from_shards(d, tmp_path / "b", config, cfg(15), progress=False, shuffle_buffer=300)
    assert first.steps == 15
    resumed = shards.train_from_shards(d, tmp_path / "b", None, cfg(30), progress=False, shuffle_buffer=300)
    assert resumed.steps == 30
    assert load_model(tmp_path / "b").fingerprint() == load_model(tmp_path / "a").fingerprint()
