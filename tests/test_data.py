"""Every reader on real or exactly-formatted files, and every bad input raising the named error."""

from __future__ import annotations

import gzip
import hashlib
import struct

import numpy as np
import pytest
import scipy.io

from vaestream import data
from vaestream.errors import DataError


def test_idx_reader_reads_real_mnist_exactly(mnist_dir):
    images = data.read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    labels = data.read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    # The payload is the original one, byte for byte.
    raw = gzip.decompress((mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert images.tobytes() == raw[16:]


def test_idx_reader_reads_raw_and_typed_files(tmp_path):
    arr = np.arange(24, dtype=">i2").reshape(2, 3, 4)
    p = tmp_path / "x-idx3-short"
    p.write_bytes(struct.pack(">HBB3I", 0, 0x0B, 3, 2, 3, 4) + arr.tobytes())
    out = data.read_idx(p)
    np.testing.assert_array_equal(out, arr)
    assert out.dtype == np.dtype("int16")


def test_fashion_mnist_is_read_by_spec(fashion_dir):
    x = data.load_records("fashion-mnist", "test")
    assert x.shape == (10000, 28, 28)


def test_frey_face_reader_takes_columns_as_row_major_28x20_images(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 20), dtype=np.uint8)
    ff = images.reshape(7, 560).T.copy()  # 560 x N, one image per column, row-major
    scipy.io.savemat(tmp_path / "frey_rawface.mat", {"ff": ff})
    out = data.read_frey_mat(tmp_path / "frey_rawface.mat")
    assert out.shape == (7, 28, 20) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(data.read_array(tmp_path / "frey_rawface.mat"), images)


def test_npy_npz_and_csv_readers(tmp_path):
    x = np.random.default_rng(1).random((5, 6)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "b.npz", labels=np.arange(5), x=x)
    np.testing.assert_array_equal(data.read_array(tmp_path / "a.npy"), x)
    np.testing.assert_array_equal(data.read_array(tmp_path / "b.npz"), x)
    np.testing.assert_array_equal(data.read_npy(tmp_path / "b.npz", key="labels"), np.arange(5))
    (tmp_path / "c.csv").write_text("p0,p1,p2\n0,0.5,1\n1,0.25,0\n")
    np.testing.assert_allclose(data.read_array(tmp_path / "c.csv"), [[0, 0.5, 1], [1, 0.25, 0]])


def test_uint8_images_scale_to_unit_interval_per_batch(mnist_test):
    ds = data.make_dataset(mnist_test[:100], "bernoulli", "t")
    assert ds.records.dtype == np.uint8  # no float copy of the data set
    x = ds.batch(slice(0, 10))
    assert x.dtype == np.float32 and x.shape == (10, 784)
    assert x.min() >= 0 and x.max() <= 1
    np.testing.assert_allclose(x * 255, mnist_test[:10].reshape(10, -1), atol=1e-4)


def test_static_binarisation_is_fixed_and_binary(mnist_test):
    a = data.make_dataset(mnist_test[:200], "bernoulli", "t", binarize="static", seed=0)
    b = data.make_dataset(mnist_test[:200], "bernoulli", "t", binarize="static", seed=0)
    np.testing.assert_array_equal(a.records, b.records)
    assert set(np.unique(a.records)) == {0, 1}
    # a Bernoulli sample: the mean pixel matches the grey-level mean
    assert abs(a.records.mean() - mnist_test[:200].mean() / 255) < 0.01


def test_validation_split_is_deterministic_and_disjoint():
    tr, va = data.split_validation(1000, 100, seed=0)
    tr2, va2 = data.split_validation(1000, 100, seed=0)
    np.testing.assert_array_equal(va, va2)
    assert len(va) == 100 and len(tr) == 900 and not set(tr) & set(va)


# -- bad input: the named error, naming the file (and record) and the problem ---------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.read_array(tmp_path / "nope-idx3-ubyte.gz")


def test_truncated_idx(tmp_path, mnist_dir):
    raw = gzip.decompress((mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(raw[:-100])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: truncated at record 9999: .*IDX payload .*truncated"):
        data.read_idx(p)


def test_truncated_gzip_idx_names_the_record_and_is_not_read_in_part(tmp_path, mnist_dir):
    """A real MNIST .gz cut short: a DataError naming the first record the gzip data does not hold whole (what
    zcat recovers), never a training set read in part."""
    import zlib

    blob = (mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes()
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(blob[:1_000_000])
    whole = (len(zlib.decompressobj(31).decompress(blob[:1_000_000])) - 16) // 784
    assert 5000 < whole < 10000
    with pytest.raises(DataError, match=rf"t10k-images-idx3-ubyte.gz: truncated at record {whole}: {whole} whole "
                                        r"records of the 10000 .*gzip"):
        data.read_array(p)


def test_corrupt_gzip(tmp_path, mnist_dir):
    blob = bytearray((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    p = tmp_path / "labels-idx1-ubyte.gz"
    p.write_bytes(bytes(blob[: len(blob) // 2]))
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        data.read_idx(p)


def test_not_an_idx_file(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(b"hello world, not idx")
    with pytest.raises(DataError, match="not an IDX file"):
        data.read_idx(p)


def test_wrong_shape_for_the_model(mnist_test):
    with pytest.raises(DataError, match=r"shape \(28, 28\).*expects \(28, 20\)"):
        data.make_dataset(mnist_test[:5], "bernoulli", "mnist", expected_shape=(28, 20))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_name_the_record(bad):
    x = np.zeros((10, 4), np.float32)
    x[7, 2] = bad
    with pytest.raises(DataError, match="f.npy: record 7 has NaN or infinite"):
        data.make_dataset(x, "gaussian", "f.npy")


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian_sigmoid"])
def test_values_outside_the_decoder_support(likelihood):
    x = np.full((4, 3), 0.5, np.float32)
    x[2, 0] = 1.5
    with pytest.raises(DataError, match=f"record 2 has values outside .*{likelihood}"):
        data.make_dataset(x, likelihood, "f")
    data.make_dataset(x, "gaussian", "f")  # the unconstrained Gaussian takes any real


def test_csv_errors_name_the_line(tmp_path):
    (tmp_path / "bad.csv").write_text("1,2,3\n4,five,6\n")
    with pytest.raises(DataError, match="bad.csv: line 2: not a row of numbers"):
        data.read_csv(tmp_path / "bad.csv")
    (tmp_path / "ragged.csv").write_text("1,2,3\n4,5\n")
    with pytest.raises(DataError, match="ragged.csv: line 2: 2 values, expected 3"):
        data.read_csv(tmp_path / "ragged.csv")


def test_corrupt_mat_and_npy(tmp_path):
    (tmp_path / "x.mat").write_bytes(b"\x00" * 50)
    with pytest.raises(DataError, match="x.mat: not a readable .mat"):
        data.read_frey_mat(tmp_path / "x.mat")
    (tmp_path / "x.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="x.npy: not a readable NumPy"):
        data.read_npy(tmp_path / "x.npy")
    scipy.io.savemat(tmp_path / "y.mat", {"ff": np.zeros((100, 3), np.uint8)})
    with pytest.raises(DataError, match=r"shape \(100, 3\), expected \[560, N\]"):
        data.read_frey_mat(tmp_path / "y.mat")


def test_unknown_format(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(DataError, match="unknown data format"):
        data.read_array(tmp_path / "x.bin")


def test_fashion_mnist_sha_is_stable(fashion_dir):
    # The Debian package is the upstream release: 60k training images.
    assert data.load_records("fashion-mnist", "train").shape == (60000, 28, 28)
    assert len(hashlib.sha256((fashion_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()).hexdigest()) == 64


def _csv(path, rows, fmt="{:d}") -> None:
    path.write_text("\n".join(",".join(fmt.format(v) for v in r.reshape(-1)) for r in rows) + "\n")


def test_one_scaling_rule_for_counts_floats_and_binary_data(tmp_path, mnist_test):
    """The input-scaling rule: 8-bit counts (uint8, an integer CSV, int64 .npy of 0..255) x 1/255; floats as they
    are; integers all in {0, 1} are binary data (x 1); an explicit scale wins."""
    recs = mnist_test[:50]
    want = recs.reshape(50, -1).astype(np.float32) * np.float32(1 / 255)  # as uint8 records become inputs
    _csv(tmp_path / "ints.csv", recs)
    ints = data.read_array(tmp_path / "ints.csv")
    assert ints.dtype == np.uint8 and np.array_equal(ints.reshape(recs.shape), recs)  # stored as the counts they are
    np.save(tmp_path / "i64.npy", recs.astype(np.int64))
    for name in ("ints.csv", "i64.npy"):
        a = data.read_array(tmp_path / name)
        assert data.input_scale(a) == pytest.approx(1 / 255), name
        np.testing.assert_array_equal(data.make_dataset(a, "bernoulli", name).to_float(), want)
        np.testing.assert_array_equal(data.model_inputs(a), want)
    assert data.input_scale(recs) == pytest.approx(1 / 255)
    floats = want.copy()
    assert data.input_scale(floats) == 1.0
    # floats are model inputs as they are, even whole-valued ones: 0..255 floats are refused, with the way out
    np.save(tmp_path / "f64.npy", recs.astype(np.float64))
    f64 = data.read_array(tmp_path / "f64.npy")
    assert data.input_scale(f64) == 1.0
    with pytest.raises(DataError, match=r"f64.npy: record 0 has values outside \[0, 1\].*--scale 1/255"):
        data.make_dataset(f64, "bernoulli", "f64.npy")
    np.testing.assert_allclose(data.make_dataset(f64, "bernoulli", "f64.npy", scale=1 / 255).to_float(), want,
                               rtol=1e-6)
    binary = (recs > 127).astype(np.int64)
    assert data.input_scale(binary) == 1.0 and data.input_scale((recs > 127).astype(np.float32)) == 1.0
    _csv(tmp_path / "bin.csv", binary)
    assert data.read_array(tmp_path / "bin.csv").dtype == np.float32  # 0/1: binary data, not counts
    assert data.make_dataset(data.read_array(tmp_path / "bin.csv"), "bernoulli", "b").to_float().max() == 1.0
    # an explicit scale: 16-bit values into [0, 1]
    wide = recs.astype(np.int64) * 257
    with pytest.raises(DataError, match=r"record 0 has values outside \[0, 1\].*--scale"):
        data.make_dataset(wide, "bernoulli", "w.npy")
    ds = data.make_dataset(wide, "bernoulli", "w.npy", scale=1 / 65535)
    np.testing.assert_allclose(ds.to_float(), want, atol=1e-6)


def test_integer_records_out_of_range_name_the_record():
    x = np.zeros((5, 3), np.int32)
    x[3, 1] = -1
    with pytest.raises(DataError, match=r"i.npy: record 3 has values outside \[0, 1\]"):
        data.make_dataset(x, "bernoulli", "i.npy")
