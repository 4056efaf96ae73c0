"""Golden streams: files of every kind vaestream writes, made once by ``tests/golden/make_golden.py`` with the code of
the commit that ``tests/golden/manifest.json`` names, with the tiny models that decode them beside them.

* today's decoders (the public entry points) decode each to its recorded output: bit for bit on the exact paths
  (lossy symbols, bits-back records, near-lossless levels, context models, ``mean`` and ``learned``
  reconstructions, per-record streams), within 1e-6 for the lossy float reconstruction (a float decoder may differ
  in the last ulp across CPU kinds);
* today's encoders write the same records into the same bytes (see :func:`encode` for what each kind re-encodes);
* the same decoding in a process with NumPy's and oneDNN's AVX-512 paths switched off gives the same outputs;
* a flipped byte anywhere in a stream is refused with a ``BitstreamError``.

A failure here means a byte format (or a decoder's output) changed: bump the format version and keep the old reader;
never regenerate the golden files to make this pass.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
STREAMS = {s["name"]: s for s in MANIFEST["streams"]}
FLOAT_ATOL = 1e-6
NO_AVX512_FEATURES = ("X86_V4", "AVX512_SKX", "AVX512_CLX", "AVX512_CNL", "AVX512_ICL", "AVX512_SPR", "AVX512F")
"""NumPy's dispatch targets of AVX-512 (2.x names; ``AVX512F``, ``AVX512_SKX`` in 1.x); those this NumPy dispatches
to are switched off with NPY_DISABLE_CPU_FEATURES."""


# -- decoding and encoding through the public entry points ----------------------------------------------------
@functools.lru_cache(maxsize=None)
def _codec(model: str, frame_records: int | None = None):
    import vaestream

    return vaestream.load(GOLDEN / model) if frame_records is None else \
        vaestream.load(GOLDEN / model, frame_records=frame_records)


@functools.lru_cache(maxsize=None)
def _model(model: str):
    from vaestream.store import load_model

    return load_model(GOLDEN / model)


def _open(root: str, blob: bytes):
    """The decoder :func:`vaestream.coding.open_stream` returns for ``blob`` with the model or family ``root``."""
    import io

    from vaestream.coding import container, open_stream

    if container.is_per_record(blob):
        return open_stream(blob, GOLDEN / root)  # reads only the head: no model loaded
    h = container.read_header(io.BytesIO(blob))  # a corrupt head: BitstreamError
    return _opened_header(root, h.lossless, h.fingerprint, blob)


def _opened_header(root: str, lossless: bool, fingerprint: bytes, blob: bytes):
    key = (root, "bitsback" if lossless else "lossy", bytes(fingerprint))
    if key not in _OPENED:
        from vaestream.coding import open_stream

        _OPENED[key] = open_stream(blob, GOLDEN / root)
    return _OPENED[key]


_OPENED: dict = {}


def decode_blob(s: dict, blob: bytes) -> dict[str, np.ndarray]:
    """Decode the bytes of golden stream ``s`` (its manifest entry) with today's decoders: ``{"output"}``, and
    ``"codes"`` (the integer symbols) for a lossy stream."""
    spec, model = s["spec"], s["model"]
    if spec["coder"] in ("lossy", "lossy-file"):
        c = _codec(model)
        out = {"output": _open(model, blob).decompress(blob), "codes": c.decompress_codes(blob)[0]}
        if spec["coder"] == "lossy-file":  # an indexed file: also whole and by random access, from the file
            path = GOLDEN / s["file"]
            if path.read_bytes() == blob:
                out["read"] = c.read(path)
                out["read_5_11"] = c.read(path, records=slice(5, 11))
        return out
    if spec["coder"] == "bits-back":
        if spec.get("frame_records"):  # the functional entry point
            from vaestream.coding.bitsback.coder import decompress_lossless

            return {"output": decompress_lossless(_model(model), blob)}
        return {"output": _open(model, blob).decompress(blob)}
    if spec["coder"] == "family":
        c = _open(model, blob)
        out = {"output": c.decompress(blob)}
        if not spec["levels"]:
            out["codes"] = c.decompress_codes(blob)[0]
        return out
    if spec["coder"] == "per-record":
        return {"output": _open(model, blob).decompress(blob)}
    raise AssertionError(f"unknown coder {spec['coder']!r}")


def decode(s: dict) -> dict[str, np.ndarray]:
    return decode_blob(s, (GOLDEN / s["file"]).read_bytes())


def encode(s: dict, tmp: Path) -> bytes:
    """The stream today's encoder writes for golden stream ``s``'s records and settings. Every kind is expected to
    be byte-identical. Lossy kinds re-run the float encoder network: their codes are the same on another CPU kind
    only because the generator checked that no posterior mean lies within 1e-5 (relative) of a rounding boundary
    (``encoder_margin_ok``); their entropy coding is checked exactly on the recorded codes as well
    (:func:`test_reencode`). Family and per-record streams are re-encoded at the recorded operating points (the
    choice of point is a float measurement, not a byte format)."""
    spec, model = s["spec"], s["model"]
    x = np.load(GOLDEN / s["input"])
    if spec["coder"] == "lossy":
        return _codec(model).compress(x[0] if spec.get("single") else x, quality=spec.get("quality"))
    if spec["coder"] == "lossy-file":
        c, k, path = _codec(model, spec["frame_records"]), spec["split"], tmp / "file.vaez"
        c.write(path, x[:k])
        c.write(path, x[k:], append=True)
        return path.read_bytes()
    if spec["coder"] == "bits-back":
        if spec.get("frame_records"):
            from vaestream.coding.bitsback.coder import compress_lossless

            return compress_lossless(_model(model), x.reshape(len(x), -1), frame_records=spec["frame_records"])
        from vaestream.coding.family import bitsback_coder

        return bitsback_coder(GOLDEN / model, spec.get("levels"), spec.get("reconstruction", "level"),
                              use_context=spec.get("use_context", True)).compress(x)
    if spec["coder"] == "family":
        from vaestream.coding.family import OperatingPoint

        return OperatingPoint(model=GOLDEN / spec["member"], quality=spec["quality"], levels=spec["levels"],
                              reconstruction=spec["reconstruction"]).compress(x)
    if spec["coder"] == "per-record":
        from vaestream.coding import per_record
        from vaestream.coding.family import OperatingPoint

        _, _, assignment = per_record.read((GOLDEN / s["file"]).read_bytes())
        points = [OperatingPoint(model=GOLDEN / p["model"], quality=p["quality"], levels=p["levels"],
                                 reconstruction=p["reconstruction"]) for p in spec["points"]]
        return per_record.PerRecordCoder(GOLDEN / model, points=points).compress(x, assignment)
    raise AssertionError(f"unknown coder {spec['coder']!r}")


def check(s: dict, got: dict[str, np.ndarray]) -> None:
    """Assert that decoded outputs ``got`` are golden stream ``s``'s recorded ones."""
    exp = np.load(GOLDEN / s["expected"])
    name = s["name"]
    if "codes" in exp.files:
        assert got["codes"].dtype == exp["codes"].dtype, name
        np.testing.assert_array_equal(got["codes"], exp["codes"], err_msg=f"{name}: codes")
    y, want = np.asarray(got["output"]), exp["output"]
    assert y.shape == want.shape and y.dtype == want.dtype, f"{name}: {y.shape} {y.dtype}, recorded {want.shape} " \
                                                            f"{want.dtype}"
    if "near_half" in exp.files:  # per-record: lossy records are rounded floats; at .5 +- 1e-3 another ulp may flip
        near = exp["near_half"].reshape(y.shape)
        np.testing.assert_array_equal(y[~near], want[~near], err_msg=f"{name}: output")
        assert np.all(np.abs(y[near].astype(int) - want[near].astype(int)) <= 1), name
    elif s["spec"]["exact"]:
        np.testing.assert_array_equal(y, want, err_msg=f"{name}: output")
    else:
        np.testing.assert_allclose(y, want, rtol=0, atol=FLOAT_ATOL, err_msg=f"{name}: reconstruction")
    for k, sel in (("read", slice(None)), ("read_5_11", slice(5, 11))):
        if k in got:
            np.testing.assert_allclose(got[k], want[sel], rtol=0, atol=FLOAT_ATOL, err_msg=f"{name}: {k}")


