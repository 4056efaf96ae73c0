"""Per-record operating points (``vaestream.coding.per_record``) over a real family on real MNIST: each record at the
point that minimises bits + lambda SE, one stream of per-member streams that decodes, in a fresh process too, to
what the encoder reported, meets its PSNR target, and is refused when truncated, corrupt or of another family."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from vaestream.coding import family, per_record
from vaestream.errors import BitstreamError, ConfigError, ModelError


@pytest.fixture(scope="module")
def fam(tmp_path_factory, coded_model_dir, recon_member):
    """A family of a lossy member (ladder of 19 qualities) and a bits-back member with a K = 4 context model and
    reconstruction network."""
    from vaestream.coding.codec import TABLES_FILE

    root = tmp_path_factory.mktemp("mixed") / "family"
    shutil.copytree(coded_model_dir, root / "lossy")
    # the session's bits-back model directory may have been given lossy tables by another test: not here
    shutil.copytree(recon_member[1], root / "bitsback", ignore=shutil.ignore_patterns(TABLES_FILE))
    return root


@pytest.fixture(scope="module")
def x(mnist_test):
    return mnist_test[:200]


@pytest.fixture(scope="module")
def points(fam, x):
    return per_record.candidates(fam, x)


def _psnr(x, y):
    d = x.reshape(len(x), -1).astype(np.float64) - y.reshape(len(y), -1).astype(np.float64)
    return float(10 * np.log10(1.0 / np.mean((d / 255.0) ** 2)))


def test_the_candidates_are_the_lossy_ladder_and_the_near_lossless_k_with_their_real_bits(fam, x, points):
    lossy = [p for p in points if p.levels is None]
    near = [p for p in points if p.levels]
    assert len(lossy) == 19
    assert [(p.levels, p.reconstruction) for p in near] == [(k, "learned" if k == 4 else "mean")
                                                                  for k in family.MEAN_LADDER]
    for p in near:
        nl = family.bitsback_coder(fam / "bitsback", p.levels, p.reconstruction)
        blob = nl.compress(x)
        assert p.bits_per_record == 8 * len(blob) / len(x)
        # each record's bits against what it costs measured on its own: coded alone, a record pays its bits plus
        # about one stream's overhead (header, frame, the chain's start), the same for every record, so the
        # per-record bits explain the spread of the lone records' sizes (an even split of the batch would not)
        alone = np.array([8.0 * len(nl.compress(x[i:i + 1])) for i in range(len(x))])
        extra = alone - p.record_bits
        assert np.all(extra > 0) and np.std(extra) < 0.4 * np.std(alone), (p.levels, np.std(extra), np.std(alone))
        assert np.corrcoef(alone, p.record_bits)[0, 1] > 0.9
        # and the sub-streams: the records in quarters from cheapest to dearest by their bits, each quarter coded
        # as a stream of its own costs its records' bits plus at most about one stream's overhead, in that order
        sub = [(p.record_bits[g].sum(), 8.0 * len(nl.compress(x[g])))
               for g in np.array_split(np.argsort(p.record_bits), 4)]
        assert all(0 < real - est < 2 * np.median(extra) for est, real in sub), (p.levels, sub)
        assert [real for _, real in sub] == sorted(real for _, real in sub)
        # the errors are those of the pictures the stream decodes to
        y = np.asarray(nl.decompress(blob)).reshape(len(x), -1)
        d = (x.reshape(len(x), -1).astype(np.float64) - y) / 255.0
        assert np.allclose(p.record_se, np.sum(d * d, axis=1), rtol=0, atol=1e-12)
        assert p.psnr_db == pytest.approx(_psnr(x, y), abs=1e-9)
    for p in points:
        assert p.record_bits.shape == p.record_se.shape == (len(x),)
        assert np.all(p.record_bits > 0) and np.all(p.record_se >= 0)


def test_bits_estimate_each_records_share_of_the_chain(fam, x):
    """Summed over the batch, the per-record estimate is within a few per cent of the chain's real bits, and it
    ranks records as the chain does (a record coded alone pays more, so the ranking is checked on halves)."""
    nl = family.bitsback_coder(fam / "bitsback", 4, "learned")
    est = nl.bits(x)
    real = 8 * len(nl.compress(x))
    assert 0.85 * real < est.sum() < 1.02 * real
    order = np.argsort(est)
    cheap, dear = x[order[:100]], x[order[100:]]
    assert len(nl.compress(cheap)) < len(nl.compress(dear))
    exact = family.bitsback_coder(fam / "bitsback").bits(x)  # the member's lossless coder: its -ELBO
    assert exact.shape == est.shape and np.all(exact > est)


def test_each_record_takes_its_cheapest_point_and_a_larger_lambda_buys_less_error_with_more_bits(points, x):
    bits = np.stack([p.record_bits for p in points])
    se = np.stack([p.record_se for p in points])
    last = None
    for lm in (1.0, 10.0, 100.0, 1e3, 1e4):
        j = per_record.assign(points, lm, stream_bits=0.0, rounds=0)
        assert np.array_equal(j, np.argmin(bits + lm * se, axis=0))
        o = per_record.outcome(points, j, x[0].size)
        if last is not None:
            assert o["mse"] <= last["mse"] and o["bits_per_record"] >= last["bits_per_record"]
        last = o
    # with a cost per stream, a point that serves its records for less than that saving is dropped
    j = per_record.assign(points, 100.0, stream_bits=1e9)
    assert len(np.unique(j)) == 1


def test_a_psnr_target_between_the_members_is_met_per_record_for_fewer_bits_than_any_one_point(fam, x, points):
    lossy_best = max(p.psnr_db for p in points if p.levels is None)
    near = next(p for p in points if p.levels == 4)
    assert lossy_best < near.psnr_db
    target = round((lossy_best + near.psnr_db) / 2, 2)
    single = family.choose(fam, x, psnr=target)
    assert single.levels  # only the near-lossless member reaches the target
    coder = per_record.PerRecordCoder(fam, psnr=target, points=points)
    r = coder.encode(x)
    blob, x_hat = r.blob, r.reconstruction
    assert r.psnr_db == pytest.approx(_psnr(x, x_hat), abs=1e-9) and r.psnr_db >= target
    assert None in {s["levels"] for s in r.streams} and len(r.streams) > 1  # lossy and near-lossless
    assert sum(s["records"] for s in r.streams) == len(x)
    assert 8 * len(blob) / len(x) == r.bits_per_record < single.bits_per_record
    assert coder.compress(x) == blob  # compress: the same stream, bytes only
    # bits: each record's estimate at the point chosen for it; their sum is the stream less its fixed costs (the
    # record map and each sub-stream's head), so a little under the real bytes; records at the lossy points cost less
    bits = coder.bits(x)
    assert bits.shape == (len(x),) and bits.dtype == np.float64 and np.all(bits > 0)
    assert 0.9 * 8 * len(blob) < bits.sum() <= 8 * len(blob)
    chosen = per_record.choose(points, x[0].size, psnr=target)["assignment"]
    lossy = np.array([points[j].levels is None for j in chosen])
    assert 0 < lossy.sum() < len(x) and bits[lossy].mean() < bits[~lossy].mean()
    y = coder.decompress(blob)
    assert y.dtype == np.uint8 and y.shape == x.shape and np.array_equal(y.reshape(len(x), -1), x_hat)
    with pytest.raises(ConfigError, match="reaches"):
        per_record.choose(points, x[0].size, psnr=99.0)


def test_a_truncated_corrupt_or_foreign_mixed_stream_is_refused(fam, x, points, tmp_path):
    lossy = next(i for i, p in enumerate(points) if p.levels is None)
    near = next(i for i, p in enumerate(points) if p.levels == 4)
    j = np.where(np.arange(60) % 3 == 0, near, lossy)
    coder = per_record.PerRecordCoder(fam, points=points)
    r = coder.encode(x[:60], j)
    blob, x_hat = r.blob, r.reconstruction
    assert np.array_equal(coder.decompress(blob).reshape(60, -1), x_hat)
    for cut in (1, 5, 12, len(blob) // 2, len(blob) - 1):
        with pytest.raises(BitstreamError):
            coder.decompress(blob[:cut], "cut.vm")
    with pytest.raises(BitstreamError, match="trailing"):
        per_record.read(blob + b"\0")
    bad = bytearray(blob)
    bad[7] ^= 0x01  # the record count in the header
    with pytest.raises(BitstreamError, match="CRC32|corrupt|truncated"):
        per_record.read(bytes(bad))
    bad = bytearray(blob)
    bad[-3] ^= 0x10  # inside the last member stream: its own CRC32
    with pytest.raises(BitstreamError):
        coder.decompress(bytes(bad))
    other = tmp_path / "other"
    shutil.copytree(fam / "lossy", other / "lossy")
    with pytest.raises(ModelError, match="not a member"):
        per_record.PerRecordCoder(other).decompress(blob)  # the near-lossless stream's model is not in that family
    _, streams, _ = per_record.read(blob)
    with pytest.raises(BitstreamError, match="not a mixed"):
        per_record.read(streams[0][1])


def test_the_cli_codes_per_record_and_a_fresh_process_decodes_it_with_the_family(fam, x, points, tmp_path, capsys):
    """``vaestream compress --per-record`` (the CLI's main, here) writes a stream that ``vaestream decompress
    --family`` decodes in a fresh process; ``--model`` is refused naming ``--family``."""
    from vaestream.cli import main

    target = round(float(np.median([p.psnr_db for p in points])), 2)
    np.save(tmp_path / "x.npy", x)
    assert main(["compress", str(tmp_path / "x.npy"), str(tmp_path / "x.vm"), "--family", str(fam), "--psnr",
                 str(target), "--per-record"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["per_record"] and info["psnr_db"] >= target and info["bytes"] == (tmp_path / "x.vm").stat().st_size
    run = [sys.executable, "-m", "vaestream.cli"]
    done = subprocess.run(run + ["decompress", str(tmp_path / "x.vm"), str(tmp_path / "y.npy"), "--family", str(fam)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    y = np.load(tmp_path / "y.npy")
    assert y.shape == x.shape and _psnr(x, y) == pytest.approx(info["psnr_db"], abs=1e-9)
    assert np.array_equal(y, per_record.PerRecordCoder(fam).decompress((tmp_path / "x.vm").read_bytes()))
    assert main(["decompress", str(tmp_path / "x.vm"), str(tmp_path / "z.npy"), "--model", str(fam / "lossy")]) == 1
    assert "--family" in capsys.readouterr().err and not (tmp_path / "z.npy").exists()


def test_rd_with_per_record_targets_puts_the_per_record_points_on_the_familys_curve(fam, points, mnist_dir, capsys):
    from vaestream.cli import main

    target = round(float(np.median([p.psnr_db for p in points])), 2)
    assert main(["rd", str(fam), "--data", str(mnist_dir), "--n", "100", "--per-image-n", "20", "--peers", "webp",
                 "--per-record", str(target), "99"]) == 0
    out = json.loads(capsys.readouterr().out)
    mine = [p for p in out["points"] if p["model"] == "per-record"]
    assert len(mine) == 1 and mine[0]["psnr_db"] >= target and 0 < mine[0]["ssim"] <= 1  # 99 dB is out of reach
    assert mine[0]["bits_per_image"] == mine[0]["bits_per_record"] > 0 and mine[0]["streams"]
