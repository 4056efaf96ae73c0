"""Data readers, scaling, binarisation and validation.

Every reader returns a NumPy array of records ``[N, ...]`` in its stored dtype (uint8 stays uint8, so a
data set costs its raw size in memory, never a float copy of it); :class:`Dataset` turns records into
float32 vectors in [0, 1] (or raw reals for the unconstrained Gaussian model) one minibatch at a time.

The input-scaling rule (:func:`input_scale`), the same for the Python API, every ``vaestream`` command and
the Beam jobs: model input = stored value x scale, where the scale is

* ``--scale S`` / ``scale=S`` when given;
* 1/255 for 8-bit counts: uint8 records, integer records (an integer ``.npy``) in 0..255 with at least one
  value above 1, and an integer CSV (whole numbers in 0..255, read as uint8: :func:`csv_records`);
* 1 otherwise: floats are model inputs as they are, and integers all in {0, 1} are binary data.

Formats:

* MNIST-format IDX (``*-idx3-ubyte`` / ``*-idx1-ubyte``, raw or ``.gz``): MNIST and Fashion-MNIST.
* The Frey Face ``.mat`` (variable ``ff``, uint8, 560 x 1965, each column one 28 x 20 image, row-major).
* ``.npy`` and ``.npz`` (the array named by ``key``, or the only / first array).
* CSV: one record per line, comma-separated numbers, an optional header line.

Bad input raises :class:`vaestream.errors.DataError` naming the file (and record) and the problem.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from vaestream.binio import read_exact
from vaestream.errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's package ``dataset-fashion-mnist`` installs Fashion-MNIST (the default data set)."""


def fashion_mnist_dirs() -> list[Path]:
    """Where ``fashion-mnist`` is looked for, in order: ``$VAESTREAM_DATA/fashion-mnist`` (if the variable is
    set), :data:`FASHION_MNIST_DIR`, then the user data directory
    ``${XDG_DATA_HOME:-~/.local/share}/vaestream/fashion-mnist`` (where ``scripts/setup.sh`` unpacks the
    Debian package for a user without root)."""
    user = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "vaestream"
    first = [Path(os.environ["VAESTREAM_DATA"]) / "fashion-mnist"] if os.environ.get("VAESTREAM_DATA") else []
    return first + [Path(FASHION_MNIST_DIR), user / "fashion-mnist"]


def fashion_mnist_dir() -> Path:
    """The first of :func:`fashion_mnist_dirs` that holds Fashion-MNIST; ``DataError`` naming them if none."""
    dirs = fashion_mnist_dirs()
    for d in dirs:
        if any(d.glob("train-images-idx3-ubyte*")):
            return d
    raise DataError(f"Fashion-MNIST not found in {', '.join(map(str, dirs))}: run scripts/setup.sh (as root it "
                    "installs dataset-fashion-mnist; as a user it unpacks it into the last of these)")

BINARIZE = ("none", "static", "dynamic")

BOUNDED_LIKELIHOODS = ("bernoulli", "gaussian_sigmoid", "beta_binomial")
"""Decoders whose inputs must lie in [0, 1]."""

COUNT_SCALE = 1.0 / 255.0
"""The scale of 8-bit counts (see :func:`input_scale`)."""

IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def idx_header(f: BinaryIO, path: str | os.PathLike) -> tuple[np.dtype, tuple[int, ...], int]:
    """The IDX header at the start of ``f``: (stored dtype, shape, header bytes). A magic number
    ``0x0000TTNN`` (TT the type code, NN the number of dimensions) then NN big-endian uint32 sizes."""
    head = read_exact(f, 4)
    if len(head) < 4:
        raise DataError(f"{path}: too short to be an IDX file")
    zero, type_code, ndim = struct.unpack(">HBB", head)
    if zero != 0 or type_code not in IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: not an IDX file (magic 0x{head.hex()})")
    dims = read_exact(f, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", dims)
    return IDX_DTYPES[type_code], tuple(shape), 4 + 4 * ndim


def npy_header(f: BinaryIO, path: str | os.PathLike) -> tuple[np.dtype, tuple[int, ...], bool]:
    """The ``.npy`` header at the start of ``f``: (dtype, shape, Fortran order); records only (no objects,
    no scalar)."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except Exception as e:
        raise DataError(f"{path}: not a readable .npy file ({e})") from e
    if dtype.hasobject:
        raise DataError(f"{path}: .npy of dtype {dtype} holds Python objects, not numbers")
    if len(shape) < 1:
        raise DataError(f"{path}: .npy holds a scalar, expected records [N, ...]")
    return dtype, tuple(shape), fortran


def _gunzip_prefix(raw: bytes) -> tuple[bytes, str | None]:
    """The bytes a gzip stream decompresses to, as far as it goes: (data, None) for a whole stream, (the
    prefix before the break, why) for a truncated or corrupt one (as ``zcat`` recovers it)."""
    out, rest = [], raw
    while rest:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out.append(d.decompress(rest))
        except zlib.error as e:
            return b"".join(out), f"corrupt or truncated gzip data: {e}"
        if not d.eof:
            return b"".join(out), "corrupt or truncated gzip data: the stream breaks off"
        rest = d.unused_data.lstrip(b"\x00")  # the next member of a multi-member file (padding allowed)
    return b"".join(out), None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip): ``[N, ...]`` in its stored dtype (native byte order).

    The header is a magic number ``0x0000TTNN`` (TT the type code, NN the number of dimensions) then NN
    big-endian uint32 sizes; the payload must be exactly the product of the sizes. A file cut short (or a
    gzip stream that breaks off) raises :class:`DataError` naming the first incomplete record: a training
    set is never read in part. (The Beam jobs read the whole records before the break and dead-letter the
    rest.)
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    data = path.read_bytes()
    broken = None
    if data[:2] == b"\x1f\x8b":
        data, broken = _gunzip_prefix(data)
    if len(data) < 4:
        raise DataError(f"{path}: too short to be an IDX file ({len(data)} bytes)"
                        + (f"; {broken}" if broken else ""))
    dtype, shape, header = idx_header(io.BytesIO(data), path)
    rec_bytes = int(np.prod(shape[1:])) * dtype.itemsize
    expected = int(np.prod(shape)) * dtype.itemsize
    have = len(data) - header
    if broken or have < expected:
        whole = have // rec_bytes if rec_bytes else 0
        why = broken or f"IDX payload is {have} bytes, the header {shape} says {expected} (truncated or corrupt file)"
        raise DataError(f"{path}: truncated at record {whole}: {whole} whole records of the {shape[0]} the header "
                        f"says ({why})")
    if have != expected:
        raise DataError(f"{path}: IDX payload is {have} bytes, the header {shape} says {expected} (corrupt file: "
                        "data after the last record)")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def read_frey_mat(path: str | os.PathLike, variable: str = "ff", image_shape: tuple[int, int] = (28, 20)
                  ) -> np.ndarray:
    """Read the Frey Face ``.mat`` file: ``[1965, 28, 20]`` uint8.

    The file holds ``ff``, uint8 of shape ``[560, 1965]``: each column is one 28 x 20 image stored row-major.
    """
    import scipy.io

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:  # scipy raises many kinds on a corrupt file
        raise DataError(f"{path}: not a readable .mat file ({e})") from e
    if variable not in mat:
        names = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path}: no variable {variable!r} (variables: {names})")
    ff = np.asarray(mat[variable])
    d = image_shape[0] * image_shape[1]
    if ff.ndim != 2 or ff.shape[0] != d:
        raise DataError(f"{path}: variable {variable!r} has shape {ff.shape}, expected [{d}, N] "
                        f"(one {image_shape[0]}x{image_shape[1]} image per column)")
    return np.ascontiguousarray(ff.T).reshape((-1,) + tuple(image_shape))


def read_npy(path: str | os.PathLike, key: str | None = None, mmap: bool = True) -> np.ndarray:
    """Read ``.npy`` (memory-mapped by default, so a large file is not loaded whole) or ``.npz``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                names = list(z.files)
                if not names:
                    raise DataError(f"{path}: .npz file holds no arrays")
                name = key or next((n for n in ("x", "images", "data") if n in names), names[0])
                if name not in names:
                    raise DataError(f"{path}: no array {name!r} (arrays: {names})")
                return z[name]
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not a readable NumPy file ({e})") from e


def csv_row(line: str, delimiter: str = ",") -> np.ndarray:
    """One CSV record: the numbers of ``line`` as float32 (ValueError if one is not a number). A first line
    that is not a row of numbers is a header, for every CSV reader (:func:`read_csv`, the Beam reader)."""
    return np.array(line.strip().split(delimiter), dtype=np.float32)


def read_csv(path: str | os.PathLike, delimiter: str = ",") -> np.ndarray:
    """Read a CSV of numbers, one record per line; a first line that is not numeric is a header.

    Returns uint8 when the values are 8-bit counts (whole numbers in 0..255, one above 1: see
    :func:`input_scale`), float32 otherwise."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    rows: list[np.ndarray] = []
    width = None
    with open(path, "r", encoding="utf-8", errors="strict") as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not a text CSV file ({e})") from e
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = csv_row(line, delimiter)
        except ValueError:
            if lineno == 1:
                continue  # header
            raise DataError(f"{path}: line {lineno}: not a row of numbers: {line[:80]!r}") from None
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise DataError(f"{path}: line {lineno}: {len(row)} values, expected {width} like the first row")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no records")
    return csv_records(np.asarray(rows, dtype=np.float32))  # an integer CSV of 0..255: uint8 counts


def read_array(path: str | os.PathLike, key: str | None = None) -> np.ndarray:
    """Read records from any supported file, chosen by its name (see the module docstring)."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if "idx" in name and "ubyte" in name or name.endswith(".idx"):
        return read_idx(p)
    if name.endswith(".mat"):
        return read_frey_mat(p, variable=key or "ff")
    if name.endswith((".npy", ".npz")):
        return read_npy(p, key=key)
    if name.endswith((".csv", ".txt")):
        return read_csv(p)
    raise DataError(f"{p}: unknown data format (expected IDX, .mat, .npy, .npz or .csv)")


def _find(directory: Path, stem: str) -> Path:
    for cand in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / cand).exists():
            return directory / cand
    raise DataError(f"{directory}: no {stem}[.gz] (an MNIST-format directory needs train/t10k image files)")