# -- tests ----------------------------------------------------------------------------------------------------
def test_golden_files_intact():
    """The golden files are the ones the manifest recorded (nobody regenerated or edited them)."""
    def sha(p: str) -> str:
        return hashlib.sha256((GOLDEN / p).read_bytes()).hexdigest()

    for p, h in {**MANIFEST["inputs"], **MANIFEST["model_files"]}.items():
        assert sha(p) == h, p
    for s in STREAMS.values():
        assert sha(s["file"]) == s["sha256"] and sha(s["expected"]) == s["expected_sha256"], s["name"]
    kinds = {s["spec"]["coder"] for s in STREAMS.values()}
    assert kinds == {"lossy", "lossy-file", "bits-back", "family", "per-record"}


@pytest.mark.parametrize("name", list(STREAMS))
def test_decode(name):
    check(STREAMS[name], decode(STREAMS[name]))


@pytest.mark.parametrize("name", list(STREAMS))
def test_reencode(name, tmp_path):
    s = STREAMS[name]
    golden = (GOLDEN / s["file"]).read_bytes()
    if s["spec"]["coder"] == "lossy":  # the entropy coding of the recorded symbols: exact on any CPU
        exp = np.load(GOLDEN / s["expected"])
        c = _codec(s["model"])
        assert c.compress_codes(exp["codes"], s["spec"].get("quality"), single=bool(s["spec"].get("single"))) \
            == golden
    if not s["spec"]["exact"]:
        assert s["spec"]["encoder_margin_ok"], name
    assert encode(s, tmp_path) == golden, f"{name}: today's encoder writes other bytes"


