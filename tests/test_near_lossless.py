"""Near-lossless bits-back coding (``LosslessCoder(model, levels=K)``) on real MNIST: every pixel comes back within
the bound of its K levels, bits fall with K, the stream names its K and decodes anywhere the model is, damaged
frames are refused, and a family's near-lossless member is what ``--psnr`` picks at the high end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from vaestream.coding import container, family
from vaestream.coding.bitsback.tables import level_grid, max_error, pixel_levels
from vaestream.coding.bitsback.coder import EXACT_LEVELS, LosslessCoder, compress_lossless
from vaestream.errors import BitstreamError, ConfigError

N = 200


def _psnr(x: np.ndarray, y: np.ndarray) -> float:
    mse = float(np.mean((x.astype(np.float64) / 255 - y.astype(np.float64) / 255) ** 2))
    return 10 * np.log10(1 / mse) if mse else float("inf")


def test_levels_include_black_and_white_and_bound_every_count():
    for k in (2, 3, 5, 8, 16, 64):
        values, cell = pixel_levels(k)
        assert len(values) == k and values[0] == 0 and values[-1] == 255 and np.all(np.diff(values) > 0)
        assert np.all(np.diff(cell) >= 0) and cell[0] == 0 and cell[-1] == k - 1  # cells are contiguous runs
        err = np.abs(np.arange(256) - values[cell].astype(int))
        assert err.max() == max_error(k) <= -(-255 // (2 * (k - 1)))
        assert np.array_equal(cell, np.argmin(np.abs(np.arange(256)[:, None] - values[None].astype(int)), axis=1))
    assert [max_error(k) for k in (2, 16, 64)] == [127, 8, 2]


def test_level_tables_are_the_beta_binomial_mass_of_each_levels_counts():
    from vaestream.coding.bitsback.tables import _bb_logpmf, grid_axis, GRID_U, GRID_V

    from vaestream.coding.bitsback import tables as bitsback_tables

    bitsback_tables._GRID_CACHE.pop(("levels", 5), None)
    g, means = (a.copy() for a in level_grid(5))  # built alone
    bitsback_tables._GRID_CACHE.pop(("levels", 5), None)
    together = bitsback_tables.level_grids([3, 5, 7])[1]  # built in one pass with others: the same tables
    assert np.array_equal(together[0], g) and np.array_equal(together[1], means)
    assert g.shape[1] == 5 and np.allclose(g.sum(axis=1), 1.0, atol=1e-5)
    values, cell = pixel_levels(5)
    lo = np.array([np.flatnonzero(cell == k)[0] for k in range(5)])
    hi = np.array([np.flatnonzero(cell == k)[-1] for k in range(5)])
    assert np.all((means >= lo) & (means <= hi))  # a level's mean count is one of its counts
    nv = len(grid_axis(GRID_V))
    for iu, iv in ((0, 0), (512, 64), (700, 100), (1024, 128)):
        u, v = grid_axis(GRID_U)[iu], grid_axis(GRID_V)[iv]
        p = np.exp(_bb_logpmf(np.array([v - np.logaddexp(0, -u)]), np.array([v - np.logaddexp(0, u)]))[0])
        p /= p.sum()
        want = np.bincount(cell, weights=p, minlength=5)
        assert np.allclose(g[iu * nv + iv], want, atol=1e-6)
        m = np.bincount(cell, weights=p * np.arange(256), minlength=5) / np.maximum(want, 1e-300)
        ok = want > 1e-12
        assert np.all(np.abs(means[iu * nv + iv][ok] - m[ok]) <= 0.5 + 1e-6)


@pytest.mark.parametrize("k", [2, 5, 16, 64])
def test_round_trip_gives_the_level_image_every_pixel_within_the_bound(bb_model, mnist_test, k):
    model, _ = bb_model
    x = mnist_test[:N]
    coder = LosslessCoder(model, levels=k)
    blob = coder.compress(x)
    back = LosslessCoder(model).decompress(blob)  # the decoder reads K from the stream
    assert back.dtype == np.uint8 and back.shape == x.shape
    assert np.array_equal(back, coder.quantize(x))
    err = np.abs(back.astype(int) - x.astype(int))
    assert err.max() <= coder.max_error == max_error(k)
    assert np.all(back[x == 0] == 0) and np.all(back[x == 255] == 255)
    assert container.read_header(__import__("io").BytesIO(blob)).lossless


@pytest.mark.parametrize("k", [2, 3])
def test_mean_reconstruction_decodes_what_the_encoder_computed_and_buys_psnr_at_the_same_bits(bb_model, mnist_test,
                                                                                               k):
    """``reconstruction="mean"``: each pixel decodes to E[count | level, z] for the z the chain drew: the encoder
    knows it while coding, another decoder gets it bit for bit, it stays among the level's counts, and it is
    closer to the picture than the level's value at the same container size (within a few bytes: only the
    frame header's reconstruction byte differs)."""
    model, _ = bb_model
    x = mnist_test[:N]
    lv = LosslessCoder(model, levels=k)
    mn = LosslessCoder(model, levels=k, reconstruction="mean")
    blob, recon = mn.compress_and_reconstruct(x)
    back = LosslessCoder(model).decompress(blob)
    assert np.array_equal(back.reshape(len(x), -1), recon) and back.shape == x.shape
    values, cell = pixel_levels(k)
    assert np.array_equal(cell[back.astype(int)], cell[x.astype(int)])  # each pixel stays within its level
    assert np.abs(back.astype(int) - x.astype(int)).max() <= mn.max_error
    assert _psnr(x, back) > _psnr(x, lv.quantize(x)) + 0.5
    assert len(blob) == len(lv.compress(x))
    with pytest.raises(ConfigError, match="compress_and_reconstruct"):
        mn.quantize(x)