def mnist_layout_images(directory: str | os.PathLike, split: str) -> Path:
    """The image file of ``split`` ('train' or 'test') in an MNIST-format directory."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    return _find(Path(directory), ("train" if split == "train" else "t10k") + "-images-idx3-ubyte")


def resolve(spec: str, split: str = "train") -> Path:
    """Where the records of a data-set spec live.

    ``spec`` is ``fashion-mnist`` (Debian's ``dataset-fashion-mnist``), a directory in MNIST layout
    (``train-images-idx3-ubyte.gz`` and ``t10k-images-idx3-ubyte.gz``), or a file (``split`` is then ignored).
    """
    if spec == "fashion-mnist":
        return mnist_layout_images(fashion_mnist_dir(), split)
    p = Path(spec)
    if p.is_dir():
        return mnist_layout_images(p, split)
    return p


def load_records(spec: str, split: str = "train", key: str | None = None) -> np.ndarray:
    """Read the records of a data-set spec (see :func:`resolve`) as ``[N, ...]``."""
    return read_array(resolve(spec, split), key=key)


@dataclasses.dataclass
class Dataset:
    """Records plus how to turn them into model inputs.

    ``records`` keeps its stored dtype (uint8 images are scaled by 1/255 per minibatch). ``scale`` maps
    stored values to model inputs: x = records * scale. ``binarize``: ``none``; ``static`` (every pixel
    replaced once by a Bernoulli sample with a fixed seed, the same every run); ``dynamic`` (a fresh
    Bernoulli sample every minibatch, done by the trainer).
    """

    records: np.ndarray
    scale: float
    binarize: str = "none"
    name: str = "data"

    def __len__(self) -> int:
        return int(self.records.shape[0])

    @property
    def input_dim(self) -> int:
        return int(np.prod(self.records.shape[1:]))

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.records.shape[1:])

    def batch(self, index) -> np.ndarray:
        """The float32 model inputs ``[len(index), D]`` of the records at ``index`` (no binarisation)."""
        x = np.asarray(self.records[index], dtype=np.float32).reshape(-1, self.input_dim)
        if self.scale != 1.0:
            x *= np.float32(self.scale)
        return x

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Float32 inputs in order, ``batch_size`` records at a time (the last batch may be shorter)."""
        for s in range(0, len(self), batch_size):
            yield self.batch(slice(s, s + batch_size))

    def to_float(self) -> np.ndarray:
        """All records as one float32 ``[N, D]`` array (for evaluation of small sets)."""
        return self.batch(slice(None))

    def take(self, index, name: str | None = None) -> "Dataset":
        return Dataset(self.records[index], self.scale, self.binarize, name or self.name)


def is_counts(records: np.ndarray, chunk: int = 8192) -> bool:
    """Whether ``records`` are 8-bit counts: uint8, or integers in 0..255 with at least one above 1 (reads
    integer records in chunks and stops at the first value outside 0..255). Floats never are: they are
    model inputs (a CSV has no dtype: :func:`csv_records` stores whole numbers in 0..255 as uint8)."""
    a = np.asarray(records) if not isinstance(records, np.ndarray) else records
    if a.dtype == np.uint8:
        return True
    if not np.issubdtype(a.dtype, np.integer) or a.size == 0:
        return False
    flat = a.reshape(len(a), -1) if a.ndim > 1 else a.reshape(-1, 1)
    above_one = False
    for s in range(0, len(flat), chunk):
        block = np.asarray(flat[s:s + chunk])
        if block.min() < 0 or block.max() > 255:
            return False
        above_one = above_one or block.max() > 1
    return above_one


def csv_records(rows: np.ndarray) -> np.ndarray:
    """CSV values (float32 as parsed) in the dtype they stand for: uint8 when they are 8-bit counts (whole
    numbers in 0..255, one above 1: an integer CSV of pixels), else float32. Every CSV reader uses it
    (:func:`read_csv` on a whole file, the Beam jobs' reader on each batch of lines)."""
    rows = np.asarray(rows, np.float32)
    if rows.size and np.isfinite(rows).all() and rows.min() >= 0 and rows.max() <= 255 and rows.max() > 1 \
            and np.array_equal(rows, np.floor(rows)):
        return rows.astype(np.uint8)
    return rows


def input_scale(records: np.ndarray, scale: float | None = None) -> float:
    """The input-scaling rule: model input = stored value x the returned scale.

    ``scale`` when given (a user's ``--scale``); else 1/255 for 8-bit counts (:func:`is_counts`: uint8
    records, an integer CSV or ``.npy`` of 0..255); else 1 (floats are model inputs as they are; integers
    all in {0, 1} are binary data). Every entry point uses this function: the
    :class:`Dataset` of :func:`make_dataset`, the codec, the ``vaestream`` commands and the Beam jobs
    (``vaestream.beam.validate``, which applies it to each batch of records as read).
    """
    if scale is not None:
        value = float(scale)
        if not (math.isfinite(value) and value > 0):
            raise DataError(f"scale {scale!r} must be a positive finite number")
        return value
    return COUNT_SCALE if is_counts(records) else 1.0


def model_inputs(records: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Records as float32 model inputs ``[N, D]`` under the input-scaling rule (:func:`input_scale`)."""
    a = np.asarray(records)
    sc = input_scale(a, scale)
    x = a.reshape(len(a), -1).astype(np.float32)
    if sc != 1.0:
        x *= np.float32(sc)
    return x


def _outside_unit(name: str, i: int, lo: float, hi: float, likelihood: str) -> DataError:
    return DataError(f"{name}: record {i} has values outside [0, 1] (min {lo:g}, max {hi:g}), outside the support "
                     f"of the {likelihood} decoder (scale your data to [0, 1], e.g. --scale 1/255 for 8-bit "
                     "values, or use likelihood 'gaussian')")


def validate(records: np.ndarray, likelihood: str, name: str, scale: float | None = None,
             chunk: int = 8192) -> float:
    """Check records for a model and return the scale that maps them to model inputs.

    The scale is :func:`input_scale`'s (``scale`` when given; 1/255 for 8-bit counts; else 1). Raises
    :class:`DataError` naming the first bad record on NaN/inf, or on model inputs outside the support of
    the decoder ([0, 1] for ``bernoulli``, ``gaussian_sigmoid`` and ``beta_binomial``).
    """
    if records.ndim < 2:
        raise DataError(f"{name}: expected records of shape [N, ...], got shape {records.shape}")
    if len(records) == 0:
        raise DataError(f"{name}: no records")
    if not (np.issubdtype(records.dtype, np.integer) or np.issubdtype(records.dtype, np.floating)
            or records.dtype == np.bool_):
        raise DataError(f"{name}: records of dtype {records.dtype} are not numeric")
    scale = input_scale(records, scale)
    bounded = likelihood in BOUNDED_LIKELIHOODS
    flat = records.reshape(len(records), -1)
    if not np.issubdtype(records.dtype, np.floating):
        # integers are finite; only the range can be wrong (uint8 / 255 never is)
        if bounded and not (records.dtype == np.uint8 and scale <= COUNT_SCALE):
            for s in range(0, len(flat), chunk):
                block = np.asarray(flat[s:s + chunk]).astype(np.float64)
                ok = ((block.min(axis=1) * scale >= 0) & (block.max(axis=1) * scale <= 1))
                if not ok.all():
                    i = s + int(np.argmin(ok))
                    raise _outside_unit(name, i, flat[i].min() * scale, flat[i].max() * scale, likelihood)
        return float(scale)
    for s in range(0, len(flat), chunk):
        block = np.asarray(flat[s:s + chunk], dtype=np.float32) * np.float32(scale)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            i = s + int(np.argmin(finite))
            raise DataError(f"{name}: record {i} has NaN or infinite values")
        if bounded:
            ok = ((block >= 0.0) & (block <= 1.0)).all(axis=1)
            if not ok.all():
                i = s + int(np.argmin(ok))
                raise _outside_unit(name, i, block[i - s].min(), block[i - s].max(), likelihood)
    return float(scale)


def make_dataset(records: np.ndarray, likelihood: str, name: str, binarize: str = "none",
                 expected_shape: tuple[int, ...] | None = None, seed: int = 0,
                 scale: float | None = None) -> Dataset:
    """Validate ``records`` (see :func:`validate`) and wrap them as a :class:`Dataset`; ``scale``: model
    input = value x scale (default: the input-scaling rule, :func:`input_scale`)."""
    if binarize not in BINARIZE:
        raise DataError(f"binarize {binarize!r} is not one of {BINARIZE}")
    if expected_shape is not None and int(np.prod(records.shape[1:])) != int(np.prod(expected_shape)):
        raise DataError(f"{name}: records have shape {tuple(records.shape[1:])}, the model expects "
                        f"{tuple(expected_shape)}")
    if binarize != "none" and likelihood != "bernoulli":
        raise DataError(f"binarize={binarize!r} needs the bernoulli likelihood, not {likelihood!r}")
    scale = validate(records, likelihood, name, scale)
    ds = Dataset(records, scale, binarize, name)
    if binarize == "static":
        rng = np.random.default_rng(seed)
        bits = np.empty(records.shape, np.uint8)
        for s in range(0, len(records), 8192):
            p = np.asarray(records[s:s + 8192], np.float32) * np.float32(scale)
            bits[s:s + 8192] = rng.random(p.shape, dtype=np.float32) < p
        ds = Dataset(bits, 1.0, "static", name)
    return ds


def split_validation(n: int, n_valid: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic split of ``range(n)`` into (train, validation) index arrays, both sorted.

    The validation set is the first ``n_valid`` of a permutation drawn with NumPy's PCG64 from ``seed``:
    the same on every machine and every run.
    """
    if not 0 <= n_valid < n:
        raise DataError(f"validation size {n_valid} must be in [0, {n})")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])