CLI_DECODES = {"levels-4-learned": ["--model", "models/family/bitsback"], "per-record": ["--family", "models/family"]}


def _cpu_module():
    """NumPy's module that lists its CPU features (``numpy._core`` in 2.x, ``numpy.core`` in 1.x)."""
    try:
        from numpy._core import _multiarray_umath
    except ImportError:  # NumPy 1.x
        from numpy.core import _multiarray_umath
    return _multiarray_umath


def _cli_argvs(out_dir: Path) -> list[list[str]]:
    return [["decompress", str(GOLDEN / STREAMS[n]["file"]), str(out_dir / f"cli-{n}.npy"),
             *[str(GOLDEN / a) if a.startswith("models/") else a for a in args]] for n, args in CLI_DECODES.items()]


def _decode_all(out_dir: Path) -> int:
    """Decode every golden stream into ``out_dir/NAME.npz`` with the public entry points, this process's NumPy CPU
    features into ``out_dir/cpu.json``, and the :data:`CLI_DECODES` streams with ``vaestream decompress`` (the
    command line's main) into ``out_dir/cli-NAME.npy``; return the largest exit code of those commands (run by
    :func:`fresh_decodes` in a subprocess)."""
    from vaestream.cli import main

    mu = _cpu_module()
    for name, s in STREAMS.items():
        np.savez(out_dir / f"{name}.npz", **decode(s))
    (out_dir / "cpu.json").write_text(json.dumps({k: bool(v) for k, v in mu.__cpu_features__.items()}))
    return max(main(a) for a in _cli_argvs(out_dir))


@pytest.fixture(scope="module")
def fresh_decodes(tmp_path_factory):
    """ONE fresh process, with NumPy's AVX-512 dispatch and oneDNN's AVX-512 kernels switched off, decodes every
    golden stream and runs the command line's decodes (one TensorFlow start for both checks). Returns its output
    directory and the AVX-512 features it was asked to switch off."""
    out = tmp_path_factory.mktemp("golden_fresh")
    mu = _cpu_module()
    off = [f for f in NO_AVX512_FEATURES if f in mu.__cpu_dispatch__]
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": " ".join(off), "ONEDNN_MAX_CPU_ISA": "AVX2",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    r = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, off


def test_decode_cli(fresh_decodes):
    """``vaestream decompress`` reads a context-coded stream with learned reconstruction (--model) and a per-record
    stream (--family): the command line's entry point, in a fresh process."""
    out, _ = fresh_decodes
    for name in CLI_DECODES:
        s = STREAMS[name]
        y = np.load(out / f"cli-{name}.npy")
        assert y.shape == np.load(GOLDEN / s["input"]).shape and y.dtype == np.uint8, name
        check(s, {"output": y.reshape(np.load(GOLDEN / s["expected"])["output"].shape)})


def test_decode_without_avx512(fresh_decodes):
    """The same outputs with NumPy's AVX-512 dispatch and oneDNN's AVX-512 kernels switched off."""
    out, off = fresh_decodes
    cpu = json.loads((out / "cpu.json").read_text())
    assert not any(cpu.get(f) for f in off), cpu
    for name, s in STREAMS.items():
        got = np.load(out / f"{name}.npz")
        check(s, {k: got[k] for k in got.files})


@pytest.mark.parametrize("name", list(STREAMS))
def test_flipped_byte_refused(name, tmp_path):
    """Each of the first 12 bytes (the header), 6 in the middle and the last 4 of a golden stream, flipped, is refused
    with a BitstreamError (never decoded into other records)."""
    from vaestream.errors import BitstreamError

    s = STREAMS[name]
    blob = (GOLDEN / s["file"]).read_bytes()
    n = len(blob)
    where = sorted(set(range(min(12, n))) | {int(i) for i in np.linspace(12, n - 5, 6)} | set(range(n - 4, n)))
    for i in where:
        bad = bytearray(blob)
        bad[i] ^= 0xFF
        with pytest.raises(BitstreamError):
            decode_blob(s, bytes(bad))
        if s["spec"]["coder"] == "lossy-file":  # the indexed file, read by path with random access
            path = tmp_path / "bad.vaez"
            path.write_bytes(bytes(bad))
            with pytest.raises(BitstreamError):
                _codec(s["model"]).read(path, records=slice(5, 11))


if __name__ == "__main__":
    sys.exit(_decode_all(Path(sys.argv[1])))
