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
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: IDX payload .*truncated"):
        data.read_idx(p)


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


def test_integer_records_out_of_range_name_the_record():
    x = np.zeros((5, 3), np.int32)
    x[3, 1] = -1
    with pytest.raises(DataError, match=r"i.npy: record 3 has values outside \[0, 1\]"):
        data.make_dataset(x, "bernoulli", "i.npy")