def test_bits_and_psnr_fall_together_as_levels_fall_and_stay_below_lossless(bb_model, mnist_test):
    model, _ = bb_model
    x = mnist_test[:N]
    lossless = 8 * len(compress_lossless(model, x)) / N
    rows = []
    for k in (64, 16, 8, 4, 2):
        c = LosslessCoder(model, levels=k)
        rows.append((k, 8 * len(c.compress(x)) / N, _psnr(x, c.quantize(x))))
    bits = [r[1] for r in rows]
    psnr = [r[2] for r in rows]
    assert all(b1 > b2 for b1, b2 in zip(bits, bits[1:])), rows
    assert all(p1 > p2 for p1, p2 in zip(psnr, psnr[1:])), rows
    assert bits[0] < lossless and bits[-1] < lossless / 4, (rows, lossless)


def test_a_damaged_frame_is_refused_never_decoded_into_other_levels(bb_model, mnist_test):
    model, _ = bb_model
    blob = LosslessCoder(model, levels=8).compress(mnist_test[:64])
    with pytest.raises(BitstreamError):
        LosslessCoder(model).decompress(blob[:-7])
    h, frames = _frames(blob)
    n, payload = frames[0]
    for at, lv in ((10, 9), (10, 0), (10, 65), (11, 2)):  # another K, or reconstruction (valid CRC): refused
        bad = bytearray(payload)
        bad[at] = lv
        forged = container.pack(h, [(n, bytes(bad))])
        with pytest.raises(BitstreamError):
            LosslessCoder(model).decompress(forged)


def _frames(blob: bytes):
    import io

    with container.ContainerReader(io.BytesIO(blob)) as r:
        return r.header, list(r)


def test_bad_levels_and_models_are_refused(bb_model, bern_model):
    from vaestream import ModelConfig
    from vaestream.model import VAE

    for bad in (1, 65, 255, 2.5):
        with pytest.raises(ConfigError, match="levels"):
            LosslessCoder(bb_model[0], levels=bad)
    with pytest.raises(ConfigError, match="beta_binomial"):
        LosslessCoder(bern_model[0], levels=8)
    with pytest.raises(ConfigError, match="reconstruction"):
        LosslessCoder(bb_model[0], levels=8, reconstruction="median")
    with pytest.raises(ConfigError, match="near-lossless"):
        LosslessCoder(bb_model[0], reconstruction="mean")
    two = VAE(ModelConfig(latent_dim=6, hidden=(32,), likelihood="beta_binomial", top_latent_dim=3, top_hidden=(8,)))
    with pytest.raises(ConfigError, match="one stochastic layer"):
        LosslessCoder(two, levels=8)
    assert LosslessCoder(two, levels=EXACT_LEVELS).max_error == 0


@pytest.fixture(scope="module")
def cli_streams(bb_model, coded_model_dir, mnist_test, tmp_path_factory):
    """Two streams written by ``vaestream compress`` (the CLI's main, in this process): 100 records at ``--levels 6
    --reconstruction mean`` with the bits-back model, and 64 records of a family (a lossy and a bits-back member)
    at ``--psnr 35``; then ONE fresh process decodes both with ``vaestream decompress`` (``--model`` and
    ``--family``). Returns the directory, the family and the two compress reports."""
    import contextlib
    import io

    from vaestream.cli import main

    d = tmp_path_factory.mktemp("near_lossless_cli")
    fam = d / "family"
    shutil.copytree(coded_model_dir, fam / "lossy")
    shutil.copytree(bb_model[1], fam / "bitsback")
    np.save(d / "x100.npy", mnist_test[:100])
    np.save(d / "x64.npy", mnist_test[:64])
    info = {}
    for name, argv in (("levels", ["compress", str(d / "x100.npy"), str(d / "levels.vaez"), "--model",
                                   str(bb_model[1]), "--levels", "6", "--reconstruction", "mean"]),
                       ("family", ["compress", str(d / "x64.npy"), str(d / "family.vz"), "--family", str(fam),
                                   "--psnr", "35"])):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(argv) == 0, name
        info[name] = json.loads(out.getvalue().strip().splitlines()[-1])
    argvs = [["decompress", str(d / "levels.vaez"), str(d / "levels.npy"), "--model", str(bb_model[1])],
             ["decompress", str(d / "family.vz"), str(d / "family.npy"), "--family", str(fam)]]
    code = f"import sys; from vaestream.cli import main; sys.exit(max([main(a) for a in {argvs!r}]))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return d, fam, info


def test_cli_compresses_with_levels_and_another_process_decodes_it(bb_model, mnist_test, cli_streams):
    d, _, info = cli_streams
    x = mnist_test[:100]
    info = info["levels"]
    assert info["levels"] == 6 and info["reconstruction"] == "mean" and info["lossless"] is False
    want = LosslessCoder(bb_model[0], levels=6, reconstruction="mean").compress_and_reconstruct(x)[1]
    assert np.array_equal(np.load(d / "levels.npy").reshape(len(x), -1), want)


def test_a_family_with_a_near_lossless_member_serves_the_high_psnr_targets(mnist_test, cli_streams, tmp_path):
    """The lossy member's curve flattens; a target above it is met by the bits-back member's levels, at the
    fewest bits among the points that meet it; ``compress --family --psnr`` codes at that point and
    ``decompress --family``, in another process, finds the member by fingerprint."""
    d, fam, info = cli_streams
    x = mnist_test[:64]
    points = family.measure(fam, x)
    pick = family.choose(fam, psnr=35.0, points=points)
    assert pick.model.name == "bitsback" and pick.kind == "near_lossless" and pick.psnr_db >= 35.0
    # compress --psnr measured the same records itself (family.choose(fam, x, psnr=35)): the same point
    got = info["family"]
    assert (got["model"], got["quality"], got["levels"], got["reconstruction"]) == (
        str(pick.model), pick.quality, pick.levels, pick.reconstruction)
    assert (got["selection_psnr_db"], got["selection_bits_per_record"]) == (pick.psnr_db, pick.bits_per_record)
    ok = [p for p in points if p.psnr_db >= 35.0]
    assert pick.bits_per_record == min(p.bits_per_record for p in ok)
    assert {p.model.name for p in points} == {"lossy", "bitsback"}
    lossy_best = max(p.psnr_db for p in points if p.kind == "lossy")
    assert lossy_best < 35.0  # the target is out of the decoder network's reach
    from vaestream import ModelConfig

    two = tmp_path / "two_layer"
    two.mkdir()
    (two / "config.json").write_text(ModelConfig(latent_dim=6, hidden=(32,), likelihood="beta_binomial",
                                                 top_latent_dim=3, top_hidden=(8,)).to_json())
    assert family.is_near_lossless(fam / "bitsback") and not family.is_near_lossless(two)  # levels need one layer

    y = np.load(d / "family.npy")
    assert _psnr(x, y) == pytest.approx(pick.psnr_db, abs=1e-9) and _psnr(x, y) >= 35.0


def test_the_beam_jobs_code_near_losslessly_and_decode_the_level_images(bb_model, mnist_test, tmp_path):
    """``pipelines/encode.py --coder lossless --levels 5``: one near-lossless container per batch; the decode job
    reads K from each stream and returns every record's level image (uint8), key for key; counts add up, and
    --levels without the lossless coder is refused before anything runs."""
    import pyarrow.parquet as pq

    from vaestream.beam.jobs import decode, encode

    model, model_dir = bb_model
    x = mnist_test[3000:3250]
    np.save(tmp_path / "counts.npy", x)
    out = tmp_path / "codes"
    s = encode.run(["--input", str(tmp_path / "counts.npy"), "--model", str(model_dir), "--output", str(out),
                    "--coder", "lossless", "--levels", "5", "--chunk_size", "100"])
    assert s["records"] == 250 and s["dead_lettered"] == 0 and s["records_in"] == 250
    rec = tmp_path / "rec"
    d = decode.run(["--input", str(out), "--model", str(model_dir), "--output", str(rec), "--output_dtype", "uint8",
                    "--output_format", "parquet"])
    assert d["records"] == 250 and d["dead_lettered"] == 0
    back = {}
    for f in rec.glob("recon-*.parquet"):
        t = pq.read_table(f).to_pydict()
        back.update(zip(t["key"], t["data"]))
    want = LosslessCoder(model, levels=5).quantize(x)
    assert sorted(back) == [f"counts.npy:{i:09d}" for i in range(250)]
    for i in range(250):
        assert np.array_equal(np.asarray(back[f"counts.npy:{i:09d}"]).reshape(x[i].shape), want[i])
    with pytest.raises(ConfigError, match="--coder lossless"):
        encode.run(["--input", str(tmp_path / "counts.npy"), "--model", str(model_dir), "--output",
                    str(tmp_path / "x"), "--coder", "--levels", "5"])
